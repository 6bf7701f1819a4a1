"""Candidate alarm scores built from per-input *component p-values* (issue 20, item 2).

Protocol. Every candidate score is a combination of component p-values: each component's tail
probability among training reference images (small = atypical), taken in the component's
atypical direction:

- the library's components (:mod:`surprise_monitor.monitor.atypicality`: ``expectation_mass``,
  ``stage_energy:<layer>`` per profile layer, ``head_distance:<layer>``), whose reference is
  the ``[m, J]`` components of the training reference images (the table's score reference);
- logit-space components computed from the training images' logits: ``energy`` =
  ``-logsumexp(logits)`` and ``max_logit`` = ``-max logit`` (pytorch-ood's ``EnergyBased`` and
  ``MaxLogit`` conventions: high = atypical);
- ``beta``, the paper's class evidence, whose p-value is its percentile among the class's
  training images, ``beta_percentile / 100`` clipped to ``[1/(m+1), 1]`` (lower tail: little
  class evidence is atypical);
- ``stage_mahalanobis:<layer>`` (:mod:`bench.alarms.stage_stats`, when the references carry
  them): each profile layer's (and the head layer's) channel means' Mahalanobis distance from
  the training images', against the distances of reference training images.

A *gated* candidate (:attr:`Candidate.gate`) ranks first every input whose gate components'
Fisher combination lies beyond a share :attr:`Candidate.gate_level` of the reference training
images' (far beyond anything the training images show; ordered among themselves by how far),
and every other input by its combiner over its kinds: a strong far-shift component cannot
dilute the class-evidence score on the near shifts, where it carries nothing, yet still ranks
the far shifts first.

Each component has a default direction (:data:`DIRECTIONS`: upper, lower or two-sided) that a
candidate may override: the head distance was measured running the wrong way on one model
(issue 20), so the candidates take it two-sided, where either tail counts as atypical.

A candidate (:data:`CANDIDATES`) is a declared subset of component *kinds* (the name before
``":"``, so ``stage_energy`` means every profile layer of whatever model is judged: no model- or
set-specific constant enters), its sidedness overrides and a combiner of the ``[B, J]`` p-value
matrix (higher = more atypical): :func:`fisher`, :func:`cauchy`, :func:`min_p` and
:func:`two_level` (Bonferroni over component families). The last three do not dilute one strong
component among uninformative ones, which Fisher's sum does. Which candidate becomes the default
is decided by :mod:`bench.alarms.loo` (leave one model, or one shift family, out).

The references fix only each component's scale; a chosen score's alarm is calibrated by the
conformal null on held-out images, as the library's score is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.special import logsumexp
from scipy.stats import chi2

from surprise_monitor.monitor.atypicality import (
    ALPHA_COMPONENT,
    FISHER_SCORE_NAME,
    HEAD_COMPONENT,
    STAGE_COMPONENT,
)

UPPER, LOWER, TWO_SIDED = "upper", "lower", "two-sided"
SIDES = (UPPER, LOWER, TWO_SIDED)
#: The logit-space components and the paper's beta (kinds without a ``":layer"`` suffix).
ENERGY, MAX_LOGIT, BETA = "energy", "max_logit", "beta"
#: The far-shift distances of :mod:`bench.alarms.stage_stats`.
STAGE_MAHALANOBIS = "stage_mahalanobis"
#: Added to a gated input's score so that it ranks above every input the gate let through.
GATE_OFFSET = 1e6
#: Each component kind's atypical direction unless a candidate overrides it.
DIRECTIONS: dict[str, str] = {
    ALPHA_COMPONENT: UPPER,
    STAGE_COMPONENT: UPPER,
    HEAD_COMPONENT: UPPER,
    ENERGY: UPPER,
    MAX_LOGIT: UPPER,
    BETA: LOWER,
    STAGE_MAHALANOBIS: UPPER,
}
#: The component families of :func:`two_level` (the names of ``atypicality.ALARM_KINDS``).
FAMILIES: dict[str, str] = {
    ENERGY: "class_evidence",
    MAX_LOGIT: "class_evidence",
    BETA: "class_evidence",
    ALPHA_COMPONENT: "class_evidence",
    STAGE_COMPONENT: "low_level",
    HEAD_COMPONENT: "features",
    STAGE_MAHALANOBIS: "low_level",
}
#: How far :func:`cauchy` keeps p-values from 0 and 1 (where ``tan`` is infinite).
CAUCHY_EPS = 1e-15


def kind_of(name: str) -> str:
    """A component's kind: its name before ``":"`` (``"stage_energy:layer1"`` ->
    ``"stage_energy"``)."""
    return name.split(":", 1)[0]


# --- tail probabilities -------------------------------------------------------------------


def _finite(name: str, values: np.ndarray) -> np.ndarray:
    """``values`` as float64, refused when empty (reference) or not finite."""
    a = np.asarray(values, np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has NaN or Inf values")
    return a


def _reference(reference: np.ndarray) -> np.ndarray:
    """A 1-D, non-empty, finite reference, sorted ascending."""
    ref = _finite("reference", reference).reshape(-1)
    if ref.size == 0:
        raise ValueError("the reference is empty")
    return np.sort(ref)


def upper_tail(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``(1 + #{reference >= v}) / (m + 1)`` per value: small when ``v`` is higher than most of
    the ``m`` reference values (the library's ``tail_ranks``, in float64)."""
    ref, v = _reference(reference), _finite("values", values)
    at_least = ref.size - np.searchsorted(ref, v, side="left")
    return (1.0 + at_least) / (ref.size + 1.0)


