"""``calibrate()``: run a model over its training data and build the :class:`CalibrationTable`.

One process or many (``torchrun``; see :mod:`surprise_monitor.calibrate.distributed`), resumable
from a checkpoint (:mod:`surprise_monitor.calibrate.checkpoint`), exact (alpha spilled to disk) or
approximate (fixed-grid histograms): see :mod:`surprise_monitor.calibrate.accumulators`. The steps:
plan the batches (:mod:`surprise_monitor.calibrate.plan`), compute each batch's alpha
(:mod:`surprise_monitor.calibrate.alpha`), accumulate it, then turn every rank's rows into per-class
statistics and the table.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from surprise_monitor.calibrate import checkpoint as ckpt
from surprise_monitor.calibrate import distributed
from surprise_monitor.calibrate.accumulators import Accumulator, make_accumulator
from surprise_monitor.calibrate.alarm import DEFAULT_REFERENCE_IMAGES, alarm_calibration, shortened
from surprise_monitor.calibrate.alpha import BatchAlpha, RunMeta
from surprise_monitor.calibrate.distributed import DistInfo
from surprise_monitor.calibrate.plan import (
    BatchPlan,
    LoaderBatch,
    on_device,
    plan_for,
    stream,
    stream_length,
)
from surprise_monitor.calibrate.sketch import LogGrid
from surprise_monitor.calibrate.statistics import ClassStatistics
from surprise_monitor.calibrate.writer import BatchWriter, PendingBatch
from surprise_monitor.kernels._backend import resolve_backend
from surprise_monitor.monitor.fingerprint import layer_fingerprint, model_fingerprint
from surprise_monitor.monitor.loading.models import model_device
from surprise_monitor.monitor.probe.class_output import check_class_output
from surprise_monitor.monitor.probe.hooks import get_module
from surprise_monitor.monitor.table import (
    DEFAULT_BETA_LEVELS,
    DEFAULT_LEVELS,
    CalibrationTable,
    levels_with_required,
)

log = logging.getLogger(__name__)


def calibrate(
    model: nn.Module,
    data: DataLoader | Dataset,
    *,
    heldout: DataLoader | Dataset | None = None,
    layer: str | None = None,
    class_output: str = "logit",
    levels: Sequence[float] = DEFAULT_LEVELS,
    beta_levels: Sequence[float] = DEFAULT_BETA_LEVELS,
    top_k: int = 6,
    class_names: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    spill_dir: str | Path | None = None,
    memory_budget_bytes: int = 256 << 20,
    progress: bool = True,
    data_source: dict[str, Any] | None = None,
    backend: str = "auto",
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 100,
    amp: bool = False,
    approximate: bool | LogGrid = False,
    inference_mode: bool = True,
    merge: str = "auto",
    alarm: bool = True,
    profile_layers: str | Sequence[str] = "auto",
    head_layer: str = "auto",
    reference_images: int = DEFAULT_REFERENCE_IMAGES,
    heldout_source: dict[str, Any] | None = None,
) -> CalibrationTable:
    """Build the calibration table of ``model`` on training ``data`` with true labels.

    Args:
        model: the CNN, in eval mode (it is not modified).
        data: a DataLoader (or a Dataset, wrapped with ``batch_size``) yielding
            ``(images, labels)`` in index order, or ``(images, labels, indices)``.
        heldout: images of the same classes the network did not train on (a validation split), with
            labels: the alarm's conformal null (:mod:`surprise_monitor.calibrate.alarm`). Without it
            the table has the score but no null, and the monitor raises no alarms.
        layer: target module name; ``None`` picks the final convolution (see
            :func:`~surprise_monitor.monitor.probe.resolve_layer`; the reason is kept).
        class_output: the class output differentiated: logit, softmax or log_softmax.
        levels: percent levels of the alpha grid (the required tail levels are always added).
        top_k: exemplar images kept per (class, filter).
        spill_dir: where alpha values are streamed (kept afterwards); default: a temporary
            folder removed at the end.
        memory_budget_bytes: working memory for the per-class statistics.
        data_source: where the images came from (kept in the table for explanations).
        checkpoint_dir: make the run resumable: alpha is spilled there and progress is committed
            every ``checkpoint_every`` batches (see :mod:`surprise_monitor.calibrate.checkpoint`);
            ``resume`` continues it (refused if it was made with other settings or data).
        amp: run the model under autocast (float16 on CUDA, bfloat16 on CPU); alpha is still
            accumulated in float32.
        approximate: ``True`` or a :class:`~surprise_monitor.calibrate.sketch.LogGrid`:
            fixed-grid histograms instead of spilled rows (:mod:`.sketch`).
        inference_mode: run the layers before the target layer in ``torch.inference_mode``.
        merge: how ranks combine their data, ``"auto"`` or ``"send"`` (:mod:`.distributed`).
        alarm: also calibrate the alarm (profile grids, score reference, null of ``heldout``).
        profile_layers: the alarm's activation-profile layers: ``"auto"`` (the first stages),
            ``"none"`` or module names. ``head_layer``: the layer of the score's Mahalanobis
            component: ``"auto"`` (the last feature map), ``"none"`` or a module name.
            ``reference_images``: training images behind them.

    Under ``torchrun`` each rank computes its share of the batches and every rank returns the
    same table, identical to a one-process run's. Alpha goes to disk as it is computed and
    statistics are computed class by class in filter blocks: memory does not grow with the data.
    """
    settings = _Settings(**{k: v for k, v in locals().items() if k != "data"})
    table = _alpha_table(model, data, settings)
    if alarm:
        table.alarm = alarm_calibration(
            model, table, data, heldout, profile_layers=profile_layers, head_layer=head_layer,
            reference_images=reference_images, batch_size=batch_size, num_workers=num_workers,
            device=settings.dev, backend=settings.resolved_backend, progress=progress,
            heldout_source=heldout_source, comm=distributed.Comm(distributed.current()),
        )  # fmt: skip
        table.validate()
    return table


@dataclass(frozen=True)
class _Settings:
    """:func:`surprise_monitor.calibrate`'s arguments but the data."""

    model: nn.Module
    heldout: Any
    layer: str | None
    class_output: str
    levels: Sequence[float]
    beta_levels: Sequence[float]
    top_k: int
    class_names: Sequence[str] | None
    device: str | torch.device | None
    batch_size: int
    num_workers: int
    spill_dir: str | Path | None
    memory_budget_bytes: int
    progress: bool
    data_source: dict[str, Any] | None
    backend: str
    checkpoint_dir: str | Path | None
    resume: bool
    checkpoint_every: int
    amp: bool
    approximate: bool | LogGrid
    inference_mode: bool
    merge: str
    alarm: bool
    profile_layers: str | Sequence[str]
    head_layer: str
    reference_images: int
    heldout_source: dict[str, Any] | None

    @property
    def dev(self) -> torch.device:
        """The calibration device: the argument, else the model's."""
        return torch.device(self.device) if self.device is not None else model_device(self.model)

    @property
    def resolved_backend(self) -> str:
        """The ``grad_amap`` backend for :attr:`dev`."""
        return resolve_backend("grad_amap", self.backend, self.dev)


