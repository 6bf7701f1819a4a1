"""The per-input atypicality score behind the alarm (higher = less like the training images).

An input's *percentile profile* is the rank of each of its values among the calibration images'
(mid-rank on ties), turned into a normal score ``z = Phi^-1(percentile / 100)`` (clipped to
``[0.05, 99.95]`` percent, ``|z| <= 3.29``). Two kinds of component summarise it:

- ``expectation_mass`` at the monitored (final) layer: ``mean_n max(0, -z_n)^2`` over the
  Grad-AMap alphas judged against the input's class, the paper's *expectation* made continuous:
  how far the filters sit below their usual range for that class, all filters counted.
- ``stage_energy`` at each activation-profile layer
(:mod:`surprise_monitor.monitor.probe.profiles`):
  ``mean_c z_c^2`` over the channel means, both tails: low-level statistics unlike the
  training images' (any class).
- ``head_distance`` at the head layer (the last feature map, whose channel means feed the
  classifier): the Mahalanobis distance ``min_k (f - m_k)^T P (f - m_k)`` of the channel means
  ``f`` from the nearest class mean ``m_k``, ``P`` the pseudo-inverse of the classes' shared
  covariance (Lee et al. 2018, as pytorch-ood's ``Mahalanobis``): high-level features unlike
  any class's.

The Fisher score (:data:`FISHER_SCORE_NAME`, the default until issue 20) combines the
components' tail probabilities among training images: ``score = -2 sum_j log r_j`` with
``r_j = (1 + #{reference_j >= component_j}) / (m_j + 1)`` (tables calibrated since stop 32 read
it with an exponential tail: :func:`exponential_tail_ranks`), the references being the
components of an evenly spaced subset of the training images. The references fix only the
weighting: the alarm's calibration comes from the conformal null of the score on held-out images
(:mod:`surprise_monitor.monitor.conformal`). How this score was chosen, and what it was compared
with, is in ``bench/alarms/PROTOCOL.md``.

The *gated* score (:data:`GATED_SCORE_NAME`; issue 20; calibrate's default where the reference
images suffice: ``surprise_monitor.calibrate.score_choice``)
adds these kinds of component:

- ``energy``: ``-logsumexp(logits)``, the class evidence of the logits (pytorch-ood's
  ``EnergyBased``);
- ``stage_distance`` at each profile layer and the head layer: the Mahalanobis distance of the
  layer's channel means from the training images' (class-agnostic, the covariance shrunk by
  :data:`STAGE_SHRINK`; :class:`StageDistance`): far shifts move the channel means *together*,
  which ``stage_energy``'s per-channel sum dilutes;
- ``knn_distance`` at the head layer (tables with a KNN bank, the default since stop 36):
  the distance of the unit head features to the 10th nearest of a bank of training images'
  (KNN's score, pytorch-ood's ``KNN``; :mod:`surprise_monitor.monitor.knn_distance`): features
  unlike the training images', without a class mean or a covariance;

and ranks first every input whose stage distances' Fisher combination lies beyond a share
:data:`GATE_LEVEL` of the reference training images' (far beyond anything seen in training:
``GATE_OFFSET +`` that statistic), every other input by the class evidence: Fisher's combination
of the tail ranks of :data:`EVIDENCE_VARIANTS` (energy, or energy and the expectation mass,
each with or without the nearest-neighbour distance; the learned variants add the rank of a
logistic regression over every component's tail ranks, fitted at calibration:
:mod:`surprise_monitor.monitor.learned_evidence`).
The stage distances carry nothing on near shifts (rotations, occlusion), where a soft combination
with them diluted the class evidence; the gate keeps them out of those and ranks the far shifts
first (``bench/README.md``, "Shift families and leave-one-out").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from surprise_monitor.monitor.learned_evidence import (
    LEARNED_EVIDENCE,
    LEARNED_VARIANTS,
    LEARNED_WITH_KNN,
    LEARNED_WITH_MASS,
    LEARNED_WITH_MASS_KNN,
    LearnedEvidence,
    rank_features,
)
from surprise_monitor.monitor.tails import (
    EXPONENTIAL_TAIL as EXPONENTIAL_TAIL,
)
from surprise_monitor.monitor.tails import STEP_TAIL as STEP_TAIL
from surprise_monitor.monitor.tails import TAIL_POINTS as TAIL_POINTS
from surprise_monitor.monitor.tails import TAILS as TAILS
from surprise_monitor.monitor.tails import exponential_tail_ranks as exponential_tail_ranks
from surprise_monitor.monitor.tails import tail_ranks as tail_ranks

#: Names of the scores defined here (recorded in tables, so a change of formula is refused); a
#: table without a score name is of the Fisher score.
FISHER_SCORE_NAME = "fisher-profile-v2"
#: The gated score (see the module docstring).
GATED_SCORE_NAME = "gated-stage-energy-v1"
#: Every score this library computes.
SCORES = (FISHER_SCORE_NAME, GATED_SCORE_NAME)
#: The gated score's class-evidence variants: their component kinds.
#: ``learned`` adds a logistic regression over every component's two-sided tail rank, fitted at
#: calibration (:mod:`surprise_monitor.monitor.learned_evidence`), to energy's rank;
#: ``learned+mass`` to energy's and the expectation mass's.
#: The ``+knn`` variants add the nearest-neighbour distance's rank (tables with a KNN bank:
#: :mod:`surprise_monitor.monitor.knn_distance`); ``learned+knn`` (since stop 39) is the
#: default's variant on such tables (``surprise_monitor.calibrate.evidence_choice.PREFERRED``).
EVIDENCE_VARIANTS: dict[str, tuple[str, ...]] = {
    "energy": ("energy",),
    "energy+mass": ("energy", "expectation_mass"),
    LEARNED_EVIDENCE: ("energy",),
    LEARNED_WITH_MASS: ("energy", "expectation_mass"),
    "energy+knn": ("energy", "knn_distance"),
    "energy+mass+knn": ("energy", "expectation_mass", "knn_distance"),
    LEARNED_WITH_KNN: ("energy", "knn_distance"),
    LEARNED_WITH_MASS_KNN: ("energy", "expectation_mass", "knn_distance"),
}
#: The variants that need the table's KNN bank.
KNN_VARIANTS = tuple(v for v, kinds in EVIDENCE_VARIANTS.items() if "knn_distance" in kinds)
DEFAULT_EVIDENCE = "energy"
#: Share of the reference images beyond which the gate opens.
GATE_LEVEL = 0.01
#: Added to a gated input's statistic: above every class-evidence score (whose Fisher
#: statistic is at most ``2 J log(m + 1)``).
GATE_OFFSET = 1.0e4
#: The stage distances' covariance shrinkage towards its mean eigenvalue.
STAGE_SHRINK = 0.01
#: Percent clip before the normal score: ranks of 0 or 100 (beyond the grid) become +-3.29.
CLIP_PCT = 0.05
#: The component at the monitored layer, and the name prefix of those at profile layers.
ALPHA_COMPONENT = "expectation_mass"
STAGE_COMPONENT = "stage_energy"
HEAD_COMPONENT = "head_distance"
ENERGY_COMPONENT = "energy"
STAGE_DISTANCE_COMPONENT = "stage_distance"
KNN_COMPONENT = "knn_distance"


def component_names(
    profile_layers: Sequence[str],
    head_layer: str | None = None,
    score: str = FISHER_SCORE_NAME,
    knn: bool = False,
) -> list[str]:
    """The components' names, in the order :func:`components` returns them (for the gated
    score then ``energy`` and a stage distance per profile layer and the head layer, and with
    ``knn`` (a table with a KNN bank) the head layer's nearest-neighbour distance)."""
    names = [ALPHA_COMPONENT] + [f"{STAGE_COMPONENT}:{layer}" for layer in profile_layers]
    names += [f"{HEAD_COMPONENT}:{head_layer}"] if head_layer else []
    if score == GATED_SCORE_NAME:
        tapped = [*profile_layers, *([head_layer] if head_layer else [])]
        names += [ENERGY_COMPONENT] + [f"{STAGE_DISTANCE_COMPONENT}:{x}" for x in tapped]
        names += [f"{KNN_COMPONENT}:{head_layer}"] if knn and head_layer else []
    return names


