"""Hyperscan databases kept on disk between processes (``<cache>/hyperscan``).

The built-in detectors' prefilter took 0.6-0.9 s to compile here, in every worker, gateway and
``vigil redact`` at start, a tenant's twenty custom patterns some 0.3 s more; loading a database
compiled before takes under a millisecond. A database is kept under the digest of what it was
compiled from (the expressions, their flags, the mode, the binding's version and the machine).
Hyperscan checks what it loads (its magic number, version, platform, length and a CRC of the
bytecode): a file that is truncated, corrupt or made by another platform or version is refused,
then compiled again and replaced, never used. Hyperscan cannot tell a database compiled from
other patterns under the same name, though, and such a one would let secrets through: nothing is
loaded from a folder or file another user owns or that group or others may write (a warning says
which, once a folder), and the folder is made for this user alone. Nothing is kept until
``keep_in`` names the folder (the CLI does, with ``VIGIL_CACHE``); a folder that cannot be written
costs only the compiling.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.ownership import written_by_others

log = logging.getLogger(__name__)
# how many databases the folder keeps: the oldest written go first (recompiled if needed again)
KEPT = 64
# a file being written that is this old was left by a process killed while writing it
_PARTIAL_SECONDS = 3600.0
_FORMAT = b"vigil-hscache-1"
_dir: Path | None = None
_warned: set[Path] = set()  # the folders said once not to be trusted


def keep_in(folder: Path | None) -> None:
    """Keep compiled databases in ``folder`` (None: compile every time)."""
    global _dir
    _dir = folder


def compiled(expressions: list[bytes], flags: list[int], mode: int) -> Any:
    """A ``hyperscan.Database`` of ``expressions`` (ids 0..n-1) with ``flags``: loaded from the
    folder when a database of the same was kept there, else compiled (and kept). Raises
    hyperscan.error for what Hyperscan cannot compile."""
    import hyperscan

    folder = _dir
    path = None
    if folder is not None:
        key = hashlib.sha256(_FORMAT)
        version = getattr(hyperscan, "__version__", "")  # not in its stubs
        key.update(f"{version}\0{platform.machine()}\0{mode}\0".encode())
        for expression, flag in zip(expressions, flags, strict=True):
            key.update(len(expression).to_bytes(8, "big") + expression + flag.to_bytes(8, "big"))
        path = folder / f"{key.hexdigest()}.hsdb"
        distrust = written_by_others(folder) or written_by_others(path)
        if distrust is not None:
            if folder not in _warned:
                _warned.add(folder)
                log.warning(
                    "compiled patterns in %s not loaded or kept: %s; compiling at each start "
                    "(chmod go-w it, or name a folder of your own in VIGIL_CACHE)", folder, distrust
                )  # fmt: skip
            path = None
        else:
            loaded = _load(path, mode)
            if loaded is not None:
                return loaded
    db = hyperscan.Database(mode=mode)
    db.compile(
        expressions=expressions,
        ids=list(range(len(expressions))),
        elements=len(expressions),
        flags=flags,
    )
    if path is not None:
        _keep(path, hyperscan.dumpb(db))
    return db


def _load(path: Path, mode: int) -> Any | None:
    import hyperscan

    try:
        blob = path.read_bytes()
    except OSError:
        return None
    try:
        return hyperscan.loadb(blob, mode)
    except hyperscan.error as exc:  # damaged, or another platform's or version's
        log.debug("compiled patterns in %s could not be loaded (%s): compiling again", path, exc)
        return None


def _keep(path: Path, blob: bytes) -> None:
    """Write ``blob`` to ``path`` whole or not at all, then drop the oldest past ``KEPT`` and
    what killed writers left; a folder that cannot be written is left as it is."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(blob)
            os.replace(partial, path)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        kept = sorted(path.parent.glob("*.hsdb"), key=_written)
        for old in kept[: max(len(kept) - KEPT, 0)]:
            old.unlink(missing_ok=True)
        left = time.time() - _PARTIAL_SECONDS
        for old in path.parent.glob(".partial-*"):
            if _written(old) < left:
                old.unlink(missing_ok=True)
    except OSError as exc:
        log.debug("compiled patterns not kept in %s: %s", path.parent, exc)


def _written(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile by another process
        return 0.0
