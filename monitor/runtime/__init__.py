"""The request path around the judge: sampling, the async worker, fail-open counting,
``on_flag`` callbacks, timing and Prometheus metrics."""

from monitor.runtime.metrics import MetricsConflictError, MonitorMetrics
from monitor.runtime.request_path import MODES, MonitorResult, RequestPath
from monitor.runtime.sampling import Sampler
from monitor.runtime.timing import ForwardTimer
from monitor.runtime.worker import AsyncWorker

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
