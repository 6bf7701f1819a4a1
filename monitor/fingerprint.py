"""A fingerprint of a model's weights, so a table is never used with a model it was not made for."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every state_dict entry (name, dtype, shape and bytes), in name order."""
    return _state_digest(model, hashlib.sha256())


def layer_fingerprint(module: nn.Module) -> str:
    """SHA-256 over a layer's class name and its own state_dict (parameters and buffers): a
    table names its layer, and this says it is the same layer (not another one with as many
    filters)."""
    return _state_digest(module, hashlib.sha256(f"{type(module).__qualname__};".encode()))


def _state_digest(model: nn.Module, h: Any) -> str:
    """``h`` updated with every state_dict entry of ``model``, in name order; its hex digest."""
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)};".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()
