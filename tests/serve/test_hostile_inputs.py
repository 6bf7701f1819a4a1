"""Hostile and malformed requests against a running service, as a table
(:mod:`bench.hostile_requests`): every case the hardening probes found (a 500, or a 200 with a
made-up answer) and every case that already held is answered with its 4xx naming the problem;
none answers 500, and the service keeps serving."""

from __future__ import annotations

import httpx
import pytest

from bench._serve_process import start_service, stop_process
from bench.hostile_requests import CASES, X2, image_ready_table
from surprise_monitor.monitor.table import CalibrationTable


@pytest.fixture(scope="module")
def service(saved_tiny_model, tmp_path_factory):
    _, table, args = saved_tiny_model
    folder = tmp_path_factory.mktemp("hostile")
    table = image_ready_table(CalibrationTable.load(args[args.index("--table") + 1]))
    args = [*args[: args.index("--table")], "--table", str(table.save(folder / "t.safetensors"))]
    proc, url = start_service([*args, "--alarm-audit", str(folder / "audit.jsonl")],
                              folder / "serve.log")  # fmt: skip
    try:
        yield url, table
    finally:
        stop_process(proc)


@pytest.mark.parametrize("case", list(CASES))
def test_each_bad_request_gets_its_4xx_naming_the_problem(service, case):
    url, _ = service
    send, status, phrase = CASES[case]
    resp = send(url)
    assert resp.status_code == status, resp.text[:300]
    assert phrase in resp.text, resp.text[:300]
    assert httpx.get(url + "/healthz", timeout=5).status_code == 200


def test_good_requests_are_still_answered_and_judged(service):
    url, table = service
    body = httpx.post(url + "/predict", timeout=30,
                      json={"inputs": X2, "labels": [0, table.class_names[2]]}).json()  # fmt: skip
    assert len(body["predictions"]) == 2 and all(s is not None for s in body["score"])
    digits = httpx.post(url + "/predict", json={"inputs": X2, "labels": ["1", "2"]}, timeout=30)
    assert digits.status_code == 200
