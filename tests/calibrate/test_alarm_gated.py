"""The gated score (``AlarmOptions(score=GATED_SCORE_NAME)``) against independent computations:
the stage statistics against numpy on channel means read off the model, energy against scipy,
the gate's threshold and every score against tail ranks counted by hand, the file round trip,
the alarm rate on fresh inputs and a far input ranked first."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from torch.utils.data import TensorDataset

from surprise_monitor.calibrate import calibrate
from surprise_monitor.calibrate.options import AlarmOptions, RunOptions
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.atypicality import (
    GATE_LEVEL,
    GATE_OFFSET,
    GATED_SCORE_NAME,
    STAGE_SHRINK,
    component_family,
)
from surprise_monitor.monitor.checks import OptionValueError
from surprise_monitor.monitor.knn_distance import KnnDistance
from surprise_monitor.monitor.learned_evidence import LearnedEvidence
from surprise_monitor.monitor.table import CalibrationTable
from surprise_monitor.monitor.table_alarm import AlarmTableError
from tests._checks import assert_load_refuses, exponential_tail, load_edited
from tests._models import class_images, trained_tiny_cnn

IMAGES, _LABELS = class_images(4000, 3, seed=1)
PICKED = np.unique(np.linspace(0, 599, 300).round().astype(int))


@pytest.fixture(scope="module")
def gated():
    """A trained tiny CNN calibrated with the gated score on 600 images (300 reference
    images), with a null of 400 held-out ones."""
    model = trained_tiny_cnn(steps=12)
    train = TensorDataset(IMAGES[:600], _LABELS[:600])
    heldout = TensorDataset(IMAGES[600:1000], _LABELS[600:1000])
    table = calibrate(
        model, train, heldout=heldout, progress=False, run=RunOptions(batch_size=50),
        alarm=AlarmOptions(reference_images=300, score=GATED_SCORE_NAME, evidence="energy+mass"),
    )  # fmt: skip
    return model, table


def _channel_means(model, x: torch.Tensor) -> list[np.ndarray]:
    """The tiny CNN's profile layer's and head layer's channel means, computed directly."""
    with torch.no_grad():
        first = model.features[1](model.features[0](x))
        head = model.features(x)
    return [first.mean(dim=(2, 3)).double().numpy(), head.mean(dim=(2, 3)).double().numpy()]


