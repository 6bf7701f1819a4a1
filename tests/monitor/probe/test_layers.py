"""Choosing the target layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from surprise_monitor.monitor.probe import resolve_layer
from surprise_monitor.monitor.probe.layers import FINAL_CONV
from tests._models import ShortcutNet, TinyCNN, seeded

HEAD_READS = "the feature map the classifier head reads: "


def test_the_default_is_the_whole_block_the_head_reads():
    x = torch.zeros(1, 3, 8, 8)
    choice = resolve_layer(seeded(ShortcutNet()), None, x)
    assert choice.name == "block" and choice.layout == "nchw"  # after the shortcut's sum
    assert choice.reason.startswith(HEAD_READS) and "'fc', Linear of 12 inputs" in choice.reason
    assert choice.out_shape == (12, 8, 8)
    tiny = resolve_layer(seeded(TinyCNN()), None, x)
    assert tiny.name == "features" and tiny.reason.startswith(HEAD_READS)
    assert tiny.out_shape == (16, 8, 8)


def test_final_conv_skips_a_projection_shortcut_and_explains_it():
    model = seeded(ShortcutNet())
    choice = resolve_layer(model, FINAL_CONV, torch.zeros(1, 3, 8, 8))
    assert FINAL_CONV == "final-conv"
    assert choice.name == "block.conv2"
    assert choice.reason.startswith("last nn.Conv2d executed in a forward pass")
    assert "block.downsample.0" in choice.reason and "projection shortcut" in choice.reason
    assert choice.out_shape == (12, 8, 8)
    tiny = resolve_layer(seeded(TinyCNN()), FINAL_CONV, torch.zeros(1, 3, 8, 8))
    assert tiny.name == "features.2"


def test_named_layer_checks():
    model = seeded(TinyCNN())
    x = torch.zeros(1, 3, 8, 8)
    assert resolve_layer(model, "features.3", x).out_shape == (16, 8, 8)
    with pytest.raises(ValueError, match="did you mean 'features.2'"):
        resolve_layer(model, "feature.2", x)
    with pytest.raises(ValueError, match="4-D"):
        resolve_layer(model, "fc", x)


def test_reused_module_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.head = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.head(self.conv(self.conv(x))).mean((2, 3)))

    model = Twice().eval()
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="ran 2 times"):
        resolve_layer(model, "conv", x)
    assert resolve_layer(model, None, x).name == "head"


def test_model_without_a_feature_map_or_conv():
    flat = nn.Sequential(nn.Flatten(), nn.Linear(12, 2)).eval()
    with pytest.raises(ValueError, match=r"no module outputs a feature map .*\(layer=\.\.\.\)"):
        resolve_layer(flat, None, torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        resolve_layer(flat, FINAL_CONV, torch.zeros(1, 3, 2, 2))
