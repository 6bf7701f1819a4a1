"""A soak of the hardening probes against the service (``surprise-serve``) with the audit file on.

Usage: ``python bench/soak_serve.py [--runs 3] [--seconds 12] [--shutdown-timeout 2]``.

Trains the tests' tiny CNN and its table (seconds), then runs the service ``--runs`` times on one
audit file. During each run, for ``--seconds``: two client threads send normal traffic with noise
inputs (some alarm), one sends every request of :mod:`bench.hostile_requests` in turn, and slow
clients (a slow header, a slow body, an idle connection) keep connecting. Every run but the last
ends with SIGKILL under that load; the last with SIGTERM while a slow client is still attached.

It checks, and exits 1 naming what failed: no answer was a 500 (or any status other than the
table's); the service answered ``/healthz`` throughout; each slow client was cut; the audit
file's ids are unique across the restarts and every alarm acknowledged in a 200 (by request id)
is in it exactly once; SIGTERM exited within ``--shutdown-timeout`` + 1 s. Prints a JSON
summary. Bounded: each request has a 30 s timeout and every process started is stopped.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._serve_process import start_service, stop_process  # noqa: E402
from bench.hostile_requests import CASES, image_ready_table  # noqa: E402
from surprise_monitor.monitor.alarms import read_records  # noqa: E402
from tests._models import class_dataset, heldout_dataset, trained_tiny_cnn  # noqa: E402


def prepare(folder: Path) -> list[str]:
    """The tiny model's weights and an image-ready table: surprise-serve's model flags."""
    from surprise_monitor.calibrate import calibrate

    model = trained_tiny_cnn(num_classes=3, seed=1)
    table = calibrate(model, class_dataset(600, 3, seed=1), heldout=heldout_dataset(2000),
                      progress=False)  # fmt: skip
    torch.save(model.state_dict(), folder / "model.pt")
    table = image_ready_table(table)
    table.save(folder / "table.safetensors")
    weights, saved = str(folder / "model.pt"), str(folder / "table.safetensors")
    return ["--model", "tests._models:TinyCNN", "--model-kwargs", '{"num_classes": 3}',
            "--weights", weights, "--table", saved]  # fmt: skip


class Soak:
    """The clients of one run and what they saw."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.statuses: Counter[str] = Counter()
        self.wrong: list[str] = []  # answers with another status than expected
        self.acknowledged: Counter[str] = Counter()  # request id -> alarms answered 200
        self.slow_cut = Counter()
        self.lock = threading.Lock()
        self.seq = 0

    def normal(self, seed: int) -> None:
        """Normal traffic: 4 inputs a request, half of them noise (some alarm)."""
        g = torch.Generator().manual_seed(seed)
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                x = torch.cat([heldout_dataset(2, start=int(torch.randint(0, 9000, (1,),
                               generator=g))).tensors[0], -5 + 9.4 * torch.rand(2, 3, 8, 8,
                               generator=g)])  # fmt: skip
                with self.lock:
                    self.seq += 1
                    rid = f"soak-{seed}-{self.seq}"
                try:
                    resp = client.post(self.url + "/predict", json={"inputs": x.tolist()},
                                       headers={"x-request-id": rid})  # fmt: skip
                except httpx.TransportError:
                    continue  # the process was killed under us
                self._saw("normal", resp.status_code, 200)
                if resp.status_code == 200 and any(resp.json()["alarm"]):
                    with self.lock:
                        self.acknowledged[rid] += sum(map(bool, resp.json()["alarm"]))

    def hostile(self) -> None:
        """Every request of the probe table, in turn."""
        while not self.stop.is_set():
            for name, (send, status, _) in CASES.items():
                if self.stop.is_set():
                    return
                try:
                    self._saw(name, send(self.url).status_code, status)
                except httpx.TransportError:
                    continue

    def slow(self) -> None:
        """Slow headers, slow bodies and idle connections, one after another."""
        host, port = self.url.removeprefix("http://").split(":")
        starts = {"header": b"POST /predict HTTP/1.1\r\nX-Slow: ",
                  "body": b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Length: 900\r\n\r\n[",
                  "idle": b""}  # fmt: skip
        while not self.stop.is_set():
            for kind, start in starts.items():
                try:
                    with socket.create_connection((host, int(port)), timeout=0.5) as sock:
                        sock.sendall(start)
                        if self._trickled_until_closed(sock):
                            self.slow_cut[kind] += 1
                except OSError:
                    continue

    def _trickled_until_closed(self, sock: socket.socket) -> bool:
        """Send a byte every 0.3 s until the server closes (True) or the run stops."""
        while not self.stop.is_set():
            try:
                sock.sendall(b"a")
                if sock.recv(4096) == b"":
                    return True
            except TimeoutError:
                continue
            except OSError:
                return True
            time.sleep(0.3)
        return False

    def _saw(self, name: str, status: int, expected: int) -> None:
        with self.lock:
            self.statuses[str(status)] += 1
            if status != expected:
                self.wrong.append(f"{name}: {status} (expected {expected})")


def run_once(args: list[str], folder: Path, i: int, seconds: float, last: bool,
             shutdown: float) -> dict:  # fmt: skip
    """One run of the service under the soak; how it ended."""
    flags = ["--alarm-audit", str(folder / "audit.jsonl"), "--header-timeout", "1",
             "--body-timeout", "2", "--shutdown-timeout", str(shutdown)]  # fmt: skip
    proc, url = start_service([*args, *flags], folder / f"serve{i}.log")
    soak = Soak(url)
    threads = [threading.Thread(target=soak.normal, args=(s,), daemon=True) for s in (i, 100 + i)]
    threads += [threading.Thread(target=f, daemon=True) for f in (soak.hostile, soak.slow)]
    for t in threads:
        t.start()
    down = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/healthz", timeout=5).raise_for_status()
        except httpx.HTTPError:
            down += 1
        time.sleep(0.5)
    out = {"run": i, "statuses": dict(soak.statuses), "healthz_failures": down}
    if last:  # SIGTERM with a slow body attached
        host, port = url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)), timeout=1)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Length: 900\r\n\r\n[")
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(shutdown + 30)
        finally:
            out["exit_after_sigterm_s"] = round(time.monotonic() - start, 2)
            sock.close()
    else:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    soak.stop.set()
    for t in threads:
        t.join(30)
    stop_process(proc) if proc.poll() is None else None
    out.update(wrong=soak.wrong[:20], slow_clients_cut=dict(soak.slow_cut),
               acknowledged=soak.acknowledged)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="service runs on one audit file")
    p.add_argument("--seconds", type=float, default=12.0, help="soak per run")
    p.add_argument("--shutdown-timeout", type=float, default=2.0)
    p.add_argument("--folder", type=Path, help="keep the files here (default: a temporary one)")
    a = p.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="surprise-soak-") as tmp:
        folder = a.folder or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        args = prepare(folder)
        runs = [run_once(args, folder, i, a.seconds, i == a.runs - 1, a.shutdown_timeout)
                for i in range(a.runs)]  # fmt: skip
        audit = [r for f in sorted(folder.glob("audit.jsonl*"), reverse=True)
                 for r in read_records(f)]  # fmt: skip
    ids = [r["id"] for r in audit]
    in_audit = Counter(r["request_id"] for r in audit)
    acknowledged: Counter[str] = Counter()
    for run in runs:
        acknowledged.update(run.pop("acknowledged"))
    problems = [f"run {r['run']}: {w}" for r in runs for w in r["wrong"]]
    problems += [f"run {r['run']}: /healthz failed {r['healthz_failures']} times"
                 for r in runs if r["healthz_failures"]]  # fmt: skip
    problems += [f"run {r['run']}: {n} answers were 500" for r in runs
                 if (n := r["statuses"].get("500", 0))]  # fmt: skip
    if len(set(ids)) != len(ids):
        problems.append(f"{len(ids) - len(set(ids))} audit ids repeat")
    lost = sum(max(0, n - in_audit[rid]) for rid, n in acknowledged.items())
    twice = sum(max(0, in_audit[rid] - n) for rid, n in acknowledged.items())
    if lost or twice:
        problems.append(f"of the acknowledged alarms {lost} are missing from the audit file "
                        f"and {twice} are there more than once")  # fmt: skip
    slow = Counter()
    for r in runs:
        slow.update(r["slow_clients_cut"])
    if set(slow) != {"header", "body", "idle"}:
        problems.append(f"slow clients not all cut: {dict(slow)}")
    took = runs[-1].get("exit_after_sigterm_s", float("inf"))
    if took > a.shutdown_timeout + 1:
        problems.append(f"exited {took} s after SIGTERM (bound {a.shutdown_timeout} + 1 s)")
    summary = {"runs": runs, "audit_records": len(audit), "unique_ids": len(set(ids)),
               "alarms_acknowledged": acknowledged.total(), "acknowledged_missing": lost,
               "slow_clients_cut": dict(slow),
               "problems": problems}  # fmt: skip
    print(json.dumps(summary, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
