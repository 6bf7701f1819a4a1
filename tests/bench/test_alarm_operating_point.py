"""bench.alarms.operating_point: per-class conformal alarm shares against numpy counting, the
gate's thresholds at a level of the null's statistics, the re-scored gate against the library's,
and the table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.alarms import operating_point as op
from surprise_monitor.monitor.atypicality import GATE_OFFSET, Gate, ScoreReference


def _by_hand(null, null_cls, scores, cls, rate, min_size=200):
    """Each score's p-value among its class's null (pooled below ``min_size``), counted."""
    p = np.empty(len(scores))
    for i, (s, c) in enumerate(zip(scores, cls, strict=True)):
        ref = null[null_cls == c] if (null_cls == c).sum() >= min_size else null
        p[i] = (1 + (ref >= s).sum()) / (ref.size + 1)
    return float((p <= rate).mean())


def test_alarm_share_counts_per_class_p_values_with_the_pooled_fallback():
    rng = np.random.default_rng(0)
    null_cls = np.r_[np.zeros(400, int), np.ones(300, int), np.full(50, 2)]  # class 2: pooled
    null = rng.normal(size=null_cls.size) + null_cls  # each class its own scale
    cls = rng.integers(0, 3, 3000)
    scores = rng.normal(size=cls.size) + cls + rng.choice([0.0, 3.0], cls.size, p=[0.9, 0.1])
    for rate in (0.01, 0.05):
        want = _by_hand(null.astype(np.float32), null_cls, scores.astype(np.float32), cls, rate)
        got = op.alarm_share(null, null_cls, scores, cls, 3, rate)
        assert got == pytest.approx(want, abs=1e-12)
    # exchangeable traffic alarms at about the nominal rate; the shifted one far more
    same = rng.normal(size=20000)
    same_cls = np.zeros(20000, int)
    assert op.alarm_share(null[:400], null_cls[:400], same, same_cls, 1) == pytest.approx(
        0.01, abs=0.006
    )
    assert op.alarm_share(null[:400], null_cls[:400], same + 3, same_cls, 1) > 0.3


def _gate_and_reference(rng, m=2000):
    """A reference of three components (evidence, two gate columns) and its gate."""
    rows = torch.from_numpy(rng.normal(size=(m, 3))).float()
    return Gate.columns(["energy", "stage_distance:a", "stage_distance:b"], "energy"), (
        ScoreReference.of(rows, "exponential")
    )


def test_the_thresholds_open_the_gate_on_the_asked_share_and_rescoring_is_the_gates():
    rng = np.random.default_rng(1)
    gate, reference = _gate_and_reference(rng)
    null = {"components": rng.normal(size=(5000, 3)).astype(np.float32)}
    thresholds = op.gate_thresholds(null, gate, reference, (0.005, 0.02))
    stat = gate.statistic(reference.ranks(torch.from_numpy(null["components"]))).numpy()
    for level, t in thresholds.items():
        assert t == pytest.approx(np.quantile(stat.astype(np.float64), 1 - level), rel=1e-6)
        assert (stat >= t).mean() == pytest.approx(level, abs=1.0 / 5000)
    found = {
        "components": null["components"][:300],
        "score": np.arange(300.0),
        "logits": rng.normal(size=(300, 4)).astype(np.float32),
    }
    out = op.rescored(found, gate, reference, thresholds)
    assert list(out) == [op.LIBRARY, "gate 0.005", "gate 0.02", op.ENERGY]
    np.testing.assert_array_equal(out[op.LIBRARY], found["score"])
    ranks = reference.ranks(torch.from_numpy(found["components"]))
    for level, t in thresholds.items():
        want = Gate(gate.gate, gate.evidence, t).score(ranks).double().numpy()
        np.testing.assert_array_equal(out[op.gate_label(level)], want)
    opened = (out["gate 0.02"] > GATE_OFFSET).mean(), (out["gate 0.005"] > GATE_OFFSET).mean()
    assert opened[0] > opened[1]
    lse = np.log(np.exp(found["logits"].astype(np.float64)).sum(1))
    np.testing.assert_allclose(out[op.ENERGY], -lse, rtol=1e-5)


def test_the_markdown_table_shows_each_family_rate_and_auroc():
    results = {
        "m": {
            "evidence": "energy",
            "normal_rate": {"library": 0.009, "Energy alone": 0.011},
            "families": {
                "far": {
                    "rate:library": 0.9,
                    "auroc:library": 0.99,
                    "rate:Energy alone": 0.05,
                    "auroc:Energy alone": 0.8,
                },
            },  # fmt: skip
        }
    }
    text = op.markdown(results)
    assert "| score | normal | far |" in text
    assert "| library | 0.90 | 90.0 (0.990) |" in text
    assert "| Energy alone | 1.10 | 5.0 (0.800) |" in text


def test_tally_reads_every_family_set_and_judges_nominal_sets_against_the_same_images(
    tmp_path, monkeypatch
):
    """A fake cache: the null and the report part's CIFAR-10 images exchangeable, every shifted
    set shifted by its index; the nominal sets are the report images' first ``n`` themselves."""
    from bench.alarms import collect
    from bench.alarms.sets import families
    from bench.paper.metrics import auroc

    monkeypatch.setattr(collect, "folder", lambda name: tmp_path / name)
    rng = np.random.default_rng(2)
    n, kind, root = 50, "k", tmp_path / "m"
    (root / "sets" / kind).mkdir(parents=True)
    (root / "families" / kind / f"n{n}").mkdir(parents=True)

    def save(path, scores, classes):
        np.savez(path, score=scores, classes=classes)

    null, clean = rng.normal(size=1000), rng.normal(size=600)
    save(root / "sets" / kind / "selection__cifar10.npz", null, rng.integers(0, 2, 1000))
    save(root / "sets" / kind / "report__cifar10.npz", clean, rng.integers(0, 2, 600))
    made = {}
    for i, name in enumerate(n for names in families().values() for n in names):
        scores = clean[:n] if name == "hflip" else rng.normal(size=n) + 0.05 * i
        made[name] = scores
        save(root / "families" / kind / f"n{n}" / f"report__{name.replace(' ', '_')}.npz", scores,
             rng.integers(0, 2, n))  # fmt: skip
    out = op.tally("m", kind, n, lambda f: {"s": f["score"]}, 2)
    assert set(out["families"]) == set(families())
    far = families()["far"]
    want = [auroc(clean, made[name]) for name in far]
    assert out["families"]["far"]["auroc:s"] == pytest.approx(want)
    nominal = families()["nominal"]
    assert out["families"]["nominal"]["auroc:s"][nominal.index("hflip")] == pytest.approx(0.5)
    with (
        np.load(root / "sets" / kind / "report__cifar10.npz") as c,
        np.load(root / "sets" / kind / "selection__cifar10.npz") as z,
    ):
        rate = op.alarm_share(z["score"], z["classes"], c["score"], c["classes"], 2)
    assert out["normal_rate"]["s"] == rate


