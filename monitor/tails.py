"""Tail ranks of values among a sorted reference: how far into the upper tail of the training
images' values an input lies (the atypicality score's building block,
:mod:`surprise_monitor.monitor.atypicality`)."""

from __future__ import annotations

import torch

#: How a reference turns a value into its tail rank: ``"step"``, the share of reference values
#: at least as high (every value beyond all but one training image ties), or ``"exponential"``
#: (tables calibrated since stop 32): interpolated between the reference values and, above the
#: :data:`TAIL_POINTS`-th highest, an exponential tail fitted to the values above it, so that
#: inputs beyond every training image keep their order.
STEP_TAIL, EXPONENTIAL_TAIL = "step", "exponential"
TAILS = (STEP_TAIL, EXPONENTIAL_TAIL)
#: How many of the highest reference values fit the exponential tail (fewer on a reference of
#: under ten times as many values: a tenth of it, at least one).
TAIL_POINTS = 50


def tail_ranks(reference: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``(1 + #{reference >= v}) / (m + 1)`` for ``values [B]`` against a sorted ``reference
    [m]`` (float32, on ``values``' device)."""
    ref = reference.to(values.device)
    below = torch.searchsorted(ref, values.float().contiguous(), right=False)
    m = ref.numel()
    return (1.0 + (m - below).float()) / float(m + 1)


def exponential_tail_ranks(reference: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Continuous tail ranks of ``values [B]`` against a sorted ``reference [m]`` (float32, on
    ``values``' device): ``(1 + m - F(v)) / (m + 1)`` where ``F`` interpolates the count of
    reference values below ``v`` linearly between them, and above ``u``, the ``k``-th highest
    reference value (``k`` = :data:`TAIL_POINTS`), ``(1 + k) / (m + 1) * exp(-(v - u) / s)``
    with ``s`` the mean excess of the ``k - 1`` values above ``u`` (the exponential tail's
    maximum-likelihood scale; the two pieces meet at ``u``). Equal to :func:`tail_ranks` at
    the reference values below ``u`` (without ties); decreasing above it down to float32's
    smallest normal number (so that ``log`` stays finite)."""
    ref = reference.to(values.device).float()
    v = values.float().contiguous()
    m = ref.numel()
    if m < 2:  # nothing to interpolate or fit
        return tail_ranks(ref, v)
    k = max(1, min(TAIL_POINTS, m // 10))
    hi = torch.searchsorted(ref, v, right=False).clamp(1, m - 1)  # at or below ref[0]: 0
    left, right = ref[hi - 1], ref[hi]
    step = (right - left).clamp_min(torch.finfo(torch.float32).tiny)
    below = (hi - 1).float() + ((v - left) / step).clamp(0.0, 1.0)
    body = (1.0 + m - below) / float(m + 1)
    u = ref[m - k]
    scale = (ref[m - k + 1 :] - u).mean() if k > 1 else torch.ones((), device=ref.device)
    scale = scale.clamp_min(torch.finfo(torch.float32).eps)
    tail = (1.0 + k) / float(m + 1) * torch.exp(-(v - u) / scale)
    tiny = torch.finfo(torch.float32).tiny  # exp underflows far out: keep log(rank) finite
    return torch.where(v > u, tail, body).clamp(tiny, 1.0)
