"""The gated score's *learned* class evidence (issue 20): a logistic regression over every
component's two-sided tail rank, fitted at calibration to tell the user's held-out images from
synthetic shifts of them (``surprise_monitor.calibrate.evidence_fit``).

An input's features are, per component ``j`` with upper tail rank ``r_j`` among ``m`` reference
images (:class:`~surprise_monitor.monitor.atypicality.ScoreReference`), ``-log r_j`` and
``-log (1 - r_j + 1/(m + 1))`` (the lower tail: both directions, so a component whose atypical
direction reverses on some model still counts), each clipped to the step ranks' range
``[1/(m + 1), 1]``: ``2 J`` features between 0 and ``log(m + 1)``, bounded so that no weight,
of either sign, lets one extreme component decide alone. The regression's decision value
``w . x + b`` is ranked among the decision values of the held-out images it was fitted on
(an exponential tail above the highest, as the components'), and that rank joins energy's in
the gated score's class evidence with a weight ``rank_weight`` in Fisher's sum
(:data:`RANK_WEIGHT`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surprise_monitor.monitor.tails import exponential_tail_ranks

#: The evidence variants' names (``AlarmOptions(evidence=LEARNED_EVIDENCE)``): Fisher-combined
#: with energy's rank, or with energy's and the expectation mass's; the ``+knn`` ones with the
#: nearest-neighbour distance's rank too (since stop 39; tables with a KNN bank).
LEARNED_EVIDENCE = "learned"
LEARNED_WITH_MASS = "learned+mass"
LEARNED_WITH_KNN = "learned+knn"
LEARNED_WITH_MASS_KNN = "learned+mass+knn"
LEARNED_VARIANTS = (LEARNED_EVIDENCE, LEARNED_WITH_MASS, LEARNED_WITH_KNN, LEARNED_WITH_MASS_KNN)
#: The learned rank's weight in the evidence's Fisher sum (``-2 w log r``): half, so that on a
#: kind of shift the fit never saw it dilutes energy's rank less (chosen by leave-one-model-out
#: among 0.25, 0.5 and 1 on the benchmark's selection part: ``bench/alarms/PROTOCOL.md``,
#: "Stop 34").
RANK_WEIGHT = 0.5


def rank_features(ranks: torch.Tensor, floor: float) -> torch.Tensor:
    """``[B, 2J]`` float32 features of ``[B, J]`` upper tail ranks: ``-log r`` then
    ``-log(1 - r + floor)``, each rank clipped to ``[floor, 1]`` (``floor = 1/(m + 1)``)."""
    upper = ranks.float().clamp(floor, 1.0)
    lower = (1.0 - upper + floor).clamp(floor, 1.0)
    return torch.cat([upper.log().neg(), lower.log().neg()], dim=1)


@dataclass(frozen=True, eq=False)
class LearnedEvidence:
    """A fitted logistic regression over :func:`rank_features` and the sorted decision values
    of the held-out images it was fitted on.

    Attributes:
        weights: ``[2J]`` float32 coefficients (upper tails first, then lower tails).
        bias: the intercept.
        floor: ``1 / (m + 1)`` of the components' reference (``m`` images).
        reference: ``[n]`` float32 decision values of the clean held-out images, ascending.
        rank_weight: the learned rank's weight in the evidence's Fisher sum.
    """

    weights: torch.Tensor
    bias: float
    floor: float
    reference: torch.Tensor
    rank_weight: float = RANK_WEIGHT

    def __post_init__(self) -> None:
        if self.weights.ndim != 1 or self.weights.numel() % 2 or self.weights.numel() == 0:
            raise ValueError(
                f"the learned evidence's weights must be [2J], got {list(self.weights.shape)}"
            )
        if self.reference.ndim != 1 or self.reference.numel() < 2:
            raise ValueError("the learned evidence's reference must hold at least 2 values")
        finite = bool(torch.isfinite(self.weights).all()) and bool(
            torch.isfinite(self.reference).all()
        )
        if not finite or self.bias != self.bias or abs(self.bias) == float("inf"):
            raise ValueError("the learned evidence's weights, bias and reference must be finite")
        if bool((self.reference[1:] < self.reference[:-1]).any()):
            raise ValueError("the learned evidence's reference must be sorted ascending")
        if not 0.0 < self.floor < 1.0:
            raise ValueError(f"the learned evidence's floor must lie in (0, 1), got {self.floor}")
        if not 0.0 < self.rank_weight <= 1.0:
            raise ValueError(
                f"the learned evidence's rank weight must lie in (0, 1], got {self.rank_weight}"
            )

    @property
    def components(self) -> int:
        """How many components (``J``) its features come from."""
        return self.weights.numel() // 2

    def to(self, device: torch.device | str) -> LearnedEvidence:
        """The same evidence with its tensors on ``device``."""
        return LearnedEvidence(
            self.weights.to(device), self.bias, self.floor, self.reference.to(device),
            self.rank_weight,
        )  # fmt: skip

    def decision(self, ranks: torch.Tensor) -> torch.Tensor:
        """``w . x + b`` of ``[B, J]`` tail ranks: ``[B]`` (high = like the shifts)."""
        features = rank_features(ranks, self.floor)
        return features @ self.weights.to(features.device).float() + self.bias

    def tail_ranks(self, ranks: torch.Tensor) -> torch.Tensor:
        """The decision values' tail ranks among the reference's: ``[B]`` (small = atypical)."""
        return exponential_tail_ranks(self.reference, self.decision(ranks))