def _alpha_table(model: nn.Module, data: DataLoader | Dataset, s: _Settings) -> CalibrationTable:
    """The alpha table (no alarm part): the training pass, its statistics, the table."""
    _check_arguments(model, s.class_output, s.top_k, s.checkpoint_every, s.spill_dir,
                     s.checkpoint_dir, s.resume)  # fmt: skip
    dev, info = s.dev, distributed.current()
    plan = _plan(data, s.batch_size, s.num_workers, dev, info, s.checkpoint_dir is not None)
    root = next((Path(d) for d in (s.checkpoint_dir, s.spill_dir) if d is not None), None)
    grid = LogGrid() if s.approximate is True else (s.approximate or None)
    backend = s.resolved_backend
    with _work_folder(root, info) as work:
        acc = make_accumulator(grid, work, top_k=s.top_k, root=root, merge=s.merge,
                               budget=s.memory_budget_bytes, progress=s.progress,
                               device=statistics_device(dev))  # fmt: skip
        prefix = {"amp": s.amp, "inference_mode": s.inference_mode}
        alpha = BatchAlpha(model, s.layer, s.class_output, dev, backend, **prefix)
        run = _RankPass(alpha, acc, info, plan)
        if s.checkpoint_dir is not None:
            settings = _settings(
                model, s.layer, s.class_output, plan, info, dev, s.amp, backend, acc
            )
            run.checkpoint = ckpt.Checkpoint(work, settings, info)
        run.collect(data, s.batch_size, s.num_workers, s.resume, s.checkpoint_every, s.progress)
        meta = run.shared_meta()
        levels_arr = levels_with_required(s.levels)
        beta_arr = levels_with_required(s.beta_levels)
        stats = acc.statistics(distributed.Comm(info), meta, levels_arr, beta_arr)
    names = _class_names(s.class_names, data, int(meta.num_classes or 0))
    return _table(meta, stats, model, names, s.data_source, s.class_output, levels_arr, beta_arr)


def statistics_device(dev: torch.device) -> torch.device | None:
    """Where the exact percentiles and exemplars are computed: torch on a GPU calibration device
    (same values as numpy's, see
    :func:`surprise_monitor.calibrate.statistics.sorted_block_statistics`), else numpy
    (``None``)."""
    return dev if dev.type == "cuda" else None


