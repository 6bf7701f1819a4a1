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
from dataclasses import MISSING, dataclass, fields
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
from surprise_monitor.calibrate.alarm import alarm_calibration, shortened
from surprise_monitor.calibrate.alpha import BatchAlpha, RunMeta
from surprise_monitor.calibrate.degenerate import check_spread
from surprise_monitor.calibrate.distributed import DistInfo
from surprise_monitor.calibrate.options import (
    AlarmOptions,
    CheckpointOptions,
    RunOptions,
    TableOptions,
)
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
from surprise_monitor.monitor.options import renamed_keywords
from surprise_monitor.monitor.probe.hooks import get_module
from surprise_monitor.monitor.table import CalibrationTable, levels_with_required

log = logging.getLogger(__name__)

#: The keywords of 0.1 each option group replaced: ``calibrate(batch_size=...)`` is refused
#: with a ``TypeError`` naming ``run=RunOptions(batch_size=...)``. Old keyword -> the option.
_GROUPED: dict[str, tuple[str, type, str]] = {
    **{k: ("table", TableOptions, k) for k in (
        "class_output", "levels", "beta_levels", "top_k", "class_names", "data_source",
        "heldout_source",
    )},
    "score": ("table", TableOptions, "class_output"),
    **{k: ("run", RunOptions, k) for k in (
        "batch_size", "num_workers", "backend", "amp", "inference_mode", "approximate",
        "memory_budget_bytes", "spill_dir", "merge",
    )},
    "checkpoint_dir": ("checkpoint", CheckpointOptions, "dir"),
    "resume": ("checkpoint", CheckpointOptions, "resume"),
    "checkpoint_every": ("checkpoint", CheckpointOptions, "every"),
    **{k: ("alarm", AlarmOptions, k) for k in (
        "profile_layers", "head_layer", "reference_images",
    )},
}  # fmt: skip


def _spelling(group: str, cls: type, name: str) -> str:
    """How an option is given now, e.g. ``checkpoint=CheckpointOptions(dir=..., every=...)``
    (the group's required options first)."""
    required = [
        f.name
        for f in fields(cls)
        if f.default is MISSING and f.default_factory is MISSING and f.name != name
    ]
    given = ", ".join(f"{n}=..." for n in (*required, name))
    return f"{group}={cls.__name__}({given})"


@renamed_keywords({old: _spelling(*new) for old, new in _GROUPED.items()})
def calibrate(
    model: nn.Module,
    data: DataLoader | Dataset,
    *,
    heldout: DataLoader | Dataset | None = None,
    layer: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    table: TableOptions | None = None,
    run: RunOptions | None = None,
    checkpoint: CheckpointOptions | None = None,
    alarm: AlarmOptions | bool = True,
) -> CalibrationTable:
    """Build the calibration table of ``model`` on training ``data`` with true labels.

    Args:
        model: the CNN, in eval mode (it is not modified).
        data: a DataLoader (or a Dataset, wrapped with ``run.batch_size``) yielding
            ``(images, labels)`` in index order, or ``(images, labels, indices)``.
        heldout: images of the same classes the network did not train on (a validation split), with
            labels: the alarm's conformal null (:mod:`surprise_monitor.calibrate.alarm`). Without it
            the table has the score but no null, and the monitor raises no alarms.
        layer: target layer spec; ``None`` picks the feature map the classifier head reads,
            ``"final-conv"`` the paper's final convolution (see
            :func:`~surprise_monitor.monitor.probe.resolve_layer`; the reason is kept).
        device: where the model runs; ``None``: the model's device.
        progress: show progress bars.
        table: what the table holds (class output, grids, exemplars, class names, where the
            images came from): :class:`~surprise_monitor.calibrate.options.TableOptions`.
        run: how the run goes (batches, workers, backend, autocast, exact or approximate,
            memory, spill folder, merge across ranks):
            :class:`~surprise_monitor.calibrate.options.RunOptions`.
        checkpoint: make the run resumable (alpha spilled to ``checkpoint.dir``, progress
            committed every ``checkpoint.every`` batches, ``checkpoint.resume`` continues it;
            see :mod:`surprise_monitor.calibrate.checkpoint`):
            :class:`~surprise_monitor.calibrate.options.CheckpointOptions`.
        alarm: the alarm's part (profile grids, score reference, null of ``heldout``):
            :class:`~surprise_monitor.calibrate.options.AlarmOptions`, or ``True`` / ``False``
            for the defaults / none.

    Each option is documented once, in :mod:`surprise_monitor.calibrate.options`; the keywords
    of 0.1 (``batch_size=``, ``checkpoint_dir=``, ...) are refused with a ``TypeError`` that
    names their new spelling. Under ``torchrun`` each rank computes its share of the batches
    and every rank returns the same table, identical to a one-process run's. Alpha goes to disk
    as it is computed and statistics are computed class by class in filter blocks: memory does
    not grow with the data. A table whose alpha is constant for most filters (a zero-initialised
    or dead head, the wrong layer) is refused with a
    :class:`~surprise_monitor.calibrate.degenerate.DegenerateTableError` before the alarm's
    passes, unless ``table.allow_degenerate``.
    """
    job = _Job.of(model, layer, device, progress, table, run, checkpoint, alarm)
    result = _alpha_table(model, data, job)
    if job.alarm.enabled:
        result.alarm = alarm_calibration(
            model, result, data, heldout, job.alarm, run=job.run, device=job.device,
            backend=job.backend, progress=progress, heldout_source=job.table.heldout_source,
            comm=distributed.Comm(distributed.current()),
        )  # fmt: skip
        result.validate()
    return result


