"""The strong CIFAR-10 models the alarm and paper benchmarks run on, and their data splits.

- ``resnet18``: ``../shared/models/cifar10_resnet18.safetensors`` (91% test accuracy; final
  convolution ``layer4.1.conv2``, 512 filters at 4x4), built by ``cifar_resnet.py`` beside it.
- ``vgg_bn``: a VGG with batch norm trained here by :mod:`bench.train_vgg_bn` (weights committed
  in ``bench/weights/``, recipe and accuracy in the JSON beside them; final convolution
  ``features.24``, 384 filters at 4x4).
- ``vgg_plain``: :class:`VGGPlain`, the same VGG without batch norm (final convolution
  ``features.17``, 384 filters at 4x4), trained by ``python -m bench.train_strong --arch
  vgg_plain``.
- ``mobilenet``: :class:`MobileNetCifar`, a small MobileNetV2 (inverted residual blocks,
  depthwise convolutions; final convolution the 1x1 ``head.0``, 320 filters at 4x4), trained by
  ``python -m bench.train_strong --arch mobilenet``.

:data:`STRONG_MODELS` (ResNet-18, VGG-BN) are the paper's two; :data:`ALARM_MODELS` adds the two
others for the alarm benchmark. All are trained on all 50,000 CIFAR-10 training images, so the
held-out images that calibrate thresholds come from the test file: :data:`HELDOUT` (test images
0..4,999) forms conformal nulls and selects scores; :data:`EVALUATION` (5,000..9,999) is only ever
used to report.
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
VGG_PLAIN_WIDTH = 48
MOBILENET_WIDTH = 16
STRONG_MODELS = ("resnet18", "vgg_bn")
ALARM_MODELS = ("resnet18", "vgg_bn", "vgg_plain", "mobilenet")
#: The models trained here by :mod:`bench.train_strong`, with the width of their committed weights.
TRAINED_WIDTHS = {"vgg_bn": VGG_WIDTH, "vgg_plain": VGG_PLAIN_WIDTH, "mobilenet": MOBILENET_WIDTH}


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


def vgg_features(width: int, batch_norm: bool) -> nn.Sequential:
    """The VGGs' feature extractor for 32x32 inputs: 4 stages of two 3x3 convolutions (widths w,
    2w, 4w, 8w; conv-BN-ReLU without conv biases with ``batch_norm``, else conv-ReLU) with max
    pooling between the stages."""
    layers: list[nn.Module] = []
    cin = 3
    for stage, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
        if stage:
            layers.append(nn.MaxPool2d(2))
        for _ in range(2):
            layers.append(nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm))
            layers += [nn.BatchNorm2d(cout)] if batch_norm else []
            layers.append(nn.ReLU(inplace=True))
            cin = cout
    return nn.Sequential(*layers)


class _VGG(nn.Module):
    """The VGGs' shared body: :func:`vgg_features`, global average pooling, one linear layer."""

    def __init__(self, width: int, num_classes: int, batch_norm: bool) -> None:
        super().__init__()
        self.features = vgg_features(width, batch_norm)
        self.classifier = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of normalised images ``[B, 3, 32, 32]``."""
        return self.classifier(self.features(x).mean(dim=(2, 3)))


class VGGBN(_VGG):
    """VGG with batch norm for 32x32 inputs: 4 stages of two 3x3 conv-BN-ReLU (widths w, 2w,
    4w, 8w) with max pooling between them, global average pooling and one linear layer.
    The final convolution, ``features.24``, has ``8w`` filters at 4x4."""

    def __init__(self, width: int = VGG_WIDTH, num_classes: int = 10) -> None:
        super().__init__(width, num_classes, batch_norm=True)


class VGGPlain(_VGG):
    """VGG without batch norm for 32x32 inputs: the layout of :class:`VGGBN` (4 stages of two 3x3
    conv-ReLU, widths w, 2w, 4w, 8w, max pooling between them, global average pooling, one linear
    layer), the convolutions with biases. Kaiming-normal initialisation (fan-in, ReLU gain) and zero
    biases keep the activations' scale through the 8 convolutions, so it trains without batch norm
    (at a lower peak learning rate than the VGG-BN: :mod:`bench.train_strong`). The final
    convolution, ``features.17``, has ``8w`` filters at 4x4."""

    def __init__(self, width: int = VGG_PLAIN_WIDTH, num_classes: int = 10) -> None:
        super().__init__(width, num_classes, batch_norm=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)


class Float32Conv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that runs in float32 under autocast too. MobileNetCifar's strided
    depthwise convolutions are these: on the CPU (torch 2.14) the backward pass of a bf16
    depthwise conv of stride 2 is ten times slower than in float32 (100 ms instead of 9 for a
    batch of 64), which would dominate training; outside autocast it is an ordinary convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution of ``x`` in float32 (autocast off inside)."""
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
             act: bool = True) -> nn.Sequential:  # fmt: skip
    """Conv (no bias; a :class:`Float32Conv2d` when depthwise and strided), batch norm and, with
    ``act``, ReLU6."""
    conv = Float32Conv2d if groups > 1 and stride > 1 else nn.Conv2d
    layers: list[nn.Module] = [
        conv(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion (``expand`` times the input channels; none when 1),
    3x3 depthwise convolution (``stride``), linear 1x1 projection; the input is added back when
    the shapes allow (stride 1, as many channels out as in)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [_conv_bn(cin, hidden, 1)] if expand != 1 else []
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden),
                   _conv_bn(hidden, cout, 1, act=False)]  # fmt: skip
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output (the input added back when :attr:`residual`)."""
        out = self.conv(x)
        return x + out if self.residual else out


#: MobileNetCifar's stages: (expansion, output channels at width 32, scaled by ``width / 32``;
#: blocks; stride of the first block). MobileNetV2's table with one downsampling fewer (its
#: 32-channel stage at stride 1: 32 -> 16 -> 8 -> 4 with the stem at stride 1) and fewer blocks
#: (2, 3, 2, 2 instead of 3, 4, 3, 3 in the 32- to 160-channel stages: a third less CPU time).
MOBILENET_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 1), (6, 64, 3, 2), (6, 96, 2, 1),
                    (6, 160, 2, 2), (6, 320, 1, 1))  # fmt: skip


class MobileNetCifar(nn.Module):
    """A small MobileNetV2 for 32x32 inputs: a 3x3 stem of ``width`` channels at stride 1, the
    inverted residual stages of :data:`MOBILENET_STAGES` (BN, ReLU6, depthwise 3x3 convolutions;
    32x32 -> 16x16 -> 8x8 -> 4x4), a 1x1 conv-BN-ReLU6 head to ``20 * width`` channels, global
    average pooling and one linear layer. The default width 16 is MobileNetV2's width multiplier
    0.5 (stages of 8 .. 160 channels, a head of 320; 0.40 M parameters, 14.5 M multiply-adds per
    image against the VGG-BN's 118 M: depthwise convolutions, batch norm and ReLU6 on the wide
    expanded maps are slow per multiply-add on the CPU, so a training step takes about 1.2 times
    the VGG-BN's).

    The last ``nn.Conv2d`` executed in a forward pass is the head's ``head.0``: an ordinary
    (not depthwise) 1x1 convolution of ``20 * width`` filters at 4x4 whose map (after BN and
    ReLU6) the pooling reads; it is the model's final convolution for ``layer="final-conv"``."""

    def __init__(self, width: int = MOBILENET_WIDTH, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(3, width, 3)
        blocks: list[nn.Module] = []
        cin = width
        for expand, units, count, stride in MOBILENET_STAGES:
            cout = max(1, round(units * width / 32))
            for i in range(count):
                blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(cin, 20 * width, 1)
        self.classifier = nn.Linear(20 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of normalised images ``[B, 3, 32, 32]``."""
        return self.classifier(self.head(self.blocks(self.stem(x))).mean(dim=(2, 3)))


#: The architectures :mod:`bench.train_strong` trains: ``name: class(width)``.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "vgg_bn": VGGBN, "vgg_plain": VGGPlain, "mobilenet": MobileNetCifar,
}  # fmt: skip

#: The committed weights (and their training record beside them, ``.json``): a new machine
#: does not train the models again.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def weights_path(name: str, width: int | None = None) -> Path:
    """Where :mod:`bench.train_strong` writes the weights of model ``name`` (one of
    :data:`TRAINED_WIDTHS`) at ``width`` (default: the committed one):
    ``bench/weights/cifar10_{name}_w{width}.safetensors``, committed with their record."""
    if name not in TRAINED_WIDTHS:
        raise ValueError(f"model must be one of {tuple(TRAINED_WIDTHS)}, got {name!r}")
    return WEIGHTS_DIR / f"cifar10_{name}_w{width or TRAINED_WIDTHS[name]}.safetensors"


def vgg_weights_path() -> Path:
    """Where :mod:`bench.train_vgg_bn` writes the VGG's weights: ``bench/weights/``, committed
    with their record."""
    return WEIGHTS_DIR / VGG_WEIGHTS


def train_command(name: str) -> str:
    """The command line that trains model ``name`` (one thread, as the committed weights were)."""
    if name == "vgg_bn":
        return "OMP_NUM_THREADS=1 python -m bench.train_vgg_bn"
    return f"OMP_NUM_THREADS=1 python -m bench.train_strong --arch {name}"


def load_trained(name: str) -> nn.Module:
    """A model trained here (``"vgg_bn"``, ``"vgg_plain"`` or ``"mobilenet"``) in eval mode, from
    its committed weights; trains nothing (a clear :class:`FileNotFoundError` naming the command
    that trains it when the weights are not there yet)."""
    from safetensors.torch import load_file

    path = vgg_weights_path() if name == "vgg_bn" else weights_path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: model {name!r} is not trained yet; run `{train_command(name)}` "
            "(CPU, 35-50 min on one thread) first"
        )
    model = ARCHITECTURES[name](TRAINED_WIDTHS[name])
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def load_vgg_bn() -> nn.Module:
    """The trained :class:`VGGBN` in eval mode, from the committed weights; trains nothing
    (``python -m bench.train_vgg_bn`` retrains them)."""
    return load_trained("vgg_bn")


def load_strong(name: str) -> nn.Module:
    """One of :data:`ALARM_MODELS` (``"resnet18"``, ``"vgg_bn"``, ``"vgg_plain"``,
    ``"mobilenet"``), in eval mode."""
    if name == "resnet18":
        return load_resnet18()
    if name in TRAINED_WIDTHS:
        return load_trained(name)
    raise ValueError(f"model must be one of {ALARM_MODELS}, got {name!r}")


def training_record(name: str) -> dict:
    """What is known of how a strong model was trained (recipe, accuracy); ``{}`` for a model
    trained here whose record is not there yet."""
    if name == "resnet18":
        return {"source": str(models_dir() / "README.md"), "test_accuracy_0_5000": 0.915,
                "test_accuracy_5000_7000": 0.9105}  # fmt: skip
    path = vgg_weights_path() if name == "vgg_bn" else weights_path(name)
    meta = path.with_suffix(".json")
    return json.loads(meta.read_text()) if meta.is_file() else {}
