"""What one request to the service may hold, declared once: the app enforces these limits and
``surprise-serve``'s flags (``--max-body-mb``, ``--max-batch``, ``--max-image-pixels``) take
their defaults from here. Kept apart from the app so the command line's ``--help`` and
``--write-config`` need no web framework."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one request may hold."""

    max_body_bytes: int = 16 * MIB
    max_batch: int = 64
    max_image_pixels: int = 25_000_000
