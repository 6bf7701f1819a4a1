"""What ``surprise-calibrate`` checks before the long run, so that a mistake costs seconds and
one line instead of an hour and a traceback: the output path, the preprocessing against the
images and the model, the class order, and the model's accuracy on a sample of the calibration
images (random weights or mislabelled class folders calibrate every class wrong), with what the
model was fed (input size, the normalised images' channel mean and std). What a low accuracy
likely means, and whether the run stops, is :mod:`surprise_monitor.calibrate.diagnosis`'s.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from surprise_monitor.monitor.loading.images import Preprocessing


def check_out(out: str | Path) -> Path:
    """``--out`` as a path a table can be written to: not a folder, and in a writable folder
    (missing folders are created when the table is written, under a writable one);
    ``ValueError`` naming the flag otherwise."""
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out}: is a folder; give the table's file name (.safetensors)")
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"--out {out}: {folder} is not a folder")
    writable = os.access(folder, os.W_OK | os.X_OK)
    if not writable or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"--out {out}: not writable")
    return path


def read_class_order(value: str | None) -> list[str] | None:
    """``--class-order``: a file with one class name per line, or comma-separated names, in the
    model's label order (class i is line i); ``None`` when not given."""
    if not value:
        return None
    path = Path(value)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [n.strip() for n in value.split(",") if n.strip()]
    duplicates = [n for n, k in Counter(names).items() if k > 1]
    if not names or duplicates:
        raise ValueError(f"--class-order: needs distinct class names, got duplicates {duplicates}")
    return names


def image_folder(root: Path, steps: Preprocessing, order: list[str] | None) -> Any:
    """torchvision's ``ImageFolder`` at ``root`` with ``steps``; with ``order`` the class
    indices follow it (the model's labels) instead of the folders' alphabetical order. The
    image index order is the same either way (folders sorted by name)."""
    from torchvision.datasets import ImageFolder

    class OrderedImageFolder(ImageFolder):
        """An ImageFolder whose class indices follow ``order``."""

        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            """``order`` and its indices; ``ValueError`` for a folder it does not name."""
            found, _ = super().find_classes(directory)
            extra = sorted(set(found) - set(order))
            if extra:
                raise ValueError(
                    f"--class-order does not name the class folders {extra[:10]} of --data"
                )
            return list(order), {name: i for i, name in enumerate(order)}

    if order is None:
        return ImageFolder(str(root), transform=steps.transform())
    return OrderedImageFolder(str(root), transform=steps.transform(), allow_empty=True)


def checked_collate(batch: list[Any]) -> Any:
    """``default_collate``, after checking every image came out the same size (a one-line
    ``ValueError`` naming the flags otherwise)."""
    shapes = sorted({tuple(item[0].shape) for item in batch})
    if len(shapes) > 1:
        shown = " and ".join("x".join(map(str, s)) for s in shapes[:2])
        raise ValueError(
            f"the images come out of the preprocessing in different sizes ({shown}); set "
            "--resize and --crop so that every image has one size"
        )
    return default_collate(batch)


def check_channels(steps: Preprocessing) -> None:
    """``ValueError`` when ``--mean`` / ``--std`` do not have one value or one per channel."""
    channels = 1 if steps.grayscale else 3
    for flag, values in (("--mean", steps.mean), ("--std", steps.std)):
        if len(values) not in (1, channels):
            raise ValueError(
                f"{flag} has {len(values)} values but the images have {channels} channel"
                f"{'s' if channels > 1 else ''} ({'--grayscale' if steps.grayscale else 'RGB'})"
                f"; give {channels} values"
            )


def flags_of(steps: Preprocessing) -> str:
    """The preprocessing as the flags that set it."""
    text = f"--resize {steps.resize} --crop {steps.crop}"
    return text + (" --grayscale" if steps.grayscale else "")


