"""Paper Section 4.5 (Figure 9): "fixing" misclassified images by suppressing surprise.

For every misclassified test image (the first ``--n-test``; by default all of them), judged
against its true class with the table calibrated on the training images,
:func:`bench.fix_rate.fix_row` tries three ways of choosing the superpixels to blank (set to 0
in normalised space, each channel's mean colour), over the same sweep of SLIC superpixel counts
(10, 25, 50, 100) and removal counts (1-5):

- ``surprise``: the gradient of the true class's logit through the most surprising filter only
  (the paper's method; the highest-percentile filter when none passes P99.9);
- ``vanilla``: the plain input gradient (the paper's baseline);
- ``random``: superpixels in random order (a control the paper does not have).

An image is fixed when some point of the sweep classifies it as its true class. Reported: the
fix rates with binomial standard errors, the paired difference surprise - vanilla and
surprise - random with its standard error and McNemar's exact p-value, and, to find out where
the paper's result does (not) hold:

- the rate for each SLIC superpixel count, and within a budget of removed pixels (a fix that
  blanks half the image says little about where the error came from);
- the rate on the images with a filter above P99.9 (the paper's premise) and on the others;
- the rate by the true class's rank among the logits before the fix (runner-up or lower: with
  10 classes most failures have the true class second, and any large occlusion may bring it up);
- *resolution*: on the first ``--upsample-images`` failures, the image bilinearly upsampled to
  64 x 64 and 128 x 128 before SLIC and the gradients, with the model seeing it through a fixed
  area downsampling back to 32 x 32 (:class:`AreaDownsampled`: same weights, table and failures;
  blanked regions are then cut at sub-pixel precision). Running the model itself at 64 x 64
  changes what it predicts (its accuracy there is reported), so that is not done.

Per-image rows are appended to a JSONL file under the cache folder as they are computed, so an
interrupted run continues where it stopped.

Run: ``python -m bench.paper.fixing [--n-test N] [--upsample-images 200]``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from bench.cifar import cache_dir
from bench.fix_rate import fix_row, proportion, summarise
from bench.paper import fix_effects
from bench.paper.common import (
    Setup,
    arg_parser,
    inspect_all,
    load_setup,
    log,
    logits_of,
    new_figure,
    parse,
    save_figure,
    store,
    test_images,
    test_logits,
)
from surprise_monitor.calibrate import model_fingerprint
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.explain import DEFAULT_N_SEGMENTS, DEFAULT_REMOVE, METHODS
from surprise_monitor.monitor.options import Execution

#: Removed-pixel budgets (fraction of the image) at which the fix rates are also reported.
BUDGETS = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5)
SIZES = (64, 128)
#: The paper's figures (VGG16, ImageNet): 5,116 and 4,554 fixed of ~14,200 failures.
PAPER = {"surprise": 36.0, "vanilla": 32.0}
NATIVE = "32"


class AreaDownsampled(nn.Module):
    """``model(avg_pool2d(x, factor))``: the model seen through a fixed area downsampling.

    The wrapper holds the model's own submodules under the same names, so its ``state_dict``,
    weights fingerprint and layer names are the model's, and a calibration table of the model
    serves it. With ``factor`` = 1 it is the model."""

    def __init__(self, model: nn.Module, factor: int) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"factor must be a positive integer, got {factor}")
        if any(True for _ in model.named_parameters(recurse=False)) or any(
            True for _ in model.named_buffers(recurse=False)
        ):
            raise ValueError("the model holds parameters or buffers outside its submodules")
        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_wrapped", model)  # not a submodule: no duplicate names
        self.factor = int(factor)
        self.train(model.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output for the area-downsampled ``x``."""
        if self.factor > 1:
            x = nn.functional.avg_pool2d(x, self.factor)
        return self._wrapped(x)

    def train(self, mode: bool = True) -> AreaDownsampled:
        """Set the mode of the wrapper, its submodules and the wrapped model."""
        super().train(mode)
        self._wrapped.training = mode
        return self


def upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """A normalised batch ``[B, C, h, w]`` bilinearly resampled to ``size`` x ``size``."""
    if size == x.shape[-1]:
        return x
    return nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------ resumable rows
