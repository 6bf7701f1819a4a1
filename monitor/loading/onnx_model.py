"""Load an ONNX classifier as a torch module (through onnx2torch), so it can be monitored.

Exports that convert cleanly come from ``torch.onnx.export(model, x, path, dynamo=False,
opset_version=17, do_constant_folding=False)``. The default (dynamo) exporter writes operators
onnx2torch 1.5 does not read (``ReduceMean`` of opset 18, for one); those, and any other
operator without a converter, are named in a :class:`OnnxConversionError` before conversion
starts. Layer names of the converted module are the ONNX node names (e.g.
``layer4/layer4/1/conv2/Conv``); calibrate on the converted module (``surprise-calibrate --onnx``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from torch import nn

from surprise_monitor.monitor.errors import SurpriseMonitorError


class OnnxConversionError(SurpriseMonitorError, ValueError):
    """The ONNX file cannot be read or converted to a torch module."""


def _unsupported(model: Any) -> list[str]:
    """``op_type (domain, opset N) x count, e.g. node 'name'`` for nodes without a converter."""
    from onnx2torch.node_converters import get_converter

    opsets = {o.domain: o.version for o in model.opset_import}
    missing: Counter[tuple[str, str, int]] = Counter()
    first: dict[tuple[str, str, int], str] = {}
    for node in model.graph.node:
        domain = node.domain or ""
        version = opsets.get(domain, opsets.get("ai.onnx", 0))
        key = (node.op_type, domain or "ai.onnx", version)
        try:
            get_converter(operation_type=node.op_type, version=version, domain=domain)
        except NotImplementedError:
            missing[key] += 1
            first.setdefault(key, node.name)
    return [
        f"{op} (domain {domain}, opset {ver}) x{n}, e.g. node {first[(op, domain, ver)]!r}"
        for (op, domain, ver), n in missing.items()
    ]


def load_onnx(path: str | Path) -> nn.Module:
    """Read the ONNX file at ``path`` and convert it to a torch module in eval mode.

    Raises :class:`OnnxConversionError` naming the problem: a missing or unreadable file, or the
    operators that have no converter (with their opset and a node that uses them).
    """
    import onnx
    from onnx2torch import convert

    path = Path(path)
    if not path.is_file():
        raise OnnxConversionError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf decode errors and the like
        raise OnnxConversionError(f"{path}: not a readable ONNX model: {exc}") from exc
    if not model.graph.node:
        raise OnnxConversionError(f"{path}: the ONNX graph has no nodes")
    missing = _unsupported(model)
    if missing:
        raise OnnxConversionError(
            f"{path}: onnx2torch has no converter for "
            + "; ".join(missing)
            + ". Re-export with torch.onnx.export(..., dynamo=False, opset_version=17, "
            "do_constant_folding=False), or replace these operators"
        )
    try:
        module = convert(model)
    except Exception as exc:  # a converter refusing an attribute, a shape it cannot infer, ...
        raise OnnxConversionError(
            f"{path}: onnx2torch could not convert the model: {type(exc).__name__}: {exc}"
        ) from exc
    return module.eval()
