"""bench.alarms.alarm_kinds: each alarm's kind is the family of its smallest family p-value,
the table's shares, and the pixel check against numpy and on sets it must tell apart or not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.alarms import alarm_kinds as ak
from surprise_monitor.monitor.families import family_columns

NAMES = ["expectation_mass", "stage_energy:a", "energy", "stage_distance:a", "stage_distance:h",
         "head_distance:h", "knn_distance:h"]  # fmt: skip


def test_only_alarms_are_counted_by_kind_and_by_every_family_past_the_rate():
    """Class evidence smallest; low level smallest with features past the rate too; a tie
    broken by the smallest rank (features); an input that did not alarm is left out."""
    family_p = torch.tensor([
        [0.001, 0.3, 0.2],
        [0.2, 0.0005, 0.008],
        [0.0002, 0.5, 0.0002],
        [0.0001, 0.0001, 0.0001],
    ])  # fmt: skip
    ranks = torch.full((4, len(NAMES)), 0.5)
    ranks[2, 6] = 1e-6  # the KNN distance: the tie goes to features
    p = np.array([0.004, 0.01, 0.002, 0.5])
    counts = ak.empty_counts()
    ak.tally(counts, p, family_p, ranks, family_columns(NAMES), 0.01)
    assert counts == {
        "alarms": 3,
        "kinds": {"class_evidence": 1, "low_level": 1, "features": 1},
        "significant": {"class_evidence": 2, "low_level": 1, "features": 2},
    }


def test_the_tables_give_each_family_s_alarms_and_shares():
    geometry = {"alarms": 4, "kinds": {"class_evidence": 1, "low_level": 2, "features": 1},
                "significant": {"class_evidence": 4, "low_level": 2, "features": 0}}  # fmt: skip
    far = {"alarms": 3, "kinds": {"class_evidence": 0, "low_level": 0, "features": 3},
           "significant": {"class_evidence": 0, "low_level": 3, "features": 3}}  # fmt: skip
    results = {"vgg_plain": {"geometry": geometry, "far": far}}
    for key, first, last in (("kinds", "4: 25 / 50 / 25", "3: 0 / 0 / 100"),
                             ("significant", "4: 100 / 50 / 0", "3: 0 / 100 / 100")):  # fmt: skip
        row = next(line for line in ak.markdown(results, key).splitlines()
                   if line.startswith("| VGG (no BN) |"))  # fmt: skip
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == first
        assert cells[ak.SHIFTS.index("far") + 1] == last
        assert cells[ak.SHIFTS.index("blur") + 1] == "0"


def test_the_pixel_statistics_of_flat_and_striped_images():
    flat = np.full((1, 32, 32, 3), 51, np.uint8)  # grey 0.2
    stripes = np.zeros((1, 32, 32, 3), np.uint8)
    stripes[:, :, (np.arange(32) // 2) % 2 == 0, 0] = 255  # red pairs of columns on black
    s = ak.pixel_statistics(np.concatenate([flat, stripes]))
    assert s.shape == (2, 19)
    np.testing.assert_allclose(s[0, :3], 0.2, rtol=1e-5)  # channel means
    np.testing.assert_allclose(s[0, 3:12], 0.0, atol=1e-5)  # spreads and gradients
    assert (s[0, 12:16] < np.log(1e-6)).all()  # no power off the zero frequency
    np.testing.assert_allclose(s[1, :6], [0.5, 0, 0, 0.5, 0, 0], atol=1e-6)
    np.testing.assert_allclose(s[1, 6:9], [15 / 31, 0, 0])  # red changes every 2 columns
    np.testing.assert_allclose(s[1, 9:12], 0.0)  # and never down a column
    assert s[1, 14] == s[1, 12:16].max()  # a period of 4 pixels: the band of radius 6..10
    assert s[0, 16] == 0.0 and s[1, 16] == pytest.approx(0.5 / (1 + 1e-3))  # saturation
    np.testing.assert_allclose(s[1, 17:], [5 / 6, 1 / 6])  # dark and bright shares


def _images(n: int, seed: int, gain: float) -> np.ndarray:
    """``n`` smooth random images, their pixel values times ``gain``."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(40, 200, (n, 8, 8, 3))
    return np.clip(coarse.repeat(4, 1).repeat(4, 2) * gain, 0, 255).astype(np.uint8)


def test_the_pixel_check_tells_a_brighter_camera_apart_and_not_the_same_one():
    cifar = _images(10000, 0, 1.0)
    same = ak.pixel_check({"selection": _images(300, 1, 1.0), "report": _images(300, 2, 1.0)},
                          cifar)  # fmt: skip
    brighter = {"selection": _images(300, 3, 1.25), "report": _images(300, 4, 1.25)}
    assert abs(ak.pixel_auroc(same) - 0.5) < 0.06
    assert ak.pixel_auroc(ak.pixel_check(brighter, cifar)) > 0.95
    # as many of the same camera's images look like CIFAR-10 as CIFAR-10's own (90%)
    assert abs(ak.cifar_like(same).mean() - 0.9) < 0.05


def test_cifar_like_is_below_the_share_of_cifar_s_own_scores():
    scores = {"cifar": np.arange(100.0), "set": np.array([-1.0, 50.0, 89.1, 89.2, 200.0])}
    assert ak.cifar_like(scores).tolist() == [True, True, True, False, False]
