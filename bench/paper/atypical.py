"""Atypical inputs: do the monitor's signals separate CIFAR-10 from far-OOD and shifted images?

In-distribution: ``--n-test`` CIFAR-10 test images that no table saw: the first ones for the weak
models (their held-out tables come from the training file), images 5,000.. for the strong models
(their held-out tables are calibrated on test images 0..4,999); by default 5,000 (weak) or 2,000
(strong). Atypical sets (``--n-ood`` each):

- far OOD: MNIST, Fashion-MNIST and notMNIST test images, zero-padded 28 -> 32 and copied to
  three channels (caveat from the data README: those are lossless, the CIFAR-10 files JPEG);
- shifted CIFAR-10: *other* test images (the ones after the in-distribution images), with
  Gaussian noise, Gaussian blur, reduced contrast or JPEG re-compression at three strengths.

Every input is judged against its predicted class (as deployed). Scores: see
:mod:`bench.paper.scores`. Reported: AUROC and the false-positive rate at 95% true positives
(atypical = positive), for the table calibrated on training images and on held-out images.

It also checks the low-beta alert's rate on in-distribution test images at the configured
``low_beta_pct=1``: a table calibrated on images the model was trained on sees higher betas than
new images give, so the alert fires more often than 1%; a table calibrated on held-out images
(never used in training) restores the rate. The baselines (Mahalanobis, KNN) are fitted on the
penultimate features of 10,000 training images (the weak models' ``train`` table images; the
first 10,000 of the strong models' 50,000).

Run: ``python -m bench.paper.atypical [--data-dir DIR] [--n-test 5000] [--n-ood 2000]``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from bench import strong_tables
from bench.alarms.shifts import jpeg_recompress
from bench.cifar import load_cifar10, to_tensor
from bench.paper.common import (
    CALIBRATION_SPLITS,
    OOD_FILES,
    Setup,
    arg_parser,
    cifar_range,
    features_of,
    gray_to_cifar,
    inspect_all,
    load_gray_npz,
    load_setup,
    log,
    new_figure,
    parse,
    save_figure,
    store,
    test_uint8,
)
from bench.paper.metrics import auroc, fpr_at_tpr
from bench.paper.scores import BASELINE_SCORES, MONITOR_SCORES, Baselines, monitor_scores
from surprise_monitor.monitor.options import Thresholds

#: Shift kind -> strengths (mild, medium, strong).
SHIFTS: dict[str, tuple[float, ...]] = {
    "noise": (0.04, 0.08, 0.16),  # std of added Gaussian noise, on the [0, 1] scale
    "blur": (0.5, 1.0, 2.0),  # Gaussian blur sigma, pixels
    "contrast": (0.5, 0.25, 0.1),  # contrast factor around the image's mean grey
    "jpeg": (30, 15, 5),  # JPEG quality
}


def shift_images(images: np.ndarray, kind: str, level: float, seed: int = 0) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` images with one shift applied (deterministic for a seed)."""
    if kind not in SHIFTS:
        raise ValueError(f"kind must be one of {sorted(SHIFTS)}, got {kind!r}")
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 [N, H, W, C] images, got {images.dtype} {images.shape}")
    if kind == "jpeg":
        return jpeg_recompress(images, int(level))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0
    if kind == "noise":
        g = torch.Generator().manual_seed(seed)
        x = x + float(level) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    elif kind == "blur":
        from torchvision.transforms.v2.functional import gaussian_blur

        size = 2 * math.ceil(3 * float(level)) + 1
        x = gaussian_blur(x, kernel_size=[size, size], sigma=[float(level), float(level)])
    else:  # contrast, around each image's mean grey (as torchvision's adjust_contrast)
        grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean(dim=(1, 2))
        m = grey.view(-1, 1, 1, 1)
        x = m + float(level) * (x - m)
    x = (x.clamp(0, 1) * 255.0).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def atypical_sets(data_dir: Any, start: int, n_ood: int) -> dict[str, torch.Tensor]:
    """Name -> normalised images of every atypical set; the shifted ones are made from test
    images ``start .. start + n_ood - 1``."""
    sets: dict[str, torch.Tensor] = {}
    for name, file in OOD_FILES.items():
        sets[name] = to_tensor(gray_to_cifar(load_gray_npz(file, data_dir, n_ood)))
    raw, _ = test_uint8(data_dir, start, start + n_ood)
    for kind, levels in SHIFTS.items():
        for level in levels:
            sets[f"{kind} {level:g}"] = to_tensor(shift_images(raw, kind, level))
    return sets


