"""How long the model's own forward passes take inside a monitored call, so the time the monitor
adds can be told apart from the model's."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

from surprise_monitor.monitor.probe.hooks import CopySafeHook


@dataclass
class ForwardTime:
    """The forward time measured in one :meth:`ForwardTimer.measure` block (set on exit)."""

    seconds: float = 0.0


class ForwardTimer:
    """Times the model's root forward passes made by the current thread inside :meth:`measure`.

    Adds a forward pre-hook and a forward hook on the model (removed by :meth:`close`); they do
    nothing in threads that are not measuring, and copies of the model carry inert ones.
    """

    def __init__(self, model: nn.Module) -> None:
        self._local = threading.local()
        self._handles = [
            model.register_forward_pre_hook(CopySafeHook(self._pre)),
            model.register_forward_hook(CopySafeHook(self._post)),
        ]

    def _pre(self, module: nn.Module, inputs: Any) -> None:
        """Start the clock of a forward pass in a measuring thread."""
        if getattr(self._local, "total", None) is not None:
            self._local.start = time.perf_counter()

    def _post(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """Add the forward pass's time to the measuring thread's total."""
        if getattr(self._local, "total", None) is not None:
            self._local.total += time.perf_counter() - self._local.start

    @contextmanager
    def measure(self) -> Iterator[ForwardTime]:
        """Yields a :class:`ForwardTime` that holds this thread's forward time on exit."""
        spent = ForwardTime()
        self._local.total = 0.0
        try:
            yield spent
        finally:
            spent.seconds = self._local.total
            self._local.total = None

    def close(self) -> None:
        """Remove the hooks (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
