"""Resumable calibration: a JSON manifest of what a run has durably done, and what it ran with.

A calibration run processes its batches in a fixed order (one rank's share of the global batch
list) and appends each batch's alpha rows to per-class spill files. Every few batches it
commits a checkpoint: the spill files are flushed and fsynced first, then ``manifest.json`` is
replaced atomically (temporary file, fsync, rename, fsync of the folder). The manifest records:

- ``settings``: everything that decides the spilled values (model weights' fingerprint,
  requested layer, the options named in :data:`DECIDING_OPTIONS` (class output, mixed
  precision), batch size, the data's fingerprint, world size and rank, device type, kernel
  backend, torch version, exact or approximate mode and the sketch's grid). A resume with any of
  them different is refused, naming the differences.
- ``batches_done``: how many of this rank's batches are in the spill, in order.
- ``accumulator``: rows per class file (exact mode) or the name of the sketch state file.
- ``meta``: the resolved layer, its reason, filters, classes and input shape.

Resuming cuts each class file back to the recorded number of rows (rows written after the last
checkpoint by a killed run are dropped) and skips the recorded batches, so the result is the same
as that of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surprise_monitor.calibrate.distributed import DistInfo
from surprise_monitor.calibrate.options import RunOptions, TableOptions
from surprise_monitor.monitor.errors import SurpriseMonitorError
from surprise_monitor.monitor.files import atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT = "surprise-calibrate-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"

#: The options that decide the accumulated values, by group (the one place they are named): a
#: checkpoint records them, under their own names, and refuses a resume where one differs. The
#: others do not change the spilled rows (batches, workers, memory, the table's levels and
#: exemplars, which come after) or are recorded in their resolved form (the kernel backend, the
#: approximate mode and its grid: see ``calibrate.builder._settings``).
DECIDING_OPTIONS: dict[type, tuple[str, ...]] = {
    TableOptions: ("class_output",),
    RunOptions: ("amp",),
}


class CheckpointError(SurpriseMonitorError, ValueError):
    """A checkpoint cannot be used: made with other settings or data, or damaged."""


def deciding_options(*groups: object) -> dict[str, Any]:
    """The :data:`DECIDING_OPTIONS` of option ``groups``, by option name."""
    found: dict[str, Any] = {}
    for group in groups:
        names = DECIDING_OPTIONS.get(type(group), ())
        found.update({k: v for k, v in dataclasses.asdict(group).items() if k in names})
    return found


def manifest_path(directory: str | Path) -> Path:
    """The manifest file of the checkpoint in ``directory``."""
    return Path(directory) / MANIFEST


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest in ``directory``, or ``None`` when there is none."""
    path = manifest_path(directory)
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint manifest: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a surprise-calibrate checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {manifest.get('version')} is not supported "
            f"(this library writes version {VERSION})"
        )
    return manifest


@dataclass(frozen=True)
class Resumed:
    """What a checkpoint holds for a resumed run."""

    batches_done: int  # this rank's batches already in the accumulator
    meta: dict[str, Any] | None  # the run's meta (None: no batch was done)
    accumulator: dict[str, Any]  # the accumulator's record


