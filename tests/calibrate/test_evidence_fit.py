"""The learned evidence's fit against scikit-learn's logistic regression, its weights by hand,
the cross-fitted margins of the choice by hand, and a calibration with ``evidence="learned"``
re-fitted from outside."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch.utils.data import TensorDataset

from surprise_monitor.calibrate import calibrate
from surprise_monitor.calibrate import evidence_choice as ec
from surprise_monitor.calibrate import evidence_fit as ef
from surprise_monitor.calibrate.options import AlarmOptions
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.atypicality import GATED_SCORE_NAME, Gate, alarm_kind
from surprise_monitor.monitor.families import family_columns, kind_of
from surprise_monitor.monitor.learned_evidence import (
    LEARNED_EVIDENCE,
    LEARNED_VARIANTS,
    rank_features,
)
from surprise_monitor.monitor.table import CalibrationTable
from tests._models import class_images, trained_tiny_cnn

NAMES = ["expectation_mass", "stage_energy:a", "energy", "stage_distance:a"]
FLOOR = 1.0 / 201


def test_the_weights_give_each_shift_an_equal_share_of_half():
    w = ef.sample_weights(100, [50, 200, 250])
    assert w.numel() == 600 and float(w.mean()) == pytest.approx(1.0)
    assert float(w[:100].sum()) == pytest.approx(300.0)  # half of the 600
    for lo, hi in ((100, 150), (150, 350), (350, 600)):
        assert float(w[lo:hi].sum()) == pytest.approx(100.0)  # a third of the other half
    with pytest.raises(ValueError, match="images of every shift"):
        ef.sample_weights(100, [50, 0])
    with pytest.raises(ValueError, match="images of every shift"):
        ef.sample_weights(100, [])


@pytest.mark.parametrize("c", [1.0, 0.05])
def test_the_fit_is_scikit_learn_s_weighted_logistic_regression(c):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(500, 6, generator=g) * 4
    y = (x[:, 0] - 0.5 * x[:, 3] + torch.randn(500, generator=g) > 1.0).long()
    w = ef.sample_weights(200, [100, 200])
    coef, bias = ef.logistic_fit(x, y, w, c)
    want = LogisticRegression(C=c, tol=1e-12, max_iter=100_000).fit(
        x.numpy().astype(np.float64), y.numpy(), sample_weight=w.numpy()
    )
    np.testing.assert_allclose(coef.numpy(), want.coef_[0], rtol=1e-4, atol=1e-4)
    assert bias == pytest.approx(float(want.intercept_[0]), abs=1e-4)
    with pytest.raises(ValueError, match="C must be > 0"):
        ef.logistic_fit(x, y, w, 0.0)
    with torch.inference_mode():  # a caller in inference mode gets the same fit
        again = ef.logistic_fit(x.clone(), y.clone(), w.clone(), c)
    torch.testing.assert_close(again[0], coef)
    with torch.no_grad():
        torch.testing.assert_close(ef.logistic_fit(x, y, w, c)[0], coef)


def _judged(n: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clean ranks, and shifts that make one component each atypical (small upper ranks)."""
    g = torch.Generator().manual_seed(seed)
    u = lambda: torch.rand(n, len(NAMES), generator=g) * 0.98 + 0.01  # noqa: E731
    clean = u()
    shifted = {}
    for name, col in (("rotate90", 0), ("upside down", 0), ("blur", 1)):
        r = u()
        r[:, col] *= 0.05
        shifted[name] = r
    return clean, shifted


def test_the_fit_and_its_reference_by_hand():
    clean, shifted = _judged(300, 1)
    e = ef.fit_learned_evidence(clean, shifted, FLOOR)
    x = torch.cat([rank_features(r, FLOOR) for r in [clean, *shifted.values()]])
    y = torch.cat([torch.zeros(300), torch.ones(900)])
    coef, bias = ef.logistic_fit(x, y, ef.sample_weights(300, [300] * 3))
    torch.testing.assert_close(e.weights, coef.float())
    assert e.bias == pytest.approx(bias) and e.floor == FLOOR
    torch.testing.assert_close(e.reference, torch.sort(e.decision(clean)).values)
    # the two components the shifts move, in their upper tails, weigh most
    assert set(torch.topk(e.weights, 2).indices.tolist()) == {0, 1}
    assert ec.auroc(e.decision(clean), e.decision(_judged(300, 2)[1]["blur"])) > 0.95


