"""Getting models and images in: torchvision names and ``module:factory`` specs, weights files,
ONNX files, and the image preprocessing a calibration records."""

from monitor.loading.images import Preprocessing, source_images
from monitor.loading.models import build_model, load_weights, model_device
from monitor.loading.onnx_model import OnnxConversionError, load_onnx

__all__ = [
    "OnnxConversionError",
    "Preprocessing",
    "build_model",
    "load_onnx",
    "load_weights",
    "model_device",
    "source_images",
]
