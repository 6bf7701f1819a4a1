"""Per-input latency on the request path: plain inference, the sync monitor, the async monitor.

Run: ``pytest bench/test_runtime_latency.py --benchmark-only`` (about a minute on 2 CPU cores).
torchvision resnet18 (random weights, 1000 classes), one 224x224 input per call, all variants
in one run; the summary prints each median as a ratio to ``plain``.

- ``plain``: ``model(x)`` under ``torch.no_grad()``: the baseline.
- ``sync``: ``monitor(x)`` judging every input on the request path (metrics and on_alarm on).
- ``sync_sample10``: the same, judging one input in 10.
- ``async``: ``monitor(x)`` in async mode with the worker idle when the call starts (the queue
  is drained before each round, untimed): plain inference plus copying and queueing the input.
- ``async_saturated``: async mode back to back, so the worker competes for the same cores and
  the queue fills; ``extra_info`` holds the fraction of inputs dropped.
"""

from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry

from bench._setup import batch, build_model, table_for
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.options import Sampling

NAME = "resnet18"
ROUNDS = 30


@pytest.fixture(scope="module")
def setup():
    model = build_model(NAME)
    return model, table_for(NAME, model), batch(n=1)


def _monitor(model, table, **kwargs) -> SurpriseMonitor:
    return SurpriseMonitor(
        model, table, metrics=CollectorRegistry(), on_alarm=lambda r: None, **kwargs
    )


@pytest.mark.parametrize("variant", ["plain", "sync", "sync_sample10", "async", "async_saturated"])
def test_latency(benchmark, setup, variant):
    model, table, x = setup
    benchmark.group = f"per-input latency {NAME} 224x224 b1"
    if variant == "plain":

        def plain(inputs):
            with torch.no_grad():
                return model(inputs)

        benchmark.pedantic(plain, args=(x,), rounds=ROUNDS, iterations=1, warmup_rounds=2)
        return
    kwargs = {
        "sync": {},
        "sync_sample10": {"sample_every": 10},
        "async": {"mode": "async", "queue_size": 4},
        "async_saturated": {"mode": "async", "queue_size": 4},
    }[variant]
    monitor = _monitor(model, table, **kwargs)
    try:
        setup_round = (lambda: (monitor.flush(), ((), {}))[1]) if variant == "async" else None
        if setup_round is None:
            out = benchmark.pedantic(monitor, args=(x,), rounds=ROUNDS, iterations=1,
                                     warmup_rounds=2)  # fmt: skip
        else:
            out = benchmark.pedantic(
                lambda: monitor(x), setup=setup_round, rounds=ROUNDS, warmup_rounds=2
            )
        assert out.shape == (1, 1000)
        monitor.flush()
        total = ROUNDS + 2
        if variant.startswith("async"):
            benchmark.extra_info["dropped_ratio"] = monitor.dropped / total
        assert not monitor.failures, monitor.failures
    finally:
        monitor.close()


def test_interleaved_ratios(benchmark, setup):
    """All variants timed in turn within each round (robust to load that drifts during the
    run); the medians' ratios to ``plain`` go to ``extra_info`` and the summary. Every queue is
    drained, untimed, before each timed call, so no worker runs during another variant."""
    import statistics
    import time

    model, table, x = setup
    monitors = {
        "sync": _monitor(model, table),
        "sync_sample10": _monitor(model, table, sampling=Sampling(every=10)),
        "async": _monitor(model, table, sampling=Sampling(mode="async", queue_size=4)),
    }
    times: dict[str, list[float]] = {v: [] for v in ("plain", *monitors)}

    def plain(inputs):
        with torch.no_grad():
            return model(inputs)

    calls = {"plain": plain, **monitors}

    def one_round():
        for name, fn in calls.items():
            for m in monitors.values():
                m.flush()
            start = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - start)

    benchmark.group = f"per-input latency {NAME} 224x224 b1, interleaved"
    try:
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=2)
    finally:
        for m in monitors.values():
            m.close()
    base = statistics.median(times["plain"][-ROUNDS:])
    for name, values in times.items():
        median = statistics.median(values[-ROUNDS:])  # without the warm-up rounds
        benchmark.extra_info[f"{name}_median_s"] = median
        if name != "plain":
            benchmark.extra_info[f"{name}_ratio"] = median / base
