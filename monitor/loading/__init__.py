"""Getting models and images in: torchvision names and ``module:factory`` specs, weights files,
ONNX files, and the image preprocessing a calibration records."""

from surprise_monitor.monitor.loading.images import Preprocessing
from surprise_monitor.monitor.loading.models import build_model, load_weights, model_device
from surprise_monitor.monitor.loading.onnx_model import OnnxConversionError, load_onnx
from surprise_monitor.monitor.loading.sources import SourceError, source_dataset, source_images

__all__ = [
    "OnnxConversionError",
    "Preprocessing",
    "SourceError",
    "build_model",
    "load_onnx",
    "load_weights",
    "model_device",
    "source_dataset",
    "source_images",
]