def lower_tail(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``(1 + #{reference <= v}) / (m + 1)`` per value: small when ``v`` is lower than most of
    the ``m`` reference values."""
    ref, v = _reference(reference), _finite("values", values)
    at_most = np.searchsorted(ref, v, side="right")
    return (1.0 + at_most) / (ref.size + 1.0)


def two_sided(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``min(1, 2 min(upper, lower))``: small when ``v`` lies in either tail of the reference."""
    return np.minimum(
        1.0, 2.0 * np.minimum(upper_tail(reference, values), lower_tail(reference, values))
    )


TAILS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    UPPER: upper_tail,
    LOWER: lower_tail,
    TWO_SIDED: two_sided,
}


def beta_p_value(beta_percentile: np.ndarray, m: int, direction: str = LOWER) -> np.ndarray:
    """beta's p-value from its percentile (0..100) among the class's ``m`` training images:
    ``pct / 100`` (lower tail: little class evidence), ``1 - pct / 100`` (upper) or
    ``min(1, 2 min(lower, upper))`` (two-sided), each clipped to ``[1/(m+1), 1]``."""
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    if direction not in SIDES:
        raise ValueError(f"direction must be one of {SIDES}, got {direction!r}")
    q = _finite("beta_percentile", beta_percentile) / 100.0
    floor = 1.0 / (m + 1.0)
    low, high = np.clip(q, floor, 1.0), np.clip(1.0 - q, floor, 1.0)
    if direction == LOWER:
        return low
    if direction == UPPER:
        return high
    return np.minimum(1.0, 2.0 * np.minimum(low, high))


def energy(logits: np.ndarray) -> np.ndarray:
    """``-logsumexp(logits)`` per row of ``[B, K]`` logits (pytorch-ood's ``EnergyBased`` with
    ``t = 1``; high = atypical)."""
    return -logsumexp(_finite("logits", logits), axis=1)


def max_logit(logits: np.ndarray) -> np.ndarray:
    """``-max_k logits`` per row of ``[B, K]`` logits (pytorch-ood's ``MaxLogit``; high =
    atypical)."""
    return -_finite("logits", logits).max(axis=1)


LOGIT_COMPONENTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    ENERGY: energy,
    MAX_LOGIT: max_logit,
}


