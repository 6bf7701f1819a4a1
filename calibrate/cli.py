"""``surprise-calibrate``: build a calibration table from an ImageFolder of training images."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from calibrate.builder import calibrate
from calibrate.distributed import DistInfo, init_from_env
from calibrate.sketch import LogGrid
from monitor.loading.images import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from monitor.loading.models import build_model, load_weights
from monitor.loading.onnx_model import load_onnx
from monitor.probe.scores import SCORES
from monitor.table import CalibrationTable


def parser() -> argparse.ArgumentParser:
    """The command line's arguments."""
    p = argparse.ArgumentParser(
        prog="surprise-calibrate",
        description="Calibrate a CNN on its training images (ImageFolder layout: one folder per "
        "class) and write the surprise-monitor table.",
    )
    p.add_argument(
        "model", nargs="?",
        help="torchvision architecture name (e.g. resnet50) or module:factory (or use --onnx)",
    )  # fmt: skip
    p.add_argument("--onnx", help="an ONNX model file instead of MODEL and --weights")
    p.add_argument("--data", required=True, help="ImageFolder root of the training images")
    p.add_argument("--out", required=True, help="where to write the table (.safetensors)")
    p.add_argument("--weights", help="state_dict file (loaded with weights_only=True)")
    p.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments for the factory")
    p.add_argument(
        "--num-classes",
        type=int,
        help="classes of a torchvision model (default: the number of class folders)",
    )
    p.add_argument("--layer", help="target module name (default: the final convolution)")
    p.add_argument("--score", default="logit", choices=list(SCORES))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resize", type=int, default=256, help="shorter side before cropping (0: no)")
    p.add_argument("--crop", type=int, default=224, help="centre crop size (0: no crop)")
    p.add_argument("--mean", type=float, nargs="+", default=list(IMAGENET_MEAN))
    p.add_argument("--std", type=float, nargs="+", default=list(IMAGENET_STD))
    p.add_argument("--grayscale", action="store_true", help="load images as one channel")
    p.add_argument("--top-k", type=int, default=6, help="exemplars kept per (class, filter)")
    p.add_argument("--spill-dir", help="keep the streamed alpha values in this folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _scale_arguments(p)
    return p


def _scale_arguments(p: argparse.ArgumentParser) -> None:
    """Calibration at scale: resumable, mixed precision, approximate (torchrun is detected)."""
    p.add_argument(
        "--checkpoint-dir",
        help="spill alpha here and checkpoint progress, so a killed run can --resume",
    )
    p.add_argument(
        "--resume", action="store_true",
        help="continue the checkpoint in --checkpoint-dir (refused if settings or data differ)",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint-every", type=int, default=100, help="batches between checkpoints"
    )
    p.add_argument(
        "--amp", action="store_true",
        help="mixed precision (float16 on CUDA, bfloat16 on CPU); alpha accumulated in float32",
    )  # fmt: skip
    p.add_argument(
        "--approximate", action="store_true",
        help="fixed-grid histograms instead of spilled alpha: memory independent of the "
        "number of images, no spill on disk, percentiles within --sketch-accuracy",
    )  # fmt: skip
    p.add_argument(
        "--sketch-accuracy", type=float, default=0.01,
        help="relative accuracy of --approximate percentiles (default 0.01)",
    )  # fmt: skip
    p.add_argument(
        "--sketch-range", type=float, nargs=2, default=[1e-6, 1e3], metavar=("MIN", "MAX"),
        help="|alpha| range of the --approximate grid (default 1e-6 1e3)",
    )  # fmt: skip


def summary(table: CalibrationTable, out: Path, seconds: float) -> str:
    """What the run produced, for people: per-class counts, thin classes, where it went."""
    n = int(table.counts.sum())
    lines = [
        f"layer: {table.layer} ({table.layer_reason})",
        f"filters: {table.num_filters}, classes: {table.num_classes}, images: {n}, "
        f"{seconds:.1f} s ({n / max(seconds, 1e-9):.1f} images/s)",
        "images per class: "
        + ", ".join(
            f"{name}={int(c)}" for name, c in zip(table.class_names, table.counts, strict=True)
        ),
    ]
    thin = table.undersampled_classes(99.9)
    if thin:
        names = ", ".join(table.class_names[c] for c in thin[:20]) + (
            " ..." if len(thin) > 20 else ""
        )
        lines.append(
            f"{len(thin)} classes have fewer than 1000 images, too few to estimate a 99.9th "
            f"percentile (it sits at the class maximum): {names}"
        )
    lines.append(f"table written to {out}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``surprise-calibrate`` (on every rank under ``torchrun``); the exit status."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not args.quiet:
        logging.getLogger("calibrate").setLevel(logging.INFO)
    info, args.device, own_group = init_from_env(args.device)  # torchrun: WORLD_SIZE > 1
    code = 2
    try:
        code = _run(args, info)
        return code
    finally:
        if own_group:  # wait for every rank before closing (a failed rank exits at once)
            if code == 0:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def _run(args: argparse.Namespace, info: DistInfo) -> int:
    """Calibrate as the arguments say; rank 0 writes the table and prints the summary."""
    try:
        if len(args.mean) != len(args.std):
            raise ValueError("--mean and --std need the same number of values")
        steps = Preprocessing(args.resize, args.crop, tuple(args.mean), tuple(args.std),
                              args.grayscale)  # fmt: skip
        root = Path(args.data)
        if not root.is_dir():
            raise ValueError(f"--data {root}: no such folder")
        from torchvision.datasets import ImageFolder

        dataset = ImageFolder(str(root), transform=steps.transform())
        num_classes = args.num_classes or len(dataset.classes)
        model = _model(args, num_classes)
        loader = DataLoader(
            dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
            pin_memory=args.device.startswith("cuda"),
        )  # fmt: skip
        started = time.perf_counter()
        names = dataset.classes if len(dataset.classes) == num_classes else None
        grid = LogGrid(args.sketch_accuracy, *args.sketch_range) if args.approximate else None
        table = calibrate(
            model, loader, layer=args.layer, score=args.score, top_k=args.top_k,
            class_names=names, device=args.device, spill_dir=args.spill_dir,
            progress=not args.quiet, data_source=steps.source(root),
            checkpoint_dir=args.checkpoint_dir, resume=args.resume,
            checkpoint_every=args.checkpoint_every, amp=args.amp, approximate=grid or False,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        if info.rank != 0:  # every rank holds the same table; rank 0 writes it
            return 0
        out = table.save(args.out)
    except (ValueError, TypeError, OSError) as exc:
        print(f"surprise-calibrate: error: {exc}", file=sys.stderr)
        return 2
    print(summary(table, out, seconds))
    return 0


def _model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """The model ``MODEL`` / ``--onnx`` names, with ``--weights``, in eval mode on the device."""
    if args.onnx:
        if args.model or args.weights:
            raise ValueError("--onnx replaces MODEL and --weights; give one or the other")
        model = load_onnx(args.onnx)
    elif not args.model:
        raise ValueError("give MODEL (a torchvision name or module:factory) or --onnx PATH")
    else:
        model = build_model(args.model, num_classes, json.loads(args.model_kwargs))
    if args.weights:
        load_weights(model, args.weights)
    return model.eval().to(args.device)


if __name__ == "__main__":
    sys.exit(main())
