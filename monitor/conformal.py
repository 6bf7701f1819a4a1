"""Conformal p-values: how unusual an input's atypicality score is among held-out inputs.

A :class:`ConformalNull` holds the scores of ``n`` held-out in-distribution inputs the network
did not train on, judged as deployed. For a new input with score ``s`` (higher = more atypical)

    p = (1 + #{null scores >= s}) / (n + 1)

When the new input and the held-out inputs are exchangeable (normal traffic), ``P(p <= a) <= a``
for every ``a``: an alarm ``p <= alarm_rate`` fires on at most ``alarm_rate`` of normal inputs
(exactly ``floor(alarm_rate * (n + 1)) / (n + 1)`` when scores do not tie), whatever the score's
distribution. Computed on the scores' device with one ``searchsorted``: no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surprise_monitor.monitor.checks import fraction


@dataclass(frozen=True, eq=False)
class ConformalNull:
    """Sorted held-out scores (``[n]`` float32, ascending, finite, ``n >= 1``)."""

    scores: torch.Tensor

    def __post_init__(self) -> None:
        s = self.scores
        if s.ndim != 1 or s.numel() == 0:
            raise ValueError(f"a conformal null needs a 1-D tensor of scores, got {tuple(s.shape)}")
        if not bool(torch.isfinite(s).all()):
            raise ValueError("the conformal null holds NaN or Inf scores")
        if bool((s[1:] < s[:-1]).any()):
            raise ValueError("the conformal null's scores must be sorted ascending")

    @classmethod
    def of(cls, scores: torch.Tensor) -> ConformalNull:
        """The null of unsorted held-out ``scores`` (any float dtype, any device)."""
        flat = torch.as_tensor(scores).detach().reshape(-1).to(torch.float32)
        return cls(torch.sort(flat).values.contiguous())

    @property
    def size(self) -> int:
        """n, the held-out inputs."""
        return int(self.scores.numel())

    def to(self, device: torch.device | str) -> ConformalNull:
        """The same null on ``device``."""
        return ConformalNull(self.scores.to(device))

    def p_values(self, scores: torch.Tensor) -> torch.Tensor:
        """``(1 + #{null >= s}) / (n + 1)`` per score (float32, on the scores' device; a NaN
        score gets p = 1/(n+1), the most atypical)."""
        null = self.scores.to(scores.device)
        s = scores.to(torch.float32)
        below = torch.searchsorted(null, torch.nan_to_num(s, nan=float("inf")), right=False)
        n = null.numel()
        return (1.0 + (n - below).to(torch.float32)) / float(n + 1)

    def threshold(self, alarm_rate: float) -> float:
        """The score above which an input alarms at ``alarm_rate``: ``p <= alarm_rate`` exactly
        when ``score > threshold`` (``inf`` when no score can alarm: the null is too small for
        that rate, ``(n + 1) * alarm_rate < 1``)."""
        rate = fraction("alarm_rate", alarm_rate)
        n = self.size
        m = int((n + 1) * rate + 1e-9) - 1  # alarms need #{null >= s} <= m
        if m < 0:
            return float("inf")
        return float(self.scores[n - 1 - m]) if m < n else float("-inf")

    def smallest_rate(self) -> float:
        """The smallest alarm rate this null supports: ``1 / (n + 1)``."""
        return 1.0 / (self.size + 1)


def resampled_alarm_rate(
    null_scores: torch.Tensor,
    evaluation_scores: torch.Tensor,
    alarm_rate: float,
    draws: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """The alarm rate over ``draws`` random re-splits of held-out + evaluation scores into a
    null and an evaluation part of the same sizes: ``mean``, ``p5``, ``p95`` and ``draws``.

    The guarantee ``P(p <= a) <= a`` is on average over the draw of the null; one draw of ``n``
    held-out images moves the rate of one evaluation set by about ``sqrt(a / n)``. The mean over
    re-splits estimates the average the guarantee is about (exchangeable scores: at most
    ``alarm_rate``)."""
    rate = fraction("alarm_rate", alarm_rate)
    null = torch.as_tensor(null_scores).detach().reshape(-1).float().cpu()
    fresh = torch.as_tensor(evaluation_scores).detach().reshape(-1).float().cpu()
    pooled = torch.cat([null, fresh])
    n, g = null.numel(), torch.Generator().manual_seed(seed)
    rates = torch.empty(draws, dtype=torch.float64)
    for d in range(draws):
        order = torch.randperm(pooled.numel(), generator=g)
        p = ConformalNull.of(pooled[order[:n]]).p_values(pooled[order[n:]])
        rates[d] = (p <= rate).double().mean()
    return {"mean": float(rates.mean()), "p5": float(torch.quantile(rates, 0.05)),
            "p95": float(torch.quantile(rates, 0.95)), "draws": draws}  # fmt: skip