@dataclass(frozen=True)
class References:
    """Per component, the sorted values of the training reference images.

    ``sorted_values`` maps every component name (the library's, in its column order, then
    ``energy`` and ``max_logit``, then the stage distances) to its sorted reference;
    ``library`` lists the library's names in the column order of a judged set's
    ``components``; ``beta_images`` is the ``m`` of beta's clip ``1/(m+1)``; ``stage`` lists
    the stage distances' names in the column order of a judged set's ``stage_mahalanobis``,
    and ``rows`` their reference values per image (unsorted, one row per reference image: a
    gate's level is a share of those images).
    """

    sorted_values: Mapping[str, np.ndarray]
    library: tuple[str, ...]
    beta_images: int
    stage: tuple[str, ...] = ()
    rows: Mapping[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        components: np.ndarray,
        names: Sequence[str],
        train_logits: np.ndarray,
        beta_images: int | None = None,
        stage_rows: np.ndarray | None = None,
        stage_names: Sequence[str] = (),
    ) -> References:
        """The references from the training images' library components ``[m, J]`` (columns
        named ``names``) and their logits ``[n, K]``; ``beta_images`` defaults to ``m``;
        ``stage_rows [m', L]``: the reference images' stage distances (columns named
        ``stage_names``), when the candidates use them."""
        comps = _finite("components", components)
        if comps.ndim != 2 or comps.shape[1] != len(names) or comps.shape[0] == 0:
            raise ValueError(f"components {comps.shape} do not match the {len(names)} names")
        if len(set(names)) != len(names) or set(names) & set(LOGIT_COMPONENTS) or BETA in names:
            raise ValueError(f"component names must be unique library names, got {list(names)}")
        values = {name: np.sort(comps[:, j]) for j, name in enumerate(names)}
        for name, fn in LOGIT_COMPONENTS.items():
            values[name] = np.sort(fn(train_logits))
        m = comps.shape[0] if beta_images is None else int(beta_images)
        rows: dict[str, np.ndarray] = {}
        if stage_rows is not None:
            st = _finite("stage_rows", stage_rows)
            if st.ndim != 2 or st.shape[1] != len(stage_names) or st.shape[0] == 0:
                raise ValueError(f"stage rows {st.shape} do not match {len(stage_names)} names")
            if any(kind_of(n) != STAGE_MAHALANOBIS for n in stage_names):
                raise ValueError(f"stage names must be {STAGE_MAHALANOBIS}:<layer>")
            rows = {n: st[:, j].copy() for j, n in enumerate(stage_names)}
            values.update({n: np.sort(r) for n, r in rows.items()})
        return cls(values, tuple(names), m, tuple(rows), rows)

    def names(self) -> list[str]:
        """Every component with a p-value: the library's, ``energy``, ``max_logit``, ``beta``,
        then the stage distances (when there are any)."""
        return [*self.library, *LOGIT_COMPONENTS, BETA, *self.stage]

    def values(self, judged: Mapping[str, np.ndarray], name: str) -> np.ndarray:
        """Component ``name`` of every input of a judged set (``[B]``; not for ``beta``)."""
        if name in LOGIT_COMPONENTS:
            return LOGIT_COMPONENTS[name](judged["logits"])
        if name in self.stage:
            found = np.asarray(judged[STAGE_MAHALANOBIS])
            if found.ndim != 2 or found.shape[1] != len(self.stage):
                raise ValueError(f"stage distances {found.shape} for {len(self.stage)} layers")
            return found[:, self.stage.index(name)]
        if name not in self.library:
            raise KeyError(f"unknown component {name!r}; known: {self.names()}")
        comps = np.asarray(judged["components"])
        if comps.ndim != 2 or comps.shape[1] != len(self.library):
            raise ValueError(f"components {comps.shape} for a reference of {len(self.library)}")
        return comps[:, self.library.index(name)]

    def gate_threshold(self, names: Sequence[str], level: float) -> float:
        """The ``level`` quantile of the reference images' own Fisher log p-value
        (:func:`fisher_log_p`) over the components ``names`` (upper tails, each reference
        image ranked among all of them): an input at or below it lies beyond that share of the
        reference images."""
        if not 0.0 < level < 1.0:
            raise ValueError(f"the gate level must lie in (0, 1), got {level}")
        missing = [n for n in names if n not in self.rows]
        if missing or not names:
            raise ValueError(f"no reference rows for gate components {missing or names}")
        p = [upper_tail(self.sorted_values[n], self.rows[n]) for n in names]
        return float(np.quantile(fisher_log_p(np.stack(p, axis=1)), level))

    def p_value(self, judged: Mapping[str, np.ndarray], name: str, direction: str) -> np.ndarray:
        """Component ``name``'s p-value ``[B]`` for every input of ``judged``, in ``direction``."""
        if direction not in SIDES:
            raise ValueError(f"direction must be one of {SIDES}, got {direction!r}")
        if name == BETA:
            return beta_p_value(judged["beta_percentile"], self.beta_images, direction)
        return TAILS[direction](self.sorted_values[name], self.values(judged, name))


