"""Training exemplars of a (class, filter): the calibration images with the largest alpha.

``table.top_indices[c, n]`` holds their dataset indices (``-1`` = none). The images are read back
from ``table.data_source`` (an ImageFolder recorded by ``surprise-calibrate`` or an npz file; see
:mod:`surprise_monitor.monitor.loading.images`) or from a dataset the caller passes: ``dataset[i]``
is ``(image, label, ...)`` with the normalised ``[C, H, W]`` tensor the model was calibrated on.

Each exemplar carries the region that most activates the filter, found as for the input
(filter-restricted gradient, SLIC, the highest-scored superpixel).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from surprise_monitor.monitor.explain import superpixels
from surprise_monitor.monitor.explain.saliency import input_gradient
from surprise_monitor.monitor.loading.models import model_device, model_dtype
from surprise_monitor.monitor.loading.sources import source_dataset, source_error, source_images
from surprise_monitor.monitor.table import CalibrationTable


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
    path: str | None = None  # its file, when the images come from a folder


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
        raise source_error(
            "the table does not record where its training images came from (data_source)"
        )
    return source_images(data_source, indices)


def image_paths(
    indices: Sequence[int],
    *,
    data_source: Mapping[str, Any] | None = None,
    dataset: Any = None,
) -> list[str | None]:
    """The file of each training image at ``indices`` when known: ``dataset.path(i)`` when the
    dataset has one (``monitor.loading.source_dataset``), else the table's ImageFolder."""
    if dataset is not None:
        path = getattr(dataset, "path", None)
        return [str(path(int(i))) if callable(path) else None for i in indices]
    if data_source is not None and data_source.get("kind") == "imagefolder":
        images = source_dataset(dict(data_source))
        return [images.path(int(i)) for i in indices]
    return [None] * len(indices)


def exemplar_indices(
    table: CalibrationTable, cls: int, filter: int, k: int | None = None
) -> list[tuple[int, float]]:
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
    output_to_logits: Callable[[Any], torch.Tensor] | None = None,
    slic_kwargs: Mapping[str, Any] | None = None,
) -> list[Exemplar]:
    """The top-``k`` training exemplars of ``(cls, filter)``, each with its region: the
    ``regions`` highest-scored superpixels of the gradient of class ``cls``'s score that flows
    only through ``filter`` (the method used for the input); an empty region when that gradient
    is zero (every superpixel ties)."""
    pairs = exemplar_indices(table, cls, filter, k)
    if not pairs:
        return []
    device = model_device(model)
    indices = [i for i, _ in pairs]
    x = load_images(indices, data_source=table.data_source, dataset=dataset)
    paths = image_paths(indices, data_source=table.data_source, dataset=dataset)
    x = x.to(device=device, dtype=model_dtype(model))
    if table.input_shape and tuple(x.shape[1:]) != tuple(table.input_shape):
        raise ValueError(
            f"exemplar images have shape {tuple(x.shape[1:])}, the table was calibrated on "
            f"{tuple(table.input_shape)}: the dataset or its preprocessing differs"
        )
    grads = input_gradient(
        model,
        table.layer,
        x,
        cls,
        filter,
        class_output=table.class_output,
        output_to_logits=output_to_logits,
    )
    out = []
    for rank, ((index, alpha), xi, gi, path) in enumerate(zip(pairs, x, grads, paths, strict=True)):
        image = superpixels.unnormalise(xi.float(), mean, std)
        labels, scores, order = superpixels.ranked_superpixels(
            image, gi.float(), n_segments, reduce=reduce, slic_kwargs=slic_kwargs
        )
        chosen = order[:regions] if superpixels.has_region(scores) else []  # no tie-break
        mask = superpixels.region_mask(labels, chosen)
        out.append(Exemplar(index, rank, alpha, image, labels, scores, mask, path))
    return out
