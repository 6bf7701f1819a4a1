"""Run the paper's experiments on the CIFAR-10 models and write ``bench/paper/REPORT.md``.

``python -m bench.paper [--archs resnet18,vgg_bn] [--n-test N] [--only ranking,beta]``
(``--only`` reruns some experiments and takes the others from ``bench/paper/results/``; by
default the paper's four, Sections 4.1-4.5; ``fix_choice`` and ``atypical`` run when named).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bench.cifar import cache_dir
from bench.paper import atypical, beta, failures, fix_choice, fixing, ranking
from bench.paper.common import (
    ARCH_TITLES,
    ARCHS,
    CALIBRATION_SPLITS,
    HERE,
    OOD_FILES,
    RESULTS,
    STRONG_ARCHS,
    TRAIN_SETTINGS,
    Setup,
    arg_parser,
    load_setup,
    log,
    parse,
    store,
)
from bench.paper.scores import BASELINE_SCORES, MONITOR_SCORES
from bench.strong_models import training_record

EXPERIMENTS = ("ranking", "beta", "failures", "fixing", "fix_choice", "atypical")
#: What ``python -m bench.paper`` runs by default: the paper's experiments (Sections 4.1-4.5).
PAPER_EXPERIMENTS = ("ranking", "beta", "failures", "fixing")


def _load(name: str) -> dict[str, Any] | None:
    """An experiment's committed results (``results/{name}.json``), if any."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def trained(setup: Setup) -> str:
    """How a model was trained, in a few words."""
    if setup.arch == "resnet18":
        return "shared weights: all 50,000 training images, SGD, label smoothing (README)"
    if setup.arch == "vgg_bn":
        rec = training_record("vgg_bn")
        return (
            f"here: all 50,000 training images, {rec.get('epochs_done', '?')} epochs, "
            f"{rec.get('minutes', '?')} min on the CPU (`bench/train_vgg_bn.py`)"
        )
    return (
        f"here: the first {TRAIN_SETTINGS['n_train']:,} training images, "
        f"{TRAIN_SETTINGS['epochs']} epochs (`bench.cifar.train_or_load`)"
    )


def models_section(setups: Sequence[Setup]) -> str:
    """The models: final convolution, size, test accuracy, training."""
    lines = [
        "| model | final conv (filters) | parameters | CIFAR-10 test accuracy (10,000) | trained |",
        "|---|---|---:|---:|---|",
    ]
    for s in setups:
        t = s.table("train")
        params = sum(p.numel() for p in s.model.parameters())
        lines.append(
            f"| {s.title} | `{t.layer}` ({t.num_filters}) | {params:,} | {s.test_accuracy:.3f} "
            f"| {trained(s)} |"
        )
    return "\n".join(lines)


def times_section(res: dict[str, Any], archs: Sequence[str]) -> list[str]:
    """Wall time of each experiment and model (seconds, as recorded in the results)."""
    titles = {a: ARCH_TITLES[a] for a in archs}
    lines = [
        "| experiment | " + " | ".join(titles.values()) + " |",
        "|---|" + "---:|" * len(archs),
    ]
    for name, r in res.items():
        if not r:
            continue
        cells = []
        for a in archs:
            res = r.get(a) or {}
            sec = res.get("seconds")
            if sec is not None and "after_bn" in res:  # Table 1's second layer
                sec += res["after_bn"].get("seconds", 0.0)
            cells.append("-" if sec is None else f"{sec / 60:.1f} min")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def ranking_notes(r: dict[str, Any]) -> list[str]:
    """One line per model: where Grad-AMap ranks in Table 1."""
    out = []
    for a in r.values():
        aucs = {m: v["auc"] for m, v in a["methods"].items()}
        order = sorted(aucs, key=aucs.get)
        pos = order.index("grad_amap") + 1
        out.append(
            f"- {a['title']}: lowest AUC {ranking.TITLES[order[0]]} ({aucs[order[0]]:.3f}); "
            f"Grad-AMap (softmax) ranks {pos} of {len(order)} ({aucs['grad_amap']:.3f}), "
            f"Grad-AMap (logit) {aucs['grad_amap_logit']:.3f}; Random "
            f"{aucs['random']:.3f}."
        )
    out.append("- Paper (ImageNet): Grad-AMap lowest on both models (0.042 VGG16, 0.146 ResNet18).")
    return out


