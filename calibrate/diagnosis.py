"""Why a model classifies its calibration images badly: the likely causes of a low pre-flight
accuracy (:class:`~surprise_monitor.calibrate.preflight.AccuracyCheck`), each worded by what is
known, and whether ``surprise-calibrate`` stops.

Below ``--min-accuracy`` it warns; when the accuracy is also no better than chance (the 95%
interval reaches the accuracy of always answering the sample's largest class) it stops before
the long run. The causes checked: the input size fed against the size the model declares (timm's
``pretrained_cfg`` / ``default_cfg``, torchvision's pretrained weights) or, when it declares none,
the size fed and the flags that set it; the normalised images' per-channel mean and std against
0 and 1; the weights (random only where that is known: a torchvision architecture without
``--weights``; a ``module:factory`` may load its own); and class folders whose images mostly get
another class (the label order, or, when they all get the same one, a model that does not
recognise its inputs).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from surprise_monitor.calibrate.preflight import AccuracyCheck, flags_of
from surprise_monitor.monitor.loading.images import Preprocessing

#: The normalised images' channel means beyond this, or stds outside this range, do not fit.
FAR_MEAN, STD_RANGE = 1.0, (0.5, 2.0)
#: The command line's default preprocessing (ImageNet's).
DEFAULT_SIZE = (256, 224)
_RULE = "=" * 78


@dataclass(frozen=True)
class ModelOrigin:
    """Where the model came from: ``--model``, ``--weights``, ``--onnx``."""

    spec: str | None = None
    weights: str | None = None
    onnx: str | None = None

    @classmethod
    def of(cls, args: argparse.Namespace) -> ModelOrigin:
        """The origin the command line's model flags give."""
        return cls(args.model, args.weights, args.onnx)

    @property
    def factory(self) -> bool:
        """True for a ``module:factory`` (which may load trained weights itself)."""
        return bool(self.spec) and ":" in str(self.spec)

    def weights_cause(self) -> str | None:
        """What is known about the weights, as a cause to check (``None``: nothing to say)."""
        if self.onnx:
            return None
        if self.weights:
            return (
                f"weights: --weights {self.weights} was loaded; check that it holds the "
                "trained model's state_dict"
            )
        if self.factory:
            return (
                f"weights: those {self.spec} sets (a --weights FILE would be loaded over "
                "them); a factory that does not load trained weights builds an untrained model"
            )
        return (
            f"weights: no --weights flag was given, so torchvision's {self.spec} has random "
            "weights; give the trained state_dict with --weights FILE"
        )


def declared_input_size(model: nn.Module, spec: str | None) -> tuple[tuple[int, ...], str] | None:
    """The input size ``(C, H, W)`` the model declares, and where it says so: timm's
    ``pretrained_cfg`` / ``default_cfg``, or the pretrained weights of a torchvision
    architecture ``spec``; ``None`` when nothing declares one."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        size = cfg.get("input_size") if isinstance(cfg, Mapping) else None
        if size and len(size) == 3:
            return tuple(int(v) for v in size), f"its {attr}['input_size']"
    if not spec or ":" in spec:
        return None
    try:
        import torchvision

        crop = torchvision.models.get_model_weights(spec).DEFAULT.transforms().crop_size
    except Exception:  # no weights for the name, or an older torchvision
        return None
    return (3, int(crop[0]), int(crop[-1])), f"torchvision's pretrained {spec} weights"


def _size(shape: tuple[int, ...]) -> str:
    """``3x224x224``."""
    return "x".join(map(str, shape))


def input_size_cause(
    check: AccuracyCheck, steps: Preprocessing, declared: tuple[tuple[int, ...], str] | None
) -> str | None:
    """The input size fed against the declared one (``None`` when they agree)."""
    fed = check.input_shape
    if not fed:
        return None
    flags = flags_of(steps)
    if declared is not None:
        size, where = declared
        if tuple(fed[-2:]) == tuple(size[-2:]):
            return None
        return (
            f"input size: the images were fed at {_size(fed)} ({flags}) but the model declares "
            f"{_size(size)} ({where}); set --resize and --crop to give {_size(size[-2:])}"
        )
    if (steps.resize, steps.crop) != DEFAULT_SIZE:
        return (
            f"input size: the images were fed at {_size(fed)} ({flags}); the model declares no "
            "input size: if it was trained at another, set --resize and --crop to it"
        )
    return (
        f"input size: the images were fed at {_size(fed)} ({flags}: ImageNet's, the default); "
        "the model declares no input size and may expect another (32x32 for CIFAR models): set "
        "--resize and --crop to the size it was trained at (--resize 0 --crop 0 keeps the "
        "images' own)"
    )


def normalisation_cause(check: AccuracyCheck, steps: Preprocessing) -> str | None:
    """The normalised images' per-channel mean and std, and whether they fit (near 0 and 1)."""
    if not check.channel_mean:
        return None
    mean = ", ".join(f"{v:.2f}" for v in check.channel_mean)
    std = ", ".join(f"{v:.2f}" for v in check.channel_std)
    given = (
        f"--mean {' '.join(f'{v:g}' for v in steps.mean)} "
        f"--std {' '.join(f'{v:g}' for v in steps.std)}"
    )
    far = any(abs(v) > FAR_MEAN for v in check.channel_mean) or any(
        not STD_RANGE[0] <= v <= STD_RANGE[1] for v in check.channel_std
    )
    if far:
        return (
            f"normalisation: after {given} the images' channels have mean {mean} and std "
            f"{std}, far from 0 and 1: the normalisation does not fit the data; give the "
            "mean and std of the images the model was trained on (--mean, --std)"
        )
    return (
        f"normalisation: after {given} the images' channels have mean {mean} and std {std} "
        "(near 0 and 1); check that this is the normalisation the model was trained with"
    )


