"""The inference-mode probe and mixed precision: same alpha as the plain probe; AMP close."""

from __future__ import annotations

import pytest
import torch

from surprise_monitor.calibrate import calibrate
from surprise_monitor.calibrate.inference_probe import InferenceModeProbe, InferenceModeUnsupported
from surprise_monitor.calibrate.options import RunOptions
from surprise_monitor.monitor.probe import GradAMapProbe
from tests._models import ShortcutNet, TinyCNN, class_dataset, seeded


@pytest.mark.parametrize("labels", [None, torch.tensor([0, 2, 1, 1])])
def test_inference_mode_probe_equals_the_plain_probe_bitwise(labels):
    model = seeded(TinyCNN(num_classes=3))
    x = class_dataset(4, 3).tensors[0]
    plain_probe = GradAMapProbe(model, "features.2")
    plain = plain_probe.run(x, labels)
    plain_probe.close()
    probe = InferenceModeProbe(model, "features.2")
    with torch.enable_grad():
        fast = probe.run(x, labels)
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    for name in ("activation", "gradient", "logits", "classes"):
        assert torch.equal(getattr(plain, name), getattr(fast, name)), name
        assert not getattr(fast, name).is_inference()
    probe.close()
    assert not model._forward_pre_hooks and not model.features[2]._forward_hooks
    # The plain model runs untouched after the probe.
    assert not model(x).is_inference()


def test_head_needing_prefix_tensors_falls_back_to_no_grad():
    model = seeded(ShortcutNet())
    x = class_dataset(6, 3, size=8).tensors[0]
    probe = InferenceModeProbe(model, "block.conv2")  # the shortcut convolves x afterwards
    with pytest.raises(InferenceModeUnsupported):
        probe.run(x)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    probe.close()
    data = class_dataset(20, 3)
    a = calibrate(model, data, progress=False, run=RunOptions(batch_size=8, inference_mode=True))
    b = calibrate(model, data, progress=False, run=RunOptions(batch_size=8, inference_mode=False))
    assert torch.equal(a.quantiles, b.quantiles) and torch.equal(a.top_indices, b.top_indices)


def test_amp_on_cpu_is_close_to_float32():
    model = seeded(TinyCNN(num_classes=3))
    data = class_dataset(60, 3)
    full = calibrate(model, data, progress=False, run=RunOptions(batch_size=16))
    bfloat16 = RunOptions(batch_size=16, amp=True)  # bfloat16 on CPU
    half = calibrate(model, data, progress=False, run=bfloat16)
    assert half.quantiles.dtype == torch.float32
    assert not torch.equal(full.quantiles, half.quantiles)  # it did run in bfloat16
    scale = full.quantiles.abs().amax()
    assert (full.quantiles - half.quantiles).abs().amax() < 0.05 * scale
    assert torch.equal(full.counts, half.counts)
