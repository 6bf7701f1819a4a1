"""The automatic layer choice on every torchvision classification architecture and on timm
families (random weights, small inputs where the architecture allows).

For each model: the layer picked (per architecture, by name); that it is the feature map the head
reads (the cut test: handing the head the map of one input during another input's pass gives the
first input's logits, so nothing reaches the logits around it); and alpha against a plain-autograd
oracle on the layer's own output, in its own layout (tokens, channels-last or conv maps)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from surprise_monitor.kernels import grad_amap
from surprise_monitor.monitor.probe import GradAMapProbe, resolve_layer
from surprise_monitor.monitor.probe.hooks import get_module
from surprise_monitor.monitor.probe.layout import split_layer

#: torchvision's classification models: the layer picked by default (random weights, 10 classes).
TORCHVISION = {
    "alexnet": "avgpool",  # at 64 x 64 the head reads the 6 x 6 map avgpool resizes to
    "convnext_tiny": "features", "convnext_small": "features", "convnext_base": "features",
    "convnext_large": "features",
    "densenet121": "features", "densenet161": "features", "densenet169": "features",
    "densenet201": "features",
    "efficientnet_b0": "features", "efficientnet_b1": "features", "efficientnet_b2": "features",
    "efficientnet_b3": "features", "efficientnet_b4": "features", "efficientnet_b5": "features",
    "efficientnet_b6": "features", "efficientnet_b7": "features",
    "efficientnet_v2_s": "features", "efficientnet_v2_m": "features",
    "efficientnet_v2_l": "features",
    "googlenet": "inception5b", "inception_v3": "Mixed_7c", "maxvit_t": "blocks.3",
    "mnasnet0_5": "layers", "mnasnet0_75": "layers", "mnasnet1_0": "layers", "mnasnet1_3": "layers",
    "mobilenet_v2": "features", "mobilenet_v3_large": "features",
    "mobilenet_v3_small": "features",
    **{f"regnet_{k}": "trunk_output" for k in (
        "x_400mf", "x_800mf", "x_1_6gf", "x_3_2gf", "x_8gf", "x_16gf", "x_32gf", "y_400mf",
        "y_800mf", "y_1_6gf", "y_3_2gf", "y_8gf", "y_16gf", "y_32gf", "y_128gf")},
    **{n: "layer4" for n in (
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
        "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")},
    **{f"shufflenet_v2_x{k}": "conv5" for k in ("0_5", "1_0", "1_5", "2_0")},
    "squeezenet1_0": "features", "squeezenet1_1": "features",  # not the classifier conv
    **{n: "permute" for n in ("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s",
                              "swin_v2_b")},  # the channels-first view the pooling reads
    **{n: "avgpool" for n in ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn",
                              "vgg19", "vgg19_bn")},  # the 7 x 7 map the dense head flattens
    **{n: "encoder" for n in ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")},
}  # fmt: skip

#: timm families (the issue's and a few more): name -> (layer, constructor kwargs, input size).
TIMM = {
    "resnet50d": ("layer4", {}, 64),
    "regnety_002": ("s4", {}, 64),
    "mobilenetv3_small_100": ("blocks", {}, 64),  # not conv_head, the 1x1 conv after pooling
    "efficientnet_b0": ("bn2", {}, 64),
    "convnext_atto": ("stages", {}, 64),
    "densenet121": ("features", {}, 64),
    "vit_tiny_patch16_224": ("norm", {"img_size": 32, "patch_size": 8}, 32),
    "deit_tiny_patch16_224": ("norm", {"img_size": 32, "patch_size": 8}, 32),
    "swin_tiny_patch4_window7_224": ("norm:nhwc", {"img_size": 64, "window_size": 2}, 64),
    "maxvit_tiny_tf_224": ("stages", {}, 224),
    "coatnet_0_rw_224": ("norm", {}, 224),
}


def torchvision_model(name: str) -> tuple[nn.Module, int]:
    """A random-weight torchvision classifier of 10 classes and the input size it is run at."""
    kwargs: dict = {}
    size = 64
    if name in ("googlenet", "inception_v3"):
        kwargs = {"aux_logits": False, "init_weights": False}
        size = 139 if name == "inception_v3" else 64  # 139: its last maps larger than 1 x 1
    if name.startswith("vit_"):
        size = kwargs["image_size"] = 56 if name == "vit_h_14" else 64
    if name == "maxvit_t":
        size = 224  # its partitions need 224 x 224
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    return lively_head(model).eval(), size


def lively_head(model: nn.Module) -> nn.Module:
    """``model`` with its dense layers drawn at unit gain (a ViT's head starts at zero, others
    near it): the logits then tell inputs apart, which the cut test needs."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features**0.5)
    return model


