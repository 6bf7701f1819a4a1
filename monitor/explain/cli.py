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
import difflib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from surprise_monitor.monitor.advice import cli_message
from surprise_monitor.monitor.explain.explanation import Explanation
from surprise_monitor.monitor.loading.images import SOURCE_KINDS, Preprocessing
from surprise_monitor.monitor.loading.model_args import (
    add_model_arguments,
    command_parser,
    model_from_args,
)
from surprise_monitor.monitor.loading.sources import source_dataset
from surprise_monitor.monitor.options import Execution
from surprise_monitor.monitor.surprise_monitor import SurpriseMonitor
from surprise_monitor.monitor.table import CalibrationTable
from surprise_monitor.monitor.table_file import TableSignatureError
from surprise_monitor.monitor.table_key import key_of_flag


def parser() -> argparse.ArgumentParser:
    """The command line's arguments."""
    p = command_parser(
        "surprise-explain",
        "Explain one image with the surprise monitor: the region behind its most surprising "
        "(else most expected) filter, beside that filter's training exemplars.",
    )
    p.add_argument("--table", required=True, help="calibration table (.safetensors)")
    p.add_argument(
        "--table-key", metavar="FILE",
        help="the secret key file the table was signed with (surprise-calibrate --sign-key): "
        "refuse a table that is unsigned or was changed since it was signed",
    )  # fmt: skip
    add_model_arguments(p)
    p.add_argument("--image", required=True, help="the image file to explain")
    p.add_argument("--label", help="true class (index or class name), if known")
    p.add_argument("--out", required=True, help="where to write the figure (.png)")
    p.add_argument("--input-out", help="also write the input with its region's boundary here")
    p.add_argument("--filter", type=int, help="filter to explain (default: most surprising)")
    p.add_argument("--n-segments", type=int, default=50, help="SLIC superpixels")
    p.add_argument("--exemplars", type=int, help="training exemplars to show (default: top-k)")
    p.add_argument("--data", help="training images (folder or npz), if moved since calibration")
    p.add_argument("--resize", type=int, help="shorter side before cropping (default: table's)")
    p.add_argument("--crop", type=int, help="centre crop size (default: the table's)")
    p.add_argument("--mean", type=float, nargs="+", help="normalisation mean per channel")
    p.add_argument("--std", type=float, nargs="+", help="normalisation std per channel")
    p.add_argument(
        "--no-fingerprint-check", action="store_true",
        help="use the table with a model whose weights changed since calibration (deliberately)",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="where the model runs")
    p.add_argument("--json", action="store_true", help="print the explanation as JSON")
    return p


def _label(value: str | None, names: Sequence[str]) -> int | None:
    """The class index ``--label`` names (a class name or an index), or ``None``; the error
    lists the valid names (closest first)."""
    if value is None:
        return None
    if value in names:
        return list(names).index(value)
    try:
        c = int(value)
    except ValueError:
        close = difflib.get_close_matches(value, list(names), n=3)
        hint = f"did you mean {', '.join(repr(n) for n in close)}? " if close else ""
        shown = ", ".join(names[:30]) + (f" ... ({len(names)} in all)" if len(names) > 30 else "")
        raise ValueError(
            f"--label {value!r} is neither a class name nor an index; {hint}"
            f"the table's classes are: {shown} (or an index 0..{len(names) - 1})"
        ) from None
    if not 0 <= c < len(names):
        raise ValueError(
            f"--label {c} is outside the table's {len(names)} classes (0..{len(names) - 1})"
        )
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
        (
            f"top region: superpixel {expl.top_segment} of {expl.num_segments}, "
            f"{int(expl.mask.sum())} pixels, {expl.region_share:.1%} of the saliency"
            if expl.has_region
            else "no region"
        ),
        f"the filter carries {expl.filter_share:.1%} of the class score's gradient",
        *([f"note: {expl.note}"] if expl.note else []),
        f"exemplars of '{expl.class_name(expl.exemplar_class)}': "
        + (", ".join(e.path or f"#{e.index}" for e in expl.exemplars) or "none"),
        f"figure written to {out}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``surprise-explain``; the exit status (2 with a message on stderr for bad input)."""
    args = parser().parse_args(argv)
    try:
        table, dataset = _table(args)
        model = model_from_args(args, table.num_classes, "surprise-explain").to(args.device)
        x = load_image(args.image, table, args).to(args.device)
        label = _label(args.label, table.class_names)
        check = not args.no_fingerprint_check
        execution = Execution(check_fingerprint=check)
        with SurpriseMonitor(model, table, execution=execution) as monitor:
            expl = monitor.explain(
                x, label, filter=args.filter, n_segments=args.n_segments, mean=args.mean,
                std=args.std, exemplars_k=args.exemplars, dataset=dataset,
            )  # fmt: skip
        out = expl.save_figure(args.out)
        if args.input_out:
            expl.render(args.input_out)
    except (ValueError, TypeError, OSError, IndexError) as exc:
        print(f"surprise-explain: error: {cli_message(exc)}", file=sys.stderr)
        return 2
    print(json.dumps(expl.to_dict(), indent=1) if args.json else summary(expl, out))
    return 0


def _table(args: argparse.Namespace) -> tuple[CalibrationTable, Any]:
    """The table of ``--table`` (exemplars left on disk; signed with ``--table-key`` when
    given), and the training images of ``--data`` when given (the caller's folder, trusted,
    read with the table's preprocessing), else ``None`` (the table's own data_source, read
    with care)."""
    key = key_of_flag(args.table_key, "--table-key")
    try:
        table = CalibrationTable.load(args.table, exemplars=False, key=key)
    except TableSignatureError as exc:
        raise ValueError(f"--table-key {args.table_key}: {exc}") from None
    if not args.data:
        return table, None
    source = table.data_source
    if not source or source.get("kind") not in SOURCE_KINDS:
        raise ValueError("--data needs a table whose data_source is an imagefolder or npz")
    if source["kind"] == "imagefolder":
        return table, source_dataset(source, root=Path(args.data).resolve())
    table.data_source = {**source, "path": str(Path(args.data).resolve())}
    return table, None


if __name__ == "__main__":
    sys.exit(main())
