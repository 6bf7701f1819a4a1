"""The monitor's options, grouped and declared once: each group is a frozen dataclass with its
defaults, checks and documentation, and each layer takes the groups it uses whole.

- :class:`Thresholds`: what counts as surprising, expected, low beta, and an alarm.
- :class:`Execution`: how the judge runs (kernel backend, CUDA graphs, where values are
  checked) and what it refuses (another model's table, another input size).
- :class:`Sampling`: which inputs the request path judges, and on which thread.
- :class:`MetricsOptions`: the Prometheus metrics (registry, names, labels, window).

A field's documentation is its ``help`` metadata: the docstrings, ``--help`` of the command
lines (:func:`add_option_arguments`) and the error for an old keyword all read it from here.

The facade, :class:`~surprise_monitor.monitor.SurpriseMonitor`, takes these groups instead of the
25 flat keywords of 0.1; an old keyword is refused with a ``TypeError`` naming its new spelling
(:func:`renamed_keywords`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from surprise_monitor.kernels._backend import BACKENDS, DEFAULT_BACKEND
from surprise_monitor.kernels.defaults import (
    DEFAULT_EXPECTATION_PCT,
    DEFAULT_LOW_BETA_PCT,
    DEFAULT_SURPRISE_PCT,
)
from surprise_monitor.monitor.advice import advise
from surprise_monitor.monitor.checks import (
    OptionValueError,
    fraction,
    one_of,
    percentage,
    positive_int,
)
from surprise_monitor.monitor.conformal import INTERPOLATED, P_VALUE_RULES

MODES = ("sync", "async")
DEFAULT_NAMESPACE = "surprise_monitor"
#: Where parsed arguments keep ``{option: flag}`` of the flags :func:`add_option_arguments` added.
FLAGS_DEST = "option_flags"

F = TypeVar("F", bound=Callable[..., Any])


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    choices: Sequence[str] | None = None,
    **kw: Any,
) -> Any:
    """A dataclass field whose ``help`` is its one documentation (``--help``, docstrings);
    ``choices``: the values its command-line flag accepts (:func:`add_option_arguments`)."""
    metadata = {"help": help, "choices": None if choices is None else tuple(choices)}
    if isinstance(default, list | dict | set):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def help_of(cls: type, name: str) -> str:
    """The documentation of option ``name`` of group ``cls``."""
    return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)


@dataclass(frozen=True)
class Thresholds:
    """What counts as surprising, expected, low beta, and an alarm."""

    surprise_pct: float = option(
        DEFAULT_SURPRISE_PCT, "a filter is surprising when alpha > P_cn(surprise_pct)"
    )
    expectation_pct: float = option(
        DEFAULT_EXPECTATION_PCT,
        "a filter is expected when alpha < P_cn(expectation_pct) and mu_cn > mean_n(mu_cn)",
    )
    low_beta_pct: float = option(
        DEFAULT_LOW_BETA_PCT,
        "an input has a low beta below this percentile of its class's calibration betas",
    )
    alarm_rate: float = option(
        0.01,
        "the alarm's nominal false-alarm rate: an input alarms when its conformal p-value "
        "among the table's held-out images is at most this",
    )
    alarm_confidence: float = option(
        0.0,
        "0: the false-alarm rate is alarm_rate (at most, with conservative p-values) on "
        "average over the draw of the "
        "held-out images (marginal); c in (0, 1): with probability at least c over that draw "
        "(calibration-conditional, Bates et al. 2023: a stricter p-value threshold per null)",
    )
    p_values: str = option(
        INTERPOLATED,
        "how a p-value is read off the held-out scores: interpolated across the gap between "
        "the two nearest (alarms on alarm_rate of normal inputs on average) or conservative "
        "(the nearest's rank: at most alarm_rate, below it by up to 1/(n+1); always with "
        "alarm_confidence)",
        choices=P_VALUE_RULES,
    )

    def __post_init__(self) -> None:
        for name in ("surprise_pct", "expectation_pct", "low_beta_pct"):
            object.__setattr__(self, name, percentage(name, getattr(self, name)))
        object.__setattr__(self, "alarm_rate", fraction("alarm_rate", self.alarm_rate))
        c = self.alarm_confidence
        if isinstance(c, bool) or not isinstance(c, int | float) or not 0.0 <= c < 1.0:
            raise OptionValueError("alarm_confidence", "a number in [0, 1), e.g. 0.9", c)
        object.__setattr__(self, "alarm_confidence", float(c))
        object.__setattr__(self, "p_values", one_of("p_values", self.p_values, P_VALUE_RULES))

    @property
    def interpolated(self) -> bool:
        """Whether the alarm reads interpolated p-values: asked for, and no confidence asked
        (the calibration-conditional level counts whole gaps)."""
        return self.p_values == INTERPOLATED and self.alarm_confidence == 0.0


@dataclass(frozen=True)
class Execution:
    """How the judge runs, and what it refuses."""

    backend: str = option(DEFAULT_BACKEND, "kernel backend: auto (Triton on CUDA), triton or torch")
    cuda_graphs: bool = option(
        False,
        "on CUDA, replay the whole monitoring step from a CUDA graph per input signature "
        "(the first call of a signature runs eagerly, the second captures; a failed capture "
        "turns graphs off); off until measured on a GPU",
    )
    max_graphs: int = option(8, "CUDA graphs kept at most (least recently used dropped)")
    host_checks: bool | None = option(
        None,
        "check input and label values on the host (True: a host sync on a GPU), on the device "
        "(False), or on the host for tensors already there (None: no sync either way)",
    )
    check_fingerprint: bool = option(
        True, "refuse a table whose model-weights fingerprint differs from the model's"
    )
    strict_input_size: bool = option(
        True, "refuse inputs whose H x W differ from the calibration images'"
    )

    def __post_init__(self) -> None:
        one_of("backend", self.backend, BACKENDS)
        positive_int("max_graphs", self.max_graphs)


@dataclass(frozen=True)
class Sampling:
    """Which inputs the request path judges, and on which thread."""

    every: int = option(1, "judge one input in K (counted over calls and threads)")
    fraction: float = option(1.0, "judge a random fraction of the inputs (seeded by seed)")
    seed: int | None = option(0, "the seed of fraction's draws")
    mode: str = option(
        "sync",
        "sync judges inputs on the request path; async returns the model's output at once and "
        "judges a copy on a worker thread",
        choices=MODES,
    )
    queue_size: int = option(64, "async mode: batches queued at most; inputs past it are dropped")
    judge_batch: int = option(
        64,
        "async mode: queued inputs judged together in one judge call, at most this many "
        "(1: each queued batch on its own)",
    )

    def __post_init__(self) -> None:
        positive_int("sampling.every", self.every)
        share = float(self.fraction)
        if not 0.0 < share <= 1.0:
            raise OptionValueError("sampling.fraction", "in (0, 1]", share)
        if self.every > 1 and share < 1.0:
            raise ValueError("give sampling.every or sampling.fraction, not both")
        object.__setattr__(self, "fraction", share)
        one_of("sampling.mode", self.mode, MODES)
        positive_int("sampling.queue_size", self.queue_size)
        positive_int("sampling.judge_batch", self.judge_batch)

    @property
    def takes_all(self) -> bool:
        """True when every input is judged."""
        return self.every == 1 and self.fraction == 1.0


@dataclass(frozen=True)
class MetricsOptions:
    """The Prometheus metrics of one monitor."""

    registry: Any = option(
        None,
        "a prometheus_client CollectorRegistry (or a RayMetricsRegistry in a Ray Serve "
        "replica); None: the process's global registry",
    )
    namespace: str = option(DEFAULT_NAMESPACE, "the metric names' prefix")
    labels: Mapping[str, str] = option(
        {}, "constant labels of this monitor's series, e.g. model=resnet50"
    )
    per_class: bool = option(
        False, "add a class label to the monitored, flagged and alarmed counters"
    )
    window: int = option(
        1000, "p-values in the sliding window of the windowed alarm rate and the drift gauge"
    )
    beta_buckets: Sequence[float] | None = option(
        None, "the beta histogram's buckets; None: from the table's calibration betas"
    )

    def __post_init__(self) -> None:
        positive_int("metrics.window", self.window)
        object.__setattr__(self, "labels", {str(k): str(v) for k, v in self.labels.items()})

    @classmethod
    def of(cls, metrics: Any) -> MetricsOptions | None:
        """The options ``SurpriseMonitor(metrics=...)`` means: ``False`` / ``None`` none,
        ``True`` the defaults (global registry), a registry, or options as given."""
        if metrics is None or metrics is False:
            return None
        if metrics is True:
            return cls()
        if isinstance(metrics, cls):
            return metrics
        if callable(getattr(metrics, "register", None)):
            return cls(registry=metrics)
        raise TypeError(
            "metrics must be True, False, a prometheus_client CollectorRegistry or "
            f"MetricsOptions, got {type(metrics).__name__}"
        )


def renamed_keywords(renames: Mapping[str, str]) -> Callable[[F], F]:
    """Refuse the keywords of an older API with a ``TypeError`` that names the new spelling
    (``renames``: old keyword -> how to write it now). Other calls pass through untouched."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            old = [k for k in kwargs if k in renames]
            if old:
                name = getattr(fn, "__qualname__", fn.__name__).removesuffix(".__init__")
                hints = "; ".join(f"{k}= is now {renames[k]}" for k in old)
                raise TypeError(f"{name}(): {hints}")
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


