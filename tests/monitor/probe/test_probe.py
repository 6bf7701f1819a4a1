"""alpha from the probe against independent oracles: Captum and a plain full-autograd pass."""

from __future__ import annotations

import pytest
import torch
import torchvision
from captum.attr import LayerGradientXActivation

from surprise_monitor.kernels import grad_amap
from surprise_monitor.monitor.probe import GradAMapProbe, resolve_layer
from surprise_monitor.monitor.probe.layers import FINAL_CONV
from tests._checks import autograd_alpha as _autograd_alpha
from tests._models import TinyCNN, seeded

ARCHS = {
    # name: (the paper's final conv, another named 4-D layer)
    "resnet18": ("layer4.1.conv2", "layer3"),
    "vgg11": ("features.18", "features.15"),
    "mobilenet_v3_small": ("features.12.0", "features.9"),
}
#: The default layer at 64 x 64: the feature map the head reads (vgg11's avgpool resizes 2 x 2
#: to the 7 x 7 its dense head flattens).
HEAD_INPUT = {"resnet18": "layer4", "vgg11": "avgpool", "mobilenet_v3_small": "features"}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, num_classes=7).eval()


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request):
    return request.param, _model(request.param)


def test_default_layer_is_the_head_input_and_final_conv_the_papers(arch):
    name, model = arch
    choice = resolve_layer(model, None, torch.zeros(1, 3, 64, 64))
    assert choice.name == HEAD_INPUT[name]
    assert choice.reason.startswith("the feature map the classifier head reads: ")
    paper = resolve_layer(model, FINAL_CONV, torch.zeros(1, 3, 64, 64))
    assert paper.name == ARCHS[name][0]
    assert "last nn.Conv2d executed" in paper.reason


@pytest.mark.parametrize("which", [0, 1], ids=["final-conv", "named-layer"])
def test_alpha_matches_captum_and_autograd(arch, which):
    name, model = arch
    layer = ARCHS[name][which]
    torch.manual_seed(1)
    x = torch.randn(3, 3, 64, 64)
    labels = torch.tensor([0, 5, 3])  # explicit, varied: untrained nets predict one class
    probe = GradAMapProbe(model, layer)
    try:
        res = probe.run(x, labels)
    finally:
        probe.close()
    alpha = grad_amap(res.activation, res.gradient)

    captum = LayerGradientXActivation(model, dict(model.named_modules())[layer])
    oracle = captum.attribute(x, target=labels).mean((2, 3)).detach()
    scale = oracle.abs().max()
    torch.testing.assert_close(alpha, oracle, rtol=1e-5, atol=1e-5 * float(scale))
    manual = _autograd_alpha(model, layer, x, labels)
    torch.testing.assert_close(alpha, manual, rtol=1e-5, atol=1e-5 * float(scale))
    assert alpha.abs().max() > 0  # a real signal, not all zeros


@pytest.mark.parametrize("score", ["logit", "softmax", "log_softmax"])
def test_scores_match_autograd(score):
    model = seeded(TinyCNN(num_classes=5))
    x = torch.randn(4, 3, 8, 8)
    labels = torch.tensor([4, 0, 2, 2])
    probe = GradAMapProbe(model, "features.2", class_output=score)
    res = probe.run(x, labels)
    probe.close()
    alpha = grad_amap(res.activation, res.gradient)
    oracle = _autograd_alpha(model, "features.2", x, labels, score)
    scale = float(oracle.abs().max())  # softmax alphas are ~1e-4: no absolute 1e-5 slack
    assert scale > 0
    torch.testing.assert_close(alpha, oracle, rtol=1e-5, atol=1e-5 * scale)


def test_predicted_class_used_without_labels():
    model = seeded(TinyCNN(num_classes=5))
    x = torch.randn(6, 3, 8, 8)
    probe = GradAMapProbe(model, "features.2")
    res = probe.run(x)
    probe.close()
    assert torch.equal(res.classes, model(x).argmax(1))


