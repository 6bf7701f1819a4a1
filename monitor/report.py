"""The monitor's per-batch result, convertible to plain Python / JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from surprise_monitor.monitor.atypicality import DEFAULT_EVIDENCE, alarm_kind
from surprise_monitor.monitor.families import FAMILIES, family_columns, kind_of
from surprise_monitor.monitor.learned_evidence import LearnedEvidence


@dataclass(frozen=True)
class FlaggedFilter:
    """One filter flagged for one input."""

    filter: int
    kind: str  # "surprise" or "expectation"
    alpha: float
    mu: float
    deviation: float  # alpha - mu
    percentile: float  # alpha's percentile rank within the class's calibration distribution

    def to_dict(self) -> dict[str, Any]:
        """The filter's fields as a plain dict."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class MonitorReport:
    """Per-sample monitoring results for a batch of B inputs (tensors are batch-first, on CPU).

    ``classes`` is the class each input was judged against: the caller's label when given
    (``labels_given``), else the prediction.

    The per-input alarm (:mod:`surprise_monitor.monitor.atypicality`,
    :mod:`surprise_monitor.monitor.conformal`): ``score`` (higher = less like the training images),
    its conformal ``p_value`` among held-out images and ``alarm = p_value <= alarm_rate``; NaN / NaN
    / False when the table has no alarm calibration. ``components`` and their ``component_ranks``
    (named by ``component_names``) say which part of the network found the input atypical. The
    per-filter flags (``surprise``, ``expectation``) explain an alarm.
    """

    logits: torch.Tensor  # [B, K]
    classes: torch.Tensor  # [B] int64
    labels_given: bool
    alpha: torch.Tensor  # [B, N]
    mu: torch.Tensor  # [B, N] the class means the inputs were compared with
    percentile: torch.Tensor  # [B, N]
    surprise: torch.Tensor  # [B, N] bool
    expectation: torch.Tensor  # [B, N] bool
    beta: torch.Tensor  # [B]
    beta_percentile: torch.Tensor  # [B]
    low_beta: torch.Tensor  # [B] bool
    calibrated: torch.Tensor  # [B] bool: the class had calibration images
    score: torch.Tensor  # [B] float32 atypicality score (NaN: the table has no reference)
    p_value: torch.Tensor  # [B] float32 conformal p-value (NaN: the table has no null)
    alarm: torch.Tensor  # [B] bool: p_value <= alarm_rate
    components: torch.Tensor  # [B, 1 + L (+ 1)] the score's components (monitor.atypicality)
    component_ranks: torch.Tensor  # [B, 1 + L (+ 1)] each one's tail rank among training images
    layer: str
    class_names: tuple[str, ...]
    alarm_rate: float = float("nan")  # the nominal false-alarm rate the alarms were set at
    component_names: tuple[str, ...] = ()  # the components' names, in column order
    learned: LearnedEvidence | None = None  # the table's learned evidence (its alarm kinds)
    evidence: str = DEFAULT_EVIDENCE  # the gated score's evidence variant (its alarm kinds)
    family_p_values: torch.Tensor | None = None  # [B, F] per component family (NaN: no null)

    def __len__(self) -> int:
        return int(self.classes.shape[0])

    def select(self, rows: list[int] | torch.Tensor) -> MonitorReport:
        """The report restricted to the given batch rows (every per-sample tensor indexed)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        changes = {
            f.name: getattr(self, f.name)[idx]
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **changes)

    @property
    def predictions(self) -> torch.Tensor:
        """``[B]`` the predicted class of each input."""
        return self.logits.argmax(dim=1)

    @property
    def deviation(self) -> torch.Tensor:
        """``alpha - mu`` per sample and filter, ``[B, N]``."""
        return self.alpha - self.mu

    @property
    def surprise_count(self) -> torch.Tensor:
        """``[B]`` surprising filters per input."""
        return self.surprise.sum(dim=1)

    @property
    def expectation_count(self) -> torch.Tensor:
        """``[B]`` expected filters per input."""
        return self.expectation.sum(dim=1)

    @property
    def flagged(self) -> torch.Tensor:
        """``[B]`` bool: any surprising or expected filter, or a low beta."""
        return self.surprise.any(dim=1) | self.expectation.any(dim=1) | self.low_beta

    def _filters(
        self, i: int, mask: torch.Tensor, kind: str, descending: bool
    ) -> list[FlaggedFilter]:
        """Input i's filters where ``mask`` is set, sorted by ``alpha - mu``."""
        idx = torch.nonzero(mask[i]).flatten()
        dev = self.deviation[i, idx]
        order = torch.argsort(dev, descending=descending, stable=True)
        return [
            FlaggedFilter(
                filter=int(n),
                kind=kind,
                alpha=float(self.alpha[i, n]),
                mu=float(self.mu[i, n]),
                deviation=float(self.deviation[i, n]),
                percentile=float(self.percentile[i, n]),
            )
            for n in idx[order].tolist()
        ]

    def surprising_filters(self, i: int) -> list[FlaggedFilter]:
        """Input i's surprising filters, most surprising (largest ``alpha - mu``) first."""
        return self._filters(i, self.surprise, "surprise", descending=True)

    def expected_filters(self, i: int) -> list[FlaggedFilter]:
        """Input i's expected filters, most under-active (most negative ``alpha - mu``) first."""
        return self._filters(i, self.expectation, "expectation", descending=False)

    def highest_percentile_filter(self, i: int) -> int:
        """Input i's filter with the highest percentile rank (ties: the larger ``alpha - mu``,
        then the lower index): what explanations and fixes fall back on when no filter is
        flagged."""
        pct, dev = self.percentile[i].double(), self.deviation[i].double()
        return max(range(int(self.alpha.shape[1])), key=lambda n: (float(pct[n]), float(dev[n])))

    def sample(self, i: int, max_filters: int | None = 10) -> dict[str, Any]:
        """Input i's result as plain Python (JSON-serialisable)."""
        c = int(self.classes[i])
        sur = self.surprising_filters(i)
        exp = self.expected_filters(i)
        return {
            "class": c,
            "class_name": self.class_names[c] if c < len(self.class_names) else str(c),
            "label_given": self.labels_given,
            "prediction": int(self.predictions[i]),
            "calibrated": bool(self.calibrated[i]),
            "beta": float(self.beta[i]),
            "beta_percentile": float(self.beta_percentile[i]),
            "low_beta": bool(self.low_beta[i]),
            "score": _number(self.score[i]),
            "p_value": _number(self.p_value[i]),
            "alarm": bool(self.alarm[i]),
            "components": self.component_parts(i),
            "alarm_kind": self.alarm_kind(i) if bool(self.alarm[i]) else None,
            "family_p_values": self.family_parts(i),
            "surprise_count": len(sur),
            "expectation_count": len(exp),
            "surprising_filters": [f.to_dict() for f in sur[:max_filters]],
            "expected_filters": [f.to_dict() for f in exp[:max_filters]],
        }

    def alarm_kind(self, i: int) -> str | None:
        """The kind of atypicality behind input i's score (a key of
        :data:`surprise_monitor.monitor.atypicality.ALARM_KINDS`: ``"class_evidence"``,
        ``"low_level"``, ``"features"``): the component family with the smallest p-value among
        the held-out images' (:attr:`family_p_values`,
        :func:`~surprise_monitor.monitor.families.kind_of`); on a table without family nulls,
        the component family that found it least like the training images, or of the gated
        score the part that ranked it (:func:`~surprise_monitor.monitor.atypicality.alarm_kind`);
        ``None`` without component ranks. ``sample(i)["alarm_kind"]`` holds it for inputs that
        alarm."""
        names = self.component_names or tuple(
            f"component_{j}" for j in range(int(self.components.shape[1]))
        )
        ranks = self.component_ranks[i].tolist()
        if self.family_p_values is not None:
            kind = kind_of(self.family_p_values[i].tolist(), ranks, family_columns(names))
            if kind is not None:
                return kind
        return alarm_kind(names, ranks, float(self.score[i]), self.learned, self.evidence)

    def family_parts(self, i: int) -> dict[str, float | None]:
        """Input i's p-value per component family (:data:`~surprise_monitor.monitor.families.
        FAMILIES`: how unusual the class evidence, the low-level statistics and the high-level
        features are among held-out images'; ``None`` where the table has no family null)."""
        if self.family_p_values is None:
            return dict.fromkeys(FAMILIES)
        return {f: _number(p) for f, p in zip(FAMILIES, self.family_p_values[i], strict=True)}

    def component_parts(self, i: int) -> dict[str, dict[str, float | None]]:
        """Input i's score components by name: ``{"value", "tail_rank"}`` each; the smallest
        tail rank is the part of the network that found the input most unlike the training
        images (``None`` for NaN)."""
        names = self.component_names or tuple(
            f"component_{j}" for j in range(int(self.components.shape[1]))
        )
        return {
            name: {
                "value": _number(self.components[i, j]),
                "tail_rank": _number(self.component_ranks[i, j]),
            }
            for j, name in enumerate(names)
        }

    def to_dict(self, max_filters: int | None = 10) -> dict[str, Any]:
        """The whole batch as plain Python: ``{"layer": ..., "samples": [...]}``."""
        return {
            "layer": self.layer,
            "alarm_rate": _number(self.alarm_rate),
            "samples": [self.sample(i, max_filters) for i in range(len(self))],
        }

    def to_json(self, max_filters: int | None = 10, **kwargs: Any) -> str:
        """:meth:`to_dict` as JSON (``kwargs`` go to ``json.dumps``)."""
        return json.dumps(self.to_dict(max_filters), **kwargs)


def _number(value: Any) -> float | None:
    """A float for JSON: ``None`` for NaN (JSON has no NaN)."""
    v = float(value)
    return None if v != v else v
