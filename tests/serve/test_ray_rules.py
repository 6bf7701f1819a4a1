"""The Ray Serve variant of the alert rules: in step with alerts.yml, Ray's names, pooled sums."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from surprise_monitor.serve.config_files import config_bytes
from surprise_monitor.serve.ray_rules import RAY_PROCESS_LABELS, ray_rules


def test_the_shipped_ray_rules_are_made_from_the_shipped_rules():
    made = ray_rules(config_bytes("alerts.yml").decode())
    assert config_bytes("alerts-ray.yml").decode() == made, (
        'regenerate: python -c "from surprise_monitor.serve.ray_rules import ray_rules; ..."'
    )


def test_every_metric_has_rays_prefix_and_every_sum_pools_the_replicas():
    rules = config_bytes("alerts-ray.yml").decode()
    body = rules[rules.index("groups:") :]
    names = set(re.findall(r"\b(\w*surprise_monitor_\w+)", body))
    assert names and all(n.startswith("ray_surprise_monitor_") for n in names), names
    aggregations = re.findall(r"(?:sum|max|min) without \(([^)]*)\)", body)
    assert len(aggregations) >= 10
    for labels in aggregations:
        assert set(RAY_PROCESS_LABELS) | {"instance"} <= {s.strip() for s in labels.split(",")}
    drift = body[body.index("alert: SurpriseMonitorPValueDrift") :].split("- alert:")[0]
    assert "without" not in drift and "$labels.replica" in drift  # per replica
    assert "surprise_monitor:window_alarm_rate:pooled" in body


def test_a_changed_alerts_file_is_refused_not_silently_misread():
    with pytest.raises(ValueError, match="changed shape"):
        ray_rules("groups:\n  - name: surprise-monitor\n    rules: []\n")


@pytest.mark.prometheus
@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is missing")
def test_promtool_accepts_the_ray_rules(tmp_path):
    path = tmp_path / "alerts-ray.yml"
    path.write_bytes(config_bytes("alerts-ray.yml"))
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0 and "SUCCESS: 14 rules found" in out.stdout, out.stdout + out.stderr
