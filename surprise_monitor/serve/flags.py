"""surprise-serve's flags and what they build: the parser, their checks, and the model's
table, monitor and alarm log from parsed flags (:mod:`surprise_monitor.serve.cli` runs them;
the Ray Serve integration builds each replica from the same flags). A bad value is a
``SystemExit`` naming its flag, as the command line shows it."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import torch
from prometheus_client import CollectorRegistry
from torch import nn

from surprise_monitor.monitor import AlarmLog, MonitorReport, SurpriseMonitor
from surprise_monitor.monitor.advice import cli_message
from surprise_monitor.monitor.alarms.log import DEFAULT_CAPACITY
from surprise_monitor.monitor.alarms.sink import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES
from surprise_monitor.monitor.conformal import INTERPOLATED
from surprise_monitor.monitor.loading.model_args import (
    add_model_arguments,
    command_parser,
)
from surprise_monitor.monitor.options import (
    Execution,
    MetricsOptions,
    Sampling,
    Thresholds,
    add_option_arguments,
    options_from_args,
)
from surprise_monitor.monitor.table import CalibrationTable
from surprise_monitor.monitor.table_file import TableSignatureError
from surprise_monitor.monitor.table_key import TableKeyError, key_of_flag
from surprise_monitor.serve.config_files import CONFIG_FILES
from surprise_monitor.serve.limits import MIB, ConnectionLimits, Limits

TOOL = "surprise-serve"
DESCRIPTION = (
    "surprise-serve: an HTTP inference service watched by the surprise monitor (FastAPI + uvicorn)."
)
METAVARS = {
    "every": "K",
    "queue_size": "N",
    "judge_batch": "N",
    "alarm_rate": "RATE",
    "window": "N",
}
log = logging.getLogger("surprise_monitor.serve")
#: The connection flags (:class:`ConnectionLimits`' fields) and their help.
CONNECTION_FLAGS = {
    "--header-timeout": "seconds a client has to send a request's headers (from connecting, or "
                        "from the next request's first byte); answered 408 and closed after",
    "--body-timeout": "seconds a client has to send a request's whole body; answered 408 and "
                      "closed after",
    "--keep-alive-timeout": "seconds an idle kept-alive connection stays open",
    "--shutdown-timeout": "seconds running requests get to finish after SIGTERM before they are "
                          "cancelled",
    "--max-connections": "connections at once; requests beyond are answered 503",
}  # fmt: skip


def parser() -> argparse.ArgumentParser:
    """The command line's flags; each ``--help`` line states its default once (the formatter)."""
    p = command_parser(TOOL, DESCRIPTION)
    add_model_arguments(p)
    s = p.add_argument_group("service")
    s.add_argument("--table", help="calibration table (.safetensors); required with the monitor")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument(
        "--device", default="cpu",
        help="where the model and the monitor run: a torch device, e.g. cuda:0",
    )  # fmt: skip
    s.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's own choice)")  # fmt: skip
    s.add_argument("--no-monitor", action="store_true", help="serve the bare model")
    s.add_argument("--max-body-mb", type=float, default=Limits.max_body_bytes / MIB,
                   help="largest request body (MiB)")  # fmt: skip
    s.add_argument("--max-batch", type=int, default=Limits.max_batch,
                   help="most inputs in one request")  # fmt: skip
    s.add_argument("--max-image-pixels", type=int, default=Limits.max_image_pixels,
                   help="largest uploaded image (width x height)")  # fmt: skip
    _connection_arguments(p)
    _monitor_arguments(p)
    c = p.add_argument_group("monitoring configuration")
    c.add_argument("--write-config", metavar="DIR",
                   help=f"write the Prometheus rules and the Grafana dashboard "
                   f"({', '.join(CONFIG_FILES)}) under DIR, then exit")  # fmt: skip
    c.add_argument("--force", action="store_true",
                   help="with --write-config: overwrite files that differ")  # fmt: skip
    return p


def _connection_arguments(p: argparse.ArgumentParser) -> None:
    """How long a client may take and how many may connect; how long shutdown may wait."""
    c = p.add_argument_group("connections")
    for flag, help_text in CONNECTION_FLAGS.items():
        seconds = flag != "--max-connections"
        c.add_argument(flag, type=float if seconds else int, metavar="S" if seconds else "N",
                       default=getattr(ConnectionLimits, _dest(flag)), help=help_text)  # fmt: skip


