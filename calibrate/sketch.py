"""Approximate calibration: a fixed-grid histogram per (class, filter) instead of spilled rows.

For calibration sets too large to spill (``filters x 4`` bytes per image), ``calibrate(...,
approximate=True)`` keeps, per class and filter, a histogram of alpha on one fixed grid, plus
exact counts, sums (float64), minimum, maximum and top-k exemplars. Memory is
``classes x filters x (bins x 4 + 24 + top_k x 12)`` bytes whatever the number of images, no
alpha is written to disk, and states merge exactly by adding counts (ranks, resumed runs).

The grid (:class:`LogGrid`) is logarithmic in ``|alpha|`` on both signs, like DDSketch's: bin
``i`` of a sign holds magnitudes in ``(m * g**(i-1), m * g**i]`` with ``g = (1 + a) / (1 - a)``
and ``m = min_magnitude``; its value ``2 m g**i / (g + 1)`` is within relative error ``a`` of
every magnitude in the bin. Magnitudes below ``m`` fall in one zero bin (absolute error below
``m``); magnitudes above ``max_magnitude`` fall in the outermost bin, where only the exact
minimum and maximum bound them (they are counted in :attr:`HistogramSketch.overflow`).

Guarantee: each order statistic the table's percentiles interpolate is estimated within
``a * |value| + m`` (overflow aside); the 0 and 100 levels are exact (the minimum and maximum),
and so are the means, counts and top-k exemplars. Betas are taken from a histogram of each
image's mean alpha on the same grid.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from safetensors.numpy import save as safetensors_save

from surprise_monitor.calibrate.distributed import Comm
from surprise_monitor.calibrate.statistics import ClassStatistics
from surprise_monitor.monitor.checks import fraction
from surprise_monitor.monitor.files import atomic_write_bytes


@dataclass(frozen=True)
class LogGrid:
    """A fixed logarithmic grid on both signs: ``relative_accuracy`` between
    ``min_magnitude`` and ``max_magnitude``."""

    relative_accuracy: float = 0.01
    min_magnitude: float = 1e-6
    max_magnitude: float = 1e3

    def __post_init__(self) -> None:
        fraction("relative_accuracy", self.relative_accuracy)
        if not 0 < self.min_magnitude < self.max_magnitude:
            raise ValueError("need 0 < min_magnitude < max_magnitude")

    @property
    def gamma(self) -> float:
        """The ratio of consecutive bin edges, ``(1 + a) / (1 - a)``."""
        a = self.relative_accuracy
        return (1 + a) / (1 - a)

    @property
    def per_sign(self) -> int:
        """Bins on each side of the zero bin."""
        ratio = math.log(self.max_magnitude / self.min_magnitude)
        return max(1, math.ceil(ratio / math.log(self.gamma)))

    @property
    def num_bins(self) -> int:
        """Bins in all: both signs and the zero bin."""
        return 2 * self.per_sign + 1

    def settings(self) -> dict[str, float]:
        """The grid's parameters (what a checkpoint records)."""
        return asdict(self)

    def bins(self, x: np.ndarray) -> np.ndarray:
        """Bin of each value (``int64``, same shape): ascending in value."""
        p = self.per_sign
        mag = np.abs(np.asarray(x, np.float64))
        with np.errstate(divide="ignore"):
            i = np.ceil(np.log(mag / self.min_magnitude) / math.log(self.gamma))
        i = np.where(mag < self.min_magnitude, 0, np.clip(i, 1, p)).astype(np.int64)
        return np.where(x < 0, p - i, p + i)

    def values(self) -> np.ndarray:
        """The value each bin stands for (``float64 [num_bins]``, ascending)."""
        p = self.per_sign
        g = self.gamma
        mags = 2 * self.min_magnitude * g ** np.arange(1, p + 1, dtype=np.float64) / (g + 1)
        return np.concatenate([-mags[::-1], [0.0], mags])

    def overflows(self, x: np.ndarray) -> np.ndarray:
        """Where a value lies beyond the grid (its bin bounds it only through min / max)."""
        return np.abs(x) > self.max_magnitude * (1 + 1e-12)


#: How each array of two states combines.
_MERGE_OPS = {
    "counts": "sum", "row_counts": "sum", "images": "sum", "sums": "sum", "overflow": "sum",
    "mins": "min", "row_mins": "min", "maxs": "max", "row_maxs": "max",
}  # fmt: skip


