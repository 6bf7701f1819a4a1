"""Pictures of explanations: a region's boundary drawn on an image, and captioned pictures side
by side (the paper's Figures 7 and 8: the input beside its training exemplars). PIL for single
images, matplotlib (Agg, no global pyplot state) for the composite figure; files are written
atomically (:mod:`surprise_monitor.monitor.files`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from surprise_monitor.monitor.files import atomic_write

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


#: Legend entries: what the outline and the dimmed parts of the pictures mean.
OUTLINE, DIMMED = "outline", "dimmed"


def panels_figure(
    panels: Sequence[Panel],
    title: str,
    path: str | Path,
    *,
    legend: Sequence[tuple[str, str]] = (),
    panel_inches: float = 2.4,
    dpi: int = 100,
) -> Path:
    """One PNG: the panels in a row, each captioned below, the first one framed, under
    ``title``; ``legend``: ``(OUTLINE | DIMMED, text)`` entries drawn below."""
    return grid_figure([panels], title, path, legend=legend, panel_inches=panel_inches, dpi=dpi)


def grid_figure(
    rows: Sequence[Sequence[Panel | None]],
    title: str,
    path: str | Path,
    *,
    legend: Sequence[tuple[str, str]] = (),
    notes: Sequence[str] = (),
    panel_inches: float = 2.4,
    dpi: int = 100,
) -> Path:
    """One PNG: rows of captioned panels (``None`` leaves a cell empty, or holds
    ``notes[row]``), the first panel framed, under ``title``, with ``legend`` below."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(len(r) for r in rows)
    lines = max(p.caption.count("\n") + 1 for r in rows for p in r if p is not None)
    title_in, caption_in = 0.45 + 0.18 * title.count("\n"), 0.16 * lines + 0.12
    legend_in = 0.22 * len(legend) + (0.1 if legend else 0.0)
    row_in = panel_inches + caption_in
    height = title_in + len(rows) * row_in + legend_in
    fig = Figure(figsize=(panel_inches * n, height), dpi=dpi)
    FigureCanvasAgg(fig)
    for r, row in enumerate(rows):
        top = 1 - (title_in + r * row_in) / height
        for i, panel in enumerate(row):
            left = (i + 0.04) / n
            ax = fig.add_axes((left, top - panel_inches / height, 0.92 / n, panel_inches / height))
            _draw_panel(ax, panel, notes[r] if r < len(notes) else "", framed=(r, i) == (0, 0))
    fig.suptitle(title, fontsize=10, y=1 - 0.12 / height, va="top")
    if legend:
        fig.legend(
            handles=_legend_handles(legend), loc="lower center", fontsize=8, frameon=False,
            ncol=1, bbox_to_anchor=(0.5, 0.0),
        )  # fmt: skip
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def _draw_panel(ax: Any, panel: Panel | None, note: str, framed: bool) -> None:
    """One cell: the picture and its caption, or an empty cell with ``note``."""
    ax.set_xticks([])
    ax.set_yticks([])
    if panel is None:
        ax.set_axis_off()
        ax.text(0.5, 0.5, note, ha="center", va="center", fontsize=8, wrap=True)
        return
    ax.imshow(panel.rgb, interpolation="nearest")
    ax.set_xlabel(panel.caption, fontsize=8, linespacing=1.3)
    if framed:
        for spine in ax.spines.values():
            spine.set_edgecolor("black")
            spine.set_linewidth(2)


def _legend_handles(legend: Sequence[tuple[str, str]]) -> list[Any]:
    """Matplotlib patches for the legend entries."""
    from matplotlib.patches import Patch

    yellow = tuple(c / 255 for c in BOUNDARY_RGB)
    handles = []
    for kind, text in legend:
        if kind == OUTLINE:
            handles.append(Patch(facecolor="none", edgecolor=yellow, linewidth=2, label=text))
        else:
            handles.append(Patch(facecolor=(0.25, 0.25, 0.25), edgecolor="none", label=text))
    return handles
