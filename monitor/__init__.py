"""Runtime monitoring of a CNN: surprise, expectation and beta per input."""

from monitor.layers import LayerChoice, resolve_layer
from monitor.probe import GradAMapProbe, ProbeResult
from monitor.report import FlaggedFilter, MonitorReport
from monitor.surprise_monitor import SurpriseMonitor, TableMismatchError

__all__ = [
    "FlaggedFilter",
    "GradAMapProbe",
    "LayerChoice",
    "MonitorReport",
    "ProbeResult",
    "SurpriseMonitor",
    "TableMismatchError",
    "resolve_layer",
]
