"""bench.alarms.class_misses: the classes whose exact interval leaves out the rate; the table."""

from __future__ import annotations

import numpy as np

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


def test_resplits_report_every_null_rule_against_the_fixed_split_s_count():
    import torch

    rng = np.random.default_rng(0)
    classes = torch.from_numpy(rng.integers(0, 3, 1200))
    scores = torch.from_numpy(rng.random(1200)).float()
    halves = [(scores[:600], classes[:600]), (scores[600:], classes[600:])]
    out = cm.resplits(halves, 3, 0, 20)
    assert out["splits"] == 20 and set(out) == {"splits", *cm.NULL_RULES}
    for rule in cm.NULL_RULES:
        assert out[rule]["at_least_seen_share"] == 1.0  # every split has >= 0 misses
        assert 0.0 <= out[rule]["pass_share"] <= 1.0 and out[rule]["mean_misses"] >= 0.0
    assert cm.resplits(halves, 3, 4, 20)["per_class"]["at_least_seen_share"] == 0.0  # 3 classes


def test_the_chance_table_names_the_classes_whose_halves_differ_for_both_scores():
    def model(ks_default: list, ks_energy: list, pass_share: float) -> dict:
        """One model's results, as run_model writes them."""
        rule = {"mean_misses": 1.0, "pass_share": pass_share, "at_least_seen_share": 0.25}
        return {"default": {"misses": [{"class": 1, "alarms": 0, "inputs": 449}]},
                "oracle": {"expected_misses": 0.24, "pass_probability": 0.8},
                "resplits": {"splits": 10, "per_class": rule,
                             "pooled": {**rule, "mean_misses": 2.0},
                             "standardised": {**rule, "mean_misses": 1.5}},
                "halves_ks": {"default": ks_default, "energy": ks_energy},
                "classes": 3, "class_names": ["a", "cat", "bird"]}  # fmt: skip

    table = cm.chance_markdown({"m1": model([0.5, 0.01, 0.02], [0.5, 0.03, 0.2], 0.5),
                                "m2": model([0.9, 0.9, None], [0.9, 0.9, None], 0.4)})  # fmt: skip
    rows = table.splitlines()
    assert rows[2] == ("| m1 | 1 | 0.24, 0.80 | 1.00, 0.50, 0.250 | 2.00 / 1.50 | "
                       "cat (0.01, 0.03) |")  # fmt: skip
    assert rows[3].endswith("| none |")
    assert rows[-1] == ("Every model passes: 0.64 with known thresholds, 0.200 with per-class "
                        "nulls (re-splits).")  # fmt: skip