@dataclass(frozen=True)
class _Job:
    """One :func:`calibrate` call's option groups, whole, and what they resolve to here."""

    layer: str | None
    device: torch.device
    backend: str  # the grad_amap backend resolved for the device
    progress: bool
    table: TableOptions
    run: RunOptions
    checkpoint: CheckpointOptions | None
    alarm: AlarmOptions

    @classmethod
    def of(
        cls,
        model: nn.Module,
        layer: str | None,
        device: str | torch.device | None,
        progress: bool,
        table: TableOptions | None,
        run: RunOptions | None,
        checkpoint: CheckpointOptions | None,
        alarm: AlarmOptions | bool,
    ) -> _Job:
        """The groups checked (``None``: the defaults) and the device resolved (the argument,
        else the model's); ``ValueError`` for options that cannot work together or a model in
        training mode."""
        table = _group("table", table, TableOptions) or TableOptions()
        run = _group("run", run, RunOptions) or RunOptions()
        checkpoint = _group("checkpoint", checkpoint, CheckpointOptions)
        if model.training:
            raise ValueError(
                "calibrate needs the model in eval mode (model.eval()): in training mode batch "
                "statistics couple the samples and dropout is random"
            )
        if checkpoint is not None and run.spill_dir is not None:
            raise ValueError("give run.spill_dir or checkpoint, not both (a checkpoint is a spill)")
        dev = torch.device(device) if device is not None else model_device(model)
        backend = resolve_backend("grad_amap", run.backend, dev)
        return cls(layer, dev, backend, progress, table, run, checkpoint, AlarmOptions.of(alarm))


def _group(name: str, value: Any, cls: type) -> Any:
    """``value`` when it is ``None`` or a ``cls``, else ``TypeError`` naming the keyword."""
    if value is not None and not isinstance(value, cls):
        raise TypeError(f"calibrate(): {name}= takes {cls.__name__}, got {type(value).__name__}")
    return value


