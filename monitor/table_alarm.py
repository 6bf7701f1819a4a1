"""The alarm's part of a calibration table: activation-profile grids, the head layer's class
means and shared precision, the score's reference and the conformal nulls (see
:mod:`surprise_monitor.monitor.atypicality` and :mod:`surprise_monitor.monitor.conformal`).

Made by ``calibrate`` after the alpha table: the profile grids, the head statistics and the
reference from an evenly spaced subset of the training images, the nulls from held-out images
(``heldout=``). Stored in the table's file as tensors named ``alarm.*`` and a metadata object
``"alarm"``; a table without them loads with ``alarm = None`` (no score, no alarms).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from surprise_monitor.kernels import check_percentile_grid
from surprise_monitor.monitor.atypicality import (
    EVIDENCE_VARIANTS,
    GATED_SCORE_NAME,
    KNN_VARIANTS,
    SCORES,
    STEP_TAIL,
    TAILS,
    Gate,
    ScoreReference,
    component_names,
)
from surprise_monitor.monitor.conformal import ClassConditionalNull, ConformalNull
from surprise_monitor.monitor.errors import SurpriseMonitorError
from surprise_monitor.monitor.families import (
    FAMILIES,
    FamilyNulls,
    family_columns,
    family_statistics,
)
from surprise_monitor.monitor.knn_distance import KnnDistance
from surprise_monitor.monitor.learned_evidence import LEARNED_VARIANTS, LearnedEvidence

#: Tensor name prefix in the file.
PREFIX = "alarm."


class AlarmTableError(SurpriseMonitorError, ValueError):
    """The alarm part of a table is inconsistent (the table wraps it in a ``TableError``)."""


@dataclass(eq=False)
class AlarmCalibration:
    """What the alarm needs beyond the alpha table.

    Attributes:
        score: the score's formula (one of :data:`surprise_monitor.monitor.atypicality.SCORES`;
        a table without one is of the Fisher score).
        profile_layers: the activation-profile layers, in forward order.
        profile_quantiles: per layer ``[C, Q]`` float32 percentiles of each channel's spatial
            mean over training images (any class), at the table's alpha levels.
        reference: the score's reference (training images' components).
        reference_images: how many training images the grids and the reference came from.
        null_predicted: the conformal null of the score judged against the predicted class
            (what inference does without labels), or ``None`` without held-out images.
        null_labelled: the null judged against the held-out images' true labels.
        heldout: what is known of the held-out images (``images``, ``accuracy``, ``source``).
        head_layer: the head layer (the feature map the classifier pools), ``""`` for none.
        head_means: ``[K', C]`` float32 class means of its channel means over training images
            (the classes that had images).
        head_precision: ``[C, C]`` float32 pseudo-inverse of their shared (within-class)
            covariance.
        class_null_predicted: the same held-out scores as ``null_predicted``, per predicted
            class (Mondrian: each class's alarm rate holds; a class with too few held-out images
            falls back to the pooled null), or ``None`` (pooled only).
        class_null_labelled: per true label, beside ``null_labelled``.
        evidence: the gated score's class-evidence variant (a key of
            :data:`~surprise_monitor.monitor.atypicality.EVIDENCE_VARIANTS`; ``""`` for the
            Fisher score).
        stage_means: the gated score's ``[C]`` float32 channel means per tapped layer (the
            profile layers, then the head) over the training images of the grids.
        stage_precisions: their ``[C, C]`` float32 shrunk-covariance inverses.
        gate_threshold: the gate's Fisher statistic beyond which an input counts as far
            (``None`` until the reference is made).
        gate_level: the share of the reference images beyond that threshold (the
            calibration's ``AlarmOptions.gate_level``; ``None`` for the Fisher score and for
            gated tables made before it was recorded, whose level was
            :data:`~surprise_monitor.monitor.atypicality.GATE_LEVEL`).
        learned: the fitted class evidence of the ``learned`` variant
            (:class:`~surprise_monitor.monitor.learned_evidence.LearnedEvidence`), else ``None``.
        knn: the gated score's nearest-neighbour component: a bank of training images' unit
            head features and its neighbour
            (:class:`~surprise_monitor.monitor.knn_distance.KnnDistance`), else ``None`` (no
            such component: tables made before it, or ``knn_bank=0``).
        family_null_predicted: the held-out images' family statistics judged against their
            predictions (:class:`~surprise_monitor.monitor.families.FamilyNulls`: the
            per-family p-values and the alarm's kind), or ``None`` (tables made before them).
        family_null_labelled: the same judged against their labels.
    """

    score: str
    profile_layers: tuple[str, ...]
    profile_quantiles: tuple[torch.Tensor, ...]
    reference: ScoreReference | None
    reference_images: int = 0
    null_predicted: ConformalNull | None = None
    null_labelled: ConformalNull | None = None
    heldout: dict[str, Any] = field(default_factory=dict)
    head_layer: str = ""
    head_means: torch.Tensor | None = None
    head_precision: torch.Tensor | None = None
    class_null_predicted: ClassConditionalNull | None = None
    class_null_labelled: ClassConditionalNull | None = None
    evidence: str = ""
    stage_means: tuple[torch.Tensor, ...] = ()
    stage_precisions: tuple[torch.Tensor, ...] = ()
    gate_threshold: float | None = None
    gate_level: float | None = None
    learned: LearnedEvidence | None = None
    knn: KnnDistance | None = None
    family_null_predicted: FamilyNulls | None = None
    family_null_labelled: FamilyNulls | None = None

    @property
    def gated(self) -> bool:
        """Whether the score is the gated one."""
        return self.score == GATED_SCORE_NAME

    def gate(self) -> Gate | None:
        """The gated score's :class:`~surprise_monitor.monitor.atypicality.Gate` (``None`` for
        the Fisher score; an infinite threshold before the reference is made)."""
        if not self.gated:
            return None
        threshold = float("inf") if self.gate_threshold is None else self.gate_threshold
        return Gate.columns(self.component_names(), self.evidence, threshold, self.learned)

    @property
    def tap_layers(self) -> tuple[str, ...]:
        """The layers whose channel means the judge records: the profile layers, then the head."""
        return self.profile_layers + ((self.head_layer,) if self.head_layer else ())

    def component_names(self) -> list[str]:
        """The score's components, in the order of ``report.components``' columns."""
        return component_names(
            self.profile_layers, self.head_layer, self.score, knn=self.knn is not None
        )

    @property
    def has_null(self) -> bool:
        """True when alarms can fire: a reference and both nulls are there."""
        return (
            self.reference is not None
            and self.null_predicted is not None
            and self.null_labelled is not None
        )

    def null(self, labels_given: bool) -> ConformalNull | None:
        """The null for inputs judged against labels (``True``) or predictions."""
        return self.null_labelled if labels_given else self.null_predicted

    def class_null(self, labels_given: bool) -> ClassConditionalNull | None:
        """The per-class nulls for inputs judged against labels (``True``) or predictions."""
        return self.class_null_labelled if labels_given else self.class_null_predicted

    def null_sizes(self, labels_given: bool, num_classes: int) -> list[int]:
        """Per class, how many held-out scores its p-values are taken among: its own null's
        size when it has one (at least ``class_null_min`` images), else the pooled null's;
        ``[]`` without a null."""
        pooled = self.null(labels_given)
        if pooled is None:
            return []
        per_class = self.class_null(labels_given)
        if per_class is None:
            return [pooled.size] * num_classes
        least = per_class.min_size
        return [n if n >= least else pooled.size for n in per_class.sizes.tolist()]

    @property
    def class_null_min(self) -> int:
        """Held-out images a class needs for a null of its own; 0 without per-class nulls."""
        return 0 if self.class_null_predicted is None else self.class_null_predicted.min_size

    def class_nulls_summary(self) -> str:
        """How the p-values are taken, in one line: per predicted class (Mondrian), naming the
        classes that fall back to the pooled null, or one pooled null."""
        per_class = self.class_null_predicted
        if per_class is None:
            return "one pooled null for all classes (class_null_min 0)"
        k, pooled = per_class.num_classes, per_class.pooled_classes()
        line = (
            f"per-class nulls (Mondrian) for {k - len(pooled)} of {k} predicted classes (>= "
            f"{per_class.min_size} held-out images each)"
        )
        if pooled:
            shown = ", ".join(str(c) for c in pooled[:10]) + (" ..." if len(pooled) > 10 else "")
            line += (
                f"; WARNING: {len(pooled)} class(es) ({shown}) have fewer and use the pooled "
                "null, whose alarm rate holds only on average over the classes"
            )
        return line

    def with_nulls(
        self,
        predicted: torch.Tensor,
        labelled: torch.Tensor,
        heldout: dict[str, Any],
        classes: tuple[torch.Tensor, torch.Tensor, int, int] | None = None,
        ranks: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> AlarmCalibration:
        """A copy with the nulls of held-out scores (unsorted) and their description;
        ``classes`` = ``(predicted classes, labels, num_classes, min_size)`` adds the
        per-class (Mondrian) nulls, ``ranks`` = the same images' ``[n, J]`` component tail
        ranks judged against their predictions and their labels the family nulls."""
        per_class: dict[str, ClassConditionalNull | None] = {
            "class_null_predicted": None, "class_null_labelled": None,
        }  # fmt: skip
        if classes is not None:
            pred, labels, k, least = classes
            per_class = {
                "class_null_predicted": ClassConditionalNull.of(predicted, pred, k, least),
                "class_null_labelled": ClassConditionalNull.of(labelled, labels, k, least),
            }
        families: dict[str, FamilyNulls | None] = {
            "family_null_predicted": None, "family_null_labelled": None,
        }  # fmt: skip
        if ranks is not None:
            columns = family_columns(self.component_names())
            families = {
                f"family_null_{name}": FamilyNulls.of(family_statistics(r, columns))
                for name, r in zip(("predicted", "labelled"), ranks, strict=True)
            }
        return replace(
            self, null_predicted=ConformalNull.of(predicted),
            null_labelled=ConformalNull.of(labelled), heldout=dict(heldout), **per_class,
            **families,
        )  # fmt: skip

    def validate(self, levels: torch.Tensor) -> None:
        """:class:`AlarmTableError` naming what does not fit (levels: the table's)."""
        if self.score not in SCORES:
            raise AlarmTableError(
                f"alarm score {self.score!r} is not one this library computes ({list(SCORES)}); "
                "calibrate again"
            )
        self._validate_gate()
        if len(self.profile_quantiles) != len(self.profile_layers):
            raise AlarmTableError(
                f"{len(self.profile_quantiles)} profile grids for "
                f"{len(self.profile_layers)} profile layers"
            )
        for name, grid in zip(self.profile_layers, self.profile_quantiles, strict=True):
            try:
                check_percentile_grid(
                    levels, grid, names=("levels", f"profile grid of {name!r}"),
                    axes=("channel",),
                )  # fmt: skip
            except ValueError as exc:
                raise AlarmTableError(str(exc)) from exc
        self._validate_head()
        want = len(self.component_names())
        if self.reference is not None and len(self.reference.sorted_components) != want:
            raise AlarmTableError(
                f"the score reference has {len(self.reference.sorted_components)} components, "
                f"the profile layers need {want}"
            )
        if (self.null_predicted is None) != (self.null_labelled is None):
            raise AlarmTableError("null_predicted and null_labelled must be given together")
        self._validate_class_nulls()
        self._validate_family_nulls()

    def _validate_family_nulls(self) -> None:
        """:class:`AlarmTableError` when the family nulls do not fit the score's families."""
        pair = (self.family_null_predicted, self.family_null_labelled)
        if (pair[0] is None) != (pair[1] is None):
            raise AlarmTableError(
                "family_null_predicted and family_null_labelled must be given together"
            )
        if pair[0] is None:
            return
        columns = family_columns(self.component_names())
        for name, nulls in zip(("predicted", "labelled"), pair, strict=True):
            assert nulls is not None
            for family, cols, size in zip(FAMILIES, columns, nulls.sizes, strict=True):
                if bool(cols) != bool(size):
                    raise AlarmTableError(
                        f"the {name} family null of {family!r} "
                        + ("is missing" if cols else "is there")
                        + f" for a score {'with' if cols else 'without'} components of it"
                    )

    def _validate_class_nulls(self) -> None:
        """:class:`AlarmTableError` when the per-class nulls do not fit the pooled ones."""
        pairs = (
            ("predicted", self.class_null_predicted, self.null_predicted),
            ("labelled", self.class_null_labelled, self.null_labelled),
        )
        if (self.class_null_predicted is None) != (self.class_null_labelled is None):
            raise AlarmTableError(
                "class_null_predicted and class_null_labelled must be given together"
            )
        for name, per_class, pooled in pairs:
            if per_class is None:
                continue
            if pooled is None or per_class.scores.numel() != pooled.size:
                raise AlarmTableError(
                    f"the per-class {name} nulls hold {per_class.scores.numel()} scores, the "
                    f"pooled null {0 if pooled is None else pooled.size}"
                )

    def _validate_gate(self) -> None:
        """:class:`AlarmTableError` when the gated score's statistics do not fit."""
        if not self.gated:
            gate = (self.gate_threshold, self.gate_level)
            extra = self.learned is not None or self.knn is not None
            if self.evidence or self.stage_means or gate != (None, None) or extra:
                raise AlarmTableError(f"the {self.score!r} score has no gate or evidence variant")
            return
        if self.evidence not in EVIDENCE_VARIANTS:
            raise AlarmTableError(
                f"evidence variant {self.evidence!r} is not one of {sorted(EVIDENCE_VARIANTS)}"
            )
        self._validate_knn()
        if (self.evidence in LEARNED_VARIANTS) != (self.learned is not None):
            raise AlarmTableError(
                f"the evidence variants {list(LEARNED_VARIANTS)}, and they alone, need their "
                "fitted weights (alarm.learned_weights)"
            )
        if self.learned is not None and self.learned.components != len(self.component_names()):
            raise AlarmTableError(
                f"the learned evidence has weights for {self.learned.components} components, "
                f"the score has {len(self.component_names())}"
            )
        taps = len(self.tap_layers)
        if not taps:
            raise AlarmTableError("the gated score needs profile or head layers")
        if len(self.stage_means) != taps or len(self.stage_precisions) != taps:
            raise AlarmTableError(
                f"{len(self.stage_means)} stage means and {len(self.stage_precisions)} "
                f"precisions for {taps} profile and head layers"
            )
        for name, mean, precision in zip(
            self.tap_layers, self.stage_means, self.stage_precisions, strict=True
        ):
            c = mean.shape[0] if mean.ndim == 1 else -1
            if c < 1 or tuple(precision.shape) != (c, c):
                raise AlarmTableError(
                    f"the stage statistics of {name!r} must be [C] and [C, C], got "
                    f"{list(mean.shape)} and {list(precision.shape)}"
                )
            if not bool(torch.isfinite(mean).all()) or not bool(torch.isfinite(precision).all()):
                raise AlarmTableError(f"the stage statistics of {name!r} must be finite")
        if self.reference is not None and self.gate_threshold is None:
            raise AlarmTableError("the gated score's reference needs its gate threshold")
        if self.gate_level is not None and not 0.0 < self.gate_level < 1.0:
            raise AlarmTableError(f"gate_level must lie in (0, 1), got {self.gate_level}")

    def _validate_knn(self) -> None:
        """:class:`AlarmTableError` when the KNN bank or a ``+knn`` variant does not fit."""
        if self.evidence in KNN_VARIANTS and self.knn is None:
            raise AlarmTableError(
                f"evidence variant {self.evidence!r} needs the table's KNN bank (alarm.knn_bank)"
            )
        if self.knn is None:
            return
        if not self.head_layer or self.head_means is None:
            raise AlarmTableError("the KNN bank needs the head layer whose features it holds")
        if self.knn.channels != self.head_means.shape[1]:
            raise AlarmTableError(
                f"the KNN bank has {self.knn.channels} channels, the head layer "
                f"{self.head_means.shape[1]}"
            )
        if not bool(torch.isfinite(self.knn.bank).all()):
            raise AlarmTableError("the KNN bank must be finite")
        norms = self.knn.bank.double().norm(dim=1)
        if bool(((norms - 1.0).abs() > 1e-3).any()):
            raise AlarmTableError("the KNN bank's rows must have unit length")

    def _validate_head(self) -> None:
        """:class:`AlarmTableError` when the head layer and its statistics do not fit."""
        given = (self.head_means is not None, self.head_precision is not None)
        if given != (bool(self.head_layer),) * 2:
            raise AlarmTableError(
                "head_layer, head_means and head_precision must be given together"
            )
        if not self.head_layer:
            return
        if self.head_layer in self.profile_layers:
            raise AlarmTableError(f"head layer {self.head_layer!r} is also a profile layer")
        means, precision = self.head_means, self.head_precision
        assert means is not None and precision is not None
        if means.ndim != 2 or means.shape[0] < 1:
            raise AlarmTableError(f"head_means must be [classes, C], got {list(means.shape)}")
        c = means.shape[1]
        if tuple(precision.shape) != (c, c):
            raise AlarmTableError(
                f"head_precision must be [{c}, {c}] for {c} head channels, got "
                f"{list(precision.shape)}"
            )
        if not bool(torch.isfinite(means).all()) or not bool(torch.isfinite(precision).all()):
            raise AlarmTableError("head_means and head_precision must be finite")

    # ------------------------------------------------------------------ the file
    def metadata(self) -> dict[str, Any]:
        """The JSON object stored as the table metadata's ``"alarm"``."""
        return {
            "score": self.score,
            "profile_layers": list(self.profile_layers),
            "reference_images": int(self.reference_images),
            "reference": self.reference is not None,
            **({"reference_tail": self.reference.tail} if self.reference is not None else {}),
            "null": self.null_predicted is not None,
            "heldout": self.heldout,
            "head_layer": self.head_layer,
            "class_null_min": self.class_null_min,
            **(
                {
                    "family_nulls": [
                        f
                        for f, n in zip(FAMILIES, self.family_null_predicted.sizes, strict=True)
                        if n
                    ]
                }  # fmt: skip
                if self.family_null_predicted is not None
                else {}
            ),
            **(
                {
                    "evidence": self.evidence,
                    "gate_threshold": self.gate_threshold,
                    "gate_level": self.gate_level,
                    **_learned_metadata(self.learned),
                    **({"knn_k": self.knn.k} if self.knn is not None else {}),
                }
                if self.gated
                else {}
            ),
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors stored in the file (float32, contiguous, on the CPU)."""
        out: dict[str, torch.Tensor] = {}
        for i, grid in enumerate(self.profile_quantiles):
            out[f"{PREFIX}profile.{i}"] = grid
        if self.reference is not None:
            for j, ref in enumerate(self.reference.sorted_components):
                out[f"{PREFIX}reference.{j}"] = ref
        if self.head_means is not None and self.head_precision is not None:
            out[f"{PREFIX}head_means"] = self.head_means
            out[f"{PREFIX}head_precision"] = self.head_precision
        for i, (mean, precision) in enumerate(
            zip(self.stage_means, self.stage_precisions, strict=True)
        ):
            out[f"{PREFIX}stage_mean.{i}"] = mean
            out[f"{PREFIX}stage_precision.{i}"] = precision
        if self.knn is not None:
            out[f"{PREFIX}knn_bank"] = self.knn.bank
        if self.learned is not None:
            out[f"{PREFIX}learned_weights"] = self.learned.weights
            out[f"{PREFIX}learned_reference"] = self.learned.reference
        if self.null_predicted is not None and self.null_labelled is not None:
            out[f"{PREFIX}null_predicted"] = self.null_predicted.scores
            out[f"{PREFIX}null_labelled"] = self.null_labelled.scores
        for name, per_class in (
            ("predicted", self.class_null_predicted), ("labelled", self.class_null_labelled),
        ):  # fmt: skip
            if per_class is not None:
                out[f"{PREFIX}class_null_{name}"] = per_class.scores
                out[f"{PREFIX}class_null_{name}_sizes"] = per_class.sizes
        for name, nulls in (
            ("predicted", self.family_null_predicted), ("labelled", self.family_null_labelled),
        ):  # fmt: skip
            for family, null in zip(FAMILIES, () if nulls is None else nulls.nulls, strict=False):
                if null is not None:
                    out[f"{PREFIX}family_null_{name}.{family}"] = null.scores
        return {k: v.detach().cpu().float().contiguous() for k, v in out.items()}

    @classmethod
    def from_file(cls, meta: Any, tensors: dict[str, torch.Tensor]) -> AlarmCalibration:
        """The alarm part of a table file: its metadata object and its ``alarm.*`` tensors
        (:class:`AlarmTableError` naming a missing or mistyped field or tensor)."""
        if not isinstance(meta, dict):
            raise AlarmTableError("metadata field 'alarm' must be an object")
        layers = _field(meta, "profile_layers", list)
        if not all(isinstance(x, str) for x in layers):
            raise AlarmTableError("metadata field 'alarm.profile_layers' must be strings")
        grids = tuple(_tensor(tensors, f"profile.{i}") for i in range(len(layers)))
        head = _field(meta, "head_layer", str) if "head_layer" in meta else ""
        if not head and PREFIX + "head_means" in tensors:
            raise AlarmTableError(
                "the table has head statistics (head_means) but no head_layer: they must be "
                "given together"
            )
        head_means = _tensor(tensors, "head_means") if head else None
        head_precision = _tensor(tensors, "head_precision") if head else None
        score = _field(meta, "score", str)
        gated = score == GATED_SCORE_NAME
        taps = len(layers) + (1 if head else 0)
        stage_means = tuple(
            _tensor(tensors, f"stage_mean.{i}") for i in range(taps if gated else 0)
        )
        stage_precisions = tuple(
            _tensor(tensors, f"stage_precision.{i}") for i in range(taps if gated else 0)
        )
        evidence = _field(meta, "evidence", str) if gated else ""
        threshold = None
        if gated and meta.get("gate_threshold") is not None:
            threshold = float(_field(meta, "gate_threshold", float))
        level = None
        if gated and meta.get("gate_level") is not None:
            level = float(_field(meta, "gate_level", float))
        learned = _learned(meta, tensors) if evidence in LEARNED_VARIANTS else None
        knn = _knn(meta, tensors) if gated and "knn_k" in meta else None
        reference = None
        if _field(meta, "reference", bool):
            count = len(component_names(layers, head, score, knn=knn is not None))
            tail = _field(meta, "reference_tail", str) if "reference_tail" in meta else STEP_TAIL
            if tail not in TAILS:
                raise AlarmTableError(
                    f"metadata field 'alarm.reference_tail' must be one of {list(TAILS)}, "
                    f"got {tail!r}"
                )
            reference = ScoreReference(
                tuple(_tensor(tensors, f"reference.{j}") for j in range(count)), tail
            )
        predicted = labelled = None
        if _field(meta, "null", bool):
            predicted = ConformalNull(_tensor(tensors, "null_predicted"))
            labelled = ConformalNull(_tensor(tensors, "null_labelled"))
        class_nulls = _class_nulls(meta, tensors) if predicted is not None else (None, None)
        family_nulls = _family_nulls(meta, tensors)
        return cls(
            score=score, profile_layers=tuple(layers),
            profile_quantiles=grids, reference=reference,
            reference_images=_field(meta, "reference_images", int),
            null_predicted=predicted, null_labelled=labelled,
            heldout=_field(meta, "heldout", dict), head_layer=head, head_means=head_means,
            head_precision=head_precision, class_null_predicted=class_nulls[0],
            class_null_labelled=class_nulls[1], evidence=evidence, stage_means=stage_means,
            stage_precisions=stage_precisions, gate_threshold=threshold, gate_level=level,
            learned=learned, knn=knn, family_null_predicted=family_nulls[0],
            family_null_labelled=family_nulls[1],
        )  # fmt: skip


def _knn(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> KnnDistance:
    """The KNN bank of a table file (:class:`AlarmTableError` naming what is wrong)."""
    try:
        return KnnDistance(_tensor(tensors, "knn_bank"), _field(meta, "knn_k", int))
    except ValueError as exc:
        if isinstance(exc, AlarmTableError):
            raise
        raise AlarmTableError(str(exc)) from exc


def _learned_metadata(learned: LearnedEvidence | None) -> dict[str, float]:
    """The learned evidence's scalars for the table's metadata (nothing without one)."""
    if learned is None:
        return {}
    return {
        "learned_bias": learned.bias, "learned_floor": learned.floor,
        "learned_rank_weight": learned.rank_weight,
    }  # fmt: skip


def _learned(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LearnedEvidence:
    """The learned evidence of a table file (:class:`AlarmTableError` naming what is wrong)."""
    try:
        return LearnedEvidence(
            _tensor(tensors, "learned_weights"), float(_field(meta, "learned_bias", float)),
            float(_field(meta, "learned_floor", float)), _tensor(tensors, "learned_reference"),
            float(_field(meta, "learned_rank_weight", float)),
        )  # fmt: skip
    except ValueError as exc:
        if isinstance(exc, AlarmTableError):
            raise
        raise AlarmTableError(str(exc)) from exc


def _class_nulls(
    meta: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[ClassConditionalNull | None, ClassConditionalNull | None]:
    """The per-class nulls of a table file (``None, None`` for a table without them: one made
    before they existed, or with ``class_null_min`` 0)."""
    least = _field(meta, "class_null_min", int) if "class_null_min" in meta else 0
    if least == 0:
        return None, None
    out = []
    for name in ("predicted", "labelled"):
        sizes = _tensor(tensors, f"class_null_{name}_sizes")
        if bool((sizes != sizes.round()).any()):
            raise AlarmTableError(f"tensor 'alarm.class_null_{name}_sizes' must hold integers")
        try:
            out.append(
                ClassConditionalNull(_tensor(tensors, f"class_null_{name}"), sizes.long(), least)
            )
        except ValueError as exc:
            raise AlarmTableError(str(exc)) from exc
    return out[0], out[1]


def _family_nulls(
    meta: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[FamilyNulls | None, FamilyNulls | None]:
    """The family nulls of a table file (``None, None`` for a table made before them)."""
    if "family_nulls" not in meta:
        return None, None
    listed = _field(meta, "family_nulls", list)
    unknown = [f for f in listed if f not in FAMILIES]
    if unknown:
        raise AlarmTableError(
            f"metadata field 'alarm.family_nulls' names unknown families {unknown} "
            f"(known: {list(FAMILIES)})"
        )
    out = []
    for name in ("predicted", "labelled"):
        try:
            nulls = tuple(
                ConformalNull(_tensor(tensors, f"family_null_{name}.{f}")) if f in listed else None
                for f in FAMILIES
            )
        except ValueError as exc:
            if isinstance(exc, AlarmTableError):
                raise
            raise AlarmTableError(f"family null ({name}): {exc}") from exc
        out.append(FamilyNulls(nulls))
    return out[0], out[1]


def _field(meta: dict[str, Any], name: str, kind: type) -> Any:
    """``meta[name]`` when it is a ``kind`` (:class:`AlarmTableError` naming it otherwise)."""
    if name not in meta:
        raise AlarmTableError(f"metadata field 'alarm.{name}' is missing")
    value = meta[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise AlarmTableError(f"metadata field 'alarm.{name}' must be a {kind.__name__}")
    return value


def _tensor(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The file's tensor ``alarm.<name>`` as float32 (:class:`AlarmTableError` when absent)."""
    key = PREFIX + name
    if key not in tensors:
        raise AlarmTableError(f"the table lacks tensor {key!r}")
    return tensors[key].float()
