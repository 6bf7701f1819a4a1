"""The last W judged inputs' p-values: their alarm rate and their distance from uniform.

Under exchangeable (normal) traffic a conformal p-value is uniform on ``{1, ..., n+1} / (n+1)``
(``n`` held-out images in the table's null), so the window's Kolmogorov-Smirnov distance from
Uniform(0, 1) measures drift: ``D = sup_t |F_m(t) - t|`` over the window's ``m`` p-values.
Because each p-value is its score's rank among the null, ``D`` is (up to the ``1/(n+1)`` grid)
the two-sample KS distance between the window's scores and the null's, whose critical value at
significance ``a`` is ``c(a) * sqrt(1/m + 1/n)`` with ``c(a) = sqrt(-ln(a/2) / 2)``: the
drift alert (the packaged ``serve/config/alerts.yml``) uses exactly that, with ``m`` and ``n``
from gauges.
"""

from __future__ import annotations

import math
import threading
from collections import deque

import numpy as np

from surprise_monitor.monitor.checks import positive_int


def ks_distance_from_uniform(p_values: np.ndarray) -> float:
    """``sup_t |F_m(t) - t|`` of the empirical CDF of ``p_values`` (in [0, 1]) against
    Uniform(0, 1); 0.0 for an empty array. The same statistic as
    ``scipy.stats.kstest(p, "uniform").statistic``."""
    m = int(p_values.size)
    if m == 0:
        return 0.0
    p = np.sort(np.asarray(p_values, dtype=np.float64))
    i = np.arange(1, m + 1, dtype=np.float64)
    return float(max(np.max(i / m - p), np.max(p - (i - 1) / m)))


def ks_critical_value(significance: float, m: int, n: int | None = None) -> float:
    """The asymptotic KS critical value ``c(a) * sqrt(1/m + 1/n)`` (``n=None``: one-sample,
    ``c(a) / sqrt(m)``), with ``c(a) = sqrt(-ln(a/2) / 2)``."""
    if not 0.0 < significance < 1.0:
        raise ValueError(f"significance must be in (0, 1), got {significance!r}")
    c = math.sqrt(-math.log(significance / 2.0) / 2.0)
    return c * math.sqrt(1.0 / m + (0.0 if n is None else 1.0 / n))


class PValueWindow:
    """A thread-safe sliding window of the last ``size`` p-values (NaN ones are not added).

    Args:
        size: p-values kept (the oldest leaves when a new one comes).
        alarm_rate: the nominal alarm rate: a p-value at most this is an alarm.
    """

    def __init__(self, size: int, alarm_rate: float) -> None:
        positive_int("window size", size)
        self.size = size
        self.alarm_rate = float(alarm_rate)
        self._values: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, p_values: list[float]) -> None:
        """Add a batch's p-values (NaN ones are skipped), oldest first."""
        finite = [float(p) for p in p_values if p == p]
        if finite:
            with self._lock:
                self._values.extend(finite)

    def snapshot(self) -> np.ndarray:
        """The window's p-values now, oldest first (a copy)."""
        with self._lock:
            return np.fromiter(self._values, dtype=np.float64, count=len(self._values))

    def stats(self) -> tuple[int, float, float]:
        """``(m, alarm rate, KS distance)`` of the window now: its size, the fraction of its
        p-values at most ``alarm_rate`` (NaN when empty) and the KS distance from uniform
        (NaN when empty), all from one consistent snapshot."""
        p = self.snapshot()
        if p.size == 0:
            return 0, float("nan"), float("nan")
        rate = float(np.count_nonzero(p <= self.alarm_rate)) / p.size
        return int(p.size), rate, ks_distance_from_uniform(p)
