"""Fused Triton kernel for ``grad_amap`` (imported lazily; needs triton).

One program reduces ``BLOCK_R`` flattened ``(b, n)`` rows over ``H*W`` in chunks of
``BLOCK_HW``, reading each input through its own strides; no ``[B, N, H, W]`` temporary is
formed, so each input is read once (the eager ``(a * g).mean((2, 3))`` writes and re-reads a
product). Index math is kept cheap where the layout allows it:

* ``*_FLAT``: the ``(h, w)`` pair collapses to one stride (``sH == W * sW``: NCHW-contiguous
  and channels-last), so the spatial offset is ``hw * s`` instead of a division by W;
* ``*_ROWS``: the ``(b, n)`` pair collapses to one stride (``sB == N * sN``: true for both
  layouts too), so a row's offset is ``row * sN`` without a division by N;
* ``*_ALIGN``: the largest power of two (up to 16 elements) dividing the row stride and the
  base address, handed to the compiler (``tl.multiple_of``) so loads can be vectorised;
* ``INT64``: 64-bit offsets only when an input spans 2**31 elements or more.

On CUDA the tile (``BLOCK_R``, ``BLOCK_HW``, warps) is autotuned per (N, H*W, layout, dtype)
over a few configs; the interpreter (CPU tests) runs one fixed tile.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["grad_amap_triton"]


@triton.jit
def _offsets(rows, hw, N, W, sb, sn, sh, sw, FLAT: tl.constexpr, ROWS: tl.constexpr,
             ALIGN: tl.constexpr, INT64: tl.constexpr):  # fmt: skip
    """Element offsets ``[BLOCK_R, BLOCK_HW]`` of rows x spatial positions in one input."""
    if INT64:
        rows = rows.to(tl.int64)
        hw = hw.to(tl.int64)
    if ROWS:
        row_off = rows * sn
    else:
        row_off = (rows // N) * sb + (rows % N) * sn
    row_off = tl.multiple_of(row_off, ALIGN)
    if FLAT:
        hw_off = hw * sw
    else:
        hw_off = (hw // W) * sh + (hw % W) * sw
    return row_off[:, None] + hw_off[None, :]


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
    A_ROWS: tl.constexpr,
    G_ROWS: tl.constexpr,
    A_ALIGN: tl.constexpr,
    G_ALIGN: tl.constexpr,
    INT64: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    acc = tl.zeros([BLOCK_R, BLOCK_HW], dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = row_mask[:, None] & (hw < HW)[None, :]
        a_off = _offsets(rows, hw, N, W, a_sb, a_sn, a_sh, a_sw, A_FLAT, A_ROWS, A_ALIGN, INT64)
        g_off = _offsets(rows, hw, N, W, g_sb, g_sn, g_sh, g_sw, G_FLAT, G_ROWS, G_ALIGN, INT64)
        a = tl.load(a_ptr + a_off, mask=mask, other=0.0)
        g = tl.load(g_ptr + g_off, mask=mask, other=0.0)
        acc += a.to(tl.float32) * g.to(tl.float32)
    total = tl.sum(acc, axis=1)
    tl.store(out_ptr + rows, total / HW, mask=row_mask)


def _configs() -> list[triton.Config]:
    """The autotuned tiles: (rows, spatial chunk, warps)."""
    tiles = [(16, 64, 4), (32, 64, 4), (8, 128, 4), (16, 128, 8), (4, 256, 4), (8, 256, 8),
             (64, 16, 4), (128, 16, 4), (128, 32, 8), (256, 8, 8), (64, 64, 8)]  # fmt: skip
    return [triton.Config({"BLOCK_R": r, "BLOCK_HW": h}, num_warps=w) for r, h, w in tiles]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """The tiles that fit the shape: a spatial chunk no wider than H*W rounded up (16 at
    least); wide row tiles (64 rows and more) for channels-last inputs, whose filters are
    contiguous, and for H*W <= 16; narrow ones otherwise."""
    p_hw = max(triton.next_power_of_2(int(named_args["HW"])), 16)
    wide = bool(kwargs.get("CHANNELS_LAST", False)) or p_hw <= 16
    kept = [
        c for c in configs if c.kwargs["BLOCK_HW"] <= p_hw and (c.kwargs["BLOCK_R"] >= 64) == wide
    ]
    return kept or configs[:1]


@functools.cache
def _autotuned() -> triton.runtime.Autotuner:
    """The kernel autotuned over :func:`_configs` (CUDA only: tuning times real launches)."""
    return triton.autotune(
        configs=_configs(),
        key=["N", "HW", "CHANNELS_LAST", "A_FLAT", "G_FLAT", "A_ROWS", "G_ROWS"],
        prune_configs_by={"early_config_prune": _prune},
    )(_grad_amap_kernel)


def _layout(t: torch.Tensor) -> tuple[bool, bool, int, int, int, int, int]:
    """(flat, rows, align, sB, sN, sH, sW'): ``flat``/``rows`` as in the module docstring; when
    flat, sW' is the single stride of the hw index."""
    _, n, h, w = t.shape
    sb, sn, sh, sw = t.stride()
    flat = w == 1 or h == 1 or sh == w * sw
    if w == 1:
        sw = sh
    rows = t.shape[0] == 1 or n == 1 or sb == n * sn
    if n == 1:
        sn = sb
    align = 1
    elem = t.element_size()
    while (
        align < 16
        and sn % (2 * align) == 0
        and sb % (2 * align) == 0
        and t.data_ptr() % (2 * align * elem) == 0
    ):
        align *= 2
    return flat, rows, align, sb, sn, (0 if flat else sh), sw


def _span(t: torch.Tensor) -> int:
    """One past the largest element offset ``t`` reaches."""
    return 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride(), strict=True))


