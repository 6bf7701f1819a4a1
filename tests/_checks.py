"""Assertion helpers and independent oracles shared by test modules (no test lives here)."""

from __future__ import annotations

import torch

from monitor.probe import class_scores, get_module
from monitor.table import CalibrationTable

TABLE_TENSORS = ("quantiles", "mean", "counts", "beta_quantiles", "top_indices", "top_alpha")


def assert_same_table(a: CalibrationTable, b: CalibrationTable) -> None:
    """Bitwise equality of every tensor (NaN where there is no exemplar, in both)."""
    for name in TABLE_TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), name
    assert (a.layer, a.class_names, a.input_shape) == (b.layer, b.class_names, b.input_shape)


def autograd_alpha(model, layer: str, x, classes, score: str = "logit") -> torch.Tensor:
    """Full-graph oracle: A captured by a hook, dO_c/dA by torch.autograd.grad, no probe code."""
    store = {}

    def hook(module, inputs, output):
        store["a"] = output
        return output.clone()  # downstream in-place ops must not overwrite A

    handle = get_module(model, layer).register_forward_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    s = class_scores(logits, classes, score).sum()
    (g,) = torch.autograd.grad(s, store["a"])
    return (g * store["a"]).mean((2, 3)).detach()


def spilled_alpha(folder, c: int, num_filters: int):
    """All alpha rows a calibration spilled for class ``c`` in ``folder``, ``[n_c, N]``."""
    from calibrate.spill import AlphaSpill

    rows = AlphaSpill(folder, num_filters).read_alpha(c)
    return rows.read_rows(0, rows.shape[0])