def image_ranges(setup: Setup, n_test: int | None, n_ood: int) -> tuple[int, int, int]:
    """``(start, stop, shifted_stop)``: the in-distribution test images ``start..stop-1`` and the
    images the shifted sets are made from, ``stop..shifted_stop-1``; none seen by a table."""
    start = setup.heldout_range(0)[0]
    n = n_test if n_test is not None else (2000 if setup.strong else 5000)
    if start + n + n_ood > 10000:
        raise ValueError(
            f"--n-test + --n-ood must be at most {10000 - start} for {setup.arch}, got {n + n_ood}"
        )
    return start, start + n, start + n + n_ood


def fit_images(setup: Setup, split: str) -> TensorDataset:
    """The images the baselines are fitted on (``train``) or the model's accuracy on its held-out
    calibration images is measured on (``heldout``)."""
    if setup.strong:
        if split == "train":
            n = min(10000, len(load_cifar10("train", setup.data_dir)))  # all of a small file
            return cifar_range("train", 0, n, setup.data_dir)
        file, start, stop, _ = strong_tables.SPLITS["heldout"]  # the held-out table's images
        return cifar_range(file, start, stop, setup.data_dir)
    start, stop = CALIBRATION_SPLITS[split]
    return cifar_range("train", start, stop, setup.data_dir)


def evaluate(
    scores_id: dict[str, np.ndarray], scores_out: dict[str, dict[str, np.ndarray]]
) -> dict[str, dict[str, dict[str, float]]]:
    """score -> set -> {"auroc", "fpr95"}."""
    return {
        s: {
            name: {"auroc": auroc(scores_id[s], out[s]), "fpr95": fpr_at_tpr(scores_id[s], out[s])}
            for name, out in scores_out.items()
        }
        for s in scores_id
    }


def alert_rates(rep: dict[str, torch.Tensor]) -> dict[str, float]:
    return {
        "low_beta": float(rep["low_beta"].float().mean()),
        "any_surprise": float(rep["surprise"].any(1).float().mean()),
        "any_expectation": float(rep["expectation"].any(1).float().mean()),
        "any_flag": float(
            (rep["low_beta"] | rep["surprise"].any(1) | rep["expectation"].any(1)).float().mean()
        ),
    }


TABLES = ("train", "heldout", "heldout_pred")


def run(setups: Sequence[Setup], n_test: int | None, n_ood: int) -> dict[str, Any]:
    """The atypical-input evaluation of each model (see the module docstring)."""
    results: dict[str, Any] = {}
    for s in setups:
        started = time.perf_counter()
        a, b, c = image_ranges(s, n_test, n_ood)
        sets = atypical_sets(s.data_dir, b, n_ood)
        x_id = cifar_range("test", a, b, s.data_dir)
        x, y = x_id.tensors[0], x_id.tensors[1]
        log(f"atypical: {s.arch}: test images {a}..{b - 1}, {len(sets)} atypical sets of {n_ood}")
        r: dict[str, Any] = {"title": s.title, "n_test": b - a, "n_ood": n_ood,
                             "test_range": [a, b]}  # fmt: skip
        for split in ("train", "heldout"):  # how well the model fits its calibration images
            calib = fit_images(s, split)
            feats, logits = features_of(s.model, calib.tensors[0])
            r[f"accuracy_{split}_images"] = float(
                (logits.argmax(1) == calib.tensors[1]).float().mean()
            )
            if split == "train":
                base = Baselines(feats, calib.tensors[1])
        f_id, _ = features_of(s.model, x)
        f_out = {name: features_of(s.model, xs)[0] for name, xs in sets.items()}
        for split in TABLES:
            with s.monitor(split, thresholds=Thresholds(low_beta_pct=1.0)) as mon:
                rep = inspect_all(mon, x)
                r[f"alerts_{split}"] = alert_rates(rep)
                r[f"alerts_{split}_true_class"] = alert_rates(inspect_all(mon, x, y))
                r[f"_beta_pct_{split}"] = rep["beta_percentile"].tolist()
                ids = monitor_scores(rep)
                outs = {}
                for name, xs in sets.items():
                    rep_o = inspect_all(mon, xs)
                    outs[name] = monitor_scores(rep_o)
                    if split == "train":
                        outs[name].update(base.scores(rep_o["logits"], f_out[name]))
            if split == "train":
                r["accuracy"] = float((rep["logits"].argmax(1) == y).float().mean())
                ids.update(base.scores(rep["logits"], f_id))
                r["_roc"] = {
                    "id": {k: v.tolist() for k, v in ids.items()},
                    "MNIST": {k: v.tolist() for k, v in outs["MNIST"].items()},
                    "noise 0.08": {k: v.tolist() for k, v in outs["noise 0.08"].items()},
                }
            r[f"metrics_{split}"] = evaluate(ids, outs)
        r["seconds"] = time.perf_counter() - started
        results[s.arch] = r
    return results


