"""Requests per second that the service (``surprise-serve``) holds, with the monitor off, sync
and async, and the share of the inputs the async mode judges under sustained load.

Usage: ``python bench/load_serve.py [--model resnet18] [--size 64] [--requests 60 | --seconds S]
[--rounds 5] [--concurrency 4[,8]] [--modes off,sync,async]``.

Modes: ``off`` (``--no-monitor``), ``sync``, ``async`` (the default ``--judge-batch``) and
``asyncN`` (``--mode async --judge-batch N``; ``async1`` judges each queued request on its own).
Builds the torchvision model with random weights (10 classes) and a calibration table on
random images in a temporary folder, then starts one service per mode on free loopback ports.
The modes are measured in turn, in ``--rounds`` rounds (and per ``--concurrency``), so load that
drifts during the run hits every mode alike: each round sends single-image requests per mode
from the client threads, ``--requests`` of them or for ``--seconds`` seconds (sustained load),
after every service has judged what it queued. Per mode it reads the service's ``/metrics``:
the judged share (inputs monitored / inputs sent, once the queue drained; the rest were dropped
as ``queue_full``), inputs per judge call and the added latency the service measured. Prints
per-mode medians over the rounds (requests/s, client latency percentiles, judged share) as
JSON lines, then a table. Client and servers share this machine's cores. Bounded: every
request has a 60 s timeout and every server is stopped at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
import torchvision
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._serve_process import start_service, stop_process  # noqa: E402
from surprise_monitor.calibrate import calibrate  # noqa: E402
from surprise_monitor.calibrate.options import RunOptions  # noqa: E402

NS = "surprise_monitor_"
#: The service's counters read around each burst (name -> metric prefix).
COUNTERS = {
    "inputs": NS + "inputs_total",
    "monitored": NS + "inputs_monitored_total",
    "skipped": NS + "inputs_skipped_total",
    "dropped": NS + 'inputs_skipped_total{reason="queue_full"}',
    "calls": NS + "inspect_duration_seconds_count",
    "added_sum": NS + "added_latency_seconds_sum",
    "added_count": NS + "added_latency_seconds_count",
}


def prepare(folder: Path, name: str, size: int, classes: int) -> list[str]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=classes).eval()
    torch.save(model.state_dict(), folder / "model.pt")
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, size, size, generator=g), torch.arange(64) % classes)
    calibrate(model, data, progress=False, run=RunOptions(batch_size=16)).save(
        folder / "table.safetensors"
    )
    kwargs = json.dumps({"num_classes": classes})
    return ["--model", name, "--model-kwargs", kwargs, "--weights", str(folder / "model.pt"),
            "--table", str(folder / "table.safetensors")]  # fmt: skip


def mode_flags(mode: str) -> list[str]:
    """A mode's service flags: ``off``, ``sync``, ``async``, ``asyncN`` (judge batch N)."""
    if mode == "off":
        return ["--no-monitor"]
    if mode.startswith("async") and mode[5:].isdigit():
        return ["--mode", "async", "--judge-batch", mode[5:]]
    if mode in ("sync", "async"):
        return ["--mode", mode]
    raise SystemExit(f"unknown mode {mode!r}: off, sync, async or asyncN")


def burst(
    client: httpx.Client, url: str, body: str, concurrency: int, requests: int, seconds: float
) -> dict:
    """POSTs from ``concurrency`` threads, ``requests`` of them or (``seconds`` > 0) as many as
    they send in ``seconds``: requests sent, requests/s and latencies (ms)."""
    numbers = itertools.count()
    end = time.perf_counter() + seconds

    def worker(_: int) -> list[float]:
        lat = []
        while (time.perf_counter() < end) if seconds > 0 else (next(numbers) < requests):
            start = time.perf_counter()
            client.post(url + "/predict", content=body).raise_for_status()
            lat.append(time.perf_counter() - start)
        return lat

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        lat = sorted(itertools.chain.from_iterable(pool.map(worker, range(concurrency))))
    wall = time.perf_counter() - started
    return {
        "sent": len(lat),
        "requests_per_s": len(lat) / wall,
        "p50_ms": 1000 * statistics.median(lat),
        "p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))],
        "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
    }


