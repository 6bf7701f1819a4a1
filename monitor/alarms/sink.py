"""An append-only JSONL audit file of alarms, rotated by size, safe against a crash mid-write.

Each record is one line written with a single ``write`` to a file opened with ``O_APPEND``,
then fsync'd: a crash (power loss, ``kill -9``) mid-write can leave at most the line being
written incomplete, never an earlier one. Opening the sink again cuts such an unterminated
tail off before appending, and :func:`read_records` skips one if it meets it. When the next
line would take the file over ``max_bytes`` the file is renamed ``<name>.1`` (older ones move
to ``.2`` .. ``.<backups>``, the oldest is removed) and a new file is started: the sink never
holds more than ``(backups + 1) * max_bytes`` bytes (a single record larger than
``max_bytes`` still gets a file of its own). One process writes a sink's file at a time: the
open file is locked (``flock``), and a second writer is refused with
:class:`AuditFileBusyError` rather than interleaving its records and ids.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from surprise_monitor.monitor.checks import non_negative_int, positive_int
from surprise_monitor.monitor.errors import SurpriseMonitorError

#: The size at which the audit file is rotated, and the rotated files kept.
DEFAULT_MAX_BYTES = 16 << 20
DEFAULT_BACKUPS = 5


class JsonlSink:
    """Thread-safe appends of JSON records to ``path``, rotated by size.

    Args:
        path: the current file (its folder is created).
        max_bytes: the size at which the file is rotated.
        backups: rotated files kept (``path.1`` newest .. ``path.<backups>`` oldest).
    """

    def __init__(
        self, path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS
    ) -> None:
        positive_int("max_bytes", max_bytes)
        non_negative_int("backups", backups)
        self.path = Path(path)
        self.max_bytes, self.backups = max_bytes, backups
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd = -1
        self._size = 0
        self.rotations = 0
        self._open()

    def _open(self) -> None:
        """Open (or create) the current file, cutting off an unterminated last line."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            _lock(fd, self.path)
        except OSError:
            os.close(fd)
            raise
        size = os.fstat(fd).st_size
        keep = _complete_prefix(fd, size)
        if keep != size:  # a crash mid-write left a partial line: drop it, keep the rest
            os.ftruncate(fd, keep)
            os.fsync(fd)
        self._fd, self._size = fd, keep

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` as one JSON line and fsync it (rotating first if it would not
        fit)."""
        line = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()
        with self._lock:
            if self._fd < 0:
                raise ValueError("the sink is closed")
            if self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            written = os.write(self._fd, line)
            if written != len(line):  # a short write (disk full): never leave half a line
                os.ftruncate(self._fd, self._size)
                raise OSError(f"short write to {self.path}: {written} of {len(line)} bytes")
            os.fsync(self._fd)
            self._size += written

    def _rotate(self) -> None:
        """``path`` -> ``path.1`` -> ... -> ``path.<backups>`` (dropped), then a new file."""
        os.close(self._fd)
        self._fd = -1
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            oldest = self._backup(self.backups)
            oldest.unlink(missing_ok=True)
            for i in range(self.backups - 1, 0, -1):
                if self._backup(i).exists():
                    os.replace(self._backup(i), self._backup(i + 1))
            os.replace(self.path, self._backup(1))
        _fsync_folder(self.path.parent)
        self.rotations += 1
        self._open()

    def _backup(self, i: int) -> Path:
        """The ``i``-th rotated file (1: the newest)."""
        return self.path.with_name(f"{self.path.name}.{i}")

    def files(self) -> list[Path]:
        """The sink's files that exist, oldest first (the current one last)."""
        found = [self._backup(i) for i in range(self.backups, 0, -1) if self._backup(i).exists()]
        return found + ([self.path] if self.path.exists() else [])

    def records(self) -> Iterator[dict[str, Any]]:
        """Every complete record in the sink's files, oldest first."""
        for path in self.files():
            yield from read_records(path)

    def last_record(self) -> dict[str, Any] | None:
        """The newest complete record in the sink's files (``None`` when they hold none): where
        a restarted writer continues its ids from."""
        for path in reversed(self.files()):
            record = last_record(path)
            if record is not None:
                return record
        return None

    def close(self) -> None:
        """Close the file (idempotent)."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def read_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """The JSON records of one sink file; an unterminated last line (a crash mid-write) is
    skipped."""
    data = Path(path).read_bytes()
    for line in data.split(b"\n")[:-1]:  # the part after the last newline is incomplete
        if line:
            yield json.loads(line)


def last_record(path: str | Path) -> dict[str, Any] | None:
    """The last complete JSON record of one sink file, read from its end (``None`` if it has
    none); an unterminated tail or a line that is not a JSON object is passed over."""
    with open(path, "rb") as f:
        end = _complete_prefix(f.fileno(), os.fstat(f.fileno()).st_size)
        while end > 0:
            start = _line_start(f.fileno(), end - 1)
            try:
                record = json.loads(os.pread(f.fileno(), end - 1 - start, start))
            except ValueError:
                record = None
            if isinstance(record, dict):
                return record
            end = start
    return None


def _line_start(fd: int, newline: int) -> int:
    """Where the line ending at byte ``newline`` starts."""
    return _complete_prefix(fd, newline)


class AuditFileBusyError(SurpriseMonitorError, OSError):
    """Another process is writing the audit file (each process needs a file of its own)."""


def _lock(fd: int, path: Path) -> None:
    """Take an exclusive advisory lock on the open file, or raise :class:`AuditFileBusyError`:
    two writers would interleave their records and their ids."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise AuditFileBusyError(
            f"{path}: another process is writing this audit file; give each process a file of "
            "its own"
        ) from None


def _complete_prefix(fd: int, size: int) -> int:
    """The length of the file up to and including its last newline (0 if it has none)."""
    block = 1 << 16
    end = size
    while end > 0:
        start = max(0, end - block)
        chunk = os.pread(fd, end - start, start)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        end = start
    return 0


def _fsync_folder(folder: Path) -> None:
    """Make renames in ``folder`` durable (best effort where folders cannot be fsync'd)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
