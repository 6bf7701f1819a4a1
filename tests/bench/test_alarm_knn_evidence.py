"""bench.alarms.knn_evidence: the benchmark's KNN table equals the library's calibration, the
feature check, the checks and the leave-one-model-out of the rule by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from bench.alarms import knn_evidence as ke
from surprise_monitor.calibrate import calibrate
from surprise_monitor.calibrate.evidence_choice import RULES
from surprise_monitor.calibrate.options import AlarmOptions, RunOptions
from surprise_monitor.monitor.atypicality import GATED_SCORE_NAME
from tests._models import class_images, trained_tiny_cnn


def _head_means(model, x: torch.Tensor) -> np.ndarray:
    """The tiny CNN's head layer's channel means (its classifier's input)."""
    with torch.no_grad():
        return model.features(x).mean(dim=(2, 3)).numpy()


def test_the_bench_s_knn_table_is_the_library_s_calibration():
    """A table calibrated without the bank, given it by ``with_knn`` from every training
    image's head features, equals the table calibrated with it (600 images: all of them are
    reference images, as all 50,000 are not in the benchmark, hence the default's size)."""
    model = trained_tiny_cnn(steps=12)
    x, y = class_images(1000, 3, seed=1)
    kwargs = {"progress": False, "run": RunOptions(batch_size=50)}
    train, options = TensorDataset(x[:600], y[:600]), {"score": GATED_SCORE_NAME,
                                                        "evidence": "energy"}  # fmt: skip
    built = calibrate(model, train, alarm=AlarmOptions(**options), **kwargs).alarm
    plain = calibrate(model, train, alarm=AlarmOptions(knn_bank=0, **options), **kwargs)
    table = ke.with_knn(plain, _head_means(model, x[:600]))
    got = table.alarm
    assert got.component_names() == built.component_names()
    assert got.knn.k == built.knn.k and torch.allclose(got.knn.bank, built.knn.bank, atol=1e-6)
    for a, b in zip(got.reference.sorted_components, built.reference.sorted_components,
                    strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    feats = torch.from_numpy(_head_means(model, x[600:]))
    direct = ke.ScoreReference(built.reference.sorted_components[-1:], "exponential")
    torch.testing.assert_close(ke.knn_ranks(table, feats),
                               direct.ranks(built.knn(feats)[:, None])[:, 0])  # fmt: skip
    # the feature check: 0 for the head's channel means, not for other features
    names = got.component_names()
    found = {"features": _head_means(model, x[600:700]),
             "components": np.zeros((100, len(names)), np.float32)}  # fmt: skip
    head = ke.HeadDistance.of(got.head_means, got.head_precision)
    found["components"][:, names.index("head_distance:features")] = head(
        torch.from_numpy(found["features"])
    ).numpy()
    assert ke.check_features(table, found) < 1e-6
    # a judged set's columns: its components, then the KNN distance of its features
    both = ke.knn_columns(table, found)
    torch.testing.assert_close(both[:, :-1], torch.from_numpy(found["components"]))
    torch.testing.assert_close(both[:, -1], built.knn(torch.from_numpy(found["features"])))
    found["features"] = found["features"] * 1.5
    assert ke.check_features(table, found) > 0.1


def test_the_checks_are_loo_s():
    base = {"MSP": 0.7, "MaxLogit": 0.75, "Energy": 0.78, "KNN": 0.6}
    aurocs = {
        "a": {**base, "x": 0.80},  # beats every baseline
        "b": {**base, "x": 0.74},  # 0.04 behind Energy: missed
        "mnist": {**base, "x": 0.96},
    }
    family_of = {"a": "geometry", "b": "occlusion", "mnist": "far"}
    c = ke.checks(aurocs, family_of, "x", "m")
    assert (c["beats"], c["beats_of"]) == (2, 3) and c["passed"] is False
    assert c["worst_margin"] == pytest.approx(0.74 - 0.78 + 0.03)
    assert c["mnist_min"] == pytest.approx(0.96)


def test_the_rule_is_chosen_on_the_other_models():
    """Each model held out gets the rule whose picks pass most (then beat most) on the
    others' selection part, and its pick's report verdict."""
    picks = {
        "m1": {r: "good" if r == "median" else "bad" for r in RULES},
        "m2": {r: "good" if r in ("median", "mean") else "bad" for r in RULES},
        "m3": {r: "good" if r == "mean" else "bad" for r in RULES},
    }
    results = {m: {"picks": p} for m, p in picks.items()}
    beats = {"good": 30, "bad": 10}

    def verdict(model: str, part: str, variant: str) -> dict:
        return {"passed": variant == "good", "beats": beats[variant] + (part == "report")}

    rotations = {r["held_out"]: r for r in ke.rule_rotations(results, verdict)}
    assert rotations["m1"]["rule"] == "mean"  # on m2 and m3: mean passes both
    assert rotations["m1"]["seen"] == (2, 60) and rotations["m1"]["picks"] == "bad"
    assert rotations["m1"]["report"] == {"passed": False, "beats": 11}
    assert rotations["m3"]["rule"] == "median" and rotations["m3"]["picks"] == "bad"
    assert rotations["m2"]["rule"] == "mean"  # a tie (1 each): the first listed
    assert rotations["m2"]["report"]["passed"] is True
    # the closest call: the best-ranked rule picking otherwise on the held-out model
    # on m2, median ties with mean but picks as mean does: the closest other pick is worst's
    assert rotations["m2"]["runner_up"] == {
        "rule": "worst", "seen": (0, 20), "picks": "bad",
        "report": {"passed": False, "beats": 11}}  # fmt: skip
    assert rotations["m1"]["runner_up"] == {
        "rule": "median", "seen": (1, 40), "picks": "good",
        "report": {"passed": True, "beats": 31}}  # fmt: skip
    same = {m: {"picks": dict.fromkeys(RULES, "good")} for m in picks}
    assert all(r["runner_up"] is None for r in ke.rule_rotations(same, verdict))


def test_a_class_count_is_judged_against_the_exchangeable_range():
    from scipy.stats import betabinom

    j = int(0.01 * 501)  # the null's threshold index at 1% for 500 held-out scores
    low, high = betabinom(400, j, 501 - j).ppf([0.025, 0.975]).astype(int)
    row = {"null_size": 500, "inputs": 400}
    assert ke.in_range({**row, "alarms": int(low)}) and ke.in_range({**row, "alarms": int(high)})
    assert not ke.in_range({**row, "alarms": int(high) + 1})


def test_the_baselines_are_scored_once_per_set():
    """``memoised`` gives the baselines' own scores, computing them once per distinct judged
    set (a part's CIFAR-10 images are every set's reference), and again for other features."""
    from bench.alarms.scores import Baselines

    rng = np.random.default_rng(0)
    feats, labels = rng.normal(size=(300, 8)).astype(np.float32), rng.integers(0, 3, 300)
    baselines = Baselines(feats, labels, k=5)
    calls = []
    original = baselines.scores
    baselines.scores = lambda found: calls.append(1) or original(found)  # type: ignore[method-assign]
    scores = ke.memoised(baselines)
    found = {"features": feats[:40], "logits": rng.normal(size=(40, 3)).astype(np.float32)}
    first = scores(found)
    again = scores({k: v.copy() for k, v in found.items()})
    direct = original(found)
    assert len(calls) == 1 and first is again
    for name, values in direct.items():
        np.testing.assert_array_equal(first[name], values)
    scores({**found, "logits": found["logits"] + 1.0})
    assert len(calls) == 2


def test_the_default_variant_is_chosen_on_the_other_models():
    """``variant_rotations``: loo's rule over the variants on the other models' selection
    part, reported on the held-out model's report part; with ``auto`` under each rule as
    candidates, each model's own pick stands in for it."""
    base = {"MSP": 0.70, "MaxLogit": 0.71, "Energy": 0.72, "KNN": 0.69}

    def part(best: str, value: float = 0.80) -> dict:
        row = {**dict.fromkeys(ke.VARIANTS, 0.60), **base, best: value}
        return {"x": row, "y": dict(row)}

    lk, e = "learned+knn, family held out", "energy"
    results = {
        m: {"aurocs": {"selection": part(sel), "report": part(rep, 0.75)},
            "families": {"x": "geometry", "y": "blur"},
            "picks": dict.fromkeys(RULES, "energy")}
        for m, sel, rep in (("a", lk, lk), ("b", lk, e), ("c", e, lk))
    }  # fmt: skip
    rotations = {r["held_out"]: r for r in ke.variant_rotations(results)}
    # held out c: a and b's selection parts choose learned+knn, which scores 0.75 on c's report
    assert rotations["c"]["chosen"] == lk
    assert {r["auroc"] for r in rotations["c"]["rows"]} == {0.75}
    # held out a: learned+knn wins b's, energy c's; both equally behind elsewhere: a tie on the
    # worst margin (0.60 - 0.72) and the sets won (2 each), then the name
    assert rotations["a"]["chosen"] == min(e, lk)
    with_auto = {r["held_out"]: r for r in ke.variant_rotations(results, with_auto=True)}
    ranking = {row["name"]: row for row in with_auto["c"]["ranking"]}
    assert ranking["auto:mean"]["worst_margin"] == ranking[e]["worst_margin"]
    assert {f"auto:{rule}" for rule in RULES} <= set(ranking)