def _alpha_table(model: nn.Module, data: DataLoader | Dataset, job: _Job) -> CalibrationTable:
    """The alpha table (no alarm part): the training pass, its statistics, the table; refused
    when its alpha is constant for most filters
    (:func:`~surprise_monitor.calibrate.degenerate.check_spread`)."""
    dev, info, run, ck = job.device, distributed.current(), job.run, job.checkpoint
    plan = _plan(data, run, dev, info, ck is not None)
    spill = None if run.spill_dir is None else Path(run.spill_dir)
    root = Path(ck.dir) if ck is not None else spill
    grid = LogGrid() if run.approximate is True else (run.approximate or None)
    with _work_folder(root, info) as work:
        acc = make_accumulator(grid, work, top_k=job.table.top_k, root=root, merge=run.merge,
                               budget=run.memory_budget_bytes, progress=job.progress,
                               device=statistics_device(dev))  # fmt: skip
        alpha = BatchAlpha(model, job.layer, job.table.class_output, dev, job.backend,
                           amp=run.amp, inference_mode=run.inference_mode)  # fmt: skip
        rank_pass = _RankPass(alpha, acc, info, plan)
        if ck is not None:
            settings = _settings(model, job, plan, info, acc)
            rank_pass.checkpoint = ckpt.Checkpoint(work, settings, info)
        rank_pass.collect(data, run, ck, job.progress)
        meta = rank_pass.shared_meta()
        levels_arr = levels_with_required(job.table.levels)
        beta_arr = levels_with_required(job.table.beta_levels)
        stats = acc.statistics(distributed.Comm(info), meta, levels_arr, beta_arr)
    names = _class_names(job.table.class_names, data, int(meta.num_classes or 0))
    table = _table(meta, stats, model, names, job.table, levels_arr, beta_arr)
    check_spread(table, job.table.allow_degenerate)  # the same statistics on every rank
    return table


def statistics_device(dev: torch.device) -> torch.device | None:
    """Where the exact percentiles and exemplars are computed: torch on a GPU calibration device
    (same values as numpy's, see
    :func:`surprise_monitor.calibrate.statistics.sorted_block_statistics`), else numpy
    (``None``)."""
    return dev if dev.type == "cuda" else None


def _plan(
    data: DataLoader | Dataset,
    run: RunOptions,
    dev: torch.device,
    info: DistInfo,
    resumable: bool,
) -> BatchPlan | None:
    """The data's batch plan (``None``: streamed as given); ``ValueError`` when a distributed or
    resumable run gets data it cannot plan."""
    plan = plan_for(data, run.batch_size, run.num_workers, pin=dev.type == "cuda")
    if plan is None and (info.distributed or resumable):
        raise ValueError(
            "distributed or resumable calibration needs a map-style dataset read in index "
            "order (a Dataset, or a DataLoader with shuffle=False and a batch_size)"
        )
    return plan


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
        run: RunOptions,
        options: CheckpointOptions | None,
        progress: bool,
    ) -> None:
        """Open the checkpoint (resuming it when ``options.resume``) or start afresh, then
        accumulate this rank's batches; the probe's hooks are removed at the end, whatever
        happens."""
        try:
            if self.checkpoint is not None:
                assert options is not None
                self._resume(options.resume)
            else:
                self.accumulator.reset()  # a reused spill folder starts empty
            batches, total = _batches(self, data, run.batch_size, run.num_workers)
            every = options.every if options is not None else 0
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
        every ``every`` batches and at the end (with a checkpoint). Each batch's alpha goes to
        the accumulator on a writer thread (:mod:`surprise_monitor.calibrate.writer`) while the
        next batch is computed."""
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
    model: nn.Module, job: _Job, plan: BatchPlan | None, info: DistInfo, accumulator: Accumulator
) -> dict[str, Any]:
    """What decides the accumulated values: a checkpoint made with anything else is refused
    (the options among them: :data:`surprise_monitor.calibrate.checkpoint.DECIDING_OPTIONS`)."""
    assert plan is not None  # resumable runs always have one
    return {
        "model_fingerprint": model_fingerprint(model),
        "layer": job.layer,
        **ckpt.deciding_options(job.table, job.run),
        "batch_size": plan.batch_size,
        "drop_last": plan.drop_last,
        "num_images": plan.num_images,
        "data": ckpt.dataset_fingerprint(plan.dataset),
        "world_size": info.world_size,
        "rank": info.rank,
        "device": job.device.type,
        "backend": job.backend,
        "torch": torch.__version__,
        "mode": accumulator.mode,
        **accumulator.settings(),
    }


def _table(
    meta: RunMeta,
    stats: list[ClassStatistics],
    model: nn.Module,
    names: list[str],
    options: TableOptions,
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
        class_output=options.class_output,
        input_shape=tuple(meta.input_shape),
        model_fingerprint=model_fingerprint(model),
        layer_fingerprint=layer_fingerprint(get_module(model, meta.layer)),
        data_source=options.data_source,
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
