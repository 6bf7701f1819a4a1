"""How often issue 20's per-class check fails on normal traffic, by chance alone, and whether the
benchmark's fixed split is one such draw.

The check: every predicted class's alarm count at nominal ``rate`` has an exact (Clopper-
Pearson) 95% interval holding ``rate``. Three readings of how often it fails when the report
images and the null's are exchangeable:

- :func:`oracle_check`: each class alarms with probability exactly ``rate`` (a threshold at
  every class's true quantile, known without a null): the binomial draw alone;
- :func:`resplit_misses`: the same images halved at random again and again, one half the null
  (a :data:`NULL_RULES` rule: the library's per-class nulls, the pooled null, or a pooled null
  of per-class standardised scores), the other judged: the null's draw as well;
- :func:`halves_differ`: per class, the two-sample Kolmogorov-Smirnov p-value between the fixed
  split's null and report scores: a small one says that class's halves are not exchangeable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache

import numpy as np
import torch

from bench.alarms.class_rates import interval_holds
from surprise_monitor.monitor.conformal import (
    DEFAULT_CLASS_NULL_MIN,
    ClassConditionalNull,
    ConformalNull,
)

#: p-values of judged scores among a null: (null scores, null classes, scores, classes, K).
NullRule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], np.ndarray]
#: The quantiles a class's scores are centred on and scaled by in :func:`standardised_p_values`.
STANDARDISE_AT = (0.5, 0.95)


def per_class_p_values(
    null: torch.Tensor, null_classes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor,
    k: int,
) -> np.ndarray:  # fmt: skip
    """The monitor's p-values: each class's own null (the pooled one for a class with fewer
    than ``DEFAULT_CLASS_NULL_MIN``), interpolated."""
    per = ClassConditionalNull.of(null, null_classes, k, DEFAULT_CLASS_NULL_MIN)
    pooled = ConformalNull.of(per.scores).p_values(scores, interpolated=True)
    return per.p_values(scores, classes, pooled, interpolated=True).numpy()


def pooled_p_values(
    null: torch.Tensor, null_classes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor,
    k: int,
) -> np.ndarray:  # fmt: skip
    """One null for every class, interpolated."""
    return ConformalNull.of(torch.sort(null.float()).values).p_values(scores, True).numpy()


def standardised_p_values(
    null: torch.Tensor, null_classes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor,
    k: int,
) -> np.ndarray:  # fmt: skip
    """A pooled null of scores standardised per class, ``(s - q_lo(c)) / (q_hi(c) - q_lo(c))``
    with the quantiles :data:`STANDARDISE_AT` of class ``c``'s null (the pooled null's for a
    class with fewer than ``DEFAULT_CLASS_NULL_MIN``): each class's tail read off every class's,
    if their shapes agree."""
    lo_q, hi_q = STANDARDISE_AT
    pooled = torch.quantile(null.double(), torch.tensor([lo_q, hi_q], dtype=torch.float64))
    stats = pooled.repeat(k, 1)
    for c in range(k):
        mine = null[null_classes == c].double()
        if mine.numel() >= DEFAULT_CLASS_NULL_MIN:
            stats[c] = torch.quantile(mine, torch.tensor([lo_q, hi_q], dtype=torch.float64))
    scale = (stats[:, 1] - stats[:, 0]).clamp_min(1e-12)

    def z(s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Scores standardised by their classes' statistics."""
        return ((s.double() - stats[c, 0]) / scale[c]).float()

    reference = ConformalNull.of(torch.sort(z(null, null_classes)).values)
    return reference.p_values(z(scores, classes), interpolated=True).numpy()


#: The nulls :func:`resplit_misses` compares.
NULL_RULES: dict[str, NullRule] = {
    "per_class": per_class_p_values,
    "pooled": pooled_p_values,
    "standardised": standardised_p_values,
}


@cache
def _holds(inputs: int, rate: float) -> np.ndarray:
    """:func:`bench.alarms.class_rates.interval_holds`, kept per size."""
    return interval_holds(inputs, rate)


def interval_misses(p_values: np.ndarray, classes: np.ndarray, k: int, rate: float) -> int:
    """How many of the ``k`` classes' alarm counts (``p <= rate`` among the p-values of the
    inputs judged against them) have an exact 95% interval that leaves out ``rate``."""
    out = 0
    for c in range(k):
        mine = p_values[classes == c]
        if mine.size:
            out += int(not _holds(int(mine.size), rate)[int((mine <= rate).sum())])
    return out


def oracle_check(inputs: Sequence[int], rate: float) -> dict[str, float]:
    """For classes of ``inputs`` images each alarming with probability exactly ``rate``: the
    expected number of classes that miss, and the probability that none does."""
    from scipy.stats import binom

    passes = [float((binom.pmf(np.arange(n + 1), n, rate) * _holds(int(n), rate)).sum())
              for n in inputs]  # fmt: skip
    return {"expected_misses": float(sum(1.0 - p for p in passes)),
            "pass_probability": float(np.prod(passes))}  # fmt: skip


def resplit_misses(
    scores: torch.Tensor,
    classes: torch.Tensor,
    k: int,
    null_size: int,
    rule: NullRule,
    rate: float,
    splits: int = 200,
    seed: int = 0,
) -> np.ndarray:
    """``[splits]`` int: the classes missing (:func:`interval_misses`) when ``null_size`` of
    the images, drawn at random, are the null (``rule``) and the others are judged."""
    if not 0 < null_size < scores.numel():
        raise ValueError(f"null_size must lie in (0, {scores.numel()}), got {null_size}")
    rng = np.random.default_rng(seed)
    out = np.zeros(splits, np.int64)
    for i in range(splits):
        order = torch.from_numpy(rng.permutation(scores.numel()))
        null, judged = order[:null_size], order[null_size:]
        p = rule(scores[null], classes[null], scores[judged], classes[judged], k)
        out[i] = interval_misses(p, classes[judged].numpy(), k, rate)
    return out


def halves_differ(
    null: torch.Tensor, null_classes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor,
    k: int,
) -> list[float | None]:  # fmt: skip
    """Per class: the two-sample Kolmogorov-Smirnov p-value between its null scores and its
    judged ones (``None`` where either is empty)."""
    from scipy.stats import ks_2samp

    out: list[float | None] = []
    for c in range(k):
        a, b = null[null_classes == c].numpy(), scores[classes == c].numpy()
        out.append(float(ks_2samp(a, b).pvalue) if a.size and b.size else None)
    return out
