"""A spool on local disk for the messages an emitter's broker did not take.

Without it, an event is lost when Kafka stays away longer than the producer's message timeout,
and one still queued when the process exits is lost with it. With a spool, each such message
(key and value, as they would have been produced) is appended to a segment file, and the
emitter sends the oldest segment again once the broker answers; a segment left by a process
that exited or was killed is sent by the next emitter to open the folder.

A segment is ``<time_ns>-<pid>-<n>.spool``: records of ``"VS"``, the CRC-32 of what follows the
CRC, the key's length (``0xFFFFFFFF``: no key), the value's length (each 4 bytes, big-endian),
the key and the value. Its writer holds an exclusive ``flock`` on it from before it has that
name, so a reader takes only segments nobody writes: sealed ones, and those of a process gone.
Several processes may share a folder.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">2sIII")
_MAGIC = b"VS"
_NO_KEY = 0xFFFFFFFF
SUFFIX = ".spool"
_COUNT_SECONDS = 1.0  # how old this process's count of a shared folder may grow


class SpoolError(Exception):
    """The message was not kept: the message says why."""


class SpoolFull(SpoolError):
    """The spool holds its ``max_bytes``."""


def encode_record(key: bytes | None, value: bytes) -> bytes:
    """One record as it is written."""
    lengths = struct.pack(">II", _NO_KEY if key is None else len(key), len(value))
    body = lengths + (key or b"") + value
    return _MAGIC + struct.pack(">I", zlib.crc32(body)) + body


@dataclass(frozen=True)
class Parsed:
    """A segment's bytes read: its whole records, and where reading stopped short of the end
    (None: it did not) and whether for a record cut short rather than one that fails its
    check."""

    records: list[tuple[bytes | None, bytes]]
    stop: int | None = None
    cut_short: bool = False


def _parse(data: bytes) -> Parsed:
    records: list[tuple[bytes | None, bytes]] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _HEADER.size:
            return Parsed(records, offset, cut_short=True)
        magic, crc, key_len, value_len = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        end = start + (0 if key_len == _NO_KEY else key_len) + value_len
        if magic != _MAGIC:
            return Parsed(records, offset)
        if end > len(data):
            return Parsed(records, offset, cut_short=True)
        if zlib.crc32(data[offset + 6 : end]) != crc:
            return Parsed(records, offset)
        key = None if key_len == _NO_KEY else data[start : start + key_len]
        records.append((key, data[end - value_len : end]))
        offset = end
    return Parsed(records)


@dataclass(frozen=True)
class Segment:
    """What ``survey`` finds of one segment: ``held`` while a process writes or sends it;
    ``records`` None when not read (held, or not asked for), ``whole`` False when it does not
    read to its end."""

    name: str
    size: int
    held: bool
    records: int | None = None
    whole: bool = True


def survey(folder: Path, read: bool = True) -> tuple[list[Segment], list[Path]]:
    """The segments in ``folder``, oldest first, each read (not taken; with ``read``) unless a
    process holds it; and the files set aside as ``.corrupt``. Changes nothing."""
    segments = []
    for path in _segments(folder):
        file = _locked(path)
        if file is None:
            with suppress(FileNotFoundError):
                segments.append(Segment(path.name, path.stat().st_size, held=True))
            continue
        with file:
            size = os.fstat(file.fileno()).st_size
            if not read:
                segments.append(Segment(path.name, size, held=False))
                continue
            parsed = _parse(file.read())
        segments.append(Segment(path.name, size, False, len(parsed.records), parsed.stop is None))
    return segments, sorted(folder.glob(f"*{SUFFIX}.corrupt"))


class Taken:
    """A segment this process holds for sending again: read ``records()``, then ``done()``
    (deleted) or ``release()`` (left for a later try)."""

    def __init__(self, path: Path, file: BinaryIO, spool: Spool) -> None:
        self.path = path
        self._file = file
        self._spool = spool
        self.corrupt_at: int | None = None  # offset of the first unreadable record

    def records(self) -> Iterator[tuple[bytes | None, bytes]]:
        """The segment's records in order. Stops at a record cut short (its writer killed while
        writing it, or a length damaged) or at one that fails its check; then ``corrupt_at``
        says where, and ``done()`` sets the file aside rather than delete what was unread."""
        data = self._file.read()
        parsed = _parse(data)
        yield from parsed.records
        if parsed.stop is None:
            return
        self.corrupt_at = parsed.stop
        level, what = logging.ERROR, f"the record at byte {parsed.stop} fails its check"
        if parsed.cut_short:
            level = logging.WARNING
            what = (f"its last {len(data) - parsed.stop} bytes are not a whole record (its "
                    "writer stopped while writing one)")  # fmt: skip
        log.log(level, "spool %s: %s; the records before are sent, the file is kept as "
                "%s.corrupt", self.path.name, what, self.path.name)  # fmt: skip

    def done(self) -> None:
        """Every record was sent (or spooled again): delete the segment, or set it aside as
        ``.corrupt`` when part of it could not be read."""
        self._spool.forget(os.fstat(self._file.fileno()).st_size)
        if self.corrupt_at is None:
            self.path.unlink(missing_ok=True)
        else:
            self.path.rename(self.path.with_name(self.path.name + ".corrupt"))
        self._file.close()  # closing releases the lock, after the name is gone

    def release(self) -> None:
        self._file.close()


class Spool:
    """Append-only segments in ``folder``, a new one every ``segment_bytes``, at most
    ``max_bytes`` in all: of every process sharing the folder, past it by at most a sixteenth of
    a segment for each other process writing at once. Thread-safe. ``append`` writes through to
    the operating system (a killed process loses nothing written); ``seal`` and ``close`` also
    fsync."""

    def __init__(
        self, folder: Path, max_bytes: int = 1 << 30, segment_bytes: int = 16 << 20
    ) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        try:
            folder.mkdir(parents=True, exist_ok=True)  # a file of that name: FileExistsError
        except OSError as exc:
            raise SpoolError(
                f"the spool folder {folder} cannot be used: {exc.strerror or exc}"
            ) from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise SpoolError(f"the spool folder {folder} cannot be used: it is not writable")
        self._lock = threading.Lock()
        self._writing: int | None = None  # the descriptor of the segment being written
        self._written = 0  # bytes in the segment being written
        self._made = 0
        self._bytes = _folder_bytes(folder)  # every process's, as last counted
        self._counted = time.monotonic()
        self._unseen = 0  # bytes this process wrote since
        self._forget_unnamed()

    def __repr__(self) -> str:
        return f"Spool({self.folder}, {self._bytes} of {self.max_bytes} bytes)"

    @property
    def size(self) -> int:
        """What the segments hold, as this process last counted them."""
        return self._bytes

    def _forget_unnamed(self) -> None:
        """Remove what a writer killed between creating a segment and naming it left: an empty
        file nobody holds."""
        for path in self.folder.glob(".*.new"):
            file = _locked(path)
            if file is not None:
                path.unlink(missing_ok=True)
                file.close()

    def append(self, key: bytes | None, value: bytes) -> None:
        """Keep one message. Raises SpoolFull when it would take the spool past max_bytes,
        SpoolError when the folder cannot be written (the disk full...): then the segment
        ends at its last whole record, and the next message starts another."""
        record = encode_record(key, value)
        with self._lock:
            # other processes sharing the folder write and send too: count the folder again
            # after a sixteenth of a segment written here, each second, and before refusing
            stale = time.monotonic() - self._counted >= _COUNT_SECONDS
            stale = stale or self._unseen >= self.segment_bytes // 16
            if stale or self._bytes + len(record) > self.max_bytes:
                self._bytes, self._unseen = _folder_bytes(self.folder), 0
                self._counted = time.monotonic()
            if self._bytes + len(record) > self.max_bytes:
                raise SpoolFull(
                    f"the spool in {self.folder} holds {self._bytes} bytes of at most "
                    f"{self.max_bytes}"
                )
            if self._writing is not None and self._written >= self.segment_bytes:
                self._seal()
            try:
                if self._writing is None:
                    self._writing = self._new_segment()
                    self._written = 0
                view = memoryview(record)
                while view:
                    view = view[os.write(self._writing, view) :]
            except OSError as exc:
                self._abandon()
                raise SpoolError(f"the spool in {self.folder} cannot be written: {exc}") from None
            self._written += len(record)
            self._bytes += len(record)
            self._unseen += len(record)

    def _new_segment(self) -> int:
        while True:
            self._made += 1
            name = f"{time.time_ns():020d}-{os.getpid()}-{self._made}{SUFFIX}"
            unnamed = self.folder / f".{name}.new"
            fd = os.open(unnamed, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)  # before it has a name a reader looks for
            try:
                unnamed.rename(self.folder / name)
                return fd
            except FileNotFoundError:  # another process's start took it for a dead one's
                os.close(fd)

    def _abandon(self) -> None:
        """End the segment being written at its last whole record, after a failed write."""
        if self._writing is not None:
            with suppress(OSError):
                os.ftruncate(self._writing, self._written)
            os.close(self._writing)
            self._writing = None

    def seal(self) -> None:
        """End the segment being written, so it can be taken."""
        with self._lock:
            self._seal()

    def _seal(self) -> None:
        if self._writing is not None:
            try:
                os.fsync(self._writing)
            except OSError as exc:  # written, but perhaps not on the disk yet
                log.warning("spool %s: fsync failed: %s", self.folder, exc)
            os.close(self._writing)
            self._writing = None

    def has_segments(self) -> bool:
        return any(self.folder.glob(f"*{SUFFIX}"))

    def take(self) -> Taken | None:
        """The oldest segment nobody is writing or sending, held until ``done`` or ``release``;
        None when there is none."""
        for path in _segments(self.folder):
            file = _locked(path)
            if file is None:
                continue
            if os.fstat(file.fileno()).st_nlink == 0:  # sent by another while we waited
                file.close()
                continue
            return Taken(path, file, self)
        return None

    def forget(self, size: int) -> None:
        """A taken segment of ``size`` bytes is gone (``Taken.done``): count it out."""
        with self._lock:
            self._bytes = max(0, self._bytes - size)

    def close(self) -> None:
        self.seal()


def _folder_bytes(folder: Path) -> int:
    """What the segments in ``folder`` hold now, those being written included."""
    total = 0
    for path in _segments(folder):
        with suppress(FileNotFoundError):  # sent and deleted since it was listed
            total += path.stat().st_size
    return total


def _segments(folder: Path) -> list[Path]:
    """The segments in ``folder``, oldest first (their names begin with the time they were
    made): regular files only (a folder of that name raised IsADirectoryError in every reader,
    the spool's thread too; a pipe would have held it forever)."""
    return sorted(path for path in folder.glob(f"*{SUFFIX}") if path.is_file())


_UNREADABLE: set[Path] = set()  # the segments ``_locked`` has said it cannot open


def _locked(path: Path) -> BinaryIO | None:
    """``path`` opened to read and held with an exclusive lock; None if another holds it or it
    is gone."""
    try:
        file = open(path, "rb")  # noqa: SIM115 - returned open, with its lock
    except FileNotFoundError:
        return None
    except OSError as exc:  # not this user's to read: left where it is, for a person
        if path not in _UNREADABLE:  # said once, not at each resend (every few seconds)
            _UNREADABLE.add(path)
            log.error("spool segment %s cannot be read (%s); left where it is", path, exc.strerror)
        return None
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        return None
    return file
