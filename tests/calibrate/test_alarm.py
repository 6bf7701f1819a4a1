"""The alarm's calibration passes against independent computations, and the false-alarm rate."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from pytorch_ood.detector import Mahalanobis
from torch.utils.data import DataLoader, TensorDataset

from surprise_monitor.calibrate import calibrate
from surprise_monitor.calibrate.alarm import fit_head
from surprise_monitor.calibrate.options import AlarmOptions, RunOptions
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.atypicality import (
    EXPONENTIAL_TAIL,
    FISHER_SCORE_NAME,
    components,
    head_distance,
)
from surprise_monitor.monitor.options import Thresholds
from surprise_monitor.monitor.table import CalibrationTable
from surprise_monitor.monitor.table_alarm import AlarmTableError
from tests._checks import assert_load_refuses, exponential_tail, interpolated_p
from tests._models import TinyCNN, class_dataset, class_images, seeded, trained_tiny_cnn

#: The monitor with conservative p-values, ``(1 + #{null >= s}) / (n + 1)``.
CONSERVATIVE = Thresholds(p_values="conservative")


def _split(start: int, stop: int) -> TensorDataset:
    """Images ``start..stop`` of one stream of the tiny CNN's training distribution (the class
    patterns of seed 1, fresh noise per image): any two slices are exchangeable."""
    x, y = class_images(4000, 3, seed=1)
    return TensorDataset(x[start:stop], y[start:stop])


def fisher(**options: object) -> AlarmOptions:
    """Alarm options of the Fisher score (whose components these tests count)."""
    return AlarmOptions(score=FISHER_SCORE_NAME, **options)


@pytest.fixture(scope="module")
def alarmed(tmp_path_factory):
    """A trained tiny CNN calibrated on 600 images, with a null of 400 held-out ones (the Fisher
    score's pipeline; the gated score's: test_alarm_gated.py)."""
    model = trained_tiny_cnn(steps=12)  # under-trained: some held-out images misclassified
    train = _split(0, 600)
    heldout = _split(600, 1000)
    table = calibrate(
        model,
        train,
        heldout=heldout,
        progress=False,
        run=RunOptions(batch_size=50),
        alarm=fisher(reference_images=300),
    )
    return model, table, train, heldout


def test_the_profile_grid_is_numpys_percentiles_of_the_even_half(alarmed):
    model, table, train, _ = alarmed
    alarm = table.alarm
    assert alarm.score == FISHER_SCORE_NAME and alarm.profile_layers == ("features.1",)
    picked = np.unique(np.linspace(0, 599, 300).round().astype(int))
    x = train.tensors[0][picked[0::2]]
    with torch.no_grad():
        means = model.features[1](model.features[0](x)).mean(dim=(2, 3)).numpy()
    want = np.percentile(means, table.levels.numpy(), axis=0).T
    np.testing.assert_allclose(alarm.profile_quantiles[0].numpy(), want, rtol=1e-6, atol=1e-7)


def _head_features(model, x: torch.Tensor) -> torch.Tensor:
    """The tiny CNN's head-layer channel means (its pooled features), computed directly."""
    with torch.no_grad():
        return model.features(x).mean(dim=(2, 3))