class Checkpoint:
    """The checkpoint of one rank's run in its work folder ``directory``, made with
    ``settings`` (see :func:`check_settings`)."""

    def __init__(self, directory: Path, settings: dict[str, Any], info: DistInfo) -> None:
        self.directory, self.settings, self.info = directory, settings, info

    def open(self, resume: bool) -> Resumed | None:
        """The state to resume from; ``None`` when there is no checkpoint yet (a fresh start).
        :class:`CheckpointError` for a checkpoint without ``resume`` or made otherwise."""
        manifest = read_manifest(self.directory)
        if manifest is None:
            if resume:
                log.info(
                    "calibrate: no checkpoint in %s yet, starting from the beginning",
                    self.directory,
                )
            return None
        if not resume:
            raise CheckpointError(
                f"{manifest_path(self.directory)}: this folder holds a checkpoint of an earlier "
                "run; pass resume=True (--resume) to continue it, or use an empty folder"
            )
        check_settings(self.directory, manifest.get("settings", {}), self.settings)
        done = int(manifest.get("batches_done", 0))
        log.info("calibrate: resuming %s after %d batches", self.directory, done)
        return Resumed(done, manifest.get("meta"), manifest.get("accumulator", {}))

    def commit(
        self, done: int, complete: bool, meta: dict[str, Any] | None, record: dict[str, Any]
    ) -> None:
        """Write the manifest: ``done`` batches are durably in the accumulator (``record``)."""
        write_manifest(
            self.directory,
            {
                "settings": self.settings,
                "rank": self.info.rank,
                "world_size": self.info.world_size,
                "batches_done": done,
                "complete": complete,
                "meta": meta,
                "accumulator": record,
            },
        )


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest atomically (call it only after the data it describes is fsynced)."""
    body = {"format": FORMAT, "version": VERSION, **manifest}
    atomic_write_bytes(manifest_path(directory), json.dumps(body, indent=1).encode())


def check_settings(
    directory: str | Path, recorded: dict[str, Any], current: dict[str, Any]
) -> None:
    """Raise :class:`CheckpointError` naming every setting that differs."""
    keys = sorted(set(recorded) | set(current))
    diff = [k for k in keys if recorded.get(k) != current.get(k)]
    if diff:
        shown = "; ".join(
            f"{k}: checkpoint {_short(recorded.get(k))}, now {_short(current.get(k))}" for k in diff
        )
        raise CheckpointError(
            f"{manifest_path(directory)}: the checkpoint was made with other settings or data "
            f"({shown}); use another --checkpoint-dir or remove this one"
        )


def _short(value: Any) -> str:
    """``value`` as JSON, cut to 60 characters."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def dataset_fingerprint(dataset: Any) -> str:
    """SHA-256 of what identifies a dataset's content cheaply.

    - an ImageFolder-like dataset (``samples`` of ``(path, label)``): every path (relative to
      its ``root``) and label, plus the class names (an image edited in place is not detected);
    - a ``TensorDataset``: the bytes of every tensor;
    - a ``Subset``: its indices and the fingerprint of the dataset below;
    - anything else: its type, length and the tensors of its first, middle and last samples.
    """
    h = hashlib.sha256(type(dataset).__name__.encode())
    n = len(dataset)
    h.update(f"len={n};".encode())
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list):
        root = getattr(dataset, "root", None)
        for path, label in samples:
            name = os.path.relpath(path, root) if root else str(path)
            h.update(f"{name}\0{label}\n".encode())
        h.update(json.dumps(list(getattr(dataset, "classes", []))).encode())
    elif isinstance(dataset, torch.utils.data.TensorDataset):
        for t in dataset.tensors:
            _update_tensor(h, t)
    elif isinstance(dataset, torch.utils.data.Subset):
        h.update(np.asarray(dataset.indices, np.int64).tobytes())
        h.update(dataset_fingerprint(dataset.dataset).encode())
    else:
        for i in sorted({0, n // 2, n - 1} if n else set()):
            _update_any(h, dataset[i])
    return h.hexdigest()


def _update_tensor(h: Any, t: torch.Tensor) -> None:
    """Hash a tensor's dtype, shape and bytes."""
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}:{tuple(t.shape)};".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def _update_any(h: Any, obj: Any) -> None:
    """Hash a sample: its tensors and arrays by value, anything else by ``repr``."""
    if isinstance(obj, torch.Tensor):
        _update_tensor(h, obj)
    elif isinstance(obj, np.ndarray):
        _update_tensor(h, torch.from_numpy(np.ascontiguousarray(obj)))
    elif isinstance(obj, list | tuple):
        for o in obj:
            _update_any(h, o)
    else:
        h.update(repr(obj).encode())
