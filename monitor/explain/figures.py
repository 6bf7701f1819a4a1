"""Pictures of explanations: a region's boundary drawn on an image, and captioned pictures side
by side (the paper's Figures 7 and 8: the input beside its training exemplars). PIL for single
images, matplotlib (Agg, no global pyplot state) for the composite figure; files are written
atomically (:mod:`monitor.files`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from monitor.files import atomic_write

BOUNDARY_RGB: tuple[int, int, int] = (255, 255, 0)  # yellow, as in the paper's figures
MIN_SIDE = 256


def default_scale(shape: Sequence[int], min_side: int = MIN_SIDE) -> int:
    """Integer upscaling that brings the longer side of an ``[H, W, ...]`` image to ``min_side``."""
    return max(1, math.ceil(min_side / max(int(shape[0]), int(shape[1]))))


def to_rgb8(image: np.ndarray, scale: int = 1) -> np.ndarray:
    """``[H, W, C]`` float in [0, 1] (C = 1 or 3) -> uint8 ``[H*scale, W*scale, 3]`` (nearest)."""
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected an [H, W, 1|3] image, got shape {image.shape}")
    img = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)


def boundary_pixels(mask: np.ndarray, scale: int = 1, width: int | None = None) -> np.ndarray:
    """Bool ``[H*scale, W*scale]``: the inner boundary of the upscaled ``mask`` (region pixels
    with a 4-neighbour outside it or at the image's edge), ``width`` pixels thick (default
    ``max(1, scale // 3)``); it never leaves the region."""
    from skimage.morphology import dilation
    from skimage.segmentation import find_boundaries

    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {mask.shape}")
    big = np.repeat(np.repeat(mask.astype(bool), scale, axis=0), scale, axis=1)
    # Padded, so a region that reaches the image's edge is outlined there too.
    edge = find_boundaries(np.pad(big, 1), mode="inner")[1:-1, 1:-1]
    width = max(1, scale // 3) if width is None else width
    if width > 1:
        footprint = np.ones((2 * width - 1,) * 2, np.uint8)
        edge = (dilation(edge.astype(np.uint8), footprint) > 0) & big
    return edge


def draw_boundary(
    image: np.ndarray,
    mask: np.ndarray,
    scale: int | None = None,
    color: tuple[int, int, int] = BOUNDARY_RGB,
    dim: float | None = None,
) -> np.ndarray:
    """uint8 RGB picture of ``image`` upscaled, with ``mask``'s boundary drawn in ``color``.

    ``dim`` (0..1) darkens everything outside the region to that fraction ("masked to the
    region", as the paper shows exemplars).
    """
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    scale = default_scale(image.shape) if scale is None else scale
    rgb = to_rgb8(image, scale)
    if dim is not None:
        outside = ~np.repeat(np.repeat(mask.astype(bool), scale, axis=0), scale, axis=1)
        rgb[outside] = np.round(rgb[outside] * float(dim)).astype(np.uint8)
    rgb[boundary_pixels(mask, scale)] = color
    return rgb


def save_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 RGB array as PNG, atomically."""
    return atomic_write(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG"))


class Panel(NamedTuple):
    """One picture of a composite figure."""

    rgb: np.ndarray  # uint8 [H, W, 3]
    caption: str


def panels_figure(
    panels: Sequence[Panel],
    title: str,
    path: str | Path,
    *,
    panel_inches: float = 2.4,
    dpi: int = 100,
) -> Path:
    """One PNG: the panels in a row, each captioned below, the first one framed, under
    ``title``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(panels)
    lines = max(p.caption.count("\n") + 1 for p in panels)
    title_in, caption_in = 0.45, 0.16 * lines + 0.12
    height = panel_inches + title_in + caption_in
    fig = Figure(figsize=(panel_inches * n, height), dpi=dpi)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(
        left=0.04 / n, right=1 - 0.04 / n, top=1 - title_in / height,
        bottom=caption_in / height, wspace=0.08,
    )  # fmt: skip
    for i, (rgb, caption) in enumerate(panels):
        ax = fig.add_subplot(1, n, i + 1)
        ax.imshow(rgb, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(caption, fontsize=8, linespacing=1.3)
        if i == 0:
            for spine in ax.spines.values():
                spine.set_edgecolor("black")
                spine.set_linewidth(2)
    fig.suptitle(title, fontsize=10, y=1 - 0.12 / height, va="top")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
