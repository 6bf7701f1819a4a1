"""Calibration tables of the two strong CIFAR-10 models (:mod:`bench.strong_models`), built through
the library (:func:`surprise_monitor.calibrate.calibrate`) and cached outside the repository.

Splits:

- ``"train"``: all 50,000 CIFAR-10 training images with their true labels, the images the models
  were trained on (the paper's protocol: "a pre-trained model and all of the training data");
- ``"heldout"``: test images :data:`bench.strong_models.HELDOUT` (0..4,999), never trained on,
  with their true labels;
- ``"heldout_pred"``: the same images labelled with the model's own predictions;
- ``"train10k"``: training images 0..9,999 with their true labels (for tables at another layer
  than the final convolution, which the benchmarks build only to compare).

Tables are at the paper's layer, the final convolution (``layer="final-conv"``), unless a layer
is named: not at calibrate's default (the feature map the classifier head reads).

Tables are cached as ``{cache_dir}/strong/{model}-{fingerprint[:12]}-{split}.safetensors``
(``...-{split}-{layer}.safetensors`` for a table at a layer other than the default). A
build is resumable: alpha is spilled to a checkpoint folder beside the table and a killed run
continues where it stopped (``calibrate(..., checkpoint_dir=..., resume=True)``).

    python -m bench.strong_tables resnet18 train     # build (or find) one table
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from bench.cifar import cache_dir, data_source, load_cifar10, to_tensor
from bench.strong_models import HELDOUT, STRONG_MODELS, load_strong
from surprise_monitor.calibrate import CalibrationTable, calibrate, model_fingerprint
from surprise_monitor.calibrate.options import CheckpointOptions, RunOptions, TableOptions
from surprise_monitor.monitor.probe.layers import FINAL_CONV

#: Split -> (CIFAR-10 file, first index, stop index, labels: "true" or "pred").
SPLITS: dict[str, tuple[str, int, int, str]] = {
    "train": ("train", 0, 50000, "true"),
    "heldout": ("test", HELDOUT.start, HELDOUT.stop, "true"),
    "heldout_pred": ("test", HELDOUT.start, HELDOUT.stop, "pred"),
    "train10k": ("train", 0, 10000, "true"),
}


def table_path(name: str, model: nn.Module, split: str, layer: str | None = None) -> Path:
    """Where the table of ``model`` (strong model ``name``) on ``split`` is cached (``layer``:
    a layer other than the final convolution)."""
    tail = f"-{layer}" if layer else ""
    fp = model_fingerprint(model)[:12]
    return cache_dir() / "strong" / f"{name}-{fp}-{split}{tail}.safetensors"


def split_dataset(
    model: nn.Module, split: str, data_dir: str | Path | None = None
) -> TensorDataset:
    """The ``(image, label, index)`` dataset of ``split`` (labels: true, or the model's
    predictions for a ``*_pred`` split); ``index`` is the image's index in its file."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    file, start, stop, labels = SPLITS[split]
    s = load_cifar10(file, data_dir, stop)
    stop = min(stop, len(s))  # a smaller file (tests) is used whole
    if start >= stop:
        raise ValueError(f"{s.path} holds {len(s)} images: none in the {split} split")
    x = to_tensor(s.images[start:stop])
    y = torch.from_numpy(s.labels[start:stop])
    if labels == "pred":
        with torch.inference_mode():
            y = torch.cat([model(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    ds = TensorDataset(x, y, torch.arange(start, stop, dtype=torch.int64))
    ds.classes = s.class_names  # type: ignore[attr-defined]  # read by calibrate()
    return ds


def strong_table(
    name: str,
    split: str = "train",
    *,
    model: nn.Module | None = None,
    data_dir: str | Path | None = None,
    layer: str | None = None,
    log: Callable[[str], None] | None = print,
) -> CalibrationTable:
    """The calibration table of strong model ``name`` on ``split``: loaded from the cache, else
    built (resuming an interrupted build) and cached. ``model`` saves loading it again;
    ``layer``: another layer than the final convolution (the paper's layer, the default here;
    calibrate's own default is the feature map the classifier head reads)."""
    model = load_strong(name) if model is None else model
    path = table_path(name, model, split, layer)
    if path.is_file():
        return CalibrationTable.load(path)
    ckpt = path.with_suffix(".ckpt")
    ds = split_dataset(model, split, data_dir)
    started = time.perf_counter()
    if log:
        log(f"{name}: calibrating on {split} ({len(ds)} images); checkpoints in {ckpt}")
    table = calibrate(
        model,
        ds,
        layer=layer or FINAL_CONV,
        progress=False,
        table=TableOptions(data_source=data_source(SPLITS[split][0], data_dir)),
        run=RunOptions(batch_size=250),
        checkpoint=CheckpointOptions(dir=ckpt, resume=(ckpt / "manifest.json").is_file(), every=20),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    table.save(path)
    shutil.rmtree(ckpt, ignore_errors=True)
    if log:
        log(f"{name}: {split} table in {time.perf_counter() - started:.0f} s -> {path}")
    return CalibrationTable.load(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build (or find) the tables named."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=STRONG_MODELS)
    p.add_argument("splits", nargs="+", choices=sorted(SPLITS))
    p.add_argument("--data-dir", help="folder with cifar10_*.npz (default ../shared/data)")
    args = p.parse_args(argv)
    model = load_strong(args.model)
    for split in args.splits:
        strong_table(args.model, split, model=model, data_dir=args.data_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