def atypical_notes(r: dict[str, Any]) -> list[str]:
    """Per model and group of sets: the best monitor score against the best baseline."""
    out = []
    far = list(OOD_FILES)
    for a in r.values():
        m = a["metrics_train"]
        shifted = [t for t in next(iter(m.values())) if t not in far]

        def mean_auc(score: str, sets: list[str], m: dict = m) -> float:
            return float(np.mean([m[score][t]["auroc"] for t in sets]))

        for group, sets in (("far OOD", far), ("shifted CIFAR-10", shifted)):
            best_mon = max(MONITOR_SCORES, key=lambda s: mean_auc(s, sets))
            best_base = max(BASELINE_SCORES, key=lambda s: mean_auc(s, sets))
            out.append(
                f"- {a['title']}, {group} (mean AUROC over {len(sets)} sets): best monitor "
                f"score {best_mon} {mean_auc(best_mon, sets):.3f}, best baseline "
                f"{best_base} {mean_auc(best_base, sets):.3f}; low beta percentile "
                f"{mean_auc('low beta percentile', sets):.3f}, max softmax "
                f"{mean_auc('max softmax', sets):.3f}."
            )
    return out


def setup_lines(args: Any, archs: Sequence[str]) -> list[str]:
    """The report's set-up section: data, tables, evaluation, machine."""
    lines = [
        f"- Data: `{args.data_dir}`: CIFAR-10 train/test (32x32 RGB, JPEG q75 re-encodings of "
        "the originals).",
    ]
    if any(a in STRONG_ARCHS for a in archs):
        lines.append(
            "- Calibration (the strong models, `bench.strong_tables`): `train` on all 50,000 "
            "training images with their true labels (the paper's protocol: the model's own "
            "training data; every section uses it unless it says otherwise); `heldout` on test "
            "images 0..4,999 (never trained on), true labels. A figure judged with `heldout` "
            "is reported on test images 5,000..9,999 only."
        )
        lines.append(
            "- Evaluation: all 10,000 CIFAR-10 test images unless a section says otherwise."
        )
    if any(a not in STRONG_ARCHS for a in archs):
        tr, ho = CALIBRATION_SPLITS["train"], CALIBRATION_SPLITS["heldout"]
        lines.append(
            f"- Calibration (the weak models): `train` on training images {tr[0]:,}..{tr[1] - 1:,}"
            f", `heldout` on training images {ho[0]:,}..{ho[1] - 1:,}; evaluation on the first "
            "5,000 test images."
        )
    lines.append(
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, torch "
        f"{torch.__version__}, one thread per experiment process."
    )
    return lines


SECTIONS = (
    ("ranking", "1. Filter ranking (Section 4.1, Table 1)"),
    ("beta", "2. Beta against the class score (Section 4.2)"),
    ("failures", "3. Surprise and expectation for misclassified images (Sections 4.3-4.4)"),
    ("fixing", "4. Fixing failures by suppressing surprise (Section 4.5, Figure 9)"),
    ("fix_choice", "4b. The fix with a surprising filter that fired (the explanation's choice)"),
    ("atypical", "5. Atypical inputs (not in the paper)"),
)


