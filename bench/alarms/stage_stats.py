"""A far-shift component for the alarm benchmark: the Mahalanobis distance of each profile
layer's channel means from the training images' (issue 20).

The library's ``stage_energy`` is ``mean_c z_c^2`` of a layer's channel means: every channel
judged alone. Far shifts (the MNIST family, noise) move the channel means *together*, in
directions the training images never take, which a distance with the channels' covariance sees
and a sum of per-channel squares dilutes (Lee et al. 2018 use the same distance at several
layers). Here, per layer of :func:`layers_of` (the table's profile layers and its head layer):

- the channel means (spatial mean of the layer's output) of the first :data:`TRAIN_IMAGES`
  training images, split in two halves: the first fits the mean and covariance
  (:class:`StageMahalanobis`, class-agnostic, the covariance shrunk towards its mean eigenvalue
  by :data:`SHRINK`), the second is the *reference*: its distances are the ``[m, L]`` rows that
  fix each layer's tail probability and the gate's level (:mod:`bench.alarms.combine`);
- every judged set's distances ``[B, L]`` (cached per model, ``n``, part and set).

Only the benchmark uses it: a candidate that wins the leave-one-out would move into the library
(its calibration fits the same statistics on the table's reference images).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.alarms import collect
from bench.alarms.sets import ImageSet, cache_stem
from bench.cifar import load_cifar10, to_tensor

#: Training images used: the first half fits, the second half is the reference.
TRAIN_IMAGES = 20_000
#: Covariance shrinkage: ``(1 - s) S + s tr(S)/C I`` keeps the inverse stable.
SHRINK = 0.01
#: The component kind these distances are (``"stage_mahalanobis:<layer>"``).
KIND = "stage_mahalanobis"


@dataclass(frozen=True)
class StageMahalanobis:
    """``(x - mean)^T precision (x - mean)`` of ``[B, C]`` channel means."""

    mean: np.ndarray  # [C]
    precision: np.ndarray  # [C, C]

    @classmethod
    def fit(cls, x: np.ndarray, shrink: float = SHRINK) -> StageMahalanobis:
        """The mean and the shrunk covariance's inverse of ``x [n, C]`` (``n >= 2``)."""
        a = np.asarray(x, np.float64)
        if a.ndim != 2 or a.shape[0] < 2 or not np.isfinite(a).all():
            raise ValueError(f"need finite [n >= 2, C] channel means, got {a.shape}")
        if not 0.0 <= shrink <= 1.0:
            raise ValueError(f"shrink must lie in [0, 1], got {shrink}")
        mean = a.mean(axis=0)
        cov = np.atleast_2d(np.cov(a - mean, rowvar=False))
        c = cov.shape[0]
        cov = (1.0 - shrink) * cov + shrink * np.trace(cov) / c * np.eye(c)
        return cls(mean, np.linalg.pinv(cov, hermitian=True))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The distance of each row of ``x [B, C]``: ``[B]`` float64."""
        d = np.asarray(x, np.float64) - self.mean
        return np.maximum(((d @ self.precision) * d).sum(axis=1), 0.0)


def layers_of(table: object) -> list[str]:
    """The table's profile layers, then its head layer (when it has one)."""
    alarm = table.alarm  # type: ignore[attr-defined]
    return [*alarm.profile_layers, *([alarm.head_layer] if alarm.head_layer else [])]


def names_of(layers: Sequence[str]) -> tuple[str, ...]:
    """The component names of ``layers`` (``"stage_mahalanobis:<layer>"``)."""
    return tuple(f"{KIND}:{layer}" for layer in layers)


@torch.no_grad()
def channel_means(model: nn.Module, layers: Sequence[str], images: np.ndarray) -> np.ndarray:
    """``[B, sum_l C_l]``: each layer's channel means (spatial mean of its output) of uint8
    ``[B, 32, 32, 3]`` images, the layers' columns side by side."""
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise KeyError(f"the model has no layer {missing}")
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def hook(name: str):  # noqa: ANN202 - a forward hook
        """Keep ``name``'s channel means."""
        return lambda m, a, out: captured[name].append(out.detach().float().mean(dim=(2, 3)))

    handles = [modules[name].register_forward_hook(hook(name)) for name in layers]
    try:
        for s in range(0, len(images), collect.BATCH):
            model(to_tensor(images[s : s + collect.BATCH]))
    finally:
        for h in handles:
            h.remove()
    return torch.cat([torch.cat(captured[name]) for name in layers], dim=1).double().numpy()


@dataclass(frozen=True)
class StageStatistics:
    """One model's fitted distances (one per layer) and their reference rows ``[m, L]``."""

    layers: tuple[str, ...]
    widths: tuple[int, ...]
    fits: tuple[StageMahalanobis, ...]
    reference: np.ndarray

    def distances(self, means: np.ndarray) -> np.ndarray:
        """``[B, L]``: each layer's distance of ``[B, sum C]`` channel means."""
        spans = _spans(self.widths)
        if means.ndim != 2 or means.shape[1] != spans[-1][1]:
            raise ValueError(f"channel means {means.shape} for layers of {self.widths} channels")
        cols = [fit(means[:, a:b]) for fit, (a, b) in zip(self.fits, spans, strict=True)]
        return np.stack(cols, axis=1)


def _widths(model: nn.Module, layers: Sequence[str], image: np.ndarray) -> tuple[int, ...]:
    """Each layer's channel count (one forward pass of one image)."""
    means = [channel_means(model, [layer], image[None]) for layer in layers]
    return tuple(int(m.shape[1]) for m in means)


def statistics(name: str, model: nn.Module, table: object) -> StageStatistics:
    """The fitted distances of a model (the channel means of the training images cached)."""
    layers = layers_of(table)
    path = collect.folder(name) / "stage_means" / "train.npz"
    train = load_cifar10("train")
    images = train.images[: min(TRAIN_IMAGES, len(train.images))]
    if path.is_file():
        with np.load(path) as d:
            means = d["means"]
    else:
        means = channel_means(model, layers, images)
        path.parent.mkdir(parents=True, exist_ok=True)
        collect._save(path, means=means)
    widths = _widths(model, layers, images[0])
    if sum(widths) != means.shape[1]:
        raise ValueError(f"{path}: {means.shape[1]} columns for layers of {widths} channels")
    return fitted(layers, widths, means)


def fitted(layers: Sequence[str], widths: Sequence[int], means: np.ndarray) -> StageStatistics:
    """The distances fitted on the first half of ``means [n, sum C]`` (rows: images; columns:
    the layers' channels side by side), the second half's distances their reference."""
    half = len(means) // 2
    fits = tuple(StageMahalanobis.fit(means[:half, a:b]) for a, b in _spans(widths))
    stats = StageStatistics(tuple(layers), tuple(widths), fits, np.empty((0, len(layers))))
    return StageStatistics(stats.layers, stats.widths, fits, stats.distances(means[half:]))


def _spans(widths: Sequence[int]) -> list[tuple[int, int]]:
    """Each layer's ``(first, end)`` columns among layers of ``widths`` channels."""
    ends = np.cumsum(widths).tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def set_distances(
    name: str, model: nn.Module, stats: StageStatistics, images: ImageSet, folder: Path
) -> np.ndarray:
    """``[B, L]`` distances of a judged set's images, cached in ``folder``."""
    path = folder / f"{cache_stem(images.part, images.name)}.npz"
    if path.is_file():
        with np.load(path) as d:
            return d["distances"]
    found = stats.distances(channel_means(model, stats.layers, images.images))
    folder.mkdir(parents=True, exist_ok=True)
    collect._save(path, distances=found)
    return found
