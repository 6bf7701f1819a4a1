"""``surprise-calibrate``: build a calibration table from an ImageFolder of training images."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.contrib.logging import logging_redirect_tqdm

from surprise_monitor.calibrate.builder import calibrate
from surprise_monitor.calibrate.diagnosis import (
    ModelOrigin,
    accuracy_verdict,
    declared_input_size,
)
from surprise_monitor.calibrate.distributed import DistInfo, init_from_env
from surprise_monitor.calibrate.options import (
    AlarmOptions,
    CheckpointOptions,
    RunOptions,
    TableOptions,
)
from surprise_monitor.calibrate.preflight import (
    AccuracyCheck,
    accuracy_check,
    check_channels,
    check_out,
    checked_collate,
    image_folder,
    read_class_order,
)
from surprise_monitor.calibrate.sketch import LogGrid
from surprise_monitor.kernels.defaults import DEFAULT_SURPRISE_PCT
from surprise_monitor.monitor.advice import advise, cli_message
from surprise_monitor.monitor.atypicality import FISHER_SCORE_NAME, GATED_SCORE_NAME
from surprise_monitor.monitor.checks import OptionValueError
from surprise_monitor.monitor.learned_evidence import LEARNED_VARIANTS
from surprise_monitor.monitor.loading.images import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from surprise_monitor.monitor.loading.model_args import (
    add_model_arguments,
    command_parser,
    model_from_args,
)
from surprise_monitor.monitor.options import (
    FLAGS_DEST,
    add_option_arguments,
    add_renamed_flags,
    options_from_args,
)
from surprise_monitor.monitor.probe.hooks import get_module
from surprise_monitor.monitor.table import CalibrationTable, images_needed
from surprise_monitor.monitor.table_key import key_of_flag


def parser() -> argparse.ArgumentParser:
    """The command line's arguments."""
    p = command_parser(
        "surprise-calibrate",
        "Calibrate a CNN on its training images (ImageFolder layout: one folder per class) and "
        "write the surprise-monitor table.",
    )
    p.add_argument("legacy_model", nargs="?", metavar="MODEL", help=argparse.SUPPRESS)
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="ImageFolder root of the training images")
    p.add_argument("--out", required=True, help="where to write the table (.safetensors)")
    p.add_argument(
        "--sign-key", metavar="FILE",
        help="sign the table (HMAC-SHA256) with the secret key in FILE, so that surprise-serve "
        "--table-key FILE refuses it once anyone without the key changes it",
    )  # fmt: skip
    p.add_argument(
        "--num-classes", type=int,
        help="classes of a torchvision model (default: the number of class folders)",
    )  # fmt: skip
    p.add_argument(
        "--class-order",
        help="the model's label order: a file of class folder names, one per line (class i = "
        "line i), or name,name,... (default: the folders' alphabetical order)",
    )
    p.add_argument(
        "--layer",
        help="target module name, 'name:nhwc' for a channels-last map, or 'final-conv' for the "
        "paper's final convolution (default: the feature map the classifier head reads)",
    )
    add_option_arguments(p, TableOptions, {"allow_degenerate": "--allow-degenerate"})
    add_option_arguments(p, TableOptions, {"class_output": "--class-output"})
    add_renamed_flags(p, {"--score": "--class-output"})
    add_option_arguments(p, RunOptions, {"batch_size": "--batch-size", "num_workers": "--workers"})
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the model runs: a torch device such as cuda, cuda:1 or cpu",
    )  # fmt: skip
    g = p.add_argument_group(
        "preprocessing (ImageNet's by default: set --resize 0 --crop 0 and the mean/std of "
        "your data for small images such as CIFAR's)"
    )
    g.add_argument("--resize", type=int, default=256, help="shorter side before cropping (0: no)")
    g.add_argument("--crop", type=int, default=224, help="centre crop size (0: no crop)")
    g.add_argument("--mean", type=float, nargs="+", default=list(IMAGENET_MEAN), help="per channel")
    g.add_argument("--std", type=float, nargs="+", default=list(IMAGENET_STD), help="per channel")
    g.add_argument("--grayscale", action="store_true", help="load images as one channel")
    c = p.add_argument_group("checks before calibrating")
    c.add_argument(
        "--accuracy-images", type=int, default=500,
        help="calibration images (stratified by class) the model's accuracy is measured on "
        "before calibrating (0: skip)",
    )  # fmt: skip
    c.add_argument(
        "--min-accuracy", type=float, default=0.5,
        help="warn loudly, naming the likely causes, when that accuracy is below this fraction, "
        "and stop when it is also no better than chance (0: never)",
    )  # fmt: skip
    a = p.add_argument_group("the per-input alarm (a conformal p-value per input)")
    a.add_argument(
        "--heldout",
        help="ImageFolder of held-out images of the same classes (a validation split the model "
        "did not train on): the alarm's null; without it the table raises no alarms",
    )
    add_option_arguments(a, AlarmOptions, {
        "profile_layers": "--profile-layers", "head_layer": "--head-layer",
        "reference_images": "--reference-images", "enabled": "--no-alarm",
        "class_null_min": "--class-null-min", "score": "--alarm-score",
        "evidence": "--alarm-evidence", "gate_level": "--gate-level",
        "knn_bank": "--knn-bank",
    })  # fmt: skip
    add_option_arguments(p, TableOptions, {"top_k": "--top-k"})
    add_option_arguments(p, RunOptions, {"spill_dir": "--spill-dir"})
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _scale_arguments(p)
    return p


