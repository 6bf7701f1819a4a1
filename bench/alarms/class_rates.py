"""Alarm rate per class on normal traffic: one pooled null against per-class (Mondrian) nulls.

For each model, the benchmark's table (all 50,000 training images; the nulls from test images
0..4,999, per class where a class has at least ``class_null_min`` of them) judges the report
images (test 5,000..9,999), which no part of calibration saw. Per predicted class (and per
true label, judged against it), the share of images with ``p <= rate`` at nominal 1%, for the
per-class p-value the monitor reports and for the pooled p-value of the same scores
(``table.alarm.null_predicted``). A rate holds when its count lies in the central 95% range of
the count for exchangeable inputs (:func:`exchangeable_range`: beta-binomial, the null's own
draw included); the exact binomial interval of the rate is kept in the JSON.

``python -m bench.alarms.class_rates [--models resnet18,vgg_bn]`` writes
``results/class_rates.json`` and prints the table ``bench/README.md`` quotes; ``python -m
bench.alarms`` computes the same numbers beside its detection tables.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.alarms import collect
from bench.alarms.scores import alarm_rate
from bench.alarms.sets import cifar_part
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.atypicality import FISHER_SCORE_NAME, SCORES
from surprise_monitor.monitor.conformal import conditional_level
from surprise_monitor.monitor.options import Thresholds
from surprise_monitor.monitor.table import CalibrationTable

HERE = Path(__file__).resolve().parent
RATE = 0.01
#: The calibration-conditional confidence of the third row (``alarm_confidence``).
CONFIDENCE = 0.9


def exchangeable_range(
    null_size: int,
    inputs: int,
    rate: float,
    confidence: float = 0.0,
    interpolated: bool = False,
    draws: int = 20000,
) -> tuple[int, int]:
    """The central 95% range of the alarm count among ``inputs`` exchangeable normal inputs
    whose p-values come from a null of ``null_size`` scores. Given the null, each input alarms
    with probability ``U``, the share of exchangeable scores above the null's threshold, which
    is ``Beta(j, n + 1 - j)`` with ``j = floor(rate (n + 1))`` over the null's draw (Vovk 2012;
    Bates et al. 2023); the count is then beta-binomial. Both draws count: a class's rate with
    500 held-out and 500 reported images moves by about 0.6 pp at 1%, not the 0.45 pp of the
    binomial interval alone. With ``confidence``, the threshold is the calibration-conditional
    level's ``j`` (:func:`surprise_monitor.monitor.conformal.conditional_level`). With
    ``interpolated`` (and no confidence) the p-values are the interpolated ones and ``U`` is
    :func:`alarm_shares`' (``draws`` Monte Carlo draws)."""
    from scipy.stats import betabinom

    j = threshold_index(null_size, rate, confidence)
    if j < 1:
        return 0, 0
    if interpolated and confidence == 0.0:
        rng = np.random.default_rng(0)
        counts = rng.binomial(inputs, alarm_shares(null_size, rate, draws, rng, True))
        low, high = np.quantile(counts, [0.025, 0.975])
        return int(low), int(high)
    dist = betabinom(inputs, j, null_size + 1 - j)
    return int(dist.ppf(0.025)), int(dist.ppf(0.975))


def threshold_index(null_size: int, rate: float, confidence: float = 0.0) -> int:
    """``j`` of the alarms' threshold ``p <= j / (n + 1)`` on a null of ``n = null_size``
    scores at nominal ``rate`` (with ``confidence``, the calibration-conditional level's):
    exchangeable inputs alarm with probability ``Beta(j, n + 1 - j)``."""
    return int(conditional_level(null_size, rate, confidence) * (null_size + 1) + 1e-9)


def alarm_shares(
    null_size: int, rate: float, draws: int, rng: np.random.Generator, interpolated: bool
) -> np.ndarray:
    """``draws`` draws over the null's draw of the share of exchangeable inputs that alarm at
    nominal ``rate`` (zeros when none can): ``Beta(j, n + 1 - j)``, the mass above the null's
    ``j``-th largest score, or with ``interpolated`` that plus the fraction
    ``r = rate (n + 1) - j`` of the mass between the ``j``-th and the ``j + 1``-th (the
    interpolated p-value's gap, its mass taken as even across it): with the null's ``n + 1``
    spacings exponential, ``(G_j + r E) / (G_j + E + G_{n - j})``."""
    n = null_size
    j = threshold_index(n, rate)
    if j < 1:
        return np.zeros(draws)
    if not interpolated:
        return rng.beta(j, n + 1 - j, size=draws)
    head, gap = rng.gamma(j, size=draws), rng.exponential(size=draws)
    rest = rng.gamma(n - j, size=draws) if n > j else np.zeros(draws)
    return (head + (rate * (n + 1) - j) * gap) / (head + gap + rest)


