"""Shared fixtures for the kernels tests: device, Triton availability, table/alpha factories."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from surprise_monitor import kernels
from surprise_monitor.kernels._backend import interpret_enabled, triton_available

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _triton_runnable() -> bool:
    return triton_available() and (DEVICE.type == "cuda" or interpret_enabled())


@pytest.fixture
def device() -> torch.device:
    """CUDA when present, else CPU (Triton then runs in the interpreter)."""
    return DEVICE


@pytest.fixture
def need_triton() -> None:
    """Skip unless the Triton backend can run on ``DEVICE``."""
    if not _triton_runnable():
        pytest.skip("triton backend unavailable (no CUDA and TRITON_INTERPRET unset)")


@pytest.fixture(params=["torch", "triton"])
def backend(request: pytest.FixtureRequest) -> str:
    """Both backends; the triton one is skipped where it cannot run."""
    if request.param == "triton" and not _triton_runnable():
        pytest.skip("triton backend unavailable (no CUDA and TRITON_INTERPRET unset)")
    return request.param


def grid_levels(q: int) -> torch.Tensor:
    """Percent levels 0..100 with Q entries (Q in {2, 3, 5} or Q >= 8); 0.1 / 99.9 are grid
    levels for Q = 5 and Q >= 8, and fall between levels for Q = 2, 3."""
    small = {2: [0.0, 100.0], 3: [0.0, 50.0, 100.0], 5: [0.0, 0.1, 50.0, 99.9, 100.0]}
    if q in small:
        vals = small[q]
    else:
        assert q >= 8, q
        inner = torch.linspace(5.0, 95.0, q - 6).tolist()
        vals = [0.0, 0.1, 1.0, *inner, 99.0, 99.9, 100.0]
    return torch.tensor(vals, dtype=torch.float32)


@pytest.fixture
def strict_grid() -> Callable[..., np.ndarray]:
    """Factory for a strictly increasing float32 grid ``[*shape, q]``: ``strict_grid(rng,
    shape, q)``."""

    def _make(rng: np.random.Generator, shape: tuple[int, ...], q: int) -> np.ndarray:
        x = np.sort(rng.normal(size=(*shape, q)), axis=-1)
        x += np.arange(q) * 1e-3  # strictly increasing
        return x.astype(np.float32)

    return _make


@pytest.fixture
def make_table() -> Callable[..., SimpleNamespace]:
    """Factory for a raw calibration table with flat runs on every other filter."""

    def _make(k: int, n: int, q: int, *, seed: int = 0, ties: bool = True) -> SimpleNamespace:
        gen = torch.Generator().manual_seed(seed)
        grid = torch.randn(k, n, q, generator=gen).sort(-1).values
        if ties:
            grid[:, ::2] = (grid[:, ::2] * 2).round() / 2  # coarse rounding -> flat runs
        mean = torch.randn(k, n, generator=gen)
        return SimpleNamespace(levels=grid_levels(q), quantiles=grid, mean=mean)

    return _make


@pytest.fixture
def make_alpha() -> Callable[..., torch.Tensor]:
    """Factory for alpha mixing random values with exact grid points, thresholds +-1 ulp,
    the grid ends and values outside the grid."""

    def _make(table: kernels.LookupTable, classes: torch.Tensor, *, seed: int = 1) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        cls = classes.cpu().long()
        grid = table.quantiles.cpu()[cls]
        b, n, q = grid.shape
        sv = table.surprise_value.cpu()[cls]
        ev = table.expectation_value.cpu()[cls]
        inf = torch.tensor(float("inf"))
        choices = [
            torch.randn(b, n, generator=gen) * 1.2,
            grid.gather(-1, torch.randint(0, q, (b, n, 1), generator=gen))[..., 0],
            sv,
            torch.nextafter(sv, inf),
            ev,
            torch.nextafter(ev, -inf),
            grid[..., 0],
            grid[..., -1],
            grid[..., 0] - 1.0,
            grid[..., -1] + 1.0,
        ]
        kind = torch.randint(0, len(choices), (b, n), generator=gen)
        alpha = torch.stack(choices).gather(0, kind[None])[0]
        return alpha.to(table.device)

    return _make
