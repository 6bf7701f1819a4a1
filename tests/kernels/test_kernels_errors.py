"""Validation errors, backend selection, and the lazy Triton import."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from surprise_monitor.kernels import (
    check_percentile_grid,
    grad_amap,
    percentile_lookup,
    prepare_lookup_table,
)
from surprise_monitor.kernels._backend import resolve_backend

ROOT = Path(__file__).resolve().parents[2]


def _raw(k=3, n=4, q=5):
    grid = torch.arange(q, dtype=torch.float32).expand(k, n, q).clone()
    return SimpleNamespace(
        levels=torch.tensor([0.0, 0.1, 50.0, 99.9, 100.0][: q - 1] + [100.0]),
        quantiles=grid,
        mean=torch.zeros(k, n),
    )


# ---- grad_amap ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a,g,msg",
    [
        (
            torch.zeros(2, 3, 4, 4),
            torch.zeros(2, 3, 4, 5),
            r"grad_amap: activation and gradient shapes differ: \(2,3,4,4\) vs \(2,3,4,5\)",
        ),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), r"activation must be 4-D .* got \(2,3,4\)"),
        (torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 16), r"gradient must be 4-D"),
        (
            torch.zeros(2, 3, 4, 4, dtype=torch.int32),
            torch.zeros(2, 3, 4, 4),
            r"activation must be float.*got torch.int32",
        ),
        (torch.zeros(2, 3, 4, 4), np.zeros((2, 3, 4, 4)), r"gradient must be a torch.Tensor"),
        (
            torch.zeros(2, 3, 4, 4),
            torch.zeros(2, 3, 4, 4, device="meta"),
            r"different devices: cpu vs meta",
        ),
        (torch.zeros(2, 3, 0, 4), torch.zeros(2, 3, 0, 4), r"spatial size H\*W is zero"),
    ],
)
def test_grad_amap_validation(a, g, msg):
    with pytest.raises(ValueError, match=msg):
        grad_amap(a, g)


def test_unknown_backend():
    a = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"grad_amap: unknown backend 'cuda'"):
        grad_amap(a, a, backend="cuda")  # type: ignore[arg-type]
    table = prepare_lookup_table(_raw())
    with pytest.raises(ValueError, match=r"percentile_lookup: unknown backend 'numpy'"):
        percentile_lookup(
            torch.zeros(1, 4), torch.zeros(1, dtype=torch.long), table, backend="numpy"
        )  # type: ignore[arg-type]


def test_resolve_backend():
    cpu = torch.device("cpu")
    assert resolve_backend("op", "auto", cpu) == "torch"
    assert resolve_backend("op", "torch", cpu) == "torch"
    with pytest.raises(ValueError, match="op: backend='triton' needs CUDA tensors"):
        resolve_backend("op", "triton", torch.device("meta"))


# ---- percentile_lookup -------------------------------------------------------------------


def test_non_finite_alpha_is_counted():
    table = prepare_lookup_table(_raw())
    alpha = torch.zeros(2, 4)
    alpha[0, 1] = float("nan")
    alpha[1, 0] = float("inf")
    alpha[1, 3] = float("-inf")
    with pytest.raises(ValueError, match=r"percentile_lookup: alpha has 3 non-finite values"):
        percentile_lookup(alpha, torch.tensor([0, 1]), table)


@pytest.mark.parametrize("bad", [[0, 3], [-1, 0]])
def test_class_out_of_range(bad):
    table = prepare_lookup_table(_raw(k=3))
    with pytest.raises(ValueError, match=r"classes out of range \[0, 3\)"):
        percentile_lookup(torch.zeros(2, 4), torch.tensor(bad), table)


@pytest.mark.parametrize(
    "alpha,classes,msg",
    [
        (torch.zeros(4), torch.tensor([0]), r"alpha must be 2-D \[B, N\], got \(4\)"),
        (torch.zeros(2, 5), torch.tensor([0, 0]), r"alpha has N=5 filters but the table has N=4"),
        (torch.zeros(2, 4), torch.tensor([0, 0, 0]), r"classes must be 1-D of length B=2"),
        (torch.zeros(2, 4), torch.tensor([0.0, 1.0]), r"classes must be an integer tensor"),
        (torch.zeros(2, 4), [0, 1], r"classes must be a torch.Tensor"),
        (torch.zeros(2, 4, dtype=torch.int64), torch.tensor([0, 1]), r"alpha must be floating"),
        (
            torch.zeros(2, 4),
            torch.zeros(2, dtype=torch.long, device="meta"),
            r"classes is on meta but alpha is on cpu",
        ),
    ],
)
def test_lookup_input_validation(alpha, classes, msg):
    table = prepare_lookup_table(_raw())
    with pytest.raises(ValueError, match=msg):
        percentile_lookup(alpha, classes, table)


def test_prepared_table_device_and_pct_mismatch():
    table = prepare_lookup_table(_raw())
    cls = torch.tensor([0])
    with pytest.raises(ValueError, match=r"alpha is on meta but the prepared table is on cpu"):
        percentile_lookup(torch.zeros(1, 4, device="meta"), cls, table)
    with pytest.raises(ValueError, match=r"prepared with surprise_pct=99.9 but surprise_pct=99"):
        percentile_lookup(torch.zeros(1, 4), cls, table, surprise_pct=99.0)
    with pytest.raises(ValueError, match=r"expectation_pct=0.1 but expectation_pct=1"):
        percentile_lookup(torch.zeros(1, 4), cls, table, expectation_pct=1.0)


def _with(**kw):
    raw = _raw()
    for k, v in kw.items():
        setattr(raw, k, v)
    return raw


@pytest.mark.parametrize(
    "raw,kw,msg",
    [
        (_with(levels=torch.tensor([0.0, 50.0, 50.0, 99.9, 100.0])), {}, "strictly increasing"),
        (
            _with(levels=torch.tensor([1.0, 20.0, 50.0, 99.9, 100.0])),
            {},
            "start at 0 and end at 100",
        ),
        (
            _with(levels=torch.tensor([0.0, 20.0, 50.0, 90.0, 99.0])),
            {},
            "start at 0 and end at 100",
        ),
        (
            _with(levels=torch.tensor([0.0, 50.0, 100.0])),
            {},
            r"quantiles must be \[K, N, Q\] with Q=3",
        ),
        (_with(mean=torch.zeros(3, 5)), {}, r"mean must be \[K, N\] = \(3,4\), got \(3,5\)"),
        (_with(levels=None), {}, "table has no 'levels'"),
        (_with(quantiles=torch.zeros(3, 4)), {}, r"quantiles must be \[K, N, Q\]"),
        (_raw(), {"surprise_pct": 100.5}, r"surprise_pct=100.5 is outside \[0, 100\]"),
        (_raw(), {"expectation_pct": -1}, r"expectation_pct=-1.0 is outside \[0, 100\]"),
    ],
)
def test_table_validation(raw, kw, msg):
    with pytest.raises(ValueError, match=msg):
        prepare_lookup_table(raw, **kw)


def test_non_monotone_and_non_finite_quantiles():
    raw = _raw()
    raw.quantiles[1, 2, 3] = -5.0  # decreasing step at index 2 -> 3
    with pytest.raises(
        ValueError, match=r"non-decreasing .* first at class 1, filter 2, level index 2"
    ):
        prepare_lookup_table(raw)
    raw = _raw()
    raw.quantiles[0, 0, 0] = float("nan")
    raw.quantiles[2, 3, 4] = float("inf")
    with pytest.raises(ValueError, match=r"quantiles have 2 non-finite values"):
        prepare_lookup_table(raw)
    # a raw table passed straight to percentile_lookup is validated too
    raw = _raw()
    raw.quantiles[0, 0, :] = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="non-decreasing"):
        percentile_lookup(torch.zeros(1, 4), torch.tensor([0]), raw)


# ---- subprocesses: environment without TRITON_INTERPRET / without triton ------------------


def _run_py(code: str, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra_env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_triton_backend_on_cpu_without_interpreter_is_refused():
    proc = _run_py(
        """
        import sys, torch, kernels
        from types import SimpleNamespace
        a = torch.zeros(1, 2, 3, 3)
        try:
            kernels.grad_amap(a, a, backend="triton")
        except ValueError as e:
            print("AMAP:", e)
        t = SimpleNamespace(levels=[0.0, 100.0], quantiles=[[[0.0, 1.0]]], mean=[[0.0]])
        try:
            kernels.percentile_lookup(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), t,
                                      backend="triton")
        except ValueError as e:
            print("LOOKUP:", e)
        print("TRITON_IMPORTED:", "triton" in sys.modules)
        """
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "AMAP: grad_amap: backend='triton' needs CUDA tensors, got device 'cpu'" in out
    assert "LOOKUP: percentile_lookup: backend='triton' needs CUDA tensors" in out
    assert "TRITON_INTERPRET=1" in out
    assert "TRITON_IMPORTED: False" in out


def test_import_and_torch_path_never_import_triton():
    proc = _run_py(
        """
        import sys, torch, kernels
        from types import SimpleNamespace
        a = torch.randn(2, 3, 4, 4)
        alpha = kernels.grad_amap(a, a)
        t = SimpleNamespace(levels=[0.0, 100.0], quantiles=torch.zeros(1, 3, 2),
                            mean=torch.zeros(1, 3))
        kernels.percentile_lookup(alpha, torch.zeros(2, dtype=torch.long), t)
        print("TRITON_IMPORTED:", "triton" in sys.modules)
        """,
        TRITON_INTERPRET="1",
    )
    assert proc.returncode == 0, proc.stderr
    assert "TRITON_IMPORTED: False" in proc.stdout


def test_works_where_triton_is_missing():
    proc = _run_py(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch, kernels
        a = torch.randn(2, 3, 4, 4)
        print("SHAPE:", tuple(kernels.grad_amap(a, a).shape))
        try:
            kernels.grad_amap(a, a, backend="triton")
        except ValueError as e:
            print("ERR:", e)
        """,
        TRITON_INTERPRET="1",
    )
    assert proc.returncode == 0, proc.stderr
    assert "SHAPE: (2, 3)" in proc.stdout
    assert "ERR: grad_amap: backend='triton' requested but triton is not installed" in proc.stdout


