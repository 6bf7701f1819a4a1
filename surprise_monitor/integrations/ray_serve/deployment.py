"""The monitored model as a Ray Serve deployment: one ``SurpriseMonitor`` per replica.

:class:`MonitoredModel` takes ``surprise-serve``'s own flags (model, table, monitor, limits) and,
in each replica, loads the model and the table once, runs the monitor on the model's forward
pass, records the monitor's metrics through Ray (:mod:`.metrics`) and hands each alarm to the
application's alarm log (:mod:`.alarms`). Its HTTP routes are the service's
(:func:`surprise_monitor.serve.app.create_app`: ``/predict``, ``/predict/image``, ``/alarms/``,
``/healthz``; the metrics are on Ray's endpoint, not ``/metrics``) with the same JSON, limits and
error codes. Requests are joined by ``@serve.batch`` (``max_batch_size`` requests, waiting at
most ``batch_wait_timeout_s``) into one monitored forward pass, each input keeping its own
request's id; a batch the model cannot run is retried request by request, so a bad input fails
alone. Build the application with :func:`.app.build_app`.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from ray import serve

from surprise_monitor.integrations.ray_serve.alarms import (
    SEND_TIMEOUT,
    RemoteAlarmView,
    ReplicaAlarmRecorder,
)
from surprise_monitor.integrations.ray_serve.batching import (
    DEFAULT_BATCH_WAIT_S,
    Answer,
    BatchedService,
    Item,
)
from surprise_monitor.integrations.ray_serve.metrics import RayMetricsRegistry
from surprise_monitor.monitor.loading.model_args import model_from_args

log = logging.getLogger("surprise_monitor.serve.ray")


@serve.deployment(name="MonitoredModel", max_ongoing_requests=64)
@serve.ingress()
class MonitoredModel:
    """A model replica watched by the surprise monitor.

    Args:
        argv: ``surprise-serve``'s flags (``--model`` / ``--onnx``, ``--table``, the monitor's
            and the limits' flags; ``--host`` / ``--port`` are Serve's, not these).
        alarm_log: a handle of the application's :class:`.alarms.AlarmLogServer`, or ``None``.
        max_batch_size: requests joined into one monitored call at most.
        batch_wait_timeout_s: the longest a request waits for others to join it.
    """

    def __init__(
        self, argv: list[str], alarm_log: Any = None, max_batch_size: int = 16,
        batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S,
    ) -> None:  # fmt: skip
        from surprise_monitor.serve import flags
        from surprise_monitor.serve.limits import MIB, Limits

        args = flags.parser().parse_args(argv)
        flags.check_args(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        model = model_from_args(args, None, flags.TOOL).to(flags.device_of(args.device))
        table = flags.table_from_args(args)
        self.registry = RayMetricsRegistry()
        self.recorder = None
        if alarm_log is not None and not args.no_monitor:
            self.recorder = ReplicaAlarmRecorder(
                lambda payload: alarm_log.record.remote(payload).result(timeout_s=SEND_TIMEOUT),
                self.replica,
            )  # fmt: skip
        self.monitor = None
        if not args.no_monitor:
            self.monitor = flags.monitor_from_args(args, model, table, self.registry, self.recorder)
        self.view = None
        if alarm_log is not None:

            def call(method: str, *a: Any) -> Any:
                return getattr(alarm_log, method).remote(*a).result(timeout_s=SEND_TIMEOUT)

            judge = self.monitor.judge if self.monitor is not None else None
            self.view = RemoteAlarmView(call, judge)
        self._batch.set_max_batch_size(max_batch_size)
        self._batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="surprise-ray-batch")
        limits = Limits(int(args.max_body_mb * MIB), args.max_batch, args.max_image_pixels)
        self.model, self.table, self.limits = model, table, limits
        self.service = BatchedService(model, self.monitor, table, limits, batched=self._batch)
        log.info("replica %s: %s", self.replica, flags.startup_line(args, table))

    def __serve_build_asgi_app__(self) -> Any:
        from surprise_monitor.serve.app import create_app

        return create_app(
            self.model, self.monitor, table=self.table, limits=self.limits, registry=None,
            service=self.service, alarm_view=self.view,
        )  # fmt: skip

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _batch(self, items: list[Item]) -> list[Answer | Exception]:
        """Requests joined by Serve, run on the replica's model thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.service.run_joined, items)

    def __del__(self) -> None:
        if getattr(self, "recorder", None) is not None:
            self.recorder.close()
        if getattr(self, "monitor", None) is not None:
            self.monitor.close()
        if getattr(self, "registry", None) is not None:
            self.registry.close()
