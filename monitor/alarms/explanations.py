"""Explanations of recorded alarms, computed on demand on one worker thread and cached.

:class:`ExplanationCache` serves the alarm log (:class:`~.log.AlarmLog`) and any view of a log
held elsewhere (the Ray Serve integration's page): an explanation is computed only when asked
for, never on the caller's thread, once per alarm while it stays among the newest ``size``.
"""

from __future__ import annotations

import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from surprise_monitor.monitor.judge import Judge

#: What an alarm's explanation needs: its input ``[C, H, W]`` and its label (or ``None``).
KeptInput = tuple[torch.Tensor, "int | None"]


def render_explanation(
    judge: Judge, x: torch.Tensor, label: int | None, explain_kwargs: Mapping[str, Any]
) -> tuple[bytes, dict[str, Any]]:
    """The explanation figure of ``x`` as PNG bytes and its summary
    (:func:`~surprise_monitor.monitor.explain.explain`'s ``Explanation.to_dict()``)."""
    from surprise_monitor.monitor.explain.explanation import explain

    expl = explain(judge, x, label=label, **dict(explain_kwargs))
    with tempfile.TemporaryDirectory(prefix="surprise-alarm-") as folder:
        path = expl.save_figure(Path(folder) / "figure.png")
        return path.read_bytes(), expl.to_dict()


class ExplanationCache:
    """The newest ``size`` alarms' explanations, each a future computed once on a worker thread.

    Args:
        size: explanations kept (the least recently asked for leaves first).
        explain_kwargs: passed to ``explain`` (e.g. ``mean=`` / ``std=``).
    """

    def __init__(self, size: int, explain_kwargs: Mapping[str, Any] | None = None) -> None:
        self.size = size
        self.explain_kwargs = dict(explain_kwargs or {})
        self._futures: OrderedDict[int, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def get(
        self, alarm_id: int, judge: Judge | None, kept: Callable[[], KeptInput | None]
    ) -> Future | None:
        """The alarm's explanation future (cached, or submitted now from ``kept()``, the
        alarm's input, which may block); ``None`` without a judge or a kept input."""
        with self._lock:
            cached = self._futures.get(alarm_id)
            if cached is not None:
                self._futures.move_to_end(alarm_id)
                return cached
        if judge is None:
            return None
        found = kept()
        if found is None:
            return None
        with self._lock:
            future = self._futures.get(alarm_id)
            if future is None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="surprise-alarm-explain")
                future = self._pool.submit(render_explanation, judge, found[0], found[1],
                                           self.explain_kwargs)  # fmt: skip
                self._futures[alarm_id] = future
                while len(self._futures) > self.size:
                    self._futures.popitem(last=False)
            return future

    def ready(self, alarm_id: int) -> dict[str, Any] | None:
        """The explanation's summary when it has been computed (successfully) and is still
        cached, else ``None``; computes nothing."""
        with self._lock:
            future = self._futures.get(alarm_id)
        if future is None or not future.done() or future.cancelled():
            return None
        return None if future.exception() is not None else future.result()[1]

    def __len__(self) -> int:
        with self._lock:
            return len(self._futures)

    def close(self, wait: bool = True) -> None:
        """Stop the worker (queued explanations are cancelled; ``wait`` for a running one)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)