# --- combiners (higher = more atypical) ---------------------------------------------------


def _p_matrix(p: np.ndarray) -> np.ndarray:
    """A ``[B, J]`` float64 matrix of p-values in ``(0, 1]``."""
    a = _finite("p-values", p)
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"p-values must be [B, J] with J >= 1, got {a.shape}")
    if (a <= 0.0).any() or (a > 1.0).any():
        raise ValueError("p-values must lie in (0, 1]")
    return a


def fisher(p: np.ndarray) -> np.ndarray:
    """Fisher's ``-2 sum_j log p_j`` of ``[B, J]`` p-values: ``[B]`` (dense: every component
    adds, so a strong one is diluted by uninformative ones)."""
    return -2.0 * np.log(_p_matrix(p)).sum(axis=1)


def fisher_log_p(p: np.ndarray) -> np.ndarray:
    """The log of Fisher's combined p-value of ``[B, J]`` p-values (the chi-square with ``2 J``
    degrees of freedom's log survival function at :func:`fisher`): ``[B]``, decreasing in
    Fisher's statistic, so it ranks as Fisher does and does not underflow."""
    a = _p_matrix(p)
    return chi2.logsf(fisher(a), 2 * a.shape[1])


def gated(gate_log_p: np.ndarray, threshold: float, rest: np.ndarray) -> np.ndarray:
    """``GATE_OFFSET - gate_log_p`` where ``gate_log_p <= threshold`` (beyond the gate: first,
    ordered by how far), else ``rest`` (the candidate's combiner; must stay below the
    offset): ``[B]``."""
    g, r = np.asarray(gate_log_p, np.float64), np.asarray(rest, np.float64)
    if g.shape != r.shape:
        raise ValueError(f"gate {g.shape} and rest {r.shape} differ in shape")
    if (r >= GATE_OFFSET).any():
        raise ValueError("a combined score reaches the gate's offset")
    return np.where(g <= threshold, GATE_OFFSET - g, r)


def cauchy(p: np.ndarray) -> np.ndarray:
    """The Cauchy combination test's statistic (Liu & Xie 2020, equal weights):
    ``T = mean_j tan((0.5 - p_j) pi)``, ``p_j`` clipped to ``[eps, 1 - eps]``
    (:data:`CAUCHY_EPS`); computed as ``cot(pi p_j)``, the same value without the loss of
    precision at small ``p``. Its combined p-value :func:`cauchy_p_value` is decreasing in
    ``T``, so ``T`` ranks as the p-value does; heavy-tailed, a single small ``p_j`` dominates."""
    q = np.clip(_p_matrix(p), CAUCHY_EPS, 1.0 - CAUCHY_EPS)
    return (1.0 / np.tan(np.pi * q)).mean(axis=1)


