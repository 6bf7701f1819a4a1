"""Per-class statistics of spilled alpha values, computed in filter blocks under a memory budget.

The percentiles and exemplars of a block come from numpy on the CPU, or from one stable sort
per block in torch on the calibration device (:func:`sorted_block_statistics`): the same
linear interpolation as ``numpy.percentile`` (float64, numpy's formula, step for step), so the
values are numpy's exactly (a ``-0.0`` may come out as ``0.0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

# Bytes of working memory per alpha value while a block is processed: the block itself, the
# copy numpy.percentile partitions, the negated copy, the int64 argsort (and slack).
_BYTES_PER_VALUE = 4 + 4 + 4 + 4 + 8


class RowSource(Protocol):
    """Rows of alpha values ``[n, N]`` that can be read a few at a time."""

    shape: tuple[int, int]

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start`` to ``stop`` (``stop`` may run past the end)."""
        ...


class ArrayRows:
    """An in-memory ``[n, N]`` array as a :class:`RowSource`."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = np.asarray(array, dtype=np.float32)
        self.shape = self.array.shape

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start`` to ``stop`` (a view)."""
        return self.array[start:stop]


class FileRows:
    """A raw float32 file of ``[n, N]`` rows as a :class:`RowSource`.

    Reads go through ordinary file reads, not a memory map, so pages already processed do not
    stay in the process's resident memory.
    """

    def __init__(self, path: str | Path, num_filters: int) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size if self.path.exists() else 0
        row = 4 * num_filters
        if size % row:
            raise ValueError(f"{self.path}: {size} bytes is not a whole number of alpha rows")
        self.shape = (size // row, num_filters)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start`` to ``stop``, read from the file."""
        n = self.shape[1]
        count = (min(stop, self.shape[0]) - start) * n
        data = np.fromfile(self.path, dtype=np.float32, count=count, offset=4 * start * n)
        return data.reshape(-1, n)


class ConcatRows:
    """Several :class:`RowSource` one after another (a class's rows from several shards)."""

    def __init__(self, sources: list[RowSource], num_filters: int) -> None:
        for src in sources:
            if src.shape[1] != num_filters:
                raise ValueError(f"a shard has {src.shape[1]} filters, expected {num_filters}")
        self.sources = [src for src in sources if src.shape[0]]
        self.starts = np.cumsum([0] + [src.shape[0] for src in self.sources])
        self.shape = (int(self.starts[-1]), num_filters)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start`` to ``stop`` of the sources one after another."""
        stop = min(stop, self.shape[0])
        parts = []
        for src, s0, s1 in zip(self.sources, self.starts[:-1], self.starts[1:], strict=True):
            lo, hi = max(start, s0), min(stop, s1)
            if lo < hi:
                parts.append(src.read_rows(int(lo - s0), int(hi - s0)))
        if not parts:
            return np.zeros((0, self.shape[1]), np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclass
class ClassStatistics:
    """Statistics of one class: N filters, Q alpha levels, Qb beta levels, k exemplars."""

    quantiles: np.ndarray  # [N, Q] float32
    mean: np.ndarray  # [N] float32
    beta_quantiles: np.ndarray  # [Qb] float32
    top_indices: np.ndarray  # [N, k] int64, -1 where the class has fewer than k images
    top_alpha: np.ndarray  # [N, k] float32, NaN where none
    count: int

    @classmethod
    def empty(cls, num_filters: int, levels: int, beta_levels: int, top_k: int) -> ClassStatistics:
        """The statistics of a class without images: zeros, no exemplars."""
        return cls(
            np.zeros((num_filters, levels), np.float32), np.zeros(num_filters, np.float32),
            np.zeros(beta_levels, np.float32), np.full((num_filters, top_k), -1, np.int64),
            np.full((num_filters, top_k), np.nan, np.float32), 0,
        )  # fmt: skip


def class_statistics(
    alpha: RowSource | np.ndarray,
    indices: np.ndarray,
    levels: np.ndarray,
    beta_levels: np.ndarray,
    top_k: int,
    memory_budget_bytes: int,
    device: torch.device | str | None = None,
) -> ClassStatistics:
    """Exact statistics of one class's alpha rows ``[n, N]`` (an array or a :class:`RowSource`).

    - ``quantiles[n, q] = numpy.percentile(alpha[:, n], levels[q], method="linear")``
    - ``mean[n]``: the mean of ``alpha[:, n]`` (accumulated in float64)
    - ``beta_quantiles``: percentiles of the class's betas, ``beta_i = mean_n(alpha[i, n] - mu_n)``
    - ``top_indices[n]``: the dataset indices of the ``top_k`` rows with the largest
      ``alpha[:, n]``, largest first (ties: smaller dataset index first).

    Filters are processed in blocks sized so that the working memory stays under about
    ``memory_budget_bytes`` whatever the number of rows (on ``device`` too); each block is
    gathered from row chunks, so a class larger than the budget is read once per block.
    ``device``: compute the percentiles and exemplars with torch there (a GPU when calibrating
    on one; see :func:`sorted_block_statistics`); ``None``: numpy. Means and betas are numpy's.
    """
    source = ArrayRows(alpha) if isinstance(alpha, np.ndarray) else alpha
    n, num_filters = source.shape
    if n == 0:
        return ClassStatistics.empty(num_filters, len(levels), len(beta_levels), top_k)
    indices = np.asarray(indices, np.int64)
    if indices.shape != (n,):
        raise ValueError(f"{indices.shape[0]} indices for {n} alpha rows")
    stats = ClassStatistics.empty(num_filters, len(levels), len(beta_levels), top_k)
    stats.count = n
    mean = np.zeros(num_filters, np.float64)
    row_mean = np.empty(n, np.float64)
    # Rows are processed in dataset-index order, whatever order they were spilled in (one
    # process, several ranks, a resumed run): every floating-point sum then runs in the same
    # order, so the statistics are bit-identical however the rows arrived.
    by_index = np.argsort(indices, kind="stable")
    position = np.empty(n, np.int64)
    position[by_index] = np.arange(n)
    sorted_indices = indices[by_index]
    cols_per_block = max(1, memory_budget_bytes // (_BYTES_PER_VALUE * n))
    for start in range(0, num_filters, cols_per_block):
        cols = slice(start, min(num_filters, start + cols_per_block))
        block = _gather_block(source, position, cols, row_mean, memory_budget_bytes)
        mean[cols] = block.mean(axis=0, dtype=np.float64)
        if device is None:
            stats.quantiles[cols] = np.percentile(block, levels, axis=0, method="linear").T
            _top_rows(block, sorted_indices, stats.top_indices[cols], stats.top_alpha[cols])
        else:
            found = sorted_block_statistics(block, levels, top_k, torch.device(device))
            stats.quantiles[cols] = found[0].T
            k = found[1].shape[0]
            stats.top_indices[cols, :k] = sorted_indices[found[1]].T
            stats.top_alpha[cols, :k] = found[2].T
        del block
    stats.mean = mean.astype(np.float32)
    betas = row_mean - mean.mean()
    stats.beta_quantiles = np.percentile(betas, beta_levels, method="linear").astype(np.float32)
    return stats


def _gather_block(
    source: RowSource,
    position: np.ndarray,
    cols: slice,
    row_mean: np.ndarray,
    memory_budget_bytes: int,
) -> np.ndarray:
    """The columns ``cols`` of every row, in dataset-index order (``position[i]`` is stored row
    i's place), read in row chunks; the first block also fills ``row_mean``."""
    n, num_filters = source.shape
    rows_per_chunk = max(1, memory_budget_bytes // (4 * 4 * num_filters))
    block = np.empty((n, cols.stop - cols.start), np.float32)
    for r0 in range(0, n, rows_per_chunk):
        chunk = source.read_rows(r0, r0 + rows_per_chunk)
        at = position[r0 : r0 + len(chunk)]
        block[at] = chunk[:, cols]
        if cols.start == 0:  # the first pass also gives each row's mean over all filters
            row_mean[at] = chunk.mean(axis=1, dtype=np.float64)
        del chunk
    return block


def _top_rows(
    block: np.ndarray, sorted_indices: np.ndarray, top_indices: np.ndarray, top_alpha: np.ndarray
) -> None:
    """Fill ``top_indices`` / ``top_alpha`` ``[cols, k]`` with each column's largest values of
    ``block`` (rows in dataset-index order), largest first; a stable sort sends ties to the
    smaller dataset index."""
    k = min(top_indices.shape[1], block.shape[0])
    order = np.argsort(-block, axis=0, kind="stable")[:k]  # [k, cols]
    top_indices[:, :k] = sorted_indices[order].T
    top_alpha[:, :k] = np.take_along_axis(block, order, axis=0).T


def linear_positions(n: int, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``numpy.percentile``'s linear method on ``n`` sorted values, step for step: the rank
    below and above each level and the weight of the one above (float64)."""
    q = np.true_divide(np.asarray(levels, np.float64), 100)
    virtual = (n - 1) * q  # numpy's "linear" virtual index
    prev = np.floor(virtual)
    nxt = prev + 1
    above = virtual >= n - 1
    prev[above] = nxt[above] = n - 1  # numpy takes the last value (index -1) there
    below = virtual < 0
    prev[below] = nxt[below] = 0
    gamma = virtual - np.where(above, -1, prev)  # numpy subtracts the index -1 it used
    return prev.astype(np.int64), nxt.astype(np.int64), gamma


@torch.no_grad()
def sorted_block_statistics(
    block: np.ndarray, levels: np.ndarray, top_k: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Percentiles ``[Q, cols]`` (float32), and the rows ``[k, cols]`` (int64) and values
    ``[k, cols]`` of each column's ``k = min(top_k, n)`` largest values of ``block [n, cols]``
    (rows in dataset-index order; ties: the smaller row first), from one stable sort on
    ``device``.

    The percentiles are ``numpy.percentile(block, levels, axis=0, method="linear")`` exactly:
    numpy's positions (:func:`linear_positions`) and its float64 interpolation
    ``a + (b - a) * g``, or ``b - (b - a) * (1 - g)`` for ``g >= 0.5``, rounded to float32. The
    sort key is ``block + 0.0``, so ``-0.0`` and ``0.0`` tie (as in numpy's comparisons).
    """
    n = block.shape[0]
    values = torch.from_numpy(np.ascontiguousarray(block)).to(device)
    desc, order = torch.sort(values + 0.0, dim=0, descending=True, stable=True)
    prev, nxt, gamma = linear_positions(n, levels)
    at = torch.from_numpy(np.concatenate([n - 1 - prev, n - 1 - nxt])).to(device)
    picked = desc.index_select(0, at)
    a, b = picked[: len(prev)], picked[len(prev) :]
    g = torch.from_numpy(gamma).to(device)[:, None]
    diff = (b - a).double()
    low = a.double() + diff * g
    high = b.double() - diff * (1 - g)
    quantiles = torch.where(g >= 0.5, high, low).float()
    k = min(top_k, n)
    top = order[:k]
    top_values = values.gather(0, top)  # the stored values (a -0.0 stays -0.0)
    return quantiles.cpu().numpy(), top.cpu().numpy(), top_values.cpu().numpy()
