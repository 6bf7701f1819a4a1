"""CUDA graphs of the judge's device step: capture once per input signature, replay after.

An eager judgement on a GPU is launch- and sync-bound: hundreds of small kernel launches for a few
milliseconds of GPU work. :class:`StepGraphs` captures the whole device step (the probe's forward
and partial backward, ``grad_amap``, the lookup, the beta rank, the flags and the packing of the
results into one buffer, see :mod:`surprise_monitor.monitor.host_copy`) into a CUDA graph per
*signature* (input shape, strides, dtype and device, labels given or not, autocast state), and
replays it on later calls with the same signature:

1. a new signature runs eagerly ``warmup_calls`` times (it warms cuDNN's and Triton's
   autotuning, which must not run inside a capture);
2. the next call captures it into static buffers (the capture itself warms up on a side
   stream first, as CUDA graphs require) and replays it;
3. later calls copy the input into the static buffer, replay, and copy the packed results to
   the host once, under the graph's own lock (thread-safe: one replay of a graph at a time;
   graphs of other signatures replay concurrently).

At most ``max_graphs`` graphs are kept (least recently used dropped first: each holds the
memory of one step at its batch size). A capture that fails disables graphs for this judge,
logs once, and every call runs eagerly again (fail-open). The capture is a strategy object:
:class:`CudaCapture` on a GPU, a fake with the same contract in the CPU tests.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from surprise_monitor.monitor.checks import positive_int
from surprise_monitor.monitor.host_copy import Layout, layout_of, pack, unpack
from surprise_monitor.monitor.probe.grad_amap_probe import map_tensors

log = logging.getLogger(__name__)

#: A device step: ``(x, labels) -> (the model's output, {result name: device tensor})``.
Step = Callable[[torch.Tensor, torch.Tensor | None], tuple[Any, dict[str, torch.Tensor]]]
_CAPTURE_LOCK = threading.Lock()  # one capture at a time in the process


class Capture(Protocol):
    """How a function is recorded and replayed."""

    def capture(self, fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        """Record ``fn`` (which reads and writes only tensors it was given or made); return
        ``replay`` (re-runs the recording, overwriting the outputs in place) and the outputs."""
        ...


@dataclass
class CudaCapture:
    """:class:`Capture` with ``torch.cuda.CUDAGraph``: ``warmup`` runs on a side stream, then
    the capture (errors from other threads are not this capture's: ``thread_local`` mode)."""

    warmup: int = 2

    def capture(self, fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        """Warm up, capture and return ``(graph.replay, static outputs)``."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = fn()
        return graph.replay, out


def signature(x: torch.Tensor, labels: torch.Tensor | None) -> Hashable:
    """What a graph is specific to: the input's shape, strides, dtype and device, the labels'
    presence and dtype, and the autocast state of the input's device type."""
    kind = x.device.type
    autocast = (
        (True, torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else (False,)
    )
    lab = None if labels is None else (labels.dtype, labels.device)
    return (tuple(x.shape), x.stride(), x.dtype, x.device, lab, autocast)


def clone_tree(obj: Any) -> Any:
    """A copy of every tensor in a nested tuple/list/dict (a graph's static outputs are
    overwritten by its next replay)."""
    return map_tensors(torch.Tensor.clone, obj)


@dataclass
class _Graph:
    """One captured step: its static input buffers, replay, static outputs and lock."""

    x: torch.Tensor
    labels: torch.Tensor | None
    replay: Callable[[], None]
    output: Any
    packed: torch.Tensor
    layout: Layout
    lock: threading.Lock = field(default_factory=threading.Lock)


class StepGraphs:
    """Captured device steps, one per input signature (see the module docstring).

    Args:
        step: the eager device step (``(x, labels) -> (output, results)``).
        max_graphs: graphs kept at most (least recently used dropped first).
        warmup_calls: eager calls of a signature before it is captured.
        capture: the capture strategy (:class:`CudaCapture` by default).
        device_types: input device types that are captured (``("cuda",)``).
    """

    def __init__(
        self,
        step: Step,
        *,
        max_graphs: int,
        warmup_calls: int = 1,
        capture: Capture | None = None,
        device_types: tuple[str, ...] = ("cuda",),
    ) -> None:
        positive_int("max_graphs", max_graphs)
        self.step = step
        self.max_graphs = max_graphs
        self.warmup_calls = warmup_calls
        self.capturer = capture if capture is not None else CudaCapture()
        self.device_types = device_types
        self.disabled: str | None = None  # why graphs were turned off, if they were
        self.captures = 0
        self.replays = 0
        self._graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self._seen: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._graphs)

    def __call__(
        self, x: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[Any, dict[str, torch.Tensor]] | None:
        """The output (a copy) and the host results of a replay for ``x`` and ``labels``;
        ``None`` when the caller should run the eager step (a new signature, a device type
        that is not captured, graphs disabled)."""
        if self.disabled is not None or x.device.type not in self.device_types:
            return None
        key = signature(x, labels)
        graph = self._lookup(key)
        if graph is None:
            graph = self._maybe_capture(key, x, labels)
            if graph is None:
                return None
        return self._replay(graph, x, labels)

    def _lookup(self, key: Hashable) -> _Graph | None:
        """The graph of ``key``, marked most recently used."""
        with self._lock:
            graph = self._graphs.get(key)
            if graph is not None:
                self._graphs.move_to_end(key)
            return graph

    def _maybe_capture(
        self, key: Hashable, x: torch.Tensor, labels: torch.Tensor | None
    ) -> _Graph | None:
        """Count an eager call of a new signature, or capture it once it is warm."""
        with self._lock:
            seen = self._seen.get(key, 0)
            if seen < self.warmup_calls:
                self._seen[key] = seen + 1
                return None
        with _CAPTURE_LOCK:
            graph = self._lookup(key)  # another thread may have captured it meanwhile
            if graph is not None or self.disabled is not None:
                return graph
            try:
                graph = self._capture(x, labels)
            except Exception as exc:  # fail open: eager from now on
                self.disabled = f"{type(exc).__name__}: {exc}"
                log.warning("surprise monitor: CUDA graph capture failed (%s); running eagerly",
                            self.disabled)  # fmt: skip
                return None
        with self._lock:
            self._graphs[key] = graph
            self._seen.pop(key, None)
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
            self.captures += 1
        return graph

    def _capture(self, x: torch.Tensor, labels: torch.Tensor | None) -> _Graph:
        """Static buffers for ``x``/``labels`` and the recorded step over them."""
        with torch.inference_mode(False), torch.no_grad():
            static_x = torch.empty_like(x)
            static_x.copy_(x)
            static_labels = None if labels is None else labels.clone()
        kind = x.device.type
        autocast = (
            torch.autocast(kind, dtype=torch.get_autocast_dtype(kind), cache_enabled=False)
            if torch.is_autocast_enabled(kind)
            else nullcontext()
        )  # cached casts would be freed after the capture while the graph still uses them
        layouts: list[Layout] = []

        def run() -> tuple[Any, torch.Tensor]:
            """The step over the static buffers, its results packed into one buffer."""
            with autocast:
                output, results = self.step(static_x, static_labels)
            layout = layout_of(results)
            layouts.append(layout)
            return output, pack(results, layout)

        replay, (output, packed) = self.capturer.capture(run)
        return _Graph(static_x, static_labels, replay, output, packed, layouts[-1])

    def _replay(
        self, graph: _Graph, x: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        """Copy the inputs in, replay, copy the results out (one device-to-host copy)."""
        with graph.lock, torch.inference_mode(False), torch.no_grad():
            graph.x.copy_(x)
            if graph.labels is not None and labels is not None:
                graph.labels.copy_(labels)
            graph.replay()
            host = unpack(graph.packed.to("cpu", copy=True), graph.layout)
            output = clone_tree(graph.output)
            self.replays += 1
        return output, host

    def clear(self) -> None:
        """Drop every graph (and the memory it holds)."""
        with self._lock:
            self._graphs.clear()
            self._seen.clear()