def test_prefix_runs_without_autograd_and_model_is_untouched():
    model = seeded(TinyCNN())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    seen = {}

    def record(module, inputs):
        seen["prefix_grad"] = inputs[0].requires_grad or inputs[0].grad_fn is not None

    pre = model.features[2].register_forward_pre_hook(record)
    probe = GradAMapProbe(model, "features.2")
    res = probe.run(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    probe.close()
    pre.remove()
    assert seen["prefix_grad"] is False  # no graph was recorded before the target layer
    assert res.activation.grad_fn is None and not res.logits.requires_grad
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.is_grad_enabled()


def test_hook_is_inert_outside_a_probe_call():
    model = seeded(TinyCNN())
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    probe = GradAMapProbe(model, "features.2")
    try:
        out = model(x)  # plain call while the probe is attached
    finally:
        probe.close()
    assert torch.equal(out, expected)


def test_batch_equals_single_samples():
    model = seeded(TinyCNN(num_classes=3))
    x = torch.randn(5, 3, 8, 8)
    labels = torch.tensor([2, 0, 1, 1, 0])
    probe = GradAMapProbe(model, "features.2")
    batch = grad_amap(*_ag(probe.run(x, labels)))
    singles = torch.cat(
        [grad_amap(*_ag(probe.run(x[i : i + 1], labels[i : i + 1]))) for i in range(5)]
    )
    probe.close()
    torch.testing.assert_close(batch, singles, rtol=1e-5, atol=1e-7)


def _ag(res):
    return res.activation, res.gradient


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_callers_grad_mode_does_not_matter(context):
    model = seeded(TinyCNN(num_classes=3))
    x = torch.randn(4, 3, 8, 8)
    labels = torch.tensor([0, 2, 1, 1])
    probe = GradAMapProbe(model, "features.2")
    try:
        expected = grad_amap(*_ag(probe.run(x, labels)))
        with getattr(torch, context)():
            inner = torch.randn(4, 3, 8, 8).copy_(x)  # an inference tensor under inference_mode
            res = probe.run(inner, labels.clone())  # labels made inside the context too
            assert torch.is_grad_enabled() is False
    finally:
        probe.close()
    scale = float(expected.abs().max())
    torch.testing.assert_close(grad_amap(*_ag(res)), expected, rtol=1e-5, atol=1e-6 * scale)
    assert not res.output.requires_grad


@pytest.mark.parametrize("score", ["logit", "softmax", "log_softmax"])
def test_the_oracle_catches_a_wrong_class_score(monkeypatch, score):
    """The oracle computes its class score itself: a probe whose score is taken from
    ``1.01 * logits`` (the mutation the issue names) no longer matches it."""
    from surprise_monitor.monitor.probe import grad_amap_probe

    real = grad_amap_probe.class_output_of
    monkeypatch.setattr(
        grad_amap_probe, "class_output_of", lambda z, classes, s: real(1.01 * z, classes, s)
    )
    model = seeded(TinyCNN(num_classes=5))
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([4, 0, 2, 2])
    probe = GradAMapProbe(model, "features.2", class_output=score)
    try:
        mutated = grad_amap(*_ag(probe.run(x, labels)))
    finally:
        probe.close()
    oracle = _autograd_alpha(model, "features.2", x, labels, score)
    assert not torch.allclose(mutated, oracle, rtol=1e-5, atol=1e-7)


def test_the_oracle_uses_no_library_code():
    """The oracle is plain torch: nothing it calls comes from surprise_monitor."""
    code = _autograd_alpha.__code__
    names = set(code.co_names)
    for const in code.co_consts:  # the nested hook and score lambdas
        names |= set(getattr(const, "co_names", ()))
    used = [_autograd_alpha.__globals__[n] for n in names if n in _autograd_alpha.__globals__]
    library = [v for v in used if getattr(v, "__module__", "").split(".")[0]
               == "surprise_monitor"]  # fmt: skip
    assert used and library == []
