"""Fused Triton kernel for ``grad_amap`` (imported lazily; needs triton).

One program reduces ``BLOCK_R`` flattened ``(b, n)`` rows over ``H*W`` in chunks of
``BLOCK_HW``, reading each input through its own four strides; no ``[B, N, H, W]``
temporary is formed. When a tensor's ``(h, w)`` pair collapses to a single stride
(``sH == W * sW``: true for both NCHW-contiguous and channels-last) the cheaper flat index
``hw * s`` is used instead of ``(hw // W) * sH + (hw % W) * sW``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["grad_amap_triton"]


@triton.jit
def _grad_amap_kernel(
    a_ptr,
    g_ptr,
    out_ptr,
    R,
    N,
    HW,
    W,
    a_sb,
    a_sn,
    a_sh,
    a_sw,
    g_sb,
    g_sn,
    g_sh,
    g_sw,
    A_FLAT: tl.constexpr,
    G_FLAT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    rows64 = rows.to(tl.int64)
    b = rows64 // N
    n = rows64 % N
    a_row = b * a_sb + n * a_sn
    g_row = b * g_sb + n * g_sn
    acc = tl.zeros([BLOCK_R, BLOCK_HW], dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        hw_mask = hw < HW
        hw64 = hw.to(tl.int64)
        if A_FLAT:
            a_hw = hw64 * a_sw
        else:
            a_hw = (hw64 // W) * a_sh + (hw64 % W) * a_sw
        if G_FLAT:
            g_hw = hw64 * g_sw
        else:
            g_hw = (hw64 // W) * g_sh + (hw64 % W) * g_sw
        mask = row_mask[:, None] & hw_mask[None, :]
        a = tl.load(a_ptr + (a_row[:, None] + a_hw[None, :]), mask=mask, other=0.0)
        g = tl.load(g_ptr + (g_row[:, None] + g_hw[None, :]), mask=mask, other=0.0)
        acc += a.to(tl.float32) * g.to(tl.float32)
    total = tl.sum(acc, axis=1)
    tl.store(out_ptr + rows64, total / HW, mask=row_mask)


def _strides(t: torch.Tensor) -> tuple[bool, int, int, int, int]:
    """(flat, sB, sN, sH, sW'); when flat, sW' is the single stride of the hw index."""
    _, _, h, w = t.shape
    sb, sn, sh, sw = t.stride()
    if w == 1:
        return True, sb, sn, 0, sh
    if h == 1 or sh == w * sw:
        return True, sb, sn, 0, sw
    return False, sb, sn, sh, sw


def _pick_blocks(t: torch.Tensor, hw: int, rows: int, cuda: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_HW, num_warps). CPU/interpreter: few big programs."""
    p_hw = triton.next_power_of_2(hw)
    if not cuda:
        block_hw = min(p_hw, 256)
        block_r = min(triton.next_power_of_2(rows), max(1, (1 << 17) // block_hw))
        return block_r, block_hw, 4
    if t.stride(1) == 1 and hw > 1:
        # channels-last: consecutive rows (n) are contiguous, make the row tile wide.
        block_hw = min(p_hw, 16)
        block_r = max(16, 2048 // block_hw)
    else:
        block_hw = min(p_hw, 256)
        block_r = max(1, 4096 // block_hw)
    return block_r, block_hw, 4


def grad_amap_triton(
    activation: torch.Tensor,
    gradient: torch.Tensor,
    *,
    block_r: int | None = None,
    block_hw: int | None = None,
) -> torch.Tensor:
    """Triton ``grad_amap`` on validated inputs; ``block_*`` override the tile (tests)."""
    b, n, h, w = activation.shape
    out = torch.empty((b, n), dtype=torch.float32, device=activation.device)
    rows, hw = b * n, h * w
    if rows == 0:
        return out
    br, bhw, warps = _pick_blocks(activation, hw, rows, activation.device.type == "cuda")
    br = block_r or br
    bhw = block_hw or bhw
    a_flat, a_sb, a_sn, a_sh, a_sw = _strides(activation)
    g_flat, g_sb, g_sn, g_sh, g_sw = _strides(gradient)
    grid = (triton.cdiv(rows, br),)
    _grad_amap_kernel[grid](
        activation,
        gradient,
        out,
        rows,
        n,
        hw,
        w,
        a_sb,
        a_sn,
        a_sh,
        a_sw,
        g_sb,
        g_sn,
        g_sh,
        g_sw,
        A_FLAT=a_flat,
        G_FLAT=g_flat,
        BLOCK_R=br,
        BLOCK_HW=bhw,
        num_warps=warps,
    )
    return out
