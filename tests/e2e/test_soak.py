"""The soak of the hardening probes (``bench/soak_serve.py``), shortened: three runs of the service
on one audit file under normal, hostile and slow traffic, two ended by SIGKILL and the last by
SIGTERM with a slow client attached. No 500, /healthz always answered, every slow client cut,
audit ids unique across the restarts, every acknowledged alarm audited once, and the exit within
the shutdown bound."""

from __future__ import annotations

import json

import pytest

from bench import soak_serve


@pytest.mark.slow
def test_the_service_survives_the_probes_restarts_and_exits_in_time(capsys, tmp_path):
    code = soak_serve.main(["--runs", "3", "--seconds", "6", "--folder", str(tmp_path)])
    summary = json.loads(capsys.readouterr().out)
    assert summary["problems"] == [] and code == 0
    assert summary["audit_records"] == summary["unique_ids"] >= summary["alarms_acknowledged"] > 0
    assert all(r["statuses"].get("500", 0) == 0 for r in summary["runs"])
    assert summary["runs"][-1]["exit_after_sigterm_s"] <= 2 + 1