def read_rows(path: Path) -> dict[int, dict[str, Any]]:
    """Rows already computed, by test index (a torn last line of a killed run is dropped)."""
    rows: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            rows[int(row["test_index"])] = row
    return rows


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one row to the JSONL file (flushed and synced: a kill loses at most this row)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def rows_path(setup: Setup, variant: str) -> Path:
    """The JSONL file of one model's rows for one image size."""
    fp = model_fingerprint(setup.model)[:12]
    return cache_dir() / "paper" / "fix" / f"{setup.arch}-{fp}-{variant}.jsonl"


def compute_rows(
    monitor: SurpriseMonitor,
    x: torch.Tensor,
    y: torch.Tensor,
    indices: Sequence[int],
    path: Path,
    logits: torch.Tensor,
    log: Callable[[str], None] | None = None,
    methods: Sequence[str] = METHODS,
) -> list[dict[str, Any]]:
    """Rows of :func:`bench.fix_rate.fix_row` for the test images ``indices`` (``x``, ``y``:
    the images as the monitor takes them, in the order of ``indices``), read from ``path`` or
    computed and appended to it (``methods``: those of :func:`bench.fix_rate.fix_row`). An image
    the model gets right (possible after resampling) is recorded as ``skipped``."""
    done = read_rows(path)
    rows: list[dict[str, Any]] = []
    for j, i in enumerate(indices):
        if i not in done:
            row: dict[str, Any] = {"test_index": int(i), **label_rank(logits[i], int(y[j]))}
            try:
                row.update(fix_row(monitor, x[j], int(y[j]), methods=methods, seed=int(i)))
            except ValueError as exc:  # already classified as its label
                row["skipped"] = str(exc)
            append_row(path, row)
            done[i] = row
            if log and (j + 1) % 50 == 0:
                log(f"  {path.stem}: {j + 1}/{len(indices)}")
        rows.append(done[i])
    return rows


def add_filter_alpha(
    monitor: SurpriseMonitor, x: torch.Tensor, y: torch.Tensor, rows: list[dict[str, Any]]
) -> None:
    """Add ``filter_alpha`` to each row (in memory): the alpha, for the true class, of the
    filter the surprise fix used (0 for a silent filter: no gradient flows through it)."""
    rep = inspect_all(monitor, x, y)
    for j, r in enumerate(rows):
        if "skipped" not in r and r.get("filter") is not None:
            r["filter_alpha"] = float(rep["alpha"][j, r["filter"]])


def label_rank(logits: torch.Tensor, label: int) -> dict[str, Any]:
    """The true class's rank among the logits (1 = predicted) and its logit gap to the top."""
    z = logits.double()
    return {
        "label_rank": int((z > z[label]).sum()) + 1,
        "label_gap": float(z.max() - z[label]),
    }


# ------------------------------------------------------------------------------ analysis
def fixed_within(row: dict[str, Any], method: str, keep: Callable[[list], bool]) -> bool:
    """Did some attempt of ``method`` that ``keep`` accepts classify the image right?"""
    return any(keep(a) and a[4] == row["label"] for a in row[method]["attempts"])


