"""The training images a table's ``data_source`` names: an ImageFolder, indexed as torchvision's
``ImageFolder`` indexes it and safe to read when an untrusted table names it, or an ``npz``
file read without pickle.

A table's ``data_source`` is metadata anyone can rewrite (its checksum has no secret in it), so
the folder it names is treated with care (``trusted=False``):

- the root must be an absolute path without ``..`` and not a pseudo filesystem (``/``,
  ``/proc``, ``/sys``, ``/dev``); it is resolved once;
- the scan never leaves the root: a symlink (folder or file) that resolves outside it, or a
  symlink loop, is refused, never followed;
- the scan is bounded in entries (:data:`MAX_ENTRIES`) and seconds (:data:`MAX_SECONDS`);
- errors name the root and what is wrong with it, never the folders found in it;
- an image is re-checked to lie inside the root when it is read.

A folder the caller names (``--data``, or ``trusted=True``) is followed as ``ImageFolder``
follows it (symlinks anywhere), still bounded. Each root is scanned once per process: the index
(file paths in index order) is cached.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surprise_monitor.monitor.advice import advise
from surprise_monitor.monitor.errors import SurpriseMonitorError
from surprise_monitor.monitor.loading.images import SOURCE_KINDS, Preprocessing

#: Directory entries a scan may visit (ImageNet's training set has 1.3 million files).
MAX_ENTRIES = 20_000_000
#: Seconds a scan may take.
MAX_SECONDS = 600.0
#: Roots never scanned: pseudo filesystems and the filesystem root.
REFUSED_ROOTS = ("/proc", "/sys", "/dev")
#: torchvision's ``IMG_EXTENSIONS`` (the files ``ImageFolder`` takes).
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
)  # fmt: skip

_CACHE: OrderedDict[tuple[str, bool], FolderIndex] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 8


class SourceError(SurpriseMonitorError, ValueError):
    """The training images a data source names cannot be read safely (or at all)."""


def source_error(problem: str) -> SourceError:
    """A :class:`SourceError` for ``problem`` that says how to pass the images instead, in the
    API (``dataset=``) and on the command line (``--data``)."""
    return advise(
        SourceError(f"{problem}; pass dataset=... (the calibration images)"),
        cli=f"{problem}; pass --data FOLDER (the calibration images)",
    )


@dataclass(frozen=True)
class FolderIndex:
    """An ImageFolder's files in ``ImageFolder`` index order."""

    root: Path  # resolved
    classes: tuple[str, ...]  # class folder names, sorted
    files: tuple[str, ...]  # image paths, index order
    targets: tuple[int, ...]  # the class of each file
    trusted: bool  # False: symlinks leaving the root are refused

    def __len__(self) -> int:
        return len(self.files)


def checked_root(root: str | Path, what: str = "the table's data_source") -> Path:
    """``root`` resolved, after refusing what an untrusted record must not name (a relative
    path, ``..``, the filesystem root or a pseudo filesystem); :class:`SourceError` otherwise."""
    text = str(root)
    if not os.path.isabs(text):
        raise source_error(f"{what} names a relative path {text!r} (refused)")
    if ".." in Path(text).parts:
        raise source_error(f"{what} path {text!r} contains '..' (refused)")
    real = Path(os.path.realpath(text))
    if real == Path(real.anchor) or any(
        real == Path(p) or Path(p) in real.parents for p in REFUSED_ROOTS
    ):
        raise source_error(f"{what} names {text!r}, a system folder (refused)")
    return real


def folder_index(
    root: str | Path,
    *,
    trusted: bool = False,
    max_entries: int = MAX_ENTRIES,
    max_seconds: float = MAX_SECONDS,
) -> FolderIndex:
    """The ImageFolder at ``root`` (scanned once per process; see the module's rules)."""
    real = Path(os.path.realpath(str(root))) if trusted else checked_root(root)
    if not real.is_dir():
        raise source_error(f"the training images folder {root} is not there")
    key = (str(real), trusted)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    index = _scan(real, trusted, max_entries, max_seconds)
    with _CACHE_LOCK:
        _CACHE[key] = index
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return index


def _scan(root: Path, trusted: bool, max_entries: int, max_seconds: float) -> FolderIndex:
    """Walk ``root`` as ``ImageFolder`` does: class folders sorted, then each class's folders in
    sorted path order and their image files in sorted name order."""
    budget = _Budget(root, max_entries, time.monotonic() + max_seconds)
    top = [e for e in budget.entries(root) if budget.is_dir(e, root, trusted)]
    classes = sorted(e.name for e in top)
    files: list[str] = []
    targets: list[int] = []
    for c, name in enumerate(classes):
        found = []
        for folder, names in sorted(_walk(os.path.join(str(root), name), root, trusted, budget)):
            found += [os.path.join(folder, n) for n in sorted(names) if _is_image(n)]
        files += found
        targets += [c] * len(found)
    if not files:
        raise source_error(f"the training images folder {root} holds no image in class folders")
    return FolderIndex(root, tuple(classes), tuple(files), tuple(targets), trusted)


