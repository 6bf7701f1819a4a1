"""Runtime pieces of the monitor: input sampling, the async worker, timing, per-input reports."""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from monitor.report import MonitorReport

MODES = ("sync", "async")


@dataclass(frozen=True)
class MonitorResult:
    """What one monitored call produced.

    ``output`` is the model's output for the whole batch. ``report`` covers the batch rows in
    ``rows`` (``report.sample(j)`` is row ``rows[j]``); it is ``None`` when no row was judged on
    the request path (all sampled out, monitoring failed, or async mode).
    """

    output: Any
    report: MonitorReport | None
    rows: torch.Tensor  # [R] int64 batch indices the report covers (empty when report is None)


def select_rows(report: MonitorReport, rows: list[int] | torch.Tensor) -> MonitorReport:
    """The report restricted to the given batch rows (all per-sample tensors indexed)."""
    idx = torch.as_tensor(rows, dtype=torch.long)
    changes = {
        f.name: getattr(report, f.name)[idx]
        for f in fields(report)
        if isinstance(getattr(report, f.name), torch.Tensor)
    }
    return replace(report, **changes)


class Sampler:
    """Chooses which inputs to monitor: one in ``every`` (counted over all calls and threads,
    so exactly ``ceil(T / every)`` of T inputs) or a random ``fraction`` (seeded)."""

    def __init__(self, every: int = 1, fraction: float = 1.0, seed: int | None = 0) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"sample_every must be an integer >= 1, got {every!r}")
        fraction = float(fraction)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"sample_fraction must be in (0, 1], got {fraction}")
        if every > 1 and fraction < 1.0:
            raise ValueError("give sample_every or sample_fraction, not both")
        self.every = every
        self.fraction = fraction
        self._lock = threading.Lock()
        self._seen = 0
        self._rng = random.Random(seed)

    @property
    def takes_all(self) -> bool:
        return self.every == 1 and self.fraction == 1.0

    def select(self, n: int) -> torch.Tensor:
        """``[n]`` bool: which of the next ``n`` inputs to monitor."""
        if self.takes_all:
            return torch.ones(n, dtype=torch.bool)
        with self._lock:
            start, self._seen = self._seen, self._seen + n
            if self.fraction < 1.0:
                draws = [self._rng.random() < self.fraction for _ in range(n)]
                return torch.tensor(draws, dtype=torch.bool)
        return (torch.arange(start, start + n) % self.every) == 0


class ForwardTimer:
    """Times the model's root forward passes made by the current thread inside :meth:`measure`.

    Adds a forward pre-hook and a forward hook on the model (removed by :meth:`close`); they do
    nothing in threads that are not measuring.
    """

    def __init__(self, model: nn.Module) -> None:
        self._local = threading.local()
        self._handles = [
            model.register_forward_pre_hook(self._pre),
            model.register_forward_hook(self._post),
        ]

    def _pre(self, module: nn.Module, inputs: Any) -> None:
        if getattr(self._local, "total", None) is not None:
            self._local.start = time.perf_counter()

    def _post(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if getattr(self._local, "total", None) is not None:
            self._local.total += time.perf_counter() - self._local.start

    @contextmanager
    def measure(self) -> Iterator[list[float]]:
        """Yields a one-element list that holds the forward time (seconds) on exit."""
        box = [0.0]
        self._local.total = 0.0
        try:
            yield box
        finally:
            box[0] = self._local.total
            self._local.total = None

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class AsyncWorker:
    """A bounded queue and one daemon thread that handles its items in order.

    :meth:`submit` never blocks: it returns False when the queue is full or closed.
    ``handle`` must not raise (exceptions are swallowed to keep the worker alive).
    """

    def __init__(
        self,
        handle: Callable[[Any], None],
        maxsize: int,
        on_depth: Callable[[int], None] | None = None,
        name: str = "surprise-monitor-worker",
    ) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"queue_size must be an integer >= 1, got {maxsize!r}")
        self.maxsize = maxsize
        self._handle = handle
        self._on_depth = on_depth
        self._items: deque[Any] = deque()
        self._busy = 0
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _depth(self) -> None:
        if self._on_depth is not None:
            self._on_depth(len(self._items))

    def submit(self, item: Any) -> bool:
        """Queue ``item``; False (nothing queued) when the queue is full or closed."""
        with self._cond:
            if self._closed or len(self._items) >= self.maxsize:
                return False
            self._items.append(item)
            self._depth()
            self._cond.notify_all()
            return True

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:  # closed and drained
                    return
                item = self._items.popleft()
                self._busy += 1
                self._depth()
            try:
                self._handle(item)
            except Exception:  # noqa: BLE001 - the handler counts its own failures
                pass
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued item is handled; False if ``timeout`` ran out first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._items and self._busy == 0, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Handle what is queued, then stop the thread (idempotent)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._items)
