"""Surprise / expectation flags and beta on hand-built tables, at the exact boundaries."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from surprise_monitor.kernels import percentile_lookup, prepare_lookup_table

INF = torch.tensor(float("inf"))


def _hand_table(levels, device):
    # K=2 classes, N=3 filters; filter n of class c has grid (c+1) * (n+1) * [0, 1, ..., Q-1]
    q = len(levels)
    base = torch.arange(q, dtype=torch.float32)
    scale = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]])
    quantiles = scale[..., None] * base
    mean = torch.tensor([[1.0, 2.0, 3.0], [5.0, 1.0, 0.0]])  # guards: [F,F,T], [T,F,F]
    raw = SimpleNamespace(levels=torch.tensor(levels), quantiles=quantiles, mean=mean)
    return prepare_lookup_table(raw, device=device)


def _run(alpha, classes, table, backend):
    dev = table.device
    return percentile_lookup(
        alpha.to(dev), torch.tensor(classes, device=dev), table, backend=backend
    )


def test_thresholds_and_guard_on_grid_levels(device):
    table = _hand_table([0.0, 0.1, 50.0, 99.9, 100.0], device)
    # 99.9 and 0.1 are grid levels: thresholds are exactly grid columns 3 and 1
    assert torch.equal(table.surprise_value, table.quantiles[..., 3])
    assert torch.equal(table.expectation_value, table.quantiles[..., 1])
    assert table.expectation_guard.tolist() == [[False, False, True], [True, False, False]]


def test_surprise_is_strict_at_the_threshold(device, backend):
    table = _hand_table([0.0, 0.1, 50.0, 99.9, 100.0], device)
    sv = table.surprise_value.cpu()  # class 0: [3, 6, 9]
    alpha = torch.stack([sv[0], torch.nextafter(sv[0], INF), torch.nextafter(sv[0], -INF)])
    res = _run(alpha, [0, 0, 0], table, backend)
    assert res.surprise.tolist() == [[False] * 3, [True] * 3, [False] * 3]
    assert res.percentile[0].tolist() == [pytest.approx(99.9, abs=1e-4)] * 3


def test_expectation_is_strict_and_guarded(device, backend):
    table = _hand_table([0.0, 0.1, 50.0, 99.9, 100.0], device)
    ev = table.expectation_value.cpu()  # [[1, 2, 3], [2, 4, 6]]
    rows = [
        ev[0],  # equal -> never expected
        torch.nextafter(ev[0], -INF),  # just below: expected where the guard holds
        ev[0] - 100.0,  # far below the grid
        torch.nextafter(ev[1], -INF),  # class 1: guard is [T, F, F]
    ]
    res = _run(torch.stack(rows), [0, 0, 0, 1], table, backend)
    assert res.expectation.tolist() == [
        [False, False, False],
        [False, False, True],
        [False, False, True],
        [True, False, False],
    ]
    assert res.percentile[2].tolist() == [0.0, 0.0, 0.0]
    assert not res.surprise.any()


def test_thresholds_between_grid_levels_interpolate(device, backend):
    # Q=3 grid [0, 50, 100]: 99.9 lies between 50 and 100 -> G1 + (G2 - G1) * 0.998
    table = _hand_table([0.0, 50.0, 100.0], device)
    w_s = (99.9 - 50.0) / 50.0
    expect_s = table.quantiles[..., 1] + (table.quantiles[..., 2] - table.quantiles[..., 1]) * w_s
    torch.testing.assert_close(table.surprise_value, expect_s, rtol=1e-6, atol=1e-6)
    expect_e = table.quantiles[..., 1] * (0.1 / 50.0)
    torch.testing.assert_close(table.expectation_value, expect_e, rtol=1e-6, atol=1e-6)
    sv = table.surprise_value.cpu()
    res = _run(torch.stack([sv[1], torch.nextafter(sv[1], INF)]), [1, 1], table, backend)
    assert res.surprise.tolist() == [[False] * 3, [True] * 3]


def test_percentile_and_beta_by_hand(device, backend):
    table = _hand_table([0.0, 25.0, 50.0, 75.0, 100.0], device)
    # class 1 grids: [0,2,4,6,8], [0,4,8,12,16], [0,6,12,18,24]; means [5, 1, 0]
    alpha = torch.tensor([[3.0, 16.0, -1.0], [8.0, 2.0, 30.0]])
    res = _run(alpha, [1, 1], table, backend)
    assert res.percentile.tolist() == [[37.5, 100.0, 0.0], [100.0, 12.5, 100.0]]
    # beta = mean(alpha - mu): row 0 -> (-2 + 15 - 1) / 3 = 4; row 1 -> (3 + 1 + 30) / 3
    torch.testing.assert_close(res.beta.cpu(), torch.tensor([4.0, 34.0 / 3]))
    assert res.surprise.tolist() == [[False, True, False], [True, False, True]]


def test_raw_table_uses_requested_pcts(device, backend):
    raw = SimpleNamespace(
        levels=[0.0, 50.0, 90.0, 100.0],
        quantiles=torch.tensor([[[0.0, 1.0, 2.0, 3.0]]]),
        mean=torch.tensor([[0.5]]),
    )
    alpha = torch.tensor([[2.5]], device=device)
    cls = torch.tensor([0], device=device)
    lo = percentile_lookup(alpha, cls, raw, surprise_pct=90.0, backend=backend)
    hi = percentile_lookup(alpha, cls, raw, backend=backend)  # default 99.9 -> 2.99
    assert lo.surprise.tolist() == [[True]] and hi.surprise.tolist() == [[False]]
    assert lo.percentile.tolist() == [[95.0]]
