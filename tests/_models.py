"""Small models and data made in the tests (no downloads)."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset


class TinyCNN(nn.Module):
    """conv -> ReLU(inplace) -> conv -> ReLU(inplace) -> global pool -> linear."""

    def __init__(self, num_classes: int = 4, width: int = 8, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class PickyCNN(TinyCNN):
    """A :class:`TinyCNN` that counts its forward passes and raises ``ValueError`` for a batch
    holding a value above 1000 in magnitude (an input the model itself rejects)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if bool((x.abs() > 1000).any()):
            raise ValueError("PickyCNN rejects inputs above 1000")
        return super().forward(x)


def picky_copy(model: TinyCNN) -> PickyCNN:
    """A :class:`PickyCNN` with ``model``'s weights (same state_dict, so the same fingerprint)."""
    picky = PickyCNN(num_classes=model.fc.out_features)
    picky.load_state_dict(model.state_dict())
    return picky.eval()


class ShortcutBlock(nn.Module):
    """A residual block whose 1x1 projection shortcut runs after the main path."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + self.downsample(x))


class ShortcutNet(nn.Module):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.block = ShortcutBlock(6, 12)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(torch.relu(self.stem(x))).mean((2, 3)))


def class_images(n: int, num_classes: int, size: int = 8, channels: int = 3, seed: int = 0):
    """Images whose class sets a coloured pattern, plus noise; labels cycle through classes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    patterns = torch.randn(num_classes, channels, size, size, generator=g)
    images = patterns[labels] + 0.5 * torch.randn(n, channels, size, size, generator=g)
    return images, labels


def class_dataset(n: int, num_classes: int, **kwargs) -> TensorDataset:
    """:func:`class_images` as a dataset."""
    images, labels = class_images(n, num_classes, **kwargs)
    return TensorDataset(images, labels)


def heldout_dataset(n: int, start: int = 600) -> TensorDataset:
    """``n`` new images of :func:`trained_tiny_cnn`'s distribution (3 classes, seed 1): rows
    ``start .. start+n`` of one long :func:`class_images` stream, whose first 600 rows are the
    training images. Any two slices past 600 are exchangeable with each other."""
    images, labels = class_images(start + n, 3, seed=1)
    return TensorDataset(images[start:], labels[start:])


def mixed_inputs(n: int = 12, seed: int = 7) -> torch.Tensor:
    """New images of the training classes of :func:`trained_tiny_cnn` (3 classes, seed 1): the
    training patterns with new noise; inputs 0, 4, 8.. scaled up, 1, 5, 9.. blanked."""
    x, _ = class_images(n, 3, seed=1)
    x = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    x[0::4] *= 6.0
    x[1::4] = 0.0
    return x


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise ``model`` deterministically and put it in eval mode."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