def _scale_arguments(p: argparse.ArgumentParser) -> None:
    """Calibration at scale: resumable, mixed precision, approximate (torchrun is detected)."""
    add_option_arguments(p, CheckpointOptions, {
        "dir": "--checkpoint-dir", "resume": "--resume", "every": "--checkpoint-every",
    })  # fmt: skip
    add_option_arguments(p, RunOptions, {"amp": "--amp", "approximate": "--approximate"})
    grid = LogGrid()  # the sketch's defaults, declared once there
    p.add_argument(
        "--sketch-accuracy", type=float, default=grid.relative_accuracy,
        help="relative accuracy of --approximate percentiles",
    )  # fmt: skip
    p.add_argument(
        "--sketch-range", type=float, nargs=2, metavar=("MIN", "MAX"),
        default=[grid.min_magnitude, grid.max_magnitude],
        help="|alpha| range of the --approximate grid",
    )  # fmt: skip


def summary(table: CalibrationTable, out: Path, seconds: float, signed: bool = False) -> str:
    """What the run produced, for people: per-class counts, thin classes, where it went (and
    whether it was signed)."""
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
    thin = table.undersampled_classes(DEFAULT_SURPRISE_PCT)
    if thin:
        names = ", ".join(table.class_names[c] for c in thin[:20]) + (
            " ..." if len(thin) > 20 else ""
        )
        need = images_needed(DEFAULT_SURPRISE_PCT)
        lines.append(
            f"{len(thin)} classes have fewer than {need} images, too few to estimate a "
            f"{DEFAULT_SURPRISE_PCT:g}th percentile (it sits at the class maximum): {names}"
        )
    lines.append(_alarm_line(table))
    lines.append(f"table written to {out}" + (", signed (--sign-key)" if signed else ""))
    return "\n".join(lines)


def _alarm_line(table: CalibrationTable) -> str:
    """What the table's alarm part holds, in one line."""
    alarm = table.alarm
    if alarm is None:
        return "alarm: not calibrated (--no-alarm)"
    score = alarm.score + (f" (evidence {alarm.evidence}{_chosen(alarm.heldout or {})})"
                           if alarm.gated else "")  # fmt: skip
    line = (
        f"alarm: score {score}, profile layers {list(alarm.profile_layers) or 'none'}, head "
        f"layer {alarm.head_layer or 'none'}, score reference from {alarm.reference_images} "
        "training images"
    )
    if alarm.gated and alarm.gate_level is not None:
        line += f" (the gate opens on {alarm.gate_level:g} of them: --gate-level)"
    if alarm.knn is not None:
        line += (f", KNN bank of {alarm.knn.bank.shape[0]} images' head features (distance to "
                 f"the {alarm.knn.k}th nearest: --knn-bank)")  # fmt: skip
    if alarm.null_predicted is None:
        return line + "; no --heldout images, so no null: the monitor raises no alarms"
    n, acc = alarm.null_predicted.size, alarm.heldout.get("accuracy", float("nan"))
    return (
        line + f"; null of {n} held-out images (model accuracy {acc:.4f} on them): alarms at "
        f"rates down to {alarm.null_predicted.smallest_rate():.2g}; {alarm.class_nulls_summary()}"
    )


