"""bench.paper.failures: flag counts and the silent most-surprising filter, by hand."""

from __future__ import annotations

import torch

from bench.paper.failures import flag_counts, flags_of, silent_most_surprising


def test_silent_surprise_by_hand():
    rep = {  # three images, three filters
        "alpha": torch.tensor([[0.0, 2.0, 1.0], [0.5, 0.0, 3.0], [1.0, 1.0, 1.0]]),
        "mu": torch.tensor([[-5.0, 1.0, 0.0], [0.0, -1.0, 4.0], [0.0, 0.0, 0.0]]),
        "surprise": torch.tensor([[True, True, False], [True, True, False], [False] * 3]),
        "expectation": torch.tensor([[False] * 3, [False, False, True], [False] * 3]),
        "logits": torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]),
    }
    # image 0: deviations 5 (silent filter 0) and 1 -> silent; image 1: 0.5 and 1 (silent
    # filter 1) -> silent; image 2: nothing flagged
    assert silent_most_surprising(rep).tolist() == [True, True, False]
    assert flags_of(rep, "surprise").tolist() == [[False, True, False], [True, False, False],
                                                  [False] * 3]  # fmt: skip
    counts = flag_counts(rep, torch.tensor([0, 1, 0]))  # image 0 and 1 wrong, 2 right
    assert counts["silent_wrong"]["rate"] == 1.0 and counts["silent_wrong"]["n"] == 2
    assert counts["silent_correct"]["n"] == 0 and counts["expectation_wrong"]["rate"] == 0.5
    # one silent flagged filter in each failure (0 in image 0, 1 in image 1), none in image 2
    assert counts["silent_wrong_mean_filters"] == 1.0
    assert counts["silent_correct_mean_filters"] == 0.0


def test_p999_below_zero_share_by_hand():
    from types import SimpleNamespace

    from bench.paper.failures import p999_below_zero

    p999 = torch.tensor([[-0.1, 0.0, 0.2], [0.5, -2.0, 0.0]])  # [2 classes, 3 filters]
    table = SimpleNamespace(value_at=lambda pct: p999 if pct == 99.9 else None)
    assert p999_below_zero(table) == 2 / 6


def test_strongest_class_is_where_the_filter_contributes_most():
    from types import SimpleNamespace

    from bench.paper.failures import strongest_class

    nan = float("nan")
    top = torch.tensor(
        [[[0.1, 0.0], [nan, nan]], [[0.3, 0.2], [0.5, 0.1]], [[0.2, 0.1], [nan, nan]]]
    )
    table = SimpleNamespace(top_alpha=top)  # [3 classes, 2 filters, 2 exemplars]
    assert strongest_class(table, 0) == 1 and strongest_class(table, 1) == 1


def test_expected_filters_pictured_only_where_the_class_fires_them():
    # filter 0 expected with mu > 0 (the class's images fire it: exemplars with regions);
    # filter 1 expected with mu < 0 (above the mean of mu, but the class's images never give it
    # a positive contribution: its exemplars would all have alpha 0 and no region)
    rep = {
        "alpha": torch.tensor([[-1.0, -2.0, 0.5]]),
        "mu": torch.tensor([[0.3, -0.1, -4.0]]),
        "expectation": torch.tensor([[True, True, False]]),
        "surprise": torch.tensor([[False] * 3]),
    }
    assert flags_of(rep, "expectation").tolist() == [[True, False, False]]
