"""bench.alarms: alarm rates with exact intervals, detection metrics, the tables, the image sets'
split (checked with scipy / sklearn / by hand)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import beta as beta_dist
from sklearn.metrics import roc_auc_score
from torch.utils.data import TensorDataset

from bench.alarms import report, scores, sets
from bench.cifar import load_cifar10


@pytest.mark.parametrize(("k", "n"), [(0, 200), (3, 400), (45, 5000), (200, 200)])
def test_alarm_rate_counts_and_clopper_pearson_interval(k, n):
    rng = np.random.default_rng(k + n)
    p = np.concatenate([rng.uniform(0.0, 0.01, k), rng.uniform(0.0101, 1.0, n - k)])
    got = scores.alarm_rate(rng.permutation(p), 0.01)
    assert (got["alarms"], got["inputs"]) == (k, n) and got["rate"] == pytest.approx(k / n)
    low = 0.0 if k == 0 else beta_dist.ppf(0.025, k, n - k + 1)
    high = 1.0 if k == n else beta_dist.ppf(0.975, k + 1, n - k)
    assert got["ci_low"] == pytest.approx(low, abs=1e-9)
    assert got["ci_high"] == pytest.approx(high, abs=1e-9)


def test_alarm_rate_refuses_missing_p_values():
    with pytest.raises(ValueError, match="finite"):
        scores.alarm_rate(np.array([0.5, np.nan]), 0.01)


def test_detection_auroc_and_fpr95_against_sklearn_and_by_hand():
    rng = np.random.default_rng(0)
    inlier = {"a": rng.normal(0, 1, 400), "b": np.arange(100.0)}
    outlier = {"a": rng.normal(1, 1, 300), "b": np.arange(50.0, 150.0)}
    got = scores.detection(inlier, outlier)
    truth = np.r_[np.zeros(400), np.ones(300)]
    want = roc_auc_score(truth, np.r_[inlier["a"], outlier["a"]])
    assert got["a"]["auroc"] == pytest.approx(want)
    # b: the threshold that keeps 95 of 100 outliers (>= 55) passes inliers 55..99: 45%.
    assert got["b"]["fpr95"] == pytest.approx(0.45, abs=0.011)


def _results() -> dict:
    shown = (*scores.CANDIDATES, *scores.BASELINES)
    s = {k: {"auroc": 0.5, "fpr95": 0.9} for k in shown}
    s[report.DEFAULT] = {"auroc": 0.97, "fpr95": 0.1}
    s["KNN"] = {"auroc": 0.99, "fpr95": 0.05}
    rate = {"nominal": 0.01, "alarms": 9, "inputs": 1000, "rate": 0.009, "ci_low": 0.004,
            "ci_high": 0.017}  # fmt: skip
    return {
        "model": "tiny",
        "parts": {"report": {"sets": {"mnist": {"scores": s}}}},
        "alarm_rates": {"predicted": [rate], "labelled": [rate]},
        "resampled_alarm_rates": [
            {"nominal": 0.01, "mean": 0.0098, "p5": 0.007, "p95": 0.0126, "draws": 2000}
        ],
    }


def test_markdown_shows_the_margin_to_the_best_baseline_and_the_rates():
    text = report.markdown(_results())
    row = next(line for line in text.splitlines() if line.startswith("| mnist |"))
    assert row.endswith("| -0.020 (KNN) |") and "0.970 / 0.100" in row
    assert "nominal 1.0%: 0.90% (9/1000; 0.40% - 1.70%)" in text
    assert "2000 random re-splits" in text and "mean 0.98% (5-95%: 0.70% - 1.26%;" in text


def test_the_selection_and_report_parts_share_no_image():
    pytest.importorskip("skimage")
    try:
        load_cifar10("test")
    except (FileNotFoundError, OSError) as e:  # pragma: no cover - data ships with the machine
        pytest.skip(f"CIFAR-10 not found: {e}")
    sel, rep = sets.cifar_part("selection"), sets.cifar_part("report")
    assert len(sel.images) == len(rep.images) == 5000
    flat = {img.tobytes() for img in sel.images}
    assert sum(img.tobytes() in flat for img in rep.images) <= 2  # CIFAR has a few duplicates
    a, b = sets.photo_crops("selection", 12), sets.photo_crops("report", 12)
    assert a.shape == b.shape == (12, 32, 32, 3) and not np.array_equal(a, b)
    with pytest.raises(ValueError, match="part must be one of"):
        sets.atypical_sets("train")


def test_the_ablation_without_the_head_is_fishers_combination_of_the_other_components():
    from types import SimpleNamespace

    import torch

    from bench.alarms.collect import with_ablations
    from surprise_monitor.monitor.atypicality import ScoreReference

    rng = np.random.default_rng(3)
    ref = rng.gamma(2.0, size=(200, 3))
    table = SimpleNamespace(
        alarm=SimpleNamespace(reference=ScoreReference.of(torch.from_numpy(ref)), head_layer="h")
    )
    parts = rng.gamma(2.0, size=(25, 3)).astype(np.float32)
    got = with_ablations({"components": parts}, table)["score_without_head"]
    ranks = [(1 + (ref[:, j][None, :] >= parts[:, j][:, None]).sum(1)) / 201 for j in (0, 1)]
    np.testing.assert_allclose(got, -2 * np.log(ranks).sum(0), rtol=1e-5)
    without = SimpleNamespace(alarm=SimpleNamespace(reference=None, head_layer=""))
    assert "score_without_head" not in with_ablations({"components": parts}, without)


def test_class_rates_per_class_against_numpy_and_the_pooled_null():
    """Per-class rates of the monitor's (per-class) p-values and of the pooled null's, by
    numpy counting, with the table's per-class null sizes; the markdown bolds a class whose
    nominal rate lies outside its interval."""
    from bench.alarms import class_rates
    from surprise_monitor.calibrate import calibrate
    from surprise_monitor.calibrate.options import AlarmOptions, RunOptions
    from surprise_monitor.monitor import SurpriseMonitor
    from tests._models import class_images, trained_tiny_cnn

    model = trained_tiny_cnn(steps=12)
    x, y = class_images(1600, 3, seed=1)
    table = calibrate(model, TensorDataset(x[:600], y[:600]),
                      heldout=TensorDataset(x[600:1200], y[600:1200]), progress=False,
                      run=RunOptions(batch_size=50),
                      alarm=AlarmOptions(reference_images=300, class_null_min=100))  # fmt: skip
    fresh, labels = x[1200:], y[1200:]
    with SurpriseMonitor(model, table) as monitor:
        r, rl = monitor.inspect(fresh), monitor.inspect(fresh, labels)
    judged = {"score": r.score.numpy(), "p_value": r.p_value.numpy(),
              "classes": r.classes.numpy(), "p_value_labelled": rl.p_value.numpy(),
              "labels": labels.numpy()}  # fmt: skip
    out = class_rates.class_rates(table, judged, rate=0.05)
    pooled = table.alarm.null_predicted.p_values(r.score).numpy()
    for c in range(3):
        mine = r.classes.numpy() == c
        got = out["predicted"]["per_class"][c]
        assert (
            got["inputs"] == mine.sum() and got["alarms"] == (r.p_value.numpy()[mine] <= 0.05).sum()
        )
        assert out["predicted"]["pooled_per_class"][c]["alarms"] == (pooled[mine] <= 0.05).sum()
        low, high = class_rates.exchangeable_range(table.alarm.null_predicted.size, got["inputs"],
                                                   0.05)  # fmt: skip
        if table.alarm.class_null_predicted.own[c]:
            n_c = int(table.alarm.class_null_predicted.sizes[c])
            low, high = class_rates.exchangeable_range(n_c, got["inputs"], 0.05)
        assert got["expected"] == [low, high] and got["holds"] == (low <= got["alarms"] <= high)
        lab = out["labelled"]["per_class"][c]
        assert lab["alarms"] == (rl.p_value.numpy()[labels.numpy() == c] <= 0.05).sum()
    assert out["predicted"]["heldout_per_class"] == table.alarm.class_null_predicted.sizes.tolist()
    from surprise_monitor.monitor.conformal import conditional_level

    nulls, n_all = table.alarm.class_null_predicted, table.alarm.null_predicted.size
    for c, row in enumerate(out["predicted"]["conditional_per_class"]):
        n_c = int(nulls.sizes[c]) if nulls.own[c] else n_all
        level = conditional_level(n_c, 0.05, class_rates.CONFIDENCE)
        mine = r.classes.numpy() == c
        assert row["alarms"] == (r.p_value.numpy()[mine] <= level).sum()
    text = class_rates.markdown({"tiny": out}, ["a", "b", "c"])
    assert "| judged against | a | b | c | all |" in text
    assert "| **per-class null, predicted class** |" in text and "| pooled null" in text
    made = {"tiny": {**out, "predicted": {**out["predicted"], "per_class": [
        {**out["predicted"]["per_class"][0], "rate": 0.5, "alarms": 50, "inputs": 100,
         "expected": [1, 9], "holds": False}, *out["predicted"]["per_class"][1:]]}}}  # fmt: skip
    assert "| **50.0% (50/100; 1-9)** |" in class_rates.markdown(made)


def test_the_exchangeable_range_matches_a_simulation_of_null_and_traffic():
    """Draw a null of n exchangeable scores and m more, count the m whose conformal p-value is
    at most the rate: the simulated count's 2.5% and 97.5% quantiles are the beta-binomial
    range (within one count), wider than the binomial one at the nominal rate."""
    from scipy.stats import binom

    from bench.alarms import class_rates

    rng = np.random.default_rng(0)
    n, m, rate, draws = 499, 500, 0.01, 4000
    counts = np.empty(draws)
    for d in range(draws):
        null = np.sort(rng.random(n))
        test = rng.random(m)
        above = n - np.searchsorted(null, test, side="left")
        counts[d] = np.sum((1 + above) / (n + 1) <= rate)
    low, high = class_rates.exchangeable_range(n, m, rate)
    assert (
        abs(np.quantile(counts, 0.025) - low) <= 1 and abs(np.quantile(counts, 0.975) - high) <= 1
    )
    assert high > binom(m, 0.01).ppf(0.975)  # the null's draw widens it
    assert class_rates.exchangeable_range(50, 100, 0.01) == (0, 0)  # no score can alarm


def test_the_overall_range_sums_the_classes_exchangeable_counts():
    """One class: the beta-binomial range and mean; two classes with nulls of 450 and 99: the
    mean of each class's ``floor(rate (n + 1)) / (n + 1)`` (0.887% and 1%), and a simulation
    of both nulls and their traffic gives the same range (within two counts)."""
    from bench.alarms import class_rates

    one = class_rates.overall_range([(499, 500)], 0.01)
    assert one["expected"] == pytest.approx(500 * 5 / 500)
    low, high = class_rates.exchangeable_range(499, 500, 0.01)
    assert abs(one["low"] - low) <= 1 and abs(one["high"] - high) <= 1
    both = class_rates.overall_range([(450, 600), (99, 400)], 0.01)
    assert both["expected"] == pytest.approx(600 * 4 / 451 + 400 * 1 / 100)
    rng = np.random.default_rng(2)
    counts = np.zeros(4000)
    for n, m in ((450, 600), (99, 400)):
        for d in range(len(counts)):
            null = np.sort(rng.random(n))
            above = n - np.searchsorted(null, rng.random(m), side="left")
            counts[d] += np.sum((1 + above) / (n + 1) <= 0.01)
    assert abs(np.quantile(counts, 0.025) - both["low"]) <= 2
    assert abs(np.quantile(counts, 0.975) - both["high"]) <= 2
    assert counts.mean() == pytest.approx(both["expected"], rel=0.03)


def test_resplits_of_exchangeable_scores_hold_and_ties_silence_a_class():
    """Re-drawn halvings: with continuous exchangeable scores each class alarms at about the
    nominal rate and its count lies in the exchangeable range in about 95% of the splits; a
    class whose scores all tie never alarms (every p-value is at least one half), the silence
    that step tail ranks gave the images beyond every training image."""
    from bench.alarms import class_rates

    rng = np.random.default_rng(1)
    classes = rng.integers(0, 3, size=6000)
    scores = rng.normal(size=6000)
    scores[classes == 2] = 7.0  # every score of class 2 ties
    out = class_rates.resplit_rates(scores, classes, 3, rate=0.01, splits=300, seed=2)
    assert out["splits"] == 300 and out["nominal"] == 0.01
    for c in (0, 1):
        assert 0.007 < out["mean_rate"][c] < 0.0105
        assert 0.9 <= out["within_range"][c] <= 1.0
    assert out["mean_rate"][2] == 0.0
    assert out["all_hold"] <= min(out["within_range"])


def test_the_interpolated_ranges_match_a_simulation_of_interpolated_p_values():
    """With interpolated p-values (uniform scores: the mass is even across every gap, so the
    Monte Carlo's share is exact) a class of 450 alarms on 1% on average, not 0.887%, and the
    range of its count and of two classes' total match a simulation of the nulls, the traffic
    and the library's p-values (within two counts)."""
    from bench.alarms import class_rates
    from surprise_monitor.monitor.conformal import ConformalNull

    rng = np.random.default_rng(5)
    counts = {450: np.zeros(3000), 99: np.zeros(3000)}
    for n, found in counts.items():
        for d in range(len(found)):
            null = ConformalNull.of(torch.from_numpy(rng.random(n)))
            p = null.p_values(torch.from_numpy(rng.random(500)), interpolated=True)
            found[d] = int((p <= 0.01).sum())
    assert counts[450].mean() / 500 == pytest.approx(0.01, abs=0.0004)
    low, high = class_rates.exchangeable_range(450, 500, 0.01, interpolated=True)
    assert abs(np.quantile(counts[450], 0.025) - low) <= 2
    assert abs(np.quantile(counts[450], 0.975) - high) <= 2
    both = class_rates.overall_range([(450, 500), (99, 500)], 0.01, interpolated=True)
    assert both["expected"] == pytest.approx(10.0)
    total = counts[450] + counts[99]
    assert abs(np.quantile(total, 0.025) - both["low"]) <= 2
    assert abs(np.quantile(total, 0.975) - both["high"]) <= 2
    shares = class_rates.alarm_shares(450, 0.01, 20000, np.random.default_rng(0), True)
    assert shares.mean() == pytest.approx(0.01, abs=0.0002)


def test_interval_holds_is_the_exact_interval_of_each_count():
    from bench.alarms import class_rates
    from bench.alarms.scores import alarm_rate

    holds = class_rates.interval_holds(500, 0.01)
    for x in (0, 1, 2, 5, 10, 11, 12, 500):
        r = alarm_rate(np.r_[np.zeros(x), np.ones(500 - x)], 0.5)  # x alarms of 500
        assert holds[x] == (r["ci_low"] <= 0.01 <= r["ci_high"]), x
    assert not holds[0] and holds[5] and not holds[500]


def test_the_expected_interval_misses_match_a_simulation_of_the_library_s_p_values():
    """Classes of 450 held-out and 500 reported images: about one in ten misses the exact
    interval once the null's draw counts (the binomial alone: under one in twenty); a
    simulation of nulls, traffic and interpolated p-values agrees."""
    from bench.alarms import class_rates
    from surprise_monitor.monitor.conformal import ConformalNull

    expected = class_rates.expected_interval_misses([(450, 500)] * 10, 0.01)
    holds = class_rates.interval_holds(500, 0.01)
    rng = np.random.default_rng(6)
    missed = 0
    trials = 2000
    for _ in range(trials):
        null = ConformalNull.of(torch.from_numpy(rng.random(450)))
        p = null.p_values(torch.from_numpy(rng.random(500)), interpolated=True)
        missed += not holds[int((p <= 0.01).sum())]
    assert expected / 10 == pytest.approx(missed / trials, abs=0.02)
    assert 0.07 < expected / 10 < 0.14
    binomial_only = class_rates.expected_interval_misses([(10**6, 500)], 0.01)
    assert binomial_only < 0.05
