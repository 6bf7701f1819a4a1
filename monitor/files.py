"""Atomic file writes: a reader sees the old file or the complete new one, never a partial one.

Every file the library writes (calibration tables, checkpoint manifests, sketch states,
figures) goes through :func:`atomic_write`: a temporary file in the same folder, fsync, rename,
fsync of the folder. A new file gets the permissions ``open()`` would give it (``0666`` less the
umask), a replaced file keeps its own, unless a ``mode`` is given (a secret's ``0o600``: the
temporary file has it from the start).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(
    path: str | Path, write: Callable[[Path], object], *, mode: int | None = None
) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, fsync it, then rename it to
    ``path`` and fsync the folder. On any error the temporary file is removed and ``path`` is
    left as it was. ``mode``: the file's permissions (default: see the module). Returns
    ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, _mode_for(path) if mode is None else mode)  # mkstemp makes 0600
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        _fsync(path.parent, os.O_RDONLY)
    except OSError:
        pass
    return path


def _mode_for(path: Path) -> int:
    """The permissions the written file gets: the replaced file's, else ``0666`` less the
    process's umask (what ``open(path, "w")`` would give)."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process's umask (read from ``/proc/self/status`` where there is one, so it is never
    changed, even for a moment)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`). Returns ``path``."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), mode=mode)


def _fsync(path: Path, flags: int) -> None:
    """fsync the file or folder at ``path`` (opened with ``flags``)."""
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
