"""Training exemplars of a (class, filter): the calibration images with the largest alpha.

``table.top_indices[c, n]`` holds their dataset indices (``-1`` = none). The images are read
back from ``table.data_source`` or from a dataset the caller passes:

- ``{"kind": "imagefolder", "root", "resize", "crop", "mean", "std", "grayscale"}`` (what
  ``surprise-calibrate`` records): a torchvision ``ImageFolder`` with the same preprocessing,
  so index i is the same file as during calibration;
- ``{"kind": "npz", "path", "key", "mean", "std"}``: uint8 ``[N, H, W, C]`` (or ``[N, H, W]``)
  images in a NumPy file, read without pickle and normalised;
- a dataset: ``dataset[i]`` is ``(image, label, ...)`` with the normalised ``[C, H, W]`` tensor
  the model was calibrated on.

Each exemplar carries the region that most activates the filter, found as for the input
(filter-restricted gradient, SLIC, the highest-scored superpixel).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibrate.table import CalibrationTable
from monitor.saliency import input_gradient
from monitor.superpixels import (
    ranked_segments,
    region_mask,
    segment,
    superpixel_scores,
    unnormalise,
)


@dataclass
class Exemplar:
    """One training image that strongly engages the filter for the class."""

    index: int  # dataset index
    rank: int  # 0 = largest alpha
    alpha: float  # its alpha for (class, filter) at calibration
    image: np.ndarray  # [H, W, C] un-normalised picture in [0, 1]
    segments: np.ndarray = field(repr=False)  # [H, W] superpixel labels
    scores: np.ndarray = field(repr=False)  # [S] filter-restricted gradient per superpixel
    mask: np.ndarray = field(repr=False)  # [H, W] bool: the region that most activates the filter


def _source_images(source: Mapping[str, Any], indices: Sequence[int]) -> torch.Tensor:
    kind = source.get("kind")
    if kind == "imagefolder":
        from torchvision.datasets import ImageFolder

        from calibrate.cli import image_transform

        root = Path(str(source.get("root", "")))
        if not root.is_dir():
            raise FileNotFoundError(
                f"the table's training images {root} are not there; pass dataset=... instead"
            )
        transform = image_transform(
            int(source.get("resize", 0) or 0), int(source.get("crop", 0) or 0),
            source["mean"], source["std"], bool(source.get("grayscale", False)),
        )  # fmt: skip
        ds = ImageFolder(str(root), transform=transform)
        return torch.stack([ds[int(i)][0] for i in indices])
    if kind == "npz":
        path = Path(str(source.get("path", "")))
        if not path.is_file():
            raise FileNotFoundError(
                f"the table's training images {path} are not there; pass dataset=... instead"
            )
        with np.load(path, allow_pickle=False) as d:
            arr = d[str(source.get("key", "x"))]
            limit = source.get("limit")
            n = len(arr) if limit is None else min(len(arr), int(limit))
            bad = [int(i) for i in indices if not 0 <= int(i) < n]
            if bad:
                raise IndexError(f"exemplar indices {bad} outside the {n} images of {path}")
            picked = np.asarray(arr[np.asarray(indices, dtype=np.int64)])
        if picked.ndim == 3:
            picked = picked[..., None]
        if picked.dtype != np.uint8 or picked.ndim != 4:
            raise ValueError(f"{path}: expected uint8 [N, H, W, C] images, got {picked.dtype}")
        x = torch.from_numpy(picked).permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(source["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(source["std"], dtype=torch.float32).view(1, -1, 1, 1)
        return (x - mean) / std
    raise ValueError(
        f"cannot load training images from a data_source of kind {kind!r} "
        "(known: 'imagefolder', 'npz'); pass dataset=..."
    )


def load_images(
    indices: Sequence[int],
    *,
    data_source: Mapping[str, Any] | None = None,
    dataset: Any = None,
) -> torch.Tensor:
    """The normalised training images ``[k, C, H, W]`` at ``indices``, from ``dataset`` when
    given, else from ``data_source``."""
    if len(indices) == 0:
        raise ValueError("no indices to load")
    if dataset is not None:
        items = []
        for i in indices:
            item = dataset[int(i)]
            img = item[0] if isinstance(item, tuple | list) else item
            if not isinstance(img, torch.Tensor) or img.ndim != 3:
                raise ValueError(
                    f"dataset[{int(i)}] must give a [C, H, W] image tensor first, got "
                    f"{getattr(img, 'shape', type(img).__name__)}"
                )
            items.append(img)
        return torch.stack(items)
    if data_source is None:
        raise ValueError(
            "the table does not record where its training images came from (data_source); "
            "pass dataset=... (the calibration dataset, same order and preprocessing)"
        )
    return _source_images(data_source, indices)


def exemplar_indices(table: CalibrationTable, cls: int, filter: int, k: int | None = None):
    """``[(index, alpha), ...]`` of the top exemplars of ``(cls, filter)``, largest alpha first."""
    table.ensure_exemplars()
    if not 0 <= cls < table.num_classes:
        raise ValueError(f"class {cls} is outside the table's {table.num_classes} classes")
    if not 0 <= filter < table.num_filters:
        raise ValueError(f"filter {filter} is outside the table's {table.num_filters} filters")
    idx = table.top_indices[cls, filter].tolist()
    alpha = table.top_alpha[cls, filter].tolist()
    pairs = [(int(i), float(a)) for i, a in zip(idx, alpha, strict=True) if i >= 0]
    return pairs if k is None else pairs[:k]


def exemplars(
    model: torch.nn.Module,
    table: CalibrationTable,
    cls: int,
    filter: int,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    k: int | None = None,
    dataset: Any = None,
    n_segments: int = 50,
    regions: int = 1,
    reduce: str = "sum",
    output_to_logits: Any = None,
    slic_kwargs: Mapping[str, Any] | None = None,
) -> list[Exemplar]:
    """The top-``k`` training exemplars of ``(cls, filter)``, each with its region: the
    ``regions`` highest-scored superpixels of the gradient of class ``cls``'s score that flows
    only through ``filter`` (the method used for the input)."""
    pairs = exemplar_indices(table, cls, filter, k)
    if not pairs:
        return []
    device = next(iter(model.parameters()), torch.empty(0)).device
    x = load_images([i for i, _ in pairs], data_source=table.data_source, dataset=dataset)
    x = x.to(device=device, dtype=torch.float32)
    if table.input_shape and tuple(x.shape[1:]) != tuple(table.input_shape):
        raise ValueError(
            f"exemplar images have shape {tuple(x.shape[1:])}, the table was calibrated on "
            f"{tuple(table.input_shape)}: the dataset or its preprocessing differs"
        )
    grads = input_gradient(
        model, table.layer, x, cls, filter, score=table.score, output_to_logits=output_to_logits
    )
    out = []
    for rank, ((index, alpha), xi, gi) in enumerate(zip(pairs, x, grads, strict=True)):
        image = unnormalise(xi, mean, std)
        labels = segment(image, n_segments, **dict(slic_kwargs or {}))
        scores = superpixel_scores(gi, labels, reduce=reduce)
        mask = region_mask(labels, ranked_segments(scores)[:regions])
        out.append(Exemplar(index, rank, alpha, image, labels, scores, mask))
    return out
