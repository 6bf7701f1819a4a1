"""Runtime monitoring of a CNN: surprise, expectation and beta per input."""

from monitor.explain import Explanation
from monitor.fix import FixAttempt, FixResult
from monitor.layers import LayerChoice, resolve_layer
from monitor.metrics import MetricsConflictError, MonitorMetrics
from monitor.onnx_model import OnnxConversionError, load_onnx
from monitor.probe import GradAMapProbe, ProbeResult
from monitor.report import FlaggedFilter, MonitorReport
from monitor.runtime import MonitorResult
from monitor.saliency import input_gradient
from monitor.surprise_monitor import InvalidInputError, SurpriseMonitor, TableMismatchError

__all__ = [
    "Explanation",
    "FixAttempt",
    "FixResult",
    "FlaggedFilter",
    "GradAMapProbe",
    "InvalidInputError",
    "LayerChoice",
    "MetricsConflictError",
    "MonitorMetrics",
    "MonitorReport",
    "MonitorResult",
    "OnnxConversionError",
    "ProbeResult",
    "SurpriseMonitor",
    "TableMismatchError",
    "input_gradient",
    "load_onnx",
    "resolve_layer",
]