def counters(client: httpx.Client, url: str) -> dict[str, float]:
    """The service's :data:`COUNTERS` (each summed over its series; absent: 0)."""
    lines = client.get(url + "/metrics").text.splitlines()
    return {
        key: sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))
        for key, prefix in COUNTERS.items()
    }


def drained(client: httpx.Client, url: str, timeout: float = 120.0) -> dict[str, float]:
    """Wait until every input the service counted is monitored or skipped (the async queue is
    empty and the worker idle); its counters then."""
    deadline = time.monotonic() + timeout
    while True:
        found = counters(client, url)
        if found["inputs"] == found["monitored"] + found["skipped"]:
            return found
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}: the async queue did not drain in {timeout} s")
        time.sleep(0.05)


def measure(
    client: httpx.Client, url: str, body: str, concurrency: int, requests: int, seconds: float
) -> dict:
    """One burst and what the service judged of it (counted once it has drained)."""
    before = drained(client, url)
    found = burst(client, url, body, concurrency, requests, seconds)
    after = drained(client, url)
    delta = {k: after[k] - before[k] for k in COUNTERS}
    if delta["inputs"]:  # the monitor is on
        found["judged_share"] = delta["monitored"] / delta["inputs"]
        found["dropped"] = delta["dropped"]
        found["inputs_per_call"] = delta["monitored"] / max(1.0, delta["calls"])
        found["added_ms"] = 1000 * delta["added_sum"] / max(1.0, delta["added_count"])
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--requests", type=int, default=60, help="requests per mode and round")
    p.add_argument(
        "--seconds", type=float, default=0.0, help="send for this long instead (sustained load)"
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--concurrency", default="4", help="client threads; several: 4,8")
    p.add_argument("--modes", default="off,sync,async")
    args = p.parse_args()
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    body = json.dumps({"inputs": x.tolist()})
    modes = args.modes.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    found: dict[tuple[int, str], list[dict]] = {(c, m): [] for c in levels for m in modes}
    with (
        tempfile.TemporaryDirectory() as tmp,
        httpx.Client(timeout=60, headers={"content-type": "application/json"}) as client,
    ):
        folder = Path(tmp)
        model_args = prepare(folder, args.model, args.size, args.classes)
        procs, urls = [], {}
        try:
            for mode in modes:
                proc, urls[mode] = start_service(
                    [*model_args, *mode_flags(mode)], folder / f"{mode}.log"
                )
                procs.append(proc)
            for mode in modes:  # warm-up
                burst(client, urls[mode], body, levels[0], 2 * levels[0], 0)
            for _ in range(args.rounds):
                for c in levels:
                    for mode in modes:
                        for url in urls.values():
                            drained(client, url)
                        found[(c, mode)].append(
                            measure(client, urls[mode], body, c, args.requests, args.seconds)
                        )
            rows = []
            for (c, mode), results in found.items():
                row: dict = {"concurrency": c, "mode": mode}
                row["sent"] = sum(r["sent"] for r in results)
                for key in results[0]:
                    if key != "sent":
                        row[key] = statistics.median(r[key] for r in results)
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            for proc in procs:
                stop_process(proc)
    load = f"{args.seconds:g} s" if args.seconds > 0 else f"{args.requests} requests"
    print(f"\n{args.model} {args.size}x{args.size}: medians of {args.rounds} rounds of {load} "
          f"per mode and client threads")  # fmt: skip
    for r in rows:
        line = (f"{r['concurrency']:>2} threads {r['mode']:>7}: {r['requests_per_s']:6.1f} req/s  "
                f"p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms")  # fmt: skip
        if "judged_share" in r:
            line += (f"  judged {100 * r['judged_share']:5.1f}% of {r['sent']}  "
                     f"{r['inputs_per_call']:4.1f} inputs/call")  # fmt: skip
        print(line)


if __name__ == "__main__":
    main()
