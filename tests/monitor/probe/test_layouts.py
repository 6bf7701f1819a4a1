"""Layouts and refusals of the layer choice: channels-last maps and tokens read as conv maps,
an ambiguous channel axis refused or stated, a head that reads something else refused naming
candidates, an example too small for the model read at its last 1 x 1 map."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from surprise_monitor.monitor.probe import resolve_layer
from surprise_monitor.monitor.probe.layout import as_nchw, layer_spec, split_layer
from tests.monitor.probe.test_architectures import check_alpha


def test_views_put_channels_second_without_copying():
    t = torch.randn(2, 5, 7)  # [B, T, C] tokens
    v = as_nchw(t)
    assert v.shape == (2, 7, 5, 1) and v.data_ptr() == t.data_ptr()
    assert torch.equal(v[:, :, :, 0], t.transpose(1, 2))
    m = torch.randn(2, 3, 4, 6)  # [B, H, W, C]
    assert torch.equal(as_nchw(m, "nhwc"), m.permute(0, 3, 1, 2))
    assert as_nchw(m) is m  # 4-D: channels first unless stated
    with pytest.raises(ValueError, match="tokens activation is 3-D"):
        as_nchw(m, "tokens")
    assert split_layer("norm:nhwc") == ("norm", "nhwc") and split_layer("layer4") == (
        "layer4",
        None,
    )
    assert (
        layer_spec("norm", "nhwc") == "norm:nhwc" and layer_spec("encoder", "tokens") == "encoder"
    )
    with pytest.raises(ValueError, match="must be a layout"):
        split_layer("norm:sideways")


class ChannelsLast(nn.Module):
    """A stage that outputs ``[B, H, W, C]`` (as Swin's do), a norm over C, then the head."""

    def __init__(self, channels: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.stage = nn.Sequential(nn.Linear(channels, channels), nn.GELU())
        self.norm = nn.LayerNorm(channels)
        self.head = nn.Linear(channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stage(self.stem(x).permute(0, 2, 3, 1))  # [B, H, W, C]
        return self.head(self.norm(h).mean(dim=(1, 2)))


def test_a_channels_last_map_is_read_as_such():
    torch.manual_seed(0)
    model = ChannelsLast().eval()
    choice = resolve_layer(model, None, torch.zeros(1, 3, 8, 8))
    assert (choice.name, choice.layout, choice.out_shape) == ("norm:nhwc", "nhwc", (6, 8, 8))
    check_alpha(model, choice.name, 8)
    named = resolve_layer(model, "stage", torch.zeros(1, 3, 8, 8))  # resolved from the shape
    assert (named.name, named.out_shape) == ("stage:nhwc", (6, 8, 8))


class Square(nn.Module):
    """A block whose output is ``[B, 4, 4, 4]``: no module around it says where its channels
    are (a functional op produces it, a functional op reads it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True).expand(-1, 4, -1, -1) * 2


class Ambiguous(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.block = Square()
        self.head = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.block(self.pool(x))).flatten(1))


def test_an_ambiguous_channel_axis_is_refused_or_stated():
    model = Ambiguous().eval()
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"channel axis is ambiguous.*layer='block:nchw'"):
        resolve_layer(model, "block", x)
    assert resolve_layer(model, "block:nhwc", x).name == "block:nhwc"
    assert resolve_layer(model, "block:nchw", x).name == "block"


class TwoMaps(nn.Module):
    """The head reads the concatenation of two maps, made functionally: no module outputs it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.a(x), self.b(x)], dim=1).mean(dim=(2, 3)))


def test_a_head_that_reads_another_map_is_refused_naming_candidates():
    with pytest.raises(ValueError, match=r"cannot tell which.*'b' \[6, 8, 8\].*'a' \[4, 8, 8\]"):
        resolve_layer(TwoMaps().eval(), None, torch.zeros(1, 3, 8, 8))


def test_an_example_too_small_for_the_model_falls_back_to_its_last_1x1_map():
    model = torchvision.models.inception_v3(
        weights=None, num_classes=10, aux_logits=False, init_weights=False
    ).eval()
    choice = resolve_layer(model, None, torch.zeros(1, 3, 96, 96))
    assert (choice.name, choice.out_shape) == ("Mixed_7c", (2048, 1, 1))  # not a branch inside
    assert "the example [3, 96, 96] is small for this model: its last maps are 1 x 1" in (
        choice.reason
    )
    cifar = torchvision.models.resnet18(num_classes=10).eval()  # ImageNet ResNet fed 32 x 32
    assert resolve_layer(cifar, None, torch.zeros(1, 3, 32, 32)).name == "layer4"


def test_final_conv_keeps_the_papers_choice():
    model = torchvision.models.resnet18(num_classes=10).eval()
    choice = resolve_layer(model, "final-conv", torch.zeros(1, 3, 64, 64))
    assert choice.name == "layer4.1.conv2" and "paper's final convolution" in choice.reason
    assert resolve_layer(model, None, torch.zeros(1, 3, 64, 64)).name == "layer4"
