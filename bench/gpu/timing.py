"""Timing and memory helpers of the GPU benchmark: synchronised wall time, interleaved medians,
peak extra device memory, CUDA-event loops for kernels."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device (nothing on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn`` takes, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def paired(
    fns: dict[str, Callable[[], object]], device: torch.device, reps: int = 15, warm: int = 3
) -> dict[str, float]:
    """Median milliseconds of each function, interleaved round-robin with a rotating order
    after ``warm`` rounds of warm-up (cuDNN autotuning, Triton compilation, graph capture)."""
    names = list(fns)
    for _ in range(warm):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(wall(fns[name], device) * 1e3)
    return {name: round(statistics.median(v), 4) for name, v in times.items()}


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak device memory (MiB) a call allocates above what was allocated before it."""
    if device.type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)


def per_call_us(
    fn: Callable[[], object], device: torch.device, calls: int = 10, rounds: int = 20
) -> float:
    """Median microseconds per call of ``calls`` back-to-back calls (launch included)."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(rounds):
        samples.append(wall(lambda: [fn() for _ in range(calls)], device) / calls * 1e6)
    return round(statistics.median(samples), 2)


def plain_graph(
    model: torch.nn.Module, x: torch.Tensor, autocast: torch.dtype | None
) -> Callable[[], object]:
    """``model(x)`` captured in a CUDA graph; the returned call copies ``x`` in and replays."""
    static = x.clone()

    def forward() -> torch.Tensor:
        with (
            torch.no_grad(),
            torch.autocast(
                "cuda",
                dtype=autocast or torch.float32,
                enabled=autocast is not None,
                cache_enabled=False,
            ),
        ):
            return model(static)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()

    def replay() -> None:
        static.copy_(x)
        graph.replay()

    return replay
