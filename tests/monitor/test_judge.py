"""The judge: pure (a batch in, a report out), in three stages; the device stage leaves the one
value check it cannot do without a host sync to the assembly."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from surprise_monitor.monitor import InvalidInputError, Judge, SurpriseMonitor, TableMismatchError
from surprise_monitor.monitor.host_copy import to_host
from surprise_monitor.monitor.judge import DeviceReport
from surprise_monitor.monitor.options import Execution, Thresholds
from tests._checks import assert_same
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
        if f.name not in DeviceReport.CHECKS:
            got = getattr(report, f.name)
            assert_same(got, getattr(dev, f.name).cpu(), f.name)
            assert_same(got, getattr(expected, f.name), f.name)
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
    from surprise_monitor.monitor.table import CalibrationTable
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


_SYNCS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__")


class SyncCounter:
    """Counts the Tensor methods that read values on the host (a device sync on a GPU)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for name in _SYNCS:
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, real))
        monkeypatch.setattr(torch, "nonzero", self._wrap("torch.nonzero", torch.nonzero))

    def _wrap(self, name, real):
        def counted(*args, **kwargs):
            self.calls.append(name)
            return real(*args, **kwargs)

        return counted


def test_the_device_step_reads_no_value_and_the_report_is_one_copy(judge, calibrated, monkeypatch):
    """With the value checks on the device (what a GPU input gets), stages 1 and 2 read no
    tensor value on the host and stage 3 copies one packed buffer (counted on the CPU by
    patching every value-reading Tensor method)."""
    model, table = calibrated
    x, labels = mixed_inputs(6), torch.tensor([0, 1, 2, 0, 1, 2])
    expected = judge(x, labels)
    j = Judge(model, table, execution=Execution(host_checks=False))
    try:
        j(x[:1])  # once per device: the table is prepared (and its levels read)
        counter = SyncCounter(monkeypatch)
        batch = j.validate(x, labels)
        step = j.device_step(batch)
        assert counter.calls == [], counter.calls
        packed = DeviceReport(**to_host(step.report.tensors(), always_pack=True))
        assert counter.calls == ["cpu"], counter.calls
        report = j.assemble(dataclasses.replace(step, report=packed))
    finally:
        j.close()
    for name in ("alpha", "percentile", "beta", "beta_percentile", "surprise", "low_beta"):
        assert torch.equal(getattr(report, name), getattr(expected, name)), name
    assert report.labels_given


@pytest.mark.parametrize("where", ["host", "device"])
def test_bad_values_are_refused_with_the_same_message_wherever_checked(calibrated, where):
    """NaN / Inf inputs and labels out of range: checked on the host before the model runs, or
    counted on the device and raised at assembly (after one forward pass) with the same
    message; a bad label never indexes out of range on the device."""
    model, table = calibrated
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    j = Judge(model, table, execution=Execution(host_checks=where == "host"))
    try:
        x = mixed_inputs(3)
        x[2, 0, 0, 0] = float("inf")
        with pytest.raises(InvalidInputError, match=r"NaN or Inf values \(batch rows \[2\]\)"):
            j(x)
        with pytest.raises(InvalidInputError, match=r"labels must lie in \[0, 3\), got \[0, 3\]"):
            j(mixed_inputs(2), torch.tensor([0, 3]))
        with pytest.raises(InvalidInputError, match=r"labels must lie in \[0, 3\)"):
            j(mixed_inputs(2), torch.tensor([-1, 1]))
        calls.clear()
        assert len(j(mixed_inputs(2), [2, 1])) == 2
    finally:
        j.close()
        handle.remove()
    assert len(calls) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_device_step_never_syncs(calibrated):
    model, table = calibrated
    gpu = type(model)(num_classes=3).cuda().eval()
    gpu.load_state_dict(model.state_dict())
    j = Judge(gpu, table)
    try:
        x, labels = mixed_inputs(4).cuda(), torch.tensor([0, 1, 2, 0])
        j(x, labels)  # warm: the table on the device, Triton compiled and tuned
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step = j.device_step(j.validate(x, labels))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        report = j.assemble(step)
    finally:
        j.close()
    assert torch.equal(report.classes, labels)


def test_the_judge_takes_the_groups_whole(calibrated):
    model, table = calibrated
    strict = Thresholds(surprise_pct=50.0, expectation_pct=0.0, low_beta_pct=100.0)
    j = Judge(model, table, thresholds=strict, execution=Execution(host_checks=False))
    try:
        assert j.thresholds is strict and j.execution.host_checks is False
        assert not j.checks_on_host(torch.zeros(1))  # on the device even for a CPU tensor
        report = j(mixed_inputs(4))
    finally:
        j.close()
    with contextlib.closing(Judge(model, table)) as default:
        usual = default(mixed_inputs(4))
    # above the calibration median is surprising now: more flags, the usual ones among them
    assert torch.equal(report.surprise, (report.percentile > 50.0) & report.calibrated[:, None])
    assert int(report.surprise.sum()) > int(usual.surprise.sum()) > 0
    assert not (usual.surprise & ~report.surprise).any()
    assert not (usual.low_beta & ~report.low_beta).any()
    assert int(report.low_beta.sum()) > int(usual.low_beta.sum())
    for name in ("surprise_pct", "alarm_rate", "backend", "host_checks", "strict_input_size"):
        assert not hasattr(j, name), name  # read from the groups


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Thresholds(surprise_pct=100.5), r"surprise_pct must be a percentage in \[0, 100"),
        (lambda: Thresholds(low_beta_pct=-1), "low_beta_pct must be a percentage"),
        (lambda: Thresholds(alarm_rate=1.0), r"alarm_rate must be a fraction in \(0, 1\)"),
        (lambda: Execution(backend="cuda"), "backend must be one of"),
        (lambda: Execution(max_graphs=0), "max_graphs must be an integer >= 1"),
    ],
)
def test_the_groups_check_their_values(make, message):
    with pytest.raises(ValueError, match=message):
        make()
