"""The two strong CIFAR-10 models the alarm and paper benchmarks run on, and their data splits.

- ``resnet18``: ``../shared/models/cifar10_resnet18.safetensors`` (91% test accuracy; final
  convolution ``layer4.1.conv2``, 512 filters at 4x4), built by ``cifar_resnet.py`` beside it.
- ``vgg_bn``: a VGG with batch norm trained here by :mod:`bench.train_vgg_bn` (weights committed
  in ``bench/weights/``, recipe and accuracy in the JSON beside them; final convolution
  ``features.24``, 384 filters at 4x4).

Both were trained on all 50,000 CIFAR-10 training images, so the held-out images that calibrate
thresholds come from the test file: :data:`HELDOUT` (test images 0..4,999) forms conformal nulls
and selects scores; :data:`EVALUATION` (5,000..9,999) is only ever used to report.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn

from bench.cifar import find_data_dir

MODELS_ENV = "SURPRISE_MODELS_DIR"
HELDOUT = range(0, 5000)
EVALUATION = range(5000, 10000)
VGG_WIDTH = 48
VGG_WEIGHTS = f"cifar10_vgg_bn_w{VGG_WIDTH}.safetensors"
STRONG_MODELS = ("resnet18", "vgg_bn")


def models_dir() -> Path:
    """``$SURPRISE_MODELS_DIR``, else ``models`` beside the data folder (``../shared/models``)."""
    env = os.environ.get(MODELS_ENV)
    return Path(env) if env else find_data_dir().parent / "models"


def load_resnet18() -> nn.Module:
    """The shared CIFAR-10 ResNet-18 in eval mode (safetensors; no pickle)."""
    folder = models_dir()
    spec = importlib.util.spec_from_file_location("cifar_resnet", folder / "cifar_resnet.py")
    if spec is None or spec.loader is None or not (folder / "cifar_resnet.py").is_file():
        raise FileNotFoundError(f"{folder}/cifar_resnet.py not found (set ${MODELS_ENV})")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load(str(folder / "cifar10_resnet18.safetensors"))


class VGGBN(nn.Module):
    """VGG with batch norm for 32x32 inputs: 4 stages of two 3x3 conv-BN-ReLU (widths w, 2w,
    4w, 8w) with max pooling between them, global average pooling and one linear layer.
    The final convolution, ``features.24``, has ``8w`` filters at 4x4."""

    def __init__(self, width: int = VGG_WIDTH, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for stage, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            if stage:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2):
                layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                           nn.ReLU(inplace=True)]  # fmt: skip
                cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of normalised images ``[B, 3, 32, 32]``."""
        return self.classifier(self.features(x).mean(dim=(2, 3)))


#: The committed weights (and their training record beside them, ``.json``): a new machine
#: does not train the VGG again.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def vgg_weights_path() -> Path:
    """Where :mod:`bench.train_vgg_bn` writes the VGG's weights: ``bench/weights/``, committed
    with their record."""
    return WEIGHTS_DIR / VGG_WEIGHTS


def load_vgg_bn() -> nn.Module:
    """The trained :class:`VGGBN` in eval mode, from the committed weights; trains nothing
    (``python -m bench.train_vgg_bn`` retrains them)."""
    from safetensors.torch import load_file

    path = vgg_weights_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no trained VGG; run `python -m bench.train_vgg_bn` (CPU, 35 min - 2 h) first"
        )
    model = VGGBN(VGG_WIDTH)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def load_strong(name: str) -> nn.Module:
    """``"resnet18"`` or ``"vgg_bn"``, in eval mode."""
    if name == "resnet18":
        return load_resnet18()
    if name == "vgg_bn":
        return load_vgg_bn()
    raise ValueError(f"model must be one of {STRONG_MODELS}, got {name!r}")


def training_record(name: str) -> dict:
    """What is known of how a strong model was trained (recipe, accuracy)."""
    if name == "resnet18":
        return {"source": str(models_dir() / "README.md"), "test_accuracy_0_5000": 0.915,
                "test_accuracy_5000_7000": 0.9105}  # fmt: skip
    meta = vgg_weights_path().with_suffix(".json")
    return json.loads(meta.read_text()) if meta.is_file() else {}
