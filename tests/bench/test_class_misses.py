"""bench.alarms.class_misses: the classes whose exact interval leaves out the rate; the table."""

from __future__ import annotations

from bench.alarms import class_misses as cm


def _entry(c: int, alarms: int, low: float, high: float) -> dict:
    """A per-class entry of ``learned.alarm_rates``."""
    return {"class": c, "alarms": alarms, "inputs": 500, "ci_low": low, "ci_high": high,
            "null_size": 450}  # fmt: skip


def test_only_classes_whose_interval_leaves_out_the_rate_miss():
    per = [_entry(0, 5, 0.003, 0.023), _entry(1, 15, 0.017, 0.049), _entry(2, 0, 0.0, 0.0074)]
    assert cm.misses(per) == [{"class": 1, "alarms": 15, "inputs": 500},
                              {"class": 2, "alarms": 0, "inputs": 500}]  # fmt: skip


def test_the_table_names_each_missing_class_and_chance_s_count():
    results = {"vgg_bn": {
        "default": {"rate": 0.0114, "misses": [{"class": 2, "alarms": 14, "inputs": 480}]},
        "energy": {"rate": 0.0102, "misses": []},
        "expected_misses": 1.02, "classes": 10, "class_names": ["a", "b", "bird"],
    }}  # fmt: skip
    row = cm.markdown(results).splitlines()[2]
    assert row == "| vgg_bn | 1.14%: 1 (bird 14/480) | 1.02%: 0 | 1.02 of 10 |"