def write_report(setups: Sequence[Setup], args: Any) -> str:
    """Write ``REPORT.md`` from the committed results; returns its path."""
    res = {name: _load(name) for name in EXPERIMENTS}
    archs = [s.arch for s in setups]
    lines = [
        "# The paper's experiments on CIFAR-10",
        "",
        "Generated by `python -m bench.paper` (see `README.md` beside this file for how to run "
        "it); the discussion at the end is written by hand (`discussion.md`). Paper: Hartley "
        "et al., *Explaining Failure: Investigation of Surprise and Expectation in CNNs* "
        "(ImageNet, VGG16 / ResNet18 / ResNet50).",
        "",
        "## Set-up",
        "",
        *setup_lines(args, archs),
        "",
        models_section(setups),
        "",
    ]
    sections = {
        "ranking": lambda r: [ranking.markdown(r), "", *ranking_notes(r)],
        "beta": lambda r: [beta.markdown(r)],
        "failures": lambda r: [failures.markdown(r)],
        "fixing": lambda r: [fixing.markdown(r)],
        "fix_choice": lambda r: [fix_choice.markdown(r)],
        "atypical": lambda r: [atypical.markdown(r), "", *atypical_notes(r)],
    }
    for name, heading in SECTIONS:
        if res[name]:
            lines += [f"## {heading}", "", *sections[name](res[name]), ""]
    lines += ["## Wall time", "", *times_section(res, archs), ""]
    discussion = HERE / "discussion.md"
    if discussion.is_file():
        lines += [discussion.read_text().rstrip(), ""]
    text = "\n".join(lines)
    path = HERE / "REPORT.md"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return str(path)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: run the experiments asked for, then the figures and ``REPORT.md``."""
    p = arg_parser(__doc__.splitlines()[0])
    p.add_argument("--n-ood", type=int, default=2000, help="images per atypical set")
    p.add_argument("--per-kind", type=int, default=2, help="failure pictures per kind and model")
    p.add_argument(
        "--upsample-images", type=int, default=200, help="failures also fixed at 64 and 128 px"
    )
    p.add_argument(
        "--only",
        default=",".join(PAPER_EXPERIMENTS),
        help=f"experiments to (re)run, from {','.join(EXPERIMENTS)}; 'report' only rewrites "
        "REPORT.md from the saved results",
    )
    args = parse(p, argv)
    only = [e for e in args.only.split(",") if e and e != "report"]
    bad = [e for e in only if e not in EXPERIMENTS]
    if bad:
        p.error(f"unknown experiment {bad[0]!r}; choose from {', '.join(EXPERIMENTS)}")
    missing = [f for f in OOD_FILES.values() if not (args.data_dir / f"{f}.npz").is_file()]
    if "atypical" in only and missing:
        p.exit(
            2,
            f"{p.prog}: data not found: {', '.join(m + '.npz' for m in missing)} missing "
            f"in {args.data_dir} (the far-OOD sets)\n",
        )
    started = time.perf_counter()
    setups = [load_setup(a, args.data_dir) for a in args.archs]
    if "ranking" in only:
        store("ranking", ranking.run(setups, args.n_test, args.seed))
    if "beta" in only:
        store("beta", beta.run(setups, args.n_test))
    if "failures" in only:
        store("failures", failures.run(setups, args.n_test, args.per_kind))
    if "fixing" in only:
        store("fixing", fixing.run(setups, args.n_test, args.upsample_images))
    if "fix_choice" in only:
        store("fix_choice", fix_choice.run(setups, args.n_test))
    if "atypical" in only:
        store("atypical", atypical.run(setups, args.n_test, args.n_ood))
    plots = (("ranking", ranking.plot), ("beta", beta.plot), ("fixing", fixing.plot),
             ("atypical", atypical.plot))  # fmt: skip
    for name, plot in plots:
        full = cache_dir() / "paper" / "results" / f"{name}.json"
        if full.is_file():  # every model's results, with the arrays the figures need
            plot(json.loads(full.read_text()))
    reported = sorted({a for e in EXPERIMENTS for a in (_load(e) or {})}, key=ARCHS.index)
    setups = [s for s in setups if s.arch in reported] + [
        load_setup(a, args.data_dir) for a in reported if a not in args.archs
    ]
    setups.sort(key=lambda s: ARCHS.index(s.arch))
    log(f"report: {write_report(setups, args)} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
