"""Error messages that name what to do in the interface the user is in.

The library's exceptions speak the Python API (``pass
execution=Execution(check_fingerprint=False)``, ``pass dataset=...``). Where a command line offers
the same remedy under a flag (or not at all), :func:`advise` attaches the command line's wording to
the exception, and the command lines print :func:`cli_message` instead of ``str(exc)``.
"""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


def advise(exc: E, cli: str) -> E:
    """``exc`` carrying ``cli``, the message a command line shows instead of ``str(exc)``."""
    exc.cli_message = cli  # type: ignore[attr-defined]
    return exc


def cli_message(exc: BaseException) -> str:
    """What a command line prints for ``exc``: its command-line wording, else ``str(exc)``."""
    return getattr(exc, "cli_message", None) or str(exc)
