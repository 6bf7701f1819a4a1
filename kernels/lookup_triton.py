"""Fused Triton kernel for ``percentile_lookup`` (imported lazily; needs triton).

Grid over blocks of ``BLOCK_B`` rows. Each program gathers its rows' classes once, then
walks N in chunks of ``BLOCK_N``; per chunk it scans the Q grid in chunks of ``BLOCK_Q``
(``[BLOCK_B, BLOCK_N, BLOCK_Q]`` tiles, contiguous along q in the ``[K, N, Q]`` table)
keeping ``count = #{q: G[q] <= v}``, ``G_lo = max{G[q] <= v}`` and ``G_hi = min{G[q] > v}``.
Because G is non-decreasing, ``count - 1`` is the last index with ``G[q] <= v``. Percentile,
surprise and expectation flags and the beta partial sums all come out of the same pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._types import LookupResult, LookupTable

__all__ = ["percentile_lookup_triton"]


@triton.jit
def _percentile_lookup_kernel(
    alpha_ptr,
    cls_ptr,
    quant_ptr,
    levels_ptr,
    mean_ptr,
    sval_ptr,
    eval_ptr,
    guard_ptr,
    pct_ptr,
    sur_ptr,
    exp_ptr,
    beta_ptr,
    B,
    N,
    Q,
    a_sb,
    a_sn,
    c_s,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    cls = tl.load(cls_ptr + rows64 * c_s, mask=row_mask, other=0).to(tl.int64)
    beta_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < N
        m2 = row_mask[:, None] & n_mask[None, :]
        v = tl.load(
            alpha_ptr + (rows64[:, None] * a_sb + n[None, :].to(tl.int64) * a_sn),
            mask=m2,
            other=0.0,
        ).to(tl.float32)
        cn = cls[:, None] * N + n[None, :]
        mu = tl.load(mean_ptr + cn, mask=m2, other=0.0)
        beta_acc += tl.sum(tl.where(m2, v - mu, 0.0), axis=1)
        s_val = tl.load(sval_ptr + cn, mask=m2, other=0.0)
        e_val = tl.load(eval_ptr + cn, mask=m2, other=0.0)
        guard = tl.load(guard_ptr + cn, mask=m2, other=0) != 0
        surprise = v > s_val
        expectation = (v < e_val) & guard

        count = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.int32)
        g_lo = tl.full([BLOCK_B, BLOCK_N], float("-inf"), tl.float32)
        g_hi = tl.full([BLOCK_B, BLOCK_N], float("inf"), tl.float32)
        base = cn * Q
        v3 = v[:, :, None]
        for q0 in range(0, Q, BLOCK_Q):
            q = q0 + tl.arange(0, BLOCK_Q)
            m3 = m2[:, :, None] & (q < Q)[None, None, :]
            g = tl.load(quant_ptr + (base[:, :, None] + q[None, None, :]), mask=m3, other=0.0)
            le = (g <= v3) & m3
            gt = (g > v3) & m3
            count += tl.sum(le.to(tl.int32), axis=2)
            g_lo = tl.maximum(g_lo, tl.max(tl.where(le, g, float("-inf")), axis=2))
            g_hi = tl.minimum(g_hi, tl.min(tl.where(gt, g, float("inf")), axis=2))

        interior = (count > 0) & (count < Q)
        idx_lo = tl.maximum(count - 1, 0)
        idx_hi = tl.minimum(count, Q - 1)
        l_lo = tl.load(levels_ptr + idx_lo, mask=m2, other=0.0)
        l_hi = tl.load(levels_ptr + idx_hi, mask=m2, other=0.0)
        g_lo_s = tl.where(interior, g_lo, 0.0)
        denom = tl.where(interior, g_hi - g_lo_s, 1.0)
        frac = (v - g_lo_s) / denom
        rank = l_lo + (l_hi - l_lo) * frac
        rank = tl.where(count == 0, 0.0, rank)
        rank = tl.where(count >= Q, 100.0, rank)
        rank = tl.minimum(tl.maximum(rank, 0.0), 100.0)

        out_off = rows64[:, None] * N + n[None, :]
        tl.store(pct_ptr + out_off, rank, mask=m2)
        tl.store(sur_ptr + out_off, surprise, mask=m2)
        tl.store(exp_ptr + out_off, expectation, mask=m2)
    tl.store(beta_ptr + rows64, beta_acc / N, mask=row_mask)


def _pick_blocks(b: int, n: int, q: int, cuda: bool) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_N, BLOCK_Q). CPU/interpreter: few big programs."""
    block_q = min(triton.next_power_of_2(q), 32)
    if not cuda:
        block_b = min(triton.next_power_of_2(b), 16)
        block_n = min(triton.next_power_of_2(n), max(1, (1 << 18) // (block_b * block_q)))
        return block_b, block_n, block_q
    block_n = min(triton.next_power_of_2(n), max(16, 2048 // block_q))
    return 1, block_n, block_q


def percentile_lookup_triton(
    alpha: torch.Tensor,
    classes: torch.Tensor,
    table: LookupTable,
    *,
    block_b: int | None = None,
    block_n: int | None = None,
    block_q: int | None = None,
) -> LookupResult:
    """Triton ``percentile_lookup`` on validated inputs; ``block_*`` override the tile."""
    b, n = alpha.shape
    dev = alpha.device
    pct = torch.empty((b, n), dtype=torch.float32, device=dev)
    sur = torch.empty((b, n), dtype=torch.bool, device=dev)
    exp = torch.empty((b, n), dtype=torch.bool, device=dev)
    beta = torch.empty((b,), dtype=torch.float32, device=dev)
    if b == 0:
        return LookupResult(pct, sur, exp, beta)
    q = table.num_levels
    bb, bn, bq = _pick_blocks(b, n, q, dev.type == "cuda")
    bb, bn, bq = block_b or bb, block_n or bn, block_q or bq
    grid = (triton.cdiv(b, bb),)
    _percentile_lookup_kernel[grid](
        alpha,
        classes,
        table.quantiles,
        table.levels,
        table.mean,
        table.surprise_value,
        table.expectation_value,
        table.expectation_guard,
        pct,
        sur,
        exp,
        beta,
        b,
        n,
        q,
        alpha.stride(0),
        alpha.stride(1),
        classes.stride(0),
        BLOCK_B=bb,
        BLOCK_N=bn,
        BLOCK_Q=bq,
        num_warps=4,
    )
    return LookupResult(pct, sur, exp, beta)
