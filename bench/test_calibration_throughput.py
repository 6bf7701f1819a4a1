"""Calibration throughput (images/s) against plain inference over the same loader.

Run: ``make bench`` or ``pytest bench/test_calibration_throughput.py --benchmark-only``.
torchvision resnet18 (10 classes, random weights) on 64 random 96x96 images, batches of 32.
Each variant is timed in pairs with the plain pass, interleaved and in alternating order (a
shared, noisy machine disturbs the per-pair ratios far less than separate runs); the summary
prints the median ratio of each variant's time to plain inference's, and ``extra_info`` holds
the median images/s of each (``--benchmark-json`` writes them).

- ``plain``: the loader, and ``model(x)`` under ``torch.inference_mode()``: the baseline.
- ``calibrate``: ``calibrate()`` end to end (prefix in inference mode, head and one backward to
  the target layer, alpha, spill, statistics).
- ``no_grad_prefix``: the same with the prefix under ``no_grad`` (the plain probe).
- ``amp``: mixed precision (bfloat16 on CPU, float16 on CUDA).
"""

from __future__ import annotations

import statistics
import time

import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

from surprise_monitor.calibrate import calibrate
from surprise_monitor.calibrate.options import RunOptions

IMAGES, SIZE, BATCH, PAIRS = 64, 96, 32, 3
VARIANTS = {
    "calibrate": RunOptions(),
    "no_grad_prefix": RunOptions(inference_mode=False),
    "amp": RunOptions(amp=True),
}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_paired_throughput(benchmark):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(IMAGES, 3, SIZE, SIZE, generator=g)
    loader = DataLoader(TensorDataset(x, torch.arange(IMAGES) % 10), batch_size=BATCH)

    def plain():
        with torch.inference_mode():
            for images, _ in loader:
                model(images)

    times: dict[str, list[float]] = {"plain": [], **{k: [] for k in VARIANTS}}
    ratios: dict[str, list[float]] = {k: [] for k in VARIANTS}
    counts = []

    def pairs():
        for i in range(PAIRS):
            for key, options in VARIANTS.items():

                def run(options=options):
                    table = calibrate(model, loader, progress=False, run=options)
                    counts.append(int(table.counts.sum()))

                if i % 2:
                    t_run, t_plain = _timed(run), _timed(plain)
                else:
                    t_plain, t_run = _timed(plain), _timed(run)
                times[key].append(t_run)
                times["plain"].append(t_plain)
                ratios[key].append(t_run / t_plain)

    plain()  # warm up
    benchmark.group = f"calibration-resnet18-{SIZE}px-b{BATCH}"
    benchmark.pedantic(pairs, rounds=1, iterations=1)
    assert set(counts) == {IMAGES}
    for key, values in times.items():
        benchmark.extra_info[f"{key}_images_per_s"] = IMAGES / statistics.median(values)
    for key, values in ratios.items():
        benchmark.extra_info[f"{key}_over_plain_ratio"] = statistics.median(values)
