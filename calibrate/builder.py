"""``calibrate()``: run a model over its training data and build the :class:`CalibrationTable`.

One process or many (``torchrun``; see :mod:`calibrate.distributed`), resumable from a
checkpoint (:mod:`calibrate.checkpoint`), exact (alpha spilled to disk, :mod:`calibrate.spill`)
or approximate (fixed-grid histograms, :mod:`calibrate.sketch`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    Sampler,
    SequentialSampler,
)
from tqdm.auto import tqdm

from calibrate import checkpoint as ckpt
from calibrate import distributed as distmod
from calibrate.fingerprint import model_fingerprint
from calibrate.inference_probe import InferenceModeProbe, InferenceModeUnsupported
from calibrate.sketch import LogGrid, SketchAccumulator
from calibrate.spill import AlphaSpill
from calibrate.statistics import ClassStatistics, class_statistics
from calibrate.table import (
    DEFAULT_BETA_LEVELS,
    DEFAULT_LEVELS,
    CalibrationTable,
    levels_with_required,
)
from kernels import grad_amap
from kernels._backend import resolve_backend
from monitor.layers import resolve_layer
from monitor.probe import SCORES, GradAMapProbe

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- data plans
class _BatchRanges(Sampler[list[int]]):
    """Global batches ``b`` of ``size`` consecutive dataset indices, for ``b`` in ``batches``."""

    def __init__(self, batches: range, size: int, total: int) -> None:
        self.batches, self.size, self.total = batches, size, total

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.batches:
            yield list(range(b * self.size, min((b + 1) * self.size, self.total)))

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class _Plan:
    """A map-style dataset read in index order, in global batches dealt to the ranks."""

    dataset: Dataset
    batch_size: int
    drop_last: bool
    loader_kwargs: dict[str, Any]

    @property
    def num_images(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    @property
    def num_batches(self) -> int:
        n, b = self.num_images, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def mine(self, info: distmod.DistInfo) -> range:
        """This rank's global batch numbers, in the order it computes them."""
        return range(info.rank, self.num_batches, info.world_size)

    def images_in(self, batches: range) -> int:
        return sum(min(self.batch_size, self.num_images - b * self.batch_size) for b in batches)

    def loader(self, batches: range) -> DataLoader:
        sampler = _BatchRanges(batches, self.batch_size, self.num_images)
        return DataLoader(self.dataset, batch_sampler=sampler, **self.loader_kwargs)


def _plan(data: DataLoader | Dataset, batch_size: int, num_workers: int, pin: bool) -> _Plan | None:
    """A :class:`_Plan` for ``data``, or ``None`` where it can only be streamed as given (an
    iterable dataset, a shuffling loader or one with a custom batch sampler)."""
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset):
            return None
        if not isinstance(data.sampler, SequentialSampler) or data.batch_size is None:
            return None
        if not isinstance(data.batch_sampler, BatchSampler):
            return None
        kwargs: dict[str, Any] = {
            "num_workers": data.num_workers, "collate_fn": data.collate_fn,
            "pin_memory": data.pin_memory or pin, "timeout": data.timeout,
            "worker_init_fn": data.worker_init_fn,
            "multiprocessing_context": data.multiprocessing_context,
        }  # fmt: skip
        if data.num_workers > 0:
            kwargs["prefetch_factor"] = data.prefetch_factor
        return _Plan(data.dataset, int(data.batch_size), bool(data.drop_last), kwargs)
    if isinstance(data, IterableDataset):
        return None
    if isinstance(data, Dataset):
        kwargs = {"num_workers": num_workers, "pin_memory": pin}
        return _Plan(data, int(batch_size), False, kwargs)
    raise TypeError(f"data must be a torch DataLoader or Dataset, got {type(data).__name__}")


def _stream_loader(data: DataLoader | Dataset, batch_size: int, num_workers: int) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    raise TypeError(f"data must be a torch DataLoader or Dataset, got {type(data).__name__}")