def cauchy_p_value(t: np.ndarray) -> np.ndarray:
    """The combined p-value ``1/2 - arctan(T) / pi`` of the Cauchy statistic ``T`` (exact
    under independence, approximately right under dependence: Liu & Xie 2020)."""
    return 0.5 - np.arctan(np.asarray(t, np.float64)) / np.pi


def min_p(p: np.ndarray) -> np.ndarray:
    """Bonferroni's min-p: ``-log(min(1, J min_j p_j))`` of ``[B, J]`` p-values: ``[B]``."""
    a = _p_matrix(p)
    return -np.log(np.minimum(1.0, a.shape[1] * a.min(axis=1)))


def two_level(p: np.ndarray, families: Sequence[str]) -> np.ndarray:
    """Bonferroni over component families: within each family (``families[j]`` names column
    ``j``'s) Fisher's statistic turned into its chi-square p-value (``2 k`` degrees of freedom
    for ``k`` components), then ``-log(min(1, F min_f p_f))`` over the ``F`` families: ``[B]``.
    Computed in log space, so tiny family p-values do not underflow."""
    a = _p_matrix(p)
    if len(families) != a.shape[1]:
        raise ValueError(f"{len(families)} family labels for {a.shape[1]} columns")
    labels = list(dict.fromkeys(families))
    log_p = np.empty((a.shape[0], len(labels)))
    for i, family in enumerate(labels):
        cols = [j for j, f in enumerate(families) if f == family]
        stat = -2.0 * np.log(a[:, cols]).sum(axis=1)
        log_p[:, i] = chi2.logsf(stat, 2 * len(cols))
    return np.maximum(0.0, -(np.log(len(labels)) + log_p.min(axis=1)))


COMBINERS: dict[str, Callable[[np.ndarray, Sequence[str]], np.ndarray]] = {
    "fisher": lambda p, names: fisher(p),
    "cauchy": lambda p, names: cauchy(p),
    "min_p": lambda p, names: min_p(p),
    "two_level": lambda p, names: two_level(p, [FAMILIES[kind_of(n)] for n in names]),
}