def _chosen(heldout: dict) -> str:
    """How ``--alarm-evidence`` came to the evidence variant ("" when a fixed one was named)."""
    choice = heldout.get("evidence_choice")
    if not choice:
        return ""
    asked = choice.get("asked", "auto")  # tables before stop 39 say it only when not skipped
    if "skipped" in choice:
        return f": --alarm-evidence {asked} skipped, " + choice["skipped"].split(":")[0]
    variant = choice.get("resolved", asked)  # tables before stop 39 lack "resolved"
    how = (f"fitted by --alarm-evidence {asked}" if variant in LEARNED_VARIANTS
           else f"chosen by --alarm-evidence {asked}")  # fmt: skip
    return (f": {how} on {choice['images']} held-out images and "
            f"{len(choice['shifts'])} synthetic shifts")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``surprise-calibrate`` (on every rank under ``torchrun``); the exit status: 0, 2 with
    one line on stderr for bad input, 130 on Ctrl-C and 143 on SIGTERM (the temporary spill
    removed either way; a ``--checkpoint-dir`` run can ``--resume``)."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not args.quiet:
        logging.getLogger("surprise_monitor.calibrate").setLevel(logging.INFO)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(args)
    except KeyboardInterrupt:
        print(_interrupted("interrupted", args), file=sys.stderr)
        return 130
    except _Terminated:
        print(_interrupted("terminated (SIGTERM)", args), file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
    """SIGTERM arrived: unwind (cleaning the temporary spill), then exit."""


def _terminate(signum: int, frame: object) -> None:
    """The SIGTERM handler: unwind like Ctrl-C, so ``finally`` blocks clean up."""
    raise _Terminated


def _interrupted(what: str, args: argparse.Namespace) -> str:
    """The one line printed when the run is stopped."""
    if args.dir:  # --checkpoint-dir
        return (f"surprise-calibrate: {what}; run the same command with --resume to continue "
                f"from the last checkpoint in {args.dir}")  # fmt: skip
    return f"surprise-calibrate: {what}; nothing was written"


def _main(args: argparse.Namespace) -> int:
    """Calibrate in this process's distributed context (torchrun: WORLD_SIZE > 1)."""
    info, args.device, own_group = init_from_env(args.device)
    code = 2
    try:
        code = _run(args, info)
        return code
    finally:
        if own_group:  # wait for every rank before closing (a failed rank exits at once)
            if code == 0:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
            if code == 0:
                _leave_rank()


def _leave_rank() -> NoReturn:
    """End a finished ``torchrun`` rank at once, its output flushed: the interpreter's teardown
    can abort a rank whose work is done ("terminate called without an active exception", from
    a thread of the gloo group; seen in 2 of about 10 two-rank test runs), and ``torchrun``
    then reports the whole run failed although the table was written."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run(args: argparse.Namespace, info: DistInfo) -> int:
    """Check the arguments, the data and the model first, then calibrate; rank 0 writes the
    table and prints the summary."""
    try:
        out = check_out(args.out)
        key = _sign_key(args)
        _check_option_flags(args)
        dataset, steps, model = _prepare(args, info)
        loader = DataLoader(
            dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
            pin_memory=args.device.startswith("cuda"), collate_fn=checked_collate,
        )  # fmt: skip
        started = time.perf_counter()
        num_classes = len(dataset.classes)
        names = dataset.classes if args.num_classes in (None, num_classes) else None
        heldout = _heldout(args, steps, dataset)
        with logging_redirect_tqdm():  # log lines above the bars, not through them
            table = calibrate(
                model, loader, heldout=heldout, layer=args.layer, device=args.device,
                progress=not args.quiet, **_options(args, steps, names, model),
            )  # fmt: skip
        seconds = time.perf_counter() - started
        if info.rank != 0:  # every rank holds the same table; rank 0 writes it
            return 0
        out = table.save(out, key=key)
    except (ValueError, TypeError, OSError) as exc:
        print(f"surprise-calibrate: error: {_one_line(_flag_worded(exc, args))}", file=sys.stderr)
        return 2
    print(summary(table, out, seconds, signed=key is not None))
    return 0


def _flag_worded(exc: BaseException, args: argparse.Namespace) -> BaseException:
    """``exc`` worded with its flag where an option's value failed during the run (e.g.
    ``--alarm-evidence learned`` on too few held-out images)."""
    if isinstance(exc, OptionValueError):
        flag = (getattr(args, FLAGS_DEST, None) or {}).get(exc.option)
        if flag is not None and getattr(exc, "cli_message", None) is None:
            advise(exc, exc.worded_for(flag))
    return exc


def _sign_key(args: argparse.Namespace) -> bytes | None:
    """The key of ``--sign-key`` (read before the long run), or ``None``; a ``ValueError``
    naming the flag for a missing, unreadable or too short key file."""
    return key_of_flag(args.sign_key, "--sign-key")


def _check_option_flags(args: argparse.Namespace) -> None:
    """The option groups' own checks on their flags, before any image is read (a bad value is
    worded with its flag: ``--batch-size must be an integer >= 1, got 0``)."""
    if args.resume and not args.dir:
        raise ValueError("--resume needs --checkpoint-dir (the checkpoint to continue)")
    options_from_args(RunOptions, args, approximate=_grid(args))
    options_from_args(TableOptions, args)
    options_from_args(AlarmOptions, args, profile_layers=_profile_layers(args.profile_layers))
    if args.dir:
        options_from_args(CheckpointOptions, args)


def _grid(args: argparse.Namespace) -> LogGrid | bool:
    """``--approximate``'s grid (``--sketch-accuracy``, ``--sketch-range``), else ``False``."""
    if not args.approximate:
        return False
    try:
        return LogGrid(args.sketch_accuracy, *args.sketch_range)
    except OptionValueError as exc:  # relative_accuracy, the one option checked by range
        raise advise(exc, exc.worded_for("--sketch-accuracy")) from None
    except ValueError:
        low, high = args.sketch_range
        raise ValueError(f"--sketch-range MIN MAX needs 0 < MIN < MAX, got {low} {high}") from None


