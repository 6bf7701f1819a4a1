"""Approximate mode: the fixed grid's error bound, measured against the exact table."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from surprise_monitor.calibrate import calibrate
from surprise_monitor.calibrate.distributed import DistInfo
from surprise_monitor.calibrate.options import RunOptions
from surprise_monitor.calibrate.sketch import HistogramSketch, LogGrid, histogram_quantiles
from surprise_monitor.monitor.table import DEFAULT_BETA_LEVELS, DEFAULT_LEVELS, levels_with_required
from tests._checks import spilled_alpha
from tests._models import TinyCNN, class_dataset, seeded

LEVELS = levels_with_required(DEFAULT_LEVELS)
BETA_LEVELS = levels_with_required(DEFAULT_BETA_LEVELS)


def test_grid_bins_are_ordered_and_within_relative_accuracy():
    grid = LogGrid(0.01, 1e-6, 1e3)
    rng = np.random.default_rng(0)
    mags = 10 ** rng.uniform(-6, 3, 20000)
    x = np.concatenate([mags, -mags, [0.0, 1e-7, -1e-7]])
    bins = grid.bins(x)
    values = grid.values()
    assert grid.num_bins == len(values) == 2 * grid.per_sign + 1
    assert np.all(np.diff(values) > 0)
    order = np.argsort(x, kind="stable")
    assert np.all(np.diff(bins[order]) >= 0)  # bins ascend with the value
    rel = np.abs(values[bins[:-3]] - x[:-3]) / np.abs(x[:-3])
    assert rel.max() <= 0.01 * (1 + 1e-9)
    assert list(values[bins[-3:]]) == [0.0, 0.0, 0.0]  # below min_magnitude: the zero bin
    with pytest.raises(ValueError, match="relative_accuracy"):
        LogGrid(1.5)


def _bound(sorted_col: np.ndarray, level: float, a: float, m: float) -> float:
    """The guarantee at one level: a * the larger |order statistic| interpolated, plus m."""
    n = len(sorted_col)
    h = level / 100 * (n - 1)
    lo = int(np.floor(h))
    hi = min(lo + 1, n - 1)
    return a * max(abs(sorted_col[lo]), abs(sorted_col[hi])) + m


def test_histogram_quantiles_heavy_tails_against_numpy():
    rng = np.random.default_rng(1)
    data = np.stack([rng.standard_cauchy(20000), rng.lognormal(0, 2, 20000) * 1e-3]).T
    data = np.clip(data, -900, 900).astype(np.float32)
    grid = LogGrid(0.005, 1e-6, 1e3)
    acc = HistogramSketch(1, 2, 3, grid)
    for s in range(0, len(data), 1000):
        acc.add(data[s : s + 1000], np.zeros(1000, np.int64), np.arange(s, s + 1000))
    est = acc.statistics(0, LEVELS, BETA_LEVELS).quantiles
    exact = np.percentile(data, LEVELS, axis=0).T
    for n in range(2):
        col = np.sort(data[:, n])
        for q, level in enumerate(LEVELS):
            err = abs(float(est[n, q]) - exact[n, q])
            assert err <= _bound(col, level, 0.005, 1e-6) * (1 + 1e-5), (n, level, err)
    # Tail error in rank: how many calibration values lie between estimate and truth at 99.9.
    q999 = list(LEVELS).index(99.9)
    between = np.abs((data[:, 0] <= est[0, q999]).mean() - (data[:, 0] <= exact[0, q999]).mean())
    assert between <= 2 / 20000
    assert est[0, 0] == data[:, 0].min() and est[0, -1] == data[:, 0].max()  # exact extremes


def test_approximate_table_against_the_exact_table(tmp_path):
    """A model on 1500 calibration images: every level within the grid's bound."""
    model = seeded(TinyCNN(num_classes=3))
    data = class_dataset(1500, 3, seed=1)
    a, m = 0.01, 1e-6
    exact = calibrate(
        model, data, progress=False, run=RunOptions(batch_size=100, spill_dir=tmp_path)
    )
    approx = calibrate(
        model, data, progress=False, run=RunOptions(batch_size=100, approximate=LogGrid(a, m, 1e3))
    )
    assert torch.equal(exact.counts, approx.counts)
    assert torch.equal(exact.top_indices, approx.top_indices)
    assert torch.equal(exact.top_alpha, approx.top_alpha)
    torch.testing.assert_close(exact.mean, approx.mean, rtol=1e-5, atol=1e-7)
    assert torch.equal(exact.quantiles[..., 0], approx.quantiles[..., 0])  # minimum
    assert torch.equal(exact.quantiles[..., -1], approx.quantiles[..., -1])  # maximum
    worst = {}
    for c in range(3):
        alpha = np.sort(spilled_alpha(tmp_path, c, exact.num_filters), axis=0)
        for n in range(exact.num_filters):
            for q, level in enumerate(LEVELS):
                err = abs(float(approx.quantiles[c, n, q]) - float(exact.quantiles[c, n, q]))
                assert err <= _bound(alpha[:, n], level, a, m) * (1 + 1e-5) + 1e-7
                scale = abs(float(exact.quantiles[c, n, q]))
                if scale > 100 * m:  # relative error where it means something
                    worst[level] = max(worst.get(level, 0.0), err / scale)
    # The measured relative errors at the monitor's thresholds (0.1 and 99.9; about 0.5 % on
    # this data) and everywhere: inside the grid's 1 %.
    assert worst[0.1] <= a and worst[99.9] <= a and max(worst.values()) <= a * (1 + 1e-4)
    # Betas come from a histogram of each image's mean alpha: error within a * |row mean| + m.
    for c in range(3):
        row_means = spilled_alpha(tmp_path, c, exact.num_filters).mean(1, dtype=np.float64)
        beta_err = (exact.beta_quantiles[c] - approx.beta_quantiles[c]).abs().amax()
        assert beta_err <= a * np.abs(row_means).max() + m + 1e-7