@functools.lru_cache(maxsize=8)
def trained_tiny_cnn(num_classes: int = 3, n: int = 600, steps: int = 150, seed: int = 1):
    """A TinyCNN fitted to :func:`class_dataset` images of that seed (about a second on an idle
    2-core machine). Cached for the session: callers must not change its weights."""
    model = seeded(TinyCNN(num_classes=num_classes), seed=seed).train()
    x, y = class_images(n, num_classes, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def write_photo_folder(root, counts: dict[str, int], seed: int = 0, size: int = 40):
    """An ImageFolder of ``size`` x ``size`` random crops of skimage photos: ``{photo: count}``."""
    from PIL import Image
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        img = getattr(skdata, name)()
        (root / name).mkdir()
        for i in range(count):
            y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
            Image.fromarray(img[y : y + size, x : x + size]).save(root / name / f"{i}.png")
    return root


def write_tiny_weights(path, num_classes: int = 3):
    """Save a seeded :class:`TinyCNN` state_dict to ``path``; returns the path."""
    torch.save(seeded(TinyCNN(num_classes=num_classes)).state_dict(), path)
    return path


# ------------------------------------------------------------------------------ photos
PHOTO_MEAN = (0.5, 0.5, 0.5)
PHOTO_STD = (0.25, 0.25, 0.25)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def photo(name: str, side: int) -> np.ndarray:
    """A scikit-image sample photo resized to ``side x side``, uint8 RGB."""
    from skimage import data as skdata
    from skimage.transform import resize

    img = getattr(skdata, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    out = resize(img[..., :3], (side, side), anti_aliasing=True, preserve_range=True)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def photo_crops(size: int = 32, side: int = 96, stride: int = 16):
    """uint8 ``[N, size, size, 3]`` crops (and their mirror images) of the four
    :data:`PHOTOS`, labelled by photo."""
    xs, ys = [], []
    for label, name in enumerate(PHOTOS):
        img = photo(name, side)
        for i in range(0, side - size + 1, stride):
            for j in range(0, side - size + 1, stride):
                crop = img[i : i + size, j : j + size]
                xs += [crop, crop[:, ::-1]]
                ys += [label, label]
    return np.ascontiguousarray(np.stack(xs)), np.array(ys, dtype=np.int64)


def normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` images -> normalised ``[N, 3, H, W]`` (:data:`PHOTO_MEAN`,
    :data:`PHOTO_STD`)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(PHOTO_MEAN).view(1, 3, 1, 1)
    return (x - mean) / torch.tensor(PHOTO_STD).view(1, 3, 1, 1)


class FlatCNN(nn.Module):
    """conv -> flatten -> linear: runs on 3 x 32 x 32 inputs only (like many CIFAR nets)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 32 * 32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class ColourNet(nn.Module):
    """Class c = colour channel c (red, green, blue): a 1x1 identity convolution, then each
    channel's mean is its class logit. Classifies solid-colour images perfectly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean((2, 3))


class SlowCNN(TinyCNN):
    """A :class:`TinyCNN` that takes 0.2 s per forward pass (a long calibration, for signals)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(0.2)
        return super().forward(x)


def write_colour_folder(root, per_class: int = 6, size: int = 8, seed: int = 0):
    """An ImageFolder of noisy solid-colour images: folders ``red``, ``green``, ``blue``
    (alphabetically: blue, green, red)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(("red", "green", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size, 3))
            img[..., c] = rng.integers(180, 255, (size, size))
            Image.fromarray(img.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


class EightPixelNet(TinyCNN):
    """A :class:`TinyCNN` set by hand to classify noisy solid-colour 8x8 images (class c: colour
    channel c, as :class:`ColourNet`; every filter reads one channel) that knows that size only,
    as a CIFAR net knows 32x32 images: fed another size it answers class 0 whatever the image
    (a bias swamps its logits, which still depend on the image). Its weights come with it (a
    ``module:factory`` that needs no ``--weights``); ``declare``: state its input size as timm
    does (``pretrained_cfg["input_size"]``)."""

    SIZE = (8, 8)

    def __init__(self, declare: bool = False) -> None:
        super().__init__(num_classes=3, width=8)
        conv1, conv2 = self.features[0], self.features[2]
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()
            for i in range(8):
                conv1.weight[i, i % 3, 1, 1] = 1.0
            for j in range(16):
                conv2.weight[j, j % 8, 1, 1] = 1.0
                self.fc.weight[(j % 8) % 3, j] = 1.0
        if declare:
            self.pretrained_cfg = {"input_size": (3, *self.SIZE)}
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if tuple(x.shape[-2:]) != self.SIZE:
            out = out + torch.tensor([100.0, 0.0, 0.0], device=x.device)
        return out


# ------------------------------------------------------------------ a filter that never fires
SILENT = 4  # the final conv's filter that :func:`silent_photo_setup` switches off


def silent_photo_setup(silent: int = SILENT, seed: int = 3):
    """``(model, table, probe)``: a seeded 4-class :class:`TinyCNN` whose final-conv filter
    ``silent`` never fires (zero weights, a negative bias: its ReLU'd map and alpha are exactly
    0 on every image), its table on the even :func:`photo_crops` with the odd ones as the
    held-out null (reports carry the alarm's components; ``data_source`` records only the
    normalisation: no exemplars), and a zoomed-in crop of the coffee photo as a probe."""
    from surprise_monitor.calibrate import calibrate

    model = seeded(TinyCNN(num_classes=4), seed=seed)
    with torch.no_grad():
        model.features[2].weight[silent] = 0.0
        model.features[2].bias[silent] = -1.0
    images, labels = photo_crops()
    x, y = normalise(images), torch.from_numpy(labels)
    even = torch.arange(len(x)) % 2 == 0
    source = {"mean": list(PHOTO_MEAN), "std": list(PHOTO_STD)}
    table = calibrate(
        model, TensorDataset(x[even], y[even]), heldout=TensorDataset(x[~even], y[~even]),
        progress=False, table=_table_options(source),
    )  # fmt: skip
    probe = normalise(photo("coffee", 128)[40:72, 40:72][None])
    return model, table, probe


def _table_options(source: dict):
    """The photo tables' options: the photos' class names and ``source``."""
    from surprise_monitor.calibrate.options import TableOptions

    return TableOptions(class_names=list(PHOTOS), data_source=source)


def with_silent_surprise(table, cls: int, alpha: torch.Tensor, silent: int = SILENT,
                         only: bool = False):  # fmt: skip
    """A copy of ``table`` where filter ``silent`` (alpha 0 on every image) is the most
    surprising filter of class ``cls`` by every old measure: its class distribution lies just
    below 0 (P99.9 about -2, P50 about -2.0005: far beyond a narrow range) and its mean is
    -100 (the largest ``alpha - mu``). ``only``: every other filter's range is centred on its
    ``alpha`` (the input's ``[N]`` alphas), so ``silent`` is the only flagged filter."""
    import dataclasses

    q, mean = table.quantiles.clone(), table.mean.clone()
    levels = q.shape[2]
    if only:
        q[cls] = alpha[:, None].to(q.dtype) + torch.linspace(-1.0, 1.0, levels)[None]
        mean[cls] = alpha.to(mean.dtype)
    q[cls, silent] = torch.linspace(-2.001, -2.0, levels)
    mean[cls, silent] = -100.0
    return dataclasses.replace(table, quantiles=q, mean=mean)


def tiny_vgg_bn(data_dir, steps: int) -> nn.Module:
    """A :class:`bench.strong_models.VGGBN` of width 4 after ``steps`` Adam steps (seed 0) on the
    fake CIFAR-10 training images in ``data_dir``, in eval mode."""
    from bench.cifar import cifar10_dataset
    from bench.strong_models import VGGBN

    torch.manual_seed(0)
    model = VGGBN(width=4)
    x, y = cifar10_dataset("train", data_dir).tensors
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        batch = slice(32 * (step % 5), 32 * (step % 5) + 32)
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
