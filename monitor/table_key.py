"""The secret key that signs calibration tables (HMAC-SHA256, :mod:`~.table_file`).

:func:`load_key` takes the key itself (``bytes``) or the path of a key file, whose bytes, less
surrounding whitespace, are the key; :func:`generate_key` writes a new one. Messages name the
file and the problem, never the key.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from surprise_monitor.monitor.errors import SurpriseMonitorError
from surprise_monitor.monitor.files import atomic_write_bytes

#: The shortest key accepted (HMAC-SHA256's own strength needs 32 random bytes).
MIN_KEY_BYTES = 16
#: How to make a key file from a shell.
MAKE_KEY = '(umask 077; python -c "import secrets; print(secrets.token_hex(32))" > table.key)'


class TableKeyError(SurpriseMonitorError, ValueError):
    """A table key that cannot be used: too short, or its file missing or unreadable."""


def load_key(source: bytes | str | Path) -> bytes:
    """The key: ``source`` itself when it is ``bytes``, else the contents of the key file it
    names, stripped of surrounding whitespace (:class:`TableKeyError` for a missing or
    unreadable file, or a key shorter than :data:`MIN_KEY_BYTES`)."""
    if isinstance(source, bytes | bytearray | memoryview):
        key, where = bytes(source), "the table key"
    elif isinstance(source, str | Path):
        path = Path(source)
        try:
            key = path.read_bytes().strip()
        except FileNotFoundError:
            raise TableKeyError(
                f"key file {path}: no such file; make one with {MAKE_KEY}"
            ) from None
        except OSError as exc:
            raise TableKeyError(f"key file {path}: cannot be read ({exc.strerror})") from None
        where = f"key file {path}"
    else:
        raise TypeError(f"a table key is bytes or a key file's path, not {type(source).__name__}")
    if len(key) < MIN_KEY_BYTES:
        raise TableKeyError(
            f"{where} is too short: a table key needs at least {MIN_KEY_BYTES} bytes (make one "
            f"with {MAKE_KEY})"
        )
    return key


def key_of_flag(value: str | None, flag: str) -> bytes | None:
    """A command line's key: ``None`` without the flag, else :func:`load_key` of the file it
    names, a :class:`TableKeyError` worded with the flag (``--table-key: key file ...``)."""
    if not value:
        return None
    try:
        return load_key(value)
    except TableKeyError as exc:
        raise TableKeyError(f"{flag}: {exc}") from None


def generate_key(path: str | Path) -> Path:
    """Write a new random key (32 bytes as 64 hex digits) to ``path``, readable by its owner
    only (``0o600``, atomically); an existing file is never replaced. Returns ``path``."""
    path = Path(path)
    if path.exists():
        raise TableKeyError(f"key file {path} already exists (tables signed with it need it)")
    return atomic_write_bytes(path, (secrets.token_hex(32) + "\n").encode(), mode=0o600)
