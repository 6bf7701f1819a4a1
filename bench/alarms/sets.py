"""The image sets of the alarm benchmark, each in a *selection* and a *report* part.

In distribution, CIFAR-10 test images (the strong models trained on all 50,000 training
images): :data:`bench.strong_models.HELDOUT` (0..4,999) forms the conformal null and is the
in-distribution side of score selection; :data:`bench.strong_models.EVALUATION`
(5,000..9,999) is only used to report. Atypical sets, each split the same way:

- MNIST, Fashion-MNIST, notMNIST test images (zero-padded to 32 x 32, grey copied to RGB):
  the first half selects, the second half reports;
- corruptions of CIFAR-10 test images (noise, blur, contrast, JPEG at three strengths,
  :data:`bench.paper.atypical.SHIFTS`): of held-out images 0..n-1 for selection, of evaluation
  images 5,000..5,000+n-1 for the report;
- crops of scikit-image's photographs resized to 32 x 32: crops of one half of the photographs
  select, of the other half report;
- uniform noise images (different seeds).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from bench.cifar import load_cifar10
from bench.paper.atypical import SHIFTS, shift_images
from bench.paper.common import gray_to_cifar, load_gray_npz
from bench.strong_models import EVALUATION, HELDOUT

PARTS = ("selection", "report")
FAR = ("mnist", "fashion_mnist", "notmnist")
#: scikit-image's bundled photographs (no download): colour, then grey.
PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
    "retina", "colorwheel", "camera", "coins", "moon", "gravel", "brick", "grass", "clock", "cell",
)  # fmt: skip


@dataclass(frozen=True)
class ImageSet:
    """uint8 ``[n, 32, 32, 3]`` images and their labels (-1: no CIFAR-10 class)."""

    name: str
    part: str
    images: np.ndarray
    labels: np.ndarray


def cifar_part(part: str) -> ImageSet:
    """The in-distribution images of a part: held-out (selection) or evaluation (report)."""
    rows = HELDOUT if part == "selection" else EVALUATION
    test = load_cifar10("test")
    sl = slice(rows.start, rows.stop)
    return ImageSet("cifar10", part, test.images[sl], test.labels[sl])


def atypical_sets(part: str, n: int = 2000) -> list[ImageSet]:
    """Every atypical set's ``part`` (``n`` images each; the far sets give 5,000)."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    out = []
    for name in FAR:
        x = gray_to_cifar(load_gray_npz(f"{name}_test", None))
        half = x[:5000] if part == "selection" else x[5000:10000]
        out.append(ImageSet(name, part, half, -np.ones(len(half), np.int64)))
    clean = cifar_part(part)
    for kind, levels in SHIFTS.items():
        for level in levels:
            seed = zlib.crc32(f"{part} {kind} {level}".encode())
            shifted = shift_images(clean.images[:n], kind, level, seed=seed)
            out.append(ImageSet(f"{kind} {level:g}", part, shifted, clean.labels[:n]))
    out.append(ImageSet("photos", part, photo_crops(part, n), -np.ones(n, np.int64)))
    rng = np.random.default_rng(11 if part == "selection" else 12)
    noise = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    out.append(ImageSet("uniform", part, noise, -np.ones(n, np.int64)))
    return out


def photo_crops(part: str, n: int) -> np.ndarray:
    """``n`` random square crops (32 px to half the short side) of scikit-image's photographs,
    resized to 32 x 32: the even-numbered photographs for selection, the odd for the report."""
    from skimage import data

    photos = []
    for i, name in enumerate(PHOTOS):
        if (i % 2 == 0) != (part == "selection"):
            continue
        img = np.asarray(getattr(data, name)())
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        photos.append(img[..., :3].astype(np.uint8))
    rng = np.random.default_rng(5 if part == "selection" else 6)
    out = np.empty((n, 32, 32, 3), np.uint8)
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        side = int(rng.integers(32, max(33, min(h, w) // 2)))
        y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(np.ascontiguousarray(img[y0 : y0 + side, x0 : x0 + side]))
        out[i] = np.asarray(crop.resize((32, 32), Image.BILINEAR))
    return out