# ------------------------------------------------------------------------------------- output
def _roc(neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos])
    return fpr, tpr


def plot(results: dict[str, Any]) -> list[str]:
    names = []
    # AUROC heat maps, train table
    archs = list(results)
    fig = new_figure(7.5 * len(archs), 5.2)
    for j, a in enumerate(archs):
        m = results[a]["metrics_train"]
        scores = list(MONITOR_SCORES) + list(BASELINE_SCORES)
        sets = list(next(iter(m.values())))
        grid = np.array([[m[s][t]["auroc"] for t in sets] for s in scores])
        ax = fig.add_subplot(1, len(archs), j + 1)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(sets)), sets, rotation=70, fontsize=7)
        ax.set_yticks(range(len(scores)), scores, fontsize=7)
        for (i, k), v in np.ndenumerate(grid):
            ax.text(
                k,
                i,
                f"{v:.2f}".removeprefix("0"),
                ha="center",
                va="center",
                fontsize=5.5,
                color="w" if v < 0.6 else "k",
            )
        ax.set_title(f"{results[a]['title']}: AUROC (CIFAR-10 test vs set)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    names.append(save_figure(fig, "atypical-auroc").name)
    # ROC curves on MNIST and noise 0.08
    fig = new_figure(4.2 * 2 * len(archs), 4.0)
    for j, a in enumerate(archs):
        roc = results[a]["_roc"]
        for col, target in enumerate(("MNIST", "noise 0.08")):
            ax = fig.add_subplot(1, 2 * len(archs), 2 * j + col + 1)
            for s in (
                "low beta percentile",
                "surprise count",
                "expectation count",
                "percentile z2",
                "percentile KS",
                "max softmax",
                "energy",
                "KNN",
            ):
                fpr, tpr = _roc(np.asarray(roc["id"][s]), np.asarray(roc[target][s]))
                ax.plot(fpr, tpr, label=s, lw=1.8 if s.startswith("percentile") else 1.0)
            ax.plot([0, 1], [0, 1], "k:", lw=0.5)
            ax.set_title(f"{results[a]['title']}\nCIFAR-10 vs {target}", fontsize=8)
            ax.set_xlabel("false-positive rate", fontsize=8)
            ax.set_ylabel("true-positive rate", fontsize=8)
            if j == 0 and col == 0:
                ax.legend(fontsize=6)
    fig.tight_layout()
    names.append(save_figure(fig, "atypical-roc").name)
    # beta percentiles of in-distribution test images under both tables
    fig = new_figure(4.5 * len(archs), 3.4)
    for j, a in enumerate(archs):
        ax = fig.add_subplot(1, len(archs), j + 1)
        bins = np.linspace(0, 100, 51)
        for split in TABLES:
            v = np.asarray(results[a][f"_beta_pct_{split}"])
            rate = results[a][f"alerts_{split}"]["low_beta"]
            ax.hist(
                v, bins=bins, histtype="step", lw=1.5, label=f"{split}: {100 * rate:.1f}% below P1"
            )
        ax.axhline(len(v) / 50, color="k", lw=0.6, ls=":")
        ax.set_title(f"{results[a]['title']}: beta percentile of test images", fontsize=8)
        ax.set_xlabel("beta percentile (within the predicted class)", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    names.append(save_figure(fig, "atypical-beta-rate").name)
    return names


SHORT = {"Fashion-MNIST": "F-MNIST"}


def _table(m: dict, key: str, scores: Sequence[str], fmt: str) -> list[str]:
    sets = list(next(iter(m.values())))
    lines = [
        "| score | " + " | ".join(SHORT.get(t, t) for t in sets) + " |",
        "|---|" + "---:|" * len(sets),
    ]
    for s in scores:
        if s not in m:
            continue
        vals = [m[s][t][key] for t in sets]
        lines.append(f"| {s} | " + " | ".join(format(v, fmt) for v in vals) + " |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    lines: list[str] = []
    for r in results.values():
        a, b = r.get("test_range", (0, r["n_test"]))
        lines += [
            f"**{r['title']}** (accuracy {r['accuracy']:.3f} on the {r['n_test']} "
            f"in-distribution test images {a:,}..{b - 1:,}; {r['n_ood']} images per atypical set)",
            "",
            "AUROC, table calibrated on training images:",
            "",
        ]
        scores = list(MONITOR_SCORES) + list(BASELINE_SCORES)
        lines += _table(r["metrics_train"], "auroc", scores, ".3f")
        lines += ["", "FPR at 95% TPR (lower is better), same table:", ""]
        lines += _table(r["metrics_train"], "fpr95", scores, ".3f")
        for split, what in (
            ("heldout", "held-out images with their true labels"),
            ("heldout_pred", "held-out images labelled with the model's predictions"),
        ):
            lines += ["", f"AUROC of the monitor's scores, table calibrated on {what}:", ""]
            lines += _table(r[f"metrics_{split}"], "auroc", MONITOR_SCORES, ".3f")
        lines.append("")
    lines += [
        "Alert rates on the in-distribution test images (configured: low beta below the "
        "class's 1st percentile, so 1% is expected; surprise above P99.9 and expectation below "
        "P0.1 per filter). Tables: `train` (training images, true labels), `heldout` (images "
        "never trained on, true labels), `heldout_pred` (the same images labelled with the "
        "model's predictions); see the set-up for which images each model's tables hold.",
        "",
    ]
    for r in results.values():
        lines.append(
            f"- {r['title']}: accuracy on (10,000 of) the `train` calibration images "
            f"{r['accuracy_train_images']:.3f}, on the `heldout` ones "
            f"{r['accuracy_heldout_images']:.3f}, on the test images {r['accuracy']:.3f} "
            f"({r.get('seconds', float('nan')) / 60:.0f} min)."
        )
    lines += [
        "",
        "| model | table | judged against | low beta | any surprise | any expectation | any flag |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in results.values():
        for split in TABLES:
            for suffix, who in (("", "prediction"), ("_true_class", "true class")):
                t = r[f"alerts_{split}{suffix}"]
                lines.append(
                    f"| {r['title']} | {split} | {who} | {100 * t['low_beta']:.1f}% | "
                    f"{100 * t['any_surprise']:.1f}% | {100 * t['any_expectation']:.1f}%"
                    f" | {100 * t['any_flag']:.1f}% |"
                )
    lines += [
        "",
        "![AUROC per score and set](figures/atypical-auroc.png)",
        "",
        "![ROC curves](figures/atypical-roc.png)",
        "",
        "![beta percentiles of test images under the three tables](figures/atypical-beta-rate.png)",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = arg_parser(__doc__.splitlines()[0])
    p.add_argument("--n-ood", type=int, default=2000, help="images per atypical set")
    args = parse(p, argv)
    missing = [f for f in OOD_FILES.values() if not (args.data_dir / f"{f}.npz").is_file()]
    if missing:
        p.exit(
            2,
            f"{p.prog}: data not found: {', '.join(m + '.npz' for m in missing)} "
            f"missing in {args.data_dir} (the far-OOD sets)\n",
        )
    setups = [load_setup(a, args.data_dir) for a in args.archs]
    results = store("atypical", run(setups, args.n_test, args.n_ood))
    plot(results)
    print(markdown(results))


if __name__ == "__main__":
    main()
