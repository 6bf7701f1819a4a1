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

:func:`family_sets` is the benchmark of *shift families* (for choosing a score by leaving one
family, or one model, out): every kind and severity of :data:`bench.alarms.shifts.FAMILIES`
applied to the part's CIFAR-10 images from :func:`base_rows` on (the selection part's after
calibration's choice images, :data:`SELECTION_BASE`), ``semantic`` (Tiny ImageNet
images of classes that CIFAR-10 lacks, split by class: the even-indexed classes select, the
odd-indexed report, so the report's object classes were never seen at selection; and the
photograph crops) and ``far`` (the MNIST family and uniform noise). :func:`families` names them.
:func:`atypical_sets` is unchanged (the committed results came from it).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from bench.alarms import shifts
from bench.cifar import find_data_dir, load_cifar10
from bench.paper.atypical import SHIFTS, shift_images
from bench.paper.common import gray_to_cifar, load_gray_npz
from bench.strong_models import EVALUATION, HELDOUT
from surprise_monitor.calibrate.evidence_choice import CHOICE_IMAGES

PARTS = ("selection", "report")
FAR = ("mnist", "fashion_mnist", "notmnist")
#: scikit-image's bundled photographs (no download): colour, then grey.
PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
    "retina", "colorwheel", "camera", "coins", "moon", "gravel", "brick", "grass", "clock", "cell",
)  # fmt: skip

#: Near-OOD natural images of other object classes (``shared/data/README.md``).
TINYIMAGENET = "tinyimagenet_dev_32"
#: The families :func:`family_sets` adds to :data:`bench.alarms.shifts.FAMILIES` -> set names.
EXTRA_FAMILIES: dict[str, tuple[str, ...]] = {
    "semantic": ("tinyimagenet", "photos"),
    "far": (*FAR, "uniform"),
}


#: The first of the selection part's CIFAR-10 images (held-out images) that its shifted sets are
#: made from. Calibration's evidence choice takes held-out images 0..CHOICE_IMAGES-1 (its learned
#: fit is fitted on them as clean images), and the selection part's CIFAR-10 side leaves them
#: out; so its shifts start after them too (until stop 37 they started at 0: the fit's own clean
#: images, shifted, were judged against it). The report part's shifts start at its first image.
SELECTION_BASE = CHOICE_IMAGES


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


@dataclass(frozen=True)
class FamilySet(ImageSet):
    """An :class:`ImageSet` of the family benchmark: its ``family``, ``kind`` (the shift's, or
    the source's for unshifted sets: ``tinyimagenet``, ``mnist``...) and ``severity`` (1..3;
    ``None`` for an unshifted set)."""

    family: str
    kind: str
    severity: int | None


def base_rows(part: str, n: int) -> slice:
    """The rows of ``part``'s CIFAR-10 images (:func:`cifar_part`) that its ``n``-image shifted
    sets are made from: from :data:`SELECTION_BASE` in the selection part, from 0 in the
    report part. The nominal sets are judged against the same rows unshifted."""
    start = SELECTION_BASE if part == "selection" else 0
    return slice(start, start + n)


def cache_stem(part: str, set_name: str) -> str:
    """A judged set's cache file stem: ``part__set`` (spaces as underscores), the part written
    ``selection-from{start}`` where its shifted sets start past image 0 (:func:`base_rows`), so
    that no set judged from other base images is read back."""
    start = base_rows(part, 1).start
    label = f"{part}-from{start}" if start else part
    return f"{label}__{set_name.replace(' ', '_')}"


def set_name(kind: str, severity: int | None) -> str:
    """A family set's name: the kind, with ``" s{severity}"`` where the kind has several."""
    if severity is None or len(shifts.severities(kind)) == 1:
        return kind
    return f"{kind} s{severity}"


def families() -> dict[str, list[str]]:
    """family -> the names of its sets in :func:`family_sets` (same order); reads no data."""
    out = {
        family: [set_name(k, s) for k in kinds for s in shifts.severities(k)]
        for family, kinds in shifts.FAMILIES.items()
    }
    out.update({family: list(names) for family, names in EXTRA_FAMILIES.items()})
    return out


def family_sets(part: str, n: int = 2000) -> list[FamilySet]:
    """Every set of the family benchmark's ``part``, ``n`` images each, in :func:`families`'
    order: the shifts of the part's CIFAR-10 images at :func:`base_rows` (held-out
    500..500+n-1 for selection, evaluation 5,000..5,000+n-1 for the report; their CIFAR-10
    labels), ``semantic`` and ``far`` (labels -1). Deterministic: each shift's random numbers
    are seeded by part, kind and severity."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    clean = cifar_part(part)
    rows = base_rows(part, n)
    if not 1 <= n <= len(clean.images) - rows.start:
        raise ValueError(f"n must be in 1..{len(clean.images) - rows.start}, got {n}")
    images, labels = clean.images[rows], clean.labels[rows]
    out = []
    for family, kinds in shifts.FAMILIES.items():
        for kind in kinds:
            for severity in shifts.severities(kind):
                rng = np.random.default_rng(
                    zlib.crc32(f"{part} {family} {kind} {severity}".encode())
                )
                shifted = shifts.shift(images, kind, severity, rng)
                name = set_name(kind, severity)
                out.append(FamilySet(name, part, shifted, labels, family, kind, severity))
    none = -np.ones(n, np.int64)
    tiny, _ = tinyimagenet_part(part, n)
    out.append(FamilySet("tinyimagenet", part, tiny, none, "semantic", "tinyimagenet", None))
    out.append(FamilySet("photos", part, photo_crops(part, n), none, "semantic", "photos", None))
    for name in FAR:
        x = gray_to_cifar(load_gray_npz(f"{name}_test", None))
        half = len(x) // 2
        if n > half:
            raise ValueError(f"n must be at most {half} for {name} (half its images), got {n}")
        x = x[:n] if part == "selection" else x[half : half + n]
        out.append(FamilySet(name, part, x, none, "far", name, None))
    rng = np.random.default_rng(11 if part == "selection" else 12)
    noise = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    out.append(FamilySet("uniform", part, noise, none, "far", "uniform", None))
    return out


def tinyimagenet_part(part: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images of ``tinyimagenet_dev_32.npz`` (uint8 ``[n, 32, 32, 3]``) and their Tiny
    ImageNet classes: drawn at random (fixed seed per part) from the even-indexed classes of
    the file's sorted class list for selection, the odd-indexed for the report."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    path = find_data_dir() / f"{TINYIMAGENET}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (needed for the semantic sets)")
    with np.load(path, allow_pickle=False) as d:
        x, y = d["x"], d["y"].astype(np.int64)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or len(x) != len(y):
        raise ValueError(f"{path}: expected uint8 [N, 32, 32, 3] images, got {x.dtype} {x.shape}")
    classes = np.unique(y)[0 if part == "selection" else 1 :: 2]
    rows = np.flatnonzero(np.isin(y, classes))
    if n > len(rows):
        raise ValueError(f"n must be at most {len(rows)} for the {part} part of {path}, got {n}")
    rng = np.random.default_rng(zlib.crc32(f"{part} tinyimagenet".encode()))
    rows = np.sort(rng.permutation(rows)[:n])
    return x[rows], y[rows]