def overall_range(
    classes: Sequence[tuple[int, int]],
    rate: float,
    draws: int = 20000,
    seed: int = 0,
    interpolated: bool = False,
) -> dict[str, float]:
    """The expected overall alarm rate and the central 95% range of its count when each class's
    ``(null_size, inputs)`` of ``classes`` has p-values from a null of its own
    (:func:`exchangeable_range` per class, summed over the classes by Monte Carlo: ``draws``
    draws of each class's share above its threshold, :func:`alarm_shares`, then of its count).
    With nulls of ``n`` images a class alarms on ``floor(rate (n + 1)) / (n + 1)`` of
    exchangeable inputs on average with conservative p-values, 0.887% at nominal 1% for 450,
    not 1%; with ``interpolated`` ones, on ``rate``."""
    rng = np.random.default_rng(seed)
    total = np.zeros(draws, np.int64)
    expected = 0.0
    for null_size, inputs in classes:
        j = threshold_index(null_size, rate)
        if j < 1:
            continue
        expected += inputs * (rate if interpolated else j / (null_size + 1))
        total += rng.binomial(inputs, alarm_shares(null_size, rate, draws, rng, interpolated))
    low, high = np.quantile(total, [0.025, 0.975])
    return {"expected": expected, "low": int(low), "high": int(high)}


def interval_holds(inputs: int, rate: float) -> np.ndarray:
    """``[inputs + 1]`` bool: for each alarm count ``x`` of ``inputs``, whether its exact
    (Clopper-Pearson) 95% interval holds ``rate``."""
    from scipy.stats import beta

    x = np.arange(inputs + 1)
    with np.errstate(invalid="ignore"):
        low = np.where(x > 0, beta.ppf(0.025, x, inputs - x + 1), 0.0)
        high = np.where(x < inputs, beta.ppf(0.975, x + 1, inputs - x), 1.0)
    return (low <= rate) & (rate <= high)


def expected_interval_misses(
    classes: Sequence[tuple[int, int]],
    rate: float,
    interpolated: bool = True,
    draws: int = 20000,
    seed: int = 0,
) -> float:
    """How many of the ``(null_size, inputs)`` classes of ``classes`` are expected to have an
    alarm count whose exact 95% interval leaves out ``rate``, for exchangeable inputs with
    p-values from a null of their own (Monte Carlo of the null's draw, :func:`alarm_shares`,
    then of the count): the per-class check of issue 20, read against what chance gives."""
    rng = np.random.default_rng(seed)
    total = 0.0
    for null_size, inputs in classes:
        counts = rng.binomial(inputs, alarm_shares(null_size, rate, draws, rng, interpolated))
        total += 1.0 - float(interval_holds(inputs, rate)[counts].mean())
    return total


def per_class(
    p_values: np.ndarray,
    classes: np.ndarray,
    k: int,
    rate: float,
    null_sizes: list[int] | None = None,
) -> list[dict]:
    """:func:`bench.alarms.scores.alarm_rate` of each class's p-values (``classes``: the class
    each input was judged against), with ``expected``: the central 95% range of the count for
    exchangeable inputs (:func:`exchangeable_range`, ``null_sizes[c]`` held-out scores behind
    class c's p-values), and ``holds``: the count lies in it."""
    out = []
    for c in range(k):
        mine = p_values[classes == c]
        if mine.size == 0:
            out.append({"class": c, "inputs": 0})
            continue
        r = alarm_rate(mine, rate)
        n = null_sizes[c] if null_sizes is not None else 0
        low, high = exchangeable_range(n, int(mine.size), rate) if n else (0, int(mine.size))
        out.append({"class": c, **r, "expected": [low, high],
                    "holds": low <= r["alarms"] <= high})  # fmt: skip
    return out