def _dest(flag: str) -> str:
    """A flag's attribute name: ``--body-timeout`` -> ``body_timeout``."""
    return flag[2:].replace("-", "_")


def connection_limits(args: argparse.Namespace) -> ConnectionLimits:
    """The connection flags as :class:`ConnectionLimits`."""
    return ConnectionLimits(**{_dest(f): getattr(args, _dest(f)) for f in CONNECTION_FLAGS})


def _monitor_arguments(p: argparse.ArgumentParser) -> None:
    """The monitor's flags: mode, sampling, alarm rate, metrics, the alarm log."""
    m = p.add_argument_group("monitor")
    add_option_arguments(
        m, Sampling, {"mode": "--mode", "every": "--sample-every", "queue_size": "--queue-size",
                      "judge_batch": "--judge-batch"},
    )  # fmt: skip
    add_option_arguments(
        m, Thresholds, {"alarm_rate": "--alarm-rate", "alarm_confidence": "--alarm-confidence",
                        "p_values": "--p-values"},
    )  # fmt: skip
    m.add_argument(
        "--no-fingerprint-check", action="store_true",
        help="use the table with a model whose weights changed since calibration (deliberately)",
    )  # fmt: skip
    m.add_argument(
        "--table-key", metavar="FILE",
        help="the secret key file the table was signed with (surprise-calibrate --sign-key): "
        "refuse a table that is unsigned or was changed since it was signed",
    )  # fmt: skip
    m.add_argument("--metrics-label", action="append", default=[], metavar="KEY=VALUE",
                   help="a constant label on the monitor's metrics (repeatable), e.g. "
                   "model=resnet50")  # fmt: skip
    add_option_arguments(
        m, MetricsOptions, {"window": "--metrics-window", "per_class": "--per-class-metrics"}
    )
    for action in m._group_actions:  # add_option_arguments names none
        action.metavar = METAVARS.get(action.dest, action.metavar)
    m.add_argument("--log-flags", action="store_true", help="log each input that alarms")
    m.add_argument(
        "--alarm-log", type=int, default=DEFAULT_CAPACITY, metavar="N",
        help="recent alarms kept for the operator's page at /alarms/ (0: no page)",
    )  # fmt: skip
    m.add_argument("--alarm-audit", metavar="FILE",
                   help="append each alarm to this JSONL audit file (rotated by size)")  # fmt: skip
    m.add_argument("--alarm-audit-max-mb", type=float, default=DEFAULT_MAX_BYTES / MIB,
                   help=f"rotate the audit file at this size (MiB; {DEFAULT_BACKUPS} older files "
                   "kept)")  # fmt: skip


def check_args(args: argparse.Namespace) -> None:
    """``SystemExit`` naming the flag for a missing or out-of-range value. The monitor's flags
    are checked by their option groups' own checks (worded with the flags)."""
    problems = [
        (not args.no_monitor and not args.table, "--table is required unless --no-monitor"),
        (args.alarm_log < 0 or (bool(args.alarm_audit) and args.alarm_log == 0),
         "--alarm-log must be >= 1 with --alarm-audit (0: no log)"),
        (args.alarm_audit_max_mb <= 0,
         f"--alarm-audit-max-mb must be > 0; got {args.alarm_audit_max_mb}"),
    ]  # fmt: skip
    for flag in CONNECTION_FLAGS:
        value = getattr(args, _dest(flag))
        problems.append((not value > 0, f"{flag} must be > 0; got {value}"))
    for bad, message in problems:
        if bad:
            raise SystemExit(f"{TOOL}: {message}")
    for group in (Thresholds, Sampling, MetricsOptions):
        try:
            options_from_args(group, args)
        except ValueError as exc:
            raise SystemExit(f"{TOOL}: {cli_message(exc)}") from None
    metrics_labels(args.metrics_label)


