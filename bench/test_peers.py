"""The monitor against its peers: plain inference, Captum and pytorch-grad-cam, on the CPU.

Run: ``pytest bench/test_peers.py --benchmark-only`` (about 30 minutes on a busy 2-core machine;
narrow it with ``PEERS_MODELS=resnet18 PEERS_BATCHES=1,8``). Torchvision ``resnet18``,
``resnet50`` and ``vgg16`` (random weights: time and memory do not depend on them), 224 x 224,
batch 1, 8 and 32; ``PEERS_MODELS`` takes other torchvision classifiers too, a transformer's
token map or a channels-last map included (``vit_b_16`` and ``convnext_tiny`` are measured in
``bench/README.md``; a zero-initialised head is given small random weights, see
``bench._setup.build_model``). Every mode produces the logits and the
per-filter gradient x activation of the predicted class at the table's layer, the feature map
the classifier head reads (``layer4`` for the ResNets, ``features`` for VGG and ConvNeXt, ViT's
``encoder`` tokens), averaged over the positions of its layout (``bench._setup.peer_runner``):

- ``plain``: ``model(x)`` under ``torch.inference_mode()``, the baseline;
- ``monitor``: ``SurpriseMonitor.inspect(x)``;
- ``captum``: a plain forward for the predictions, then Captum's ``LayerGradientXActivation``;
- ``gradcam``: pytorch-grad-cam's ``ActivationsAndGradients`` with a full ``backward()``.

Two kinds of figures, both measured in the same run:

- ``test_paired``: the four modes interleaved round by round, the order rotating (one untimed
  round, then ``PEERS_PAIRS`` timed rounds, default 3); per mode the median time per batch
  (``extra_info["<mode>_median_s"]``) and the median per-round ratio to plain
  (``"<mode>_time_ratio"``, printed in the summary), which a shared, noisy machine disturbs far
  less than separate runs.
- ``test_memory``: peak resident memory of each mode in a fresh process
  (``bench/peak_memory.py``: one batch-1 warm-up call, then three calls at the batch size),
  as a ratio to plain.

Before timing, ``test_paired`` checks that Captum's and pytorch-grad-cam's per-filter values
equal the monitor's alpha (same layer, same class), so the modes are compared on equal work.

At the end a markdown table of the paired time and memory ratios is written to
``bench/.cache/peers.md`` (and its path printed).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench._setup import CACHE, PEER_MODES, batch, build_model, peer_runner

MODELS = os.environ.get("PEERS_MODELS", "resnet18,resnet50,vgg16").split(",")
BATCHES = [int(b) for b in os.environ.get("PEERS_BATCHES", "1,8,32").split(",")]
PAIRS = int(os.environ.get("PEERS_PAIRS", "3"))
PEERS = PEER_MODES[1:]
GOAL = {"monitor": (1.05, 1.10)}  # time, memory ratio to plain

_RESULTS: dict[tuple[str, int], dict] = {}


@pytest.fixture(scope="module", params=MODELS)
def runners(request):
    """One model instance per mode (pytorch-grad-cam's hooks would record the others' passes)."""
    name = request.param
    return name, {mode: peer_runner(mode, name, build_model(name)) for mode in PEER_MODES}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if _RESULTS:
        path = write_report(CACHE / "peers.md")
        print(f"\npeer figures written to {path}")


@pytest.mark.parametrize("n", BATCHES)
def test_paired(benchmark, runners, n):
    """All modes interleaved, the order rotating each round; median ratio to plain per mode."""
    name, run = runners
    x = batch(n=n)
    times: dict[str, list[float]] = {m: [] for m in PEER_MODES}

    def rounds():
        for i in range(PAIRS):
            k = i % len(PEER_MODES)
            for mode in PEER_MODES[k:] + PEER_MODES[:k]:
                start = time.perf_counter()
                run[mode](x)
                times[mode].append(time.perf_counter() - start)

    # warm up each path once, and check that all of them compute the same alpha
    alpha = run["monitor"](x[:2]).alpha
    for mode in ("captum", "gradcam"):
        other = run[mode](x[:2]).detach()
        assert torch.allclose(other, alpha, rtol=1e-3, atol=1e-5 * float(alpha.abs().max())), mode
    for mode in PEER_MODES:  # one untimed round at the full batch size
        run[mode](x)
    benchmark.group = f"paired-peers-{name}-b{n}"
    benchmark.pedantic(rounds, rounds=1, iterations=1)
    found = _RESULTS.setdefault((name, n), {})
    for mode in PEERS:
        ratios = [t / p for t, p in zip(times[mode], times["plain"], strict=True)]
        benchmark.extra_info[f"{mode}_time_ratio"] = statistics.median(ratios)
        found[f"{mode}_time_ratio"] = statistics.median(ratios)
    for mode in PEER_MODES:
        found[f"{mode}_s"] = statistics.median(times[mode])
        benchmark.extra_info[f"{mode}_median_s"] = found[f"{mode}_s"]


@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("name", MODELS)
def test_memory(benchmark, name, n):
    """Peak resident memory of each mode, each in a fresh process; ratios to plain."""
    script = Path(__file__).with_name("peak_memory.py")
    found: dict[str, dict] = {}

    def measure():
        for mode in PEER_MODES:
            out = subprocess.run(
                [sys.executable, str(script), name, mode, str(n)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            found[mode] = json.loads(out.strip().splitlines()[-1])

    benchmark.group = f"memory-peers-{name}-b{n}"
    benchmark.pedantic(measure, rounds=1, iterations=1)
    result = _RESULTS.setdefault((name, n), {})
    result["plain_peak_mib"] = found["plain"]["peak_kib"] / 1024
    for mode in PEERS:
        ratio = found[mode]["peak_kib"] / found["plain"]["peak_kib"]
        call = found[mode]["call_kib"] / max(found["plain"]["call_kib"], 1)
        benchmark.extra_info[f"{mode}_peak_ratio"] = ratio
        benchmark.extra_info[f"{mode}_call_ratio"] = call
        result[f"{mode}_peak_ratio"] = ratio
        result[f"{mode}_peak_mib"] = found[mode]["peak_kib"] / 1024


def write_report(path: Path) -> Path:
    """The paired time ratios and peak-memory ratios as a markdown table."""
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; "
        f"{PAIRS} interleaved rounds per cell (median of per-round ratios).",
        "",
        "| model | batch | plain s | plain peak MiB | monitor time | monitor mem "
        "| captum time | captum mem | grad-cam time | grad-cam mem |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(r: dict, mode: str, kind: str) -> str:
        key = f"{mode}_{kind}_ratio"
        if key not in r:
            return "-"
        extra = f" ({r[f'{mode}_s']:.2f} s)" if kind == "time" else ""
        return f"{r[key]:.3f}x{extra}"

    for (name, n), r in sorted(_RESULTS.items(), key=lambda kv: (MODELS.index(kv[0][0]), kv[0][1])):
        plain_s = f"{r['plain_s']:.3f}" if "plain_s" in r else "-"
        plain_m = f"{r['plain_peak_mib']:.0f}" if "plain_peak_mib" in r else "-"
        cells = [cell(r, m, k) for m in PEERS for k in ("time", "peak")]
        lines.append(f"| {name} | {n} | {plain_s} | {plain_m} | " + " | ".join(cells) + " |")
    goal_t, goal_m = GOAL["monitor"]
    lines += ["", f"Goal for the monitor: time <= {goal_t}x, memory <= {goal_m}x plain."]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path
