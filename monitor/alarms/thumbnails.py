"""A small PNG of the input as a person sees it: un-normalised with the table's recorded
preprocessing (``data_source["mean"/"std"]``), scaled to at most ``size`` pixels a side
(small images are enlarged by a whole factor, nearest-neighbour, so pixels stay sharp)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from surprise_monitor.monitor.explain.superpixels import normalisation, unnormalise


def thumbnail_png(
    x: torch.Tensor,
    data_source: Mapping[str, Any] | None,
    size: int = 96,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> bytes:
    """PNG bytes of one normalised image ``x`` ``[C, H, W]``. Without a recorded (or given)
    normalisation the image is min-max scaled to [0, 1] instead."""
    try:
        m, s = normalisation(data_source, mean, std)
        image = unnormalise(x.float(), m, s)
    except ValueError:
        v = x.detach().float().cpu()
        v = (v - v.min()) / (v.max() - v.min()).clamp_min(1e-12)
        image = v.permute(1, 2, 0).double().numpy()
    pixels = np.round(np.nan_to_num(image) * 255.0).astype(np.uint8)
    if pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    picture = Image.fromarray(pixels)
    h, w = picture.height, picture.width
    if max(h, w) > size:
        picture.thumbnail((size, size), Image.Resampling.BILINEAR)
    elif max(h, w) * 2 <= size:
        k = size // max(h, w)
        picture = picture.resize((w * k, h * k), Image.Resampling.NEAREST)
    out = io.BytesIO()
    picture.save(out, format="PNG", optimize=True)
    return out.getvalue()