def _plan(
    data: DataLoader | Dataset,
    batch_size: int,
    num_workers: int,
    dev: torch.device,
    info: DistInfo,
    resumable: bool,
) -> BatchPlan | None:
    """The data's batch plan (``None``: streamed as given); ``ValueError`` when a distributed or
    resumable run gets data it cannot plan."""
    plan = plan_for(data, batch_size, num_workers, pin=dev.type == "cuda")
    if plan is None and (info.distributed or resumable):
        raise ValueError(
            "distributed or resumable calibration needs a map-style dataset read in index "
            "order (a Dataset, or a DataLoader with shuffle=False and a batch_size)"
        )
    return plan


def _check_arguments(
    model: nn.Module,
    class_output: str,
    top_k: int,
    checkpoint_every: int,
    spill_dir: str | Path | None,
    checkpoint_dir: str | Path | None,
    resume: bool,
) -> None:
    """``ValueError`` for arguments that cannot work together or a model in training mode."""
    check_class_output(class_output)
    if top_k < 1:
        raise ValueError("top_k must be at least 1")
    if checkpoint_every < 1:
        raise ValueError("checkpoint_every must be at least 1")
    if model.training:
        raise ValueError(
            "calibrate needs the model in eval mode (model.eval()): in training mode batch "
            "statistics couple the samples and dropout is random"
        )
    if checkpoint_dir is not None and spill_dir is not None:
        raise ValueError("give spill_dir or checkpoint_dir, not both (a checkpoint is a spill)")
    if resume and checkpoint_dir is None:
        raise ValueError("resume needs checkpoint_dir")


@contextmanager
def _work_folder(root: Path | None, info: DistInfo) -> Iterator[Path]:
    """This rank's folder under ``root`` (created), or a temporary one removed at the end."""
    if root is None:
        with tempfile.TemporaryDirectory(prefix="surprise-spill-") as tmp:
            yield Path(tmp)
        return
    work = distributed.shard_dir(root, info)
    work.mkdir(parents=True, exist_ok=True)
    yield work


@dataclass
class _RankPass:
    """One rank's pass over its batches: alpha, accumulator, checkpoints."""

    alpha: BatchAlpha
    accumulator: Accumulator
    info: DistInfo
    plan: BatchPlan | None
    checkpoint: ckpt.Checkpoint | None = None
    done: int = 0  # this rank's batches in the accumulator

    def collect(
        self,
        data: DataLoader | Dataset,
        batch_size: int,
        num_workers: int,
        resume: bool,
        every: int,
        progress: bool,
    ) -> None:
        """Open the checkpoint (resuming it) or start afresh, then accumulate this rank's
        batches; the probe's hooks are removed at the end, whatever happens."""
        try:
            if self.checkpoint is not None:
                self._resume(resume)
            else:
                self.accumulator.reset()  # a reused spill folder starts empty
            batches, total = _batches(self, data, batch_size, num_workers)
            self.accumulate(batches, total, every, progress)
        finally:
            self.alpha.close()

    def _resume(self, resume: bool) -> None:
        """Continue the checkpoint when there is one (``resume`` must say so)."""
        assert self.checkpoint is not None
        resumed = self.checkpoint.open(resume)
        if resumed is None:  # data written before any checkpoint is not trusted
            self.accumulator.reset()
            return
        self.alpha.meta = RunMeta.from_json(resumed.meta)
        if self.alpha.meta is not None:
            self.accumulator.restore(self.alpha.meta, resumed.accumulator)
        self.done = resumed.batches_done

    def accumulate(
        self, batches: Iterator[LoaderBatch], total: int | None, every: int, progress: bool
    ) -> None:
        """Compute and accumulate the alpha of the ``total`` images in ``batches``; commit
        every ``every`` batches and at the end. Each batch's alpha goes to the accumulator on a
        writer thread (:mod:`surprise_monitor.calibrate.writer`) while the next batch is
        computed."""
        bar = tqdm(
            total=total, unit="img", unit_scale=True, desc="calibrate",
            disable=not progress or self.info.rank != 0,
        )  # fmt: skip
        writer = BatchWriter(self._add)
        try:
            with bar:
                for x, y, idx in on_device(batches, self.alpha.device):
                    if len(x):
                        pending = self.alpha.compute(x, y, idx)
                        assert self.alpha.meta is not None
                        self.accumulator.start(self.alpha.meta)
                        writer.submit(pending)
                    self.done += 1
                    if self.checkpoint is not None and self.done % every == 0:
                        writer.drain()
                        self.commit(complete=False)
                    bar.update(len(x))
            writer.drain()
        finally:
            writer.close()
        if self.checkpoint is not None:
            self.commit(complete=True)

    def _add(self, pending: PendingBatch) -> None:
        """The writer thread's sink: check a batch on the host, then accumulate it."""
        alpha = self.alpha.check(pending)
        self.accumulator.add(alpha, pending.labels.numpy(), pending.indices)

    def commit(self, complete: bool) -> None:
        """Make the accumulator durable, then write the manifest that records it."""
        assert self.checkpoint is not None
        record = self.accumulator.commit(self.done)
        meta = None if self.alpha.meta is None else self.alpha.meta.as_json()
        self.checkpoint.commit(self.done, complete, meta, record)
        self.accumulator.committed(record)

    def shared_meta(self) -> RunMeta:
        """Rank 0's meta on every rank (each rank's own must agree with it)."""
        mine = None if self.alpha.meta is None else self.alpha.meta.as_json()
        shared = distributed.Comm(self.info).broadcast_json(mine, 0)
        meta = RunMeta.from_json(shared)  # type: ignore[arg-type]
        if meta is None or meta.num_classes is None:
            raise ValueError("calibration data is empty")
        if mine is not None and mine != shared:
            raise ValueError(f"rank {self.info.rank} saw {mine}, rank 0 {shared}")
        return meta


