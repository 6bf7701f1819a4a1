"""``calibrate()``: run a model over its training data and build the :class:`CalibrationTable`."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler
from tqdm.auto import tqdm

from calibrate.fingerprint import model_fingerprint
from calibrate.spill import AlphaSpill
from calibrate.statistics import class_statistics
from calibrate.table import (
    DEFAULT_BETA_LEVELS,
    DEFAULT_LEVELS,
    CalibrationTable,
    levels_with_required,
)
from kernels import grad_amap
from monitor.layers import resolve_layer
from monitor.probe import SCORES, GradAMapProbe

log = logging.getLogger(__name__)


def _as_loader(data: DataLoader | Dataset, batch_size: int, num_workers: int) -> DataLoader:
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


def _split_batch(
    batch: Any, offset: int, ordered: bool
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
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
        idx = np.asarray(torch.as_tensor(batch[2]).cpu(), np.int64)
    elif ordered:
        idx = np.arange(offset, offset + len(x), dtype=np.int64)
    else:
        raise ValueError(
            "the DataLoader shuffles (or uses a custom sampler), so dataset indices of the "
            "exemplars cannot be known: use shuffle=False or yield (images, labels, indices)"
        )
    return x, y, idx


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


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

    Alpha values go to disk as they are computed; statistics are computed class by class at
    the end in filter blocks, so peak memory does not grow with the number of images.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if top_k < 1:
        raise ValueError("top_k must be at least 1")
    if model.training:
        raise ValueError(
            "calibrate needs the model in eval mode (model.eval()): in training mode batch "
            "statistics couple the samples and dropout is random"
        )
    levels_arr = levels_with_required(levels)
    beta_arr = levels_with_required(beta_levels)
    dev = torch.device(device) if device is not None else _model_device(model)
    loader = _as_loader(data, batch_size, num_workers)
    ordered = _ordered(loader)
    try:
        total = len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        total = None

    tmp = None
    if spill_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="surprise-spill-")
        spill_dir = tmp.name
    probe = None
    spill = None
    try:
        offset = 0
        input_shape: tuple[int, ...] = ()
        num_classes = 0
        choice = None
        bar = tqdm(total=total, unit="img", unit_scale=True, disable=not progress, desc="calibrate")
        with bar:
            for batch in loader:
                x, y, idx = _split_batch(batch, offset, ordered)
                offset += len(x)
                if len(x) == 0:
                    continue
                x = x.to(dev, non_blocking=True)
                if not bool(torch.isfinite(x).all()):
                    raise ValueError(f"images {idx[0]}..{idx[-1]} contain NaN or Inf")
                if probe is None:
                    choice = resolve_layer(model, layer, x[:1])
                    log.info("calibrate: target layer %r (%s)", choice.name, choice.reason)
                    probe = GradAMapProbe(model, choice.name, score=score)
                    spill = AlphaSpill(spill_dir, choice.out_shape[0])
                    input_shape = tuple(x.shape[1:])
                elif tuple(x.shape[1:]) != input_shape:
                    raise ValueError(
                        f"images {idx[0]}..{idx[-1]} have shape {tuple(x.shape[1:])}, earlier "
                        f"ones {input_shape}: calibrate at one input size"
                    )
                res = probe.run(x, labels=y)
                num_classes = res.logits.shape[1]
                alpha = grad_amap(res.activation, res.gradient, backend=backend)
                if not bool(torch.isfinite(alpha).all()):
                    raise ValueError(f"alpha is not finite for images {idx[0]}..{idx[-1]}")
                if idx.size and (idx.min() < 0 or idx.max() >= 2**31):
                    raise ValueError(f"dataset index {idx.max()} does not fit the table's int32")
                spill.append(alpha.cpu().numpy(), y.cpu().numpy(), idx)
                bar.update(len(x))
        if probe is None or spill is None or choice is None:
            raise ValueError("calibration data is empty")
        spill.flush()

        stats = []
        for c in tqdm(range(num_classes), desc="statistics", unit="class", disable=not progress):
            stats.append(
                class_statistics(
                    spill.read_alpha(c),
                    spill.read_indices(c),
                    levels_arr,
                    beta_arr,
                    top_k,
                    memory_budget_bytes,
                )
            )
        names = _class_names(class_names, loader.dataset, num_classes)
        table = CalibrationTable(
            layer=choice.name,
            layer_reason=choice.reason,
            levels=torch.from_numpy(levels_arr),
            quantiles=torch.from_numpy(np.stack([s.quantiles for s in stats])),
            mean=torch.from_numpy(np.stack([s.mean for s in stats])),
            counts=torch.tensor([s.count for s in stats], dtype=torch.int64),
            beta_levels=torch.from_numpy(beta_arr),
            beta_quantiles=torch.from_numpy(np.stack([s.beta_quantiles for s in stats])),
            top_indices=torch.from_numpy(np.stack([s.top_indices for s in stats]).astype(np.int32)),
            top_alpha=torch.from_numpy(np.stack([s.top_alpha for s in stats])),
            class_names=names,
            score=score,
            input_shape=input_shape,
            model_fingerprint=model_fingerprint(model),
            data_source=data_source,
        )
        missing = [names[c] for c in range(num_classes) if int(table.counts[c]) == 0]
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
    finally:
        if probe is not None:
            probe.close()
        if tmp is not None:
            tmp.cleanup()


def _class_names(given: Sequence[str] | None, dataset: Any, k: int) -> list[str]:
    if given is not None:
        if len(given) != k:
            raise ValueError(f"{len(given)} class names for a model with {k} classes")
        return [str(n) for n in given]
    found = getattr(dataset, "classes", None)
    if found is not None and len(found) == k:
        return [str(n) for n in found]
    return [str(i) for i in range(k)]