# --- the candidates -----------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A candidate score: the component ``kinds`` it combines (every component of a kind:
    ``stage_energy`` = each profile layer's), direction overrides ``sides`` (kind -> side) and
    the ``combiner`` (a key of :data:`COMBINERS`); with ``gate`` kinds, the inputs whose gate
    components lie beyond a share ``gate_level`` of the reference images come first
    (:func:`gated`)."""

    name: str
    kinds: tuple[str, ...]
    combiner: str
    sides: Mapping[str, str] = field(default_factory=dict)
    gate: tuple[str, ...] = ()
    gate_level: float = 0.01

    def __post_init__(self) -> None:
        unknown = [k for k in (*self.kinds, *self.sides, *self.gate) if k not in DIRECTIONS]
        if not 0.0 < self.gate_level < 1.0:
            raise ValueError(f"candidate {self.name!r}: gate_level must lie in (0, 1)")
        if unknown or self.combiner not in COMBINERS or not self.kinds:
            raise ValueError(f"candidate {self.name!r}: bad kinds {unknown} or combiner")
        if any(s not in SIDES for s in self.sides.values()):
            raise ValueError(f"candidate {self.name!r}: sides must be among {SIDES}")

    def direction(self, name: str) -> str:
        """The direction component ``name`` is taken in."""
        kind = kind_of(name)
        return self.sides.get(kind, DIRECTIONS[kind])

    def columns(self, available: Sequence[str], gate: bool = False) -> list[str]:
        """The components of ``available`` it combines (``gate``: its gate's), in
        ``available``'s order; refused when one of the kinds has none."""
        kinds = self.gate if gate else self.kinds
        cols = [n for n in available if kind_of(n) in kinds]
        missing = set(kinds) - {kind_of(n) for n in cols}
        if missing:
            raise ValueError(f"candidate {self.name!r}: no component of kind {sorted(missing)}")
        return cols


_MASS, _STAGES, _HEAD = ALPHA_COMPONENT, STAGE_COMPONENT, HEAD_COMPONENT
_HEAD_2S = {HEAD_COMPONENT: TWO_SIDED}
_SHORT = {_MASS: "mass", _STAGES: "stages", _HEAD: "head2s", ENERGY: "energy",
          MAX_LOGIT: "max_logit", BETA: "beta"}  # fmt: skip


def _combined(combiner: str, kinds: tuple[str, ...]) -> Candidate:
    """A candidate named ``"COMBINER: kind+kind..."`` with the head distance two-sided."""
    sides = _HEAD_2S if _HEAD in kinds else {}
    return Candidate(f"{combiner}: {'+'.join(_SHORT[k] for k in kinds)}", kinds, combiner, sides)


#: The component sets compared with every combiner.
COMPONENT_SETS: tuple[tuple[str, ...], ...] = (
    (_MASS, _STAGES, _HEAD, ENERGY),  # the profile, the head two-sided, and energy
    (_MASS, _STAGES, _HEAD, ENERGY, BETA),  # ... and the paper's beta
    (_MASS, _STAGES, _HEAD, MAX_LOGIT),  # max logit instead of energy
    (_MASS, _STAGES, ENERGY),  # without the head
)

#: Every candidate of the leave-one-out selection, the library's current default first.
CANDIDATES: tuple[Candidate, ...] = (
    Candidate(FISHER_SCORE_NAME, (_MASS, _STAGES, _HEAD), "fisher"),  # one-sided: the current score
    *(
        _combined(c, kinds)
        for kinds in COMPONENT_SETS
        for c in ("fisher", "cauchy", "min_p", "two_level")
    ),
    Candidate("energy alone", (ENERGY,), "min_p"),
    Candidate("beta alone", (BETA,), "min_p"),
)

#: The gated candidates (they need the stage distances of :mod:`bench.alarms.stage_stats`):
#: beyond 1% (0.1%) of the reference images in the stage distances first, then energy, or
#: energy with the final layer's expectation mass.
GATED_CANDIDATES: tuple[Candidate, ...] = tuple(
    Candidate(
        f"gated {level:g}: {'+'.join(_SHORT[k] for k in kinds)}", kinds, "fisher",
        gate=(STAGE_MAHALANOBIS,), gate_level=level,
    )
    for level in (0.01, 0.001)
    for kinds in ((ENERGY,), (ENERGY, _MASS))
)  # fmt: skip


def candidate_scores(
    judged: Mapping[str, np.ndarray],
    references: References,
    candidates: Sequence[Candidate] = CANDIDATES,
) -> dict[str, np.ndarray]:
    """Every candidate's score ``[B]`` of a judged set (higher = more atypical); each
    component's p-value is computed once per direction."""
    available = references.names()
    cache: dict[tuple[str, str], np.ndarray] = {}
    out = {}
    for cand in candidates:
        cols = cand.columns(available)
        for name in cols:
            key = (name, cand.direction(name))
            if key not in cache:
                cache[key] = references.p_value(judged, *key)
        p = np.stack([cache[(n, cand.direction(n))] for n in cols], axis=1)
        out[cand.name] = COMBINERS[cand.combiner](p, cols)
        if cand.gate:
            gate_cols = cand.columns(available, gate=True)
            for name in gate_cols:
                if (name, UPPER) not in cache:
                    cache[(name, UPPER)] = references.p_value(judged, name, UPPER)
            log_p = fisher_log_p(np.stack([cache[(n, UPPER)] for n in gate_cols], axis=1))
            threshold = references.gate_threshold(gate_cols, cand.gate_level)
            out[cand.name] = gated(log_p, threshold, out[cand.name])
    return out
