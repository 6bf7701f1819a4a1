"""The request path around the judge: sampling, the async worker, fail-open counting,
``on_alarm`` callbacks, timing and Prometheus metrics."""

from surprise_monitor.monitor.options import MODES
from surprise_monitor.monitor.runtime.metrics import MetricsConflictError, MonitorMetrics
from surprise_monitor.monitor.runtime.request_path import MonitorResult, RequestPath
from surprise_monitor.monitor.runtime.sampling import Sampler
from surprise_monitor.monitor.runtime.timing import ForwardTimer
from surprise_monitor.monitor.runtime.worker import AsyncWorker

__all__ = [
    "MODES",
    "AsyncWorker",
    "ForwardTimer",
    "MetricsConflictError",
    "MonitorMetrics",
    "MonitorResult",
    "RequestPath",
    "Sampler",
]