def _options(
    args: argparse.Namespace, steps: Preprocessing, names: list[str] | None, model: nn.Module
) -> dict[str, Any]:
    """``calibrate()``'s option groups from the flags (``table``, ``run``, ``checkpoint``,
    ``alarm``), checked by :func:`_check_option_flags`."""
    grid = _grid(args)
    table = options_from_args(
        TableOptions, args, class_names=names, data_source=steps.source(args.data),
        heldout_source=steps.source(args.heldout) if args.heldout else None,
    )  # fmt: skip
    alarm = options_from_args(
        AlarmOptions, args, profile_layers=_profile_layers(args.profile_layers),
        head_layer=_head_layer(args.head_layer, model),
    )  # fmt: skip
    if (
        alarm.enabled
        and alarm.score == GATED_SCORE_NAME
        and alarm.profile_layers == "none"
        and alarm.head_layer == "none"
    ):
        raise ValueError(
            f"--alarm-score {GATED_SCORE_NAME} needs --profile-layers or --head-layer; with "
            f"both 'none' use --alarm-score {FISHER_SCORE_NAME} (or auto, which picks it)"
        )
    return {
        "table": table,
        "run": options_from_args(RunOptions, args, approximate=grid),
        "checkpoint": options_from_args(CheckpointOptions, args) if args.dir else None,
        "alarm": alarm,
    }


def _profile_layers(value: str) -> str | list[str]:
    """``--profile-layers``: ``auto``, ``none`` or a list of module names."""
    value = value.strip()
    if value in ("auto", "none"):
        return value
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise ValueError("--profile-layers needs 'auto', 'none' or module names")
    return names


