"""The service (``python -m surprise_monitor.serve``) driven over loopback: predictions, surprise
summaries, /metrics, errors."""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from bench._serve_process import start_service, stop_process
from surprise_monitor.monitor import SurpriseMonitor, Thresholds
from tests._models import mixed_inputs


def metric_values(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


@pytest.fixture(scope="module")
def service(saved_tiny_model, tmp_path_factory):
    model, table, args = saved_tiny_model
    proc, url = start_service(args, tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        yield model, table, url
    finally:
        stop_process(proc)


def test_predictions_and_surprise_summaries(service):
    model, table, url = service
    x = mixed_inputs(8)
    resp = httpx.post(url + "/predict", json={"inputs": x.tolist(), "surprise": True}, timeout=30)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    with torch.no_grad():
        logits = model(x)
    assert body["predictions"] == logits.argmax(1).tolist()
    assert body["classes"] == [table.class_names[p] for p in body["predictions"]]
    torch.testing.assert_close(torch.tensor(body["logits"]), logits, rtol=1e-5, atol=1e-5)
    with SurpriseMonitor(model, table) as local:
        expected = local.inspect(x)
    assert len(body["surprise"]) == 8
    for i, summary in enumerate(body["surprise"]):
        want = expected.sample(i, max_filters=5)
        assert summary["class"] == want["class"] and summary["low_beta"] == want["low_beta"]
        assert summary["beta"] == pytest.approx(want["beta"], rel=1e-5, abs=1e-7)
        assert summary["surprise_count"] == want["surprise_count"]
        assert [f["filter"] for f in summary["surprising_filters"]] == [
            f["filter"] for f in want["surprising_filters"]
        ]
    assert any(s["low_beta"] for s in body["surprise"])  # the blanked rows
    for key in ("score", "p_value", "alarm"):  # per input, as the report has them
        want = getattr(expected, key).tolist()
        assert [s[key] for s in body["surprise"]] == pytest.approx(want, rel=1e-5)
        assert body[key] == pytest.approx(want, rel=1e-5)
    assert any(body["alarm"]) and not all(body["alarm"])
    plain = httpx.post(url + "/predict", json={"inputs": x[:2].tolist()}, timeout=30).json()
    assert plain["surprise"] is None
    labelled = httpx.post(
        url + "/predict", json={"inputs": x[:3].tolist(), "labels": [2, 2, 2], "surprise": True},
        timeout=30,
    ).json()  # fmt: skip
    assert [s["class"] for s in labelled["surprise"]] == [2, 2, 2]
    assert all(s["label_given"] for s in labelled["surprise"])


def test_bad_requests_get_clear_errors_and_the_service_survives(service):
    _, _, url = service
    before = metric_values(url)
    nan = mixed_inputs(2)
    nan[0, 0, 0, 0] = float("nan")
    resp = httpx.post(  # Python's json writes NaN as a literal, which the server accepts
        url + "/predict", content=json.dumps({"inputs": nan.tolist(), "surprise": True}),
        headers={"content-type": "application/json"}, timeout=30,
    )  # fmt: skip
    assert resp.status_code == 422 and "inputs 0 hold NaN or Inf values (1 of 2)" in resp.text
    ragged = httpx.post(url + "/predict", json={"inputs": [[1.0, 2.0], [3.0]]}, timeout=30)
    assert ragged.status_code == 422 and "rectangular" in ragged.text
    flat = httpx.post(url + "/predict", json={"inputs": [1.0, 2.0]}, timeout=30)
    assert flat.status_code == 422 and "B x C x H x W" in flat.text
    one = mixed_inputs(1)
    channels = httpx.post(url + "/predict", json={"inputs": one[:, :1].tolist()}, timeout=30)
    assert channels.status_code == 422  # refused before the model runs
    assert "C x H x W = [3, 8, 8]" in channels.text and "got [1, 8, 8]" in channels.text
    label = httpx.post(
        url + "/predict", json={"inputs": one.tolist(), "labels": [7], "surprise": True},
        timeout=30,
    )  # fmt: skip
    assert label.status_code == 422 and "label 7 is not a class" in label.text
    assert httpx.get(url + "/healthz", timeout=5).json() == {"status": "ok", "monitor": "sync"}
    after = metric_values(url)  # refused before the monitor: no input counted
    for key in ("surprise_monitor_inputs_total", "surprise_monitor_failures_total"):
        assert sum(v for (n, _), v in after.items() if n == key) == sum(
            v for (n, _), v in before.items() if n == key
        )


def test_concurrent_requests_add_up_in_metrics(service):
    model, table, url = service
    before = metric_values(url)
    batches = [mixed_inputs(1 + i % 3) for i in range(24)]
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(
            lambda x: client.post(url + "/predict", json={"inputs": x.tolist()}), batches
        ))  # fmt: skip
    assert all(a.status_code == 200 for a in answers)
    with torch.no_grad():
        for a, x in zip(answers, batches, strict=True):
            assert a.json()["predictions"] == model(x).argmax(1).tolist()
    after = metric_values(url)
    sent = sum(len(x) for x in batches)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("surprise_monitor_inputs_total") == sent
    assert delta("surprise_monitor_inputs_monitored_total") == sent
    with SurpriseMonitor(model, table) as local:
        low = sum(int(local.inspect(x).low_beta.sum()) for x in batches)
    assert delta("surprise_monitor_inputs_flagged_total", kind="low_beta") == low > 0
    assert not math.isnan(after[("surprise_monitor_added_latency_seconds_sum", ())])


def test_unmonitored_and_async_services(saved_tiny_model, tmp_path):
    model, _, args = saved_tiny_model
    x = mixed_inputs(4)
    proc, url = start_service([*args, "--mode", "async", "--sample-every", "2"],
                              tmp_path / "async.log")  # fmt: skip
    try:
        body = httpx.post(url + "/predict", json={"inputs": x.tolist(), "surprise": True},
                          timeout=30).json()  # fmt: skip
        with torch.no_grad():
            assert body["predictions"] == model(x).argmax(1).tolist()
        assert body["surprise"] == [None] * 4  # judged off the request path
        deadline = time.monotonic() + 30
        while metric_values(url).get(("surprise_monitor_inputs_monitored_total", ())) != 2.0:
            assert time.monotonic() < deadline, "the async worker did not judge the inputs"
            time.sleep(0.2)
    finally:
        stop_process(proc)
    proc, url = start_service([*args, "--no-monitor"], tmp_path / "plain.log")
    try:
        assert httpx.get(url + "/healthz", timeout=5).json()["monitor"] == "off"
        body = httpx.post(url + "/predict", json={"inputs": x.tolist()}, timeout=30).json()
        with torch.no_grad():
            assert body["predictions"] == model(x).argmax(1).tolist()
        assert "surprise_monitor_inputs_total" not in httpx.get(url + "/metrics").text
    finally:
        stop_process(proc)


def test_request_limits(service):
    _, _, url = service
    big = torch.zeros(1, 3, 1500, 1500)  # 53 MB of JSON, as in the issue: never read whole
    body = json.dumps({"inputs": big.tolist()}).encode()
    resp = httpx.post(url + "/predict", content=body, timeout=60,
                      headers={"content-type": "application/json"})  # fmt: skip
    assert resp.status_code == 413 and "--max-body-mb" in resp.text

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b" " * (1 << 20)

    resp = httpx.post(url + "/predict", content=chunks(), timeout=60)
    assert resp.status_code == 413
    wrong = httpx.post(url + "/predict", json={"inputs": mixed_inputs(1)[..., :6].tolist()})
    assert wrong.status_code == 422 and "[3, 8, 8]" in wrong.text
    many = httpx.post(url + "/predict", json={"inputs": torch.zeros(65, 3, 8, 8).tolist()},
                      timeout=30)  # fmt: skip
    assert many.status_code == 413 and "--max-batch" in many.text
    assert httpx.get(url + "/healthz", timeout=5).status_code == 200  # still serving


def test_image_uploads_use_the_tables_preprocessing(saved_tiny_model, tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from surprise_monitor.calibrate import CalibrationTable

    model, _, args = saved_tiny_model
    table_path = args[args.index("--table") + 1]
    table = CalibrationTable.load(table_path)
    table.data_source = {
        "kind": "imagefolder",
        "root": "/nowhere",
        "resize": 0,
        "crop": 0,
        "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.25, 0.3],
        "grayscale": False,
    }
    table.class_names = ["cat", "dog", "bird"]
    named = table.save(tmp_path / "named.safetensors")
    served = [*args[: args.index("--table")], "--table", str(named),
              "--metrics-label", "model=tiny"]  # fmt: skip
    proc, url = start_service(served, tmp_path / "serve.log")
    try:
        pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        png = io.BytesIO()
        Image.fromarray(pixels).save(png, format="PNG")
        resp = httpx.post(url + "/predict/image?surprise=true&label=dog", content=png.getvalue(),
                          headers={"content-type": "image/png"}, timeout=30)  # fmt: skip
        assert resp.status_code == 200, resp.text
        body = resp.json()
        x = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0)[None]
        x = (x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
            [0.2, 0.25, 0.3]
        ).view(1, 3, 1, 1)
        with torch.no_grad():
            logits = model(x)
        torch.testing.assert_close(torch.tensor(body["logits"]), logits, rtol=1e-4, atol=1e-4)
        assert body["classes"] == [["cat", "dog", "bird"][int(logits.argmax())]]
        assert body["surprise"][0]["class"] == 1 and body["surprise"][0]["label_given"]
        jpeg = io.BytesIO()
        Image.fromarray(np.repeat(np.repeat(pixels, 5, 0), 5, 1)).save(jpeg, format="JPEG")
        resp = httpx.post(url + "/predict/image", content=jpeg.getvalue(),
                          headers={"content-type": "image/jpeg"}, timeout=30)  # fmt: skip
        assert resp.status_code == 200 and len(resp.json()["predictions"]) == 1  # resized
        bad = httpx.post(url + "/predict/image", content=b"not an image",
                         headers={"content-type": "image/png"}, timeout=30)  # fmt: skip
        assert bad.status_code == 422 and "not a readable" in bad.text
        label = httpx.post(url + "/predict/image?label=birb", content=png.getvalue(),
                           headers={"content-type": "image/png"}, timeout=30)  # fmt: skip
        assert label.status_code == 422 and "cat, dog, bird" in label.text
        named_rows = httpx.post(url + "/predict", json={"inputs": x.tolist(), "labels": ["bird"],
                                                        "surprise": True}).json()  # fmt: skip
        assert named_rows["surprise"][0]["class"] == 2
        values = metric_values(url)
        assert values[("surprise_monitor_inputs_total", (("model", "tiny"),))] == 3
    finally:
        stop_process(proc)


def test_alarm_rate_option(saved_tiny_model, tmp_path):
    """--alarm-rate sets the alarm threshold and the nominal-rate gauge; bad values are named."""
    model, table, args = saved_tiny_model
    x = mixed_inputs(12)
    proc, url = start_service([*args, "--alarm-rate", "0.2", "--metrics-window", "5"],
                              tmp_path / "rate.log")  # fmt: skip
    try:
        started = (tmp_path / "rate.log").read_text()  # stderr, INFO shown by default
        assert f"surprise-serve: serving {url} on cpu; model tests._models:TinyCNN" in started
        null = "held-out null of 2000 images, table not authenticated (no --table-key)"
        assert f"{null}; monitor sync, alarm rate 0.2" in started
        body = httpx.post(url + "/predict", json={"inputs": x.tolist()}, timeout=30).json()
        with SurpriseMonitor(model, table, thresholds=Thresholds(alarm_rate=0.2)) as local:
            expected = local.inspect(x)
        assert body["alarm"] == expected.alarm.tolist()
        assert body["alarm"] == [p <= 0.2 for p in body["p_value"]]
        values = metric_values(url)
        assert values[("surprise_monitor_alarm_rate_nominal", ())] == 0.2
        assert values[("surprise_monitor_window_size", ())] == 5
        alarmed = values[("surprise_monitor_inputs_alarmed_total", ())]
        assert alarmed == sum(body["alarm"]) > 0
    finally:
        stop_process(proc)
    for flag, value in (("--alarm-rate", "1.5"), ("--metrics-window", "0")):
        with pytest.raises(RuntimeError, match=flag):
            start_service([*args, flag, value], tmp_path / "bad.log", timeout=30)