def class_rates(
    table: CalibrationTable, judged: dict[str, np.ndarray], rate: float = RATE
) -> dict[str, Any]:
    """Per-class alarm rates of judged report images (:func:`bench.alarms.collect.judged`),
    with the monitor's p-values and with the pooled null's, against the predicted class and
    (where judged) the true label."""
    alarm = table.alarm
    assert alarm is not None and alarm.null_predicted is not None
    k = table.num_classes
    score = torch.from_numpy(judged["score"]).float()
    out: dict[str, Any] = {"nominal": rate, "class_null_min": alarm.class_null_min}
    pooled = alarm.null_predicted.p_values(score).numpy()
    views = [("predicted", judged["p_value"], judged["classes"])]
    if "p_value_labelled" in judged:
        views.append(("labelled", judged["p_value_labelled"], judged["labels"]))
    n_pooled = alarm.null_predicted.size
    for name, p, classes in views:
        nulls = alarm.class_null(name == "labelled")
        sizes = [n_pooled] * k if nulls is None else nulls.sizes.tolist()
        used = alarm.null_sizes(name == "labelled", k)
        out[name] = {
            "heldout_per_class": sizes,
            "overall": _with_range(alarm_rate(p, rate), n_pooled, rate),
            "per_class": per_class(p, classes, k, rate, used),
        }
    nulls = alarm.class_null(False)
    if nulls is not None:  # the calibration-conditional level (alarm_confidence 0.9)
        sizes = alarm.null_sizes(False, k)
        level = np.array([conditional_level(n, rate, CONFIDENCE) for n in sizes])
        p = judged["p_value"]
        # p <= level is an alarm; alarm_rate(p', rate) counts p' <= rate, so map alarms to 0
        hits = np.where(p <= level[judged["classes"]], 0.0, 1.0)
        rows = per_class(hits, judged["classes"], k, rate)
        for row, n in zip(rows, sizes, strict=True):
            if row["inputs"]:
                low, high = exchangeable_range(n, row["inputs"], rate, CONFIDENCE)
                row.update(expected=[low, high], holds=low <= row["alarms"] <= high,
                           exceeds_nominal=row["rate"] > rate)  # fmt: skip
        out["predicted"]["conditional_per_class"] = rows
    out["predicted"]["pooled_overall"] = _with_range(alarm_rate(pooled, rate), n_pooled, rate)
    out["predicted"]["pooled_per_class"] = per_class(
        pooled, judged["classes"], k, rate, [n_pooled] * k
    )
    return out


