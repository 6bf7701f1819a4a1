"""The service (``python -m surprise_monitor.serve``) as a subprocess on a free loopback port (the
load benchmark and the tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(
    args: list[str], log: Path, timeout: float = 60.0
) -> tuple[subprocess.Popen, str]:
    """Start ``python -m surprise_monitor.serve`` with ``args`` on a free loopback port; wait for
    /healthz. Returns the process and the service's URL."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "surprise_monitor.serve", *args, "--host", "127.0.0.1",
         "--port", str(port)],
        cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"surprise-serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_process(proc)
    raise RuntimeError(f"surprise-serve did not answer within {timeout} s:\n{log.read_text()}")


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate ``proc``; kill it if it has not exited 15 s later."""
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(15)
