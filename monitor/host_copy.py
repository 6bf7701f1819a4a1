"""One device-to-host copy for many tensors: pack their bytes into one buffer on the device,
copy that once, and view the host copy back as the original tensors.

A judgement has a dozen result tensors of four dtypes. Copying them one by one costs a
device-to-host copy and a host sync each; :func:`to_host` costs one of each. The layout is
plain Python data computed from shapes and dtypes only, so :func:`pack` can run inside a CUDA
graph (the packed buffer is then one of the graph's static outputs) and :func:`unpack` after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Slot:
    """Where one tensor lies in a packed buffer."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset
    nbytes: int


@dataclass(frozen=True)
class Layout:
    """The slots of a packed buffer, largest element size first (so every slot is aligned)."""

    slots: tuple[Slot, ...]
    nbytes: int


def layout_of(tensors: dict[str, torch.Tensor]) -> Layout:
    """The packed layout of ``tensors`` (shapes and dtypes only: no data is read)."""
    order = sorted(tensors, key=lambda name: -tensors[name].element_size())
    slots, offset = [], 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        slots.append(Slot(name, t.dtype, tuple(t.shape), offset, nbytes))
        offset += nbytes
    return Layout(tuple(slots), offset)


def pack(tensors: dict[str, torch.Tensor], layout: Layout) -> torch.Tensor:
    """The bytes of ``tensors`` (all on one device) in one ``uint8`` buffer, as ``layout`` says
    (one concatenation; no host sync)."""
    parts = [tensors[s.name].contiguous().reshape(-1).view(torch.uint8) for s in layout.slots]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)


def unpack(buffer: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """The tensors of a packed ``buffer`` (views into it, no copy)."""
    out = {}
    for s in layout.slots:
        raw = buffer[s.start : s.start + s.nbytes]
        out[s.name] = raw.view(s.dtype).reshape(s.shape)
    return out


def to_host(
    tensors: dict[str, torch.Tensor], *, always_pack: bool = False
) -> dict[str, torch.Tensor]:
    """``tensors`` on the CPU through one device-to-host copy of one packed buffer (the one
    host sync). CPU tensors are returned as they are unless ``always_pack`` (tests)."""
    on_device = {k: t for k, t in tensors.items() if t.device.type != "cpu"}
    if not on_device and not always_pack:
        return dict(tensors)
    todo = on_device or tensors
    layout = layout_of(todo)
    host = unpack(pack(todo, layout).cpu(), layout)
    return {k: host.get(k, t) for k, t in tensors.items()}