def by_segments(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Fix rate of each method using only the sweep's points at one SLIC superpixel count."""
    counts = sorted({a[0] for r in rows for a in r[methods[0]]["attempts"]})
    return {
        str(ns): {
            m: proportion(
                sum(fixed_within(r, m, lambda a, ns=ns: a[0] == ns) for r in rows), len(rows)
            )  # fmt: skip
            for m in methods
        }
        for ns in counts
    }


def by_budget(
    rows: Sequence[dict[str, Any]], methods: Sequence[str], budgets: Iterable[float] = BUDGETS
) -> dict[str, Any]:
    """Fix rate of each method using only the sweep's points that blank at most a fraction
    ``b`` of the image's pixels."""
    out = {}
    for b in budgets:
        out[f"{b:g}"] = {
            m: proportion(
                sum(fixed_within(r, m, lambda a, r=r, b=b: a[3] <= b * r["pixels"]) for r in rows),
                len(rows),
            )
            for m in methods
        }
    return out


def analyse(rows: Sequence[dict[str, Any]], methods: Sequence[str] = METHODS) -> dict[str, Any]:
    """The summary of one set of rows with every breakdown (see the module docstring)."""
    used = [r for r in rows if "skipped" not in r]
    out = summarise(used, methods)
    out["skipped"] = len(rows) - len(used)
    out["by_segments"] = by_segments(used, methods) if used else {}
    out["by_budget"] = by_budget(used, methods) if used else {}
    subsets = {
        "flagged": [r for r in used if r["filter_kind"] == "surprise"],
        "unflagged": [r for r in used if r["filter_kind"] != "surprise"],
        "runner_up": [r for r in used if r["label_rank"] == 2],
        "lower": [r for r in used if r["label_rank"] > 2],
    }
    if used and "filter_alpha" in used[0]:  # see add_filter_alpha
        subsets["filter_fires"] = [r for r in used if r["filter_alpha"] > 0]
        subsets["filter_silent"] = [r for r in used if r["filter_alpha"] == 0]
        subsets["filter_negative"] = [r for r in used if r["filter_alpha"] < 0]
    out["subsets"] = {k: summarise(v, methods) for k, v in subsets.items() if v}
    out["changed"] = {
        m: proportion(
            sum(any(a[4] != r["prediction"] for a in r[m]["attempts"]) for r in used), len(used)
        )  # fmt: skip
        for m in methods
    }
    out["seconds"] = sum(out["methods"][m]["seconds"] for m in methods)
    return out


# ------------------------------------------------------------------------------ the experiment
def misclassified(setup: Setup, n_test: int) -> list[int]:
    """Indices of the misclassified images among the first ``n_test`` test images."""
    logits, labels = test_logits(setup)
    wrong = (logits[:n_test].argmax(1) != labels[:n_test]).nonzero().flatten()
    return wrong.tolist()


def direct_accuracy(setup: Setup, size: int, n: int = 1000) -> float:
    """Accuracy of the model run *directly* on the first ``n`` test images upsampled to
    ``size`` (what it would do without the area downsampling)."""
    x, y = test_images(setup.data_dir, 0, n)
    return float((logits_of(setup.model, upsample(x, size)).argmax(1) == y).float().mean())


class NativeRows(NamedTuple):
    """Every failure among the first ``n`` test images at 32 x 32, with its fix rows."""

    n: int
    idx: list[int]  # the misclassified test images
    x: torch.Tensor  # the first n test images (normalised)
    y: torch.Tensor
    logits: torch.Tensor  # every test image's logits
    rows: list[dict[str, Any]]  # compute_rows of the failures, with filter_alpha


def native_rows(setup: Setup, n_test: int | None, variant: str, experiment: str) -> NativeRows:
    """The fix rows (:func:`compute_rows`, cached as ``variant``) of every failure among the
    first ``n_test`` test images, judged with the training table, with ``filter_alpha``."""
    n = setup.n_test(n_test)
    idx = misclassified(setup, n)
    x, y = test_images(setup.data_dir, 0, n)
    logits, _ = test_logits(setup)
    log(f"{experiment}: {setup.arch}: {len(idx)} misclassified of {n} test images")
    with setup.monitor("train") as mon:
        rows = compute_rows(mon, x[idx], y[idx], idx, rows_path(setup, variant), logits, log)
        add_filter_alpha(mon, x[idx], y[idx], rows)
    return NativeRows(n, idx, x, y, logits, rows)


def run_model(
    setup: Setup, n_test: int | None, upsample_images: int, sizes: Sequence[int]
) -> dict[str, Any]:
    """The experiment for one model: every failure at 32 x 32, the first ``upsample_images``
    at each of ``sizes``."""
    started = time.perf_counter()
    n, idx, x, y, logits, rows = native_rows(setup, n_test, NATIVE, "fixing")
    out: dict[str, Any] = {"title": setup.title, "test_images": n, "misclassified": len(idx)}
    out["native"] = analyse(rows)
    sub = idx[:upsample_images]
    t = time.perf_counter()
    out["effects"] = fix_effects.run_effects(setup, x[sub], y[sub], sub)
    out["effects"]["seconds"] = time.perf_counter() - t
    out["heldout_table"] = heldout_surprise(setup, n, idx, rows, x, y, logits)
    out["resolution"], out["direct_accuracy"] = resolution(setup, sub, rows, x, y, logits, sizes)
    out["direct_images"] = min(n, 1000)
    parts = [out["native"], *out["resolution"].values(), out["heldout_table"].get("heldout", {})]
    # compute time of the rows (cached rows keep theirs), the effects and the rest of this run
    out["seconds"] = (sum(p.get("seconds", 0.0) for p in parts) + out["effects"]["seconds"]
                      + time.perf_counter() - started)  # fmt: skip
    return out


def resolution(
    setup: Setup,
    sub: Sequence[int],
    rows: Sequence[dict[str, Any]],
    x: torch.Tensor,
    y: torch.Tensor,
    logits: torch.Tensor,
    sizes: Sequence[int],
) -> tuple[dict[str, Any], dict[str, float]]:
    """The fix of the failures ``sub`` at each image size (analysed on the images that stay
    misclassified at every size: bilinear resampling blurs a little), and the accuracy of the
    model run directly at each size."""
    by_size = {NATIVE: [r for r in rows if r["test_index"] in set(sub)]}
    direct = {}
    n = min(len(x), 1000)
    for size in sizes:
        model = AreaDownsampled(setup.model, size // x.shape[-1])
        lax = Execution(strict_input_size=False)
        with SurpriseMonitor(model, setup.table("train"), execution=lax) as mon:
            xs = upsample(x[sub], size)
            by_size[str(size)] = compute_rows(
                mon, xs, y[sub], sub, rows_path(setup, str(size)), logits, log
            )
        direct[str(size)] = direct_accuracy(setup, size, n)
    keep = {r["test_index"] for r in by_size[NATIVE]}
    for size_rows in by_size.values():
        keep -= {r["test_index"] for r in size_rows if "skipped" in r}
    out = {k: analyse([r for r in v if r["test_index"] in keep]) for k, v in by_size.items()}
    for k, v in by_size.items():
        out[k]["skipped"] = sum("skipped" in r for r in v)  # fixed by the resampling alone
    return out, direct


def heldout_surprise(
    setup: Setup,
    n_test: int,
    idx: Sequence[int],
    rows: Sequence[dict[str, Any]],
    x: torch.Tensor,
    y: torch.Tensor,
    logits: torch.Tensor,
) -> dict[str, Any]:
    """The surprise fix with the held-out table instead of the training table, on the failures
    no held-out table saw (vanilla and random do not use the table: their rows are reused)."""
    a, b = setup.heldout_range(n_test)
    held = [i for i in idx if a <= i < b]
    if not held:
        return {}
    with setup.monitor("heldout") as mon:
        new = compute_rows(mon, x[held], y[held], held, rows_path(setup, "heldout_table"),
                           logits, log, methods=("surprise",))  # fmt: skip
        add_filter_alpha(mon, x[held], y[held], new)
    native = {r["test_index"]: r for r in rows}
    swapped = [
        {
            **native[r["test_index"]],
            **{k: r[k] for k in ("surprise", "filter", "filter_kind", "filter_alpha")},
        }
        for r in new
        if "skipped" not in r
    ]
    return {
        "test_range": [a, b],
        "train": analyse([native[i] for i in held]),
        "heldout": analyse(swapped),
    }


def run(
    setups: Sequence[Setup],
    n_test: int | None,
    upsample_images: int = 200,
    sizes: Sequence[int] = SIZES,
) -> dict[str, Any]:
    """Section 4.5 for each model."""
    return {s.arch: run_model(s, n_test, upsample_images, sizes) for s in setups}


# ------------------------------------------------------------------------------ output
def _cell(p: dict[str, float]) -> str:
    """``36.1% +- 1.6`` of a :func:`bench.fix_rate.proportion`."""
    return f"{p['percent']:.1f}% +- {p['se']:.1f}"


def _diff(d: dict[str, float]) -> str:
    """``+4.2 +- 1.1 (p 0.001)`` of a :func:`bench.fix_rate.paired_difference`."""
    return f"{d['difference']:+.1f} +- {d['se']:.1f} (p {d['p_value']:.2g})"


def rate_row(title: str, label: str, s: dict[str, Any]) -> str:
    """One table row: images, the three rates, the two paired differences."""
    rates = " | ".join(_cell(s["methods"][m]) for m in METHODS)
    return (
        f"| {title} | {label} | {s['images']} | {rates} | {_diff(s['surprise_minus_vanilla'])} "
        f"| {_diff(s['surprise_minus_random'])} |"
    )


def markdown(results: dict[str, Any], figure: str | None = "fix-rate.png") -> str:
    """The section of the report: the rates beside the paper's, and the breakdowns."""
    head = (
        "| model | failures | tried | surprise | vanilla | random | surprise - vanilla (pp) "
        "| surprise - random (pp) |\n|---|---|---:|---:|---:|---:|---:|---:|"
    )
    lines = [
        "Fix rate: share of the misclassified test images that some point of the sweep "
        f"(SLIC targets {list(DEFAULT_N_SEGMENTS)}, top {list(DEFAULT_REMOVE)} superpixels "
        "blanked) makes the model classify as the true class; +- one binomial standard error; "
        "differences are paired (same images), +- their standard error, with McNemar's exact "
        f"p-value. Paper (VGG16, ImageNet): surprise ~{PAPER['surprise']:.0f}%, vanilla "
        f"~{PAPER['vanilla']:.0f}% (5,116 and 4,554 images); no random control.",
        "",
        head,
    ]
    names = {
        "flagged": "a filter above P99.9",
        "unflagged": "no filter above P99.9",
        "runner_up": "true class 2nd before the fix",
        "lower": "true class 3rd or lower",
        "filter_fires": "surprise filter fires (alpha > 0)",
        "filter_silent": "surprise filter silent (alpha = 0)",
        "filter_negative": "surprise filter alpha < 0",
    }
    for r in results.values():
        lines.append(rate_row(r["title"], "all misclassified", r["native"]))
        for key, name in names.items():
            if key in r["native"]["subsets"]:
                lines.append(rate_row(r["title"], name, r["native"]["subsets"][key]))
    lines += [
        "",
        "How often some point of the sweep changes the prediction at all (to any class), and "
        "how often that change is a fix:",
        "",
        "| model | method | prediction changed | fixed | fixed when changed |",
        "|---|---|---:|---:|---:|",
    ]
    for r in results.values():
        for m in METHODS:
            ch, fx = r["native"]["changed"][m], r["native"]["methods"][m]
            lines.append(
                f"| {r['title']} | {m} | {_cell(ch)} | {_cell(fx)} | "
                f"{100 * fx['fixed'] / max(ch['fixed'], 1):.0f}% |"
            )
    lines += [
        "",
        "The surprising filter chosen with the training table or with the held-out table (the "
        "failures among the test images the held-out table did not see; vanilla and random "
        "do not depend on the table):",
        "",
        "| model | table | tried | a filter above P99.9 | surprise | vanilla | random "
        "| surprise - vanilla (pp) | surprise - random (pp) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results.values():
        for table, s in (r.get("heldout_table") or {}).items():
            if table == "test_range":
                continue
            rates = " | ".join(_cell(s["methods"][m]) for m in METHODS)
            lines.append(
                f"| {r['title']} | {table} | {s['images']} | "
                f"{100 * s['flagged_surprise'] / max(s['images'], 1):.0f}% | {rates} | "
                f"{_diff(s['surprise_minus_vanilla'])} | {_diff(s['surprise_minus_random'])} |"
            )
    lines += [
        "",
        f"What blanking does to the logits (the first failures; SLIC at "
        f"{fix_effects.EFFECT_SEGMENTS} superpixels; mean change +- standard error):",
        "",
        *fix_effects.markdown(results),
    ]
    lines += ["", "Fix rate by SLIC superpixel target (all removal counts of that target):", ""]
    lines += ["| model | SLIC target | surprise | vanilla | random |", "|---|---:|---:|---:|---:|"]
    for r in results.values():
        for ns, rates in r["native"]["by_segments"].items():
            cells = " | ".join(_cell(rates[m]) for m in METHODS)
            lines.append(f"| {r['title']} | {ns} | {cells} |")
    lines += ["", "Fix rate when a fix may blank at most a share of the image's pixels:", ""]
    lines += [
        "| model | pixels blanked | surprise | vanilla | random |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results.values():
        for b, rates in r["native"]["by_budget"].items():
            cells = " | ".join(_cell(rates[m]) for m in METHODS)
            lines.append(f"| {r['title']} | <= {100 * float(b):g}% | {cells} |")
    lines += [
        "",
        "Resolution: the first failures in test order, with the image upsampled (bilinear) "
        "before SLIC and the gradients and the model seeing it area-downsampled to 32 x 32; "
        "on the images that stay misclassified at every size (the resampling's slight blur "
        "alone fixes some):",
        "",
        head.replace("| failures |", "| image size |"),
    ]
    for r in results.values():
        for size, s in r["resolution"].items():
            lines.append(rate_row(r["title"], f"{size} x {size}", s))
    lines.append("")
    for r in results.values():
        direct = ", ".join(f"{k} x {k}: {v:.3f}" for k, v in r["direct_accuracy"].items())
        skipped = {k: s["skipped"] for k, s in r["resolution"].items() if s["skipped"]}
        lines.append(
            f"- {r['title']}: {r['misclassified']} of {r['test_images']} test images "
            f"misclassified; {r['seconds']:.0f} s in all. The model run directly on upsampled "
            f"images (no area downsampling) has accuracy {direct} on {r['direct_images']:,} "
            "test images."
            + (
                " Classified right after resampling (left out): "
                + ", ".join(f"{v} at {k} x {k}" for k, v in skipped.items())
                + "."
                if skipped
                else ""
            )
        )
    if figure:
        lines += ["", f"![fix rates](figures/{figure})"]
    return "\n".join(lines)


def plot(results: dict[str, Any]) -> str:
    """Per model: the fix rate against the pixel budget, by SLIC target, and by image size."""
    fig = new_figure(13.5, 3.6 * len(results))
    colours = {"surprise": "tab:red", "vanilla": "tab:blue", "random": "tab:gray"}
    for row, r in enumerate(results.values()):
        ax = fig.add_subplot(len(results), 3, 3 * row + 1)
        budgets = [100 * float(b) for b in r["native"]["by_budget"]]
        for m in METHODS:
            v = [r["native"]["by_budget"][b][m] for b in r["native"]["by_budget"]]
            ax.errorbar(budgets, [p["percent"] for p in v], yerr=[p["se"] for p in v],
                        label=m, color=colours[m], marker="o", ms=3, capsize=2)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("at most this % of the pixels blanked", fontsize=8)
        ax.set_ylabel("fixed (% of failures)", fontsize=8)
        ax.set_title(f"{r['title']}: {r['native']['images']} failures", fontsize=9)
        ax.legend(fontsize=7)
        for col, (key, xlabel) in enumerate(
            ((None, "SLIC superpixel target"), ("resolution", "image size for SLIC"))
        ):
            ax = fig.add_subplot(len(results), 3, 3 * row + 2 + col)
            groups = r["native"]["by_segments"] if key is None else {
                k: s["methods"] for k, s in r["resolution"].items()
            }  # fmt: skip
            for j, m in enumerate(METHODS):
                pos = np.arange(len(groups)) + (j - 1) * 0.27
                ax.bar(pos, [g[m]["percent"] for g in groups.values()], 0.27, label=m,
                       yerr=[g[m]["se"] for g in groups.values()], color=colours[m])  # fmt: skip
            ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel("fixed (% of failures)", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, "fix-rate").name


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: run Section 4.5, save the results and the figure, print the section."""
    p = arg_parser(__doc__.splitlines()[0])
    p.add_argument("--upsample-images", type=int, default=200,
                   help="failures also tried at 64 and 128 pixels (the first ones)")  # fmt: skip
    args = parse(p, argv)
    setups = [load_setup(a, args.data_dir) for a in args.archs]
    results = store("fixing", run(setups, args.n_test, args.upsample_images))
    plot(results)
    print(markdown(results))


if __name__ == "__main__":
    main()
