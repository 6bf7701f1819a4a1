"""Backend selection shared by the public kernels.

``"auto"`` picks Triton for CUDA tensors when Triton is importable and the pure-PyTorch
path otherwise. ``"triton"`` on CPU tensors is only allowed with ``TRITON_INTERPRET=1``
(the Triton interpreter, used by the tests). Triton itself is never imported here unless a
caller actually asks about a CUDA/interpreted Triton run.
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
#: The default backend of the kernels and of the monitor's ``Execution``.
DEFAULT_BACKEND: Backend = "auto"
_TRUTHY = ("1", "true", "yes", "on", "y")


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` succeeds (cached; imports triton on first call)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpret_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` is set to a truthy value (read on every call)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUTHY


def resolve_backend(op: str, backend: str, device: torch.device) -> Literal["triton", "torch"]:
    """Map ``backend`` to the concrete path for tensors on ``device``.

    Raises ``ValueError`` for an unknown backend name, or for ``"triton"`` where it cannot
    run (Triton missing, non-CUDA device without ``TRITON_INTERPRET=1``).
    """
    if backend not in BACKENDS:
        raise ValueError(
            f"{op}: unknown backend {backend!r}; expected one of 'auto', 'triton', 'torch'"
        )
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if device.type != "cuda" and not (device.type == "cpu" and interpret_enabled()):
        raise ValueError(
            f"{op}: backend='triton' needs CUDA tensors, got device '{device}' "
            "(set TRITON_INTERPRET=1 to run the Triton interpreter on CPU tensors)"
        )
    if not triton_available():
        raise ValueError(f"{op}: backend='triton' requested but triton is not installed")
    return "triton"


def fmt_shape(shape: tuple[int, ...] | torch.Size) -> str:
    """Format a shape compactly for error messages: ``(2,3,4,4)``."""
    return "(" + ",".join(str(int(s)) for s in shape) + ")"
