"""What one request to the service may hold and how long a client may take, declared once: the
app and the server enforce these limits, and ``surprise-serve``'s flags (``--max-body-mb``,
``--max-batch``, ``--max-image-pixels``; ``--header-timeout``, ``--body-timeout``,
``--keep-alive-timeout``, ``--shutdown-timeout``, ``--max-connections``) take their defaults from
here. Kept apart from the app so the command line's ``--help`` and ``--write-config`` need no web
framework."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one request may hold."""

    max_body_bytes: int = 16 * MIB
    max_batch: int = 64
    max_image_pixels: int = 25_000_000


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a client may take, how many may be connected, how long shutdown may wait
    (seconds; :mod:`surprise_monitor.serve.server`)."""

    header_timeout: float = 10.0  # connection open (or next request's first byte) -> headers
    body_timeout: float = 60.0  # headers -> the body's last byte, in all
    keep_alive_timeout: float = 5.0  # idle between requests on a kept-alive connection
    shutdown_timeout: float = 10.0  # SIGTERM -> running requests cancelled
    max_connections: int = 512  # connections at once (503 beyond)
