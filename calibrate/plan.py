"""How calibration reads its data: batches in dataset-index order, dealt to the ranks, moved to
the device.

A map-style dataset read in index order gets a :class:`BatchPlan`: global batch ``b`` holds
indices ``b*B ... b*B+B-1`` (the batches of a one-process run), and rank ``r`` of ``W`` computes
batches ``r, r+W, ...``; resuming skips the batches a checkpoint holds. Anything else (an
iterable dataset, a shuffling loader, a custom batch sampler) is streamed as given, by one
process; its dataset indices are counted when it reads in order, or taken from batches of
``(images, labels, indices)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    Sampler,
    SequentialSampler,
)

from surprise_monitor.calibrate.distributed import DistInfo

#: One batch: images ``[B, C, H, W]``, labels ``[B]``, dataset indices ``[B]`` (int64).
LoaderBatch = tuple[torch.Tensor, torch.Tensor, np.ndarray]


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
class BatchPlan:
    """A map-style dataset read in index order, in global batches dealt to the ranks."""

    dataset: Dataset
    batch_size: int
    drop_last: bool
    loader_kwargs: dict[str, Any]

    @property
    def num_images(self) -> int:
        """Images in the dataset."""
        return len(self.dataset)  # type: ignore[arg-type]

    @property
    def num_batches(self) -> int:
        """Global batches of the whole run."""
        n, b = self.num_images, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def batches_of(self, info: DistInfo) -> range:
        """The global batch numbers rank ``info.rank`` computes, in order."""
        return range(info.rank, self.num_batches, info.world_size)

    def images_in(self, batches: range) -> int:
        """Images in the given global batches."""
        return sum(min(self.batch_size, self.num_images - b * self.batch_size) for b in batches)

    def read(self, batches: range) -> Iterator[LoaderBatch]:
        """The given global batches, in order, with their dataset indices."""
        b = self.batch_size
        sampler = _BatchRanges(batches, b, self.num_images)
        loader = DataLoader(self.dataset, batch_sampler=sampler, **self.loader_kwargs)
        for g, batch in zip(batches, loader, strict=True):
            known = np.arange(g * b, min((g + 1) * b, self.num_images), dtype=np.int64)
            yield split_batch(batch, known)


def plan_for(
    data: DataLoader | Dataset, batch_size: int, num_workers: int, pin: bool
) -> BatchPlan | None:
    """A :class:`BatchPlan` for ``data``, or ``None`` where it can only be streamed as given (an
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
        return BatchPlan(data.dataset, int(data.batch_size), bool(data.drop_last), kwargs)
    if isinstance(data, IterableDataset):
        return None
    if isinstance(data, Dataset):
        kwargs = {"num_workers": num_workers, "pin_memory": pin}
        return BatchPlan(data, int(batch_size), False, kwargs)
    raise TypeError(f"data must be a torch DataLoader or Dataset, got {type(data).__name__}")


def stream(data: DataLoader | Dataset, batch_size: int, num_workers: int) -> Iterator[LoaderBatch]:
    """The batches of data that has no plan, as given, with their dataset indices."""
    if isinstance(data, Dataset):
        data = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    if not isinstance(data, DataLoader):
        raise TypeError(f"data must be a torch DataLoader or Dataset, got {type(data).__name__}")
    ordered = _ordered(data)
    offset = 0
    for batch in data:
        x, y, idx = split_batch(batch, None)
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


def stream_length(data: DataLoader | Dataset) -> int | None:
    """Images the streamed data holds, when its dataset has a length."""
    try:
        return len(data.dataset if isinstance(data, DataLoader) else data)  # type: ignore[arg-type]
    except TypeError:
        return None


def _ordered(loader: DataLoader) -> bool:
    """True when the loader visits the dataset in index order (so indices can be counted)."""
    if isinstance(loader.dataset, IterableDataset):
        return True
    batches = loader.batch_sampler
    if batches is not None and getattr(batches, "sampler", None) is not loader.sampler:
        return False  # a custom batch sampler decides the order
    return isinstance(loader.sampler, SequentialSampler)


def split_batch(batch: Any, known: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """``(images, labels, indices)`` of a batch; ``known``: the indices the plan expects (used
    unless the batch carries its own)."""
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


def on_device(batches: Iterator[LoaderBatch], dev: torch.device) -> Iterator[LoaderBatch]:
    """Move batches to ``dev``; on CUDA the next batch's copy runs on a side stream while the
    current one is computed (the loader pins host memory, so the copy is asynchronous)."""
    if dev.type != "cuda":
        for x, y, idx in batches:
            yield x.to(dev), y.to(dev), idx
        return
    stream_ = torch.cuda.Stream(dev)

    def start(item: LoaderBatch | None) -> LoaderBatch | None:
        """Start copying ``item`` to the device on the side stream."""
        if item is None:
            return None
        x, y, idx = item
        with torch.cuda.stream(stream_):
            return x.to(dev, non_blocking=True), y.to(dev, non_blocking=True), idx

    it = iter(batches)
    pending = start(next(it, None))
    while pending is not None:
        torch.cuda.current_stream(dev).wait_stream(stream_)
        x, y, idx = pending
        x.record_stream(torch.cuda.current_stream(dev))
        y.record_stream(torch.cuda.current_stream(dev))
        pending = start(next(it, None))
        yield x, y, idx
