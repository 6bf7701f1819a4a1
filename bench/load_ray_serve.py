"""Throughput of the monitored Ray Serve application against the single-process service
(``surprise-serve``), monitor off and on, per replica.

Usage: ``python bench/load_ray_serve.py [--model resnet18] [--size 32] [--seconds 10]
[--rounds 3] [--concurrency 4] [--batches 1,16] [--replicas 1,2] [--max-batch-size 16]
[--batch-wait-timeout-s 0.005]
[--replica-cpus 1] [--threads 0] [--ingress proxy|haproxy] [--out FILE]``.

Builds the torchvision model with random weights (10 classes) and a calibration table on random
images in a temporary folder (:func:`bench.load_serve.prepare`). Configurations: ``serve.py``
monitor off (``--no-monitor``) and on (the default sync mode), one process each on a free loopback
port; and the Ray Serve application (:func:`surprise_monitor.integrations.ray_serve.build_app`, same
flags) with each of ``--replicas`` replicas (``--replica-cpus`` CPUs each, Serve's ``@serve.batch``
joining up to ``--max-batch-size`` requests), monitor off and on, on a local Ray cluster of 2 CPUs
behind Serve's HTTP proxy; one Ray application at a time, deployed again for each configuration and
round. Each configuration is warmed up with a few requests per request size before timing. For each
request size in ``--batches`` (inputs per ``POST /predict``), ``--concurrency`` closed-loop client
threads send for ``--seconds``; the configurations are measured in turn in ``--rounds`` rounds, so
load that drifts during the run hits all alike. Measured per cell: requests/s, inputs/s, inputs/s
per replica, p50 and p99 client latency, and the CPU time per input of the serving processes
(serve.py's process; the Ray replicas) and of Ray's ingress (Serve's proxy actor, or HAProxy with
``--ingress haproxy``, Serve's ``RAY_SERVE_ENABLE_HA_PROXY``), read from ``/proc`` around each
burst: inputs per serving CPU-second is what a replica delivers when it has its cores to itself,
which a 2-core machine cannot give it. Prints a JSON line per cell and round, then a markdown table
of medians over the rounds with each Ray row's ratio to serve.py's row of the same monitor setting
and request size (the median of the per-round ratios), of the whole application, per replica and per
serving CPU-second; the acceptance criterion is a monitored per-replica ratio of at least 0.9.
``--out FILE`` writes every cell and row as JSON. ``--pin`` (one replica) gives serve.py and the
replica one core each, the same core, and puts the client, Ray's processes and the ingress on the
other: wall-clock throughput per replica against serve.py's on equal CPU.
``--throughput-optimized`` starts Ray in its high-throughput mode
(``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``; with ``--ingress haproxy`` what Ray's documentation
recommends for high request rates; measured here, not supported by the application: see the
README).

Client, serve.py, Ray's processes (GCS, raylet, Serve's controller and proxy) and the replicas
all share this machine's cores, so on a 2-core machine two replicas cannot show two cores' worth
of throughput; and torch's threads differ unless ``--threads`` sets them (Ray sets a replica's
``OMP_NUM_THREADS`` to its ``num_cpus``; serve.py uses torch's default). Bounded: every request
has a 60 s timeout, a deployment that cannot fit the cluster is refused up front, and every
service, the Serve application and Ray are stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._serve_process import free_port, start_service, stop_process  # noqa: E402
from bench.load_serve import burst, prepare  # noqa: E402
from surprise_monitor.integrations.ray_serve.batching import DEFAULT_BATCH_WAIT_S  # noqa: E402

#: CPUs of the local Ray cluster.
RAY_CPUS = 2
#: Seconds a Ray application has to answer /healthz through the proxy once deployed.
READY_TIMEOUT = 120.0


@dataclass(frozen=True)
class Config:
    server: str  # "serve.py" or "ray"
    replicas: int
    monitor: bool

    @property
    def name(self) -> str:
        mon = "on" if self.monitor else "off"
        if self.server == "ray":
            return f"ray x{self.replicas} monitor {mon}"
        return f"serve.py monitor {mon}"


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def wait_ready(client: httpx.Client, url: str, timeout: float = READY_TIMEOUT) -> None:
    """Wait until ``url``/healthz answers 200 (Serve's proxy routes to the application)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.get(url + "/healthz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url}: no healthy answer within {timeout} s")


#: Process titles (``/proc/PID/cmdline``) of the Ray processes that serve: the replicas, and
#: the ingress (Serve's proxy actor, or HAProxy with ``--ingress haproxy``).
REPLICA_TITLE = "ServeReplica:default:MonitoredModel"
INGRESS_TITLES = ("ProxyActor", "haproxy")


def pids_titled(*titles: str) -> list[int]:
    """The processes whose command line contains one of ``titles``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if any(t in cmdline for t in titles) and "load_ray_serve" not in cmdline:
                found.append(int(entry.name))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used (threads included)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


#: The core of the serving process (serve.py's, or the replica's) under ``--pin``.
SERVING_CORE = 1


def pin_tasks(pids: list[int], core: int) -> None:
    """Every thread of the processes onto ``core`` (threads started later inherit it)."""
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                os.sched_setaffinity(int(task.name), {core})
            except OSError:
                pass  # a thread that ended meanwhile


def measure(
    client: httpx.Client, url: str, body: str, batch: int, concurrency: int, seconds: float,
    server: list[int], ingress: list[int],
) -> dict:  # fmt: skip
    """One timed burst: throughput, latencies, and the CPU seconds the serving processes
    (``server``) and the ingress (``ingress``) used per input."""
    before = cpu_seconds(server), cpu_seconds(ingress)
    found = burst(client, url, body, concurrency, 0, seconds)
    server_s, ingress_s = cpu_seconds(server) - before[0], cpu_seconds(ingress) - before[1]
    inputs = batch * found["sent"]
    found["inputs_per_s"] = batch * found["requests_per_s"]
    found["server_cpu_ms_per_input"] = 1000 * server_s / inputs
    found["ingress_cpu_ms_per_input"] = 1000 * ingress_s / inputs
    found["inputs_per_server_cpu_s"] = inputs / server_s if server_s > 0 else float("nan")
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seconds", type=float, default=10.0, help="sending time per cell and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=4, help="closed-loop client threads")
    p.add_argument("--batches", default="1,16", help="inputs per request")
    p.add_argument("--replicas", default="1,2", help="Ray Serve replica counts")
    p.add_argument("--max-batch-size", type=int, default=16, help="Serve's @serve.batch size")
    p.add_argument("--batch-wait-timeout-s", type=float, default=DEFAULT_BATCH_WAIT_S,
                   help="how long a Serve batch waits for more requests")  # fmt: skip
    p.add_argument("--replica-cpus", type=float, default=1.0, help="num_cpus per Ray replica")
    p.add_argument(
        "--threads", type=int, default=0, help="surprise-serve --threads for both (0: default)"
    )
    p.add_argument(
        "--ingress", choices=("proxy", "haproxy"), default="proxy",
        help="Serve's HTTP ingress: its Python proxy, or HAProxy (RAY_SERVE_ENABLE_HA_PROXY=1)",
    )  # fmt: skip
    p.add_argument(
        "--throughput-optimized", action="store_true",
        help="Ray's high-throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1)",
    )  # fmt: skip
    p.add_argument(
        "--pin", action="store_true",
        help="one core each: serve.py and the replica on core 1, everything else on core 0",
    )  # fmt: skip
    p.add_argument("--out", type=Path, help="write the result JSON here")
    args = p.parse_args()
    batches, replica_counts = ints(args.batches), ints(args.replicas)
    if args.seconds <= 0 or args.rounds < 1 or args.concurrency < 1 or not batches:
        raise SystemExit("--seconds, --rounds, --concurrency and --batches must be positive")
    for n in replica_counts:
        if n < 1 or n * args.replica_cpus > RAY_CPUS:
            raise SystemExit(
                f"{n} replicas x {args.replica_cpus} CPUs do not fit Ray's {RAY_CPUS} CPUs"
            )
    if args.pin and (replica_counts != [1] or (os.cpu_count() or 1) < 2):
        raise SystemExit("--pin measures one replica against serve.py: --replicas 1, 2+ cores")
    if args.pin:
        os.sched_setaffinity(0, {0})  # this process and all it starts: core 0
    configs = [Config("serve.py", 1, False), Config("serve.py", 1, True)]
    configs += [Config("ray", n, m) for n in replica_counts for m in (False, True)]
    bodies = {}
    for b in batches:
        x = torch.randn(b, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
        bodies[b] = json.dumps({"inputs": x.tolist()})
    extra = ["--threads", str(args.threads)] if args.threads else []

    cells: list[dict] = []
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        client = stack.enter_context(
            httpx.Client(timeout=60, headers={"content-type": "application/json"})
        )
        folder = Path(tmp)
        model_args = [*prepare(folder, args.model, args.size, args.classes), *extra]
        urls: dict[bool, str] = {}
        serve_pids: dict[bool, int] = {}
        for monitor in (False, True):
            flags = model_args if monitor else [*model_args, "--no-monitor"]
            proc, urls[monitor] = start_service(flags, folder / f"serve-{monitor}.log")
            serve_pids[monitor] = proc.pid
            if args.pin:
                pin_tasks([proc.pid], SERVING_CORE)
            stack.callback(stop_process, proc)

        import ray
        from ray import serve

        from surprise_monitor.integrations.ray_serve import build_app

        os.environ["PYTHONPATH"] = os.pathsep.join(
            v for v in (str(ROOT), os.environ.get("PYTHONPATH")) if v
        )
        if args.ingress == "haproxy":
            os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        if args.throughput_optimized:
            os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
        ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
        stack.callback(ray.shutdown)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        stack.callback(serve.shutdown)  # runs before ray.shutdown
        ray_url = f"http://127.0.0.1:{port}"

        for round_ in range(args.rounds):
            for config in configs:
                deployed = False
                try:
                    if config.server == "ray":
                        flags = model_args if config.monitor else [*model_args, "--no-monitor"]
                        app = build_app(
                            flags,
                            num_replicas=config.replicas,
                            ray_actor_options={"num_cpus": args.replica_cpus},
                            max_batch_size=args.max_batch_size,
                            batch_wait_timeout_s=args.batch_wait_timeout_s,
                        )
                        deployed = True
                        serve.run(app, route_prefix="/")
                        url = ray_url
                        wait_ready(client, url)
                        server, ingress = pids_titled(REPLICA_TITLE), pids_titled(*INGRESS_TITLES)
                        assert len(server) == config.replicas, server
                        if args.pin:
                            pin_tasks(server, SERVING_CORE)
                    else:
                        url = urls[config.monitor]
                        server, ingress = [serve_pids[config.monitor]], []
                    for b in batches:  # warm-up
                        burst(client, url, bodies[b], args.concurrency, 2 * args.concurrency, 0)
                    for b in batches:
                        found = measure(client, url, bodies[b], b, args.concurrency, args.seconds,
                                        server, ingress)  # fmt: skip
                        found["per_replica_inputs_per_s"] = found["inputs_per_s"] / config.replicas
                        cell = {"round": round_, "config": config.name, "server": config.server,
                                "replicas": config.replicas, "monitor": config.monitor,
                                "batch": b, **found}  # fmt: skip
                        print(json.dumps(cell), flush=True)
                        cells.append(cell)
                finally:
                    if deployed:
                        serve.delete("default")

    rows = summarise(cells, configs, batches)
    print(f"\n{args.model} {args.size}x{args.size}, {args.concurrency} client threads, "
          f"medians of {args.rounds} rounds of {args.seconds:g} s per cell; Ray: "
          f"{args.replica_cpus:g} CPU per replica, max_batch_size {args.max_batch_size}, "
          f"batch wait {1000 * args.batch_wait_timeout_s:g} ms; "
          + (f"pinned: serve.py and the replica on core {SERVING_CORE}, everything else on "
             "core 0" if args.pin else f"{os.cpu_count()} cores shared by client and servers")
          + f"; ingress {args.ingress}"
          + (", RAY_SERVE_THROUGHPUT_OPTIMIZED=1" if args.throughput_optimized else "")
          + "\n")  # fmt: skip
    print(table(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "cells": cells, "rows": rows},
                indent=1,
            )
            + "\n"  # fmt: skip
        )


def summarise(cells: list[dict], configs: list[Config], batches: list[int]) -> list[dict]:
    """Medians over the rounds per configuration and request size, with each Ray row's ratios
    to serve.py's row (same monitor setting and request size): the median of per-round ratios
    of inputs/s (whole application) and of inputs/s per replica."""
    keys = [
        "requests_per_s",
        "inputs_per_s",
        "per_replica_inputs_per_s",
        "p50_ms",
        "p99_ms",
        "server_cpu_ms_per_input",
        "ingress_cpu_ms_per_input",
        "inputs_per_server_cpu_s",
    ]
    rows = []
    for config in configs:
        for b in batches:
            mine = [c for c in cells if c["config"] == config.name and c["batch"] == b]
            row: dict = {"config": config.name, "server": config.server,
                         "replicas": config.replicas, "monitor": config.monitor, "batch": b,
                         "rounds": len(mine), "sent": sum(c["sent"] for c in mine)}  # fmt: skip
            for key in keys:
                row[key] = statistics.median(c[key] for c in mine)
            if config.server == "ray":
                base = {c["round"]: c for c in cells if c["server"] == "serve.py"
                        and c["monitor"] == config.monitor and c["batch"] == b}  # fmt: skip
                row["ratio"] = statistics.median(
                    c["inputs_per_s"] / base[c["round"]]["inputs_per_s"] for c in mine
                )
                row["per_replica_ratio"] = statistics.median(
                    c["per_replica_inputs_per_s"] / base[c["round"]]["inputs_per_s"] for c in mine
                )
                row["per_cpu_ratio"] = statistics.median(
                    c["inputs_per_server_cpu_s"] / base[c["round"]]["inputs_per_server_cpu_s"]
                    for c in mine
                )
                if config.monitor:
                    row["meets_criterion"] = row["per_replica_ratio"] >= 0.9
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| configuration | batch | req/s | inputs/s | inputs/s per replica | p50 ms | p99 ms "
        "| x serve.py | per replica x serve.py | serving CPU ms / input | ingress CPU ms / input "
        "| inputs per serving CPU-s x serve.py |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
        per = f"{r['per_replica_ratio']:.2f}" if "per_replica_ratio" in r else "-"
        if "meets_criterion" in r:
            per += " (meets)" if r["meets_criterion"] else " (below 0.9)"
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['requests_per_s']:.1f} | "
            f"{r['inputs_per_s']:.1f} | {r['per_replica_inputs_per_s']:.1f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {ratio} | {per} | "
            f"{r['server_cpu_ms_per_input']:.2f} | {r['ingress_cpu_ms_per_input']:.2f} | "
            + (f"{r['per_cpu_ratio']:.2f} |" if "per_cpu_ratio" in r else "- |")
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
