"""The product at inference time (``surprise_monitor.monitor``): a per-input alarm with a known
false-alarm rate (conformal p-values of an atypicality score), the paper's surprise, expectation
and beta per filter that explain it, metrics, the alarm log, the operator's page, explanations
and fixes.

The layout, bottom to top (each part imports only from the parts listed before it, and from
``surprise_monitor.kernels``):

- ``errors``, ``checks``, ``files``, ``fingerprint``: the project's error base; the value checks
  (each range worded once); atomic writes; the model-weights fingerprint.
- ``probe/``: the layer hooks, the class output, the Grad-AMap probe, the target layer's choice,
  the activation profiles.
- ``atypicality``, ``conformal``: the alarm's score and its p-values.
- ``options``: the option groups (:class:`Thresholds`, :class:`Execution`, :class:`Sampling`,
  :class:`MetricsOptions`) every layer takes whole.
- ``table_key``, ``table_alarm``, ``table_file``, ``table``: the key that signs a table, the
  table's alarm part, its file format, the calibration table itself.
- ``loading/``: models (torchvision names, ``module:factory``, weights, ONNX) and images.
- ``report``: the per-batch result.
- ``judge``: a batch in, a report out (probe -> kernels -> report).
- ``runtime/``: the request path around the judge (sampling, async, fail-open, metrics).
- ``explain/``: explanations, exemplars, figures and fixes, on the judge.
- ``alarms/``: the record of recent alarms (thumbnails, an audit file, explanations on demand).
- ``web/``: the operator's page (a Starlette app).
- ``surprise_monitor``: the facade, :class:`SurpriseMonitor`.
- ``explain/cli.py``: the ``surprise-explain`` command line, on the facade.
"""

from surprise_monitor.monitor.alarms import AlarmLog, AlarmRecord
from surprise_monitor.monitor.explain import Explanation, FixAttempt, FixResult, input_gradient
from surprise_monitor.monitor.judge import (
    InvalidInputError,
    Judge,
    NonFiniteInputError,
    TableMismatchError,
)
from surprise_monitor.monitor.loading import OnnxConversionError, load_onnx
from surprise_monitor.monitor.options import Execution, MetricsOptions, Sampling, Thresholds
from surprise_monitor.monitor.probe import GradAMapProbe, LayerChoice, ProbeResult, resolve_layer
from surprise_monitor.monitor.report import FlaggedFilter, MonitorReport
from surprise_monitor.monitor.runtime import MetricsConflictError, MonitorMetrics, MonitorResult
from surprise_monitor.monitor.surprise_monitor import SurpriseMonitor

__all__ = [
    "AlarmLog",
    "AlarmRecord",
    "Execution",
    "Explanation",
    "FixAttempt",
    "FixResult",
    "FlaggedFilter",
    "GradAMapProbe",
    "InvalidInputError",
    "NonFiniteInputError",
    "Judge",
    "LayerChoice",
    "MetricsConflictError",
    "MetricsOptions",
    "MonitorMetrics",
    "MonitorReport",
    "MonitorResult",
    "OnnxConversionError",
    "ProbeResult",
    "Sampling",
    "SurpriseMonitor",
    "TableMismatchError",
    "Thresholds",
    "input_gradient",
    "load_onnx",
    "resolve_layer",
]