def _ordered(loader: DataLoader) -> bool:
    """True when the loader visits the dataset in index order (so indices can be counted)."""
    if isinstance(loader.dataset, IterableDataset):
        return True
    batches = loader.batch_sampler
    if batches is not None and getattr(batches, "sampler", None) is not loader.sampler:
        return False  # a custom batch sampler decides the order
    return isinstance(loader.sampler, SequentialSampler)


def _split_batch(batch: Any, known: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """``(images, labels, indices)`` of a batch; ``known``: the indices the plan expects."""
    if not isinstance(batch, list | tuple) or len(batch) not in (2, 3):
        raise ValueError("each batch must be (images, labels) or (images, labels, indices)")
    x, y = batch[0], batch[1]
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(
            f"images must be a [B, C, H, W] tensor, got {getattr(x, 'shape', type(x))}"
        )
    y = torch.as_tensor(y)
    if y.ndim != 1 or len(y) != len(x) or y.dtype.is_floating_point:
        raise ValueError(f"labels must be [B] integers, got {tuple(y.shape)} {y.dtype}")
    if len(batch) == 3:
        return x, y, np.asarray(torch.as_tensor(batch[2]).cpu(), np.int64)
    return x, y, known


def _stream_batches(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
    ordered = _ordered(loader)
    offset = 0
    for batch in loader:
        x, y, idx = _split_batch(batch, None)
        if idx is None:
            if not ordered:
                raise ValueError(
                    "the DataLoader shuffles (or uses a custom sampler), so dataset indices of "
                    "the exemplars cannot be known: use shuffle=False or yield "
                    "(images, labels, indices)"
                )
            idx = np.arange(offset, offset + len(x), dtype=np.int64)
        offset += len(x)
        yield x, y, idx


def _plan_batches(
    plan: _Plan, batches: range
) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
    b = plan.batch_size
    for g, batch in zip(batches, plan.loader(batches), strict=True):
        known = np.arange(g * b, min((g + 1) * b, plan.num_images), dtype=np.int64)
        x, y, idx = _split_batch(batch, known)
        yield x, y, idx


def _on_device(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]], dev: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
    """Move batches to ``dev``; on CUDA the next batch's copy runs on a side stream while the
    current one is computed (the loader pins host memory, so the copy is asynchronous)."""
    if dev.type != "cuda":
        for x, y, idx in batches:
            yield x.to(dev), y.to(dev), idx
        return
    stream = torch.cuda.Stream(dev)

    def start(item):
        x, y, idx = item
        with torch.cuda.stream(stream):
            return x.to(dev, non_blocking=True), y.to(dev, non_blocking=True), idx

    it = iter(batches)
    nxt = next(it, None)
    pending = start(nxt) if nxt is not None else None
    while pending is not None:
        torch.cuda.current_stream(dev).wait_stream(stream)
        x, y, idx = pending
        x.record_stream(torch.cuda.current_stream(dev))
        y.record_stream(torch.cuda.current_stream(dev))
        nxt = next(it, None)
        pending = start(nxt) if nxt is not None else None
        yield x, y, idx


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


# ------------------------------------------------------------------------------ the run
class _Run:
    """The per-batch part of one calibration: probe, accumulator, checkpoints."""

    def __init__(self, model, layer, score, dev, backend, amp, inference_mode, top_k, grid):
        self.model, self.layer, self.score, self.dev = model, layer, score, dev
        self.backend, self.amp, self.top_k, self.grid = backend, amp, top_k, grid
        self.use_inference_mode = inference_mode
        self.probe: GradAMapProbe | None = None
        self.meta: dict[str, Any] | None = None  # layer, layer_reason, filters, classes, shape
        self.spill: AlphaSpill | None = None
        self.sketch: SketchAccumulator | None = None
        self.work: Path | None = None
        self.images: tuple[int, int] | None = None  # (all images, this rank's remaining ones)

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()
            self.probe = None

    def _probe(self, x: torch.Tensor) -> None:
        want = self.meta["layer"] if self.meta else self.layer
        choice = resolve_layer(self.model, want, x[:1])
        if self.meta is None:
            log.info("calibrate: target layer %r (%s)", choice.name, choice.reason)
            self.meta = {
                "layer": choice.name, "layer_reason": choice.reason,
                "num_filters": int(choice.out_shape[0]), "input_shape": list(x.shape[1:]),
                "num_classes": None,
            }  # fmt: skip
        elif int(choice.out_shape[0]) != self.meta["num_filters"]:
            raise ckpt.CheckpointError(
                f"layer {choice.name!r} has {choice.out_shape[0]} filters, the checkpoint "
                f"{self.meta['num_filters']}"
            )
        cls = InferenceModeProbe if self.use_inference_mode else GradAMapProbe
        self.probe = cls(self.model, choice.name, score=self.score)
        if self.grid is None and self.images is not None:
            _announce_disk(self.meta["num_filters"], self.images, self.work)

    def _forward(self, x: torch.Tensor, y: torch.Tensor):
        dtype = torch.float16 if self.dev.type == "cuda" else torch.bfloat16
        with torch.autocast(self.dev.type, dtype=dtype, enabled=self.amp):
            return self.probe.run(x, labels=y)

    def alpha(self, x: torch.Tensor, y: torch.Tensor, idx: np.ndarray) -> np.ndarray:
        """Alpha ``[B, N]`` of a batch on the device, checked."""
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"images {idx[0]}..{idx[-1]} contain NaN or Inf")
        if self.probe is None:
            self._probe(x)
        elif list(x.shape[1:]) != self.meta["input_shape"]:
            raise ValueError(
                f"images {idx[0]}..{idx[-1]} have shape {tuple(x.shape[1:])}, earlier ones "
                f"{tuple(self.meta['input_shape'])}: calibrate at one input size"
            )
        try:
            res = self._forward(x, y)
        except InferenceModeUnsupported as exc:
            log.info("calibrate: prefix in no_grad instead of inference_mode (%s)", exc)
            self.probe.close()
            self.probe = GradAMapProbe(self.model, self.meta["layer"], score=self.score)
            res = self._forward(x, y)
        k = int(res.logits.shape[1])
        if self.meta["num_classes"] is None:
            self.meta["num_classes"] = k
        elif self.meta["num_classes"] != k:
            raise ValueError(f"the model gave {k} classes, earlier {self.meta['num_classes']}")
        alpha = grad_amap(res.activation, res.gradient, backend=self.backend)
        if not bool(torch.isfinite(alpha).all()):
            raise ValueError(f"alpha is not finite for images {idx[0]}..{idx[-1]}")
        if idx.size and (idx.min() < 0 or idx.max() >= 2**31):
            raise ValueError(f"dataset index {idx.max()} does not fit the table's int32")
        return alpha.float().cpu().numpy()

    def add(self, alpha: np.ndarray, y: np.ndarray, idx: np.ndarray) -> None:
        if self.grid is None:
            if self.spill is None:
                self.spill = AlphaSpill(self.work, self.meta["num_filters"])
            self.spill.append(alpha, y, idx)
        else:
            if self.sketch is None:
                self.sketch = self._new_sketch()
            self.sketch.add(alpha, y, idx)

    def _new_sketch(self) -> SketchAccumulator:
        m = self.meta
        k, n = m["num_classes"], m["num_filters"]
        log.info(
            "calibrate: approximate mode: the sketch of %d classes x %d filters x %d bins holds "
            "%s in memory (no spill)", k, n, self.grid.num_bins,
            _human(SketchAccumulator.memory_bytes(k, n, self.top_k, self.grid)),
        )  # fmt: skip
        return SketchAccumulator(k, n, self.top_k, self.grid)

    # ------------------------------------------------------------- checkpoints
    def state(self, seq: int) -> dict[str, Any]:
        """Make the accumulated data durable; what the manifest records about it."""
        if self.grid is None:
            rows = self.spill.sync() if self.spill is not None else {}
            return {"rows": {str(c): n for c, n in rows.items()}}
        if self.sketch is None:
            return {"sketch": None}
        name = f"sketch-{seq}.safetensors"
        self.sketch.save(self.work / name)
        return {"sketch": name}

    def restore(self, state: dict[str, Any]) -> None:
        if self.grid is None:
            rows = {int(c): int(n) for c, n in state.get("rows", {}).items()}
            self.spill = AlphaSpill(self.work, self.meta["num_filters"])
            self.spill.restore(rows)
            return
        name = state.get("sketch")
        if name is not None:
            self.sketch = self._new_sketch()
            self.sketch.load(self.work / name)
        _remove_sketch_states(self.work, keep=name)


