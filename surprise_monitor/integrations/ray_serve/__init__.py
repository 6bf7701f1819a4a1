"""Serving at scale on Ray Serve (``pip install surprise-monitor[ray]``).

- :func:`build_app` / :func:`app_builder` (:mod:`.app`): the application (model replicas, each
  with its own ``SurpriseMonitor``; one alarm log), started with ``serve.run(app)`` or
  ``serve run surprise_monitor.integrations.ray_serve:app_builder key=value ...``.
- :class:`~.metrics.RayMetricsRegistry`: the monitor's metrics through Ray's metrics API.
- :mod:`.alarms`: the application's one alarm log and the replicas' senders.
- The alert rules for Ray's names and labels: ``surprise-serve --write-config DIR`` writes
  ``DIR/alerts-ray.yml`` (:mod:`surprise_monitor.serve.ray_rules`).

Only :mod:`.app` and :mod:`.deployment` import Ray; they load on first use of their names here.
"""

from __future__ import annotations

from typing import Any

_LAZY = {"build_app": "app", "app_builder": "app", "AppConfigError": "app",
         "DEPLOYMENT_KEYS": "app", "MonitoredModel": "deployment",
         "RayMetricsRegistry": "metrics"}  # fmt: skip
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    try:
        module = import_module(f"{__name__}.{_LAZY[name]}")
    except ImportError as exc:
        if exc.name is None or not exc.name.startswith("ray"):
            raise
        raise ImportError(
            f"{name} needs Ray Serve: pip install 'surprise-monitor[ray]' ({exc})"
        ) from exc
    return getattr(module, name)
