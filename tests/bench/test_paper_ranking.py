"""The filter-ranking pieces of bench.paper.ranking on tiny random networks (seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam import GradCAMPlusPlus

from bench.cifar import small_resnet, small_vgg
from bench.paper.ranking import (
    METHODS,
    _strong_split,
    bootstrap_auc_se,
    capture,
    filter_scores,
    removal_counts,
    removal_steps,
    split_model,
    taylor_total,
)
from bench.strong_models import VGGBN
from surprise_monitor.monitor import GradAMapProbe
from tests._models import TinyCNN


def _model(arch: str) -> tuple[torch.nn.Module, str]:
    torch.manual_seed(0)
    if arch == "vgg":
        return small_vgg(width=4).eval(), "features.12"
    models = {
        "resnet": (small_resnet(width=4), "layer3.conv2"),
        "vgg_bn": (VGGBN(width=4), "features.24"),
        "tv_resnet": (cifar_resnet18(), "layer4.1.conv2"),
        "tv_resnet_bn": (cifar_resnet18(), "layer4.1.bn2"),  # after the batch norm
        "vgg_bn_relu": (VGGBN(width=4), "features.26"),
    }
    if arch in models:
        m, layer = models[arch]
        for mod in m.modules():  # non-trivial batch-norm statistics
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
        return m.eval(), layer
    return TinyCNN(num_classes=10, width=4).eval(), "features.2"


def cifar_resnet18() -> torch.nn.Module:
    """torchvision's resnet18 as the shared CIFAR-10 model builds it (3x3 stem, no max-pool)."""
    m = torchvision.models.resnet18(num_classes=10)
    m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = torch.nn.Identity()
    return m


def _data(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize(
    "arch", ["vgg", "resnet", "vgg_bn", "vgg_bn_relu", "tv_resnet", "tv_resnet_bn", "generic"]
)
def test_split_model_reproduces_the_model(arch):
    model, layer = _model(arch)
    x, _ = _data()
    split = split_model(model, layer)
    with torch.no_grad():
        a, ctx = split.prefix(x)
        assert torch.allclose(split.head(a, ctx), model(x), atol=1e-5)
        # the fast paths agree with the generic hook-based cut on edited activations
        generic = split_model(torch.nn.Sequential(model), "0." + layer)
        a2, ctx2 = generic.prefix(x)
        edited = a * (torch.arange(a.shape[1]) % 3 != 0).float()[None, :, None, None]
        assert torch.allclose(split.head(edited, ctx), generic.head(edited, ctx2), atol=1e-5)


@pytest.mark.parametrize("arch", ["vgg", "resnet", "vgg_bn", "tv_resnet"])
def test_capture_gradients_match_the_monitor_probe(arch):
    model, layer = _model(arch)
    x, y = _data()
    cap = capture(split_model(model, layer), x, y)
    for score, got in (("logit", cap.g_logit), ("softmax", cap.g_softmax)):
        probe = GradAMapProbe(model, layer, class_output=score)
        try:
            res = probe.run(x, y)
        finally:
            probe.close()
        assert torch.allclose(res.activation, cap.activation, atol=1e-6)
        assert torch.allclose(res.gradient, got, atol=1e-6, rtol=1e-4)
    # cross-entropy: dL/dA = -(1 / S_c) dS_c/dA, per image
    s_c = torch.softmax(cap.logits, 1).gather(1, y[:, None]).view(-1, 1, 1, 1)
    assert torch.allclose(cap.g_loss, -cap.g_softmax / s_c, atol=1e-5, rtol=1e-4)


def test_filter_scores_by_hand():
    model, layer = _model("vgg")
    x, y = _data(6)
    split = split_model(model, layer)
    cap = capture(split, x, y)
    a = cap.activation
    total = taylor_total(split, x, y, batch=4)
    hand = {
        "l1": a.abs().flatten(2).sum(2),
        "gradcam": cap.g_logit.flatten(2).mean(2),
        "grad_amap": (a * cap.g_softmax).flatten(2).mean(2),
        "grad_amap_logit": (a * cap.g_logit).flatten(2).mean(2),
        "taylor_class": (a * cap.g_softmax).flatten(2).mean(2).abs(),
        "taylor": (a * cap.g_loss).flatten(2).mean(2).sum(0).abs().expand(6, -1),
    }
    for method, want in hand.items():
        got = filter_scores(cap, method, taylor_total=total)
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-4), method
    cam_pp = GradCAMPlusPlus.get_cam_weights(
        None, None, None, None, a.double().numpy(), cap.g_logit.double().numpy()
    )
    assert np.allclose(filter_scores(cap, "gradcampp").double().numpy(), cam_pp, rtol=1e-4)
    r1 = filter_scores(cap, "random", torch.Generator().manual_seed(0))
    r2 = filter_scores(cap, "random", torch.Generator().manual_seed(0))
    assert torch.equal(r1, r2) and r1.shape == a.shape[:2]
    with pytest.raises(ValueError, match="taylor_total"):
        filter_scores(cap, "taylor")
    with pytest.raises(ValueError, match="method"):
        filter_scores(cap, "nope")
    assert set(METHODS) == set(hand) | {"random", "gradcampp"}


