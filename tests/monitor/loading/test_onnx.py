"""ONNX models: the torch route and the ONNX route (CLI --onnx, from_onnx) agree; clear errors."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, helper
from PIL import Image

from surprise_monitor.calibrate import CalibrationTable
from surprise_monitor.calibrate.cli import main as cli
from surprise_monitor.monitor import OnnxConversionError, SurpriseMonitor, load_onnx
from tests._models import class_images

K, SIZE, N_TRAIN = 4, 32, 96
NORM = ["--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5"]


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] roughly in [-2, 2] -> uint8 [B, H, W, 3]."""
    return ((x.clamp(-2, 2) + 2) / 4 * 255).round().byte().permute(0, 2, 3, 1).numpy()


def _to_input(u8: np.ndarray) -> torch.Tensor:
    """What the CLI's ToTensor + Normalize(0.5, 0.5) make of uint8 images."""
    return (torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


@pytest.fixture(scope="module")
def routes(tmp_path_factory):
    """A torchvision resnet18 calibrated twice through the CLI: as a torch model (MODEL +
    --weights) and as its ONNX export (--onnx)."""
    tmp = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=K).eval()
    weights = tmp / "resnet18.pt"
    torch.save(model.state_dict(), weights)
    onnx_path = tmp / "resnet18.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, still the one
        warnings.simplefilter("ignore", DeprecationWarning)  # onnx2torch reads cleanly
        torch.onnx.export(
            model, (torch.zeros(2, 3, SIZE, SIZE),), str(onnx_path), dynamo=False,
            opset_version=17, do_constant_folding=False, input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )  # fmt: skip
    x, y = class_images(N_TRAIN, K, size=SIZE, seed=2)
    images = _to_uint8(x)
    for i, (img, label) in enumerate(zip(images, y.tolist(), strict=True)):
        folder = tmp / "train" / f"c{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    # the paper's final convolution, whose ONNX node name is known (by default the map the head
    # reads: an activation node)
    common = ["--data", str(tmp / "train"), "--resize", "0", "--crop", "0", *NORM, "--quiet",
              "--device", "cpu", "--batch-size", "32", "--layer", "final-conv",
              "--min-accuracy", "0"]  # untrained: at chance  # fmt: skip
    torch_table = tmp / "torch.safetensors"
    onnx_table = tmp / "onnx.safetensors"
    assert cli(["--model", "resnet18", "--weights", str(weights), "--num-classes", str(K),
                "--out", str(torch_table), *common]) == 0  # fmt: skip
    assert cli(["--onnx", str(onnx_path), "--out", str(onnx_table), *common]) == 0
    test, _ = class_images(8, K, size=SIZE, seed=2)
    test = test + 0.4 * torch.randn(test.shape, generator=torch.Generator().manual_seed(5))
    test[0::4] *= 5.0  # atypical rows
    test[1::4] = test[1::4].flip(-1).flip(-2) * -1.0
    return {
        "model": model, "onnx": onnx_path, "torch_table": torch_table,
        "onnx_table": onnx_table, "x": _to_input(_to_uint8(test)), "tmp": tmp,
    }  # fmt: skip


def test_both_routes_give_the_same_tables_and_reports(routes):
    ta = CalibrationTable.load(routes["torch_table"])
    tb = CalibrationTable.load(routes["onnx_table"])
    assert ta.layer == "layer4.1.conv2" and tb.layer == "layer4/layer4/1/conv2/Conv"
    assert ta.class_names == tb.class_names and torch.equal(ta.counts, tb.counts)
    torch.testing.assert_close(tb.quantiles, ta.quantiles, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tb.mean, ta.mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(tb.beta_quantiles, ta.beta_quantiles, rtol=1e-4, atol=1e-6)
    assert torch.equal(tb.top_indices, ta.top_indices)

    x = routes["x"]
    with (
        SurpriseMonitor(routes["model"], ta) as by_torch,
        SurpriseMonitor.from_onnx(routes["onnx"], tb) as by_onnx,
    ):
        a, b = by_torch.inspect(x), by_onnx.inspect(x)
        assert isinstance(by_onnx.model, torch.fx.GraphModule)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(a.classes, b.classes)
    torch.testing.assert_close(b.alpha, a.alpha, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.beta, a.beta, rtol=1e-4, atol=1e-6)
    assert torch.equal(a.surprise, b.surprise) and torch.equal(a.expectation, b.expectation)
    assert torch.equal(a.low_beta, b.low_beta)
    assert bool(a.surprise.any()) and bool(a.flagged.any())  # the comparison covers flags


def test_converted_model_matches_onnxruntime(routes):
    ort = pytest.importorskip("onnxruntime")
    x = routes["x"]
    session = ort.InferenceSession(str(routes["onnx"]), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        converted = load_onnx(routes["onnx"])(x)
        original = routes["model"](x)
    np.testing.assert_allclose(converted.numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(original.numpy(), expected, rtol=1e-4, atol=1e-5)


def _tiny_graph(tmp_path, op: str, opset: int, **attrs) -> str:
    """input [1, 3, 4, 4] -> Conv -> ``op`` -> output, as an ONNX file."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 3, 1, 1], np.ones(6, np.float32).tolist())
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], name="conv"),
        helper.make_node(op, ["a"], ["y"], name="the_op", **attrs),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[w],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = tmp_path / f"{op}-{opset}.onnx"
    onnx.save(model, str(path))
    return str(path)


def test_unsupported_operators_are_named(tmp_path):
    with pytest.raises(OnnxConversionError, match=r"Hardmax \(domain ai.onnx, opset 17\) x1, "
                       r"e.g. node 'the_op'.*dynamo=False"):  # fmt: skip
        load_onnx(_tiny_graph(tmp_path, "Hardmax", 17))
    # what the default (dynamo) exporter writes for a global mean, which onnx2torch 1.5 lacks
    with pytest.raises(OnnxConversionError, match=r"ReduceMean \(domain ai.onnx, opset 18\)"):
        load_onnx(_tiny_graph(tmp_path, "ReduceMean", 18, keepdims=1))
    assert isinstance(load_onnx(_tiny_graph(tmp_path, "ReduceMean", 17, axes=[2, 3])),
                      torch.nn.Module)  # fmt: skip


def test_unreadable_files_are_refused(tmp_path):
    with pytest.raises(OnnxConversionError, match="no such ONNX file"):
        load_onnx(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07this is not protobuf\xff\xff\xff")
    with pytest.raises(OnnxConversionError, match="not a readable ONNX model|has no nodes"):
        load_onnx(junk)


def test_cli_onnx_errors(routes, capsys):
    common = ["--data", str(routes["tmp"] / "train"), "--out", str(routes["tmp"] / "x.st"),
              "--quiet"]  # fmt: skip
    assert cli(["--model", "resnet18", "--onnx", str(routes["onnx"]), *common]) == 2
    assert "--onnx replaces --model and --weights" in capsys.readouterr().err
    assert cli(common) == 2
    assert "needs --model NAME" in capsys.readouterr().err
    assert cli(["--onnx", str(routes["tmp"] / "none.onnx"), *common]) == 2
    assert "no such ONNX file" in capsys.readouterr().err