def histogram_quantiles(
    counts: np.ndarray, values: np.ndarray, lo: np.ndarray, hi: np.ndarray, levels: np.ndarray
) -> np.ndarray:
    """Percentiles (numpy's ``linear`` method) of the data behind histograms ``[R, B]``.

    Order statistic ``j`` of a row is the value of the bin holding it, clamped to the row's exact
    ``[lo, hi]``; the first and last order statistics are ``lo`` and ``hi`` exactly.
    Returns ``[R, len(levels)]`` float64 (NaN for empty rows).
    """
    counts = np.asarray(counts, np.int64)
    n = counts.sum(axis=1)
    cum = np.cumsum(counts, axis=1)
    out = np.full((counts.shape[0], len(levels)), np.nan)
    ok = n > 0
    if not ok.any():
        return out
    cum, n, lo, hi = cum[ok], n[ok], np.asarray(lo, np.float64)[ok], np.asarray(hi, np.float64)[ok]

    def order_stat(j: np.ndarray) -> np.ndarray:
        """Order statistic ``j`` of each row: its bin's value, clamped; the ends exact."""
        b = (cum <= j[:, None]).sum(axis=1)
        v = np.clip(values[np.minimum(b, len(values) - 1)], lo, hi)
        return np.where(j == 0, lo, np.where(j == n - 1, hi, v))

    cols = []
    for level in levels:
        h = level / 100.0 * (n - 1)
        j = np.floor(h).astype(np.int64)
        f = h - j
        v0 = order_stat(j)
        v1 = order_stat(np.minimum(j + 1, n - 1))
        cols.append(v0 + f * (v1 - v0))
    out[ok] = np.stack(cols, axis=1)
    return out


