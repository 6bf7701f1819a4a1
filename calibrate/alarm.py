"""The alarm's calibration, after the alpha table: profile grids, score reference, conformal nulls.

Three passes, each small next to the training pass (see :mod:`surprise_monitor.monitor.atypicality`
for the score and :mod:`surprise_monitor.monitor.conformal` for the p-values):

1. *Profile grids and head statistics*: the channel means of the activation-profile layers
   (:func:`surprise_monitor.monitor.probe.profiles.stage_layers` unless named) over the even
   positions of an evenly spaced subset of the training images (``reference_images`` of them at
   most), turned into percentile grids at the table's levels (``numpy.percentile``, linear), any
   class; and the channel means of the head layer
   (:func:`surprise_monitor.monitor.probe.profiles.head_layer` unless named) of the same images,
   turned into class means and the pseudo-inverse of their shared covariance (float64, with the
   images' true labels).
2. *Score reference*: the judge's components for the odd positions of that subset, judged
   against their true labels, as the table was made: they weight the components in the score.
   (Two halves, so no image is ranked against a grid it helped make.)
3. *Conformal nulls* (with ``heldout``): the score of every held-out image judged as deployed,
   against its predicted class, and against its true label.

With the gated score (``AlarmOptions(score=GATED_SCORE_NAME)``) pass 1 also fits each tapped
layer's channel-mean mean and shrunk covariance (the stage distances), and pass 2 also sets the
gate's threshold: the ``1 - gate_level`` quantile of the reference images' own gate statistics
(``AlarmOptions.gate_level``; :data:`~surprise_monitor.monitor.atypicality.GATE_LEVEL` unless
named). Pass 3 first judges the held-out images the evidence variant is chosen on
(``evidence="auto"``, :mod:`~surprise_monitor.calibrate.evidence_choice`) or a learned variant
is fitted on (``evidence="learned"``, ``"learned+knn"`` and the like, and ``"preferred"``,
the default: ``learned+knn`` where the table has a KNN bank, else ``auto``;
:mod:`~surprise_monitor.calibrate.evidence_fit`), as they are and shifted; the null leaves them
out.

Under ``torchrun`` rank 0 makes all three and broadcasts the result to the other ranks: the
tensors as tensors (:meth:`~surprise_monitor.calibrate.distributed.Comm.broadcast_tensors`), the
metadata as JSON.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from tqdm.auto import tqdm

from surprise_monitor.calibrate.distributed import Comm
from surprise_monitor.calibrate.evidence_choice import (
    AUTO_MIN_HELDOUT,
    CHOICE_IMAGES,
    PREFERRED,
    RULE,
    SHIFTS,
    choice_margins,
    margin_summary,
    pick,
    resolved,
)
from surprise_monitor.calibrate.evidence_fit import fit_learned_evidence
from surprise_monitor.calibrate.options import AlarmOptions, RunOptions
from surprise_monitor.calibrate.plan import split_batch, stream, stream_length
from surprise_monitor.calibrate.score_choice import AUTO_SCORE, choose_score, too_few_images
from surprise_monitor.monitor.atypicality import (
    DEFAULT_EVIDENCE,
    EXPONENTIAL_TAIL,
    FISHER_SCORE_NAME,
    GATE_LEVEL,
    GATED_SCORE_NAME,
    KNN_VARIANTS,
    ScoreReference,
    fit_stage,
)
from surprise_monitor.monitor.checks import OptionValueError
from surprise_monitor.monitor.judge import Judge
from surprise_monitor.monitor.knn_distance import KnnDistance
from surprise_monitor.monitor.learned_evidence import LEARNED_VARIANTS, LearnedEvidence
from surprise_monitor.monitor.options import Execution
from surprise_monitor.monitor.probe.hooks import get_module
from surprise_monitor.monitor.probe.profiles import DEFAULT_STAGES, ProfileTap, stage_layers
from surprise_monitor.monitor.probe.profiles import head_layer as head_layer_of
from surprise_monitor.monitor.table import CalibrationTable
from surprise_monitor.monitor.table_alarm import AlarmCalibration

log = logging.getLogger(__name__)

#: Fewer images than this behind a class's head mean draw a warning.
THIN_CLASS = 10
#: ``profile_layers`` values: pick the first stages, or monitor the final layer alone.
AUTO, NONE = "auto", "none"


def alarm_calibration(
    model: nn.Module,
    table: CalibrationTable,
    data: DataLoader | Dataset,
    heldout: DataLoader | Dataset | None,
    options: AlarmOptions | None = None,
    *,
    run: RunOptions | None = None,
    device: torch.device,
    backend: str | None = None,
    progress: bool = True,
    heldout_source: dict[str, Any] | None = None,
    comm: Comm | None = None,
) -> AlarmCalibration:
    """The alarm part of ``table`` (see the module docstring); the same on every rank.

    ``options``: the profile and head layers, the reference images (``None``: the defaults);
    ``run``: the batch size and workers of the passes (``None``: the defaults); ``backend``:
    the kernel backend (``None``: ``run.backend``); ``heldout_source``: where the held-out
    images came from (kept in the table)."""
    options = options if options is not None else AlarmOptions()
    run_options = run if run is not None else RunOptions()
    backend = backend if backend is not None else run_options.backend
    if comm is not None and comm.info.distributed:
        mine = None
        if comm.info.rank == 0:
            mine = _payload(
                alarm_calibration(
                    model,
                    table,
                    data,
                    heldout,
                    options,
                    run=run_options,
                    device=device,
                    backend=backend,
                    progress=progress,
                    heldout_source=heldout_source,
                )  # fmt: skip
            )
        return _shared(comm, mine)
    batch_size, num_workers = run_options.batch_size, run_options.num_workers
    images = _ReferenceImages(data, options.reference_images, batch_size, num_workers)
    layers = _profile_layers(model, table, options.profile_layers, images, device)
    head = _head_layer(model, options.head_layer, layers, images, device)
    passes = {"batch_size": batch_size, "num_workers": num_workers, "device": device}
    grids, head_means, head_precision, stage, head_rows = _profile_grids(
        model, layers, head, _counted(images.half(0), images.size(0), "profile grids", progress),
        table.levels, num_classes=table.num_classes,
        stage=options.score in (GATED_SCORE_NAME, AUTO_SCORE), **passes,
    )  # fmt: skip
    options = _with_score(options, stage, images.size(0))
    alarm = AlarmCalibration(
        options.score, tuple(layers), grids, None, images.count, head_layer=head,
        head_means=head_means, head_precision=head_precision, **_stage_fields(options, stage),
        knn=knn_bank(options, head_rows),
    )  # fmt: skip
    with_grids = replace(table, alarm=alarm, path=None, sha256="")
    odd = _counted(images.half(1), images.size(1), "score reference", progress)
    alarm = _with_reference(alarm, _components(model, with_grids, odd, backend, **passes))
    if heldout is None:
        log.info("calibrate: no held-out images: the table has no conformal null (no alarms)")
        return alarm
    return _with_heldout(
        model, table, alarm, heldout, options, backend, progress, heldout_source, passes
    )


def _with_heldout(
    model: nn.Module,
    table: CalibrationTable,
    alarm: AlarmCalibration,
    heldout: DataLoader | Dataset,
    options: AlarmOptions,
    backend: str,
    progress: bool,
    heldout_source: dict[str, Any] | None,
    passes: dict[str, Any],
) -> AlarmCalibration:
    """``alarm`` with its conformal nulls from ``heldout`` (pass 3), and with
    ``evidence="auto"`` the evidence variant chosen on the first held-out images' shifts (a
    learned variant, ``"preferred"`` included, fitted on them)."""
    with_reference = replace(table, alarm=alarm, path=None, sha256="")
    evidence = resolved(options.evidence, alarm.knn is not None)
    auto = alarm.gated and evidence == AUTO
    learn = alarm.gated and evidence in LEARNED_VARIANTS
    length = stream_length(heldout)
    too_few = (auto or learn) and (length or AUTO_MIN_HELDOUT) < AUTO_MIN_HELDOUT
    if learn and too_few and options.evidence != PREFERRED:
        raise OptionValueError(
            "evidence",
            f"another variant than {options.evidence!r} (fitted on {CHOICE_IMAGES} held-out "
            f"images, with as many again for the null) for held-out data of {length} images, "
            f"fewer than {AUTO_MIN_HELDOUT}",
            options.evidence,
        )
    predicted, labelled, accuracy, classes, choice, ranks = _heldout_scores(
        model, with_reference, heldout, backend, progress, **passes,
        choice_images=CHOICE_IMAGES if (auto or learn) and not too_few else 0,
    )  # fmt: skip
    found = {"images": int(predicted.numel()), "accuracy": accuracy, "source": heldout_source}
    if too_few:
        how = "automatic choice" if auto else f"fit of the {evidence} evidence"
        why = (
            f"the held-out data has {length} images, fewer than the "
            f"{AUTO_MIN_HELDOUT} the {how} needs: evidence {alarm.evidence}"
        )
        log.warning("calibrate: %s", why)
        found["evidence_choice"] = {"skipped": why, "asked": options.evidence}
    if choice is not None:
        asked = evidence if learn else None
        alarm, predicted, labelled, margins = _with_chosen_evidence(alarm, choice, asked)
        found["evidence_choice"] = {"images": CHOICE_IMAGES, "shifts": list(SHIFTS),
                                    "rule": RULE, **margins, "asked": options.evidence,
                                    "resolved": evidence}  # fmt: skip
    log.info(
        "calibrate: conformal null from %d held-out images (accuracy %.4f)",
        predicted.numel(), accuracy,
    )  # fmt: skip
    per_class = None
    if options.class_null_min > 0:
        per_class = (*classes, table.num_classes, options.class_null_min)
    alarm = alarm.with_nulls(predicted, labelled, found, per_class, ranks)
    _warn_pooled_classes(alarm)
    return alarm


# ----------------------------------------------------------------------- the images
def evenly_spaced(total: int, limit: int) -> np.ndarray:
    """At most ``limit`` distinct positions of ``range(total)``, evenly spaced, ascending (all
    of them when ``limit >= total``)."""
    return np.unique(np.linspace(0, total - 1, min(limit, total)).round().astype(int))


class _ReferenceImages:
    """An evenly spaced subset of the training data (the first images of an iterable one)."""

    def __init__(
        self, data: DataLoader | Dataset, limit: int, batch_size: int, num_workers: int
    ) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 2:
            raise ValueError(f"reference_images must be an integer >= 2, got {limit!r}")
        self.dataset = data.dataset if isinstance(data, DataLoader) else data
        self.batch_size = data.batch_size if isinstance(data, DataLoader) else batch_size
        self.batch_size = int(self.batch_size or batch_size)
        self.num_workers = num_workers
        self.collate = data.collate_fn if isinstance(data, DataLoader) else None
        total = stream_length(data)
        if isinstance(self.dataset, IterableDataset) or total is None:
            self.indices = None
            self.count = limit
        else:
            picked = evenly_spaced(total, limit)
            self.indices = picked
            self.count = int(picked.size)

    def size(self, part: int) -> int:
        """Images in :meth:`half` ``part`` (of an iterable dataset: at most that many)."""
        if self.indices is None:
            return (self.count + 1 - part) // 2
        return int(self.indices[part::2].size)

    def half(self, part: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The images at even (``part=0``) or odd (``1``) positions of the subset, batched."""
        if self.indices is None:  # iterable: the first images, alternating
            seen = 0
            for x, y, _ in stream(self.dataset, self.batch_size, self.num_workers):
                keep = (torch.arange(seen, seen + len(x)) % 2) == part
                keep &= torch.arange(seen, seen + len(x)) < self.count
                seen += len(x)
                if keep.any():
                    yield x[keep], torch.as_tensor(y)[keep]
                if seen >= self.count:
                    return
            return
        subset = Subset(self.dataset, self.indices[part::2].tolist())
        kwargs: dict[str, Any] = {"batch_size": self.batch_size, "num_workers": self.num_workers}
        if self.collate is not None:
            kwargs["collate_fn"] = self.collate
        for x, y, _ in stream(DataLoader(subset, shuffle=False, **kwargs), 0, 0):
            yield x, torch.as_tensor(y)


