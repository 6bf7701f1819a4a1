"""The calibration's options, grouped and declared once (frozen dataclasses, as the monitor's in
:mod:`surprise_monitor.monitor.options`): :func:`~surprise_monitor.calibrate.calibrate` takes
each group whole, the ``surprise-calibrate`` flags take their help and defaults from them, and a
checkpoint records the ones that decide its values.

- :class:`TableOptions`: what the table holds (the differentiated class output, the grids,
  exemplars, class names, where the images came from, whether a degenerate one is kept).
- :class:`RunOptions`: how the run goes (batches, workers, backend, autocast, exact or
  approximate, memory, where alpha is spilled, how ranks merge).
- :class:`CheckpointOptions`: a resumable run.
- :class:`AlarmOptions`: the per-input alarm's part of the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surprise_monitor.calibrate.evidence_choice import AUTO as AUTO_EVIDENCE
from surprise_monitor.calibrate.evidence_choice import (
    AUTO_MIN_HELDOUT,
    CHOICE_IMAGES,
    DEFAULT_VARIANT,
    PREFERRED,
)
from surprise_monitor.calibrate.score_choice import AUTO_SCORE, STAGE_IMAGES_PER_CHANNEL
from surprise_monitor.calibrate.sketch import LogGrid
from surprise_monitor.monitor.atypicality import (
    DEFAULT_EVIDENCE,
    EVIDENCE_VARIANTS,
    FISHER_SCORE_NAME,
    GATE_LEVEL,
    GATED_SCORE_NAME,
    SCORES,
)
from surprise_monitor.monitor.checks import fraction, non_negative_int, one_of, positive_int
from surprise_monitor.monitor.conformal import DEFAULT_CLASS_NULL_MIN
from surprise_monitor.monitor.knn_distance import BANK, NEIGHBOUR
from surprise_monitor.monitor.learned_evidence import LEARNED_EVIDENCE, LEARNED_WITH_MASS
from surprise_monitor.monitor.options import Execution, help_of, option
from surprise_monitor.monitor.probe.class_output import CLASS_OUTPUTS, DEFAULT_CLASS_OUTPUT
from surprise_monitor.monitor.table import DEFAULT_BETA_LEVELS, DEFAULT_LEVELS

MERGES = ("auto", "send")
#: Training images (at most) behind the profile grids and the score reference.
DEFAULT_REFERENCE_IMAGES = 20_000


@dataclass(frozen=True)
class TableOptions:
    """What the calibration table holds."""

    class_output: str = option(
        DEFAULT_CLASS_OUTPUT,
        "the class output differentiated for alpha: logit, softmax or log_softmax",
        choices=CLASS_OUTPUTS,
    )
    levels: Sequence[float] = option(
        DEFAULT_LEVELS,
        "percent levels of the alpha grid (the tail levels the thresholds need are always added)",
        repr=False,
    )
    beta_levels: Sequence[float] = option(
        DEFAULT_BETA_LEVELS, "percent levels of the beta grid", repr=False
    )
    top_k: int = option(6, "exemplar images kept per (class, filter)")
    class_names: Sequence[str] | None = option(None, "the classes' names, in label order")
    data_source: dict[str, Any] | None = option(
        None, "where the training images came from (kept for the explanations' exemplars)"
    )
    heldout_source: dict[str, Any] | None = option(
        None, "where the held-out images came from (kept in the table)"
    )
    allow_degenerate: bool = option(
        False,
        "keep a table whose alpha is constant for most filters (every percentile a tie: a "
        "zero-initialised, untrained or dead head, or the wrong layer), with a warning, "
        "instead of refusing it",
    )

    def __post_init__(self) -> None:
        one_of("class_output", self.class_output, CLASS_OUTPUTS)
        positive_int("top_k", self.top_k)
        object.__setattr__(self, "levels", tuple(float(v) for v in self.levels))
        object.__setattr__(self, "beta_levels", tuple(float(v) for v in self.beta_levels))


@dataclass(frozen=True)
class RunOptions:
    """How the calibration runs."""

    batch_size: int = option(64, "images per batch")
    num_workers: int = option(0, "DataLoader worker processes")
    backend: str = option(Execution.backend, help_of(Execution, "backend"))  # the monitor's option
    amp: bool = option(
        False, "run the model under autocast (float16 on CUDA, bfloat16 on CPU); alpha in float32"
    )
    inference_mode: bool = option(
        True, "run the layers before the target layer in torch.inference_mode"
    )
    approximate: bool | LogGrid = option(
        False,
        "fixed-grid histograms instead of exact percentiles of spilled alpha: memory independent "
        "of the number of images, nothing spilled (the grid: a LogGrid, or --sketch-accuracy "
        "and --sketch-range)",
    )
    memory_budget_bytes: int = option(256 << 20, "working memory of the per-class statistics")
    spill_dir: str | Path | None = option(
        None, "where alpha is streamed, kept afterwards (default: a temporary folder)"
    )
    merge: str = option(
        "auto", "how ranks combine their rows: auto (a shared folder when there is one) or send"
    )

    def __post_init__(self) -> None:
        positive_int("batch_size", self.batch_size)
        one_of("merge", self.merge, MERGES)
        non_negative_int("num_workers", self.num_workers)


@dataclass(frozen=True)
class CheckpointOptions:
    """A resumable run: alpha spilled to ``dir`` and progress committed every ``every`` batches."""

    dir: str | Path = option(
        help="the checkpoint folder: alpha is spilled there and progress committed, so a "
        "killed run can resume"
    )
    resume: bool = option(
        False,
        "continue the checkpoint's run (refused if it was made with other settings or data)",
    )
    every: int = option(100, "batches between checkpoints")

    def __post_init__(self) -> None:
        positive_int("checkpoint.every", self.every)


@dataclass(frozen=True)
class AlarmOptions:
    """The per-input alarm's part of the table."""

    enabled: bool = option(
        True, "calibrate the alarm (profile grids, score reference, the held-out null)"
    )
    profile_layers: str | Sequence[str] = option(
        "auto",
        "the activation-profile layers: auto (the first stages), none, or module names "
        "(comma-separated on the command line)",
    )
    head_layer: str = option(
        "auto",
        "the layer of the score's Mahalanobis component: auto (the last feature map), none "
        "or a module name",
    )
    reference_images: int = option(
        DEFAULT_REFERENCE_IMAGES,
        "training images (evenly spaced) behind the profile grids, the head statistics and the "
        "score reference",
    )
    class_null_min: int = option(
        DEFAULT_CLASS_NULL_MIN,
        "held-out images a class needs for a conformal null of its own (Mondrian p-values: "
        "each class's alarm rate holds); classes with fewer use the pooled null (0: pooled only)",
    )
    score: str = option(
        AUTO_SCORE,
        f"the alarm's score: {GATED_SCORE_NAME} (inputs whose stage distances lie beyond all but "
        "one in a hundred training images' first, then the class evidence: bench/README.md), "
        f"{FISHER_SCORE_NAME} (Fisher's combination of the filter profile's components, the "
        f"score before issue 20) or auto (the first where the reference images number at least "
        f"{STAGE_IMAGES_PER_CHANNEL}x the tapped layers' channels, else the second)",
        choices=(*SCORES, AUTO_SCORE),
    )
    evidence: str = option(
        PREFERRED,
        f"the class evidence of the {GATED_SCORE_NAME} score: "
        + ", ".join(EVIDENCE_VARIANTS)
        + f", auto (chosen on shifts of the first {CHOICE_IMAGES} held-out images, which the "
        f"null then leaves out) or {PREFERRED} ({DEFAULT_VARIANT} where the table has a KNN "
        f"bank, else auto; either way {DEFAULT_EVIDENCE} when the held-out data has fewer than "
        f"{AUTO_MIN_HELDOUT} images). {LEARNED_EVIDENCE}: energy and a logistic regression over "
        f"every component's two-sided tail ranks, fitted on those shifts; {LEARNED_WITH_MASS}: "
        "the same and the expectation mass; the +knn variants add the nearest-neighbour "
        "distance (a table with a KNN bank)",
        choices=(*EVIDENCE_VARIANTS, AUTO_EVIDENCE, PREFERRED),
    )
    knn_bank: int = option(
        BANK,
        f"training images whose head-layer features the {GATED_SCORE_NAME} score keeps for its "
        f"nearest-neighbour component (the distance to the {NEIGHBOUR}th nearest; taken evenly "
        "from the reference images' half behind the head statistics); 0: no such component "
        "and no +knn evidence variant",
    )
    gate_level: float = option(
        GATE_LEVEL,
        f"the {GATED_SCORE_NAME} score's gate: the share of the reference images whose stage "
        "distances open it (ranked first). At the alarm rate you run, the gate takes about this "
        "share of the alarms, the class evidence the rest: a level below the alarm rate (e.g. "
        "half) leaves near shifts (rotations, occlusion, contrast) more of them and far ones a "
        "little less (bench/README.md, 'The gate's level')",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "gate_level", fraction("gate_level", self.gate_level))
        positive_int("reference_images", self.reference_images)
        non_negative_int("class_null_min", self.class_null_min)
        non_negative_int("knn_bank", self.knn_bank)
        one_of("score", self.score, (*SCORES, AUTO_SCORE))
        one_of("evidence", self.evidence, (*EVIDENCE_VARIANTS, AUTO_EVIDENCE, PREFERRED))

    @classmethod
    def of(cls, alarm: AlarmOptions | bool) -> AlarmOptions:
        """``calibrate(alarm=...)``: options, or ``True`` / ``False`` for the defaults / none."""
        if isinstance(alarm, cls):
            return alarm
        if isinstance(alarm, bool):
            return cls(enabled=alarm)
        raise TypeError(f"alarm must be AlarmOptions or a bool, got {type(alarm).__name__}")
