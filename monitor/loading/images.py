"""Images in, tensors out: the preprocessing of a calibration, and reading training images back.

:class:`Preprocessing` is the one statement of the pipeline: ``surprise-calibrate`` applies it to
its ImageFolder and records it in ``table.data_source``; ``surprise-explain`` and the exemplars read
the record back and apply the same steps.
:func:`surprise_monitor.monitor.loading.sources.source_images` reads the training images a
``data_source`` describes:

- ``{"kind": "imagefolder", "root", "resize", "crop", "mean", "std", "grayscale"}`` (what
  ``surprise-calibrate`` records): a torchvision ``ImageFolder`` with the same preprocessing,
  so index i is the same file as during calibration;
- ``{"kind": "npz", "path", "key", "mean", "std"}``: uint8 ``[N, H, W, C]`` (or ``[N, H, W]``)
  images in a NumPy file, read without pickle and normalised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOURCE_KINDS = ("imagefolder", "npz")


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to ``resize`` (0: no), centre-crop ``crop`` (0: no), to a
    tensor, normalise with ``mean`` / ``std``; one channel when ``grayscale``."""

    resize: int = 0
    crop: int = 0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    grayscale: bool = False

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values, std {len(self.std)}")

    @classmethod
    def from_source(cls, source: Mapping[str, Any] | None, **overrides: Any) -> Preprocessing:
        """The preprocessing a ``data_source`` records; ``overrides`` that are not ``None``
        replace its values. ``ValueError`` when no normalisation is known."""
        src = dict(source or {})
        given = {k: v for k, v in overrides.items() if v is not None}
        mean, std = given.get("mean", src.get("mean")), given.get("std", src.get("std"))
        if mean is None or std is None:
            raise ValueError(
                "the table records no normalisation (no mean/std in its data_source); pass the "
                "mean and std (--mean and --std)"
            )
        return cls(
            resize=int(given.get("resize", src.get("resize", 0)) or 0),
            crop=int(given.get("crop", src.get("crop", 0)) or 0),
            mean=tuple(float(v) for v in mean),
            std=tuple(float(v) for v in std),
            grayscale=bool(given.get("grayscale", src.get("grayscale", False))),
        )

    def source(self, root: str | Path) -> dict[str, Any]:
        """The ``data_source`` record of an ImageFolder at ``root`` read with these steps."""
        return {
            "kind": "imagefolder", "root": str(Path(root).resolve()), "resize": self.resize,
            "crop": self.crop, "mean": list(self.mean), "std": list(self.std),
            "grayscale": self.grayscale,
        }  # fmt: skip

    def transform(self, size: Sequence[int] | None = None) -> Any:
        """The torchvision transform; ``size`` ``(H, W)``: resize to it when neither a resize
        nor a crop is set."""
        from torchvision import transforms

        steps: list[Any] = []
        if self.grayscale:
            steps.append(transforms.Grayscale(num_output_channels=1))
        if self.resize > 0:
            steps.append(transforms.Resize(self.resize))
        if self.crop > 0:
            steps.append(transforms.CenterCrop(self.crop))
        if self.resize <= 0 and self.crop <= 0 and size:
            steps.append(transforms.Resize(tuple(size)))
        steps += [transforms.ToTensor(), transforms.Normalize(list(self.mean), list(self.std))]
        return transforms.Compose(steps)

    def load_image(self, path: str | Path, size: Sequence[int] | None = None) -> torch.Tensor:
        """The image file at ``path`` preprocessed: ``[1, C, H, W]``."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                img = im.convert("L" if self.grayscale else "RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"{path}: not a readable image: {exc}") from exc
        return self.transform(size)(img).unsqueeze(0)