T = TypeVar("T")


def add_option_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    flags: Mapping[str, str],
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Add one command-line flag per option of ``cls`` named in ``flags`` (option -> flag,
    e.g. ``{"alarm_rate": "--alarm-rate"}``), its help and default from the option itself
    (``defaults`` overrides a default for this command line), and its ``choices``. A bool
    option becomes a switch that turns it on (``--per-class-metrics``), or off when its default
    is on (``--no-...``, its help then reads "do not ..."). Each default is stated once in
    ``--help`` by :class:`~surprise_monitor.monitor.loading.model_args.HelpFormatter`. The
    parsed arguments remember each option's flag, so :func:`options_from_args` words a bad
    value with it."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    known = dict(parser.get_default(FLAGS_DEST) or {})
    parser.set_defaults(**{FLAGS_DEST: {**known, **flags}})  # shared by a parser's groups
    for name, flag in flags.items():
        f = by_name[name]
        default = (defaults or {}).get(name, _default_of(f))
        help_text = f.metadata.get("help", "")
        if isinstance(default, bool):
            action = "store_false" if default else "store_true"
            help_text = f"do not {help_text}" if default else help_text
            parser.add_argument(flag, dest=name, action=action, help=help_text)
        else:
            kind = type(default) if default is not None else str
            choices = f.metadata.get("choices")
            metavar = None if choices else flag.lstrip("-").upper().replace("-", "_")
            parser.add_argument(flag, dest=name, type=kind, default=default, help=help_text,
                                choices=choices, metavar=metavar)  # fmt: skip


