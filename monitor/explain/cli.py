"""``surprise-explain``: why was this image flagged? A figure of the input's region behind one
filter beside the training exemplars of that filter.

Example::

    surprise-explain --table resnet50.safetensors --model resnet50 --weights resnet50.pt \\
        --image photo.jpg --label goldfish --out why.png

The image gets the table's preprocessing (``data_source``: resize, crop, mean, std, grayscale);
``--resize/--crop/--mean/--std`` override it. Without a recorded resize or crop the image is
resized to the table's input size.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from monitor.explain.explanation import Explanation
from monitor.loading.images import SOURCE_KINDS, Preprocessing
from monitor.loading.models import build_model, load_weights
from monitor.surprise_monitor import SurpriseMonitor
from monitor.table import CalibrationTable


def parser() -> argparse.ArgumentParser:
    """The command line's arguments."""
    p = argparse.ArgumentParser(
        prog="surprise-explain",
        description="Explain one image with the surprise monitor: the region behind its most "
        "surprising (else most expected) filter, beside that filter's training exemplars.",
    )
    p.add_argument("--table", required=True, help="calibration table (.safetensors)")
    p.add_argument("--model", required=True, help="torchvision name or module:factory")
    p.add_argument("--weights", help="state_dict file (loaded with weights_only=True)")
    p.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments for the factory")
    p.add_argument("--image", required=True, help="the image file to explain")
    p.add_argument("--label", help="true class (index or class name), if known")
    p.add_argument("--out", required=True, help="where to write the figure (.png)")
    p.add_argument("--input-out", help="also write the input with its region's boundary here")
    p.add_argument("--filter", type=int, help="filter to explain (default: most surprising)")
    p.add_argument("--n-segments", type=int, default=50, help="SLIC superpixels (default 50)")
    p.add_argument("--exemplars", type=int, help="training exemplars to show (default: top-k)")
    p.add_argument("--data", help="training images root, if moved since calibration")
    p.add_argument("--resize", type=int, help="shorter side before cropping")
    p.add_argument("--crop", type=int, help="centre crop size")
    p.add_argument("--mean", type=float, nargs="+", help="normalisation mean per channel")
    p.add_argument("--std", type=float, nargs="+", help="normalisation std per channel")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the explanation as JSON")
    return p


def _label(value: str | None, names: Sequence[str]) -> int | None:
    """The class index ``--label`` names (a class name or an index), or ``None``."""
    if value is None:
        return None
    if value in names:
        return list(names).index(value)
    try:
        c = int(value)
    except ValueError:
        raise ValueError(f"--label {value!r} is neither a class name nor an index") from None
    if not 0 <= c < len(names):
        raise ValueError(f"--label {c} is outside the table's {len(names)} classes")
    return c


def load_image(path: str | Path, table: CalibrationTable, args: Any) -> torch.Tensor:
    """The image file preprocessed as the table's training images were (``--resize``,
    ``--crop``, ``--mean``, ``--std`` override the record): ``[1, C, H, W]``."""
    one_channel = bool(table.input_shape) and table.input_shape[0] == 1
    steps = Preprocessing.from_source(
        table.data_source, resize=args.resize, crop=args.crop, mean=args.mean, std=args.std,
        grayscale=True if one_channel else None,
    )  # fmt: skip
    return steps.load_image(path, size=table.input_shape[1:] if table.input_shape else None)


def summary(expl: Explanation, out: Path) -> str:
    """What the explanation found, for people."""
    lines = [
        expl.title(),
        f"filter {expl.filter} ({expl.reason}); alpha {expl.alpha:.4g} at percentile "
        f"{expl.percentile:.2f} (P{expl.expectation_pct:g} {expl.low:.4g}, mu {expl.mu:.4g}, "
        f"P{expl.surprise_pct:g} {expl.high:.4g})",
        f"top region: superpixel {expl.top_segment} of {expl.num_segments}, "
        f"{int(expl.mask.sum())} pixels",
        f"exemplars: {', '.join(str(e.index) for e in expl.exemplars) or 'none'}",
        f"figure written to {out}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``surprise-explain``; the exit status (2 with a message on stderr for bad input)."""
    args = parser().parse_args(argv)
    try:
        table = _table(args)
        model = build_model(args.model, table.num_classes, json.loads(args.model_kwargs))
        if args.weights:
            load_weights(model, args.weights)
        model.eval().to(args.device)
        x = load_image(args.image, table, args).to(args.device)
        label = _label(args.label, table.class_names)
        with SurpriseMonitor(model, table) as monitor:
            expl = monitor.explain(
                x, filter=args.filter, label=label, n_segments=args.n_segments, mean=args.mean,
                std=args.std, exemplars_k=args.exemplars,
            )  # fmt: skip
        out = expl.save_figure(args.out)
        if args.input_out:
            expl.render(args.input_out)
    except (ValueError, TypeError, OSError, IndexError) as exc:
        print(f"surprise-explain: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(expl.to_dict(), indent=1) if args.json else summary(expl, out))
    return 0


def _table(args: argparse.Namespace) -> CalibrationTable:
    """The table of ``--table`` (exemplars left on disk), its training images moved to
    ``--data`` when given."""
    table = CalibrationTable.load(args.table, exemplars=False)
    if args.data:
        source = table.data_source
        if not source or source.get("kind") not in SOURCE_KINDS:
            raise ValueError("--data needs a table whose data_source is an imagefolder or npz")
        key = "root" if source["kind"] == "imagefolder" else "path"
        table.data_source = {**source, key: str(Path(args.data).resolve())}
    return table


if __name__ == "__main__":
    sys.exit(main())
