"""Known artefacts inserted at a random position into one image, with a mask of where they are.

Every function takes an un-normalised ``[H, W, 3]`` float image in ``[0, 1]``, a NumPy random
generator and a donor image (used only by :func:`patch`), and returns ``(image, mask)``: the
modified copy (values changed only inside ``mask``) and a boolean ``[H, W]`` mask of the
artefact's area (for the watermark and the blur, their whole square).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from bench.cifar import CIFAR10_MEAN, CIFAR10_STD

Artefact = Callable[[np.ndarray, np.random.Generator, np.ndarray], tuple[np.ndarray, np.ndarray]]
MAGENTA = (1.0, 0.0, 1.0)
WATERMARK_ALPHA = 0.5


def _place(
    image: np.ndarray, rng: np.random.Generator, size: int
) -> tuple[slice, slice, np.ndarray]:
    """A random ``size x size`` square inside the image: its row and column slices and mask."""
    h, w = image.shape[:2]
    r, c = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    mask = np.zeros((h, w), dtype=bool)
    rows, cols = slice(r, r + size), slice(c, c + size)
    mask[rows, cols] = True
    return rows, cols, mask


def patch(
    image: np.ndarray, rng: np.random.Generator, donor: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """An 8x8 patch cut from a random place of ``donor`` (another test image)."""
    rows, cols, mask = _place(image, rng, 8)
    src_rows, src_cols, _ = _place(donor, rng, 8)
    out = image.copy()
    out[rows, cols] = donor[src_rows, src_cols]
    return out, mask


def _filled(
    image: np.ndarray, rng: np.random.Generator, size: int, value: np.ndarray | float
) -> tuple[np.ndarray, np.ndarray]:
    """A ``size`` x ``size`` square of one colour ``value`` at a random place, and its mask."""
    rows, cols, mask = _place(image, rng, size)
    out = image.copy()
    out[rows, cols] = value
    return out, mask


def magenta(
    image: np.ndarray, rng: np.random.Generator, donor: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """An 8x8 magenta square sticker."""
    return _filled(image, rng, 8, MAGENTA)


def checker(
    image: np.ndarray, rng: np.random.Generator, donor: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A 10x10 black-and-white checker sticker (2x2 squares)."""
    rows, cols, mask = _place(image, rng, 10)
    i, j = np.indices((10, 10))
    board = (((i // 2) + (j // 2)) % 2).astype(image.dtype)
    out = image.copy()
    out[rows, cols] = board[..., None]
    return out, mask


def dead_pixels(
    image: np.ndarray, rng: np.random.Generator, donor: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A 6x6 block of dead (black) pixels."""
    return _filled(image, rng, 6, 0.0)


def blur(
    image: np.ndarray, rng: np.random.Generator, donor: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A 10x10 region blurred with a 5x5 box filter (edge-padded neighbourhood)."""
    rows, cols, mask = _place(image, rng, 10)
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)), mode="edge")
    out = image.copy()
    for r in range(rows.start, rows.stop):
        for c in range(cols.start, cols.stop):
            out[r, c] = padded[r : r + 5, c : c + 5].mean(axis=(0, 1))
    return out, mask


def glyph(size: int = 12) -> np.ndarray:
    """The watermark's glyph: a 2-pixel-wide cross and both diagonals inside a square frame."""
    i, j = np.indices((size, size))
    mid = size // 2
    cross = (abs(i - mid + 0.5) < 1) | (abs(j - mid + 0.5) < 1)
    diagonals = (i == j) | (i + j == size - 1)
    frame = (i == 0) | (j == 0) | (i == size - 1) | (j == size - 1)
    return cross | diagonals | frame


def watermark(
    image: np.ndarray, rng: np.random.Generator, donor: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A semi-transparent (alpha 0.5) white glyph over a 12x12 area (the mask: the whole area)."""
    rows, cols, mask = _place(image, rng, 12)
    out = image.copy()
    region = out[rows, cols]
    g = glyph(12)
    region[g] = (1 - WATERMARK_ALPHA) * region[g] + WATERMARK_ALPHA
    out[rows, cols] = region
    return out, mask


KINDS: dict[str, Artefact] = {
    "patch of another image": patch,
    "magenta square": magenta,
    "checker sticker": checker,
    "dead pixels": dead_pixels,
    "local blur": blur,
    "watermark": watermark,
}


def pixels(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, H, W, 3]`` in ``[0, 1]``."""
    return images.astype(np.float32) / 255.0


def normalise(image: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` in ``[0, 1]`` -> ``[3, H, W]``, normalised like :func:`bench.cifar.to_tensor`
    (:data:`bench.cifar.CIFAR10_MEAN` / ``CIFAR10_STD``)."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
    m = torch.tensor(CIFAR10_MEAN, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(CIFAR10_STD, dtype=torch.float32).view(-1, 1, 1)
    return (x - m) / s