def options_from_args(cls: type[T], args: argparse.Namespace, **extra: Any) -> T:
    """An instance of ``cls`` from the flags :func:`add_option_arguments` added (and
    ``extra`` fields), its checks run. A flag's bad value raises the option's
    :class:`~surprise_monitor.monitor.checks.OptionValueError`, whose command-line message
    (:func:`~surprise_monitor.monitor.advice.cli_message`) names the flag."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    given = {k: v for k, v in vars(args).items() if k in names}
    try:
        return cls(**{**given, **extra})
    except OptionValueError as exc:
        flag = (getattr(args, FLAGS_DEST, None) or {}).get(exc.option)
        if flag is not None and exc.option not in extra:
            advise(exc, exc.worded_for(flag))
        raise


def _default_of(f: dataclasses.Field) -> Any:
    """A field's default value (its factory's product for a mutable default)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def add_renamed_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, renames: Mapping[str, str]
) -> None:
    """Hidden flags of an older command line (old flag -> new flag) that stop the parse with
    an argparse error naming the new flag (exit status 2), e.g. ``--score is now
    --class-output``."""
    for old, new in renames.items():
        parser.add_argument(old, action=_Renamed, nargs="?", new=new, help=argparse.SUPPRESS)


class _Renamed(argparse.Action):
    """A flag that was renamed: using it is an argparse error naming the new one."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, **kw)
        self.new = new

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        parser.error(f"{option_string} is now {self.new}")
