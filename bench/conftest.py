"""Prints each benchmark's median as a ratio to its group's baseline, measured in the same run."""

from __future__ import annotations

import platform

import torch

BASELINE = "plain"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    tr = terminalreporter
    tr.write_sep("=", "ratios to the group's baseline (medians, same run)")
    tr.write_line(
        f"machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    groups: dict[str, list] = {}
    for bench in session.benchmarks:
        groups.setdefault(bench.group or "", []).append(bench)
    for group, benches in sorted(groups.items()):
        base = next((b for b in benches if BASELINE in b.name), None)
        for b in benches:
            line = f"{group:<24} {b.name:<40} median {b.stats.median:9.4f} s"
            if base is not None and b is not base:
                line += f"   x{b.stats.median / base.stats.median:.3f} of {base.name}"
            info = {k: v for k, v in b.extra_info.items() if k.endswith("ratio")}
            if info:
                line += "   " + ", ".join(f"{k}={v:.3f}" for k, v in info.items())
                for mode in ("plain", "monitor"):
                    if mode in b.extra_info:
                        m = b.extra_info[mode]
                        line += (
                            f"\n{'':<26}{mode}: idle {m['idle_kib'] / 1024:.0f} MiB, peak "
                            f"{m['peak_kib'] / 1024:.0f} MiB, call {m['call_kib'] / 1024:.0f} MiB"
                        )
            tr.write_line(line)
