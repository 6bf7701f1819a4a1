"""The markdown report of ``python -m bench.gpu``: the tables and the issue's acceptance checks."""

from __future__ import annotations

from typing import Any

_VARIANTS = ("plain", "plain_graph", "inspect", "call", "monitor_graph", "floor", "captum",
             "gradcam")  # fmt: skip


def _fmt(x: Any, unit: str = "") -> str:
    """A number for a table cell (``-`` when missing)."""
    if x is None:
        return "-"
    return f"{x:g}{unit}" if isinstance(x, int | float) else str(x)


def _overhead(result: dict[str, Any]) -> list[str]:
    """Per model, batch and precision: plain ms, every variant as a ratio to plain eager."""
    rows = ["## Monitor cost (median ms of plain eager; the others as x plain eager)", "",
            "| model | cell | plain ms | " + " | ".join(_VARIANTS[1:]) + " | graph / plain graph |",
            "|---|---|---:|" + "---:|" * len(_VARIANTS)]  # fmt: skip
    for arch, cells in (result.get("overhead") or {}).items():
        if not isinstance(cells, dict):
            rows.append(f"| {arch} | {cells} |")
            continue
        for cell, row in cells.items():
            if cell == "layer":
                continue
            if not isinstance(row, dict):
                rows.append(f"| {arch} | {cell} | {row} |")
                continue
            ratio = row["ratio_to_plain"]
            cols = [_fmt(ratio.get(v), "x") for v in _VARIANTS[1:]]
            last = _fmt(row.get("monitor_graph_over_plain_graph"), "x")
            rows.append(
                f"| {arch} | {cell} | {row['ms']['plain']:.2f} | {' | '.join(cols)} | {last} |"
            )
    return rows + [""]


def _kernels(result: dict[str, Any]) -> list[str]:
    """grad_amap GB/s and lookup microseconds."""
    k = result.get("kernels") or {}
    rows = ["## Kernels", "", "| grad_amap | eager us | eager GB/s | Triton us | Triton GB/s "
            "| Triton / eager |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for shape, r in (k.get("grad_amap") or {}).items():
        rows.append(f"| {shape} | {_fmt(r.get('eager_us'))} | {_fmt(r.get('eager_GBps'))} | "
                    f"{_fmt(r.get('triton_us'))} | {_fmt(r.get('triton_GBps'))} | "
                    f"{_fmt(r.get('triton_over_eager'), 'x')} |")  # fmt: skip
    rows += ["", "| percentile_lookup (fused) | torch us | Triton us | Triton / torch |",
             "|---|---:|---:|---:|"]  # fmt: skip
    for shape, r in (k.get("percentile_lookup") or {}).items():
        rows.append(f"| {shape} | {_fmt(r.get('torch_us'))} | {_fmt(r.get('triton_us'))} | "
                    f"{_fmt(r.get('triton_over_torch'), 'x')} |")  # fmt: skip
    return rows + [""]


def _rest(result: dict[str, Any]) -> list[str]:
    """Calibration, profile and half-precision models, as key: value lines."""
    rows = []
    for name in ("calibration", "profile", "half_models"):
        if name in result:
            rows += [f"## {name}", "", "```", *(f"{k}: {v}" for k, v in result[name].items()),
                     "```", ""]  # fmt: skip
    return rows


def _cell(result: dict[str, Any], arch: str, cell: str) -> dict[str, Any] | None:
    """One overhead cell, if it was measured."""
    row = (result.get("overhead") or {}).get(arch) or {}
    row = row.get(cell) if isinstance(row, dict) else None
    return row if isinstance(row, dict) else None


def checks(result: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """The issue's "done when" items: (what, met (None: not measured), the figure)."""
    out: list[tuple[str, bool | None, str]] = []
    for arch, b in (("resnet50", 1), ("resnet50", 8), ("resnet50", 64), ("vgg16", 8)):
        row = _cell(result, arch, f"fp32 b{b}")
        if row is None or "monitor_graph" not in row["ms"]:
            out.append((f"{arch} b{b}: graph <= 1.10x plain graph, < plain eager", None, "-"))
            continue
        g, pg, pe = row["ms"]["monitor_graph"], row["ms"]["plain_graph"], row["ms"]["plain"]
        figure = f"{g / pg:.3f}x plain graph, {g / pe:.3f}x eager"
        what = f"{arch} b{b}: graph <= 1.10x plain graph, < plain eager"
        out.append((what, g <= 1.10 * pg and g < pe, figure))
    row = _cell(result, "resnet50", "fp32 b8")
    out.append(("resnet50 b8: eager inspect <= 1.15x plain eager",
                None if row is None else row["ratio_to_plain"]["inspect"] <= 1.15,
                "-" if row is None else f"{row['ratio_to_plain']['inspect']}x"))  # fmt: skip
    amap = (result.get("kernels") or {}).get("grad_amap") or {}
    big = amap.get("B=32 N=2048 HW=196 float32 nchw", {})
    out.append(("grad_amap >= 3 TB/s at B=32 N=2048 HW=196 fp32",
                None if "triton_GBps" not in big else big["triton_GBps"] >= 3000,
                _fmt(big.get("triton_GBps"), " GB/s")))  # fmt: skip
    ratios = [r["triton_over_eager"] for r in amap.values() if "triton_over_eager" in r]
    out.append(
        (
            "grad_amap faster than eager at every shape",
            None if not ratios else max(ratios) < 1.0,
            _fmt(max(ratios, default=None), "x"),
        )
    )
    look = (result.get("kernels") or {}).get("percentile_lookup") or {}
    n2048 = [r["triton_us"] for s, r in look.items() if "N=2048" in s and "triton_us" in r]
    out.append(("lookup <= 20 us at B <= 32, N=2048", None if not n2048 else max(n2048) <= 20,
                _fmt(max(n2048, default=None), " us")))  # fmt: skip
    lr = [r["triton_over_torch"] for r in look.values() if "triton_over_torch" in r]
    out.append(("lookup never slower than the torch path", None if not lr else max(lr) <= 1.0,
                _fmt(max(lr, default=None), "x")))  # fmt: skip
    cal = result.get("calibration") or {}
    ratio = cal.get("calibrate_fp32_ratio")
    out.append(("calibration >= 0.9x plain images/s (statistics included)",
                None if ratio is None else ratio >= 0.9, _fmt(ratio, "x")))  # fmt: skip
    return out


def markdown(result: dict[str, Any]) -> str:
    """The whole report."""
    env = result.get("env", {})
    lines = [f"# python -m bench.gpu: {env.get('device')}, torch {env.get('torch')}, "
             f"triton {env.get('triton')}, {env.get('date')}", ""]  # fmt: skip
    lines += ["## Acceptance checks (issue 14)", "", "| check | met | figure |", "|---|---|---|"]
    for what, met, figure in checks(result):
        lines.append(f"| {what} | {'-' if met is None else 'yes' if met else 'NO'} | {figure} |")
    lines += ["", *_overhead(result), *_kernels(result), *_rest(result)]
    if result.get("errors"):
        lines += ["## Errors", "", "```", *(f"{k}: {v}" for k, v in result["errors"].items()),
                  "```"]  # fmt: skip
    lines += ["", f"Section seconds: {result.get('seconds')}"]
    return "\n".join(lines) + "\n"