def _tail(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The exponential tail ranks new tables use (numpy oracle)."""
    return exponential_tail(reference, values)


def test_the_stage_statistics_are_numpys_on_the_even_half(gated):
    model, table = gated
    alarm = table.alarm
    assert alarm.score == GATED_SCORE_NAME and alarm.evidence == "energy+mass"
    assert alarm.component_names() == [
        "expectation_mass", "stage_energy:features.1", "head_distance:features", "energy",
        "stage_distance:features.1", "stage_distance:features", "knn_distance:features",
    ]  # fmt: skip
    assert [component_family(n) for n in alarm.component_names()[3:]] == [
        "class_evidence", "low_level", "low_level", "features",
    ]  # fmt: skip
    for j, f in enumerate(_channel_means(model, IMAGES[PICKED[0::2]])):
        cov = np.cov(f, rowvar=False)
        c = cov.shape[0]
        cov = (1 - STAGE_SHRINK) * cov + STAGE_SHRINK * np.trace(cov) / c * np.eye(c)
        np.testing.assert_allclose(alarm.stage_means[j].numpy(), f.mean(0), rtol=1e-5, atol=1e-6)
        want = np.linalg.inv(cov)
        np.testing.assert_allclose(
            alarm.stage_precisions[j].numpy(), want, rtol=1e-3, atol=1e-4 * np.abs(want).max()
        )


def test_energy_and_the_stage_distances_of_a_report(gated):
    model, table = gated
    x = IMAGES[1000:1040]
    with SurpriseMonitor(model, table) as monitor:
        r = monitor.inspect(x)
    comps = r.components.double().numpy()
    np.testing.assert_allclose(comps[:, 3], -logsumexp(r.logits.double().numpy(), axis=1),
                               rtol=1e-5)  # fmt: skip
    a = table.alarm
    for j, f in enumerate(_channel_means(model, x)):
        d = f - a.stage_means[j].double().numpy()
        want = np.einsum("bi,ij,bj->b", d, a.stage_precisions[j].double().numpy(), d)
        np.testing.assert_allclose(comps[:, 4 + j], want, rtol=1e-3, atol=1e-3)


def _knn_oracle(bank: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """The distance of each row of ``x`` to the ``k``-th nearest row of ``bank``, both scaled
    to unit rows (numpy, every distance computed)."""
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    d = np.linalg.norm(unit(x)[:, None, :] - unit(bank)[None, :, :], axis=2)
    return np.sort(d, axis=1)[:, k - 1]


def test_the_knn_component_is_numpys_on_the_head_means(gated):
    """The bank: the head layer's channel means of the even half (all 150: fewer than
    ``knn_bank``); the reference column: the odd half's distances; a report's column: the
    distance to the 10th nearest bank row."""
    model, table = gated
    a = table.alarm
    bank = _channel_means(model, IMAGES[PICKED[0::2]])[1]
    assert a.knn is not None and a.knn.k == 10 and a.knn.bank.shape == bank.shape
    np.testing.assert_allclose(
        a.knn.bank.double().numpy(), bank / np.linalg.norm(bank, axis=1, keepdims=True),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    odd = _channel_means(model, IMAGES[PICKED[1::2]])[1]
    reference = a.reference.sorted_components[-1].double().numpy()
    np.testing.assert_allclose(reference, np.sort(_knn_oracle(bank, odd, 10)), rtol=1e-4, atol=1e-5)
    x = IMAGES[1000:1040]
    with SurpriseMonitor(model, table) as monitor:
        column = monitor.inspect(x).components[:, -1].double().numpy()
    want = _knn_oracle(bank, _channel_means(model, x)[1], 10)
    np.testing.assert_allclose(column, want, rtol=1e-4, atol=1e-5)


def test_the_knn_bank_s_size_is_the_users(gated):
    """``knn_bank``: that many of the even half's rows, evenly spaced; 0: no KNN component,
    and a named ``+knn`` variant refused naming the option."""
    model, _ = gated
    train = TensorDataset(IMAGES[:600], _LABELS[:600])
    run = RunOptions(batch_size=50)
    small = calibrate(model, train, progress=False, run=run,
                      alarm=AlarmOptions(reference_images=300, score=GATED_SCORE_NAME,
                                         evidence="energy", knn_bank=40)).alarm  # fmt: skip
    bank = _channel_means(model, IMAGES[PICKED[0::2]])[1]
    rows = np.unique(np.linspace(0, len(bank) - 1, 40).round().astype(int))
    np.testing.assert_allclose(
        small.knn.bank.double().numpy(),
        bank[rows] / np.linalg.norm(bank[rows], axis=1, keepdims=True), rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    none = calibrate(model, train, progress=False, run=run,
                     alarm=AlarmOptions(reference_images=300, score=GATED_SCORE_NAME,
                                        evidence="energy", knn_bank=0)).alarm  # fmt: skip
    assert none.knn is None and not any("knn" in n for n in none.component_names())
    with pytest.raises(OptionValueError, match=r"evidence must be a variant without the KNN "
                       r"component \(--knn-bank / knn_bank 0\), got 'energy\+knn'"):  # fmt: skip
        calibrate(model, train, progress=False, run=run,
                  alarm=AlarmOptions(reference_images=300, score=GATED_SCORE_NAME,
                                     evidence="energy+knn", knn_bank=0))  # fmt: skip


def test_dead_images_are_left_out_of_the_knn_bank(caplog):
    """Head rows that are all 0 (an untrained model's dead ReLUs) have no direction: the bank
    keeps the others; with none left there is no KNN component, said in a warning, and a named
    ``+knn`` variant is refused saying why."""
    from surprise_monitor.calibrate.alarm import knn_bank

    rows = torch.rand(20, 4) + 0.1
    rows[3] = rows[11] = 0.0
    options = AlarmOptions(score=GATED_SCORE_NAME, evidence="energy")
    knn = knn_bank(options, rows)
    alive = torch.cat([rows[:3], rows[4:11], rows[12:]])
    torch.testing.assert_close(knn.bank, alive / alive.norm(dim=1, keepdim=True))
    with caplog.at_level("WARNING"):
        assert knn_bank(options, torch.zeros(20, 4)) is None
    assert "no KNN component" in caplog.text and "all 20 are" in caplog.text
    named = dataclasses.replace(options, evidence="energy+knn")
    with pytest.raises(OptionValueError, match=r"evidence must be a variant without the KNN "
                       r"component \(the KNN bank needs a training image whose head features "
                       r"are not all 0; all 20 are\), got 'energy\+knn'"):  # fmt: skip
        knn_bank(named, torch.zeros(20, 4))


def _reference_gate_statistics(model, table) -> np.ndarray:
    """The reference images' own gate statistics, by hand: their stage distances' ranks among
    themselves (the odd half of the picked training images, read off a table without the
    alarm's reference)."""
    a = table.alarm
    refs = [r.double().numpy() for r in a.reference.sorted_components]
    with SurpriseMonitor(model, dataclasses.replace(table, alarm=dataclasses.replace(
            a, reference=None, gate_threshold=None, null_predicted=None, null_labelled=None,
            class_null_predicted=None, class_null_labelled=None, family_null_predicted=None,
            family_null_labelled=None))) as plain:  # fmt: skip
        x, y = IMAGES[PICKED[1::2]], _LABELS[PICKED[1::2]]
        rows = plain.inspect(x, y).components.double().numpy()
    return -2 * sum(np.log(_tail(refs[j], rows[:, j])) for j in (4, 5))


def test_the_gate_threshold_and_every_score_by_hand(gated):
    model, table = gated
    a = table.alarm
    refs = [r.double().numpy() for r in a.reference.sorted_components]
    stat = _reference_gate_statistics(model, table)
    assert a.gate_level == GATE_LEVEL
    assert a.gate_threshold == pytest.approx(np.quantile(stat, 1 - GATE_LEVEL), rel=1e-5)
    # scores of fresh inputs: the gate's statistic plus the offset beyond it, else Fisher's
    # combination of energy's and the expectation mass's ranks
    with SurpriseMonitor(model, table) as monitor:
        r = monitor.inspect(IMAGES[1000:1200])
    comps = r.components.double().numpy()
    ranks = np.stack([_tail(refs[j], comps[:, j]) for j in range(len(refs))], axis=1)
    np.testing.assert_allclose(r.component_ranks.numpy(), ranks, rtol=1e-5)
    gate = -2 * np.log(ranks[:, [4, 5]]).sum(1)
    evidence = -2 * np.log(ranks[:, [0, 3]]).sum(1)
    far = gate >= a.gate_threshold
    want = np.where(far, gate + GATE_OFFSET, evidence)
    np.testing.assert_allclose(r.score.numpy(), want, rtol=1e-5)
    assert far.mean() < 0.1  # in distribution the gate rarely opens


def test_a_far_input_is_ranked_first_and_fresh_inputs_alarm_at_the_nominal_rate(gated):
    model, table = gated
    with SurpriseMonitor(model, table) as monitor:
        fresh = monitor.inspect(IMAGES[1000:3000])
        far = monitor.inspect(IMAGES[3000:3050] * 25.0)  # far outside the training range
    assert (far.score > GATE_OFFSET).all() and far.alarm.all()
    rate = float(fresh.alarm.float().mean())
    assert rate <= 0.01 + 3 * np.sqrt(0.01 * 0.99 / 2000)  # conformal: at most nominal


def test_the_gate_opens_on_the_share_of_reference_images_asked_for(gated):
    """``AlarmOptions(gate_level=...)``: the threshold at that quantile of the reference
    images' own statistics; more inputs open a wider gate, and the null holds the rate."""
    model, default = gated
    train = TensorDataset(IMAGES[:600], _LABELS[:600])
    heldout = TensorDataset(IMAGES[600:1000], _LABELS[600:1000])
    table = calibrate(
        model, train, heldout=heldout, progress=False, run=RunOptions(batch_size=50),
        alarm=AlarmOptions(reference_images=300, score=GATED_SCORE_NAME, evidence="energy+mass",
                           gate_level=0.1),
    )  # fmt: skip
    a = table.alarm
    stat = _reference_gate_statistics(model, table)
    assert a.gate_level == 0.1
    assert a.gate_threshold == pytest.approx(np.quantile(stat, 0.9), rel=1e-5)
    assert a.gate_threshold < default.alarm.gate_threshold
    with SurpriseMonitor(model, table) as wide, SurpriseMonitor(model, default) as narrow:
        fresh_wide = wide.inspect(IMAGES[1000:3000])
        fresh_narrow = narrow.inspect(IMAGES[1000:3000])
    opened = float((fresh_wide.score > GATE_OFFSET).float().mean())
    assert opened > float((fresh_narrow.score > GATE_OFFSET).float().mean())
    assert 0.05 < opened < 0.2  # about the level: fresh images are like the reference ones
    rate = float(fresh_wide.alarm.float().mean())
    assert rate <= 0.01 + 3 * np.sqrt(0.01 * 0.99 / 2000)  # conformal: at most nominal


def test_the_gated_table_survives_save_and_load(gated, tmp_path):
    model, table = gated
    path = table.save(tmp_path / "t.safetensors")
    back = CalibrationTable.load(path).alarm
    a = table.alarm
    assert back.score == a.score and back.evidence == a.evidence
    assert back.reference.tail == a.reference.tail == "exponential"
    assert back.gate_threshold == a.gate_threshold and back.gate_level == a.gate_level
    for m, n in zip(back.stage_means + back.stage_precisions,
                    a.stage_means + a.stage_precisions, strict=True):  # fmt: skip
        assert torch.equal(m, n)
    with SurpriseMonitor(model, CalibrationTable.load(path)) as monitor:
        again = monitor.inspect(IMAGES[1000:1020]).score
    with SurpriseMonitor(model, table) as monitor:
        assert torch.equal(again, monitor.inspect(IMAGES[1000:1020]).score)


def test_a_gated_table_from_before_the_level_was_recorded_judges_as_before(gated, tmp_path):
    model, table = gated
    old = load_edited(table, tmp_path, lambda m: m["alarm"].pop("gate_level") and None)
    assert old.alarm.gate_level is None
    assert old.alarm.gate_threshold == table.alarm.gate_threshold
    with SurpriseMonitor(model, old) as before, SurpriseMonitor(model, table) as now:
        assert torch.equal(before.inspect(IMAGES[1000:1020]).score,
                           now.inspect(IMAGES[1000:1020]).score)  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["alarm"].update(evidence="logits"), "evidence variant 'logits' is not one"),
        (lambda m: m["alarm"].update(gate_threshold=None), "needs its gate threshold"),
        (lambda m: m["alarm"].pop("evidence") and None, "'alarm.evidence' is missing"),
        (lambda m: m["alarm"].update(reference_tail="pareto"), "'alarm.reference_tail' must be"),
        (lambda m: m["alarm"].update(gate_level="1%"), "'alarm.gate_level' must be a float"),
        (lambda m: m["alarm"].update(gate_level=1.5), r"gate_level must lie in \(0, 1\)"),
        (lambda m: m["alarm"].update(evidence="learned"), "lacks tensor 'alarm.learned_weights'"),
        (lambda m: m["alarm"].update(knn_k=0), r"KNN neighbour must lie in \[1, 150\]"),
        (lambda m: m["alarm"].update(knn_k=2.5), "'alarm.knn_k' must be a int"),
    ],
)
def test_a_bad_gated_alarm_part_is_a_table_error(gated, tmp_path, edit, message):
    _, table = gated
    assert_load_refuses(table, tmp_path, edit, message)


