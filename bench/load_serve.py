"""Requests per second that the service (``surprise-serve``) holds, with the monitor off, sync
and async.

Usage: ``python bench/load_serve.py [--model resnet18] [--size 64] [--requests 60]
[--rounds 5] [--concurrency 4] [--modes off,sync,async]``.

Builds the torchvision model with random weights (10 classes) and a calibration table on
random images in a temporary folder, then starts one service per mode on free loopback ports.
The modes are measured in turn, in ``--rounds`` rounds, so load that drifts during the run hits
every mode alike: each round sends ``--requests`` single-image requests per mode from
``--concurrency`` client threads, after every async queue has drained. Prints per-mode medians
over the rounds (requests/s, latency percentiles) and the inputs the async queue dropped, as
JSON lines, then a table. Client and servers share this machine's cores. Bounded: every
request has a 60 s timeout and every server is stopped at the end.
"""

from __future__ import annotations

import argparse
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


def burst(client: httpx.Client, url: str, body: str, requests: int, concurrency: int) -> dict:
    """``requests`` POSTs from ``concurrency`` threads: requests/s and latencies (ms)."""

    def one(_: int) -> float:
        start = time.perf_counter()
        client.post(url + "/predict", content=body).raise_for_status()
        return time.perf_counter() - start

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        lat = sorted(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    return {
        "requests_per_s": requests / wall,
        "p50_ms": 1000 * statistics.median(lat),
        "p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))],
    }


def metric(client: httpx.Client, url: str, prefix: str) -> float:
    text = client.get(url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix))  # fmt: skip


def drained(client: httpx.Client, url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(client, url, "surprise_monitor_queue_depth") > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}: the async queue did not drain in {timeout} s")
        time.sleep(0.05)
    time.sleep(0.2)  # the batch the worker holds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--requests", type=int, default=60, help="requests per mode and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--modes", default="off,sync,async")
    args = p.parse_args()
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    body = json.dumps({"inputs": x.tolist()})
    modes = args.modes.split(",")
    found: dict[str, list[dict]] = {m: [] for m in modes}
    with (
        tempfile.TemporaryDirectory() as tmp,
        httpx.Client(timeout=60, headers={"content-type": "application/json"}) as client,
    ):
        folder = Path(tmp)
        model_args = prepare(folder, args.model, args.size, args.classes)
        procs, urls = [], {}
        try:
            for mode in modes:
                extra = ["--no-monitor"] if mode == "off" else ["--mode", mode]
                proc, urls[mode] = start_service([*model_args, *extra], folder / f"{mode}.log")
                procs.append(proc)
            for mode in modes:  # warm-up
                burst(client, urls[mode], body, 2 * args.concurrency, args.concurrency)
            for _ in range(args.rounds):
                for mode in modes:
                    for url in urls.values():
                        drained(client, url)
                    found[mode].append(
                        burst(client, urls[mode], body, args.requests, args.concurrency)
                    )
            rows = []
            for mode in modes:
                row = {"mode": mode}
                for key in ("requests_per_s", "p50_ms", "p95_ms"):
                    row[key] = statistics.median(r[key] for r in found[mode])
                row["dropped_inputs"] = metric(
                    client, urls[mode], 'surprise_monitor_inputs_skipped_total{reason="queue_full"}'
                )
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            for proc in procs:
                stop_process(proc)
    base = rows[0]["requests_per_s"] if rows and rows[0]["mode"] == "off" else None
    print(f"\n{args.model} {args.size}x{args.size}: medians of {args.rounds} rounds of "
          f"{args.requests} requests, {args.concurrency} client threads")  # fmt: skip
    for r in rows:
        ratio = f"  x{r['requests_per_s'] / base:.2f} of off" if base else ""
        print(f"{r['mode']:>6}: {r['requests_per_s']:7.1f} req/s  p50 {r['p50_ms']:7.1f} ms  "
              f"p95 {r['p95_ms']:7.1f} ms  dropped {r['dropped_inputs']:.0f}{ratio}")  # fmt: skip


if __name__ == "__main__":
    main()
