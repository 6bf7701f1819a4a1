"""CIFAR-10 from ``../shared/data`` and small CNNs trained on it on the CPU (weights cached).

The one shared module for CIFAR-10 work in the benchmarks:

- :func:`load_cifar10` reads ``cifar10_{split}.npz`` (uint8 NHWC images, labels, class names;
  see ``shared/data/README.md``) from :func:`find_data_dir`: the ``data_dir`` argument, else the
  ``SURPRISE_DATA_DIR`` environment variable, else ``../shared/data`` beside the repository.
  A missing folder or file is a :class:`FileNotFoundError` that says where it looked.
- :func:`to_tensor` normalises uint8 images with :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`;
  :func:`cifar10_dataset` is the normalised ``TensorDataset``; :func:`data_source` is the dict a
  calibration table records so exemplars can be loaded again (``kind="npz"``).
- :func:`small_vgg` (no batch norm, like VGG16) and :func:`small_resnet` (batch norm, residual
  blocks with projection shortcuts) are small CIFAR-sized networks.
- :func:`train_or_load` trains one of them on the CPU with Adam, random crops and flips, and caches
  the state_dict under :func:`cache_dir` (``SURPRISE_MONITOR_CACHE`` or
  ``~/.cache/surprise-monitor``), outside the repository; later calls load it
  (``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
DATA_ENV = "SURPRISE_DATA_DIR"
CACHE_ENV = "SURPRISE_MONITOR_CACHE"
SPLITS = ("train", "test")
_REPO = Path(__file__).resolve().parents[1]


def find_data_dir(data_dir: str | Path | None = None) -> Path:
    """The folder holding ``cifar10_train.npz`` / ``cifar10_test.npz``.

    ``data_dir`` if given, else ``$SURPRISE_DATA_DIR``, else ``../shared/data`` relative to the
    repository root.
    """
    if data_dir is not None:
        found, how = Path(data_dir), "the data_dir argument"
    elif os.environ.get(DATA_ENV):
        found, how = Path(os.environ[DATA_ENV]), f"${DATA_ENV}"
    else:
        found, how = _REPO.parent / "shared" / "data", "the default ../shared/data"
    if not found.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 data folder {found} (from {how}) does not exist; pass data_dir=... or set "
            f"{DATA_ENV} to the folder holding cifar10_train.npz and cifar10_test.npz"
        )
    return found


@dataclass(frozen=True)
class CifarSplit:
    """One split as stored: uint8 ``[N, 32, 32, 3]`` images, int64 labels, class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    path: Path

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_cifar10(
    split: str, data_dir: str | Path | None = None, limit: int | None = None
) -> CifarSplit:
    """Read ``cifar10_{split}.npz`` (no pickle); ``limit`` keeps the first images (a fair sample:
    the files are stored in a fixed random order)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = find_data_dir(data_dir) / f"cifar10_{split}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (CIFAR-10 {split} split)")
    with np.load(path, allow_pickle=False) as d:
        x, y, names = d["x"], d["y"], [str(n) for n in d["class_names"]]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        x, y = x[:limit], y[:limit]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3 or len(x) != len(y):
        raise ValueError(f"{path}: expected uint8 [N, H, W, 3] images, got {x.dtype} {x.shape}")
    return CifarSplit(np.ascontiguousarray(x), y.astype(np.int64), names, path)


def to_tensor(
    images: np.ndarray,
    mean: tuple[float, ...] = CIFAR10_MEAN,
    std: tuple[float, ...] = CIFAR10_STD,
) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` -> float32 ``[N, C, H, W]``: ``(x / 255 - mean) / std``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


def cifar10_dataset(
    split: str, data_dir: str | Path | None = None, limit: int | None = None
) -> TensorDataset:
    """The normalised split as a ``TensorDataset`` of ``(image, label)`` (index order = file)."""
    s = load_cifar10(split, data_dir, limit)
    ds = TensorDataset(to_tensor(s.images), torch.from_numpy(s.labels))
    ds.classes = s.class_names  # type: ignore[attr-defined]  # read by calibrate()
    return ds


def data_source(split: str, data_dir: str | Path | None = None, limit: int | None = None) -> dict:
    """What a calibration table records to find its images again (``monitor.explain.exemplars``)."""
    path = find_data_dir(data_dir) / f"cifar10_{split}.npz"
    return {
        "kind": "npz", "path": str(path.resolve()), "key": "x", "limit": limit,
        "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD),
    }  # fmt: skip


# ------------------------------------------------------------------------------------- models
def small_vgg(num_classes: int = 10, width: int = 32, batch_norm: bool = False) -> nn.Module:
    """VGG-style CNN: 3 stages of two 3x3 convolutions (each followed by batch norm when
    ``batch_norm``) and max pooling, then two fully connected layers. Without batch norm, like
    VGG16, the final convolution is ``features.12`` (``4 * width`` filters, 8x8); with it,
    ``features.17``."""
    w = (width, 2 * width, 4 * width)
    layers: list[nn.Module] = []
    cin = 3

    def conv(a: int, b: int) -> list[nn.Module]:
        bn: list[nn.Module] = [nn.BatchNorm2d(b)] if batch_norm else []
        return [nn.Conv2d(a, b, 3, padding=1), *bn, nn.ReLU(inplace=True)]

    for i, cout in enumerate(w):
        layers += conv(cin, cout) + conv(cout, cout)
        if i < len(w) - 1:
            layers.append(nn.MaxPool2d(2))
        cin = cout
    return _VGG(nn.Sequential(*layers), w[-1], num_classes)


class _VGG(nn.Module):
    def __init__(self, features: nn.Sequential, channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.pool = nn.MaxPool2d(2)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * 16, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + self.shortcut(x))


class _ResNet(nn.Module):
    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.layer1 = _Block(width, width, 1)
        self.layer2 = _Block(width, 2 * width, 2)
        self.layer3 = _Block(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


def small_resnet(num_classes: int = 10, width: int = 32) -> nn.Module:
    """ResNet-style CNN with batch norm: a stem and three residual blocks (the last two with 1x1
    projection shortcuts), global average pooling, one linear layer. The final convolution is
    ``layer3.conv2``."""
    return _ResNet(num_classes, width)


def small_vgg_bn(num_classes: int = 10, width: int = 32) -> nn.Module:
    """:func:`small_vgg` with batch norm after every convolution (trains faster on a CPU)."""
    return small_vgg(num_classes, width, batch_norm=True)


ARCHS: dict[str, Callable[..., nn.Module]] = {
    "small_vgg": small_vgg, "small_vgg_bn": small_vgg_bn, "small_resnet": small_resnet,
}  # fmt: skip


# ----------------------------------------------------------------------------------- training
def cache_dir() -> Path:
    """Where trained weights (and benchmark tables) are cached, outside the repository."""
    root = os.environ.get(CACHE_ENV)
    path = Path(root) if root else Path.home() / ".cache" / "surprise-monitor"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 4-pixel-padded crops and horizontal flips of a normalised batch."""
    n = x.shape[0]
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    padded = nn.functional.pad(x, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (2,), generator=g).tolist()  # one offset per batch: cheap
    return padded[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted classes of a normalised batch (eval mode, no grad)."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            out.append(model(x[i : i + batch_size]).argmax(1))
    return torch.cat(out)


def train_or_load(
    arch: str,
    epochs: int = 4,
    *,
    data_dir: str | Path | None = None,
    n_train: int | None = None,
    width: int = 32,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    cache: str | Path | None = None,
    log: Callable[[str], None] | None = print,
) -> nn.Module:
    """An ``arch`` model (a key of :data:`ARCHS`) trained on CIFAR-10, in eval mode.

    The state_dict is cached under ``cache`` (default :func:`cache_dir`) in a file named by the
    settings; an existing file is loaded with ``weights_only=True`` instead of training. Training
    is Adam with a one-cycle learning rate, random crops and flips, on the CPU (a few minutes for
    the defaults on two cores). The test accuracy is logged and stored beside the weights.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    settings = {
        "arch": arch, "epochs": epochs, "n_train": n_train, "width": width, "seed": seed,
        "batch_size": batch_size, "lr": lr, "version": 1,
    }  # fmt: skip
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache) if cache is not None else cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"cifar10-{arch}-w{width}-e{epochs}-{key}.pt"
    torch.manual_seed(seed)
    model = ARCHS[arch](num_classes=10, width=width)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()

    train = load_cifar10("train", data_dir, n_train)
    x, y = to_tensor(train.images), torch.from_numpy(train.labels)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    started = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(_augment(x[idx], g)), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if log:
            log(
                f"{arch} epoch {epoch + 1}/{epochs}: loss {total / len(x):.3f} "
                f"({time.perf_counter() - started:.0f} s)"
            )
    model.eval()
    model.zero_grad(set_to_none=True)
    test = load_cifar10("test", data_dir)
    acc = float((predict(model, to_tensor(test.images)) == torch.from_numpy(test.labels)).float()
                .mean())  # fmt: skip
    seconds = time.perf_counter() - started
    if log:
        log(f"{arch}: test accuracy {acc:.4f} after {seconds:.0f} s of training; cached at {path}")
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache file
    meta = {**settings, "test_accuracy": acc, "train_seconds": seconds}
    tmp_meta = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_meta, path.with_suffix(".json"))
    return model
