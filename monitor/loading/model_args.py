"""The model options every command line shares (``surprise-calibrate``, ``surprise-explain``,
``surprise-serve``): one spelling for all three.

``--model NAME`` (a torchvision architecture or an importable ``module:factory``, looked up in
the working directory too, as ``python -m`` would), ``--model-kwargs JSON``, ``--weights FILE``
(a state_dict, never unpickled) and ``--onnx FILE`` instead of the three.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

from torch import nn

from surprise_monitor.monitor.loading.models import build_model, load_weights
from surprise_monitor.monitor.loading.onnx_model import load_onnx


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` states every option's default once and keeps the description's line breaks.

    ``(default: VALUE)`` is appended to an option's help unless its help already states its
    default (``(default: ...)`` in words, for a default of ``None`` such as "the final
    convolution"), it has none (``None``, or ``[]`` for a repeatable flag), or it is a switch
    (``--amp``, ``--no-alarm``: off unless given). A list default is written as on the command
    line: ``0.5 0.5 0.5``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        """The help of ``action`` with its default, stated once."""
        text = action.help or ""
        default = action.default
        if (
            default is None
            or (isinstance(default, list) and not default)  # a repeatable flag given no times
            or default is argparse.SUPPRESS
            or action.nargs == 0
            or _STATES_DEFAULT.search(text)
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


#: A help text that states its default itself.
_STATES_DEFAULT = re.compile(r"\(default\b|%\(default\)")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--model``, ``--model-kwargs``, ``--weights`` and ``--onnx`` to ``p``."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        help="torchvision architecture name (e.g. resnet50) or an importable module:factory "
        "(a file mynet.py in the working directory is found: --model mynet:build)",
    )
    g.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments for the factory")
    g.add_argument(
        "--weights",
        help="state_dict file (loaded with weights_only=True); without it the model keeps the "
        "random weights it was built with",
    )
    g.add_argument("--onnx", help="an ONNX model file instead of --model and --weights")


def model_from_args(args: argparse.Namespace, num_classes: int | None, tool: str) -> nn.Module:
    """The model ``--model`` / ``--onnx`` name, with ``--weights``, in eval mode (on the CPU);
    ``ValueError`` in the command line's words for a missing or contradictory choice."""
    if args.onnx:
        if args.model or args.weights:
            raise ValueError("--onnx replaces --model and --weights; give one or the other")
        return load_onnx(args.onnx).eval()
    if not args.model:
        raise ValueError(f"{tool} needs --model NAME (a torchvision name or module:factory) or "
                         "--onnx FILE")  # fmt: skip
    working_directory_on_path()
    model = build_model(args.model, num_classes, model_kwargs(args.model_kwargs))
    if args.weights:
        load_weights(model, args.weights)
    return model.eval()


def model_kwargs(text: str) -> dict[str, Any]:
    """``--model-kwargs`` parsed: a JSON object, or ``ValueError`` naming the flag."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--model-kwargs is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"--model-kwargs must be a JSON object, got {text!r}")
    return value


def working_directory_on_path() -> None:
    """Put the working directory first on ``sys.path`` (as ``python -m`` does), so a console
    script finds ``--model mynet:build`` in ``./mynet.py``."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser every command line starts from: no abbreviated flags, each default stated
    once in ``--help`` (:class:`HelpFormatter`)."""
    return argparse.ArgumentParser(
        prog=prog, description=description, allow_abbrev=False, formatter_class=HelpFormatter
    )