def class_order_cause(check: AccuracyCheck) -> str | None:
    """Class folders whose images mostly get one other class: a label order when each goes to
    its own class, a model that answers the same class whatever the image otherwise."""
    if not check.swapped:
        return None
    shown = ", ".join(f"folder {n!r} -> class {c}" for n, c in check.swapped[:5])
    targets = [c for _, c in check.swapped]
    if len(set(targets)) < len(targets):
        return (
            f"predictions: most images of {len(check.swapped)} class folders get the same "
            f"class ({shown}): a model that answers one class whatever the image is untrained "
            "or does not recognise its inputs (see the input size and normalisation)"
        )
    return (
        f"class order: most images of {len(check.swapped)} class folders get another class "
        f"({shown}): the folders' alphabetical order may not be the model's label order; give "
        "it with --class-order (a file of class names, one per line, or name,name,...)"
    )


@dataclass(frozen=True)
class AccuracyVerdict:
    """What to print about a low pre-flight accuracy, and whether the run stops."""

    text: str
    stop: bool
    error: str = ""


def accuracy_verdict(
    check: AccuracyCheck,
    minimum: float,
    steps: Preprocessing,
    origin: ModelOrigin,
    declared: tuple[tuple[int, ...], str] | None,
) -> AccuracyVerdict | None:
    """``None`` at or above ``minimum`` (``--min-accuracy``); below it, the likely causes, and
    a stop when the accuracy is no better than chance."""
    if check.accuracy >= minimum:
        return None
    stop = check.at_chance
    chance = f", no better than chance ({100 * check.chance:.1f}%)" if stop else ""
    causes = [
        input_size_cause(check, steps, declared),
        normalisation_cause(check, steps),
        origin.weights_cause(),
        class_order_cause(check),
    ]
    lines = [
        _RULE,
        f"{'ERROR' if stop else 'WARNING'}: {check.line()}{chance}, below --min-accuracy "
        f"{minimum:g}.",
        "A table of a model that does not classify its calibration images is meaningless. "
        "Likely causes:",
        *(f"- {cause}" for cause in causes if cause),
    ]
    if stop:
        lines.append("Stopped before calibrating: fix the cause, or give --min-accuracy 0 to "
                     "calibrate anyway.")  # fmt: skip
    lines.append(_RULE)
    error = (
        f"the model's pre-flight accuracy ({100 * check.accuracy:.1f}%) is no better than "
        f"chance ({100 * check.chance:.1f}%): stopped before calibrating (the likely causes "
        "are listed above; --min-accuracy 0 calibrates anyway)"
    )
    return AccuracyVerdict("\n".join(lines), stop, error if stop else "")
