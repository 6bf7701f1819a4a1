"""The judge: pure (a batch in, a report out), in three stages; the device stage leaves the one
value check it cannot do without a host sync to the assembly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from monitor import InvalidInputError, Judge, SurpriseMonitor, TableMismatchError
from monitor.judge import DeviceReport
from tests._models import mixed_inputs


@pytest.fixture()
def judge(calibrated):
    model, table = calibrated
    j = Judge(model, table)
    yield j
    j.close()


def test_the_stages_make_the_monitors_report(judge, calibrated):
    model, table = calibrated
    x, labels = mixed_inputs(8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    batch = judge.validate(x, labels)
    step = judge.device_step(batch)
    with torch.no_grad():
        assert torch.equal(step.output, model(x))  # the model's own output, same pass
    dev = step.report
    assert isinstance(dev, DeviceReport) and int(dev.nonfinite_alpha) == 0
    report = judge.assemble(step, batch.labels_given)
    with SurpriseMonitor(model, table) as monitor:
        expected = monitor.inspect(x, labels)
    for f in dataclasses.fields(DeviceReport):
        if f.name != "nonfinite_alpha":
            assert torch.equal(getattr(report, f.name), getattr(dev, f.name).cpu()), f.name
            assert torch.equal(getattr(report, f.name), getattr(expected, f.name)), f.name
    assert report.labels_given and report.layer == table.layer
    assert torch.equal(report.classes, labels)
    assert report.surprise.any() and report.low_beta.any()  # a real signal in these inputs


def test_the_judge_keeps_nothing_between_calls(judge):
    x = mixed_inputs(4)
    first = judge(x)
    judge(mixed_inputs(4, seed=3))
    again = judge(x)
    for name in ("alpha", "percentile", "beta", "surprise", "expectation", "low_beta"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert not hasattr(judge, "last_report") and not hasattr(judge, "failures")


def test_non_finite_alpha_is_refused_at_assembly(judge):
    step = judge.device_step(judge.validate(mixed_inputs(2)))
    alpha = step.report.alpha.clone()
    alpha[1, 3] = float("nan")
    bad = dataclasses.replace(
        step, report=dataclasses.replace(
            step.report, alpha=alpha, nonfinite_alpha=(~torch.isfinite(alpha)).sum()
        )
    )  # fmt: skip
    with pytest.raises(ValueError, match="percentile_lookup: alpha has 1 non-finite values"):
        judge.assemble(bad, False)


def test_validation_is_the_first_stage(judge):
    x = mixed_inputs(3)
    x[2, 0, 0, 0] = float("inf")
    with pytest.raises(InvalidInputError, match=r"NaN or Inf values \(batch rows \[2\]\)"):
        judge.validate(x)
    with pytest.raises(InvalidInputError, match=r"labels must lie in \[0, 3\)"):
        judge.validate(mixed_inputs(2), [0, 3])
    assert judge.validate(mixed_inputs(1), 2).labels.tolist() == [2]  # a bare label: one input
    assert judge.validate(mixed_inputs(1)).labels is None


def test_close_removes_the_hook(calibrated):
    model, table = calibrated
    j = Judge(model, table)
    assert any(m._forward_hooks for m in model.modules())
    j.close()
    j.close()  # idempotent
    assert all(not m._forward_hooks for m in model.modules())


def test_a_table_moved_to_another_layer_with_as_many_filters_is_refused(calibrated, tmp_path):
    from monitor.table import CalibrationTable
    from tests._checks import resign

    model, table = calibrated
    path = table.save(tmp_path / "t.safetensors")
    assert model.features[3](torch.zeros(1, 16, 8, 8)).shape[1] == table.num_filters
    resign(path, lambda meta: meta.update(layer="features.3"))  # the ReLU after the conv
    moved = CalibrationTable.load(path)
    with pytest.raises(TableMismatchError, match="not calibrated at this model's layer"):
        Judge(model, moved)
    Judge(model, CalibrationTable.load(table.save(path))).close()  # the real one still fits


def test_messages_name_the_fix_in_the_api(calibrated):
    model, table = calibrated
    judge = Judge(model, table)
    x = mixed_inputs(2)
    try:
        with pytest.raises(InvalidInputError, match=r"looks like \[B, H, W, C\].*permute"):
            judge(x.permute(0, 2, 3, 1))
        with pytest.raises(InvalidInputError, match=r"class indices.*class_names.index\('c1'\)"):
            judge(x, ["c1", "c2"])
        with pytest.raises(InvalidInputError, match="class indices"):
            judge(x, [object(), 1])
    finally:
        judge.close()