def _is_image(name: str) -> bool:
    """True for the file names ``ImageFolder`` takes."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk(top: str, root: Path, trusted: bool, budget: _Budget) -> Iterator[tuple[str, list[str]]]:
    """``(folder, file names)`` for ``top`` and every folder below it (symlinked folders
    followed when they stay inside ``root``, or anywhere when ``trusted``); a folder reached
    twice (a symlink loop) is refused."""
    seen: set[tuple[int, int]] = set()
    stack = [top]
    while stack:
        folder = stack.pop()
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            raise source_error(f"the training images folder {root} has a symlink loop (refused)")
        seen.add((st.st_dev, st.st_ino))
        names = []
        for entry in budget.entries(Path(folder)):
            if budget.is_dir(entry, root, trusted):
                stack.append(os.path.join(folder, entry.name))
            else:
                names.append(entry.name)
        yield folder, names


class _Budget:
    """The scan's bounds (entries, deadline) and its symlink rule."""

    def __init__(self, root: Path, max_entries: int, deadline: float) -> None:
        self.root, self.left, self.deadline = root, max_entries, deadline

    def entries(self, folder: Path) -> list[os.DirEntry]:
        """The entries of ``folder``, counted against the bounds."""
        with os.scandir(folder) as it:
            out = []
            for entry in it:
                self.left -= 1
                if self.left < 0 or time.monotonic() > self.deadline:
                    raise source_error(
                        f"the training images folder {self.root} is too large to index (more "
                        "entries or seconds than allowed)"
                    )
                out.append(entry)
        return out

    def is_dir(self, entry: os.DirEntry, root: Path, trusted: bool) -> bool:
        """Whether to walk into ``entry``; :class:`SourceError` for a symlink leaving ``root``
        (unless ``trusted``)."""
        if entry.is_symlink() and not trusted:
            target = Path(os.path.realpath(entry.path))
            if target != root and root not in target.parents:
                raise source_error(
                    f"the training images folder {root} has a symlink leading out of it (refused)"
                )
        try:
            return entry.is_dir()
        except OSError:
            return False


class FolderImages:
    """The images of a :class:`FolderIndex`, preprocessed: ``dataset[i]`` is
    ``(tensor [C, H, W], class)`` exactly as ``ImageFolder`` with the same transform gives it;
    :meth:`path` is image i's file."""

    def __init__(self, index: FolderIndex, steps: Preprocessing) -> None:
        self.index = index
        self.steps = steps
        self._transform = steps.transform()

    def __len__(self) -> int:
        return len(self.index)

    def path(self, i: int) -> str:
        """Image ``i``'s file path."""
        if not 0 <= int(i) < len(self.index):
            raise IndexError(f"image {i} is outside the {len(self.index)} training images")
        return self.index.files[int(i)]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path = self.path(i)
        real = Path(os.path.realpath(path))
        root = self.index.root
        if not self.index.trusted and root not in real.parents:
            raise SourceError(f"training image {i} now lies outside {root}; refused")
        with open(real, "rb") as f, Image.open(f) as im:
            img = im.convert("RGB")  # torchvision's pil_loader
        return self._transform(img), self.index.targets[int(i)]


def source_dataset(source: dict[str, Any], root: str | Path | None = None) -> FolderImages:
    """The images of an ``imagefolder`` data_source, with its recorded preprocessing: from its
    own (untrusted) root, or from ``root`` the caller names (trusted)."""
    steps = Preprocessing.from_source(source)
    if root is not None:
        return FolderImages(folder_index(root, trusted=True), steps)
    declared = source.get("root")
    if not isinstance(declared, str):
        raise source_error("the table's data_source has no root folder")
    return FolderImages(folder_index(declared), steps)


def source_images(source: Mapping[str, Any], indices: Sequence[int]) -> torch.Tensor:
    """The normalised training images ``[k, C, H, W]`` at ``indices`` of a ``data_source``."""
    kind = source.get("kind")
    if kind == "imagefolder":
        return _imagefolder_images(source, indices)
    if kind == "npz":
        return _npz_images(source, indices)
    raise source_error(
        f"cannot load training images from a data_source of kind {kind!r} "
        f"(known: {', '.join(repr(k) for k in SOURCE_KINDS)})"
    )


def _imagefolder_images(source: Mapping[str, Any], indices: Sequence[int]) -> torch.Tensor:
    """Images of an ``imagefolder`` source, read with its recorded preprocessing."""
    ds = source_dataset(dict(source))
    return torch.stack([ds[int(i)][0] for i in indices])


def _npz_images(source: Mapping[str, Any], indices: Sequence[int]) -> torch.Tensor:
    """Images of an ``npz`` source: uint8 ``[N, H, W(, C)]`` read without pickle, normalised."""
    path = checked_root(str(source.get("path", "")))
    if not path.is_file():
        raise source_error(f"the table's training images {path} are not there")
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