def device_of(name: str) -> torch.device:
    """``--device`` as a torch device; ``SystemExit`` for a malformed or absent one."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise SystemExit(f"{TOOL}: --device {name!r} is not a device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{TOOL}: --device {name}: CUDA is not available here; use --device cpu")
    return device


def metrics_labels(values: Sequence[str]) -> dict[str, str]:
    """``--metrics-label KEY=VALUE`` options as a dict."""
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{TOOL}: --metrics-label takes KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def alarm_log_from_args(args: argparse.Namespace) -> AlarmLog | None:
    """The operator page's alarm log (``--alarm-log``, ``--alarm-audit``), or ``None``."""
    if not args.alarm_log:
        return None
    max_bytes = max(1, int(args.alarm_audit_max_mb * MIB))
    return AlarmLog(args.alarm_log, sink=args.alarm_audit, sink_max_bytes=max_bytes)


def table_key(args: argparse.Namespace) -> bytes | None:
    """The key of ``--table-key``, or ``None``; ``SystemExit`` naming the flag for a missing,
    unreadable or too short key file."""
    try:
        return key_of_flag(args.table_key, "--table-key")
    except TableKeyError as exc:
        raise SystemExit(f"{TOOL}: error: {exc}") from None


def table_from_args(args: argparse.Namespace) -> CalibrationTable | None:
    """The ``--table`` file (exemplars left on disk), or ``None``; with ``--table-key`` it must
    be signed with that key (``SystemExit`` naming the flag otherwise)."""
    if not args.table:
        if args.table_key:
            raise SystemExit(f"{TOOL}: error: --table-key needs --table (the table it signs)")
        return None
    key = table_key(args)
    try:
        return CalibrationTable.load(args.table, exemplars=False, key=key)
    except TableSignatureError as exc:
        raise SystemExit(f"{TOOL}: error: --table-key {args.table_key}: {exc}") from None


def monitor_from_args(
    args: argparse.Namespace,
    model: nn.Module,
    table: CalibrationTable,
    registry: CollectorRegistry,
    alarm_log: AlarmLog | None,
) -> SurpriseMonitor:
    """The service's monitor from the parsed flags, its metrics in ``registry``: the one place
    that maps flags to the monitor's options."""
    thresholds = options_from_args(Thresholds, args)
    sampling = options_from_args(Sampling, args)
    metrics = options_from_args(
        MetricsOptions, args, registry=registry, labels=metrics_labels(args.metrics_label)
    )

    def on_alarm(report: MonitorReport) -> None:
        log.info("alarm: %s", report.to_json(max_filters=3))

    return SurpriseMonitor(
        model, table, thresholds=thresholds, sampling=sampling, metrics=metrics,
        execution=Execution(check_fingerprint=not args.no_fingerprint_check),
        on_alarm=on_alarm if args.log_flags else None, alarm_log=alarm_log,
        table_key=table_key(args),
    )  # fmt: skip


def startup_line(args: argparse.Namespace, table: CalibrationTable | None) -> str:
    """The one line logged at start-up: URL, model, table, mode, alarm rate, held-out null,
    whether the table's signature was verified."""
    model = f"--onnx {args.onnx}" if args.onnx else args.model
    if args.weights:
        model += f" (weights {args.weights})"
    if args.no_monitor:
        monitor = "monitor off"
    else:
        monitor = f"monitor {args.mode}, alarm rate {args.alarm_rate:g}"
        if args.alarm_confidence:
            monitor += f" with probability {args.alarm_confidence:g} over the held-out draw"
        elif args.p_values != INTERPOLATED:
            monitor += f" ({args.p_values} p-values)"
        if args.every > 1:
            monitor += f", one input in {args.every} judged"
    alarm = table.alarm if table is not None else None
    if alarm is not None and alarm.has_null:
        null = f"held-out null of {len(alarm.null_predicted.scores)} images"
    else:
        null = "no held-out null (no input will alarm)"
    if getattr(table, "signature_verified", False):
        null += ", signed table, signature verified"
    elif args.table:
        signed = "signed but " if getattr(table, "signed", False) else ""
        null += f", table {signed}not authenticated (no --table-key)"
    line = (f"{TOOL}: serving http://{_url_host(args.host)}:{args.port} on {args.device}; "
            f"model {model}; table {args.table or '(none)'}, {null}; {monitor}")  # fmt: skip
    if alarm is not None and alarm.has_null and not args.no_monitor:
        line += f"; p-values: {alarm.class_nulls_summary()}"
    return line


def _url_host(host: str) -> str:
    """``host`` as written in a URL (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
