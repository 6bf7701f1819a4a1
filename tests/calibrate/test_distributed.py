"""torchrun with 2 processes on CPU (gloo) gives the single-process table, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from surprise_monitor.calibrate import CalibrationTable
from surprise_monitor.calibrate.distributed import DistInfo, shard_dir
from surprise_monitor.calibrate.spill import AlphaSpill
from tests._checks import assert_same_table

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def image_folder(photo_folder):
    """Three classes of real-photo crops, 13, 12 and 11 images: 9 batches of 4 (last short)."""
    return photo_folder({"astronaut": 13, "chelsea": 12, "coffee": 11}, seed=1)


@pytest.fixture(scope="module")
def heldout_folder(photo_folder):
    """Other crops of the same three photos, 5 each: the alarm's conformal null."""
    return photo_folder({"astronaut": 5, "chelsea": 5, "coffee": 5}, seed=2)


def cli_args(image_folder: Path, weights: Path, heldout: Path, *extra: str) -> list[str]:
    return [
        "--model", "tests._models:TinyCNN", "--model-kwargs", json.dumps({"num_classes": 3}),
        "--weights", str(weights), "--data", str(image_folder), "--heldout", str(heldout),
        "--resize", "36", "--crop", "32", "--batch-size", "4", "--top-k", "4", "--quiet",
        "--device", "cpu", "--min-accuracy", "0", *extra,
    ]  # fmt: skip


# Run in one process (reference) and under torchrun (2 ranks): the CLI's code path with ranks
# sharing a spill folder, the approximate mode, and data so small that rank 1 gets no batch.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from surprise_monitor.calibrate import calibrate
    from surprise_monitor.calibrate.cli import main
    from surprise_monitor.calibrate.distributed import Comm, init_from_env
    from surprise_monitor.calibrate.options import RunOptions, TableOptions
    from surprise_monitor.calibrate.sketch import LogGrid
    from tests._models import TinyCNN, class_dataset, seeded
    from tests.calibrate.test_distributed import odd_tensors

    info, _, own = init_from_env("cpu")
    out = Path(sys.argv[1])
    got = Comm(info).broadcast_tensors(odd_tensors() if info.rank == 0 else None, 0)
    torch.save(got, out / f"broadcast-rank{info.rank}.pt")
    cli = json.loads(sys.argv[2])
    spill = ["--spill-dir", str(out / "spill")]
    assert main(cli + spill + ["--out", str(out / "cli-shared.safetensors")]) == 0
    model = seeded(TinyCNN(num_classes=3))
    data = class_dataset(70, 3)
    grid = LogGrid(0.02, 1e-6, 1e2)
    approx = calibrate(model, data, progress=False, table=TableOptions(top_k=3),
                       run=RunOptions(batch_size=4, approximate=grid))
    tiny = calibrate(model, class_dataset(3, 3), progress=False, table=TableOptions(top_k=2),
                     run=RunOptions(batch_size=4), heldout=class_dataset(7, 3, seed=5))
    tiny.save(out / f"tiny-rank{info.rank}.safetensors")  # rank 1's alarm came by broadcast
    from surprise_monitor.calibrate import DegenerateTableError
    blind = seeded(TinyCNN(num_classes=3))
    torch.nn.init.zeros_(blind.fc.weight)  # a zero-initialised head: alpha is 0 everywhere
    for mode, way in (("exact", False), ("approximate", grid)):
        try:
            calibrate(blind, data, progress=False, run=RunOptions(batch_size=4, approximate=way))
        except DegenerateTableError as exc:  # on every rank, none left waiting
            (out / f"degenerate-{mode}-rank{info.rank}.txt").write_text(str(exc))
    if info.rank == 0:
        approx.save(out / "approx.safetensors")
        tiny.save(out / "tiny.safetensors")
    if own:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    """
)


def odd_tensors() -> dict[str, torch.Tensor]:
    """Tensors a byte-exact broadcast must keep: NaN payloads, signed zeros, denormals,
    several dtypes, a 0-d, an empty and a non-contiguous tensor."""
    bits = torch.tensor([0x7FC00001, 0x7F800001, -0x00400001, 1], dtype=torch.int32)
    floats = torch.cat([bits.view(torch.float32), torch.tensor([-0.0, 1e-45, -3.5])])
    return {
        "floats": floats,
        "float64": torch.linspace(-1, 1, 7, dtype=torch.float64) / 3,
        "int64": torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4) * (1 << 40),
        "flags": torch.tensor([True, False, True]),
        "half": torch.tensor([1.5, -2.25], dtype=torch.bfloat16),
        "scalar": torch.tensor(7.25),
        "empty": torch.empty(0, 5),
        "transposed": torch.arange(12.0).reshape(3, 4).t(),
    }


def _raw(t: torch.Tensor) -> bytes:
    """A tensor's values as bytes (any dtype)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _sorted_rows(spills: list[AlphaSpill], c: int) -> tuple[np.ndarray, np.ndarray]:
    alpha = np.concatenate([s.read_alpha(c).read_rows(0, 1 << 30) for s in spills])
    index = np.concatenate([s.read_indices(c) for s in spills])
    order = np.argsort(index)
    return alpha[order], index[order]


def assert_same_alarm(a: CalibrationTable, b: CalibrationTable) -> None:
    """The alarm parts are equal: the same metadata, the same tensors byte for byte."""
    assert a.alarm is not None and b.alarm is not None
    assert a.alarm.metadata() == b.alarm.metadata()
    x, y = a.alarm.tensors(), b.alarm.tensors()
    assert sorted(x) == sorted(y)
    for name in x:
        assert x[name].dtype == y[name].dtype and x[name].shape == y[name].shape, name
        assert x[name].numpy().tobytes() == y[name].numpy().tobytes(), name


def test_torchrun_two_ranks_equal_one_process(image_folder, heldout_folder, tiny_weights, tmp_path):
    single, two = tmp_path / "single", tmp_path / "two"
    single.mkdir()
    two.mkdir()
    args = cli_args(image_folder, tiny_weights, heldout_folder)
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    # The reference: one plain process.
    _run([sys.executable, str(script), str(single), json.dumps(args)])
    # The command unchanged under torchrun; no shared folder, so rows are sent over gloo.
    _run(
        [
            *TORCHRUN,
            "-m",
            "surprise_monitor.calibrate",
            *args,
            "--out",
            str(two / "cli-send.safetensors"),
        ]
    )
    # The script under torchrun: a shared spill folder, approximate mode, an idle rank.
    _run([*TORCHRUN, str(script), str(two), json.dumps(args)])

    ref = CalibrationTable.load(single / "cli-shared.safetensors")
    assert int(ref.counts.sum()) == 36 and ref.counts.tolist() == [13, 12, 11]
    assert_same_table(ref, CalibrationTable.load(two / "cli-shared.safetensors"))
    assert_same_table(ref, CalibrationTable.load(two / "cli-send.safetensors"))
    assert_same_table(
        CalibrationTable.load(single / "tiny.safetensors"),
        CalibrationTable.load(two / "tiny.safetensors"),
    )
    # A degenerate table is refused on every rank, exact and approximate.
    for folder, ranks in ((single, 1), (two, 2)):
        for mode in ("exact", "approximate"):
            for r in range(ranks):
                text = (folder / f"degenerate-{mode}-rank{r}.txt").read_text()
                assert "alpha is constant for 100% of (class, filter) cells" in text
    # Comm.broadcast_tensors: every rank holds rank 0's tensors, dtype, shape and bytes.
    sent = odd_tensors()
    for r in range(2):
        got = torch.load(two / f"broadcast-rank{r}.pt", weights_only=True)
        assert list(got) == list(sent)
        for name, t in sent.items():
            assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
            assert _raw(got[name]) == _raw(t), name
    # The alarm part, made on rank 0 and broadcast: the head precision, the profile grids, the
    # score reference and both nulls, byte for byte, on every path.
    alarm = ref.alarm
    assert alarm is not None and alarm.head_precision is not None and alarm.profile_layers
    assert alarm.null_predicted is not None and alarm.null_predicted.scores.numel() == 15
    assert alarm.heldout["images"] == 15
    for name in ("cli-shared", "cli-send"):
        assert_same_alarm(ref, CalibrationTable.load(two / f"{name}.safetensors"))
    tiny = CalibrationTable.load(single / "tiny.safetensors")
    assert tiny.alarm is not None and tiny.alarm.null_labelled is not None
    for name in ("approx.safetensors", "tiny.safetensors", "tiny-rank1.safetensors"):
        assert_same_alarm(CalibrationTable.load(single / name.replace("-rank1", "")),
                          CalibrationTable.load(two / name))  # fmt: skip

    # The spilled values themselves: each rank holds its batches' rows, bit-identical to the
    # single process's; batches are dealt round-robin (rank 0: batches 0, 2, 4, 6, 8).
    one = [AlphaSpill(single / "spill", 16)]
    ranks = [AlphaSpill(shard_dir(two / "spill", DistInfo(r, 2)), 16) for r in range(2)]
    assert sorted(np.concatenate([s.read_indices(c) for c in range(3) for s in ranks[:1]])) == [
        i for b in (0, 2, 4, 6, 8) for i in range(4 * b, min(4 * b + 4, 36))
    ]
    for c in range(3):
        a1, i1 = _sorted_rows(one, c)
        a2, i2 = _sorted_rows(ranks, c)
        np.testing.assert_array_equal(i1, i2)
        assert a1.tobytes() == a2.tobytes()

    # Approximate mode: counts, extremes and exemplars merge exactly; means up to sum order.
    a = CalibrationTable.load(single / "approx.safetensors")
    b = CalibrationTable.load(two / "approx.safetensors")
    assert torch.equal(a.counts, b.counts) and torch.equal(a.top_indices, b.top_indices)
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(a.quantiles, b.quantiles, rtol=1e-6, atol=1e-9)


def test_a_finished_rank_leaves_with_its_output_flushed():
    """``_leave_rank`` ends the process at once (no teardown: an atexit handler never runs)
    with status 0, and what the rank printed or logged, unterminated lines included, is out."""
    code = (
        "import atexit, logging, sys\n"
        "from surprise_monitor.calibrate import cli\n"
        "atexit.register(lambda: print('teardown ran'))\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "logging.getLogger('x').info('logged')\n"
        "print('summary', end='')\n"
        "sys.stderr.write('warned')\n"
        "cli._leave_rank()\n"
        "print('not reached')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(), cwd=ROOT, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout == "summary"
    assert res.stderr == "logged\nwarned"
