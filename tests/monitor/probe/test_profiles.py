"""Activation profiles: what the tap records, and which layers are picked."""

from __future__ import annotations

import threading

import pytest
import torch
import torchvision

from surprise_monitor.monitor.probe.profiles import ProfileTap, head_layer, stage_layers
from tests._models import TinyCNN, seeded


def test_the_tap_records_each_channels_spatial_mean_and_changes_nothing():
    model = seeded(torchvision.models.resnet18(num_classes=5)).eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    seen = {}
    handles = [
        getattr(model, name).register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, o.detach().clone())
        )
        for name in ("relu", "layer1")
    ]
    with torch.no_grad():
        plain = model(x)
    tap = ProfileTap(model, ["relu", "layer1"])
    try:
        with tap.armed() as record, torch.no_grad():
            watched = model(x)
        means = tap.means(record)
    finally:
        tap.close()
        for h in handles:
            h.remove()
    assert torch.equal(plain, watched)
    for name, m in zip(("relu", "layer1"), means, strict=True):
        torch.testing.assert_close(m, seen[name].mean(dim=(2, 3)), rtol=1e-6, atol=1e-7)
    assert means[0].shape == (3, 64) and means[1].shape == (3, 64)


def test_the_tap_records_only_in_the_armed_thread():
    model = seeded(TinyCNN(num_classes=3)).eval()
    tap = ProfileTap(model, ["features.1"])
    x = torch.randn(2, 3, 8, 8)
    other: list[dict] = []
    try:
        with tap.armed() as record:
            t = threading.Thread(target=lambda: other.append(dict(record)) or model(x))
            t.start()
            t.join()
            assert record == {}  # the other thread's forward pass left no trace
            with torch.no_grad():
                model(x)
        assert list(record) == ["features.1"]
        with pytest.raises(RuntimeError, match=r"\['features.3'\] did not run"):
            ProfileTap(model, ["features.3"]).means({})
    finally:
        tap.close()


def test_stage_layers_take_the_last_module_of_each_early_resolution():
    r18 = torchvision.models.resnet18(num_classes=4).eval()
    assert stage_layers(r18, torch.zeros(1, 3, 224, 224)) == ["relu", "layer1"]
    cifar = torchvision.models.resnet18(num_classes=10)
    cifar.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    cifar.maxpool = torch.nn.Identity()
    assert stage_layers(cifar.eval(), torch.zeros(1, 3, 32, 32)) == ["layer1", "layer2"]
    vgg = torchvision.models.vgg11(num_classes=4).eval()
    assert stage_layers(vgg, torch.zeros(1, 3, 64, 64), 3) == [
        "features.1", "features.4", "features.9"
    ]  # fmt: skip
    tiny = TinyCNN(num_classes=3).eval()  # one resolution; stops before the monitored layer
    assert stage_layers(tiny, torch.zeros(1, 3, 8, 8), before="features.2") == ["features.1"]
    # the default monitored layer, the whole block: its last conv's map is the block's output
    assert stage_layers(tiny, torch.zeros(1, 3, 8, 8), before="features") == ["features.1"]


def test_the_head_layer_is_the_last_feature_map_before_the_classifier():
    r18 = torchvision.models.resnet18(num_classes=4).eval()
    assert head_layer(r18, torch.zeros(1, 3, 224, 224)) == "layer4"  # avgpool is 1 x 1
    vgg = torchvision.models.vgg11(num_classes=4).eval()
    assert head_layer(vgg, torch.zeros(1, 3, 224, 224)) == "features"  # avgpool keeps 7 x 7
    assert head_layer(vgg, torch.zeros(1, 3, 64, 64)) == "avgpool"  # 2 x 2 resized to 7 x 7
    assert head_layer(TinyCNN(num_classes=3).eval(), torch.zeros(1, 3, 8, 8)) == "features"
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2)).eval()
    with pytest.raises(ValueError, match="head_layer='none'"):
        head_layer(flat, torch.zeros(1, 3, 8, 8))