def _learned(components: int) -> LearnedEvidence:
    """A learned evidence of ``components`` components (weights 1, bias 0)."""
    return LearnedEvidence(torch.ones(2 * components), 0.0, 0.01, torch.arange(4.0))


def test_bad_stage_statistics_are_refused(gated):
    _, table = gated
    a = table.alarm
    j = len(a.component_names())
    for change, message in [
        ({"stage_means": a.stage_means[:1]}, "1 stage means and 2 precisions for 2"),
        ({"stage_precisions": (a.stage_precisions[1], a.stage_precisions[1])},
         r"must be \[C\] and \[C, C\]"),
        ({"stage_means": (a.stage_means[0] * float("nan"), a.stage_means[1])}, "finite"),
        ({"score": "fisher-profile-v2"}, "has no gate or evidence variant"),
        ({"evidence": "learned"}, "and they alone, need their fitted weights"),
        ({"learned": _learned(j)}, "and they alone, need their fitted weights"),
        ({"evidence": "learned", "learned": _learned(j + 1)},
         f"weights for {j + 1} components, the score has {j}"),
        ({"evidence": "energy+knn", "knn": None}, "needs the table's KNN bank"),
        ({"knn": KnnDistance(a.knn.bank[:, :3])}, "KNN bank has 3 channels, the head layer 16"),
        ({"knn": KnnDistance(a.knn.bank * 2.0)}, "rows must have unit length"),
    ]:  # fmt: skip
        with pytest.raises(AlarmTableError, match=message):
            dataclasses.replace(a, **change).validate(table.levels)


def test_the_options_refuse_an_unknown_score_or_evidence():
    with pytest.raises(OptionValueError, match="score"):
        AlarmOptions(score="fisher-profile-v9")
    with pytest.raises(OptionValueError, match="evidence"):
        AlarmOptions(evidence="beta")
    with pytest.raises(OptionValueError, match="gate_level must be a fraction in"):
        AlarmOptions(gate_level=0.0)
    with pytest.raises(ValueError, match="needs profile or head layers"):
        calibrate(
            trained_tiny_cnn(steps=1), TensorDataset(IMAGES[:40], _LABELS[:40]), progress=False,
            alarm=AlarmOptions(score=GATED_SCORE_NAME, profile_layers="none", head_layer="none"),
        )  # fmt: skip
