"""Build the monitored Ray Serve application: :func:`build_app` (Python) and :func:`app_builder`
(``serve run``).

    serve run surprise_monitor.integrations.ray_serve:app_builder \\
        model=resnet18 weights=resnet18.safetensors table=table.safetensors \\
        num_replicas=2 max_batch_size=16 alarm_audit=/var/log/surprise/alarms.jsonl

Every ``key=value`` is ``surprise-serve``'s flag ``--key value`` (``-`` for ``_``; ``true`` for a
flag without a value), except the deployment's own keys in :data:`DEPLOYMENT_KEYS`. The
application is the model deployment (``num_replicas`` replicas, each with ``num_cpus`` /
``num_gpus``) and, unless ``alarm_log=0``, the alarm log deployment of one replica that holds the
operator page's records and the audit file.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

from ray import serve
from ray.serve import Application

from surprise_monitor.integrations.ray_serve.alarms import AlarmLogServer
from surprise_monitor.integrations.ray_serve.batching import DEFAULT_BATCH_WAIT_S
from surprise_monitor.integrations.ray_serve.deployment import MonitoredModel

#: ``serve run`` keys that configure the deployment (not ``surprise-serve`` flags).
DEPLOYMENT_KEYS = {
    "num_replicas": int,
    "num_cpus": float,
    "num_gpus": float,
    "max_batch_size": int,
    "batch_wait_timeout_s": float,
    "max_ongoing_requests": int,
}


class AppConfigError(ValueError):
    """A ``serve run`` key or a ``surprise-serve`` flag the application cannot take."""


def build_app(
    argv: Sequence[str],
    *,
    max_batch_size: int = 16,
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S,
    **deployment_options: Any,
) -> Application:
    """The application: replicas of the monitored model (``argv``: ``surprise-serve``'s flags,
    checked here first) and the alarm log (``--alarm-log N``, ``--alarm-audit FILE``).

    ``max_batch_size`` requests are joined into one monitored call at most; a batch waits up to
    ``batch_wait_timeout_s`` for more (:data:`DEFAULT_BATCH_WAIT_S`). Serve forms the next batch
    as soon as a request arrives, even while the last one still runs, so with 0 only requests
    that arrive together are joined: at one input per request a replica then runs one input at
    a time (measured behind HAProxy, one core each: 0.82-0.92 of serve.py's throughput without
    the wait, 1.02-1.14 with 5 ms; bench/README.md). ``deployment_options`` go to Serve's
    ``deployment.options`` for the model replicas: ``num_replicas`` (default 1),
    ``ray_actor_options`` (default ``{"num_cpus": 1}``; ``num_gpus`` for a GPU),
    ``max_ongoing_requests`` (default 64), ``autoscaling_config``, ``logging_config``, ...
    ``serve.run(build_app([...]))`` starts it."""
    args = _checked(list(argv))
    options = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1},
               "max_ongoing_requests": 64, **deployment_options}  # fmt: skip
    replicas = options["num_replicas"]
    if (
        (isinstance(replicas, int) and replicas < 1)
        or max_batch_size < 1
        or batch_wait_timeout_s < 0
    ):
        raise AppConfigError(
            "num_replicas and max_batch_size must be >= 1 and batch_wait_timeout_s >= 0; got "
            f"{replicas}, {max_batch_size}, {batch_wait_timeout_s}"
        )
    options["ray_actor_options"] = dict(options["ray_actor_options"] or {"num_cpus": 1})
    log_app = None
    if args.alarm_log and not args.no_monitor:
        from surprise_monitor.serve.limits import MIB

        server = serve.deployment(AlarmLogServer, name="AlarmLog", num_replicas=1,
                                  ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256,
                                  health_check_period_s=2)  # fmt: skip
        log_app = server.bind(args.alarm_log, args.alarm_audit,
                              max(1, int(args.alarm_audit_max_mb * MIB)))  # fmt: skip
    model = MonitoredModel.options(**options)
    return model.bind(list(argv), log_app, max_batch_size, batch_wait_timeout_s)


def app_builder(config: Mapping[str, str]) -> Application:
    """``serve run surprise_monitor.integrations.ray_serve:app_builder key=value ...``."""
    options: dict[str, Any] = {}
    actor: dict[str, float] = {}
    argv: list[str] = []
    for key, raw in config.items():
        value = str(raw)
        if key in DEPLOYMENT_KEYS:
            try:
                typed = DEPLOYMENT_KEYS[key](value)
            except ValueError:
                raise AppConfigError(f"{key}={value!r} is not a number") from None
            (actor if key in ("num_cpus", "num_gpus") else options)[key] = typed
            continue
        flag = "--" + key.replace("_", "-")
        if value.lower() in ("true", ""):
            argv.append(flag)
        elif value.lower() != "false":
            argv += [flag, value]
    return build_app(argv, ray_actor_options=actor or None, **options)


def _checked(argv: list[str]) -> argparse.Namespace:
    """``surprise-serve``'s flags parsed and checked; :class:`AppConfigError` with argparse's
    or the check's own message (which names the flag)."""
    from surprise_monitor.serve import flags

    if "--write-config" in argv:
        raise AppConfigError("--write-config is surprise-serve's; run it there")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = flags.parser().parse_args(argv)
            flags.check_args(args)
    except SystemExit as exc:
        message = err.getvalue().strip().splitlines()[-1:] or [str(exc.code)]
        raise AppConfigError(message[0]) from None
    return args
