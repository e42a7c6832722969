"""Whether a file or folder may hold what another user wrote.

What Vigil keeps in its cache and later trusts (the redaction prefilters compiled before, the
local broker's jars, which Java runs) is used only when no other user could have put it there:
a folder such as a shared ``/tmp`` would otherwise let one user's planted file run, or go
unredacted, as another.
"""

from __future__ import annotations

import os
from pathlib import Path


def written_by_others(path: Path) -> str | None:
    """Why ``path`` may hold what another user wrote (owned by another uid, or writable by group
    or others), or None when only this user could have written it, or it is not there."""
    try:
        st = path.stat()
    except OSError:
        return None
    if st.st_uid != os.geteuid():
        return f"{path.name} is owned by uid {st.st_uid}, not this user"
    if st.st_mode & 0o022:
        return f"{path.name} may be written by group or others (mode {st.st_mode & 0o777:o})"
    return None
