"""One packed device-to-host copy for many tensors: layout, round trip, one copy."""

from __future__ import annotations

import pytest
import torch

from surprise_monitor.monitor.host_copy import layout_of, pack, to_host, unpack


def _tensors(device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "flags": (torch.randn(3, 5, generator=g) > 0).to(device),
        "alpha": torch.randn(3, 5, generator=g).to(device),
        "classes": torch.tensor([2, 0, 7]).to(device),
        "count": torch.tensor(4).to(device),  # 0-d
        "half": torch.randn(3, generator=g).half().to(device),
        "empty": torch.zeros(0, 4).to(device),
        "strided": torch.randn(5, 3, generator=g).t().to(device),  # not contiguous
    }


def test_layout_aligns_every_slot_and_round_trips_bit_exactly():
    tensors = _tensors()
    layout = layout_of(tensors)
    sizes = [torch.empty(0, dtype=s.dtype).element_size() for s in layout.slots]
    assert sizes == sorted(sizes, reverse=True)  # 8-byte slots first, then 4, 2, 1
    assert all(s.start % size == 0 for s, size in zip(layout.slots, sizes, strict=True))
    buffer = pack(tensors, layout)
    assert buffer.dtype == torch.uint8 and buffer.numel() == layout.nbytes
    back = unpack(buffer.clone(), layout)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name


def test_to_host_copies_once(monkeypatch):
    """N tensors cost one copy (one `.cpu()` of the packed buffer), however many there are."""
    calls = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        calls.append(tuple(self.shape))
        return real_cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    tensors = _tensors()
    host = to_host(tensors, always_pack=True)
    assert len(calls) == 1 and calls[0] == (layout_of(tensors).nbytes,)
    for name, t in tensors.items():
        assert torch.equal(host[name], t), name
    calls.clear()
    assert to_host(tensors) == tensors and calls == []  # already on the host: nothing to copy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_host_from_cuda_is_one_synchronising_copy():
    tensors = _tensors("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        host = to_host(tensors)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for name, t in tensors.items():
        assert host[name].device.type == "cpu" and torch.equal(host[name], t.cpu()), name
