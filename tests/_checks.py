"""Assertion helpers and independent oracles shared by test modules (no test lives here)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from surprise_monitor.monitor.table import CalibrationTable, TableError

TABLE_TENSORS = ("quantiles", "mean", "counts", "beta_quantiles", "top_indices", "top_alpha")


def assert_same_table(a: CalibrationTable, b: CalibrationTable) -> None:
    """Bitwise equality of every tensor (NaN where there is no exemplar, in both)."""
    for name in TABLE_TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), name
    assert (a.layer, a.class_names, a.input_shape) == (b.layer, b.class_names, b.input_shape)


def autograd_alpha(model, layer: str, x, classes, score: str = "logit") -> torch.Tensor:
    """Full-graph oracle with no library code: A captured by a hook on the module found by
    name, the class score by plain ``torch.softmax`` / ``log_softmax`` / the logit, dO_c/dA by
    ``torch.autograd.grad``."""
    store = {}

    def hook(module, inputs, output):
        store["a"] = output
        return output.clone()  # downstream in-place ops must not overwrite A

    handle = dict(model.named_modules())[layer].register_forward_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    scores = {
        "logit": lambda z: z,
        "softmax": lambda z: torch.softmax(z, dim=1),
        "log_softmax": lambda z: torch.log_softmax(z, dim=1),
    }[score](logits)
    s = scores.gather(1, torch.as_tensor(classes).view(-1, 1)).sum()
    (g,) = torch.autograd.grad(s, store["a"])
    return (g * store["a"]).mean((2, 3)).detach()


def spilled_alpha(folder, c: int, num_filters: int):
    """All alpha rows a calibration spilled for class ``c`` in ``folder``, ``[n_c, N]``."""
    from surprise_monitor.calibrate.spill import AlphaSpill

    rows = AlphaSpill(folder, num_filters).read_alpha(c)
    return rows.read_rows(0, rows.shape[0])


def resign(path, edit) -> None:
    """Rewrite the table file at ``path`` with its metadata changed by ``edit`` (a function
    that edits the metadata dict in place, or returns new JSON text) and a checksum recomputed
    the way the loader checks it: SHA-256 over the metadata JSON, the tensor entries as sorted
    JSON, then the data section. What anyone can do to a file with no secret in it."""
    import hashlib
    import json
    import struct
    from pathlib import Path

    raw = Path(path).read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    entries = json.loads(raw[8 : 8 + size])
    data = raw[8 + size :]
    header = entries.pop("__metadata__")
    meta = json.loads(header["meta"])
    edited = edit(meta)
    header["meta"] = edited if isinstance(edited, str) else json.dumps(meta, sort_keys=True)
    digest = hashlib.sha256(header["meta"].encode())
    digest.update(json.dumps(entries, sort_keys=True).encode())
    digest.update(data)
    header["sha256"] = digest.hexdigest()
    text = json.dumps({**entries, "__metadata__": header}).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data)


def load_edited(table: CalibrationTable, folder, edit) -> CalibrationTable:
    """Save ``table`` in ``folder``, change its metadata by ``edit`` (:func:`resign`: the
    checksum fits, only the metadata differs) and load it again."""
    path = table.save(folder / "t.safetensors")
    resign(path, edit)
    return CalibrationTable.load(path)


def assert_load_refuses(table: CalibrationTable, folder, edit, message: str) -> None:
    """Check that loading ``table`` with its metadata changed by ``edit``
    (:func:`load_edited`) raises a :class:`TableError` matching ``message``."""
    with pytest.raises(TableError, match=message):
        load_edited(table, folder, edit)


def table_with_counts(counts) -> CalibrationTable:
    """A small valid table whose classes have ``counts`` calibration images."""
    k, n = len(counts), 2
    levels = torch.tensor([0.0, 0.1, 50.0, 99.9, 100.0], dtype=torch.float64)
    quantiles = torch.linspace(-1, 1, 5).expand(k, n, 5).contiguous()
    return CalibrationTable(
        layer="conv", levels=levels, quantiles=quantiles, mean=torch.zeros(k, n),
        counts=torch.tensor(counts), beta_levels=torch.tensor([0.0, 100.0], dtype=torch.float64),
        beta_quantiles=torch.tensor([[-1.0, 1.0]]).expand(k, 2).contiguous(),
        top_indices=torch.zeros(k, n, 1, dtype=torch.int32), top_alpha=torch.zeros(k, n, 1),
        class_names=[str(c) for c in range(k)],
    )  # fmt: skip


def assert_same(got: torch.Tensor, want: torch.Tensor, name: str = "") -> None:
    """Bit-for-bit equal tensors, NaN equal to NaN (fields the table may leave NaN)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (name, got, want)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=name)


def run_in_threads(work: Callable[[int], None], count: int, timeout: float = 120.0) -> None:
    """Run ``work(0) .. work(count - 1)`` on ``count`` threads at once and wait for them; fail
    with the first exception a thread raised, or when a thread is still running at ``timeout``."""
    errors: list[BaseException] = []

    def guarded(t: int) -> None:
        try:
            work(t)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    pool = [threading.Thread(target=guarded, args=(t,)) for t in range(count)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(timeout)
    assert not any(th.is_alive() for th in pool), f"a thread still runs after {timeout} s"
    if errors:
        raise errors[0]


def exponential_tail(reference, values, points: int = 50):
    """Numpy oracle of ``atypicality.exponential_tail_ranks``: ``np.interp`` of the count of
    reference values below each value, and above the ``k``-th highest reference value ``u``
    an exponential tail ``(1 + k) / (m + 1) * exp(-(v - u) / s)``, ``s`` the mean excess of the
    values above ``u``; clipped to ``[float32 tiny, 1]``."""
    import numpy as np

    ref = np.sort(np.asarray(reference, np.float64))
    v = np.asarray(values, np.float64)
    m = ref.size
    k = max(1, min(points, m // 10))
    body = (1 + m - np.interp(v, ref, np.arange(m))) / (m + 1)
    u = ref[m - k]
    s = np.mean(ref[m - k + 1 :] - u) if k > 1 else 1.0
    tail = (1 + k) / (m + 1) * np.exp(-(v - u) / s)
    return np.clip(np.where(v > u, tail, body), np.finfo(np.float32).tiny, 1.0)


def interpolated_p(null, s: float) -> float:
    """The interpolated conformal p-value, by numpy on a plain list walk: ``(k + f) / (n + 1)``
    with ``k = #{null >= s}`` and ``f`` the share of the gap between the nearest null scores
    below and at or above ``s`` that lies above it; ``(1 + k) / (n + 1)`` above every null
    score or at or below the smallest."""
    import numpy as np

    null = np.sort(np.asarray(null, np.float64))
    n, k = len(null), int(np.sum(null >= s))
    if k == 0 or k == n:
        return (1 + k) / (n + 1)
    upper, lower = null[n - k], null[n - k - 1]
    return (k + (upper - s) / (upper - lower)) / (n + 1)