def test_removal_counts_by_hand():
    model, layer = _model("resnet")
    x, y = _data(10)
    y = model(x).argmax(1).detach()  # every image right at k = 0
    split = split_model(model, layer)
    cap = capture(split, x, y)
    scores = filter_scores(cap, "grad_amap_logit")
    ks = removal_steps(cap.activation.shape[1], increments=4)
    assert ks == [0, 4, 8, 12, 16]
    got = removal_counts(split, cap, y, scores, ks)
    assert got[0] == 10
    # k = 5: zero each image's five best filters through a forward hook on the whole model
    order = scores.argsort(1, descending=True)
    keep = torch.ones_like(scores).scatter_(1, order[:, :5], 0.0)
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, o: o * keep[:, :, None, None])
    try:
        with torch.no_grad():
            want = int((model(x).argmax(1) == y).sum())
    finally:
        handle.remove()
    assert removal_counts(split, cap, y, scores, [5])[0] == want


def test_fast_paths_are_taken_for_the_strong_models():
    for arch in ("vgg_bn", "vgg_bn_relu", "tv_resnet", "tv_resnet_bn"):
        model, layer = _model(arch)
        assert _strong_split(model, layer) is not None, arch
    model, _ = _model("tv_resnet")
    assert _strong_split(model, "layer4.0.conv2") is None  # not the last block: hooks


def test_bootstrap_standard_error_matches_a_plain_loop():
    rng = np.random.default_rng(3)
    correct = rng.random((2, 5, 60)) < np.linspace(0.9, 0.2, 5)[None, :, None]
    correct[:, 0] |= rng.random(60) < 0.5  # step 0: the unpruned model
    correct[1, 0] = correct[0, 0]
    frac = [0.0, 0.25, 0.5, 0.75, 1.0]
    got = bootstrap_auc_se(frac, correct, n_boot=200, seed=7)
    weights = np.random.default_rng(7).multinomial(60, np.full(60, 1 / 60), size=200)
    for m in range(2):
        aucs = []
        for w in weights:  # resample images with these multiplicities
            counts = (correct[m] * w[None, :]).sum(axis=1)
            aucs.append(np.trapezoid(counts / counts[0], frac))
        assert got[m] == pytest.approx(np.std(aucs, ddof=1), rel=1e-5)


def test_removal_steps():
    assert removal_steps(128) == list(range(0, 129, 4))  # 32 increments, as the paper's 512/16
    assert removal_steps(10, increments=4) == [0, 2, 4, 6, 8, 10]
    assert removal_steps(3) == [0, 1, 2, 3]