class HistogramSketch:
    """Mergeable per (class, filter) histograms with exact count, sum, min, max and top-k."""

    def __init__(self, num_classes: int, num_filters: int, top_k: int, grid: LogGrid) -> None:
        self.grid = grid
        k, n, b = int(num_classes), int(num_filters), grid.num_bins
        self.num_classes, self.num_filters, self.top_k = k, n, int(top_k)
        self.arrays: dict[str, np.ndarray] = {
            "counts": np.zeros((k, n, b), np.int32),
            "row_counts": np.zeros((k, b), np.int32),
            "images": np.zeros(k, np.int64),
            "sums": np.zeros((k, n), np.float64),
            "mins": np.full((k, n), np.inf, np.float32),
            "maxs": np.full((k, n), -np.inf, np.float32),
            "row_mins": np.full(k, np.inf, np.float64),
            "row_maxs": np.full(k, -np.inf, np.float64),
            "top_alpha": np.full((k, n, top_k), -np.inf, np.float32),
            "top_indices": np.full((k, n, top_k), -1, np.int64),
            "overflow": np.zeros(1, np.int64),
        }

    @property
    def overflow(self) -> int:
        """Values seen beyond ``max_magnitude`` (their percentiles are less accurate)."""
        return int(self.arrays["overflow"][0])

    @staticmethod
    def memory_bytes(num_classes: int, num_filters: int, top_k: int, grid: LogGrid) -> int:
        """Bytes the accumulator holds: ``K x N x (4 bins + 16 + 12 top_k)`` plus per class."""
        per_pair = 4 * grid.num_bins + 8 + 4 + 4 + 12 * top_k
        return num_classes * (num_filters * per_pair + 4 * grid.num_bins + 24)

    def add(self, alpha: np.ndarray, classes: np.ndarray, indices: np.ndarray) -> None:
        """Add rows ``alpha[i]`` (``[B, N]`` float32) of ``classes[i]``, ``indices[i]``."""
        a = self.arrays
        alpha = np.ascontiguousarray(alpha, np.float32)
        classes = np.asarray(classes, np.int64)
        indices = np.asarray(indices, np.int64)
        n, nb = self.num_filters, self.grid.num_bins
        if alpha.ndim != 2 or alpha.shape[1] != n:
            raise ValueError(f"alpha rows must be [B, {n}], got {alpha.shape}")
        flat = (classes[:, None] * n + np.arange(n)) * nb + self.grid.bins(alpha)
        np.add.at(a["counts"].reshape(-1), flat.reshape(-1), 1)
        row_mean = alpha.mean(axis=1, dtype=np.float64)
        np.add.at(a["row_counts"], (classes, self.grid.bins(row_mean)), 1)
        np.add.at(a["images"], classes, 1)
        np.add.at(a["sums"], classes, alpha.astype(np.float64))
        np.minimum.at(a["mins"], classes, alpha)
        np.maximum.at(a["maxs"], classes, alpha)
        np.minimum.at(a["row_mins"], classes, row_mean)
        np.maximum.at(a["row_maxs"], classes, row_mean)
        a["overflow"][0] += int(self.grid.overflows(alpha).sum())
        for c in np.unique(classes):
            sel = classes == c
            rows = alpha[sel]
            idx = np.broadcast_to(indices[sel][:, None], rows.shape)
            self._merge_top(int(c), rows, idx)

    def _merge_top(self, c: int, values: np.ndarray, indices: np.ndarray) -> None:
        """Keep the ``top_k`` largest per filter among the kept ones and ``values [m, N]``."""
        a = self.arrays
        v = np.concatenate([a["top_alpha"][c].T, values])  # [k + m, N]
        i = np.concatenate([a["top_indices"][c].T, indices])
        # Largest value first; ties: the smaller dataset index; empty slots (-inf, -1) last.
        empty = i < 0
        order = np.lexsort((np.where(empty, np.iinfo(np.int64).max, i), -v, empty), axis=0)
        order = order[: self.top_k]
        a["top_alpha"][c] = np.take_along_axis(v, order, axis=0).T
        a["top_indices"][c] = np.take_along_axis(i, order, axis=0).T

    def reduce(self, comm: Comm) -> None:
        """Sum the ranks' states into every rank's, class by class (counts add, extremes take
        the min / max, exemplars keep the top-k of all ranks)."""
        if not comm.info.distributed:
            return
        a = self.arrays
        for name in ("images", "row_counts", "row_mins", "row_maxs", "overflow"):
            comm.all_reduce(a[name], _MERGE_OPS[name])
        for c in range(self.num_classes):
            for name in ("counts", "sums", "mins", "maxs"):
                comm.all_reduce(a[name][c], _MERGE_OPS[name])
            values = comm.all_gather(a["top_alpha"][c])
            indices = comm.all_gather(a["top_indices"][c])
            a["top_alpha"][c] = -np.inf
            a["top_indices"][c] = -1
            for v, i in zip(values, indices, strict=True):
                self._merge_top(c, v.T, i.T)

    def statistics(self, c: int, levels: np.ndarray, beta_levels: np.ndarray) -> ClassStatistics:
        """Class ``c``'s statistics, with percentiles estimated from the histograms."""
        a = self.arrays
        n_img = int(a["images"][c])
        if n_img == 0:
            nf, k = self.num_filters, self.top_k
            return ClassStatistics.empty(nf, len(levels), len(beta_levels), k)
        values = self.grid.values()
        quantiles = histogram_quantiles(a["counts"][c], values, a["mins"][c], a["maxs"][c], levels)
        mean = a["sums"][c] / n_img
        row_q = histogram_quantiles(
            a["row_counts"][c : c + 1], values, a["row_mins"][c : c + 1],
            a["row_maxs"][c : c + 1], beta_levels,
        )[0]  # fmt: skip
        beta_quantiles = row_q - mean.mean()
        top_indices = a["top_indices"][c].copy()
        top_alpha = np.where(top_indices >= 0, a["top_alpha"][c], np.nan).astype(np.float32)
        return ClassStatistics(
            np.maximum.accumulate(quantiles.astype(np.float32), axis=1),
            mean.astype(np.float32),
            np.maximum.accumulate(beta_quantiles.astype(np.float32)),
            top_indices,
            top_alpha,
            n_img,
        )

    # ------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write the state atomically (safetensors, no pickling)."""
        atomic_write_bytes(path, safetensors_save(self.arrays, metadata=self._meta()))

    def load(self, path: str | Path) -> None:
        """Replace the state with one written by :meth:`save` for the same shapes and grid."""
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
        if meta != self._meta():
            raise ValueError(f"{path}: sketch state of other shapes or grid ({meta})")
        arrays = load_file(str(path))
        if set(arrays) != set(self.arrays):
            raise ValueError(f"{path}: sketch state lacks arrays")
        for name, arr in arrays.items():
            if arr.shape != self.arrays[name].shape or arr.dtype != self.arrays[name].dtype:
                raise ValueError(f"{path}: sketch array {name} has the wrong shape or type")
        self.arrays = arrays

    def _meta(self) -> dict[str, str]:
        """The state file's metadata: grid and shapes, checked on load."""
        return {
            "grid": repr(sorted(self.grid.settings().items())),
            "shape": f"{self.num_classes},{self.num_filters},{self.top_k}",
        }