def grad_amap_triton(
    activation: torch.Tensor,
    gradient: torch.Tensor,
    *,
    block_r: int | None = None,
    block_hw: int | None = None,
    int64: bool | None = None,
) -> torch.Tensor:
    """Triton ``grad_amap`` on validated inputs; ``block_*`` override the tile (tests; the
    interpreter's default is one big tile, CUDA's is autotuned); ``int64`` forces the offset
    width (tests; default: 64-bit only where 32 bits overflow)."""
    b, n, h, w = activation.shape
    out = torch.empty((b, n), dtype=torch.float32, device=activation.device)
    rows, hw = b * n, h * w
    if rows == 0:
        return out
    a_flat, a_rows, a_align, *a_s = _layout(activation)
    g_flat, g_rows, g_align, *g_s = _layout(gradient)
    meta = {
        "A_FLAT": a_flat, "G_FLAT": g_flat, "A_ROWS": a_rows, "G_ROWS": g_rows,
        "A_ALIGN": a_align, "G_ALIGN": g_align,
        "INT64": (
            max(_span(activation), _span(gradient), rows + 1) >= 2**31 if int64 is None else int64
        ),
        "CHANNELS_LAST": activation.stride(1) == 1 and hw > 1 and n > 1,
    }  # fmt: skip
    args = (activation, gradient, out, rows, n, hw, w, *a_s, *g_s)
    cuda = activation.device.type == "cuda"
    if cuda and block_r is None and block_hw is None:
        _autotuned()[lambda m: (triton.cdiv(rows, m["BLOCK_R"]),)](*args, **meta)
        return out
    p_hw = triton.next_power_of_2(hw)
    bhw = block_hw or min(p_hw, 256)
    br = block_r or min(triton.next_power_of_2(rows), max(1, (1 << 17) // bhw))
    _grad_amap_kernel[(triton.cdiv(rows, br),)](
        *args, **meta, BLOCK_R=br, BLOCK_HW=bhw, num_warps=4
    )
    return out