def energy(logits: torch.Tensor) -> torch.Tensor:
    """``-logsumexp(logits)`` of ``[B, K]`` logits: ``[B]`` float32 (high = little evidence)."""
    return torch.logsumexp(logits.float(), dim=1).neg()


def normal_scores(percentile: torch.Tensor) -> torch.Tensor:
    """``Phi^-1(clip(percentile, 0.05, 99.95) / 100)`` (float32)."""
    p = percentile.float().clamp(CLIP_PCT, 100.0 - CLIP_PCT) / 100.0
    return torch.special.ndtri(p)


def expectation_mass(percentile: torch.Tensor) -> torch.Tensor:
    """``mean_n max(0, -z_n)^2`` of a ``[B, N]`` percentile profile: ``[B]``."""
    return normal_scores(percentile).neg().clamp(min=0.0).square().mean(dim=1)


def stage_energy(percentile: torch.Tensor) -> torch.Tensor:
    """``mean_c z_c^2`` of a ``[B, C]`` percentile profile: ``[B]``."""
    return normal_scores(percentile).square().mean(dim=1)


@dataclass(frozen=True, eq=False)
class HeadDistance:
    """``min_k (f - m_k)^T P (f - m_k)`` for class means ``m_k`` and a symmetric precision
    ``P``, with the parts that depend only on them computed once (:meth:`of`), so a batch costs
    ``[B, C] x [C, C]`` and ``[B, C] x [C, K]`` products and no ``[B, K, C]`` intermediate. The
    form is expanded around the means' centre, which keeps float32's cancellation small."""

    centre: torch.Tensor  # [C] the class means' mean
    centred_means: torch.Tensor  # [K, C] class means minus the centre
    precision: torch.Tensor  # [C, C]
    means_quad: torch.Tensor  # [K] m_k^T P m_k of the centred means

    @classmethod
    def of(cls, class_means: torch.Tensor, precision: torch.Tensor) -> HeadDistance:
        """The distance to ``class_means [K, C]`` under ``precision [C, C]``."""
        centre = class_means.mean(dim=0)
        centred = class_means - centre
        quad = ((centred @ precision) * centred).sum(dim=1)
        return cls(centre, centred, precision, quad)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """The distance of ``features [B, C]`` to the nearest class mean: ``[B]`` float32."""
        f = features.float() - self.centre
        fp = f @ self.precision
        quad = (fp * f).sum(dim=1, keepdim=True) - 2.0 * fp @ self.centred_means.T
        quad = quad + self.means_quad[None, :]
        return quad.min(dim=1).values.clamp(min=0.0)