class ThreadComm:
    """The collectives :meth:`HistogramSketch.reduce` uses, between threads standing for ranks."""

    def __init__(self, rank: int, shared: dict) -> None:
        self.info = DistInfo(rank, shared["world"])
        self.shared = shared

    def _exchange(self, array: np.ndarray) -> list[np.ndarray]:
        """Every rank's ``array`` (copies), once all ranks have given theirs."""
        self.shared["slots"][self.info.rank] = array.copy()
        self.shared["barrier"].wait()
        gathered = list(self.shared["slots"])
        self.shared["barrier"].wait()
        return gathered

    def all_reduce(self, array: np.ndarray, op: str = "sum") -> np.ndarray:
        reduce = {"sum": np.sum, "min": np.min, "max": np.max}[op]
        array[...] = reduce(np.stack(self._exchange(array)), axis=0)
        return array

    def all_gather(self, array: np.ndarray) -> list[np.ndarray]:
        return self._exchange(array)


def test_merge_and_state_round_trip(tmp_path):
    grid = LogGrid(0.02, 1e-5, 10.0)
    rng = np.random.default_rng(2)
    alpha = rng.normal(0, 1, (300, 5)).astype(np.float32)
    y = rng.integers(0, 4, 300)
    idx = np.arange(300)
    one = HistogramSketch(4, 5, 3, grid)
    one.add(alpha, y, idx)
    parts = [HistogramSketch(4, 5, 3, grid) for _ in range(3)]
    for i, p in enumerate(parts):
        sel = slice(100 * i, 100 * i + 100)
        p.add(alpha[sel], y[sel], idx[sel])
    # Three "ranks" reduce their parts, as under torchrun: every part becomes the whole.
    shared = {"world": 3, "slots": [None] * 3, "barrier": threading.Barrier(3, timeout=30)}
    ranks = [threading.Thread(target=p.reduce, args=(ThreadComm(r, shared),))
             for r, p in enumerate(parts)]  # fmt: skip
    for t in ranks:
        t.start()
    for t in ranks:
        t.join(60)
    for name in ("counts", "row_counts", "images", "mins", "maxs", "top_indices", "top_alpha"):
        for p in parts:
            np.testing.assert_array_equal(one.arrays[name], p.arrays[name], err_msg=name)
    np.testing.assert_allclose(one.arrays["sums"], parts[2].arrays["sums"], rtol=1e-12)
    assert one.overflow == (np.abs(alpha) > 10).sum()

    one.save(tmp_path / "s.safetensors")
    back = HistogramSketch(4, 5, 3, grid)
    back.load(tmp_path / "s.safetensors")
    for name, arr in one.arrays.items():
        np.testing.assert_array_equal(arr, back.arrays[name])
    other = HistogramSketch(4, 5, 3, LogGrid(0.01, 1e-5, 10.0))
    with pytest.raises(ValueError, match="other shapes or grid"):
        other.load(tmp_path / "s.safetensors")
    held = sum(a.nbytes for a in one.arrays.values())
    assert abs(HistogramSketch.memory_bytes(4, 5, 3, grid) - held) <= 64


def test_empty_rows_and_quantile_helper():
    values = np.array([-1.0, 0.0, 1.0, 2.0])
    counts = np.array([[0, 0, 0, 0], [1, 0, 2, 1]])
    q = histogram_quantiles(counts, values, np.array([0, -1.5]), np.array([0, 2.5]),
                            np.array([0.0, 50.0, 100.0]))  # fmt: skip
    assert np.isnan(q[0]).all()
    assert q[1].tolist() == [-1.5, 1.0, 2.5]  # exact extremes; the median is bin 2's value