def test_the_level_leave_one_out_takes_each_tables_own_variant_and_the_benchmarks_rule():
    """Two levels of three models: the wide gate is the only one whose MNIST set reaches 0.95,
    so the rule takes it wherever it is seen; each candidate is the table's own variant."""

    def results(mnist: float, variant_shift: float) -> dict:
        sets = {
            "mnist": {"MSP": 0.8, "MaxLogit": 0.8, "Energy": 0.8, "KNN": 0.9,
                      "library energy": mnist, "library energy+mass": mnist - variant_shift},
            "rotate90": {"MSP": 0.7, "MaxLogit": 0.7, "Energy": 0.7, "KNN": 0.6,
                         "library energy": 0.71, "library energy+mass": 0.6},
        }  # fmt: skip
        return {part: sets for part in ("selection", "report")}

    by_level = {
        0.005: {m: results(0.90, 0.5) for m in ("a", "b", "c")},
        0.015: {m: results(0.97, 0.5) for m in ("a", "b", "c")},
    }
    evidence = {(m, lv): "energy" for m in ("a", "b", "c") for lv in by_level}
    aurocs = op.level_aurocs(by_level, evidence)
    assert aurocs["a"]["report"]["mnist"]["gate 0.005"] == 0.90
    assert aurocs["a"]["report"]["mnist"]["gate 0.015"] == 0.97
    assert aurocs["a"]["report"]["rotate90"]["Energy"] == 0.7
    rotations = op.level_leave_one_model_out(aurocs)
    assert [r["chosen"] for r in rotations] == ["gate 0.015"] * 3
    assert all(r["summary"]["mnist_ok"] and r["summary"]["within"] for r in rotations)
    evidence[("b", 0.015)] = "energy+mass"  # b's wide table chose the other variant
    assert op.level_aurocs(by_level, evidence)["b"]["report"]["mnist"]["gate 0.015"] == 0.47
