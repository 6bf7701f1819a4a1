"""SurpriseMonitor: drop-in behaviour, flags by definition, refusals, fail-open."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from surprise_monitor.monitor import Judge, SurpriseMonitor, TableMismatchError
from surprise_monitor.monitor.options import Execution, MetricsOptions, Sampling, Thresholds
from tests._models import TinyCNN, mixed_inputs, seeded


@pytest.fixture()
def monitor(calibrated):
    model, table = calibrated
    with SurpriseMonitor(model, table) as m:
        yield m


def test_drop_in_returns_the_models_output(monitor, calibrated):
    model, _ = calibrated
    x = mixed_inputs()
    out = monitor(x)
    with torch.no_grad():
        assert torch.equal(out, model(x))
    assert not out.requires_grad
    assert monitor.last_report is not None and len(monitor.last_report) == len(x)


def _grid_value(table, c: int, level: float) -> np.ndarray:
    q = int(np.nonzero(table.levels.numpy() == level)[0][0])
    return table.quantiles[c, :, q].numpy()


def test_flags_follow_the_definitions(monitor, calibrated):
    _, table = calibrated
    r = monitor.inspect(mixed_inputs())
    mu = table.mean.numpy()
    for b in range(len(r)):
        c = int(r.classes[b])
        a = r.alpha[b].numpy()
        np.testing.assert_array_equal(r.surprise[b].numpy(), a > _grid_value(table, c, 99.9))
        guard = mu[c] > mu[c].mean()
        np.testing.assert_array_equal(
            r.expectation[b].numpy(), (a < _grid_value(table, c, 0.1)) & guard
        )
        np.testing.assert_allclose(float(r.beta[b]), (a - mu[c]).mean(), rtol=1e-5, atol=1e-7)
        bq, bl = table.beta_quantiles[c].numpy(), table.beta_levels.numpy()
        assert float(r.beta_percentile[b]) == pytest.approx(
            np.interp(float(r.beta[b]), bq, bl), abs=1e-3
        )
        assert bool(r.low_beta[b]) == (float(r.beta[b]) < np.interp(1.0, bl, bq))
        for n in (0, 5, 15):
            expected_pct = np.interp(a[n], table.quantiles[c, n].numpy(), table.levels.numpy())
            if a[n] < table.quantiles[c, n, -1]:
                assert float(r.percentile[b, n]) == pytest.approx(expected_pct, abs=1e-3)
    assert r.classes.tolist() == r.predictions.tolist() and not r.labels_given
    assert r.surprise[0::4].any(1).all() and r.low_beta[1::4].all()  # the atypical inputs flag
    assert not r.flagged[2::4].all()  # ordinary inputs mostly pass


def test_flagged_filters_are_ranked_by_deviation(monitor):
    r = monitor.inspect(mixed_inputs())
    b = int(torch.nonzero(r.surprise_count >= 2)[0])
    sur = r.surprising_filters(b)
    assert [f.filter for f in sur] == sorted(
        torch.nonzero(r.surprise[b]).flatten().tolist(), key=lambda n: -float(r.deviation[b, n])
    )
    assert all(f.kind == "surprise" and f.alpha > f.mu for f in sur)
    devs = [f.deviation for f in r.expected_filters(b)]
    assert devs == sorted(devs)
    doc = json.loads(r.to_json())
    assert doc["layer"] == "features" and len(doc["samples"]) == len(r)  # the map fc reads
    assert doc["samples"][b]["surprise_count"] == len(sur)


def test_labels_pick_the_class(monitor):
    x = mixed_inputs(4)
    labels = torch.tensor([2, 2, 0, 1])
    r = monitor.inspect(x, labels=labels)
    assert r.classes.tolist() == [2, 2, 0, 1] and r.labels_given
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        monitor.inspect(x, labels=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="labels must be 4 integers"):
        monitor.inspect(x, labels=torch.tensor([0.0, 1.0, 2.0, 1.0]))


def test_batch_equals_single_inputs(monitor):
    x = mixed_inputs(7)
    batch = monitor.inspect(x)
    for i in range(7):
        one = monitor.inspect(x[i : i + 1])
        torch.testing.assert_close(one.alpha[0], batch.alpha[i], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(one.beta[0], batch.beta[i], rtol=1e-5, atol=1e-7)
        assert torch.equal(one.surprise[0], batch.surprise[i])
        assert torch.equal(one.expectation[0], batch.expectation[i])
        assert one.classes[0] == batch.classes[i]


def test_model_is_left_as_it_was(calibrated):
    model, table = calibrated
    flags = [p.requires_grad for p in model.parameters()]
    with SurpriseMonitor(model, table) as m:
        m(mixed_inputs(3))
        # the probe's hook on the monitored layer, one per activation-profile layer and one
        # on the head layer
        hooks = 1 + len(table.alarm.profile_layers) + 1
        assert sum(len(mod._forward_hooks) for mod in model.modules()) == hooks == 3
    assert all(not mod._forward_hooks for mod in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_tables_for_something_else_are_refused(calibrated, tmp_path):
    model, table = calibrated
    with pytest.raises(TypeError, match=r"layer= is now the table's: .*table\.layer"):
        SurpriseMonitor(model, table, layer="features.0")
    other = seeded(TinyCNN(num_classes=3), seed=5)
    with pytest.raises(TableMismatchError, match="other weights") as refused:
        SurpriseMonitor(other, table)
    assert "execution=Execution(check_fingerprint=False)" in str(refused.value)
    lax = Execution(check_fingerprint=False)
    SurpriseMonitor(other, table, execution=lax).close()  # a deliberate change
    with pytest.raises(TableMismatchError, match="has 8 filters but the table has 16"):
        SurpriseMonitor(seeded(TinyCNN(num_classes=3, width=4)), table, execution=lax)
    with pytest.raises(TableMismatchError, match="5 classes but the table has 3"):
        SurpriseMonitor(seeded(TinyCNN(num_classes=5)), table, execution=lax)
    with pytest.raises(ValueError, match="training mode"):
        SurpriseMonitor(model.train(), table)
    model.eval()
    path = table.save(tmp_path / "t.safetensors")
    with SurpriseMonitor(model, str(path)) as m:  # a path works too
        assert m.layer == "features" == table.layer


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda x: x[0], "must be a \\[B, C, H, W\\] batch"),
        (lambda x: x[:0], "empty"),
        (lambda x: x[:, :1], "1 channels"),
        (lambda x: torch.nn.functional.pad(x, (0, 1, 0, 1)), "differs from the calibration size"),
        (lambda x: x.to(torch.int64), "floating point"),
        (
            lambda x: x.index_put((torch.tensor([1]),), torch.tensor(float("nan"))),
            "NaN or Inf values \\(batch rows \\[1\\]\\)",
        ),
    ],
)
def test_bad_input_is_named_and_inference_survives(monitor, calibrated, make, message, caplog):
    model, _ = calibrated
    x = make(mixed_inputs(3))
    with pytest.raises(ValueError, match=message):
        monitor.inspect(x)
    before = sum(monitor.failures.values())
    try:
        with torch.no_grad():
            expected = model(x)
    except Exception as exc:  # the model itself cannot run it: its own error surfaces
        with pytest.raises(type(exc)):
            monitor(x)
    else:
        with caplog.at_level(logging.WARNING):
            out = monitor(x)
        assert torch.equal(out, expected) or (out.isnan().any() and expected.isnan().any())
    assert sum(monitor.failures.values()) == before + 1


def test_training_mode_after_wrapping_fails_open(monitor, calibrated):
    model, _ = calibrated
    x = mixed_inputs(3)
    model.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            monitor.inspect(x)
        out = monitor(x)
        assert out.shape == (3, 3)
        assert monitor.failures["TrainingModeError"] >= 1
    finally:
        model.eval()


def test_uncalibrated_class_is_never_flagged(calibrated):
    model, table = calibrated
    counts = table.counts.clone()
    table.counts[1] = 0
    try:
        with SurpriseMonitor(model, table) as m:
            x = mixed_inputs(6) * 10
            r = m.inspect(x, labels=torch.ones(6, dtype=torch.long))
            assert not r.calibrated.any() and not r.flagged.any()
    finally:
        table.counts = counts


def test_works_inside_the_callers_no_grad_and_inference_mode(monitor):
    x = mixed_inputs(4)
    expected = monitor.inspect(x)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            out = monitor(x)
            report = monitor.inspect(x)
        assert not monitor.failures, monitor.failures
        assert torch.equal(out, expected.logits)
        torch.testing.assert_close(report.alpha, expected.alpha)
        assert torch.equal(report.surprise, expected.surprise)


def _plain_alpha(model, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Oracle: ``features``'s output (the table's layer) captured by a hook, the logit of each
    class differentiated by plain autograd (no library code), ``mean_ij(dO_c/dA * A)``."""
    store = {}

    def hook(module, inputs, output):
        store["a"] = output
        return output.clone()  # nothing downstream may overwrite it in place

    handle = model.features.register_forward_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    (g,) = torch.autograd.grad(logits.gather(1, classes.view(-1, 1)).sum(), store["a"])
    return (g * store["a"]).mean((2, 3)).detach()


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 0.01), (torch.bfloat16, 0.05)])
def test_half_precision_models_are_monitored(calibrated, dtype, tol):
    import copy

    from surprise_monitor.calibrate import calibrate
    from tests._models import class_dataset

    model, _ = calibrated
    half = copy.deepcopy(model).to(dtype)
    images, labels = class_dataset(300, 3, seed=1).tensors
    data = torch.utils.data.TensorDataset(images.to(dtype), labels)
    table = calibrate(half, data, progress=False)  # calibrate() already took half models
    x = mixed_inputs(6).to(dtype)
    with SurpriseMonitor(half, table) as monitor:  # its shape check ran the model in dtype
        out = monitor(x)
        report = monitor.last_report
        assert out.dtype == dtype and torch.equal(out, half(x).detach())
        explanation = monitor.explain(x[2].float(), exemplars_k=0, mean=[0.0], std=[1.0])
    assert report.alpha.dtype == torch.float32 and torch.isfinite(report.alpha).all()
    oracle = _plain_alpha(copy.deepcopy(half).float(), x.float(), report.classes)
    scale = float(oracle.abs().max())
    torch.testing.assert_close(report.alpha, oracle, rtol=tol, atol=tol * scale)
    assert explanation.gradient.shape == (3, 8, 8) and np.isfinite(explanation.gradient).all()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_monitored_model_can_be_copied_pickled_and_saved(calibrated, mode, tmp_path):
    import copy
    import io
    import pickle

    from surprise_monitor.monitor.probe.hooks import InertHook

    model, table = calibrated
    x = mixed_inputs(4)
    with torch.no_grad():
        expected = model(x)
    sampling = Sampling(mode=mode)
    monitor = SurpriseMonitor(model, table, sampling=sampling, metrics=CollectorRegistry())
    try:
        buffer = io.BytesIO()
        torch.save(model, buffer)  # the whole module, hooks and all
        buffer.seek(0)
        copies = [
            copy.deepcopy(model),
            pickle.loads(pickle.dumps(model)),
            torch.load(buffer, weights_only=False),  # our own file: a trusted pickle
        ]
        for twin in copies:
            hooks = [
                h
                for m in twin.modules()
                for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
            ]
            assert hooks and all(isinstance(h, InertHook) for h in hooks)  # copies are unwatched
            with torch.no_grad():
                assert torch.equal(twin(x), expected)
            with SurpriseMonitor(twin, table) as watcher:  # a copy can get its own monitor
                torch.testing.assert_close(watcher.inspect(x).alpha, monitor.inspect(x).alpha)
        assert torch.equal(monitor(x), expected)  # the original is still watched
    finally:
        monitor.close()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ({"alarm_rate": 0.05}, "alarm_rate= is now thresholds=Thresholds(alarm_rate=...)"),
        ({"surprise_pct": 99.0}, "surprise_pct= is now thresholds=Thresholds(surprise_pct=...)"),
        ({"backend": "torch"}, "backend= is now execution=Execution(backend=...)"),
        ({"cuda_graphs": True}, "cuda_graphs= is now execution=Execution(cuda_graphs=...)"),
        ({"sample_every": 3}, "sample_every= is now sampling=Sampling(every=...)"),
        ({"mode": "async"}, "mode= is now sampling=Sampling(mode=...)"),
        ({"metrics_window": 10}, "metrics_window= is now metrics=MetricsOptions(window=...)"),
        ({"per_class_metrics": True}, "per_class_metrics= is now metrics=MetricsOptions(per_class"),
        ({"on_flag": print}, "on_flag= is now on_alarm="),
    ],
)
def test_old_keywords_name_their_new_spelling(calibrated, old, new):
    model, table = calibrated
    with pytest.raises(TypeError, match=re.escape(new)) as refused:
        SurpriseMonitor(model, table, **old)
    assert str(refused.value).startswith("SurpriseMonitor(): ")
    assert all(not mod._forward_hooks for mod in model.modules())  # refused before any hook
    if "thresholds" in new or "execution" in new:
        with pytest.raises(TypeError, match=re.escape(new)):
            Judge(model, table, **old)