def spill_bytes_per_image(num_filters: int) -> int:
    """Disk per image in exact mode: ``num_filters`` float32 alpha values and an int64 index."""
    return 4 * num_filters + 8


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def _announce_disk(num_filters: int, images: tuple[int, int], work: Path) -> None:
    per = spill_bytes_per_image(num_filters)
    total, mine = images
    need = per * mine
    log.info(
        "calibrate: the alpha spill takes %d bytes per image (%d filters x 4 + 8 for the index): "
        "%s for all %d images; this process adds %s for its %d in %s",
        per, num_filters, _human(per * total), total, _human(need), mine, work,
    )  # fmt: skip
    free = shutil.disk_usage(work).free
    if free < need:
        log.warning("calibrate: %s has %s free, the spill needs %s", work, _human(free),
                    _human(need))  # fmt: skip


def _remove_sketch_states(work: Path, keep: str | None) -> None:
    for path in work.glob("sketch-*.safetensors"):
        if path.name != keep:
            path.unlink(missing_ok=True)


def calibrate(
    model: nn.Module,
    data: DataLoader | Dataset,
    *,
    layer: str | None = None,
    score: str = "logit",
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
) -> CalibrationTable:
    """Build the calibration table of ``model`` on training ``data`` with true labels.

    Args:
        model: the CNN, in eval mode (it is not modified).
        data: a DataLoader (or a Dataset, wrapped with ``batch_size``) yielding
            ``(images, labels)`` in index order, or ``(images, labels, indices)``.
        layer: target module name; ``None`` picks the final convolution (see
            :func:`monitor.layers.resolve_layer`; the reason is logged and kept in the table).
        score: the class score differentiated: ``"logit"``, ``"softmax"`` or ``"log_softmax"``.
        levels: percent levels of the alpha grid (the required tail levels are always added).
        top_k: exemplar images kept per (class, filter).
        spill_dir: where alpha values are streamed (kept afterwards); default: a temporary
            folder removed at the end.
        memory_budget_bytes: working memory for the per-class statistics.
        data_source: where the images came from (kept in the table for explanations).
        checkpoint_dir: make the run resumable: alpha is spilled there and progress is
            committed every ``checkpoint_every`` batches (see :mod:`calibrate.checkpoint`).
        resume: continue the checkpoint in ``checkpoint_dir`` (refused if it was made with
            other settings or data); without it an existing checkpoint is an error.
        amp: run the model under autocast (float16 on CUDA, bfloat16 on CPU); alpha is still
            accumulated in float32.
        approximate: ``True`` or a :class:`~calibrate.sketch.LogGrid`: fixed-grid histograms
            instead of spilled rows (see :mod:`calibrate.sketch`).
        inference_mode: run the layers before the target layer in ``torch.inference_mode``
            (falls back to ``no_grad`` where the model does not allow it; same values).
        merge: how ranks combine their data: ``"auto"`` or ``"send"`` (see
            :mod:`calibrate.distributed`).

    Under ``torchrun`` (an initialised default process group), each rank computes its share of
    the batches and every rank returns the same table, identical to a one-process run's.
    Alpha values go to disk as they are computed; statistics are computed class by class at
    the end in filter blocks, so peak memory does not grow with the number of images.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
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
    grid = LogGrid() if approximate is True else (approximate or None)
    levels_arr = levels_with_required(levels)
    beta_arr = levels_with_required(beta_levels)
    dev = torch.device(device) if device is not None else _model_device(model)
    info = distmod.current()
    plan = _plan(data, batch_size, num_workers, pin=dev.type == "cuda")
    if plan is None and (info.distributed or checkpoint_dir is not None):
        raise ValueError(
            "distributed or resumable calibration needs a map-style dataset read in index "
            "order (a Dataset, or a DataLoader with shuffle=False and a batch_size)"
        )

    run = _Run(model, layer, score, dev, resolve_backend("grad_amap", backend, dev),
               amp, inference_mode, top_k, grid)  # fmt: skip
    tmp = None
    given = checkpoint_dir if checkpoint_dir is not None else spill_dir
    root = Path(given) if given is not None else None
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="surprise-spill-")
        run.work = Path(tmp.name)
    else:
        run.work = distmod.shard_dir(root, info)
        run.work.mkdir(parents=True, exist_ok=True)
    try:
        done = 0
        settings = None
        if checkpoint_dir is not None:
            settings = _settings(model, layer, score, plan, info, dev, run, grid, top_k)
            done = _open_checkpoint(run, settings, resume)
        elif grid is None:
            AlphaSpill(run.work, 1).clear()  # a reused spill folder starts empty

        if plan is None:
            batches = _stream_batches(_stream_loader(data, batch_size, num_workers))
            try:
                total = len(data.dataset if isinstance(data, DataLoader) else data)
            except TypeError:
                total = None
        else:
            todo = plan.mine(info)[done:]
            batches = _plan_batches(plan, todo)
            total = plan.images_in(todo)
            run.images = (plan.num_images, total)
        bar = tqdm(
            total=total, unit="img", unit_scale=True, desc="calibrate",
            disable=not progress or info.rank != 0,
        )  # fmt: skip
        with bar:
            for x, y, idx in _on_device(batches, dev):
                if len(x):
                    alpha = run.alpha(x, y, idx)
                    run.add(alpha, y.cpu().numpy(), idx)
                done += 1
                if settings is not None and done % checkpoint_every == 0:
                    _commit(run, settings, info, done, complete=False)
                bar.update(len(x))
        if settings is not None:
            _commit(run, settings, info, done, complete=True)
        run.close()
        return _finish(
            run, info, root, levels_arr, beta_arr, top_k, memory_budget_bytes, class_names,
            data, model, data_source, progress, merge,
        )  # fmt: skip
    finally:
        run.close()
        if tmp is not None:
            tmp.cleanup()


def _settings(model, layer, score, plan, info, dev, run, grid, top_k) -> dict[str, Any]:
    """What decides the spilled values: a checkpoint made with anything else is refused."""
    sketch = {}
    if grid is not None:  # exemplars live in the sketch state, so top_k is fixed there too
        sketch = {"sketch_grid": grid.settings(), "sketch_top_k": top_k}
    return {
        "model_fingerprint": model_fingerprint(model),
        "layer": layer,
        "score": score,
        "batch_size": plan.batch_size,
        "drop_last": plan.drop_last,
        "num_images": plan.num_images,
        "data": ckpt.dataset_fingerprint(plan.dataset),
        "world_size": info.world_size,
        "rank": info.rank,
        "device": dev.type,
        "amp": bool(run.amp),
        "backend": run.backend,
        "torch": torch.__version__,
        "mode": "exact" if grid is None else "approximate",
        **sketch,
    }


def _open_checkpoint(run: _Run, settings: dict[str, Any], resume: bool) -> int:
    """Check and restore the checkpoint in ``run.work``; the batches already done."""
    manifest = ckpt.read_manifest(run.work)
    if manifest is None:
        if resume:
            log.info("calibrate: no checkpoint in %s yet, starting from the beginning", run.work)
        AlphaSpill(run.work, 1).clear()  # data written before any checkpoint is not trusted
        _remove_sketch_states(run.work, keep=None)
        return 0
    if not resume:
        raise ckpt.CheckpointError(
            f"{ckpt.manifest_path(run.work)}: this folder holds a checkpoint of an earlier run; "
            "pass resume=True (--resume) to continue it, or use an empty folder"
        )
    ckpt.check_settings(run.work, manifest.get("settings", {}), settings)
    run.meta = manifest.get("meta")
    if run.meta is not None:
        run.restore(manifest.get("accumulator", {}))
    done = int(manifest.get("batches_done", 0))
    log.info("calibrate: resuming %s after %d batches", run.work, done)
    return done


def _commit(run: _Run, settings, info, done: int, complete: bool) -> None:
    state = run.state(done)
    ckpt.write_manifest(
        run.work,
        {
            "settings": settings,
            "rank": info.rank,
            "world_size": info.world_size,
            "batches_done": done,
            "complete": complete,
            "meta": run.meta,
            "accumulator": state,
        },
    )
    if run.grid is not None:
        _remove_sketch_states(run.work, keep=state.get("sketch"))


def _finish(
    run: _Run, info, root, levels_arr, beta_arr, top_k, budget, class_names, data, model,
    data_source, progress, merge,
) -> CalibrationTable:  # fmt: skip
    comm = distmod.Comm(info)
    meta = comm.broadcast_json(run.meta, 0)
    if meta is None or meta.get("num_classes") is None:
        raise ValueError("calibration data is empty")
    if run.meta is not None and run.meta != meta:
        raise ValueError(f"rank {info.rank} saw {run.meta}, rank 0 {meta}")
    run.meta = meta
    k, nf = meta["num_classes"], meta["num_filters"]
    bar_off = not progress or info.rank != 0
    if run.grid is None:
        spill = run.spill or AlphaSpill(run.work, nf)
        recv = run.work / "recv"
        sources = distmod.class_sources(comm, spill, k, root, recv, merge=merge)
        mine: dict[int, ClassStatistics] = {}
        for c in tqdm(sorted(sources), desc="statistics", unit="class", disable=bar_off):
            alpha, indices = sources[c]
            mine[c] = class_statistics(alpha, indices, levels_arr, beta_arr, top_k, budget)
        shutil.rmtree(recv, ignore_errors=True)
        stats = distmod.share_statistics(comm, mine, k, nf, len(levels_arr), len(beta_arr), top_k)
    else:
        sketch = run.sketch or run._new_sketch()
        distmod.reduce_sketch(comm, sketch)
        if sketch.overflow:
            log.warning(
                "calibrate: %d alpha values lie beyond the sketch grid's max_magnitude %g; "
                "their percentiles are bounded only by the exact min/max",
                sketch.overflow, run.grid.max_magnitude,
            )  # fmt: skip
        stats = [sketch.statistics(c, levels_arr, beta_arr) for c in range(k)]

    dataset = data.dataset if isinstance(data, DataLoader) else data
    names = _class_names(class_names, dataset, k)
    table = CalibrationTable(
        layer=meta["layer"],
        layer_reason=meta["layer_reason"],
        levels=torch.from_numpy(levels_arr),
        quantiles=torch.from_numpy(np.stack([s.quantiles for s in stats])),
        mean=torch.from_numpy(np.stack([s.mean for s in stats])),
        counts=torch.tensor([s.count for s in stats], dtype=torch.int64),
        beta_levels=torch.from_numpy(beta_arr),
        beta_quantiles=torch.from_numpy(np.stack([s.beta_quantiles for s in stats])),
        top_indices=torch.from_numpy(np.stack([s.top_indices for s in stats]).astype(np.int32)),
        top_alpha=torch.from_numpy(np.stack([s.top_alpha for s in stats])),
        class_names=names,
        score=run.score,
        input_shape=tuple(meta["input_shape"]),
        model_fingerprint=model_fingerprint(model),
        data_source=data_source,
    )
    missing = [names[c] for c in range(k) if int(table.counts[c]) == 0]
    if missing:
        shown = ", ".join(missing[:10]) + (
            f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        log.warning(
            "calibrate: no images for %d classes (%s); they will not be flagged",
            len(missing),
            shown,
        )
    return table


def _class_names(given: Sequence[str] | None, dataset: Any, k: int) -> list[str]:
    if given is not None:
        if len(given) != k:
            raise ValueError(f"{len(given)} class names for a model with {k} classes")
        return [str(n) for n in given]
    found = getattr(dataset, "classes", None)
    if found is not None and len(found) == k:
        return [str(n) for n in found]
    return [str(i) for i in range(k)]