@dataclass(frozen=True)
class AccuracyCheck:
    """The model's accuracy on a class-stratified sample of the calibration images, and what
    the model was fed: the input size and the normalised images' per-channel mean and std."""

    correct: int
    images: int
    classes: int
    swapped: list[tuple[str, int]]  # (class folder, the model's class most of its images get)
    chance: float = 0.0  # the accuracy of always answering the sample's largest class
    input_shape: tuple[int, ...] = ()  # [C, H, W] of the preprocessed images
    channel_mean: tuple[float, ...] = ()
    channel_std: tuple[float, ...] = ()

    @property
    def accuracy(self) -> float:
        """The sample's accuracy."""
        return self.correct / max(self.images, 1)

    @property
    def at_chance(self) -> bool:
        """True when the accuracy is no better than chance: the 95% interval reaches
        :attr:`chance` (a sample of two classes or more)."""
        return self.classes > 1 and self.images > 0 and self.interval()[0] <= self.chance

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """The Wilson 95% interval of the accuracy."""
        n, p = max(self.images, 1), self.accuracy
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)

    def line(self) -> str:
        """One line for people."""
        low, high = self.interval()
        return (
            f"model accuracy on {self.images} calibration images ({self.classes} classes): "
            f"{100 * self.accuracy:.1f}% (95% interval {100 * low:.1f}-{100 * high:.1f}%)"
        )


def stratified(targets: Sequence[int], n: int) -> list[int]:
    """Up to ``n`` dataset indices, the first ones of each class in turn."""
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    picked: list[int] = []
    depth = 0
    while len(picked) < n and any(depth < len(v) for v in by_class.values()):
        picked += [v[depth] for _, v in sorted(by_class.items()) if depth < len(v)]
        depth += 1
    return sorted(picked[:n])


def run_model(model: nn.Module, x: torch.Tensor, steps: Preprocessing) -> torch.Tensor:
    """The model's logits for a preprocessed batch; a model that cannot run it is one
    ``ValueError`` naming the input size and the preprocessing flags."""
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"the model cannot run the preprocessed images (each {'x'.join(map(str, x.shape[1:]))}"
            f", from {flags_of(steps)}): {type(exc).__name__}: {first}. Set --resize and "
            "--crop (0 turns one off) to the input size the model takes, --grayscale only "
            "for a one-channel model, and check --model / --model-kwargs"
        ) from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ValueError("the model's output is not [B, K] logits")
    return out


def accuracy_check(
    model: nn.Module,
    dataset: Any,
    steps: Preprocessing,
    images: int,
    batch_size: int,
    device: str,
) -> AccuracyCheck:
    """Run the model on a class-stratified sample of ``images`` calibration images (the first
    batch also checks that the model can run them at all)."""
    idx = stratified(dataset.targets, images)
    names = list(dataset.classes)
    correct, votes = 0, {c: Counter() for c in range(len(names))}
    moments = _ChannelMoments()
    for start in range(0, len(idx), batch_size):
        items = [dataset[i] for i in idx[start : start + batch_size]]
        x, y = checked_collate(items)
        moments.add(x)
        pred = run_model(model, x.to(device), steps).argmax(1).cpu()
        correct += int((pred == y).sum())
        for t, p in zip(y.tolist(), pred.tolist(), strict=True):
            votes[t][p] += 1
    largest = max((sum(v.values()) for v in votes.values()), default=0)
    return AccuracyCheck(
        correct, len(idx), len(names), _swapped(votes, names), largest / max(len(idx), 1),
        moments.shape, *moments.mean_std(),
    )  # fmt: skip


def _swapped(votes: dict[int, Counter], names: list[str]) -> list[tuple[str, int]]:
    """The class folders most of whose images the model gives one other class, and that
    class."""
    swapped = []
    for c, counts in votes.items():
        if counts:
            top, k = counts.most_common(1)[0]
            if top != c and k > sum(counts.values()) / 2:
                swapped.append((names[c], top))
    return swapped


class _ChannelMoments:
    """Per-channel mean and standard deviation of preprocessed batches (float64 sums)."""

    def __init__(self) -> None:
        self.shape: tuple[int, ...] = ()
        self.n, self.sum, self.squares = 0, torch.zeros(0), torch.zeros(0)

    def add(self, x: torch.Tensor) -> None:
        """Count a batch ``[B, C, H, W]``."""
        x = x.detach().double()
        if not self.shape:
            self.shape = tuple(x.shape[1:])
            self.sum = torch.zeros(x.shape[1], dtype=torch.float64)
            self.squares = torch.zeros_like(self.sum)
        dims = [0, *range(2, x.ndim)]
        self.sum += x.sum(dims)
        self.squares += (x * x).sum(dims)
        self.n += x.numel() // max(x.shape[1], 1)

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Each channel's mean and standard deviation (empty before any batch)."""
        if not self.n:
            return (), ()
        mean = self.sum / self.n
        std = (self.squares / self.n - mean * mean).clamp_min(0).sqrt()
        return tuple(mean.tolist()), tuple(std.tolist())
