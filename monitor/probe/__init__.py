"""The probe: one forward and one partial backward pass give a layer's activation and the class
score's gradient there; plus the layer hooks it is built on, the class scores and the choice of
the target layer."""

from surprise_monitor.monitor.probe.class_output import CLASS_OUTPUTS, class_output_of
from surprise_monitor.monitor.probe.grad_amap_probe import GradAMapProbe, ModelRaised, ProbeResult
from surprise_monitor.monitor.probe.hooks import LayerTap, get_module, traced_calls
from surprise_monitor.monitor.probe.layers import LayerChoice, resolve_layer

__all__ = [
    "CLASS_OUTPUTS",
    "GradAMapProbe",
    "LayerChoice",
    "LayerTap",
    "ModelRaised",
    "ProbeResult",
    "class_output_of",
    "get_module",
    "resolve_layer",
    "traced_calls",
]
