"""``AlarmOptions(score="auto")``: the gated score where the stage distances have enough
reference images per channel, the Fisher score otherwise (said in the log)."""

from __future__ import annotations

import logging

import pytest

from surprise_monitor.calibrate import calibrate
from surprise_monitor.calibrate.options import AlarmOptions, RunOptions
from surprise_monitor.calibrate.score_choice import (
    AUTO_SCORE,
    STAGE_IMAGES_PER_CHANNEL,
    choose_score,
)
from surprise_monitor.monitor.atypicality import FISHER_SCORE_NAME, GATED_SCORE_NAME
from tests._models import TinyCNN, class_dataset, seeded


def test_the_rule_counts_images_per_channel_of_the_widest_layer():
    need = STAGE_IMAGES_PER_CHANNEL * 64
    assert choose_score(AUTO_SCORE, [16, 64], need)[0] == GATED_SCORE_NAME
    score, why = choose_score(AUTO_SCORE, [16, 64], need - 1)
    assert score == FISHER_SCORE_NAME
    assert f"rest on {need - 1} reference images for 64 channels (they need {need}" in why
    assert choose_score(AUTO_SCORE, [], 10**6)[0] == FISHER_SCORE_NAME  # no layer tapped
    for named in (FISHER_SCORE_NAME, GATED_SCORE_NAME):  # a named score is kept
        assert choose_score(named, [512], 3) == (named, "named")


@pytest.mark.parametrize(("reference", "want"), [(40, FISHER_SCORE_NAME), (200, GATED_SCORE_NAME)])
def test_auto_follows_the_reference_images_and_says_so(reference, want, caplog):
    """TinyCNN's widest tapped layer has 16 channels: 20 profile images (half of 40) are too
    few for the stage distances, 100 are enough."""
    model = seeded(TinyCNN(num_classes=3)).eval()
    data = class_dataset(240, 3)
    with caplog.at_level(logging.INFO, logger="surprise_monitor.calibrate"):
        table = calibrate(
            model, data, progress=False, run=RunOptions(batch_size=40),
            alarm=AlarmOptions(reference_images=reference),
        )  # fmt: skip
    assert table.alarm.score == want
    assert f"alarm score {want} (--alarm-score auto)" in caplog.text
    fell_back = [r for r in caplog.records if "--alarm-score auto" in r.getMessage()]
    assert [r.levelname for r in fell_back] == (
        ["WARNING"] if want == FISHER_SCORE_NAME else ["INFO"]
    )


def test_a_named_gated_score_on_too_few_images_is_kept_with_a_warning(caplog):
    model = seeded(TinyCNN(num_classes=3)).eval()
    with caplog.at_level(logging.WARNING, logger="surprise_monitor.calibrate"):
        table = calibrate(
            model, class_dataset(240, 3), progress=False,
            alarm=AlarmOptions(reference_images=40, score=GATED_SCORE_NAME),
        )  # fmt: skip
    assert table.alarm.score == GATED_SCORE_NAME
    assert "the stage distances would rest on 20 reference images for 16 channels" in caplog.text


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"gate_level": 0.005}, "--gate-level / gate_level 0.005: the fisher-profile-v2 score"),
        ({"evidence": "learned"}, "--alarm-evidence / evidence learned: the fisher-profile-v2"),
        ({}, None),
    ],
)
def test_gated_options_on_a_fisher_table_are_said_to_do_nothing(options, said, caplog):
    """``auto`` falls back to the Fisher score on 40 reference images: a gate level or an
    evidence variant asked for does nothing there, and the log says so (and only then)."""
    model = seeded(TinyCNN(num_classes=3)).eval()
    with caplog.at_level(logging.WARNING, logger="surprise_monitor.calibrate"):
        table = calibrate(
            model, class_dataset(240, 3), progress=False,
            alarm=AlarmOptions(reference_images=40, **options),
        )  # fmt: skip
    assert table.alarm.score == FISHER_SCORE_NAME
    assert ("so this does nothing" in caplog.text) == (said is not None)
    if said is not None:
        assert said in caplog.text
