"""Vision transformers end to end (timm ViT, DeiT and Swin; random weights, small configurations):
the automatic layer is the head's tokens (Swin: its channels-last map, read as such), calibration
builds a table with the alarm's stages, the monitor's alpha equals a plain-autograd oracle on the
tokens, far-off inputs alarm, and an explanation of a real photo draws a region from the
token-restricted input gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from surprise_monitor.calibrate import calibrate
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.explain import explain
from tests._models import normalise, photo_crops
from tests.monitor.probe.test_architectures import oracle_alpha

timm = pytest.importorskip("timm")

SMALL = {  # name: (constructor kwargs, the layer spec picked)
    "vit_tiny_patch16_224": ({"img_size": 32, "patch_size": 8, "depth": 2}, "norm"),
    "deit_tiny_patch16_224": ({"img_size": 32, "patch_size": 8, "depth": 2}, "norm"),
    "swin_tiny_patch4_window7_224": (
        {"img_size": 32, "patch_size": 2, "window_size": 2, "depths": (1, 1, 1, 1),
         "embed_dim": 24, "num_heads": (1, 1, 2, 2)},
        "norm:nhwc",
    ),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(SMALL))
def calibrated_token_model(request):
    kwargs, spec = SMALL[request.param]
    torch.manual_seed(0)
    model = timm.create_model(request.param, pretrained=False, num_classes=4, **kwargs).eval()
    images, labels = photo_crops(size=32)  # 4 photos, crops and mirrors
    x, y = normalise(images), torch.from_numpy(labels)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    train, held = order[: len(x) // 2], order[len(x) // 2 :]
    jitter = 0.05 * torch.randn(4, *x.shape, generator=g)  # more images of the same photos
    heldout = TensorDataset((x[held] + jitter[:, held]).flatten(0, 1), y[held].repeat(4))
    table = calibrate(model, TensorDataset(x[train], y[train]), heldout=heldout, progress=False)
    return request.param, spec, model, table, x[held], y[held]


def test_the_head_tokens_are_monitored_and_alpha_is_the_oracles(calibrated_token_model):
    name, spec, model, table, x, y = calibrated_token_model
    assert table.layer == spec, table.layer_reason
    assert "the feature map the classifier head reads" in table.layer_reason
    assert table.alarm is not None and table.alarm.profile_layers  # stages found for the alarm
    with SurpriseMonitor(model, table) as monitor:
        report = monitor.inspect(x[:3])
        torch.testing.assert_close(monitor(x[:3]), model(x[:3]))
    assert report.alpha.shape == (3, table.num_filters)
    for b in range(3):
        want = oracle_alpha(model, spec, x[b : b + 1])
        scale = want.abs().max()
        torch.testing.assert_close(report.alpha[b] / scale, want / scale, rtol=1e-4, atol=1e-4)


def test_far_off_inputs_alarm_and_typical_ones_mostly_do_not(calibrated_token_model):
    _, _, model, table, x, _ = calibrated_token_model
    side = x.shape[-1]
    checker = ((torch.arange(side)[:, None] + torch.arange(side)[None]) % 2 * 4 - 2).float()
    levels = torch.tensor([-2.0, -1.75, 1.75, 2.0]).view(4, 1, 1, 1)  # near black / white
    no_photo = checker.expand(4, 3, side, side) * levels.abs()
    flat = levels.expand(4, 3, side, side)  # frames of a dead or saturated sensor
    far = torch.cat([no_photo, flat])
    with SurpriseMonitor(model, table) as monitor:
        typical, odd = monitor.inspect(x), monitor.inspect(far)
    assert bool((odd.alarm == (odd.p_value <= table_rate(monitor))).all())
    assert odd.alarm.float().mean() >= 0.75
    assert typical.alarm.float().mean() <= 0.25


def table_rate(monitor: SurpriseMonitor) -> float:
    return monitor.thresholds.alarm_rate


def test_an_explanation_of_a_real_photo_draws_a_region(calibrated_token_model):
    _, spec, model, table, x, y = calibrated_token_model
    with SurpriseMonitor(model, table) as monitor:
        expl = explain(monitor, x[0], label=int(y[0]), mean=[0.5] * 3, std=[0.25] * 3)
    assert expl.segments.max() >= 4  # a real photo: several superpixels
    assert np.abs(expl.gradient).sum() > 0  # the gradient through the chosen channel
    assert expl.mask.any() and not expl.mask.all()
    assert 0 <= expl.filter < table.num_filters
