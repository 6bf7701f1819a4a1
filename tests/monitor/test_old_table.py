"""A table written by the code before the package rename (commit 30882bc, top-level packages
``monitor`` / ``calibrate``) loads with today's code and judges the same inputs the same way.

``tests/data/make_old_table.py`` made the table, the model's weights and the old code's results.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from surprise_monitor import CalibrationTable, SurpriseMonitor, Thresholds
from tests._models import TinyCNN

DATA = Path(__file__).resolve().parents[1] / "data"


def test_a_table_written_before_the_rename_loads_and_judges_as_it_did():
    table = CalibrationTable.load(DATA / "old_table.safetensors")
    assert table.class_output == "logit" and table.layer == "features.2"
    assert table.alarm is not None and table.alarm.null_predicted is not None
    model = TinyCNN(num_classes=3)
    model.load_state_dict(load_file(DATA / "old_model.safetensors"))
    model.eval()
    old = json.loads((DATA / "old_results.json").read_text())
    x = torch.tensor(old["inputs"]["images"])
    y = torch.tensor(old["inputs"]["labels"])
    # the old code's p-values were the conservative ones (the default interpolates since stop 40)
    with SurpriseMonitor(model, table, thresholds=Thresholds(p_values="conservative")) as monitor:
        reports = {"predicted": monitor.inspect(x), "labelled": monitor.inspect(x, y)}
    with SurpriseMonitor(model, table) as monitor:
        now = monitor.inspect(x)
    n = table.alarm.null_predicted.size
    conservative = reports["predicted"].p_value
    assert (now.p_value <= conservative + 1e-7).all()  # within one gap of the old p-value
    assert (now.p_value >= conservative - 1 / (n + 1) - 1e-7).all()
    assert torch.equal(now.score, reports["predicted"].score)
    for name, report in reports.items():
        want = old[name]
        assert report.classes.tolist() == want["classes"], name
        assert report.alarm.tolist() == want["alarm"], name
        for field in ("alpha", "percentile", "beta", "score", "p_value"):
            got = getattr(report, field).double()
            torch.testing.assert_close(
                got, torch.tensor(want[field], dtype=torch.float64), rtol=1e-6, atol=1e-6,
                msg=f"{name}.{field}",
            )  # fmt: skip
