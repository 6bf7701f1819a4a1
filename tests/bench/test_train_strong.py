"""The general trainer (:mod:`bench.train_strong`) and the two models added for the alarm
benchmark: the plain VGG and the MobileNet train (loss down, ``[B, 10]`` logits), resume to the
same weights as an uninterrupted run, load through :func:`bench.strong_models.load_strong` once
trained (a clear error before), and the MobileNet's final convolution is its 1x1 head conv
(tiny learnable data, tiny widths, one thread: seconds on the CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from bench import strong_models, train_strong
from bench.cifar import CifarSplit, to_tensor
from surprise_monitor.monitor.probe import resolve_layer
from surprise_monitor.monitor.probe.layers import FINAL_CONV

NEW = ("vgg_plain", "mobilenet")
WIDTHS = {"vgg_plain": 4, "mobilenet": 4}


def _args(arch: str, epochs: int = 2) -> list[str]:
    """A tiny run of ``arch``."""
    return ["--arch", arch, "--epochs", str(epochs), "--width", str(WIDTHS[arch]),
            "--batch", "16", "--seed", "3"]  # fmt: skip


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` CIFAR-shaped uint8 images whose class shows in their colour (learnable in a few
    steps), labels ``0..9`` in turn."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    colours = np.random.default_rng(7).integers(30, 226, (10, 3))
    noise = rng.integers(-30, 31, (n, 32, 32, 3))
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


@pytest.fixture()
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Small learnable splits, weights and checkpoints under ``tmp_path``, one thread."""
    torch.set_num_threads(1)

    def load(split: str, *a: object, **k: object) -> CifarSplit:
        n = 64 if split == "train" else 5010  # the record scores test 0..4,999 and the rest
        images, labels = _images(n, 0 if split == "train" else 1)
        return CifarSplit(images, labels, [str(i) for i in range(10)], tmp_path)

    monkeypatch.setattr(train_strong, "load_cifar10", load)
    monkeypatch.setattr(train_strong, "cache_dir", lambda: tmp_path)  # the checkpoints
    monkeypatch.setattr(strong_models, "WEIGHTS_DIR", tmp_path)
    return tmp_path


def _weights(arch: str) -> dict[str, torch.Tensor]:
    """The weights a run of ``arch`` at the tiny width wrote."""
    return load_file(str(strong_models.weights_path(arch, WIDTHS[arch])))


@pytest.mark.parametrize("arch", NEW)
def test_a_new_model_gives_logits_and_its_loss_goes_down(arch):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = strong_models.ARCHITECTURES[arch](WIDTHS[arch]).to(memory_format=torch.channels_last)
    images, labels = _images(64, 0)
    data = (to_tensor(images), torch.from_numpy(labels))
    with torch.no_grad():
        assert model.eval()(data[0][:5]).shape == (5, 10)
    lr = train_strong.RECIPES[arch]["lr"]
    opt = train_strong.optimiser(model, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    gen = torch.Generator().manual_seed(0)
    clip = train_strong.RECIPES[arch]["clip"]
    losses = [train_strong.train_epoch(model, opt, sched, data, gen, 16, clip) for _ in range(8)]
    assert min(losses[-2:]) < losses[0] - 0.2, losses


@pytest.mark.parametrize("arch", NEW)
def test_a_run_writes_its_record_and_load_strong_reads_it(tiny, arch, monkeypatch):
    with pytest.raises(FileNotFoundError, match=f"bench.train_strong --arch {arch}"):
        strong_models.load_strong(arch)  # not trained yet: the error names the command
    assert strong_models.training_record(arch) == {}
    train_strong.main(_args(arch))
    assert (tiny / f"{arch}.checkpoint.pt").exists()
    monkeypatch.setitem(strong_models.TRAINED_WIDTHS, arch, WIDTHS[arch])
    record = strong_models.training_record(arch)
    assert record["args"]["arch"] == arch and record["epochs_done"] == 2
    assert record["clip_grad_norm"] == train_strong.RECIPES[arch]["clip"]
    assert [r["epoch"] for r in record["log"]] == [1, 2]
    assert record["log"][1]["train_loss"] < record["log"][0]["train_loss"]
    assert {"test_accuracy_0_5000", "test_accuracy_5000_10000", "minutes"} <= set(record)
    model = strong_models.load_strong(arch)
    assert not model.training
    assert model(torch.zeros(3, 3, 32, 32)).shape == (3, 10)


@pytest.mark.parametrize("arch", NEW)
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tiny, arch):
    train_strong.main(_args(arch))
    whole = _weights(arch)
    (tiny / f"{arch}.checkpoint.pt").unlink()
    train_strong.main([*_args(arch), "--budget-min", "0"])  # stops after epoch 1
    assert train_strong.checkpoint_path(arch).exists()
    train_strong.main([*_args(arch), "--resume"])
    resumed = _weights(arch)
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=0)


def test_a_checkpoint_of_other_settings_is_refused(tiny):
    train_strong.main([*_args("mobilenet"), "--budget-min", "0"])
    with pytest.raises(SystemExit, match="was made with"):
        train_strong.main([*_args("mobilenet", epochs=3), "--resume"])


def test_the_recipes_fill_the_defaults():
    plain = train_strong.parse_args(["--arch", "vgg_plain"])
    assert (plain.lr, plain.width) == (0.05, strong_models.VGG_PLAIN_WIDTH)
    bn = train_strong.parse_args(["--arch", "vgg_bn", "--lr", "0.1"])
    assert (bn.lr, bn.width) == (0.1, strong_models.VGG_WIDTH)
    assert train_strong.RECIPES["vgg_bn"] == {"lr": 0.2, "width": 48, "clip": None}


def test_the_model_lists_and_weights_names():
    assert strong_models.STRONG_MODELS == ("resnet18", "vgg_bn")
    assert strong_models.ALARM_MODELS == ("resnet18", "vgg_bn", "vgg_plain", "mobilenet")
    assert strong_models.weights_path("vgg_plain").name == "cifar10_vgg_plain_w48.safetensors"
    assert strong_models.weights_path("mobilenet").name == "cifar10_mobilenet_w16.safetensors"
    assert strong_models.weights_path("vgg_bn") == strong_models.vgg_weights_path()
    with pytest.raises(ValueError, match="must be one of"):
        strong_models.load_strong("vgg16")


def test_the_mobilenets_final_conv_is_its_1x1_head():
    for width in (4, strong_models.MOBILENET_WIDTH):
        model = strong_models.MobileNetCifar(width).eval()
        choice = resolve_layer(model, FINAL_CONV, torch.zeros(1, 3, 32, 32))
        assert choice.name == "head.0" and choice.out_shape == (20 * width, 4, 4)
        conv = model.get_submodule(choice.name)
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.groups == 1
    plain = strong_models.VGGPlain(4).eval()
    assert resolve_layer(plain, FINAL_CONV, torch.zeros(1, 3, 32, 32)).name == "features.17"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())


def test_the_float32_depthwise_conv_is_an_ordinary_conv_under_autocast():
    torch.manual_seed(0)
    conv = strong_models.Float32Conv2d(6, 6, 3, 2, 1, groups=6, bias=False)
    x = torch.randn(2, 6, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out, nn.functional.conv2d(x.bfloat16().float(), conv.weight, stride=2, padding=1, groups=6)
    )
