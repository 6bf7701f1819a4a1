"""The async mode's worker: a bounded queue and one daemon thread, which can take several queued
items at once (the request path joins them into one judge call)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from surprise_monitor.monitor.checks import positive_int


class AsyncWorker:
    """A bounded queue and one daemon thread that handles its items in order.

    Without ``take``, ``handle(item)`` is called once per item. With ``take``, ``handle(items)``
    gets a list: the first ``take(queued)`` items waiting (``queued`` is the queue itself, in
    order, read under the worker's lock: ``take`` must be quick and must not change it; it is
    held to between one and all of them, and one when it raises).

    :meth:`submit` never blocks: it returns False when the queue is full or closed.
    ``handle`` must not raise (exceptions are swallowed to keep the worker alive).
    ``on_depth`` is told how many items wait after each change.
    """

    def __init__(
        self,
        handle: Callable[[Any], None],
        maxsize: int,
        on_depth: Callable[[int], None] | None = None,
        name: str = "surprise-monitor-worker",
        take: Callable[[Sequence[Any]], int] | None = None,
    ) -> None:
        positive_int("queue_size", maxsize)
        self.maxsize = maxsize
        self._handle = handle
        self._on_depth = on_depth
        self._take = take
        self._items: deque[Any] = deque()
        self._busy = 0
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        """The worker's thread."""
        return self._thread

    def _report_depth(self) -> None:
        """Tell ``on_depth`` how many items wait (called with the lock held)."""
        if self._on_depth is not None:
            self._on_depth(len(self._items))

    def submit(self, item: Any) -> bool:
        """Queue ``item``; False (nothing queued) when the queue is full or closed."""
        with self._cond:
            if self._closed or len(self._items) >= self.maxsize:
                return False
            self._items.append(item)
            self._report_depth()
            self._cond.notify_all()
            return True

    def _pop(self) -> Any:
        """The next item, or (with ``take``) a list of the next items (called with the lock
        held, the queue not empty)."""
        if self._take is None:
            return self._items.popleft()
        try:
            count = min(max(1, self._take(self._items)), len(self._items))
        except Exception:  # noqa: BLE001 - a broken take must not stop the worker
            count = 1
        return [self._items.popleft() for _ in range(count)]

    def _loop(self) -> None:
        """The thread: handle items in order until closed and drained."""
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:  # closed and drained
                    return
                work = self._pop()
                self._busy += 1
                self._report_depth()
            try:
                self._handle(work)
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