def test_the_groups_reach_the_judge_and_the_request_path(calibrated):
    model, table = calibrated
    thresholds = Thresholds(surprise_pct=95.0, alarm_rate=0.2)
    execution = Execution(backend="torch", host_checks=True, strict_input_size=False)
    sampling = Sampling(every=2)
    with SurpriseMonitor(
        model, table, thresholds=thresholds, execution=execution, sampling=sampling,
        metrics=MetricsOptions(registry=CollectorRegistry(), window=7),
    ) as m:  # fmt: skip
        assert m.thresholds is thresholds and m.judge.thresholds is thresholds
        assert m.execution is execution and m.judge.execution is execution
        assert m.sampling is sampling and m.request_path.sampling is sampling
        assert m.judge.checks_on_host(torch.zeros(1)) is True  # host_checks reached the judge
        assert m.metrics is not None and m.metrics.window.size == 7
        assert m.inspect(mixed_inputs(4)).alarm_rate == 0.2
        assert m.run(mixed_inputs(4)).rows.tolist() == [0, 2]  # one input in 2
        bigger = torch.nn.functional.pad(mixed_inputs(2), (0, 1, 0, 1))
        assert m.inspect(bigger).alpha.shape[0] == 2  # strict_input_size is off
    with SurpriseMonitor(model, table) as plain:
        assert plain.thresholds == Thresholds() and plain.execution == Execution()
        assert plain.sampling == Sampling() and plain.metrics is None
        assert plain.inspect(mixed_inputs(4)).alarm_rate == 0.01
    with pytest.raises(TypeError, match="thresholds must be Thresholds"):
        SurpriseMonitor(model, table, thresholds={"alarm_rate": 0.1})
