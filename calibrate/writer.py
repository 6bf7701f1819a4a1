"""Each batch's alpha handed to the accumulator on a writer thread, so the copy to the host and
the spill writes overlap the next batch's compute.

The calibration loop computes a batch's alpha on the device and :meth:`BatchWriter.submit`\\ s
it: on CUDA, the alpha, the labels and a device-side "images were finite" flag are copied into
pinned host buffers with ``non_blocking`` copies and an event is recorded; no host sync. The
writer thread waits for the event, runs the value checks (finite images, finite alpha) on the
host copies, and adds the rows to the accumulator, in submission order. At most ``depth``
batches wait (``submit`` blocks beyond that: memory stays bounded). The first error stops the
writer (later batches are not added) and is raised in the calibration thread by the next
``submit``, :meth:`BatchWriter.drain` or :meth:`BatchWriter.close`. A checkpoint drains first,
so a manifest only records rows that are in the accumulator.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class PendingBatch:
    """One batch's results on their way to the host."""

    alpha: torch.Tensor  # [B, N] float32 (pinned host memory on CUDA)
    labels: torch.Tensor  # [B] int64
    images_finite: torch.Tensor  # [] bool
    indices: np.ndarray  # [B] int64 dataset indices
    ready: Any = None  # a CUDA event recorded after the copies, or None

    @classmethod
    def start(
        cls, alpha: torch.Tensor, labels: torch.Tensor, images_finite: torch.Tensor,
        indices: np.ndarray,
    ) -> PendingBatch:  # fmt: skip
        """Start copying a batch's device results to the host (no sync)."""
        if alpha.device.type != "cuda":
            return cls(alpha.float(), labels, images_finite, indices)
        host = [
            torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            for t in (alpha.float(), labels.long(), images_finite)
        ]
        event = torch.cuda.Event()
        event.record()
        return cls(host[0], host[1], host[2], indices, event)

    def wait(self) -> None:
        """Block until the copies are done."""
        if self.ready is not None:
            self.ready.synchronize()


#: What the writer does with a batch once it is on the host: checks, then the accumulator.
Sink = Callable[[PendingBatch], None]
_STOP = object()


class BatchWriter:
    """A thread that hands submitted batches to ``sink`` in order (see the module docstring).

    Args:
        sink: called with each :class:`PendingBatch` once it is on the host.
        depth: batches that may wait for the writer.
    """

    def __init__(self, sink: Sink, depth: int = 2) -> None:
        self.sink = sink
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="calibrate-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        """The writer thread: wait for each batch's copies, then the sink; stop at an error."""
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._error is None:
                    item.wait()
                    self.sink(item)
            except BaseException as exc:  # raised in the calibration thread
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        """Raise the writer's error, if there was one."""
        if self._error is not None:
            raise self._error

    def submit(self, batch: PendingBatch) -> None:
        """Queue a batch (blocks while ``depth`` batches wait); raises an earlier batch's error."""
        self._raise()
        if not self._thread.is_alive():
            raise RuntimeError("the calibration writer has stopped")
        self._queue.put(batch)

    def drain(self) -> None:
        """Wait until every queued batch went to the sink; raises the writer's error."""
        self._queue.join()
        self._raise()

    def close(self) -> None:
        """Stop the thread after the queued batches (idempotent)."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