def test_value_checks_can_be_left_to_the_caller():
    """``check_values=False`` skips the host-synced checks, not the shape checks, and gives the
    same result on valid inputs."""
    table = prepare_lookup_table(_raw())
    alpha, classes = torch.linspace(-1, 5, 8).view(2, 4), torch.tensor([0, 2])
    checked = percentile_lookup(alpha, classes, table)
    unchecked = percentile_lookup(alpha, classes, table, check_values=False)
    for name in ("percentile", "surprise", "expectation", "beta"):
        assert torch.equal(getattr(checked, name), getattr(unchecked, name)), name
    alpha[0, 1] = float("nan")
    assert percentile_lookup(alpha, classes, table, check_values=False).beta[0].isnan()
    with pytest.raises(ValueError, match="alpha has N=5 filters"):
        percentile_lookup(torch.zeros(2, 5), classes, table, check_values=False)


def test_grid_invariants_name_the_grid_and_the_place():
    levels = torch.tensor([0.0, 50.0, 100.0], dtype=torch.float64)
    beta = torch.tensor([[0.0, 1.0, 2.0], [0.0, 3.0, 1.0]])
    kw = {"names": ("beta_levels", "beta_quantiles"), "axes": ("class",)}
    with pytest.raises(ValueError, match=r"^beta_quantiles must be non-decreasing .* "
                       r"first at class 1, level index 1$"):  # fmt: skip
        check_percentile_grid(levels, beta, **kw)
    with pytest.raises(ValueError, match=r"beta_quantiles must be \[K, Q\] with Q=3"):
        check_percentile_grid(levels, beta[:, :2], **kw)
    with pytest.raises(ValueError, match=r"^x: beta_levels must start at 0 and end at 100"):
        check_percentile_grid(levels * 0.5, beta.sort(1).values, where="x: ", **kw)
    check_percentile_grid(levels, beta.sort(1).values, **kw)  # a valid grid passes