def _counted(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    images: int | None,
    desc: str,
    progress: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``batches``, counted on a progress bar of ``images`` images (its total)."""
    with tqdm(total=images, desc=desc, unit="img", disable=not progress) as bar:
        for x, y in batches:
            yield x, y
            bar.update(len(x))


def _heldout_batches(
    heldout: DataLoader | Dataset, batch_size: int, num_workers: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The held-out images with their labels, batched (in any order)."""
    if isinstance(heldout, Dataset) and not isinstance(heldout, DataLoader):
        heldout = DataLoader(heldout, batch_size=batch_size, num_workers=num_workers)
    if not isinstance(heldout, DataLoader):
        raise TypeError(
            f"heldout must be a torch DataLoader or Dataset, got {type(heldout).__name__}"
        )
    for batch in heldout:
        x, y, _ = split_batch(batch, None)
        yield x, torch.as_tensor(y)


# ------------------------------------------------------------------------ the passes
def _profile_layers(
    model: nn.Module,
    table: CalibrationTable,
    wanted: str | Sequence[str],
    images: _ReferenceImages,
    device: torch.device,
) -> list[str]:
    """The profile layers: the first stages (``"auto"``), none (``"none"``) or the names."""
    if isinstance(wanted, str) and wanted not in (AUTO, NONE):
        raise ValueError(
            f"profile_layers must be 'auto', 'none' or a list of module names, got {wanted!r}"
        )
    if wanted == NONE:
        return []
    if wanted != AUTO:
        layers = [str(n) for n in wanted]
        for name in layers:
            get_module(model, name)
        return layers
    x, _ = next(iter(images.half(0)))
    layers = stage_layers(model, x[:1].to(device), DEFAULT_STAGES, before=table.layer)
    log.info("calibrate: activation-profile layers %s (the first %d stages)", layers,
             DEFAULT_STAGES)  # fmt: skip
    return layers


def _head_layer(
    model: nn.Module,
    wanted: str,
    profile_layers: list[str],
    images: _ReferenceImages,
    device: torch.device,
) -> str:
    """The head layer: the last feature map (``"auto"``), none (``"none"``, ``""``) or the
    named module."""
    if not isinstance(wanted, str):
        raise ValueError(f"head_layer must be 'auto', 'none' or a module name, got {wanted!r}")
    if wanted in (NONE, ""):
        return ""
    if wanted != AUTO:
        get_module(model, wanted)
        name = wanted
    else:
        x, _ = next(iter(images.half(0)))
        name = head_layer_of(model, x[:1].to(device))
        log.info("calibrate: head layer %r (the last feature map before the classifier)", name)
    if name in profile_layers:
        raise ValueError(f"head layer {name!r} is also a profile layer; name another")
    return name


@torch.no_grad()
def _profile_grids(
    model: nn.Module,
    layers: list[str],
    head: str,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    levels: torch.Tensor,
    *,
    num_classes: int,
    stage: bool = False,
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> tuple[
    tuple[torch.Tensor, ...],
    torch.Tensor | None,
    torch.Tensor | None,
    list[tuple[torch.Tensor, torch.Tensor]],
    torch.Tensor | None,
]:
    """Each profile layer's ``[C, Q]`` percentile grid of channel means over ``batches``, the
    head layer's class means and shared precision (``None`` without a head), with ``stage``
    every tapped layer's stage statistics (:func:`fit_stage`: profile layers, then the head),
    and the head layer's channel means themselves ``[n, C]`` (the KNN bank's source; ``None``
    without a head)."""
    tapped = layers + ([head] if head else [])
    if not tapped:
        return (), None, None, [], None
    tap = ProfileTap(model, tapped)
    rows: list[list[np.ndarray]] = [[] for _ in tapped]
    labels: list[np.ndarray] = []
    try:
        for x, y in batches:
            with tap.armed() as record:
                model(x.to(device))
            for j, m in enumerate(tap.means(record)):
                rows[j].append(m.cpu().numpy())
            labels.append(y.cpu().numpy())
    finally:
        tap.close()
    means = []
    for name, parts in zip(tapped, rows, strict=True):
        means.append(np.concatenate(parts))
        if not np.isfinite(means[-1]).all():
            raise ValueError(f"layer {name!r} gave NaN or Inf channel means")
    lv = levels.double().cpu().numpy()
    grids = tuple(
        torch.from_numpy(np.percentile(m, lv, axis=0).T.astype(np.float32)).contiguous()
        for m in means[: len(layers)]
    )
    fits = [fit_stage(torch.from_numpy(m)) for m in means] if stage else []
    if not head:
        return grids, None, None, fits, None
    head_means, precision = fit_head(means[-1], np.concatenate(labels), num_classes)
    return grids, head_means, precision, fits, torch.from_numpy(means[-1])


def knn_bank(options: AlarmOptions, head_rows: torch.Tensor | None) -> KnnDistance | None:
    """The gated score's KNN bank: at most ``options.knn_bank`` of the head layer's channel
    means ``head_rows [n, C]``, evenly spaced, less those that are all 0 (``None`` for the
    Fisher score, without a head, with ``knn_bank`` 0 or with no nonzero row, the last with a
    warning; a named ``+knn`` variant of the gated score then is refused, naming why)."""
    if options.score != GATED_SCORE_NAME:
        return None
    if head_rows is None or options.knn_bank == 0:
        if options.evidence in KNN_VARIANTS:
            why = ("--knn-bank / knn_bank 0" if options.knn_bank == 0
                   else "no head layer: --head-layer / head_layer none")  # fmt: skip
            raise OptionValueError(
                "evidence", f"a variant without the KNN component ({why})", options.evidence
            )
        return None
    picked = evenly_spaced(int(head_rows.shape[0]), options.knn_bank)
    try:
        knn = KnnDistance.of(head_rows[torch.from_numpy(picked)])
    except ValueError as e:  # every picked image's head features are 0: nothing to be near
        if options.evidence in KNN_VARIANTS:
            raise OptionValueError("evidence", f"a variant without the KNN component ({e})",
                                   options.evidence) from e  # fmt: skip
        log.warning("calibrate: no KNN component: %s", e)
        return None
    log.info("calibrate: KNN bank of %d training images' head features (the %dth nearest)",
             knn.bank.shape[0], knn.k)  # fmt: skip
    return knn


def _with_score(
    options: AlarmOptions, stage: list[tuple[torch.Tensor, torch.Tensor]], images: int
) -> AlarmOptions:
    """``options`` with the score :func:`~surprise_monitor.calibrate.score_choice.choose_score`
    takes (said in the log; a warning where ``auto`` falls back to the Fisher score)."""
    channels = [int(mean.numel()) for mean, _ in stage]
    score, why = choose_score(options.score, channels, images)
    thin = too_few_images(channels, images) if channels else None
    if options.score == AUTO_SCORE:
        say = log.warning if score == FISHER_SCORE_NAME else log.info
        say("calibrate: alarm score %s (--alarm-score auto): %s", score, why)
    elif score == GATED_SCORE_NAME and thin is not None:
        log.warning("calibrate: %s", thin)
    if score == FISHER_SCORE_NAME:
        _warn_unused_gated_options(options)
    return replace(options, score=score)


def _warn_unused_gated_options(options: AlarmOptions) -> None:
    """Warn where options of the gated score were set for a table of the Fisher score (they
    do nothing there)."""
    unused = []
    if options.gate_level != GATE_LEVEL:
        unused.append(f"--gate-level / gate_level {options.gate_level:g}")
    if options.evidence != PREFERRED:
        unused.append(f"--alarm-evidence / evidence {options.evidence}")
    if unused:
        log.warning(
            "calibrate: %s: the %s score has no gate or class-evidence variant, so this does "
            "nothing", " and ".join(unused), FISHER_SCORE_NAME,
        )  # fmt: skip


def _stage_fields(
    options: AlarmOptions, stage: list[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, Any]:
    """The gated score's fields of the alarm part (its evidence variant and each tapped
    layer's stage statistics ``stage``); none for the Fisher score."""
    if options.score != GATED_SCORE_NAME:
        return {}
    if not stage:
        raise ValueError(
            f"the {GATED_SCORE_NAME} score needs profile or head layers; without them use "
            f"score={FISHER_SCORE_NAME!r}"
        )
    evidence = options.evidence
    if evidence in (AUTO, PREFERRED) or evidence in LEARNED_VARIANTS:  # until chosen
        evidence = DEFAULT_EVIDENCE
    return {"evidence": evidence, "stage_means": tuple(m for m, _ in stage),
            "stage_precisions": tuple(p for _, p in stage),
            "gate_level": options.gate_level}  # fmt: skip


def _with_chosen_evidence(
    alarm: AlarmCalibration, choice: _Choice, asked: str | None = None
) -> tuple[AlarmCalibration, torch.Tensor, torch.Tensor, dict[str, dict[str, float]]]:
    """``alarm`` with the evidence variant chosen on the held-out images' shifts (or
    ``asked``, a learned variant), fitted where it is a learned one, the null images' scores
    (predicted, labelled) in that variant, and each variant's worst and mean margins."""
    margins = choice.margins(alarm)
    variant = pick(margins) if asked is None else asked
    summary = margin_summary(margins)
    log.info("calibrate: evidence %s %s on %d held-out images and %d shifts (mean / worst "
             "margin against the best logit score: %s); they are left out of the null",
             variant, "fitted" if asked else "chosen", CHOICE_IMAGES, len(SHIFTS),
             ", ".join(f"{v} {summary['mean_margin'][v]:+.3f} / {m:+.3f}"
                       for v, m in summary["worst_margin"].items()))  # fmt: skip
    learned = choice.fitted(alarm) if variant in LEARNED_VARIANTS else None
    alarm = replace(alarm, evidence=variant, learned=learned)
    gate = alarm.gate()
    assert gate is not None and choice.null_ranks is not None
    return alarm, gate.score(choice.null_ranks[0]), gate.score(choice.null_ranks[1]), summary


def _with_reference(alarm: AlarmCalibration, parts: torch.Tensor) -> AlarmCalibration:
    """``alarm`` with the score reference of the components ``parts [m, J]`` and, for the gated
    score, the gate's threshold at the ``1 - gate_level`` quantile of their own statistics."""
    reference = ScoreReference.of(parts, EXPONENTIAL_TAIL)
    alarm = replace(alarm, reference=reference)
    gate = alarm.gate()
    if gate is None:
        return alarm
    level = GATE_LEVEL if alarm.gate_level is None else alarm.gate_level
    threshold = gate.at_level(reference.ranks(parts.float()), level).threshold
    log.info("calibrate: %s score, evidence %s, gate at statistic %.3f (beyond %g of the "
             "reference images)", GATED_SCORE_NAME, alarm.evidence, threshold,
             level)  # fmt: skip
    return replace(alarm, gate_threshold=threshold)


def fit_head(
    features: np.ndarray, labels: np.ndarray, num_classes: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means ``[K', C]`` of ``features [n, C]`` (the ``K'`` classes in ``labels``) and the
    pseudo-inverse ``[C, C]`` of their shared covariance ``sum_i (f_i - m_y_i)(f_i - m_y_i)^T / n``
    (float64 arithmetic, float32 results). Warns about classes of ``range(num_classes)`` with
    no image (left out of the distance's minimum) or fewer than :data:`THIN_CLASS` images."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    _warn_thin_classes(np.bincount(y, minlength=num_classes))
    classes = np.unique(y)
    means = np.stack([f[y == k].mean(axis=0) for k in classes])
    centred = f - means[np.searchsorted(classes, y)]
    precision = np.linalg.pinv(centred.T @ centred / len(f), hermitian=True)
    return (
        torch.from_numpy(means.astype(np.float32)).contiguous(),
        torch.from_numpy(precision.astype(np.float32)).contiguous(),
    )


def _components(
    model: nn.Module,
    table: CalibrationTable,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    backend: str,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> torch.Tensor:
    """The judge's components ``[m, 1 + L]`` of training images judged against their labels."""
    judge = Judge(model, table, execution=Execution(backend=backend, check_fingerprint=False))
    parts = []
    try:
        for x, y in batches:
            parts.append(judge(x.to(device), y.to(device)).components)
    finally:
        judge.close()
    return torch.cat(parts)


def _heldout_scores(
    model: nn.Module,
    table: CalibrationTable,
    heldout: DataLoader | Dataset,
    backend: str,
    progress: bool,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    choice_images: int = 0,
) -> tuple[
    torch.Tensor, torch.Tensor, float, tuple[torch.Tensor, torch.Tensor], _Choice | None,
    tuple[torch.Tensor, torch.Tensor],
]:  # fmt: skip
    """Held-out scores judged against the predictions and against the labels, the model's
    accuracy on them (a second judgement only for the misclassified images), the classes
    they were judged against (``(predictions, labels)``), with ``choice_images`` the
    judgements of the first that many images, as they are and shifted
    (:mod:`~surprise_monitor.calibrate.evidence_choice`), which the null leaves out, and the
    null images' component tail ranks (against predictions, against labels)."""
    judge = Judge(model, table, execution=Execution(backend=backend, check_fingerprint=False))
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("p", "l", "pr", "lr", "c", "y")}
    choice = _Choice() if choice_images > 0 else None
    hits, taken = 0, 0
    try:
        batches = _counted(_heldout_batches(heldout, batch_size, num_workers),
                           stream_length(heldout), "held-out null", progress)  # fmt: skip
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            if choice is not None and taken < choice_images:
                k = min(choice_images - taken, len(x))
                choice.add(judge, x[:k])
                taken += k
                x, y = x[k:], y[k:]
                if not len(x):
                    continue
            report = judge(x)
            wrong = torch.nonzero(report.classes != y.cpu()).flatten()
            with_labels, label_ranks = report.score.clone(), report.component_ranks.clone()
            if wrong.numel():
                again = judge(x[wrong.to(device)], y[wrong.to(device)])
                with_labels[wrong], label_ranks[wrong] = again.score, again.component_ranks
            for key, v in (
                ("p", report.score),
                ("l", with_labels),
                ("pr", report.component_ranks),
                ("lr", label_ranks),
                ("c", report.classes.cpu()),
                ("y", y.cpu()),
            ):
                rows[key].append(v)  # fmt: skip
            hits += len(y) - int(wrong.numel())
    finally:
        judge.close()
    if not rows["p"]:
        raise ValueError("the held-out data is empty" + (" after the images the evidence "
                         "variant is chosen on" if choice is not None else ""))  # fmt: skip
    out = {k: torch.cat(v) for k, v in rows.items()}
    if choice is not None:
        choice.null_ranks = (out["pr"], out["lr"])
    classes = (out["c"].long(), out["y"].long())
    return out["p"], out["l"], hits / out["p"].numel(), classes, choice, (out["pr"], out["lr"])


class _Choice:
    """The judgements the evidence variant is chosen on: ``clean`` and per shift ``(ranks,
    logits)``; and the null images' ranks (predicted, labelled), to score them with the
    chosen variant."""

    def __init__(self) -> None:
        self.clean: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.shifted: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {
            name: [] for name in SHIFTS
        }
        self.null_ranks: tuple[torch.Tensor, torch.Tensor] | None = None

    def add(self, judge: Judge, x: torch.Tensor) -> None:
        """Judge ``x`` as it is and under every shift (against the predictions)."""
        r = judge(x)
        self.clean.append((r.component_ranks, r.logits))
        for name, shift in SHIFTS.items():
            r = judge(shift(x))
            self.shifted[name].append((r.component_ranks, r.logits))

    def margins(self, alarm: AlarmCalibration) -> dict[str, dict[str, float]]:
        """Every variant's margin on each shift
        (:func:`~surprise_monitor.calibrate.evidence_choice.choice_margins`)."""
        assert alarm.gate_threshold is not None
        shifted = {name: _cat(parts) for name, parts in self.shifted.items()}
        names, threshold = alarm.component_names(), alarm.gate_threshold
        return choice_margins(names, threshold, _cat(self.clean), shifted, _floor(alarm))

    def fitted(self, alarm: AlarmCalibration) -> LearnedEvidence:
        """The ``learned`` evidence fitted on every judged image (clean and shifted)."""
        shifted = {name: _cat(parts)[0] for name, parts in self.shifted.items()}
        return fit_learned_evidence(_cat(self.clean)[0], shifted, _floor(alarm))


def _cat(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The parts' ranks and logits, each concatenated."""
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _floor(alarm: AlarmCalibration) -> float:
    """The score reference's ``rank_floor`` (``1 / (m + 1)``; the learned evidence's features'
    clip)."""
    assert alarm.reference is not None
    return alarm.reference.rank_floor


def _warn_pooled_classes(alarm: AlarmCalibration) -> None:
    """Log which classes have too few held-out images for a null of their own (their alarms
    use the pooled null, whose rate holds only on average over the classes)."""
    for name, per_class in (("predicted as", alarm.class_null_predicted),
                            ("labelled", alarm.class_null_labelled)):  # fmt: skip
        if per_class is None:
            continue
        pooled = per_class.pooled_classes()
        if pooled:
            log.warning(
                "calibrate: class(es) %s have fewer than %d held-out images %s them: their "
                "alarms use the pooled null, whose alarm rate holds only on average over the "
                "classes; add held-out images (--heldout) or lower --class-null-min / "
                "class_null_min",
                shortened(pooled), per_class.min_size, name,
            )  # fmt: skip


def _warn_thin_classes(counts: np.ndarray) -> None:
    """Log which classes the head's class means lack or rest on few images."""
    missing = [int(k) for k in np.flatnonzero(counts == 0)]
    thin = [int(k) for k in np.flatnonzero((counts > 0) & (counts < THIN_CLASS))]
    if missing:
        log.warning(
            "calibrate: the head distance has no mean for class(es) %s (no reference image of "
            "theirs in the even half); raise --reference-images / reference_images",
            shortened(missing),
        )  # fmt: skip
    if thin:
        log.warning(
            "calibrate: the head distance's mean of class(es) %s rests on fewer than %d images; "
            "raise --reference-images / reference_images",
            shortened(thin), THIN_CLASS,
        )  # fmt: skip


def shortened(items: Sequence[object], shown: int = 10) -> str:
    """The first ``shown`` items joined by commas, and how many more (for log messages)."""
    head = ", ".join(str(i) for i in items[:shown])
    return head + (f" and {len(items) - shown} more" if len(items) > shown else "")


# ---------------------------------------------------------------------- across ranks
def _payload(alarm: AlarmCalibration) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The alarm part as the table file holds it: its metadata and its tensors."""
    return alarm.metadata(), alarm.tensors()


def _shared(
    comm: Comm, mine: tuple[dict[str, Any], dict[str, torch.Tensor]] | None
) -> AlarmCalibration:
    """Rank 0's alarm part (its :func:`_payload`; ``None`` on the other ranks) on every rank:
    the metadata as JSON, the tensors bit for bit by ``broadcast``."""
    meta = comm.broadcast_json(None if mine is None else mine[0], 0)
    tensors = comm.broadcast_tensors(None if mine is None else mine[1], 0)
    return AlarmCalibration.from_file(meta, tensors)
