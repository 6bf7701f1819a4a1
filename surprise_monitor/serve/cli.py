"""surprise-serve: an HTTP inference service watched by the surprise monitor (FastAPI + uvicorn).

Run (a torch model, or an ONNX file with ``--onnx model.onnx`` instead of --model/--weights):

    surprise-serve --model resnet50 --weights resnet50.pt \\
        --table resnet50.safetensors --host 127.0.0.1 --port 8000

(``python -m surprise_monitor.serve`` is the same command.) The endpoints (``/predict``,
``/predict/image``, ``/alarms/``, ``/metrics``, ``/healthz``) and their limits are described in
:mod:`surprise_monitor.serve.app`. At start-up the service logs one line with its URL, the
model, the table, the monitor's mode and alarm rate, and whether the table has a held-out null.

``--mode async`` answers from the plain model and judges a copy of the inputs on a worker
thread, which joins queued requests into judge calls of up to ``--judge-batch N`` inputs;
``--sample-every K`` judges one input in K; ``--no-monitor`` serves the bare model (for
comparison); ``--metrics-label model=resnet50`` adds constant labels to the monitor's series;
``--alarm-rate`` is the nominal false-alarm rate (exported as
``surprise_monitor_alarm_rate_nominal``, which the alert rules read) and ``--metrics-window`` the
inputs in the windowed alarm rate and drift gauges. ``--alarm-log N`` alarms are kept for the
operator's page (0: no page), ``--alarm-audit FILE`` appends each to a JSONL audit file rotated
at ``--alarm-audit-max-mb``.

``surprise-serve --write-config DIR`` writes the Prometheus alert rules (``DIR/alerts.yml``) and
the Grafana dashboard with its provisioning files (``DIR/grafana/``), then exits.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import torch
from prometheus_client import REGISTRY
from torch import nn

from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.advice import cli_message
from surprise_monitor.monitor.loading.model_args import model_from_args
from surprise_monitor.monitor.table import CalibrationTable
from surprise_monitor.serve.config_files import CONFIG_FILES, ConfigExistsError, write_config
from surprise_monitor.serve.flags import (  # noqa: F401 - the command line's parts, re-exported
    CONNECTION_FLAGS,
    TOOL,
    alarm_log_from_args,
    check_args,
    connection_limits,
    device_of,
    metrics_labels,
    monitor_from_args,
    parser,
    startup_line,
    table_from_args,
    table_key,
)
from surprise_monitor.serve.limits import MIB, Limits

log = logging.getLogger("surprise_monitor.serve")


def main(argv: Sequence[str] | None = None) -> None:
    """``surprise-serve``: parse the flags, load the model and table, serve until stopped."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.write_config:
        _write_config(args.write_config, args.force)
        return
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = model_from_args(args, None, TOOL).to(device_of(args.device))
        table = table_from_args(args)
        monitor = None
        if not args.no_monitor:
            monitor = monitor_from_args(args, model, table, REGISTRY, alarm_log_from_args(args))
    except (ValueError, TypeError, OSError) as exc:
        raise SystemExit(f"{TOOL}: error: {cli_message(exc)}") from None
    serve(args, model, monitor, table)


def serve(
    args: argparse.Namespace,
    model: nn.Module,
    monitor: SurpriseMonitor | None,
    table: CalibrationTable | None,
) -> None:
    """Log the start-up line and serve the app until stopped (a bounded shutdown)."""
    from surprise_monitor.serve.app import create_app
    from surprise_monitor.serve.server import run_server

    limits = Limits(int(args.max_body_mb * MIB), args.max_batch, args.max_image_pixels)
    app = create_app(model, monitor, table=table, limits=limits, registry=REGISTRY)
    log.info("%s", startup_line(args, table))
    run_server(app, args.host, args.port, connection_limits(args))


def _write_config(folder: str, force: bool) -> None:
    """``--write-config DIR``: write the files, print each path written."""
    try:
        written = write_config(folder, force=force)
    except (ConfigExistsError, OSError) as exc:
        raise SystemExit(f"{TOOL}: error: {exc}") from None
    for path in written:
        print(path)
    log.info("%s: %d config file(s) written under %s (%d already up to date)", TOOL,
             len(written), folder, len(CONFIG_FILES) - len(written))  # fmt: skip