def test_the_learned_margins_are_cross_fitted_without_the_shift_s_family():
    clean, shifted = _judged(200, 3)
    logits = torch.randn(200, 3, generator=torch.Generator().manual_seed(4))
    judged = {k: (r, logits) for k, r in shifted.items()}
    margins = ec.learned_margins(NAMES, 1e9, (clean, logits), judged, FLOOR)
    even = torch.arange(200) % 2
    for name, family in (("rotate90", ("rotate90", "upside down")), ("blur", ("blur",))):
        per_fold = []
        for k in range(2):
            fit, held = even != k, even == k
            train = {s: r[fit] for s, r in shifted.items() if s not in family}
            e = ef.fit_learned_evidence(clean[fit], train, FLOOR)
            gate = Gate.columns(NAMES, LEARNED_EVIDENCE, 1e9, e)
            base = ec.logit_scores(logits[held])
            best = max(ec.auroc(v, v) for v in base.values())  # same logits: 0.5
            per_fold.append(
                ec.auroc(gate.score(clean[held]), gate.score(shifted[name][held])) - best
            )
        assert margins[LEARNED_EVIDENCE][name] == pytest.approx(sum(per_fold) / 2)
    # rotate90 is held out with its sibling: a fit on blur alone does not see component 0
    assert margins[LEARNED_EVIDENCE]["rotate90"] < margins[LEARNED_EVIDENCE]["blur"]
    chosen, worst = ec.choose(NAMES, 1e9, (clean, logits), judged, FLOOR)
    every = ec.choice_margins(NAMES, 1e9, (clean, logits), judged, FLOOR)
    # without the nearest-neighbour component the +knn learned variants do not compete
    assert set(every) == {"energy", "energy+mass", "learned", "learned+mass"} == set(worst)
    for variant in ("learned", "learned+mass"):
        assert worst[variant] == pytest.approx(min(margins[variant].values()))
        assert every[variant] == pytest.approx(margins[variant])
    mean = {v: sum(m.values()) / len(m) for v, m in every.items()}
    assert chosen == max(mean, key=mean.get) == ec.pick(every, "mean")


@pytest.mark.parametrize("variant", LEARNED_VARIANTS)
def test_a_calibration_with_learned_evidence_refitted_from_outside(tmp_path, gated_tiny, variant):
    model, x, table = gated_tiny(64, evidence=variant)
    alarm = table.alarm
    assert alarm.evidence == variant and alarm.learned is not None
    assert alarm.heldout["evidence_choice"]["asked"] == variant
    first, rest = x[600 : 600 + ec.CHOICE_IMAGES], x[600 + ec.CHOICE_IMAGES : 1600]
    with SurpriseMonitor(model, table) as monitor:
        clean = monitor.inspect(first).component_ranks
        shifted = {  # shifted batch by batch, as calibration does (the noise is per batch)
            n: torch.cat([monitor.inspect(s(first[i : i + 64])).component_ranks
                          for i in range(0, len(first), 64)])
            for n, s in ec.SHIFTS.items()
        }  # fmt: skip
        null = monitor.inspect(rest)
    floor = 1.0 / (min(r.numel() for r in alarm.reference.sorted_components) + 1)
    again = ef.fit_learned_evidence(clean, shifted, floor)
    torch.testing.assert_close(alarm.learned.weights, again.weights, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(alarm.learned.reference, again.reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(alarm.null_predicted.scores, torch.sort(null.score).values)
    # the report carries the fit, so its alarm kinds can name what the learned part weighed
    assert torch.equal(null.learned.weights, alarm.learned.weights) and null.evidence == variant
    names = alarm.component_names()
    old = dataclasses.replace(table, alarm=dataclasses.replace(
        alarm, family_null_predicted=None, family_null_labelled=None))  # fmt: skip
    with SurpriseMonitor(model, old) as monitor:
        before = monitor.inspect(rest[:20])  # a table without family nulls: the fit's kinds
    for i in range(20):
        ranks, score = before.component_ranks[i].tolist(), float(before.score[i])
        assert before.alarm_kind(i) == alarm_kind(names, ranks, score, alarm.learned, variant)
        family = null.family_p_values[i].tolist()  # with them: the smallest family p-value's
        assert null.alarm_kind(i) == kind_of(family, ranks, family_columns(names))
    # the table keeps the fit
    back = CalibrationTable.load(table.save(tmp_path / "t.safetensors"))
    assert torch.equal(back.alarm.learned.weights, alarm.learned.weights)
    assert back.alarm.learned.bias == alarm.learned.bias and back.alarm.evidence == variant
    with SurpriseMonitor(model, back) as monitor:
        torch.testing.assert_close(monitor.inspect(rest[:50]).score, null.score[:50])


def test_learned_evidence_needs_enough_held_out_images():
    model = trained_tiny_cnn(steps=2)
    x, y = class_images(1200, 3, seed=1)
    wanted = "evidence must be another variant than 'learned' .* of 600 images, fewer than 1000"
    with pytest.raises(ValueError, match=wanted):
        calibrate(
            model, TensorDataset(x[:600], y[:600]), heldout=TensorDataset(x[600:], y[600:]),
            progress=False,
            alarm=AlarmOptions(reference_images=300, score=GATED_SCORE_NAME, evidence="learned"),
        )  # fmt: skip
