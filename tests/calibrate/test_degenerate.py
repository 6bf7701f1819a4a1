"""A table whose alpha is constant for most filters (a zero-initialised or dead head, the wrong
layer) is refused with the shares and the likely causes, on the exact and the approximate path
and from the command line; ``allow_degenerate`` / ``--allow-degenerate`` keeps it with a
warning. Normal models are unaffected."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from surprise_monitor import SurpriseMonitorError
from surprise_monitor.calibrate import (
    CalibrationTable,
    DegenerateTableError,
    RunOptions,
    TableOptions,
    calibrate,
)
from surprise_monitor.calibrate.cli import main
from surprise_monitor.calibrate.degenerate import AlphaSpread
from tests._models import ColourNet, TinyCNN, class_dataset, seeded

LOGGER = "surprise_monitor.calibrate.degenerate"


def zero_head() -> TinyCNN:
    """A seeded TinyCNN whose classifier weights are zero (as torchvision's ViT head starts):
    no class score depends on any filter, so alpha is 0 for every image."""
    model = seeded(TinyCNN(num_classes=3))
    torch.nn.init.zeros_(model.fc.weight)
    return model


@pytest.mark.parametrize("approximate", [False, True], ids=["exact", "approximate"])
def test_a_zero_initialised_head_is_refused_naming_the_shares_and_causes(approximate):
    run = RunOptions(batch_size=8, approximate=approximate)
    with pytest.raises(DegenerateTableError) as raised:
        calibrate(zero_head(), class_dataset(30, 3), progress=False, run=run)
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, SurpriseMonitorError)
    text = str(raised.value)
    assert text.startswith("calibration refused: at layer ")
    assert (
        "alpha is constant for 100% of (class, filter) cells (16 of 16 filters in every class); "
        "100% of alphas are 0: every percentile of the table ties"
    ) in text
    for cause in ("zero-initialised layer", "untrained or dead classifier head",
                  "the class score does not depend on", "try another with layer="):  # fmt: skip
        assert cause in text
    assert text.endswith("table=TableOptions(allow_degenerate=True).")


def test_allow_degenerate_keeps_the_table_with_a_warning(caplog):
    keep = TableOptions(allow_degenerate=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        table = calibrate(zero_head(), class_dataset(30, 3), progress=False, table=keep,
                          heldout=class_dataset(12, 3, seed=3))  # fmt: skip
    assert bool((table.quantiles == 0).all()) and table.alarm is not None
    warned = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warned) == 1 and "100% of alphas are 0" in warned[0]
    assert warned[0].endswith("kept as asked (allow_degenerate)")


def test_normal_models_are_not_degenerate(calibrated, caplog):
    _, table = calibrated  # a trained TinyCNN
    spread = AlphaSpread.of(table)
    assert not spread.degenerate and spread.flat_filters < spread.filters // 2
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        seeded_table = calibrate(seeded(TinyCNN(num_classes=3)), class_dataset(30, 3),
                                 progress=False, alarm=False)  # fmt: skip
        one_each = calibrate(seeded(TinyCNN(num_classes=3)), class_dataset(3, 3),
                             progress=False, alarm=False)  # one image per class  # fmt: skip
    assert AlphaSpread.of(seeded_table).constant_cells == 0
    assert not AlphaSpread.of(one_each).degenerate
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_a_head_that_reads_one_filter_per_class_is_not_degenerate():
    """ColourNet: class c depends on filter c only, so two cells in three are constant (0), but
    every filter varies for its own class."""
    table = calibrate(ColourNet().eval(), class_dataset(30, 3), layer="conv", progress=False,
                      alarm=False)  # fmt: skip
    spread = AlphaSpread.of(table)
    assert (spread.constant_cells, spread.cells, spread.flat_filters) == (6, 9, 0)
    assert not spread.degenerate


def test_the_command_line_refuses_it_and_allow_degenerate_writes_it(tmp_path, capsys, caplog):
    from tests._models import write_colour_folder

    folder = write_colour_folder(tmp_path / "colours")
    weights = tmp_path / "zero-head.pt"
    torch.save(zero_head().state_dict(), weights)
    out = tmp_path / "t.safetensors"
    args = [
        "--model", "tests._models:TinyCNN", "--model-kwargs", json.dumps({"num_classes": 3}),
        "--weights", str(weights), "--data", str(folder), "--out", str(out), "--resize", "0",
        "--crop", "0", "--accuracy-images", "0", "--no-alarm", "--quiet",
    ]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # info lines may come first
    assert err.startswith("surprise-calibrate: error: calibration refused: at layer ")
    assert "alpha is constant for 100% of (class, filter) cells" in err
    assert "100% of alphas are 0" in err and "try another with --layer" in err
    assert err.endswith("Keep such a table anyway with --allow-degenerate.")
    assert not out.exists()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert main([*args, "--allow-degenerate"]) == 0
    assert CalibrationTable.load(out).num_classes == 3
    assert any("kept as asked" in r.getMessage() for r in caplog.records if r.name == LOGGER)