@dataclass(frozen=True, eq=False)
class StageDistance:
    """Per tapped layer, ``(f - mean)^T precision (f - mean)`` of its channel means ``f``: the
    class-agnostic Mahalanobis distance (one :class:`HeadDistance` with a single mean each)."""

    layers: tuple[HeadDistance, ...]

    @classmethod
    def of(cls, means: Sequence[torch.Tensor], precisions: Sequence[torch.Tensor]) -> StageDistance:
        """The distances to ``means`` (each ``[C]``) under ``precisions`` (each ``[C, C]``)."""
        return cls(
            tuple(HeadDistance.of(m[None, :], p) for m, p in zip(means, precisions, strict=True))
        )

    def __call__(self, channel_means: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[B, L]`` float32: each layer's distance of its ``[B, C]`` channel means."""
        return torch.stack([d(f) for d, f in zip(self.layers, channel_means, strict=True)], dim=1)


def fit_stage(
    channel_means: torch.Tensor, shrink: float = STAGE_SHRINK
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean ``[C]`` and the precision ``[C, C]`` (pseudo-inverse of the covariance shrunk as
    ``(1 - s) S + s tr(S) / C I``) of ``[n, C]`` channel means, in float64; float32 results."""
    f = channel_means.detach().double().cpu()
    if f.ndim != 2 or f.shape[0] < 2 or not bool(torch.isfinite(f).all()):
        raise ValueError(f"need finite [n >= 2, C] channel means, got {list(f.shape)}")
    mean = f.mean(dim=0)
    centred = f - mean
    cov = centred.T @ centred / (f.shape[0] - 1)
    c = cov.shape[0]
    cov = (1.0 - shrink) * cov + shrink * torch.trace(cov) / c * torch.eye(c, dtype=cov.dtype)
    precision = torch.linalg.pinv(cov, hermitian=True)
    return mean.float().contiguous(), precision.float().contiguous()


@dataclass(frozen=True)
class Gate:
    """The gated score's columns and level: ``gate`` (the stage distances) and ``evidence``
    (the class evidence) index the component columns; ``threshold`` is the Fisher statistic
    of the gate's ranks beyond which an input counts as far (the ``1 - GATE_LEVEL`` quantile of
    the reference images'); ``learned`` the fitted evidence of the ``learned`` variant, whose
    rank joins the evidence columns' (``None`` for the other variants)."""

    gate: tuple[int, ...]
    evidence: tuple[int, ...]
    threshold: float
    learned: LearnedEvidence | None = None

    @classmethod
    def columns(
        cls,
        names: Sequence[str],
        variant: str,
        threshold: float = float("inf"),
        learned: LearnedEvidence | None = None,
    ) -> Gate:
        """The gate over the ``stage_distance`` columns of ``names`` and the class evidence of
        ``variant`` (a key of :data:`EVIDENCE_VARIANTS`; ``learned`` needs its fit)."""
        if variant not in EVIDENCE_VARIANTS:
            raise ValueError(
                f"evidence variant must be one of {sorted(EVIDENCE_VARIANTS)}, got {variant!r}"
            )
        if (variant in LEARNED_VARIANTS) != (learned is not None):
            raise ValueError(
                f"the evidence variants {list(LEARNED_VARIANTS)}, and they alone, need a fitted "
                "LearnedEvidence"
            )
        if learned is not None and learned.components != len(names):
            raise ValueError(
                f"the learned evidence was fitted on {learned.components} components, the "
                f"score has {len(names)}"
            )
        kinds = [n.split(":", 1)[0] for n in names]
        if variant in KNN_VARIANTS and KNN_COMPONENT not in kinds:
            raise ValueError(
                f"evidence variant {variant!r} needs the {KNN_COMPONENT} component: a table "
                "calibrated with a KNN bank (knn_bank > 0, a head layer)"
            )
        gate = tuple(j for j, k in enumerate(kinds) if k == STAGE_DISTANCE_COMPONENT)
        evidence = tuple(j for j, k in enumerate(kinds) if k in EVIDENCE_VARIANTS[variant])
        if not gate or len(evidence) != len(EVIDENCE_VARIANTS[variant]):
            raise ValueError(f"components {list(names)} lack the gated score's columns")
        return cls(gate, evidence, float(threshold), learned)

    def to(self, device: torch.device | str) -> Gate:
        """The same gate with the learned evidence's tensors on ``device``."""
        if self.learned is None:
            return self
        return replace(self, learned=self.learned.to(device))

    def statistic(self, ranks: torch.Tensor) -> torch.Tensor:
        """Fisher's statistic of the gate's ranks: ``[B]``."""
        return fisher(_columns(ranks, self.gate))

    def at_level(self, reference_ranks: torch.Tensor, level: float = GATE_LEVEL) -> Gate:
        """The same gate with its threshold at the ``1 - level`` quantile of the reference
        images' own statistics (``reference_ranks [m, J]``: their ranks among themselves)."""
        if not 0.0 < level < 1.0:
            raise ValueError(f"the gate level must lie in (0, 1), got {level}")
        stat = self.statistic(reference_ranks).double()
        return replace(self, threshold=float(torch.quantile(stat, 1.0 - level)))

    def evidence_statistic(self, ranks: torch.Tensor) -> torch.Tensor:
        """Fisher's statistic of the class evidence's ranks, the learned rank (with that
        variant) weighted by its ``rank_weight``: ``[B]``."""
        evidence = fisher(_columns(ranks, self.evidence))
        if self.learned is None:
            return evidence
        learned = fisher(self.learned.tail_ranks(ranks)[:, None])
        return evidence + self.learned.rank_weight * learned

    def score(self, ranks: torch.Tensor) -> torch.Tensor:
        """``GATE_OFFSET + statistic`` where the gate opens, else the class evidence's
        statistic (:meth:`evidence_statistic`): ``[B]``."""
        stat = self.statistic(ranks)
        evidence = self.evidence_statistic(ranks)
        return torch.where(stat >= self.threshold, stat + GATE_OFFSET, evidence)


def _columns(values: torch.Tensor, columns: Sequence[int]) -> torch.Tensor:
    """``values[:, columns]`` by basic indexing only (no index tensor made from a list: safe
    inside a CUDA graph's capture)."""
    return torch.stack([values[:, j] for j in columns], dim=1)


def head_distance(
    features: torch.Tensor, class_means: torch.Tensor, precision: torch.Tensor
) -> torch.Tensor:
    """``min_k (f - m_k)^T P (f - m_k)`` of ``features [B, C]`` against ``class_means [K, C]``
    with ``precision [C, C]`` (symmetric): ``[B]`` float32 (see :class:`HeadDistance`)."""
    return HeadDistance.of(class_means, precision)(features)


def components(
    alpha_percentile: torch.Tensor,
    stage_percentiles: list[torch.Tensor],
    head_distances: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, 1 + L (+ 1)]``: the expectation mass of the alpha profile, then each profile
    layer's stage energy, then the head distance when there is one."""
    parts = [expectation_mass(alpha_percentile)] + [stage_energy(p) for p in stage_percentiles]
    if head_distances is not None:
        parts.append(head_distances.float())
    return torch.stack(parts, dim=1)


@dataclass(frozen=True, eq=False)
class ScoreReference:
    """The components of training images (each ``[m_j]`` float32, sorted ascending), one per
    component in :func:`component_names` order, that weight the components in the score, and
    how a value's tail rank is read from them (``tail``, one of :data:`TAILS`)."""

    sorted_components: tuple[torch.Tensor, ...]
    tail: str = STEP_TAIL

    def __post_init__(self) -> None:
        if self.tail not in TAILS:
            raise ValueError(f"the reference's tail must be one of {list(TAILS)}: {self.tail!r}")
        for j, ref in enumerate(self.sorted_components):
            if ref.ndim != 1 or ref.numel() == 0:
                raise ValueError(f"score reference {j} must be a non-empty 1-D tensor")
            if not bool(torch.isfinite(ref).all()) or bool((ref[1:] < ref[:-1]).any()):
                raise ValueError(f"score reference {j} must be finite and sorted ascending")

    @classmethod
    def of(cls, component_rows: torch.Tensor, tail: str = STEP_TAIL) -> ScoreReference:
        """The reference of the components ``[m, 1 + L]`` of training images."""
        cols = component_rows.detach().float().cpu()
        sorted_cols = (torch.sort(cols[:, j]).values.contiguous() for j in range(cols.shape[1]))
        return cls(tuple(sorted_cols), tail)

    def to(self, device: torch.device | str) -> ScoreReference:
        """The same reference on ``device``."""
        return ScoreReference(tuple(r.to(device) for r in self.sorted_components), self.tail)

    @property
    def rank_floor(self) -> float:
        """``1 / (m + 1)`` of its smallest component reference (``m`` values): the smallest
        step tail rank (the learned evidence's features are clipped to it)."""
        return 1.0 / (min(r.numel() for r in self.sorted_components) + 1)

    def ranks(self, component_values: torch.Tensor) -> torch.Tensor:
        """Each component's tail rank ``r_j`` among the reference's (``[B, J]`` float32): small
        when the input is more atypical in that component than most training images."""
        if component_values.shape[1] != len(self.sorted_components):
            raise ValueError(
                f"{component_values.shape[1]} components for a reference of "
                f"{len(self.sorted_components)}"
            )
        rank = exponential_tail_ranks if self.tail == EXPONENTIAL_TAIL else tail_ranks
        cols = [rank(ref, component_values[:, j]) for j, ref in enumerate(self.sorted_components)]
        return torch.stack(cols, dim=1)

    def score(self, component_values: torch.Tensor) -> torch.Tensor:
        """Fisher's combination ``-2 sum_j log r_j`` of ``[B, J]`` components: ``[B]``."""
        return fisher(self.ranks(component_values))


def fisher(ranks: torch.Tensor) -> torch.Tensor:
    """``-2 sum_j log r_j`` of ``[B, J]`` tail ranks: ``[B]``."""
    return -2.0 * torch.log(ranks).sum(dim=1)


#: What each kind of atypicality tells an operator (:func:`alarm_kind`), by the score's
#: component families: the final layer's expectation mass (the class's usual filters missing:
#: low class evidence), the early stages' energies (low-level statistics: the camera, lighting,
#: a corruption or the preprocessing changed), the head distance (high-level features unlike
#: any class: an object the model does not know).
ALARM_KINDS: dict[str, str] = {
    "class_evidence": "low class evidence: the logits are low for every class, or the filters "
    "the class usually fires are missing at the final layer",
    "low_level": "low-level statistics unlike the training images: the camera, lighting, "
    "a corruption or the preprocessing changed",
    "features": "high-level features unlike any class: an object or scene the model does not know",
}
_FAMILY_OF_COMPONENT = {
    ALPHA_COMPONENT: "class_evidence", STAGE_COMPONENT: "low_level", HEAD_COMPONENT: "features",
    ENERGY_COMPONENT: "class_evidence", STAGE_DISTANCE_COMPONENT: "low_level",
    KNN_COMPONENT: "features",
}  # fmt: skip


def component_family(name: str) -> str:
    """The kind of atypicality (a key of :data:`ALARM_KINDS`) a component of the score measures
    (``"stage_energy:layer1"`` -> ``"low_level"``); ``"other"`` for an unknown name."""
    return _FAMILY_OF_COMPONENT.get(name.split(":", 1)[0], "other")


def alarm_kind(
    names: Sequence[str],
    tail_ranks: Sequence[float],
    score: float | None = None,
    learned: LearnedEvidence | None = None,
    evidence: str = DEFAULT_EVIDENCE,
) -> str | None:
    """The kind of atypicality behind one input's score. Of the gated score (``names`` with
    ``energy``; ``score`` given): where the gate opened (``score >= GATE_OFFSET``) the stage
    distance with the smallest tail rank names it (``features`` at the head layer, else
    ``low_level``), else the class evidence's column with the smallest tail rank
    (:func:`evidence_kind`: ``class_evidence``, or ``features`` for the ``+knn`` variants'
    nearest-neighbour distance); with a
    ``learned`` evidence whose term outweighs every Fisher term of the variant ``evidence``
    (a key of :data:`EVIDENCE_VARIANTS`), the family of the component whose feature adds most
    to its decision (:func:`learned_kind`). Otherwise the
    component family whose smallest tail rank, times the family's size (Bonferroni within the
    family, so a family of several components is not favoured), is the smallest; ties go to the
    family listed first. ``None`` when no rank is finite."""
    if score is not None and ENERGY_COMPONENT in names and score == score:
        if score >= GATE_OFFSET:
            return _opened_kind(names, tail_ranks)
        kinds = EVIDENCE_VARIANTS.get(evidence, (ENERGY_COMPONENT,))
        if learned is None:
            return evidence_kind(names, tail_ranks, kinds)
        return learned_kind(names, tail_ranks, learned, kinds)
    best: dict[str, float] = {}
    size: dict[str, int] = {}
    for name, rank in zip(names, tail_ranks, strict=True):
        family = component_family(name)
        size[family] = size.get(family, 0) + 1
        if rank == rank:  # not NaN
            best[family] = min(best.get(family, float("inf")), float(rank))
    if not best:
        return None
    return min(best, key=lambda f: best[f] * size[f])


def _opened_kind(names: Sequence[str], tail_ranks: Sequence[float]) -> str:
    """:func:`alarm_kind` of the gated score where the gate opened: the furthest stage
    distance's (the head layer's: ``features``, else ``low_level``)."""
    head = {n.split(":", 1)[1] for n in names if n.startswith(HEAD_COMPONENT + ":")}
    distances = [
        (float(r), n.split(":", 1)[1])
        for n, r in zip(names, tail_ranks, strict=True)
        if n.startswith(STAGE_DISTANCE_COMPONENT + ":") and r == r
    ]
    if not distances:
        return "low_level"
    return "features" if min(distances)[1] in head else "low_level"


def evidence_kind(
    names: Sequence[str], tail_ranks: Sequence[float], evidence: Sequence[str] = (ENERGY_COMPONENT,)
) -> str:
    """The kind behind a class evidence of fixed columns (the component kinds ``evidence``):
    the family of the column with the smallest tail rank (ties: the first listed), so a
    ``+knn`` variant's input ranked by its nearest-neighbour distance is ``features``;
    ``class_evidence`` without such a column or with a NaN rank among them."""
    found = [(float(r), j) for j, (n, r) in enumerate(zip(names, tail_ranks, strict=True))
             if n.split(":", 1)[0] in evidence]  # fmt: skip
    if not found or any(r != r for r, _ in found):
        return "class_evidence"
    family = component_family(names[min(found)[1]])
    return "class_evidence" if family == "other" else family


def learned_kind(
    names: Sequence[str],
    tail_ranks: Sequence[float],
    learned: LearnedEvidence,
    evidence: Sequence[str] = (ENERGY_COMPONENT,),
) -> str:
    """The kind behind a class evidence with a learned part (the gate shut): the fixed
    columns' kind (:func:`evidence_kind`) where the largest Fisher term of the ``evidence``
    columns (component kinds: energy's, and the expectation mass's for ``learned+mass``) is
    at least the learned rank's (the smallest such rank at most the learned rank to the power
    of its weight: the fixed evidence ranked the input), else the family
    (:func:`component_family`) of the component whose feature adds most to the learned
    decision (``weight * feature``, either tail); a component of no known family, no evidence
    column, or a NaN rank gives ``class_evidence``."""
    ranks = torch.tensor([list(tail_ranks)], dtype=torch.float32)
    columns = [j for j, n in enumerate(names) if n.split(":", 1)[0] in evidence]
    if not bool(torch.isfinite(ranks).all()) or not columns:
        return "class_evidence"
    learned = learned.to("cpu")
    evidence_rank = min(float(ranks[0, j]) for j in columns)
    if evidence_rank <= float(learned.tail_ranks(ranks)[0]) ** learned.rank_weight:
        return evidence_kind(names, tail_ranks, evidence)
    contribution = rank_features(ranks, learned.floor)[0] * learned.weights.float()
    j = int(torch.argmax(contribution)) % len(names)
    family = component_family(names[j])
    return "class_evidence" if family == "other" else family