def _batches(
    run: _RankPass, data: DataLoader | Dataset, batch_size: int, num_workers: int
) -> tuple[Iterator[LoaderBatch], int | None]:
    """The batches this rank still has to compute (planned data) or all of them (streamed), and
    how many images they hold, if known."""
    if run.plan is None:
        return stream(data, batch_size, num_workers), stream_length(data)
    todo = run.plan.batches_of(run.info)[run.done :]
    mine = run.plan.images_in(todo)
    run.accumulator.expect(run.plan.num_images, mine)
    return run.plan.read(todo), mine


def _settings(
    model: nn.Module,
    layer: str | None,
    class_output: str,
    plan: BatchPlan | None,
    info: DistInfo,
    dev: torch.device,
    amp: bool,
    backend: str,
    accumulator: Accumulator,
) -> dict[str, Any]:
    """What decides the accumulated values: a checkpoint made with anything else is refused."""
    assert plan is not None  # resumable runs always have one
    return {
        "model_fingerprint": model_fingerprint(model),
        "layer": layer,
        "class_output": class_output,
        "batch_size": plan.batch_size,
        "drop_last": plan.drop_last,
        "num_images": plan.num_images,
        "data": ckpt.dataset_fingerprint(plan.dataset),
        "world_size": info.world_size,
        "rank": info.rank,
        "device": dev.type,
        "amp": bool(amp),
        "backend": backend,
        "torch": torch.__version__,
        "mode": accumulator.mode,
        **accumulator.settings(),
    }


def _table(
    meta: RunMeta,
    stats: list[ClassStatistics],
    model: nn.Module,
    names: list[str],
    data_source: dict[str, Any] | None,
    class_output: str,
    levels: np.ndarray,
    beta_levels: np.ndarray,
) -> CalibrationTable:
    """The table of the run's statistics; warns about classes without images."""
    k = len(names)
    table = CalibrationTable(
        layer=meta.layer,
        layer_reason=meta.layer_reason,
        levels=torch.from_numpy(levels),
        quantiles=torch.from_numpy(np.stack([s.quantiles for s in stats])),
        mean=torch.from_numpy(np.stack([s.mean for s in stats])),
        counts=torch.tensor([s.count for s in stats], dtype=torch.int64),
        beta_levels=torch.from_numpy(beta_levels),
        beta_quantiles=torch.from_numpy(np.stack([s.beta_quantiles for s in stats])),
        top_indices=torch.from_numpy(np.stack([s.top_indices for s in stats]).astype(np.int32)),
        top_alpha=torch.from_numpy(np.stack([s.top_alpha for s in stats])),
        class_names=names,
        class_output=class_output,
        input_shape=tuple(meta.input_shape),
        model_fingerprint=model_fingerprint(model),
        layer_fingerprint=layer_fingerprint(get_module(model, meta.layer)),
        data_source=data_source,
    )
    missing = [names[c] for c in range(k) if int(table.counts[c]) == 0]
    if missing:
        log.warning(
            "calibrate: no images for %d classes (%s); they will not be flagged",
            len(missing),
            shortened(missing),
        )
    return table


def _class_names(given: Sequence[str] | None, data: DataLoader | Dataset, k: int) -> list[str]:
    """The caller's class names, else the dataset's ``classes``, else the class numbers."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if given is not None:
        if len(given) != k:
            raise ValueError(f"{len(given)} class names for a model with {k} classes")
        return [str(n) for n in given]
    found = getattr(dataset, "classes", None)
    if found is not None and len(found) == k:
        return [str(n) for n in found]
    return [str(i) for i in range(k)]
