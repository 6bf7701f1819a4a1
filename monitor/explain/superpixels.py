"""SLIC superpixels of an un-normalised image and gradient scores per superpixel.

The network sees normalised tensors, ``x = (image - mean) / std`` per channel; SLIC needs the
picture itself, so :func:`unnormalise` inverts that with the ``mean`` / ``std`` the caller's
preprocessing used (a calibration table records them in ``table.data_source``; see
:func:`normalisation`) and clips to ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch


def normalisation(
    data_source: Mapping[str, Any] | None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel ``(mean, std)`` of the preprocessing: the explicit arguments when given,
    else ``data_source["mean"]`` / ``["std"]`` (as recorded by ``surprise-calibrate``)."""
    if mean is None and data_source is not None:
        mean = data_source.get("mean")
    if std is None and data_source is not None:
        std = data_source.get("std")
    if mean is None or std is None:
        raise ValueError(
            "the image normalisation is unknown: the table's data_source records no mean/std; "
            "pass mean=... and std=... (the Normalize values of your preprocessing; mean=0, "
            "std=1 for inputs that are not normalised)"
        )
    mean_t = tuple(float(v) for v in np.atleast_1d(np.asarray(mean, dtype=np.float64)))
    std_t = tuple(float(v) for v in np.atleast_1d(np.asarray(std, dtype=np.float64)))
    if len(mean_t) != len(std_t):
        raise ValueError(f"mean has {len(mean_t)} values, std {len(std_t)}")
    if any(s <= 0 for s in std_t):
        raise ValueError(f"std must be positive, got {std_t}")
    return mean_t, std_t


def unnormalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """One normalised image ``[C, H, W]`` (or ``[1, C, H, W]``) -> float ``[H, W, C]`` in [0, 1]."""
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"expected one [C, H, W] image, got shape {tuple(x.shape)}")
    c = x.shape[0]
    m, s = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    if m.size == 1:
        m, s = np.repeat(m, c), np.repeat(s, c)
    if m.size != c or s.size != c:
        raise ValueError(f"mean/std have {m.size} values for an image with {c} channels")
    img = x.detach().cpu().double().numpy() * s[:, None, None] + m[:, None, None]
    return np.clip(img.transpose(1, 2, 0), 0.0, 1.0)


def segment(image: np.ndarray, n_segments: int = 50, **slic_kwargs: Any) -> np.ndarray:
    """SLIC superpixels of an ``[H, W, C]`` image in [0, 1]: int64 labels ``[H, W]``, 0..S-1.

    ``n_segments`` is SLIC's target; the count found can differ a little. Defaults:
    ``compactness=10``, ``start_label=0``, colour images in CIELAB (scikit-image's defaults);
    ``slic_kwargs`` override them. A grey image (one channel) is segmented on its intensity.
    """
    from skimage.segmentation import slic  # imported on use: keeps `import monitor` light

    if image.ndim != 3:
        raise ValueError(f"expected an [H, W, C] image, got shape {image.shape}")
    if n_segments < 1:
        raise ValueError(f"n_segments must be at least 1, got {n_segments}")
    kwargs: dict[str, Any] = {"compactness": 10.0, "start_label": 0}
    if image.shape[2] == 1:
        image = image[..., 0]
        kwargs["channel_axis"] = None
    kwargs.update(slic_kwargs)
    labels = slic(image.astype(np.float64), n_segments=n_segments, **kwargs)
    # Relabel to 0..S-1 (SLIC can leave gaps after enforcing connectivity).
    _, dense = np.unique(labels, return_inverse=True)
    return dense.reshape(labels.shape).astype(np.int64)


def pixel_saliency(gradient: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per-pixel saliency of an input gradient ``[C, H, W]``: ``max_c |g[c, i, j]|`` (the vanilla
    gradient saliency map of Simonyan et al.), float64 ``[H, W]``."""
    g = gradient.detach().cpu().numpy() if isinstance(gradient, torch.Tensor) else gradient
    g = np.asarray(g, dtype=np.float64)
    if g.ndim == 4 and g.shape[0] == 1:
        g = g[0]
    if g.ndim != 3:
        raise ValueError(f"expected a [C, H, W] gradient, got shape {g.shape}")
    return np.abs(g).max(axis=0)


def superpixel_scores(
    gradient: torch.Tensor | np.ndarray, labels: np.ndarray, reduce: str = "sum"
) -> np.ndarray:
    """Score of each superpixel: ``score[s] = sum over pixels (i, j) with labels[i, j] == s of
    max_c |gradient[c, i, j]|`` (``reduce="sum"``, the default: the gradient mass of the
    region), or that sum divided by the region's pixel count (``reduce="mean"``).

    Returns float64 ``[S]`` with ``S = labels.max() + 1``.
    """
    sal = pixel_saliency(gradient)
    if sal.shape != labels.shape:
        raise ValueError(f"gradient is {sal.shape} but the superpixel labels are {labels.shape}")
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    s = int(labels.max()) + 1
    flat = labels.ravel()
    scores = np.bincount(flat, weights=sal.ravel(), minlength=s)
    if reduce == "mean":
        scores = scores / np.maximum(np.bincount(flat, minlength=s), 1)
    return scores


def ranked_segments(scores: np.ndarray) -> np.ndarray:
    """Superpixel ids, highest score first (ties: lower id first)."""
    return np.argsort(-scores, kind="stable")


def has_region(scores: np.ndarray) -> bool:
    """Whether the scores single out a region: some superpixel scores more than another. An
    all-zero gradient (a filter that does not fire) scores every superpixel 0: a tie among all
    superpixels is *no region*, never superpixel 0 (the lowest id a stable ranking puts first)."""
    s = np.asarray(scores, dtype=np.float64)
    finite = s[np.isfinite(s)]
    return finite.size > 0 and float(finite.max()) > float(finite.min())


def top_region(scores: np.ndarray) -> int | None:
    """The highest-scored superpixel (ties: the lower id), or ``None`` when every superpixel
    scores the same (:func:`has_region`)."""
    return int(ranked_segments(np.asarray(scores))[0]) if has_region(scores) else None


def region_share(scores: np.ndarray, segment: int | None) -> float:
    """Superpixel ``segment``'s share of the saliency mass, ``scores[segment] / sum(scores)``,
    in [0, 1]; 0 for no region (``None``) or no mass."""
    s = np.asarray(scores, dtype=np.float64)
    total = float(s.sum())
    if segment is None or not total > 0:
        return 0.0
    return float(min(max(s[segment] / total, 0.0), 1.0))


def region_mask(labels: np.ndarray, segments: Sequence[int] | np.ndarray) -> np.ndarray:
    """Bool ``[H, W]``: the pixels of the given superpixels."""
    return np.isin(labels, np.asarray(segments, dtype=np.int64))


def ranked_superpixels(
    image: np.ndarray,
    gradient: torch.Tensor | np.ndarray,
    n_segments: int,
    *,
    reduce: str = "sum",
    slic_kwargs: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SLIC superpixels of ``image`` scored by ``gradient`` (the steps every explanation takes):
    ``(labels [H, W], scores [S], superpixel ids highest score first)``."""
    labels = segment(image, n_segments, **dict(slic_kwargs or {}))
    scores = superpixel_scores(gradient, labels, reduce=reduce)
    return labels, scores, ranked_segments(scores)
