"""bench.paper.beta: the shares with their standard errors, and the part r of the logit that beta
does not see, against a hand computation from the head's batch-norm and linear parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from bench.paper.beta import beta_statistics, rate, residual_of
from bench.paper.common import inspect_all, layer_hw
from bench.strong_models import VGGBN
from surprise_monitor.calibrate import calibrate
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.probe.layers import FINAL_CONV


def test_rate_and_shares_by_hand():
    r = rate(np.array([True, False, False, True, False]))
    assert r == {"rate": 0.4, "se": pytest.approx(np.sqrt(0.4 * 0.6 / 5)), "n": 5}
    beta = torch.tensor([-1.0, 2.0, -0.5, 0.3, -2.0, 1.0])
    logits = torch.tensor([[2.0, 1, 0], [0, 3, 0], [0, 0, 1], [1, 0, 0], [0, 2, 1], [0, 0, 4]])
    truth = torch.tensor([1, 1, 2, 0, 2, 2])  # wrong: images 0 and 4
    s = beta_statistics(beta, logits, truth, truth)
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["negative_beta_wrong"]["rate"] == 1.0 and s["negative_beta_wrong"]["n"] == 2
    assert s["negative_beta_correct"]["rate"] == 0.25  # image 2 of 1, 2, 3, 5
    pred = logits.argmax(1)  # judged against the prediction: the same images are wrong
    assert beta_statistics(beta, logits, pred, truth)["negative_beta_wrong"]["n"] == 2


def _head_params(model: torch.nn.Module, arch: str):
    """(final conv, its batch norm, the linear layer, the input of the block or None)."""
    if arch == "vgg_bn":
        return model.features[24], model.features[25], model.classifier
    blk = model.layer4[1]
    return blk.conv2, blk.bn2, model.fc


def _model(arch: str) -> tuple[torch.nn.Module, str]:
    torch.manual_seed(0)
    if arch == "vgg_bn":
        model, layer = VGGBN(width=4), "features.24"
    else:
        model, layer = torchvision.models.resnet18(num_classes=10), "layer4.1.conv2"
        model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # the CIFAR-10 stem
        model.maxpool = torch.nn.Identity()
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.3, 0.3)
            mod.running_var.uniform_(0.5, 2.0)
            mod.bias.data.uniform_(-0.5, 0.5)
    return model.eval(), layer


@pytest.mark.parametrize("arch", ["vgg_bn", "tv_resnet"])
def test_residual_is_the_logit_beyond_the_filters(arch):
    """r = sum_n W_cn mean_ij[relu'(z) (shift_n + shortcut)] + b_c, z the head's pre-ReLU sum."""
    model, layer = _model(arch)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, 32, 32, generator=g)
    y = torch.arange(12) % 10
    table = calibrate(model, torch.utils.data.TensorDataset(x, y), layer=FINAL_CONV,
                      progress=False)  # fmt: skip
    assert table.layer == layer  # the paper's layer, as the bench's tables (bench.paper.common)
    with SurpriseMonitor(model, table) as mon:
        rep = inspect_all(mon, x, y)
    hw = layer_hw(model, layer, x[:1])
    assert hw == 16
    got = residual_of(rep, y, hw)
    conv, bn, fc = _head_params(model, arch)
    seen: dict[str, torch.Tensor] = {}
    hooks = [conv.register_forward_hook(lambda m, i, o: seen.__setitem__("a", o))]
    if arch != "vgg_bn":
        hooks.append(model.layer4[1].register_forward_pre_hook(
            lambda m, i: seen.__setitem__("h", i[0])))  # fmt: skip
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias - bn.running_mean * scale).view(1, -1, 1, 1)
    z = seen["a"] * scale.view(1, -1, 1, 1) + shift
    rest = shift.expand_as(z).clone()
    if arch != "vgg_bn":  # the identity shortcut of the last block
        z, rest = z + seen["h"], rest + seen["h"]
    gate = (z > 0).double()
    want = (gate * rest.double()).mean(dim=(2, 3)) @ fc.weight.double().T + fc.bias.double()
    assert torch.allclose(got, want.gather(1, y.view(-1, 1)).squeeze(1), atol=1e-4)
    # and what is left is what the filters carry: HW * sum_n alpha_n = logit - r
    logit_c = logits.double().gather(1, y.view(-1, 1)).squeeze(1)
    assert torch.allclose(hw * rep["alpha"].double().sum(1), logit_c - got, atol=1e-4)