def resplit_rates(
    scores: np.ndarray,
    classes: np.ndarray,
    k: int,
    rate: float = RATE,
    splits: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """How the per-class rates move with the draw of the null: ``splits`` random halvings of
    the judged images (``scores``, ``classes``: every image's score and the class it was
    judged against; the scores do not depend on the null), each half's per-class conformal
    null (:func:`surprise_monitor.monitor.conformal` p-values, ``(1 + #{null >= s}) / (n + 1)``
    counted here with numpy) judging the other half. Per class: the mean rate and the share of
    splits whose count lies in :func:`exchangeable_range` (95% by construction when the
    classes' p-values are valid); ``all_hold``: the share of splits where every class's does.
    One fixed split is one draw of this; the same images judged by several models draw
    together."""
    s = np.asarray(scores, np.float64)
    c = np.asarray(classes)
    rng = np.random.default_rng(seed)
    holds = np.zeros((splits, k), bool)
    rates = np.full((splits, k), np.nan)
    for i in range(splits):
        order = rng.permutation(s.size)
        null, judged = order[: s.size // 2], order[s.size // 2 :]
        for cls in range(k):
            ref = np.sort(s[null][c[null] == cls])
            mine = s[judged][c[judged] == cls]
            if ref.size == 0 or mine.size == 0:
                continue
            p = (1 + ref.size - np.searchsorted(ref, mine, side="left")) / (ref.size + 1)
            alarms = int((p <= rate).sum())
            low, high = exchangeable_range(ref.size, mine.size, rate)
            holds[i, cls], rates[i, cls] = low <= alarms <= high, alarms / mine.size
    return {"splits": splits, "seed": seed, "nominal": rate,
            "mean_rate": np.nanmean(rates, axis=0).round(6).tolist(),
            "within_range": holds.mean(axis=0).round(4).tolist(),
            "all_hold": float(holds.all(axis=1).mean())}  # fmt: skip


def _with_range(r: dict, null_size: int, rate: float) -> dict:
    """An overall rate with its exchangeable range and ``holds`` (see :func:`per_class`)."""
    low, high = exchangeable_range(null_size, r["inputs"], rate)
    return {**r, "expected": [low, high], "holds": low <= r["alarms"] <= high}


def _cell(r: dict) -> str:
    """``1.2% (6/500; 1-10)``: the rate, the count and the central 95% range of the count for
    exchangeable inputs; bold when the count is outside it."""
    if not r.get("inputs"):
        return "-"
    low, high = r["expected"]
    text = f"{r['rate']:.1%} ({r['alarms']}/{r['inputs']}; {low}-{high})"
    return text if r["holds"] else f"**{text}**"


def markdown(results: dict[str, dict[str, Any]], names: Sequence[str] | None = None) -> str:
    """One table per model: per predicted class, the images, the pooled and per-class rates."""
    lines = []
    for model, res in results.items():
        pred = res["predicted"]
        k = len(pred["per_class"])
        labels = list(names) if names and len(names) == k else [str(c) for c in range(k)]
        lines += [
            f"**{model}** (nominal {res['nominal']:.0%}; per-class nulls for classes with >= "
            f"{res['class_null_min']} held-out images; each cell: rate (alarms / images; the "
            "central 95% range of the count for exchangeable normal inputs, the null's draw "
            "included), bold when outside it)",
            "",
            "| judged against | " + " | ".join(labels) + " | all |",
            "|---|" + "---:|" * (k + 1),
            "| held-out images (null) | "
            + " | ".join(map(str, pred["heldout_per_class"] or []))
            + f" | {sum(pred['heldout_per_class'] or [])} |",
            "| report images (predicted) | "
            + " | ".join(str(r["inputs"]) for r in pred["per_class"])
            + f" | {pred['overall']['inputs']} |",
            "| pooled null, predicted class | "
            + " | ".join(_cell(r) for r in pred["pooled_per_class"])
            + f" | {_cell(pred['pooled_overall'])} |",
            "| **per-class null, predicted class** | "
            + " | ".join(_cell(r) for r in pred["per_class"])
            + f" | {_cell(pred['overall'])} |",
        ]
        if "conditional_per_class" in pred:
            lines.append(
                f"| per-class null, predicted, confidence {CONFIDENCE:g} | "
                + " | ".join(_cell(r) for r in pred["conditional_per_class"])
                + " | - |"
            )
        if "labelled" in res:
            lab = res["labelled"]
            lines.append(
                "| per-class null, true label | "
                + " | ".join(_cell(r) for r in lab["per_class"])
                + f" | {_cell(lab['overall'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def run_model(name: str, log: Any = print, score: str = FISHER_SCORE_NAME) -> dict[str, Any]:
    """The per-class rates of one model with the library's ``score`` (its table and judged
    report images are cached), and their spread over re-drawn nulls (:func:`resplit_rates`, on
    the judged null and report images together)."""
    model = collect.load_model(name)
    table = collect.table_of(name, model, log, score)
    kind = collect.table_kind(score)
    with SurpriseMonitor(model, table, thresholds=Thresholds(alarm_rate=RATE)) as monitor:
        judged = collect.judged(name, monitor, cifar_part("report"), kind)
        null_part = collect.judged(name, monitor, cifar_part("selection"), kind)
    res = class_rates(table, judged)
    res["class_names"] = list(table.class_names or [])
    both = [np.concatenate([null_part[f], judged[f]]) for f in ("score", "classes")]
    res["resplits"] = resplit_rates(*both, table.num_classes)
    return res


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: see the module docstring."""
    from bench.strong_models import STRONG_MODELS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(STRONG_MODELS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results" / "class_rates.json"))
    p.add_argument("--score", default=FISHER_SCORE_NAME, choices=SCORES, help="the library's score")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = Path(args.out)
    results = json.loads(path.read_text()) if path.is_file() else {}
    for name in args.models.split(","):
        started = time.perf_counter()
        results[name] = run_model(name, score=args.score)
        results[name]["score"] = args.score
        results[name]["seconds"] = round(time.perf_counter() - started)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)
    first = next(iter(results.values()))
    print(markdown(results, first.get("class_names")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