def _head_layer(value: str, model: Any) -> str:
    """``--head-layer``: ``auto``, ``none`` or the name of one of the model's modules."""
    value = value.strip()
    if value in ("auto", "none"):
        return value
    try:
        get_module(model, value)
    except ValueError:
        raise ValueError(f"--head-layer {value!r}: the model has no module of that name") from None
    return value


def _heldout(args: argparse.Namespace, steps: Preprocessing, train: Any) -> DataLoader | None:
    """The ``--heldout`` images (same preprocessing and class folders as ``--data``)."""
    if not args.heldout:
        if args.enabled:  # no --no-alarm
            print("surprise-calibrate: no --heldout: the table will have the alarm score but no "
                  "null, so the monitor raises no alarms", flush=True)  # fmt: skip
        return None
    root = Path(args.heldout)
    if not root.is_dir():
        raise ValueError(f"--heldout {root}: no such folder")
    extra = sorted({d.name for d in root.iterdir() if d.is_dir()} - set(train.classes))
    if extra:
        raise ValueError(
            f"--heldout {root} has class folders that --data has not: {extra[:10]} (the "
            "held-out images must be of the training classes, in folders of the same names)"
        )
    held = image_folder(root, steps, list(train.classes))
    return DataLoader(held, batch_size=args.batch_size, shuffle=False,
                      num_workers=args.num_workers, collate_fn=checked_collate)  # fmt: skip


def _one_line(exc: BaseException) -> str:
    """The error's message for the command line (a DataLoader worker's wrapped error: its last
    line, the original message)."""
    text = cli_message(exc).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1]
    return text


def _prepare(args: argparse.Namespace, info: DistInfo) -> tuple[Any, Preprocessing, nn.Module]:
    """The dataset, its preprocessing and the model, checked against each other before the
    long run: the mean/std fit the channels, the model runs the preprocessed images, and its
    accuracy on a sample of them (:func:`_judge_accuracy`)."""
    if args.legacy_model:
        if args.model:
            raise ValueError("give the model once: --model NAME (MODEL as a positional argument "
                             "is the old spelling)")  # fmt: skip
        print("surprise-calibrate: MODEL as a positional argument is deprecated; use --model "
              f"{args.legacy_model}", file=sys.stderr)  # fmt: skip
        args.model = args.legacy_model
    if len(args.mean) != len(args.std):
        raise ValueError("--mean and --std need the same number of values")
    steps = Preprocessing(args.resize, args.crop, tuple(args.mean), tuple(args.std),
                          args.grayscale)  # fmt: skip
    check_channels(steps)
    root = Path(args.data)
    if not root.is_dir():
        raise ValueError(f"--data {root}: no such folder")
    dataset = image_folder(root, steps, read_class_order(args.class_order))
    num_classes = args.num_classes or len(dataset.classes)
    model = model_from_args(args, num_classes, "surprise-calibrate").to(args.device)
    n = args.accuracy_images if args.accuracy_images > 0 else 1  # one image: does it run?
    check = accuracy_check(model, dataset, steps, n, args.batch_size, args.device)
    if args.accuracy_images > 0:
        _judge_accuracy(check, args, steps, model, info)
    return dataset, steps, model


def _judge_accuracy(
    check: AccuracyCheck,
    args: argparse.Namespace,
    steps: Preprocessing,
    model: nn.Module,
    info: DistInfo,
) -> None:
    """Rank 0 prints the pre-flight accuracy and, below ``--min-accuracy``, its likely causes
    (:mod:`surprise_monitor.calibrate.diagnosis`); every rank stops (``ValueError``) when it is
    no better than chance."""
    declared = declared_input_size(model, args.model)
    verdict = accuracy_verdict(check, args.min_accuracy, steps, ModelOrigin.of(args), declared)
    if info.rank == 0:
        print(check.line(), flush=True)
        if verdict is not None:
            print(verdict.text, file=sys.stderr, flush=True)
    if verdict is not None and verdict.stop:
        raise ValueError(verdict.error)


if __name__ == "__main__":
    sys.exit(main())