def test_the_head_fit_is_pytorch_oods_mahalanobis():
    """On full-rank features: class means equal pytorch-ood's, and the distance is pytorch-ood's
    score up to its constant factor (it sums the outer products without dividing by n, adds a
    1e-6 ridge and halves the quadratic form)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(600) % 4
    centres = 3 * torch.randn(4, 10, generator=g)
    mix = torch.randn(10, 10, generator=g) / 3 + torch.eye(10)
    f = centres[y] + torch.randn(600, 10, generator=g) @ mix
    means, precision = fit_head(f.numpy(), y.numpy())
    oracle = Mahalanobis(None).fit_features(f, y)
    torch.testing.assert_close(means, oracle.mu.float(), rtol=1e-5, atol=1e-5)
    q = centres[torch.arange(40) % 4] + 2 * torch.randn(40, 10, generator=g)
    got = head_distance(q, means, precision)
    want = 2 * 600 * oracle.predict_features(q).double()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_thin_or_missing_classes_behind_the_head_are_named(caplog):
    f = np.random.default_rng(0).normal(size=(40, 4))
    y = np.array([0] * 30 + [1] * 8 + [3] * 2)
    with caplog.at_level(logging.WARNING, logger="surprise_monitor.calibrate.alarm"):
        means, _ = fit_head(f, y, num_classes=5)
    assert means.shape == (3, 4)  # classes 0, 1 and 3
    assert "no mean for class(es) 2, 4 " in caplog.text
    assert "class(es) 1, 3 rests on fewer than 10 images" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="surprise_monitor.calibrate.alarm"):
        fit_head(f[:30], y[:30], num_classes=1)
        assert caplog.text == ""
        fit_head(f[:30], y[:30], num_classes=25)
    assert "class(es) 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 and 14 more" in caplog.text


def test_the_head_statistics_come_from_the_even_half_with_labels(alarmed):
    model, table, train, _ = alarmed
    alarm = table.alarm
    assert alarm.head_layer == "features" and alarm.head_means.shape == (3, 16)
    picked = np.unique(np.linspace(0, 599, 300).round().astype(int))[0::2]
    x, y = train.tensors[0][picked], train.tensors[1][picked]
    oracle = Mahalanobis(None).fit_features(_head_features(model, x), y)
    torch.testing.assert_close(alarm.head_means, oracle.mu.float(), rtol=1e-5, atol=1e-6)


def test_the_reference_is_the_odd_halfs_components_judged_with_labels(alarmed):
    model, table, train, _ = alarmed
    picked = np.unique(np.linspace(0, 599, 300).round().astype(int))
    x, y = train.tensors[0][picked[1::2]], train.tensors[1][picked[1::2]]
    lean = dataclasses.replace(table, alarm=None)
    with SurpriseMonitor(model, lean) as plain:
        alpha_pct = plain.inspect(x, y).percentile
    with torch.no_grad():
        means = model.features[1](model.features[0](x)).mean(dim=(2, 3))
    from surprise_monitor.kernels import percentile_rank

    stage = percentile_rank(means, table.alarm.profile_quantiles[0], table.levels.float())
    # the head distance from numpy: class means and covariance of the even half, explicit loop
    fe = _head_features(model, train.tensors[0][picked[0::2]]).double().numpy()
    ye = train.tensors[1][picked[0::2]].numpy()
    centres = np.stack([fe[ye == k].mean(0) for k in range(3)])
    cov = sum((fe[ye == k] - centres[k]).T @ (fe[ye == k] - centres[k]) for k in range(3))
    prec = np.linalg.pinv(cov / len(fe))
    fo = _head_features(model, x).double().numpy()
    head = [min((f - m) @ prec @ (f - m) for m in centres) for f in fo]
    want = components(alpha_pct, [stage], torch.tensor(head, dtype=torch.float32))
    refs = table.alarm.reference.sorted_components
    assert len(refs) == 3
    for j, ref in enumerate(refs):  # the head's quadratic form in float32: 1e-3
        tol = 1e-6 if j < 2 else 1e-3
        torch.testing.assert_close(ref, torch.sort(want[:, j]).values, rtol=tol, atol=tol)


def test_the_nulls_are_the_held_out_scores_as_deployed(alarmed):
    model, table, _, heldout = alarmed
    x, y = heldout.tensors
    with SurpriseMonitor(model, table, thresholds=CONSERVATIVE) as monitor:
        predicted = monitor.inspect(x)
        labelled = monitor.inspect(x, y)
    with SurpriseMonitor(model, table) as monitor:
        interpolated = monitor.inspect(x)
    alarm = table.alarm
    # the same scores up to float32 rounding of the components, which the continuous tail
    # ranks carry into the score
    close = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(
        alarm.null_predicted.scores, torch.sort(predicted.score).values, **close
    )
    torch.testing.assert_close(
        alarm.null_labelled.scores, torch.sort(labelled.score).values, **close
    )
    accuracy = float((predicted.predictions == y).float().mean())
    assert alarm.heldout["images"] == 400 and alarm.heldout["accuracy"] == pytest.approx(accuracy)
    assert 0.5 < accuracy < 1.0  # some misclassified: the two nulls differ
    assert not torch.equal(alarm.null_predicted.scores, alarm.null_labelled.scores)
    # each held-out image's p-value is its rank among the null (itself included)
    p = predicted.p_value.numpy()
    s = predicted.score.numpy()
    null = alarm.null_predicted.scores.numpy()
    np.testing.assert_allclose(p, [(1 + np.sum(null >= v)) / 401 for v in s], rtol=1e-6)
    # the monitor's default interpolates across the gap around each score (numpy's walk)
    np.testing.assert_allclose(interpolated.p_value.numpy(), [interpolated_p(null, v) for v in s],
                               rtol=1e-4, atol=1e-6)  # fmt: skip


def test_reports_name_the_components_and_their_tail_ranks(alarmed):
    """``component_ranks`` are each component's tail rank among the table's reference (its
    exponential tail, numpy's), their Fisher combination is the score, and the JSON names
    them."""
    model, table, _, heldout = alarmed
    x = heldout.tensors[0][:30]
    with SurpriseMonitor(model, table) as monitor:
        r = monitor.inspect(x)
    names = table.alarm.component_names()
    assert r.component_names == tuple(names) and names[0] == "expectation_mass"
    refs = [ref.numpy() for ref in table.alarm.reference.sorted_components]
    parts = r.components.numpy()
    assert table.alarm.reference.tail == EXPONENTIAL_TAIL
    want = np.stack([exponential_tail(ref, parts[:, j]) for j, ref in enumerate(refs)], axis=1)
    np.testing.assert_allclose(r.component_ranks.numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(r.score.numpy(), -2 * np.log(want).sum(1), rtol=1e-5)
    sample = r.sample(0)["components"]
    assert list(sample) == names
    assert sample[names[-1]] == {"value": pytest.approx(float(parts[0, -1])),
                                 "tail_rank": pytest.approx(float(want[0, -1]))}  # fmt: skip
    bare = dataclasses.replace(table, alarm=None)
    with SurpriseMonitor(model, bare) as monitor:
        plain = monitor.inspect(x[:2]).sample(0)["components"]
    assert list(plain) == ["expectation_mass"] and plain["expectation_mass"]["tail_rank"] is None


def test_fresh_in_distribution_inputs_alarm_at_most_at_the_nominal_rate(alarmed):
    """Exchangeable fresh images (same generator, other seeds): the alarm rate stays within
    the binomial interval of its nominal value; atypical inputs alarm far more often."""
    model, table, _, _ = alarmed
    fresh = _split(1000, 4000).tensors[0]
    with SurpriseMonitor(model, table, thresholds=Thresholds(alarm_rate=0.05)) as monitor:
        rate = float(monitor.inspect(fresh).alarm.float().mean())
        noise = float(monitor.inspect(3 * torch.randn(300, 3, 8, 8)).alarm.float().mean())
    nominal = int(0.05 * 401) / 401
    assert abs(rate - nominal) < 3 * np.sqrt(nominal * (1 - nominal) / 3000) + 3 / 400
    assert noise > 0.9


def test_the_alarm_part_survives_save_and_load(alarmed, tmp_path):
    model, table, _, _ = alarmed
    loaded = CalibrationTable.load(table.save(tmp_path / "t.safetensors"))
    a, b = table.alarm, loaded.alarm
    assert b.metadata() == a.metadata()
    for name, t in a.tensors().items():
        assert torch.equal(b.tensors()[name], t), name
    x = class_dataset(20, 3, seed=3).tensors[0]
    with SurpriseMonitor(model, table) as m1, SurpriseMonitor(model, loaded) as m2:
        assert torch.equal(m1.inspect(x).p_value, m2.inspect(x).p_value)


def test_a_table_without_held_out_images_scores_but_never_alarms(tmp_path):
    model = seeded(TinyCNN(num_classes=3)).eval()
    table = calibrate(model, class_dataset(60, 3), progress=False)
    assert table.alarm is not None and table.alarm.null_predicted is None
    with SurpriseMonitor(model, table) as monitor:
        report = monitor.inspect(3 * torch.randn(4, 3, 8, 8))
    assert torch.isfinite(report.score).all() and torch.isnan(report.p_value).all()
    assert not report.alarm.any() and report.to_dict()["samples"][0]["p_value"] is None
    bare = calibrate(model, class_dataset(60, 3), progress=False, alarm=False)
    assert bare.alarm is None
    loaded = CalibrationTable.load(bare.save(tmp_path / "bare.safetensors"))
    assert loaded.alarm is None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["alarm"].update(score="other-v9"), "alarm score 'other-v9' is not one"),
        (lambda m: m["alarm"].pop("profile_layers") and None, "'alarm.profile_layers' is missing"),
        (lambda m: m["alarm"].update(reference="yes"), "'alarm.reference' must be a bool"),
        (lambda m: m.update(alarm=[1]), "'alarm' must be an object or null"),
        (lambda m: m["alarm"].update(head_layer=3), "'alarm.head_layer' must be a str"),
        (lambda m: m["alarm"].update(head_layer=""), "must be given together"),
        (lambda m: m["alarm"].update(head_layer="features.1"), "is also a profile layer"),
    ],
)
def test_a_bad_alarm_part_is_a_table_error(alarmed, tmp_path, edit, message):
    _, table, _, _ = alarmed
    assert_load_refuses(table, tmp_path, edit, message)


def test_bad_head_statistics_are_refused(alarmed):
    _, table, _, _ = alarmed
    a = table.alarm
    c = a.head_means.shape[1]
    for change, message in [
        ({"head_precision": torch.eye(c + 1)}, rf"head_precision must be \[{c}, {c}\]"),
        ({"head_means": torch.zeros(c)}, "head_means must be"),
        ({"head_means": torch.full_like(a.head_means, float("nan"))}, "must be finite"),
        ({"head_precision": None}, "must be given together"),
    ]:
        with pytest.raises(AlarmTableError, match=message):
            dataclasses.replace(a, **change).validate(table.levels)


def test_the_head_layer_can_be_named_or_switched_off():
    model = seeded(TinyCNN(num_classes=3)).eval()
    data = DataLoader(class_dataset(60, 3), batch_size=20)
    none = calibrate(model, data, progress=False, alarm=fisher(head_layer="none"))
    assert none.alarm.head_layer == "" and none.alarm.head_means is None
    assert len(none.alarm.reference.sorted_components) == 2
    with SurpriseMonitor(model, none) as monitor:
        assert monitor.inspect(torch.randn(4, 3, 8, 8)).components.shape == (4, 2)
    named = calibrate(model, data, progress=False, alarm=fisher(head_layer="features.3"))
    assert named.alarm.head_layer == "features.3"
    assert named.alarm.component_names()[-1] == "head_distance:features.3"
    with pytest.raises(ValueError, match="no module named 'nope'"):
        calibrate(model, data, progress=False, alarm=fisher(head_layer="nope"))
    with pytest.raises(ValueError, match="'features.1' is also a profile layer"):
        calibrate(model, data, progress=False, alarm=fisher(head_layer="features.1"))


def test_profile_layers_can_be_named_or_switched_off():
    model = seeded(TinyCNN(num_classes=3)).eval()
    data = DataLoader(class_dataset(60, 3), batch_size=20)
    named = calibrate(
        model, data, progress=False, alarm=fisher(profile_layers=["features.0", "features.1"])
    )
    assert named.alarm.profile_layers == ("features.0", "features.1")
    assert len(named.alarm.reference.sorted_components) == 4  # + expectation mass, head
    none = calibrate(model, data, progress=False, alarm=fisher(profile_layers="none"))
    assert none.alarm.profile_layers == () and len(none.alarm.reference.sorted_components) == 2
    with pytest.raises(ValueError, match="no module named 'nope'"):
        calibrate(model, data, progress=False, alarm=fisher(profile_layers=["nope"]))
    with pytest.raises(ValueError, match="profile_layers must be 'auto', 'none'"):
        calibrate(model, data, progress=False, alarm=fisher(profile_layers="all"))
    with pytest.raises(TypeError, match="heldout must be a torch DataLoader or Dataset"):
        calibrate(model, data, progress=False, heldout=[1, 2])
    held = TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="held-out data is empty"):
        calibrate(model, data, progress=False, heldout=held)


# ------------------------------------------------------------------ per-class (Mondrian) nulls
def _mondrian(alarmed, least: int, caplog=None) -> CalibrationTable:
    """The ``alarmed`` set-up calibrated again with ``class_null_min=least``."""
    model, _, train, heldout = alarmed
    return calibrate(
        model, train, heldout=heldout, progress=False, run=RunOptions(batch_size=50),
        alarm=fisher(reference_images=300, class_null_min=least),
    )  # fmt: skip


def test_per_class_nulls_are_each_classes_held_out_scores(alarmed, tmp_path):
    model, _, _, heldout = alarmed
    table = _mondrian(alarmed, 1)
    x, y = heldout.tensors
    with SurpriseMonitor(model, table, thresholds=CONSERVATIVE) as monitor:
        predicted, labelled = monitor.inspect(x), monitor.inspect(x, y)
    with SurpriseMonitor(model, table) as monitor:
        interpolated = monitor.inspect(x)
    a = table.alarm
    for nulls, report, classes in (
        (a.class_null_predicted, predicted, predicted.predictions), (a.class_null_labelled,
        labelled, y),
    ):  # fmt: skip
        parts = torch.split(nulls.scores, nulls.sizes.tolist())
        for c in range(3):
            want = torch.sort(report.score[classes == c]).values
            torch.testing.assert_close(parts[c], want, rtol=1e-4, atol=1e-4)  # float32 rounding
        # each held-out image's p-value is its rank among its own class's null (the stored
        # scores: the image's own, up to float32 rounding, among them)
        s, k = report.score.numpy(), classes.numpy()
        null = [p.numpy() for p in parts]
        want_p = [
            (1 + np.sum(null[c] >= v)) / (null[c].size + 1) for v, c in zip(s, k, strict=True)
        ]
        np.testing.assert_allclose(report.p_value.numpy(), want_p, rtol=1e-6)
        if report is predicted:  # the default's, interpolated within each class's null
            want_i = [interpolated_p(null[c], v) for v, c in zip(s, k, strict=True)]
            np.testing.assert_allclose(interpolated.p_value.numpy(), want_i, rtol=1e-4, atol=1e-6)
    assert a.class_nulls_summary().startswith("per-class nulls (Mondrian) for 3 of 3")
    loaded = CalibrationTable.load(table.save(tmp_path / "t.safetensors"))
    assert loaded.alarm.metadata() == a.metadata() and loaded.alarm.class_null_min == 1
    with SurpriseMonitor(model, loaded) as monitor:
        assert torch.equal(monitor.inspect(x).p_value, interpolated.p_value)


def test_a_class_with_too_few_held_out_images_uses_the_pooled_null(alarmed, caplog):
    model, pooled_table, _, heldout = alarmed
    x = heldout.tensors[0]
    with SurpriseMonitor(model, pooled_table) as monitor:
        pooled = monitor.inspect(x)
    counts = torch.bincount(pooled.predictions, minlength=3)
    least = int(counts.max())  # every class below the largest falls back
    with caplog.at_level(logging.WARNING):
        table = _mondrian(alarmed, least)
    thin = [c for c in range(3) if counts[c] < least]
    assert thin and table.alarm.class_null_predicted.pooled_classes() == thin
    assert f"class(es) {', '.join(map(str, thin))} have fewer than {least}" in caplog.text
    assert "WARNING" in table.alarm.class_nulls_summary()
    with SurpriseMonitor(model, table) as monitor:
        report = monitor.inspect(x)
    fell_back = torch.isin(report.predictions, torch.tensor(thin))
    assert torch.equal(report.p_value[fell_back], pooled.p_value[fell_back])
    assert not torch.equal(report.p_value[~fell_back], pooled.p_value[~fell_back])
    off = _mondrian(alarmed, 0).alarm
    assert off.class_null_predicted is None and off.class_null_min == 0
    assert off.class_nulls_summary() == "one pooled null for all classes (class_null_min 0)"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["alarm"].update(class_null_min="x"), "'alarm.class_null_min' must be a int"),
        (lambda m: m["alarm"].update(class_null_min=-1), "min_size must be an integer >= 1"),
    ],
)
def test_bad_per_class_nulls_are_a_table_error(alarmed, tmp_path, edit, message):
    table = _mondrian(alarmed, 1)
    assert_load_refuses(table, tmp_path, edit, message)
    a = table.alarm
    short = dataclasses.replace(
        a.class_null_labelled,
        scores=a.class_null_labelled.scores[:-1],
        sizes=a.class_null_labelled.sizes - torch.tensor([0, 0, 1]),
    )
    with pytest.raises(AlarmTableError, match="per-class labelled nulls hold"):
        dataclasses.replace(a, class_null_labelled=short).validate(table.levels)
    with pytest.raises(AlarmTableError, match="must be given together"):
        dataclasses.replace(a, class_null_labelled=None).validate(table.levels)


def test_alarm_confidence_alarms_at_each_nulls_conditional_level(alarmed):
    """With ``alarm_confidence`` the alarm is ``p <= level`` of the null each input's p-value
    came from (its class's own, or the pooled one), the level from
    :func:`conditional_level`; without it, ``p <= alarm_rate``."""
    from surprise_monitor.monitor.conformal import conditional_level

    model, _, _, heldout = alarmed
    table = _mondrian(alarmed, 1)
    x = torch.cat([heldout.tensors[0], 2 * torch.randn(100, 3, 8, 8)])
    rate, sure = 0.05, Thresholds(alarm_rate=0.05, alarm_confidence=0.9)
    with SurpriseMonitor(model, table, thresholds=sure) as monitor:
        r = monitor.inspect(x)
    nulls = table.alarm.class_null_predicted
    levels = torch.tensor([conditional_level(int(n), rate, 0.9) for n in nulls.sizes])
    assert torch.equal(r.alarm, r.p_value <= levels[r.classes])
    assert (levels < rate).all() and r.alarm.any()
    plain = Thresholds(alarm_rate=rate, p_values="conservative")
    with SurpriseMonitor(model, table, thresholds=plain) as monitor:
        marginal = monitor.inspect(x)
    assert torch.equal(marginal.p_value, r.p_value)  # with a confidence: conservative p-values
    assert torch.equal(marginal.alarm, marginal.p_value <= rate)
    assert int(marginal.alarm.sum()) > int(r.alarm.sum())  # the conditional level is stricter
    with SurpriseMonitor(model, table, thresholds=Thresholds(alarm_rate=rate)) as monitor:
        default = monitor.inspect(x)
    assert torch.equal(default.alarm, default.p_value <= rate)
    assert (default.p_value <= marginal.p_value + 1e-7).all()  # interpolated: within a gap
    assert int(default.alarm.sum()) >= int(marginal.alarm.sum())
    with pytest.raises(ValueError, match=r"alarm_confidence must be a number in \[0, 1\)"):
        Thresholds(alarm_confidence=1.0)
