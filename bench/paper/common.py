"""Shared set-up of the paper experiments: data, the models, their calibration tables.

- Data: CIFAR-10 and the MNIST-family files from ``--data-dir``, else ``$SURPRISE_DATA_DIR``,
  else ``../shared/data`` (:func:`bench.cifar.find_data_dir`); a missing folder or file stops the
  script with a message naming what it looked for.
- Models: the two strong CIFAR-10 models of :mod:`bench.strong_models` (``resnet18``: the shared
  ResNet-18, 91% test accuracy; ``vgg_bn``: a VGG with batch norm trained here), the default;
  and the two weak small models of the first run (``small_vgg``, ``small_resnet``:
  :func:`bench.cifar.train_or_load` with :data:`TRAIN_SETTINGS`, 3 epochs on the first 20,000
  training images, 49% / 62.5%), still selectable with ``--archs``.
- Calibration tables, at the paper's layer, the final convolution (``layer="final-conv"``; not
  calibrate's default, the feature map the classifier head reads), cached outside the
  repository. Strong models (:mod:`bench.strong_tables`): ``"train"`` on all 50,000 training
  images (the paper's protocol), ``"heldout"`` on test images 0..4,999 (never trained on), both
  with true labels, ``"heldout_pred"`` on the same test images labelled with the model's
  predictions; anything judged with a held-out table is reported on test images 5,000..9,999
  only. Weak models: ``"train"`` on training images 0..9,999, ``"heldout"`` / ``"heldout_pred"``
  on training images 40,000..49,999 (never used in their training).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from bench.cifar import (
    cache_dir,
    data_source,
    find_data_dir,
    load_cifar10,
    to_tensor,
    train_or_load,
)
from bench.strong_models import EVALUATION, STRONG_MODELS, load_strong
from bench.strong_tables import strong_table
from surprise_monitor.calibrate import CalibrationTable, calibrate, model_fingerprint
from surprise_monitor.calibrate.options import RunOptions, TableOptions
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.probe import get_module
from surprise_monitor.monitor.probe.layers import FINAL_CONV

STRONG_ARCHS = STRONG_MODELS  # ("resnet18", "vgg_bn")
WEAK_ARCHS = ("small_vgg", "small_resnet")
ARCHS = STRONG_ARCHS + WEAK_ARCHS
ARCH_TITLES = {
    "resnet18": "ResNet-18",
    "vgg_bn": "VGG-BN",
    "small_vgg": "small VGG (no batch norm)",
    "small_resnet": "small ResNet (batch norm)",
}
#: Test images a figure may be reported on, per family, when the table is held-out: the strong
#: models' held-out tables are calibrated on test images 0..4,999.
HELDOUT_EVALUATION = (EVALUATION.start, EVALUATION.stop)
#: How the two CIFAR-10 models are trained (see :func:`bench.cifar.train_or_load`).
TRAIN_SETTINGS: dict[str, Any] = {"epochs": 3, "n_train": 20000}
#: Calibration splits: ranges of CIFAR-10 training-image indices.
CALIBRATION_SPLITS: dict[str, tuple[int, int]] = {
    "train": (0, 10000),
    "heldout": (40000, 50000),
    "heldout_pred": (40000, 50000),  # labelled with the model's own predictions
}
OOD_FILES = {
    "MNIST": "mnist_test",
    "Fashion-MNIST": "fashion_mnist_test",
    "notMNIST": "notmnist_test",
}
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FIGURES = HERE / "figures"


def arg_parser(description: str) -> argparse.ArgumentParser:
    """The options every paper script takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder with cifar10_*.npz and the MNIST-family files "
        "(default: $SURPRISE_DATA_DIR, else ../shared/data)",
    )
    p.add_argument(
        "--archs",
        default=",".join(STRONG_ARCHS),
        help=f"comma-separated, from {','.join(ARCHS)} (default: the two strong models)",
    )
    p.add_argument(
        "--n-test",
        type=int,
        default=None,
        help="CIFAR-10 test images used (the first ones; the files are shuffled); default: "
        "all 10,000 for the strong models, 5,000 for the weak ones",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse, check the data folder exists (a clear message and exit 2 if not), set threads."""
    args = p.parse_args(argv)
    try:
        args.data_dir = find_data_dir(args.data_dir)
        for name in ("cifar10_train", "cifar10_test"):
            if not (args.data_dir / f"{name}.npz").is_file():
                raise FileNotFoundError(f"{args.data_dir / name}.npz is missing")
    except FileNotFoundError as exc:
        p.exit(2, f"{p.prog}: data not found: {exc}\n")
    args.archs = [a for a in str(args.archs).split(",") if a]
    bad = [a for a in args.archs if a not in ARCHS]
    if bad:
        p.error(f"unknown arch {bad[0]!r}; choose from {', '.join(ARCHS)}")
    if args.n_test is not None and args.n_test < 20:
        p.error("--n-test must be at least 20")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- data
def cifar_range(split: str, start: int, stop: int, data_dir: Path | None) -> TensorDataset:
    """CIFAR-10 ``split`` images ``start..stop-1`` as ``(image, label, index)``, normalised."""
    s = load_cifar10(split, data_dir, stop)
    if len(s) < stop:
        raise ValueError(f"{s.path} holds {len(s)} images, fewer than the {stop} needed")
    x = to_tensor(s.images[start:stop])
    ds = TensorDataset(
        x, torch.from_numpy(s.labels[start:stop]), torch.arange(start, stop, dtype=torch.int64)
    )
    ds.classes = s.class_names  # type: ignore[attr-defined]
    return ds


def test_images(data_dir: Path | None, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised CIFAR-10 test images ``start..stop-1`` and their labels."""
    ds = cifar_range("test", start, stop, data_dir)
    return ds.tensors[0], ds.tensors[1]


def test_uint8(data_dir: Path | None, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw uint8 ``[n, 32, 32, 3]`` CIFAR-10 test images (for the shifts) and their labels."""
    s = load_cifar10("test", data_dir, stop)
    return s.images[start:stop], s.labels[start:stop]


def load_gray_npz(name: str, data_dir: Path | None, limit: int | None = None) -> np.ndarray:
    """uint8 ``[N, 28, 28, 1]`` images of ``{name}.npz`` (an MNIST-family file), no pickle."""
    path = find_data_dir(data_dir) / f"{name}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (needed for the out-of-distribution sets)")
    with np.load(path, allow_pickle=False) as d:
        x = d["x"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 1:
        raise ValueError(f"{path}: expected uint8 [N, H, W, 1] images, got {x.dtype} {x.shape}")
    return x[:limit] if limit is not None else x


def gray_to_cifar(images: np.ndarray, size: int = 32) -> np.ndarray:
    """Grey ``[N, h, w, 1]`` uint8 -> ``[N, size, size, 3]``: zero-padded around the centre
    (28 -> 32: 2 pixels each side), the grey channel copied to R, G and B."""
    n, h, w, c = images.shape
    if c != 1 or h > size or w > size:
        raise ValueError(f"expected [N, h, w, 1] with h, w <= {size}, got {images.shape}")
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((n, size, size, 3), dtype=np.uint8)
    out[:, top : top + h, left : left + w, :] = images
    return out


# ---------------------------------------------------------------------------- models and tables
@dataclass
class Setup:
    """One trained model with its calibration tables (built on first use, cached on disk)."""

    arch: str
    model: nn.Module
    data_dir: Path
    test_accuracy: float = float("nan")
    _tables: dict[str, CalibrationTable] = field(default_factory=dict, repr=False)

    @property
    def title(self) -> str:
        """The model's name in reports."""
        return ARCH_TITLES[self.arch]

    @property
    def strong(self) -> bool:
        """One of the strong models (tables from :mod:`bench.strong_tables`)."""
        return self.arch in STRONG_ARCHS

    def n_test(self, requested: int | None = None) -> int:
        """Test images to use: ``requested``, else all 10,000 (strong) or 5,000 (weak)."""
        return requested if requested is not None else (10000 if self.strong else 5000)

    def table(self, split: str = "train") -> CalibrationTable:
        """The calibration table on ``split`` (``train``, ``heldout``, ``heldout_pred``)."""
        if split not in self._tables:
            if self.strong:
                self._tables[split] = strong_table(
                    self.arch, split, model=self.model, data_dir=self.data_dir, log=log
                )
            else:
                self._tables[split] = calibration_table(self.model, self.arch, split, self.data_dir)
        return self._tables[split]

    def monitor(self, split: str = "train", **kwargs: Any) -> SurpriseMonitor:
        """A monitor of the model with the ``split`` table."""
        return SurpriseMonitor(self.model, self.table(split), **kwargs)

    def heldout_range(self, n_test: int) -> tuple[int, int]:
        """Test images on which a figure judged with a held-out table may be reported: the
        strong models' held-out tables are calibrated on test images 0..4,999, so 5,000..9,999;
        the weak models' on training images, so the first ``n_test``."""
        return HELDOUT_EVALUATION if self.strong else (0, n_test)


def load_setup(arch: str, data_dir: Path) -> Setup:
    """The trained ``arch``: a strong model (loaded), or a weak one (trained on the first call,
    a few minutes on the CPU)."""
    if arch in STRONG_ARCHS:
        model = load_strong(arch)
    else:
        model = train_or_load(arch, data_dir=data_dir, log=log, **TRAIN_SETTINGS)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)  # no experiment here needs parameter gradients
    setup = Setup(arch, model, data_dir)
    logits, labels = test_logits(setup)
    setup.test_accuracy = float((logits.argmax(1) == labels).float().mean())
    return setup


def test_logits(setup: Setup) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits on every CIFAR-10 test image and the labels (cached by weights)."""
    s = load_cifar10("test", setup.data_dir)
    fp = model_fingerprint(setup.model)[:12]
    path = cache_dir() / "paper" / f"{setup.arch}-{fp}-test{len(s)}-logits.npy"
    if path.is_file():
        logits = torch.from_numpy(np.load(path, allow_pickle=False))
    else:
        logits = logits_of(setup.model, to_tensor(s.images))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, logits.numpy())
        os.replace(tmp, path)
    return logits, torch.from_numpy(s.labels)


def calibration_table(model: nn.Module, arch: str, split: str, data_dir: Path) -> CalibrationTable:
    """The table of ``model`` on the calibration ``split`` at its final convolution (cached by
    weights and split)."""
    if split not in CALIBRATION_SPLITS:
        raise ValueError(f"split must be one of {sorted(CALIBRATION_SPLITS)}, got {split!r}")
    start, stop = CALIBRATION_SPLITS[split]
    fp = model_fingerprint(model)
    path = cache_dir() / "paper" / f"{arch}-{fp[:12]}-{split}-{start}-{stop}.safetensors"
    if path.is_file():
        try:
            table = CalibrationTable.load(path)
            if table.model_fingerprint == fp:
                return table
        except ValueError as exc:
            log(f"rebuilding {path}: {exc}")
    log(f"{arch}: calibrating on CIFAR-10 training images {start}..{stop - 1} ({split})")
    ds = cifar_range("train", start, stop, data_dir)
    if split.endswith("_pred"):  # judge each image against the class the model gives it
        x, _, idx = ds.tensors
        pred = logits_of(model, x).argmax(1)
        ds = TensorDataset(x, pred, idx)
        ds.classes = load_cifar10("test", data_dir, 1).class_names  # type: ignore[attr-defined]
    table = calibrate(
        model,
        ds,
        layer=FINAL_CONV,
        progress=False,
        table=TableOptions(data_source=data_source("train", data_dir)),
        run=RunOptions(batch_size=250),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    table.save(path)
    return table


# ------------------------------------------------------------------------------------- batching
def batched(fn: Callable[..., Any], x: torch.Tensor, *rest: Any, size: int = 500) -> list[Any]:
    """``fn`` on slices of ``x`` (and of any tensor in ``rest``), results in a list."""
    out = []
    for i in range(0, len(x), size):
        args = [r[i : i + size] if isinstance(r, torch.Tensor) else r for r in rest]
        out.append(fn(x[i : i + size], *args))
    return out


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    def run(b: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(b)

    return torch.cat(batched(run, x))


def layer_hw(model: nn.Module, layer: str, x: torch.Tensor) -> int:
    """``H * W`` of ``layer``'s output for the input batch ``x`` (one image is enough)."""
    shapes: list[torch.Size] = []
    handle = get_module(model, layer).register_forward_hook(
        lambda m, inp, out: shapes.append(out.shape)
    )
    try:
        with torch.inference_mode():
            model(x)
    finally:
        handle.remove()
    return int(shapes[0][2] * shapes[0][3])


def features_of(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(penultimate features, logits)``: the input of the model's last ``nn.Linear``."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    box: list[torch.Tensor] = []
    handle = last.register_forward_pre_hook(lambda m, inp: box.append(inp[0].detach().clone()))
    try:
        logits = logits_of(model, x)
    finally:
        handle.remove()
    return torch.cat(box).flatten(1), logits


REPORT_FIELDS = (
    "logits",
    "classes",
    "alpha",
    "mu",
    "percentile",
    "surprise",
    "expectation",
    "beta",
    "beta_percentile",
    "low_beta",
)


def inspect_all(
    monitor: SurpriseMonitor, x: torch.Tensor, labels: torch.Tensor | None = None, size: int = 500
) -> dict[str, torch.Tensor]:
    """``monitor.inspect`` over ``x`` in batches: the report's tensors, concatenated."""
    parts = batched(lambda b, lab: monitor.inspect(b, labels=lab), x, labels, size=size)
    return {k: torch.cat([getattr(r, k) for r in parts]) for k in REPORT_FIELDS}


def save_json(path: Path, obj: Any) -> Path:
    """Atomic JSON write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)
    return path


def cached_part(setup: Setup, name: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One part of an experiment's results for one model, computed once and cached (JSON) by
    the model's weights and ``name`` (which must say everything else the part depends on)."""
    fp = model_fingerprint(setup.model)[:12]
    path = cache_dir() / "paper" / "parts" / f"{setup.arch}-{fp}-{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    started = time.perf_counter()
    out = compute()
    out["seconds"] = time.perf_counter() - started
    save_json(path, out)
    return out


def strip(results: dict[str, Any]) -> dict[str, Any]:
    """Per-model results without their per-image arrays (keys starting with ``_``)."""
    return {a: {k: v for k, v in r.items() if not k.startswith("_")} for a, r in results.items()}


def store(name: str, results: dict[str, Any]) -> dict[str, Any]:
    """Merge one experiment's per-model results into those saved earlier (models not run now
    keep theirs) and save them: in full, with the per-image arrays the plots need, under the
    cache folder, and without the arrays as ``results/{name}.json``. Returns the merged results."""
    full = cache_dir() / "paper" / "results" / f"{name}.json"
    merged = json.loads(full.read_text()) if full.is_file() else {}
    merged.update(results)
    merged = {a: merged[a] for a in ARCHS if a in merged}
    save_json(full, merged)
    save_json(RESULTS / f"{name}.json", strip(merged))
    return merged


def save_figure(fig: Any, name: str) -> Path:
    """Save a matplotlib figure as ``figures/{name}.png`` (atomically); returns the path."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / f"{name}.png"
    tmp = path.with_suffix(f".tmp{os.getpid()}.png")
    fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure with an Agg canvas (no pyplot state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig
