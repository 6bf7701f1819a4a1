"""Saving and loading tables: bit-exact round trips, refusal of damaged files, atomic writes."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from surprise_monitor.monitor.table import DEFAULT_LEVELS, CalibrationTable, TableError
from tests._checks import assert_load_refuses


def make_table(k: int = 3, n: int = 5, seed: int = 0) -> CalibrationTable:
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, 0.1, 1.0, 50.0, 99.0, 99.9, 100.0], dtype=torch.float64)
    quantiles = torch.sort(torch.randn(k, n, len(levels), generator=g), dim=-1).values
    beta_levels = torch.linspace(0, 100, 11, dtype=torch.float64)
    return CalibrationTable(
        layer="features.3",
        levels=levels,
        quantiles=quantiles,
        mean=quantiles[..., 3].clone(),
        counts=torch.tensor([10, 0, 3000][:k]),
        beta_levels=beta_levels,
        beta_quantiles=torch.sort(torch.randn(k, 11, generator=g), dim=-1).values,
        top_indices=torch.randint(0, 100, (k, n, 6), generator=g),
        top_alpha=torch.randn(k, n, 6, generator=g),
        class_names=[f"c{i}" for i in range(k)],
        input_shape=(3, 8, 8),
        model_fingerprint="ab" * 32,
        data_source={"kind": "imagefolder", "root": "/data"},
    )


def test_round_trip_is_bit_exact(tmp_path):
    t = make_table()
    path = t.save(tmp_path / "t.safetensors")
    u = CalibrationTable.load(path)
    for name in (
        "levels",
        "quantiles",
        "mean",
        "counts",
        "beta_levels",
        "beta_quantiles",
        "top_indices",
        "top_alpha",
    ):
        a, b = getattr(t, name), getattr(u, name)
        assert a.shape == b.shape
        assert torch.equal(
            a.to(b.dtype).reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
        ), name
    for attr in (
        "layer",
        "class_names",
        "class_output",
        "input_shape",
        "model_fingerprint",
        "created",
        "data_source",
    ):
        assert getattr(t, attr) == getattr(u, attr)
    assert u.undersampled_classes() == [0, 1]
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_non_contiguous_inputs_are_saved_in_logical_order(tmp_path):
    t = make_table()
    t.quantiles = t.quantiles.transpose(0, 1).contiguous().transpose(0, 1)  # same values, strided
    assert not t.quantiles.is_contiguous()
    u = CalibrationTable.load(t.save(tmp_path / "t.safetensors"))
    assert torch.equal(u.quantiles, t.quantiles)


def test_truncated_file_is_refused(tmp_path):
    path = make_table().save(tmp_path / "t.safetensors")
    data = path.read_bytes()
    for cut in (4, 100, len(data) - 7):
        path.write_bytes(data[:cut])
        with pytest.raises(TableError, match="truncated or corrupt"):
            CalibrationTable.load(path)


def test_edited_tensor_bytes_are_refused(tmp_path):
    path = make_table().save(tmp_path / "t.safetensors")
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x01  # flip one bit inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(TableError, match="checksum mismatch"):
        CalibrationTable.load(path)


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size :])


def test_edited_metadata_is_refused(tmp_path):
    path = make_table().save(tmp_path / "t.safetensors")

    def rename_layer(h):
        meta = json.loads(h["__metadata__"]["meta"])
        meta["layer"] = "layer4"
        h["__metadata__"]["meta"] = json.dumps(meta, sort_keys=True)

    _rewrite_header(path, rename_layer)
    with pytest.raises(TableError, match="checksum mismatch"):
        CalibrationTable.load(path)


def test_other_files_are_refused(tmp_path):
    with pytest.raises(TableError, match="no such"):
        CalibrationTable.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(TableError, match="not a readable"):
        CalibrationTable.load(junk)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(TableError, match="not a surprise-monitor"):
        CalibrationTable.load(other)
    path = make_table().save(tmp_path / "v.safetensors")
    _rewrite_header(path, lambda h: h["__metadata__"].update(format_version="99"))
    with pytest.raises(TableError, match="version 99 is not supported"):
        CalibrationTable.load(path)


def test_inconsistent_tables_are_refused():
    t = make_table()
    bad = t.quantiles.clone()
    bad[0, 0, 2] = bad[0, 0, 1] - 1
    with pytest.raises(TableError, match="decrease"):
        CalibrationTable(**{**_fields(t), "quantiles": bad})
    with pytest.raises(TableError, match="mean has shape"):
        CalibrationTable(**{**_fields(t), "mean": t.mean[:, :2]})
    nan = t.mean.clone()
    nan[1, 1] = float("nan")
    with pytest.raises(TableError, match="NaN"):
        CalibrationTable(**{**_fields(t), "mean": nan})


def test_failed_write_keeps_the_old_table(tmp_path, monkeypatch):
    path = make_table(seed=0).save(tmp_path / "t.safetensors")
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        make_table(seed=1).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


def _fields(t: CalibrationTable) -> dict:
    return {f: getattr(t, f) for f in t.__dataclass_fields__}


def test_exemplars_can_stay_on_disk(tmp_path):
    t = make_table()
    path = t.save(tmp_path / "t.safetensors")
    lean = CalibrationTable.load(path, exemplars=False)
    assert lean.top_indices is None and lean.top_alpha is None
    assert torch.equal(lean.quantiles, t.quantiles)
    lean.ensure_exemplars()
    assert torch.equal(lean.top_indices, t.top_indices.to(torch.int32))
    assert lean.top_indices.dtype == torch.int32 and lean.top_k == 6
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x01  # the skipped tensors are still checksummed
    path.write_bytes(bytes(data))
    with pytest.raises(TableError, match="checksum mismatch"):
        CalibrationTable.load(path, exemplars=False)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda m: m.pop("layer") and None, "'layer' is missing"),
        (lambda m: m.pop("class_names") and None, "'class_names' is missing"),
        (lambda m: m.update(class_names="c0"), "'class_names' must be a list of strings"),
        (lambda m: m.update(input_shape=[3, "8", 8]), "'input_shape' must be"),
        (lambda m: m.update(input_shape=None), "'input_shape' must be"),
        (lambda m: m.update(data_source="/etc"), "'data_source' must be an object"),
        (lambda m: m.update(model_fingerprint=7), "'model_fingerprint' must be a string"),
        (lambda m: m.update(num_filters=6), "'num_filters' is 6, the tensors hold 5"),
        (lambda m: '{"layer": "x", ', "not valid JSON"),
        (lambda m: "[1, 2]", "not a JSON object"),
    ],
)
def test_bad_metadata_is_a_table_error_naming_the_field(tmp_path, edit, field):
    assert_load_refuses(make_table(), tmp_path, edit, field)


def test_a_huge_header_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:  # claims a 60 MB header; only its first bytes exist
        f.write(struct.pack("<Q", 60 << 20) + b'{"a": ' + b" " * 1000)
    parsed = []
    monkeypatch.setattr(json, "loads", lambda *a, **k: parsed.append(1))
    with pytest.raises(TableError, match="a header of 62914560 bytes"):
        CalibrationTable.load(path)
    assert parsed == []


def test_exemplars_come_only_from_the_file_that_was_loaded(tmp_path):
    path = make_table(seed=0).save(tmp_path / "t.safetensors")
    lean = CalibrationTable.load(path, exemplars=False)
    assert len(lean.sha256) == 64 and lean.fingerprint() == lean.sha256
    other = make_table(seed=1)  # same layer, fingerprint and shapes: other exemplars
    other.save(path)  # replaced after the monitor loaded it
    with pytest.raises(TableError, match="changed since this table was loaded"):
        lean.ensure_exemplars()
    assert lean.top_indices is None


def test_large_tensors_are_mapped_copy_on_write_and_checked(tmp_path, monkeypatch):
    from surprise_monitor.monitor import table_file as table_module

    monkeypatch.setattr(table_module, "MAP_BYTES", 64)  # map even this small table
    t = make_table(k=3, n=40)
    path = t.save(tmp_path / "t.safetensors")
    before = path.read_bytes()
    u = CalibrationTable.load(path)
    assert torch.equal(u.quantiles, t.quantiles) and u.grid_checked and u.quantiles.is_contiguous()
    u.quantiles[0, 0, 0] = -100.0  # a private page: the file is not written
    assert path.read_bytes() == before
    # a re-signed file with a NaN in the (mapped) grid is refused by the chunked check
    bad = make_table(k=3, n=40)
    bad.quantiles[2, 5, 3] = float("nan")
    object.__setattr__(bad, "_checked", (bad.quantiles, bad.mean))  # skip the in-memory check
    bad.save(tmp_path / "bad.safetensors")
    with pytest.raises(TableError, match="quantiles have 1 non-finite values"):
        CalibrationTable.load(tmp_path / "bad.safetensors")


_LOAD_AND_LOOK_UP = """
import json, sys, torch
from pathlib import Path
from surprise_monitor.monitor.table import CalibrationTable
from surprise_monitor.kernels import percentile_lookup, prepare_lookup_table

def kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])

torch.zeros(1).add_(1)  # torch's own start-up memory before the baseline
base = kib("VmRSS")
table = CalibrationTable.load(sys.argv[1], exemplars=False)
lookup = prepare_lookup_table(table)
for c in (3, 7):
    percentile_lookup(torch.zeros(2, table.num_filters), torch.tensor([c, c]), lookup)
print(json.dumps({"rss": kib("VmRSS") - base, "hwm": kib("VmHWM") - base}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_loading_and_looking_up_keeps_the_grid_on_disk(tmp_path):
    """A fresh process loads a 58 MB table, prepares it and looks up two classes: its memory
    grows by a fraction of the grid (the pages of those classes and the means), not by the grid
    or a copy of it."""
    import subprocess
    import sys

    k, n, q = 500, 1000, 29
    g = torch.Generator().manual_seed(0)
    levels = torch.tensor(DEFAULT_LEVELS, dtype=torch.float64)
    grid = torch.randn(k, n, q, generator=g).sort(dim=-1).values
    t = CalibrationTable(
        layer="l", levels=levels, quantiles=grid, mean=torch.zeros(k, n),
        counts=torch.full((k,), 10), beta_levels=torch.linspace(0, 100, 11, dtype=torch.float64),
        beta_quantiles=torch.zeros(k, 11), top_indices=torch.zeros(k, n, 1, dtype=torch.int32),
        top_alpha=torch.zeros(k, n, 1), class_names=[str(i) for i in range(k)],
    )  # fmt: skip
    path = t.save(tmp_path / "big.safetensors")
    del t, grid
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_LOOK_UP, str(path)], check=True,
        capture_output=True, text=True, cwd=root,
    )  # fmt: skip
    grown = json.loads(out.stdout)
    grid_kib = q * k * n * 4 // 1024  # 56,640 KiB
    assert grown["hwm"] < 0.4 * grid_kib, (grown, grid_kib)  # measured: 24% (2 MB page folios)
    assert grown["rss"] < 0.4 * grid_kib, (grown, grid_kib)


def _count_value_checks(monkeypatch) -> list[bool]:
    """Record, for every alpha-grid check the table module and the file reader make, whether it
    read the grid's values."""
    from surprise_monitor.monitor import table as table_module
    from surprise_monitor.monitor import table_file

    calls: list[bool] = []
    real = table_module.check_percentile_grid

    def spy(levels, q, *args, **kw):
        if q.ndim == 3:  # the alpha grid (the beta grid is 2-D)
            calls.append(kw.get("values", True))
        return real(levels, q, *args, **kw)

    monkeypatch.setattr(table_module, "check_percentile_grid", spy)
    monkeypatch.setattr(table_file, "check_percentile_grid", spy)
    return calls


def test_a_mapped_grid_is_value_checked_once_on_load(tmp_path, monkeypatch):
    from surprise_monitor.monitor import table_file

    path = make_table(k=3, n=40).save(tmp_path / "t.safetensors")
    monkeypatch.setattr(table_file, "MAP_BYTES", 64)  # the grid is mapped, checked in chunks
    calls = _count_value_checks(monkeypatch)
    u = CalibrationTable.load(path)
    assert calls == [True, False]  # the reader's chunked check, then the table's shape check
    assert u.grid_checked


def test_a_copied_grid_is_value_checked_by_the_table(tmp_path, monkeypatch):
    path = make_table().save(tmp_path / "t.safetensors")  # small: copied, not mapped
    calls = _count_value_checks(monkeypatch)
    CalibrationTable.load(path)
    assert calls == [True]


def test_a_table_built_directly_is_always_value_checked(monkeypatch):
    import inspect

    # no keyword skips the check: only from_checked_file, after the reader checked the grid
    assert not any("check" in name for name in inspect.signature(CalibrationTable).parameters)
    calls = _count_value_checks(monkeypatch)
    make_table()
    assert calls == [True]
    t = make_table()
    with pytest.raises(TableError, match="non-decreasing|NaN|finite"):
        CalibrationTable(
            **{f: getattr(t, f) for f in ("layer", "levels", "mean", "counts", "beta_levels",
                                          "beta_quantiles", "top_indices", "top_alpha",
                                          "class_names")},
            quantiles=t.quantiles.flip(-1),  # decreasing along the levels
        )  # fmt: skip
