"""The fit / predict face: the same numbers as calibrate + SurpriseMonitor."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from surprise_monitor.calibrate import NotFittedError, SurpriseDetector, calibrate
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.options import Execution, Thresholds
from tests._models import class_images, trained_tiny_cnn


def _data(start: int, stop: int) -> TensorDataset:
    x, y = class_images(2000, 3, seed=1)
    return TensorDataset(x[start:stop], y[start:stop])


def test_the_detector_is_calibrate_plus_the_monitor(tmp_path):
    model = trained_tiny_cnn()
    train, held = DataLoader(_data(0, 600), batch_size=100), _data(600, 900)
    x = torch.cat([_data(900, 960).tensors[0], 3 * torch.randn(20, 3, 8, 8)])
    with pytest.raises(NotFittedError, match="call fit"):
        SurpriseDetector(model).predict(x)
    rate = Thresholds(alarm_rate=0.05)
    quiet = {"progress": False}
    with SurpriseDetector(model, thresholds=rate, calibrate_kwargs=quiet) as det:
        assert det.fit(train, held) is det
        table = calibrate(model, train, heldout=held, progress=False)
        with SurpriseMonitor(model, table, thresholds=rate) as monitor:
            want = monitor.inspect(x)
        torch.testing.assert_close(det.predict(x), want.score)  # pytorch-ood's predict: scores
        torch.testing.assert_close(det(x), want.score)
        torch.testing.assert_close(det.p_value(x), want.p_value)
        assert torch.equal(det.alarms(x), want.p_value <= 0.05)
        assert det.alarms(x)[-20:].all() and det.alarms(x)[:60].float().mean() < 0.2
        assert not hasattr(det, "score")
        path = det.save(tmp_path / "det.safetensors")
    torch_only = {"execution": Execution(backend="torch")}
    with SurpriseDetector.load(model, path, thresholds=rate, monitor_kwargs=torch_only) as again:
        torch.testing.assert_close(again.p_value(x), want.p_value)
        assert again.monitor.execution.backend == "torch"
        assert again.monitor.thresholds.alarm_rate == 0.05
    with SurpriseDetector.load(model, path) as default:
        assert torch.equal(default.alarms(x), want.p_value <= 0.01)  # Thresholds' default rate
    with pytest.raises(ValueError, match="needs heldout images"):
        SurpriseDetector(model).fit(train, None)
    bare = calibrate(model, train, progress=False)
    with pytest.raises(ValueError, match="no held-out null"):
        SurpriseDetector.load(model, bare.save(tmp_path / "bare.safetensors"))
    with pytest.raises(TypeError, match=r"alarm_rate= is now thresholds=Thresholds\(alarm_rate"):
        SurpriseDetector(model, alarm_rate=0.05)
    with pytest.raises(TypeError, match=r"alarm_rate= is now thresholds=Thresholds\(alarm_rate"):
        SurpriseDetector.load(model, path, alarm_rate=0.05)
