"""The alert rules for a monitored Ray Serve application, made from the single-service rules.

``serve/config/alerts.yml`` reads the names a ``surprise-serve`` process exports. On Ray Serve
(:mod:`surprise_monitor.integrations.ray_serve`) the same metrics reach Prometheus through Ray's
metrics endpoint: named with a ``ray_`` prefix and labelled per process by Ray (``replica``,
``WorkerId``, ``NodeAddress``, ...). :func:`ray_rules` rewrites the shipped rules for that:

- every metric name gets the ``ray_`` prefix (recording rules keep their names);
- every ratio and count sums over Ray's per-process labels as well as ``instance``: the alarm
  rate is the application's pooled rate, sum of alarmed over sum of judged across replicas, and
  the binomial count m is the replicas' total; the nominal rate and the null's size come from any
  replica (``max`` / ``min``: replicas serve one table);
- the drift alert stays per replica: each replica's window holds its own last ``window``
  p-values, a sample of the traffic the load balancer sent it, and its KS distance is tested
  against its own m (the alert's labels name the replica). With N replicas the chance that some
  replica's window crosses on normal traffic is at most N x 0.001;
- one more recording rule pools the windows' alarm rates:
  ``sum(window_alarm_rate * window_size) / sum(window_size)``.

The shipped ``serve/config/alerts-ray.yml`` is ``ray_rules(alerts.yml)`` (a test keeps them in
step); ``surprise-serve --write-config DIR`` writes both.
"""

from __future__ import annotations

import re

#: The labels Ray's metrics agent puts on each process's series (and Serve's replica tag).
RAY_PROCESS_LABELS = (
    "replica", "WorkerId", "Component", "NodeAddress", "SessionName", "Version",
    "otel_scope_name", "otel_scope_schema_url", "otel_scope_version",
)  # fmt: skip
PREFIX = "ray_"

_HEADER = """\
# Prometheus rules for the surprise monitor on Ray Serve: the rules of alerts.yml for the names
# and labels Ray's metrics endpoint exports (made by surprise_monitor/serve/ray_rules.py from
# alerts.yml; do not edit by hand: a test checks they are in step).
#
# What differs from alerts.yml:
# - metric names carry Ray's prefix: ray_surprise_monitor_*;
# - ratios and counts sum over Ray's per-process labels (replica, WorkerId, NodeAddress, ...):
#   the alarm rate is the application's pooled rate (sum of alarmed / sum of judged over the
#   replicas) and m is the replicas' total; the nominal rate and null size come from any replica;
# - the drift alert is per replica (each replica's window and its own m; with N replicas normal
#   traffic crosses somewhere with probability at most N x 0.001);
# - surprise_monitor:window_alarm_rate:pooled pools the replicas' windows.
#
# Scrape Ray's metrics endpoint (every node's metrics agent; Ray writes a service-discovery file,
# /tmp/ray/prom_metrics_service_discovery.json, for file_sd_configs). Check with
#   promtool check rules alerts-ray.yml
"""

_POOLED = """
      # The replicas' sliding windows pooled: the alarm rate over their last p-values.
      - record: surprise_monitor:window_alarm_rate:pooled
        expr: |
          sum without ({labels}) (
            {p}surprise_monitor_window_alarm_rate * {p}surprise_monitor_window_size
          )
          /
          sum without ({labels}) ({p}surprise_monitor_window_size)
"""


def ray_rules(text: str) -> str:
    """``alerts.yml``'s rules rewritten for Ray Serve's names and labels (see the module)."""
    body = text[text.index("groups:") :]
    labels = ", ".join(("instance", *RAY_PROCESS_LABELS))
    body = re.sub(r"(?<![\w:])surprise_monitor_(?=[a-z])", PREFIX + "surprise_monitor_", body)
    body, sums = re.subn(r"without \(instance", "without (" + labels, body)
    body = body.replace("name: surprise-monitor\n", "name: surprise-monitor-ray\n", 1)
    body = body.replace("{{ $labels.job }}", "{{ $labels.application }}/{{ $labels.deployment }}")
    drift = "/{{ $labels.deployment }}: the inputs' p-values drift"
    found = drift in body
    body = body.replace(drift, "/{{ $labels.deployment }} replica {{ $labels.replica }}: the "
                        "inputs' p-values drift")  # fmt: skip
    anchor = "      # --- the per-filter explanation and failures"
    pooled = _POOLED.format(labels=labels, p=PREFIX).lstrip("\n")
    if sums < 5 or anchor not in body or not found:
        raise ValueError("alerts.yml changed shape; update surprise_monitor/serve/ray_rules.py")
    body = body.replace(anchor, pooled + "\n" + anchor, 1)
    return _HEADER + body
