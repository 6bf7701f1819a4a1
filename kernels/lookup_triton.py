"""Fused Triton kernels for ``percentile_lookup`` (imported lazily; needs triton).

Two launches, no atomics, no host sync:

1. ``_filter_kernel`` over a ``(B, ceil(N / BLOCK_N))`` grid: program ``(b, j)`` takes sample
   ``b``'s class ``c`` and filters ``n`` in block ``j``. It reads the grid
   ``quantiles[c, n, q]`` through its strides in ``[BLOCK_Q, BLOCK_N]`` tiles (prepared for
   CUDA the grid is level-major: loads coalesce over filters) and keeps ``below = #{G < v}``,
   ``upto = #{G <= v}``, ``G_lo = max{G <= v}`` and ``G_hi = min{G > v}``, from which
   :func:`_rank` makes the percentile (mid-rank on ties). The thresholds are read from the
   same rows (a grid column) or from precomputed values; the surprise / expectation flags
   (masked by the class's calibrated flag and, for expectation, ``mu > class_mean``) come out
   of the same pass, and the block's share of beta, ``sum_n(v - mu)``, goes to a ``[B, NB]``
   buffer of partial sums.
2. ``_beta_kernel`` over blocks of ``BLOCK_R`` samples: beta = the sum of the sample's
   partials / N (a fixed order: deterministic, so a CUDA-graph replay equals the eager
   call bit for bit), the calibrated flag, and, with a beta grid, beta's rank on the class's
   beta grid and the low-beta flag.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from surprise_monitor.kernels._types import LookupResult, LookupTable

__all__ = ["percentile_lookup_triton"]


@triton.jit
def _rank(v, below, upto, g_lo, g_hi, levels_ptr, Q, mask):
    """Percentile rank from the counts (see :func:`surprise_monitor.kernels.percentile_rank`)."""
    lo = tl.maximum(upto - 1, 0)
    hi = tl.minimum(upto, Q - 1)
    l_lo = tl.load(levels_ptr + lo, mask=mask, other=0.0)
    l_hi = tl.load(levels_ptr + hi, mask=mask, other=0.0)
    l_below = tl.load(levels_ptr + tl.minimum(below, Q - 1), mask=mask, other=0.0)
    interior = (upto > 0) & (upto < Q) & (upto == below)
    g_lo_s = tl.where(interior, g_lo, 0.0)
    denom = tl.where(interior, g_hi - g_lo_s, 1.0)
    frac = (v - g_lo_s) / denom
    rank = l_lo + (l_hi - l_lo) * frac
    rank = tl.where(upto > below, (l_below + l_lo) * 0.5, rank)
    rank = tl.where(upto == 0, 0.0, rank)
    rank = tl.where(below >= Q, 100.0, rank)
    return tl.minimum(tl.maximum(rank, 0.0), 100.0)


@triton.jit
def _count_tile(g, v2, m, below, upto, g_lo, g_hi, AXIS: tl.constexpr):
    """One grid tile ``g`` (masked by ``m``) against the values ``v2`` (broadcast over the
    levels' axis ``AXIS``): the running ``below``, ``upto``, ``G_lo`` and ``G_hi`` updated."""
    le = (g <= v2) & m
    gt = (g > v2) & m
    below += tl.sum(((g < v2) & m).to(tl.int32), axis=AXIS)
    upto += tl.sum(le.to(tl.int32), axis=AXIS)
    g_lo = tl.maximum(g_lo, tl.max(tl.where(le, g, float("-inf")), axis=AXIS))
    g_hi = tl.minimum(g_hi, tl.min(tl.where(gt, g, float("inf")), axis=AXIS))
    return below, upto, g_lo, g_hi


@triton.jit
def _filter_kernel(
    alpha_ptr,
    cls_ptr,
    q_ptr,
    levels_ptr,
    mean_ptr,
    cmean_ptr,
    sval_ptr,
    eval_ptr,
    cal_ptr,
    pct_ptr,
    sur_ptr,
    exp_ptr,
    part_ptr,
    N,
    Q,
    NB,
    q_sk,
    q_sn,
    q_sq,
    s_col,
    e_col,
    a_sb,
    a_sn,
    c_s,
    S_COL: tl.constexpr,
    E_COL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    c = tl.load(cls_ptr + b * c_s).to(tl.int64)
    cal = tl.load(cal_ptr + c) != 0
    v = tl.load(alpha_ptr + b * a_sb + n.to(tl.int64) * a_sn, mask=n_mask, other=0.0)
    v = v.to(tl.float32)
    cn = c * N + n
    mu = tl.load(mean_ptr + cn, mask=n_mask, other=0.0)
    tl.store(part_ptr + b * NB + j, tl.sum(tl.where(n_mask, v - mu, 0.0), axis=0))
    row = c * q_sk + n.to(tl.int64) * q_sn  # this sample's grid rows
    if S_COL:
        s_val = tl.load(q_ptr + row + s_col * q_sq, mask=n_mask, other=0.0)
    else:
        s_val = tl.load(sval_ptr + cn, mask=n_mask, other=0.0)
    if E_COL:
        e_val = tl.load(q_ptr + row + e_col * q_sq, mask=n_mask, other=0.0)
    else:
        e_val = tl.load(eval_ptr + cn, mask=n_mask, other=0.0)
    guard = mu > tl.load(cmean_ptr + c)
    surprise = (v > s_val) & cal
    expectation = (v < e_val) & guard & cal

    below = tl.zeros([BLOCK_N], dtype=tl.int32)
    upto = tl.zeros([BLOCK_N], dtype=tl.int32)
    g_lo = tl.full([BLOCK_N], float("-inf"), tl.float32)
    g_hi = tl.full([BLOCK_N], float("inf"), tl.float32)
    v2 = v[None, :]
    for q0 in range(0, Q, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        m = (q < Q)[:, None] & n_mask[None, :]
        g = tl.load(q_ptr + (row[None, :] + q.to(tl.int64)[:, None] * q_sq), mask=m, other=0.0)
        below, upto, g_lo, g_hi = _count_tile(g, v2, m, below, upto, g_lo, g_hi, 0)
    rank = _rank(v, below, upto, g_lo, g_hi, levels_ptr, Q, n_mask)
    out = b * N + n
    tl.store(pct_ptr + out, rank, mask=n_mask)
    tl.store(sur_ptr + out, surprise, mask=n_mask)
    tl.store(exp_ptr + out, expectation, mask=n_mask)


@triton.jit
def _beta_kernel(
    part_ptr,
    cls_ptr,
    cal_ptr,
    bgrid_ptr,
    blevels_ptr,
    bthr_ptr,
    beta_ptr,
    calo_ptr,
    bpct_ptr,
    low_ptr,
    B,
    N,
    NB,
    QB,
    c_s,
    HAS_GRID: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_NB: tl.constexpr,
    BLOCK_QB: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < B
    rows64 = rows.to(tl.int64)
    c = tl.load(cls_ptr + rows64 * c_s, mask=r_mask, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for j0 in range(0, NB, BLOCK_NB):
        j = j0 + tl.arange(0, BLOCK_NB)
        m = r_mask[:, None] & (j < NB)[None, :]
        acc += tl.sum(tl.load(part_ptr + (rows64[:, None] * NB + j[None, :]), mask=m, other=0.0), 1)
    beta = acc / N
    cal = tl.load(cal_ptr + c, mask=r_mask, other=0) != 0
    tl.store(beta_ptr + rows64, beta, mask=r_mask)
    tl.store(calo_ptr + rows64, cal, mask=r_mask)
    if HAS_GRID:
        below = tl.zeros([BLOCK_R], dtype=tl.int32)
        upto = tl.zeros([BLOCK_R], dtype=tl.int32)
        g_lo = tl.full([BLOCK_R], float("-inf"), tl.float32)
        g_hi = tl.full([BLOCK_R], float("inf"), tl.float32)
        v2 = beta[:, None]
        for q0 in range(0, QB, BLOCK_QB):
            q = q0 + tl.arange(0, BLOCK_QB)
            m = r_mask[:, None] & (q < QB)[None, :]
            g = tl.load(bgrid_ptr + (c[:, None] * QB + q[None, :]), mask=m, other=0.0)
            below, upto, g_lo, g_hi = _count_tile(g, v2, m, below, upto, g_lo, g_hi, 1)
        rank = _rank(beta, below, upto, g_lo, g_hi, blevels_ptr, QB, r_mask)
        thr = tl.load(bthr_ptr + c, mask=r_mask, other=0.0)
        tl.store(bpct_ptr + rows64, rank, mask=r_mask)
        tl.store(low_ptr + rows64, (beta < thr) & cal, mask=r_mask)


class Tiles(NamedTuple):
    """Tile sizes that override the chosen ones: filters and levels per program of the
    filter kernel, rows per program of the beta kernel (``None``: chosen for the shape)."""

    n: int | None = None
    q: int | None = None
    r: int | None = None


#: No override: every tile size chosen for the shape.
CHOSEN = Tiles()


def _pick_blocks(b: int, n: int, q: int, cuda: bool) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_Q) of the filter kernel. CUDA: enough ``(b, n-block)`` programs to
    fill the device even at batch 1; CPU (interpreter): few big programs."""
    block_q = min(triton.next_power_of_2(q), 32)
    p_n = triton.next_power_of_2(n)
    if not cuda:
        return min(p_n, max(16, (1 << 17) // block_q)), block_q
    if b <= 4:
        return min(p_n, 64), block_q
    return min(p_n, 128 if b <= 32 else 256), block_q


def _beta_blocks(b: int, nb: int, qb: int, cuda: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_NB, BLOCK_QB) of the beta kernel."""
    block_r = min(triton.next_power_of_2(b), 16 if cuda else 64)
    block_nb = min(triton.next_power_of_2(nb), 64)
    block_qb = min(triton.next_power_of_2(max(qb, 1)), 128 if cuda else 1024)
    return block_r, block_nb, block_qb


def percentile_lookup_triton(
    alpha: torch.Tensor, classes: torch.Tensor, table: LookupTable, tiles: Tiles = CHOSEN
) -> LookupResult:
    """Triton ``percentile_lookup`` on validated inputs; ``tiles`` overrides the tile sizes
    (tests)."""
    block_n, block_q, block_r = tiles
    b, n = alpha.shape
    dev = alpha.device
    cuda = dev.type == "cuda"
    pct = torch.empty((b, n), dtype=torch.float32, device=dev)
    sur = torch.empty((b, n), dtype=torch.bool, device=dev)
    exp = torch.empty((b, n), dtype=torch.bool, device=dev)
    beta = torch.empty((b,), dtype=torch.float32, device=dev)
    cal = torch.empty((b,), dtype=torch.bool, device=dev)
    has_grid = table.has_beta_grid
    bpct = torch.empty((b,), dtype=torch.float32, device=dev) if has_grid else None
    low = torch.empty((b,), dtype=torch.bool, device=dev) if has_grid else None
    if b == 0:
        return LookupResult(pct, sur, exp, beta, cal, bpct, low)
    q = table.num_levels
    bn, bq = _pick_blocks(b, n, q, cuda)
    bn, bq = block_n or bn, block_q or bq
    nb = triton.cdiv(n, bn)
    part = torch.empty((b, nb), dtype=torch.float32, device=dev)
    sur_t, exp_t = table.surprise, table.expectation
    dummy = table.levels  # never read where a constexpr switch says so
    _filter_kernel[(b, nb)](
        alpha, classes, table.quantiles, table.levels, table.mean, table.class_mean,
        dummy if sur_t.values is None else sur_t.values,
        dummy if exp_t.values is None else exp_t.values,
        table.calibrated, pct, sur, exp, part,
        n, q, nb, *table.quantiles.stride(), sur_t.column or 0, exp_t.column or 0,
        alpha.stride(0), alpha.stride(1), classes.stride(0),
        S_COL=sur_t.column is not None, E_COL=exp_t.column is not None,
        BLOCK_N=bn, BLOCK_Q=bq, num_warps=4,
    )  # fmt: skip
    qb = table.beta_grid.shape[1] if has_grid else 1
    br, bnb, bqb = _beta_blocks(b, nb, qb, cuda)
    br = block_r or br
    _beta_kernel[(triton.cdiv(b, br),)](
        part, classes, table.calibrated,
        table.beta_grid if has_grid else dummy, table.beta_levels if has_grid else dummy,
        table.beta_threshold if has_grid else dummy,
        beta, cal, bpct if has_grid else beta, low if has_grid else cal,
        b, n, nb, qb, classes.stride(0),
        HAS_GRID=has_grid, BLOCK_R=br, BLOCK_NB=bnb, BLOCK_QB=bqb, num_warps=4,
    )  # fmt: skip
    return LookupResult(pct, sur, exp, beta, cal, bpct, low)
