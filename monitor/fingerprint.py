"""A fingerprint of a model's weights, so a table is never used with a model it was not made for."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every state_dict entry (name, dtype, shape and bytes), in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)};".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()
