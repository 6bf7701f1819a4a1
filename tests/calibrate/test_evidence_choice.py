"""The evidence variant chosen on the held-out images' shifts: the AUROC against scikit-learn,
the logit scores against pytorch-ood, the shifts by hand, the rule on synthetic judgements, and
a calibration with ``evidence="auto"`` re-judged from outside."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from surprise_monitor.calibrate import evidence_choice as ec
from surprise_monitor.calibrate.options import AlarmOptions
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.atypicality import EVIDENCE_VARIANTS, GATED_SCORE_NAME
from surprise_monitor.monitor.checks import OptionValueError


def test_auroc_is_scikit_learn_s_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (40,), generator=g).float()
    b = torch.randint(1, 7, (30,), generator=g).float()
    want = roc_auc_score(np.r_[np.zeros(40), np.ones(30)], np.r_[a.numpy(), b.numpy()])
    assert ec.auroc(a, b) == pytest.approx(want)
    with pytest.raises(ValueError, match="inliers and outliers"):
        ec.auroc(a, b[:0])


def test_logit_scores_are_pytorch_ood_s():
    from pytorch_ood.detector import EnergyBased, MaxLogit, MaxSoftmax

    z = torch.randn(8, 5, generator=torch.Generator().manual_seed(1)) * 3
    got = ec.logit_scores(z)
    torch.testing.assert_close(got["MSP"].float(), MaxSoftmax.score(z))
    torch.testing.assert_close(got["MaxLogit"].float(), MaxLogit.score(z))
    torch.testing.assert_close(got["Energy"].float(), EnergyBased.score(z))


def test_the_shifts_by_hand():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    for name, shift in ec.SHIFTS.items():
        y = shift(x)
        assert y.shape == x.shape and torch.isfinite(y).all() and not torch.equal(y, x), name
    torch.testing.assert_close(ec.SHIFTS["rotate90"](x)[0, 0, 0], x[0, 0, :, -1])
    torch.testing.assert_close(ec.SHIFTS["upside down"](x)[0, 0, 0], x[0, 0, -1])
    torch.testing.assert_close(ec.SHIFTS["grey"](x)[:, 2], x.mean(dim=1))
    torch.testing.assert_close(ec.SHIFTS["blur"](x)[1, 1, 4, 4], x[1, 1, 2:7, 2:7].mean())
    occluded = ec.SHIFTS["occlusion"](x)
    torch.testing.assert_close(occluded[0, :, 2:6, 2:6], x[0].mean().expand(3, 4, 4))
    torch.testing.assert_close(occluded[0, :, 0], x[0, :, 0])
    means = x.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(ec.SHIFTS["contrast"](x), means + 0.5 * (x - means))
    lo, hi = x[0].min(), x[0].max()
    torch.testing.assert_close(ec.SHIFTS["invert"](x)[0], lo + hi - x[0])
    torch.testing.assert_close(ec.SHIFTS["channel order"](x)[:, [1, 2, 0]], x)
    torch.testing.assert_close(ec.SHIFTS["brightness"](x)[1], x[1] + 0.5 * x[1].std())
    grey = x.mean(dim=1, keepdim=True)
    torch.testing.assert_close(ec.SHIFTS["saturation"](x), grey + 2 * (x - grey))
    pix = ec.SHIFTS["pixelate"](x)
    torch.testing.assert_close(pix[0, 1, 4:8, 0:4], x[0, 1, 4:8, 0:4].mean().expand(4, 4))
    hit = ec.SHIFTS["impulse"](x) != x
    share = float(hit.float().mean())
    assert 0.02 < share < 0.1  # ~6% of the values, set to each image's min or max
    out = ec.SHIFTS["impulse"](x)[hit].reshape(-1)
    extremes = torch.cat([x.amin(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))])
    assert torch.isin(out, extremes).all()
    assert set(ec.SHIFT_FAMILIES) == set(ec.SHIFTS)


NAMES = ["expectation_mass", "stage_energy:a", "energy", "stage_distance:a"]


def _judged(mass: torch.Tensor, energy: torch.Tensor, logits: torch.Tensor) -> tuple:
    """``(ranks, logits)`` with the given mass and energy ranks (the gate's rank 0.5: shut)."""
    ranks = torch.stack([mass, torch.full_like(mass, 0.5), energy, torch.full_like(mass, 0.5)], 1)
    return ranks, logits


def test_choose_takes_the_best_worst_margin_and_energy_on_a_tie():
    g = torch.Generator().manual_seed(3)
    u = lambda n: torch.rand(n, generator=g) * 0.98 + 0.01  # noqa: E731
    z = torch.randn(200, 4, generator=g)
    clean = _judged(u(200), u(200), z)
    # the shifted images: energy's rank and the logits unchanged (AUROC ~0.5 for both), the mass
    # much smaller (atypical): energy+mass sees the shift, energy does not
    shifted = {"s": _judged(u(200) * 0.05, u(200), z.clone())}
    chosen, worst = ec.choose(NAMES, 1e9, clean, shifted)
    assert chosen == "energy+mass" and worst["energy+mass"] > worst["energy"]
    # worst margins by hand: the variant's AUROC minus the best logit score's
    gate_shut = lambda r, cols: -2 * torch.log(r[:, cols]).sum(1)  # noqa: E731
    base = max(roc_auc_score(np.r_[np.zeros(200), np.ones(200)], np.r_[v.numpy(), w.numpy()])
               for v, w in zip(ec.logit_scores(z).values(), ec.logit_scores(z).values(),
                               strict=True))  # fmt: skip
    a = ec.auroc(gate_shut(clean[0], [0, 2]), gate_shut(shifted["s"][0], [0, 2]))
    assert worst["energy+mass"] == pytest.approx(a - base)
    # identical judgements: a tie, which goes to energy
    chosen, worst = ec.choose(NAMES, 1e9, clean, {"same": clean})
    assert chosen == "energy" and worst["energy"] == pytest.approx(worst["energy+mass"])
    with pytest.raises(ValueError, match="no shifted"):
        ec.choose(NAMES, 1e9, clean, {})


def test_a_calibration_with_auto_evidence_re_judged_from_outside(gated_tiny):
    model, x, table = gated_tiny(ec.CHOICE_IMAGES, evidence="auto")
    # one batch of the choice images: the noise shifts draw per batch, as re-judged below
    alarm = table.alarm
    record = alarm.heldout["evidence_choice"]
    assert record["images"] == ec.CHOICE_IMAGES and record["shifts"] == list(ec.SHIFTS)
    first, rest = x[600 : 600 + ec.CHOICE_IMAGES], x[600 + ec.CHOICE_IMAGES : 1600]
    with SurpriseMonitor(model, table) as monitor:
        clean = monitor.inspect(first)
        shifted = {n: monitor.inspect(s(first)) for n, s in ec.SHIFTS.items()}
        null = monitor.inspect(rest)
    chosen, worst = ec.choose(
        alarm.component_names(), alarm.gate_threshold,
        (clean.component_ranks, clean.logits),
        {n: (r.component_ranks, r.logits) for n, r in shifted.items()},
        1.0 / (min(r.numel() for r in alarm.reference.sorted_components) + 1),
    )  # fmt: skip
    assert alarm.evidence == chosen and set(worst) == set(EVIDENCE_VARIANTS)
    assert record["worst_margin"] == pytest.approx(worst, abs=1e-6)
    every = ec.choice_margins(
        alarm.component_names(), alarm.gate_threshold, (clean.component_ranks, clean.logits),
        {n: (r.component_ranks, r.logits) for n, r in shifted.items()},
        1.0 / (min(r.numel() for r in alarm.reference.sorted_components) + 1),
    )  # fmt: skip
    mean = {v: sum(m.values()) / len(m) for v, m in every.items()}
    assert record["rule"] == ec.RULE == "mean" and chosen == max(mean, key=mean.get)
    assert record["mean_margin"] == pytest.approx(mean, abs=1e-6)
    # the null: the other held-out images only, scored with the chosen variant
    assert alarm.null_predicted.size == 1000 - ec.CHOICE_IMAGES
    torch.testing.assert_close(alarm.null_predicted.scores, torch.sort(null.score).values)


def test_auto_is_an_evidence_option():
    assert AlarmOptions(score=GATED_SCORE_NAME, evidence="auto").evidence == "auto"
    with pytest.raises(OptionValueError, match="evidence"):
        AlarmOptions(evidence="beta")


def test_each_shift_s_margin_is_the_score_s_auroc_minus_the_best_logit_one():
    """AUROCs by scikit-learn: the score's minus the best of MSP / MaxLogit / Energy."""

    def sk(a: torch.Tensor, b: torch.Tensor) -> float:
        return roc_auc_score([0] * len(a) + [1] * len(b), torch.cat([a, b]).double().numpy())

    g = torch.Generator().manual_seed(1)
    clean_logits, out_logits = torch.randn(50, 3, generator=g), torch.randn(40, 3, generator=g)
    clean = {"s": torch.randn(50, generator=g)}
    shifted = {"a": {"s": torch.randn(40, generator=g) + 1.0}, "b": {"s": torch.randn(40)}}
    margins = ec.shift_margins(clean, shifted, clean_logits, {"a": out_logits, "b": out_logits})
    base_in, base_out = ec.logit_scores(clean_logits), ec.logit_scores(out_logits)
    best = max(sk(base_in[k], base_out[k]) for k in base_in)
    for n in ("a", "b"):
        assert margins["s"][n] == pytest.approx(sk(clean["s"], shifted[n]["s"]) - best)


def test_each_rule_picks_by_hand():
    margins = {
        "safe": {"a": 0.001, "b": 0.000, "c": -0.001},  # the best worst margin
        "bold": {"a": 0.060, "b": 0.050, "c": -0.025},  # within 0.03: the best mean
        "many": {"a": 0.010, "b": 0.010, "c": 0.010},  # the best worst and worst + mean
        "wild": {"a": 0.300, "b": 0.300, "c": -0.040},  # beyond the tolerance: the best mean
    }
    picks = {rule: ec.pick(margins, rule) for rule in ec.RULES}
    assert picks == {"worst": "many", "mean": "wild", "tolerance, then mean": "bold",
                     "worst + mean": "wild", "median": "wild"}  # fmt: skip
    del margins["wild"]
    assert ec.pick(margins, "worst + mean") == "many"  # 0.01 + 0.01 > -0.025 + 0.0283
    assert ec.pick(margins, "median") == "bold"
    even = {"x": {"a": 0.0, "b": 0.1, "c": 0.2, "d": 0.9}, "y": {"a": 0.16, "b": 0.16}}
    assert ec.pick(even, "median") == "y"  # x's median: (0.1 + 0.2) / 2 = 0.15
    tied = {"first": {"a": 0.01}, "second": {"a": 0.01}}
    assert {ec.pick(tied, rule) for rule in ec.RULES} == {"first"}
    with pytest.raises(ValueError, match="rule must be one of"):
        ec.pick(tied, "best")


def test_the_knn_variants_compete_only_with_their_component():
    assert ec.fixed_variants(NAMES) == ["energy", "energy+mass"]
    assert ec.fixed_variants([*NAMES, "knn_distance:h"]) == [
        "energy", "energy+mass", "energy+knn", "energy+mass+knn",
    ]  # fmt: skip
    served = ec.served_variants([*NAMES, "knn_distance:h"])
    assert {"learned+knn", "learned+mass+knn"} <= set(served) == set(EVIDENCE_VARIANTS)
    assert not {"learned+knn", "learned+mass+knn"} & set(ec.served_variants(NAMES))


def test_preferred_stands_for_learned_knn_where_the_table_has_a_knn_bank():
    assert AlarmOptions().evidence == ec.PREFERRED == "preferred"
    assert ec.resolved("preferred", knn=True) == ec.DEFAULT_VARIANT == "learned+knn"
    assert ec.resolved("preferred", knn=False) == ec.AUTO
    assert {ec.resolved(v, knn) for v in ("auto", "energy") for knn in (True, False)} == {
        "auto", "energy"}  # fmt: skip


@pytest.mark.parametrize("knn_bank", [300, 0])
def test_a_calibration_with_the_default_evidence(gated_tiny, knn_bank):
    """With a KNN bank the default (``preferred``) fits ``learned+knn`` on the first held-out
    images; without one it chooses as ``auto`` does (the mean margin over the variants without
    the KNN rank)."""
    _, _, table = gated_tiny(100, knn_bank=knn_bank)
    alarm = table.alarm
    record = alarm.heldout["evidence_choice"]
    assert record["asked"] == "preferred"
    if knn_bank:
        assert alarm.knn is not None and record["resolved"] == "learned+knn"
        assert alarm.evidence == "learned+knn" and alarm.learned is not None
        assert set(record["mean_margin"]) == set(EVIDENCE_VARIANTS)
    else:
        assert alarm.knn is None and record["resolved"] == "auto"
        mean = record["mean_margin"]
        assert set(mean) == {"energy", "energy+mass", "learned", "learned+mass"}
        assert alarm.evidence == max(mean, key=mean.get)
    assert alarm.null_predicted.size == 1000 - ec.CHOICE_IMAGES
