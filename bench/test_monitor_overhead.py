"""Monitoring cost against plain inference: torchvision resnet50 and vgg16, batch 8, 224x224.

Run: ``make bench`` or ``pytest bench/test_monitor_overhead.py --benchmark-only``.
Groups hold one model each; the summary at the end prints each median as a ratio to the
group's ``plain`` median, measured in the same run.

- ``plain``: ``model(x)`` under ``torch.inference_mode()``: the baseline.
- ``floor``: the same forward with autograd recorded from the target layer on and one backward
  to it (what any exact gradient at that layer must cost, without the monitor's statistics).
- ``inspect``: ``SurpriseMonitor.inspect(x)``; ``call``: the drop-in ``monitor(x)``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench._setup import batch, build_model, table_for
from surprise_monitor.monitor import GradAMapProbe, SurpriseMonitor

MODELS = ["resnet50", "vgg16"]
ROUNDS = 5
PAIRS = 8


@pytest.fixture(scope="module", params=MODELS)
def setup(request):
    name = request.param
    model = build_model(name)
    monitor = SurpriseMonitor(model, table_for(name, model))
    yield name, model, monitor
    monitor.close()


def _bench(benchmark, name, fn):
    x = batch()
    benchmark.group = f"monitor-{name}-b8"
    benchmark.pedantic(fn, args=(x,), rounds=ROUNDS, iterations=1, warmup_rounds=1)


def test_plain(benchmark, setup):
    name, model, _ = setup

    def plain(x):
        with torch.inference_mode():
            return model(x)

    _bench(benchmark, name, plain)


def test_floor(benchmark, setup):
    name, model, monitor = setup
    probe = GradAMapProbe(model, monitor.layer)
    try:
        _bench(benchmark, name, probe.run)
    finally:
        probe.close()


def test_inspect(benchmark, setup):
    name, _, monitor = setup
    _bench(benchmark, name, monitor.inspect)


def test_call(benchmark, setup):
    name, _, monitor = setup
    _bench(benchmark, name, monitor)


def test_paired_ratio(benchmark, setup):
    """Plain and monitored calls interleaved (order alternating): the median of the per-pair time
    ratios, which a shared, noisy machine disturbs far less than separate runs."""
    name, model, monitor = setup
    x = batch()
    ratios: dict[str, list[float]] = {"inspect": [], "floor": []}
    probe = GradAMapProbe(model, monitor.layer)

    def plain():
        with torch.inference_mode():
            model(x)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def pairs():
        for i in range(PAIRS):
            for key, fn in (
                ("inspect", lambda: monitor.inspect(x)),
                ("floor", lambda: probe.run(x)),
            ):
                if i % 2:
                    t_fn, t_plain = timed(fn), timed(plain)
                else:
                    t_plain, t_fn = timed(plain), timed(fn)
                ratios[key].append(t_fn / t_plain)

    monitor.inspect(x)  # warm up
    benchmark.group = f"paired-{name}-b8"
    try:
        benchmark.pedantic(pairs, rounds=1, iterations=1)
    finally:
        probe.close()
    for key, values in ratios.items():
        benchmark.extra_info[f"{key}_over_plain_ratio"] = statistics.median(values)


@pytest.mark.parametrize("name", MODELS)
def test_peak_memory(benchmark, name):
    """Peak resident memory, each mode in a fresh process; ratios go to the summary."""
    script = Path(__file__).with_name("peak_memory.py")
    found = {}

    def measure():
        for mode in ("plain", "monitor"):
            out = subprocess.run(
                [sys.executable, str(script), name, mode, "8"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            found[mode] = json.loads(out.strip().splitlines()[-1])

    benchmark.group = f"memory-{name}-b8"
    benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(found)
    benchmark.extra_info["total_peak_ratio"] = (
        found["monitor"]["peak_kib"] / found["plain"]["peak_kib"]
    )
    benchmark.extra_info["call_peak_ratio"] = (
        found["monitor"]["call_kib"] / found["plain"]["call_kib"]
    )