def timm_model(name: str) -> tuple[nn.Module, int]:
    """A random-weight timm classifier of 10 classes and the input size it is run at."""
    timm = pytest.importorskip("timm")
    _, kwargs, size = TIMM[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    return lively_head(model).eval(), size


def check_head_reads_the_layer(model: nn.Module, spec: str, size: int) -> None:
    """The cut test: with one perturbed map A' of the layer handed on, the passes of two
    different inputs give the same logits (nothing reaches the head around the layer), and not
    the logits of the unperturbed map (the head reads it)."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 1, 3, size, size, generator=g)
    module = get_module(model, spec)
    kept: list[torch.Tensor] = []

    def keep(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
        noise = torch.randn(out.shape, generator=g, dtype=out.dtype)
        size = max(float(out.detach().abs().mean()), 1.0)  # random-weight maps: tiny or huge
        kept.append(out.detach() + size * noise)

    def swap(_m: nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor:
        return kept[0].clone()

    with torch.no_grad():
        handle = module.register_forward_hook(keep)
        plain = model(a)
        handle.remove()
        handle = module.register_forward_hook(swap)
        from_a, from_b = model(a), model(b)
        handle.remove()
    scale = from_a.abs().max().clamp_min(1e-30)  # random-weight logits can be tiny
    torch.testing.assert_close(from_b / scale, from_a / scale, rtol=1e-4, atol=1e-4)
    assert (plain - from_a).abs().max() > 1e-3 * scale  # the perturbed map moves the logits


def oracle_alpha(model: nn.Module, spec: str, x: torch.Tensor) -> torch.Tensor:
    """alpha of the predicted class by plain autograd on the layer's output in its own layout:
    the mean over positions of dO_c/dA * A (channels last for ``:nhwc`` and 3-D tokens)."""
    name, layout = split_layer(spec)
    seen: list[torch.Tensor] = []

    def grab(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
        out.retain_grad()
        seen.append(out)

    handle = get_module(model, name).register_forward_hook(grab)
    try:
        logits = model(x)
    finally:
        handle.remove()
    logits[0, logits[0].argmax()].backward()
    act = seen[0]
    prod = (act.grad * act).detach()[0]
    if act.ndim == 3:  # [T, C] tokens
        return prod.mean(dim=0)
    if layout == "nhwc":  # [H, W, C]
        return prod.mean(dim=(0, 1))
    return prod.mean(dim=(1, 2))  # [C, H, W]


def check_alpha(model: nn.Module, spec: str, size: int) -> None:
    """The probe's alpha (through the kernels) equals the oracle's."""
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    probe = GradAMapProbe(model, spec)
    try:
        res = probe.run(x)
    finally:
        probe.close()
    alpha = grad_amap(res.activation, res.gradient)[0]
    want = oracle_alpha(model, spec, x)
    scale = want.abs().max().clamp_min(1e-12)
    torch.testing.assert_close(alpha / scale, want / scale, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_every_torchvision_classifier(name):
    assert set(TORCHVISION) == set(torchvision.models.list_models(module=torchvision.models))
    model, size = torchvision_model(name)
    choice = resolve_layer(model, None, torch.zeros(1, 3, size, size))
    assert choice.name == TORCHVISION[name], choice.reason
    assert choice.reason.startswith("the feature map the classifier head reads")
    check_head_reads_the_layer(model, choice.name, size)
    check_alpha(model, choice.name, size)


@pytest.mark.parametrize("name", sorted(TIMM))
def test_timm_families(name):
    model, size = timm_model(name)
    choice = resolve_layer(model, None, torch.zeros(1, 3, size, size))
    assert choice.name == TIMM[name][0], choice.reason
    check_head_reads_the_layer(model, choice.name, size)
    check_alpha(model, choice.name, size)
