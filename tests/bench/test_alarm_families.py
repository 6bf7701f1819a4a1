"""bench.alarms.families end to end on a tiny model and the fake data folder: every family set
of both parts scored by every candidate and baseline, in the format bench.alarms.loo reads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.alarms import collect, families, loo, sets
from bench.alarms.combine import CANDIDATES, GATED_CANDIDATES
from bench.alarms.scores import BASELINES
from tests._models import tiny_vgg_bn


@pytest.fixture()
def tiny_alarm_model(fake_data, tmp_path, monkeypatch):
    """A tiny VGG-BN trained a few steps on the fake CIFAR-10, as the benchmark's model; the
    cache in a temporary folder; the null from test images 0..19."""
    monkeypatch.setenv("SURPRISE_MONITOR_CACHE", str(tmp_path / "cache"))
    model = tiny_vgg_bn(fake_data, steps=20)
    monkeypatch.setattr(collect, "load_model", lambda name: model)
    monkeypatch.setattr(collect, "HELDOUT", range(0, 20))
    monkeypatch.setattr(families, "training_record", lambda name: {"fake": True})
    # the fake CIFAR-10 has classes 0, 2, 4, 6 only; pytorch-ood's Mahalanobis wants 0..K-1
    fit = families.Baselines
    monkeypatch.setattr(families, "Baselines",
                        lambda f, y: fit(f, np.unique(y, return_inverse=True)[1]))  # fmt: skip
    return model


def test_every_family_set_is_scored_by_every_candidate_and_baseline(tiny_alarm_model, tmp_path):
    pytest.importorskip("skimage")
    out = tmp_path / "results"
    assert families.main(["--models", "tiny", "--n", "4", "--out", str(out)]) == 0
    data = json.loads((out / "tiny.json").read_text())
    names = sets.families()
    want = {s for group in names.values() for s in group}
    for part in sets.PARTS:
        got = data["parts"][part]["sets"]
        assert set(got) == want
        for name, entry in got.items():
            assert name in names[entry["family"]]
            scores = entry["scores"]
            every = (*CANDIDATES, *GATED_CANDIDATES)
            assert set(scores) == {families.LIBRARY, *(c.name for c in every), *BASELINES}
            aurocs = np.array([v["auroc"] for v in scores.values()])
            assert ((aurocs >= 0) & (aurocs <= 1)).all() and 0 <= entry["alarm_rate"] <= 1
    aurocs = loo.read_results([out / "tiny.json"])
    assert set(aurocs["tiny"]["report"]) == want
    # the judged sets are cached: a second run reads them (same figures)
    again = families.run_model("tiny", 4, lambda msg: None)
    first = data["parts"]["report"]["sets"]["mnist"]["scores"][families.LIBRARY]["auroc"]
    assert again["parts"]["report"]["sets"]["mnist"]["scores"][families.LIBRARY]["auroc"] == first


def test_the_library_s_gated_score_judges_the_sets_in_both_variants(tiny_alarm_model, tmp_path):
    pytest.importorskip("skimage")
    from surprise_monitor.monitor.atypicality import GATED_SCORE_NAME

    got = families.run_model("tiny", 4, lambda msg: None, score=GATED_SCORE_NAME)
    assert got["score"] == GATED_SCORE_NAME
    entry = got["parts"]["report"]["sets"]["mnist"]["scores"]
    variants = ("energy", "energy+mass", "energy+knn", "energy+mass+knn")  # a KNN bank: all
    assert set(entry) == {*(f"library {v}" for v in variants), *BASELINES}
    # the variant the table was calibrated with (energy, the default) is the monitor's score
    model = tiny_alarm_model
    table = collect.table_of("tiny", model, lambda msg: None, GATED_SCORE_NAME)
    assert table.alarm.score == GATED_SCORE_NAME and table.alarm.evidence == "energy"
    kind = collect.table_kind(GATED_SCORE_NAME)
    path = collect.folder("tiny") / "sets" / kind / "report__cifar10.npz"  # mostly not gated
    with np.load(path) as d:
        found = {k: d[k] for k in d.files}
    scores = families.library_scores(found, table, families.Baselines(
        *collect.train_features("tiny", model)))  # fmt: skip
    np.testing.assert_allclose(scores["library energy"], found["score"], rtol=1e-6)
    assert not np.allclose(scores["library energy+mass"], found["score"])


def test_the_selection_part_shifts_the_images_after_the_choice_images(
    tiny_alarm_model, monkeypatch
):
    pytest.importorskip("skimage")
    from surprise_monitor.monitor.atypicality import GATED_SCORE_NAME

    calls: list[tuple[dict, dict]] = []  # (the reference's scores, the set's), in order
    detection = families.detection

    def spy(inlier: dict, outlier: dict) -> dict:
        calls.append((inlier, outlier))
        return detection(inlier, outlier)

    monkeypatch.setattr(families, "detection", spy)
    got = families.run_model("tiny", 4, lambda msg: None, score=GATED_SCORE_NAME)
    kind = collect.table_kind(GATED_SCORE_NAME)
    folder = collect.folder("tiny") / "families" / kind / "n4"
    # the selection part's shifted sets are cached under their base's start (5: the fixture's)
    assert (folder / "selection-from5__grey_patch_s1.npz").is_file()
    assert not (folder / "selection__grey_patch_s1.npz").exists()
    assert (folder / "report__grey_patch_s1.npz").is_file()
    # a nominal set is judged against its own base images unshifted: the part's images 5..8;
    # a shifted set against all 20
    names = list(got["parts"]["selection"]["sets"])  # the selection part's sets come first
    grey, _ = calls[names.index("grey_patch s1")]
    flipped, _ = calls[names.index("hflip")]
    assert len(grey["library energy"]) == 20
    np.testing.assert_array_equal(flipped["library energy"], grey["library energy"][5:9])
