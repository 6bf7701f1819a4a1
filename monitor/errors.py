"""The base of every error the project raises on purpose.

Each error keeps its built-in parent (``ValueError`` for bad input or a bad file,
``RuntimeError`` for a wrong state), so ``except ValueError`` goes on working; catching
:class:`SurpriseMonitorError` catches the project's own errors in one clause.
"""

from __future__ import annotations


class SurpriseMonitorError(Exception):
    """An error raised by surprise-monitor itself (not by the watched model or a library)."""
