"""The top level: ``from surprise_monitor import calibrate`` is the calibration package, callable
as the function, so ``calibrate(model, data)`` works and every dotted path into the package
(``import surprise_monitor.calibrate.cli as cli``, patch targets) still finds its modules.

Import order matters (the name used to be rebound to the function after the package had been
imported), so the import checks run in a fresh interpreter each."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import surprise_monitor
from surprise_monitor.calibrate import builder
from tests._checks import assert_same_table
from tests._models import class_dataset, trained_tiny_cnn

ROOT = Path(__file__).resolve().parents[1]


def run_fresh(code: str) -> str:
    """Run ``code`` in a new interpreter from a folder outside the checkout; its stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=120, cwd=ROOT.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize(
    "first",
    ["import surprise_monitor", "from surprise_monitor import calibrate",
     "import surprise_monitor.calibrate.builder"],
)  # fmt: skip
def test_dotted_imports_into_the_package_work_after_the_top_level(first):
    out = run_fresh(f"""
        {first}
        import sys
        import surprise_monitor.calibrate.cli as cli
        import surprise_monitor.calibrate.plan as plan
        from surprise_monitor import calibrate
        package = sys.modules["surprise_monitor.calibrate"]
        print(cli.__name__, plan.__name__, calibrate is package, callable(calibrate))
    """)
    assert out.split() == [
        "surprise_monitor.calibrate.cli", "surprise_monitor.calibrate.plan", "True", "True"
    ]  # fmt: skip


def test_a_dotted_patch_target_resolves_through_the_package(monkeypatch):
    monkeypatch.setattr("surprise_monitor.calibrate.builder.shortened", lambda *a: "patched")
    assert builder.shortened([1, 2]) == "patched"


def test_the_package_called_is_the_function():
    calibrate = surprise_monitor.calibrate
    assert inspect.signature(calibrate) == inspect.signature(builder.calibrate)
    assert "calibrate" in surprise_monitor.__all__
    with pytest.raises(TypeError, match=r"batch_size= is now run=RunOptions\(batch_size=\.\.\.\)"):
        calibrate(trained_tiny_cnn(), class_dataset(30, 3), batch_size=8)
    model, data = trained_tiny_cnn(num_classes=3, seed=1), class_dataset(90, 3, seed=1)
    called = calibrate(model, data, progress=False, alarm=False)
    direct = builder.calibrate(model, data, progress=False, alarm=False)
    assert called.num_filters == direct.num_filters and called.num_classes == 3
    assert_same_table(called, direct)
