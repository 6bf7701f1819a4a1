"""Tables, figures, JSON and progress lines of the alarm benchmark."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.alarms.class_rates import markdown as class_markdown
from bench.alarms.scores import BASELINES, CANDIDATES, margin
from surprise_monitor.monitor.atypicality import FISHER_SCORE_NAME

DEFAULT = next(iter(CANDIDATES))
SHOWN = (DEFAULT, "without the head (v1)", "final layer: expectation mass", *BASELINES)
ROC_SETS = ("mnist", "fashion_mnist", "notmnist", "photos", "blur 1", "jpeg 15")
PVALUE_SETS = ("cifar10", "mnist", "photos", "contrast 0.25", "jpeg 15", "uniform")


def log(msg: str) -> None:
    """A progress line with the time."""
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def plain(obj: object) -> object:
    """JSON for numpy scalars (``json.dumps(..., default=plain)``)."""
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(type(obj).__name__)


def markdown(results: dict[str, Any], part: str = "report") -> str:
    """The AUROC / FPR95 tables of one model (``part``), the margins and the alarm rates."""
    sets = results["parts"][part]["sets"]
    head = "| set | " + " | ".join(SHOWN) + " | default - best baseline |"
    rule = "|---|" + "---:|" * (len(SHOWN) + 1)
    lines = [f"### {results['model']}: AUROC / FPR95 ({part} part)", "", head, rule]
    for name, found in sets.items():
        s = found["scores"]
        cells = [f"{s[k]['auroc']:.3f} / {s[k]['fpr95']:.3f}" for k in SHOWN]
        gap, best = margin(s, DEFAULT)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {gap:+.3f} ({best}) |")
    lines += ["", "Alarm rate on the evaluation images (95% Clopper-Pearson interval):", ""]
    for judged, rates in results["alarm_rates"].items():
        for r in rates:
            lines.append(
                f"- judged against the {judged} class, nominal {r['nominal']:.1%}: "
                f"{r['rate']:.2%} ({r['alarms']}/{r['inputs']}; {r['ci_low']:.2%} - "
                f"{r['ci_high']:.2%})"
            )
    if "class_rates" in results:
        names = results["class_rates"].get("class_names") or results.get("class_names")
        lines += ["", "Alarm rate per class (report images):", ""]
        lines.append(class_markdown({results["model"]: results["class_rates"]}, names))
    for r in results.get("resampled_alarm_rates", []):
        lines.append(
            f"- spread of one split: over {r['draws']} random re-splits of the null and "
            f"evaluation images, nominal {r['nominal']:.1%}: mean {r['mean']:.2%} (5-95%: "
            f"{r['p5']:.2%} - {r['p95']:.2%}; ranks only: the same for any score without ties)"
        )
    return "\n".join(lines) + "\n"


def family_sets_markdown(results: dict[str, Any], scores: list[str], part: str = "report") -> str:
    """Every set of one model's family benchmark (``python -m bench.alarms.families``
    results): each of ``scores`` and every baseline as AUROC / FPR95, and the alarm rate at
    nominal 1% of the table's own score (the library's, as the monitor judged the set)."""
    sets = results["parts"][part]["sets"]
    shown = [*scores, *(b for b in BASELINES if b not in scores)]
    head = "| set | family | " + " | ".join(shown) + " | alarm rate at 1% |"
    rule = "|---|---|" + "---:|" * (len(shown) + 1)
    title = f"### {results['model']} ({part} part, {results.get('score', FISHER_SCORE_NAME)} table)"
    lines = [title, "", "AUROC / FPR95 per set:", "", head, rule]
    for name, found in sets.items():
        s = found["scores"]
        cells = [f"{s[k]['auroc']:.3f} / {s[k]['fpr95']:.3f}" for k in shown]
        lines.append(f"| {name} | {found['family']} | " + " | ".join(cells)
                     + f" | {found['alarm_rate']:.1%} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _roc(inlier: np.ndarray, outlier: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every threshold (atypical = positive)."""
    scores = np.concatenate([inlier, outlier])
    truth = np.concatenate([np.zeros(len(inlier)), np.ones(len(outlier))])
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(truth[order]) / max(1, len(outlier))
    fp = np.cumsum(1 - truth[order]) / max(1, len(inlier))
    return np.r_[0.0, fp], np.r_[0.0, tp]


def plot_roc(model: str, shown: dict[str, dict], path: Path) -> Path:
    """ROC curves of the default score and the baselines on a few report sets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ROC_SETS if n in shown]
    fig, axes = plt.subplots(2, 3, figsize=(12, 7.5))
    inlier = shown["cifar10"]["scores"]
    for ax, name in zip(axes.flat, names, strict=False):
        for score in (DEFAULT, "Energy", "Mahalanobis", "KNN", "MSP"):
            fpr, tpr = _roc(inlier[score], shown[name]["scores"][score])
            ax.plot(fpr, tpr, lw=2.2 if score == DEFAULT else 1.2, label=score)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.6, ls=":")
        ax.set_title(f"{name} vs CIFAR-10 (evaluation)")
        ax.set_xlabel("false-positive rate (CIFAR-10)")
        ax.set_ylabel("true-positive rate")
    axes.flat[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{model}: atypical inputs vs CIFAR-10 test images 5,000..9,999")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_pvalues(model: str, shown: dict[str, dict], path: Path) -> Path:
    """Histograms of the conformal p-values: uniform on normal traffic, piled at 0 otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in PVALUE_SETS if n in shown]
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 2.8), sharey=True)
    bins = np.linspace(0, 1, 21)
    for ax, name in zip(axes, names, strict=True):
        p = shown[name]["p_value"]
        ax.hist(p, bins=bins, weights=np.full(len(p), 1 / len(p)), color="C0" if name ==
                "cifar10" else "C3")  # fmt: skip
        ax.axhline(0.05, color="k", lw=0.8, ls="--")
        ax.set_title(name + (" (normal)" if name == "cifar10" else ""), fontsize=9)
        ax.set_xlabel("p-value")
    axes[0].set_ylabel("share of inputs (dashed: uniform)")
    fig.suptitle(f"{model}: conformal p-values (null: CIFAR-10 test 0..4,999)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
