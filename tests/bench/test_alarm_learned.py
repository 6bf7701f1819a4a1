"""bench.alarms.learned: the fits with each synthetic family held out against the library's
fit by hand, and the summary's checks against bench.alarms.loo's on a made-up result."""

from __future__ import annotations

import pytest
import torch

from bench.alarms import learned, loo
from surprise_monitor.calibrate.evidence_choice import SHIFT_FAMILIES
from surprise_monitor.calibrate.evidence_fit import fit_learned_evidence


def test_each_family_s_fit_leaves_out_exactly_its_shifts():
    g = torch.Generator().manual_seed(0)
    u = lambda: torch.rand(120, 3, generator=g) * 0.98 + 0.01  # noqa: E731
    clean = (u(), torch.zeros(120, 2))
    shifted = {name: (u() * (0.2 + 0.05 * i), None) for i, name in enumerate(SHIFT_FAMILIES)}
    fits = learned.fits(clean, shifted, 0.01)
    assert set(fits) == {None, *SHIFT_FAMILIES.values()}
    kept = {n: r for n, (r, _) in shifted.items() if SHIFT_FAMILIES[n] != "colour"}
    assert len(kept) == len(shifted) - 5  # grey, invert, channel order, brightness, saturation
    torch.testing.assert_close(
        fits["colour"].weights, fit_learned_evidence(clean[0], kept, 0.01).weights
    )
    every = fit_learned_evidence(clean[0], {n: r for n, (r, _) in shifted.items()}, 0.01)
    torch.testing.assert_close(fits[None].weights, every.weights)
    assert not torch.allclose(fits["colour"].weights, every.weights)


def _set(family: str, score: float, baselines: tuple[float, float, float, float]) -> dict:
    names = ("MSP", "MaxLogit", "Energy", "KNN")
    aurocs = {**dict(zip(names, baselines, strict=True)), **dict.fromkeys(learned.SCORES, score)}
    return {"family": family, "scores": {k: {"auroc": v, "fpr95": 0.5} for k, v in aurocs.items()}}


def test_the_summary_applies_loo_s_checks():
    result = {
        "model": "m", "table_evidence": "energy", "auto_choice": "energy",
        "worst_margin": {"energy": -0.01, "learned": -0.02},
        "sets": {
            "a": _set("geometry", 0.80, (0.70, 0.75, 0.78, 0.60)),  # beats every baseline
            "b": _set("occlusion", 0.70, (0.70, 0.72, 0.74, 0.60)),  # 0.04 behind: missed
            "mnist": _set("far", 0.96, (0.70, 0.75, 0.78, 0.90)),
            "flip": _set("nominal", 0.52, (0.5, 0.5, 0.5, 0.5)),
        },
    }  # fmt: skip
    s = learned.summary(result)[learned.TABLE]
    assert (s["beats"], s["beats_of"]) == (2, 3) and s["within"] is False
    assert s["worst_set"] == "b" and s["worst_margin"] == pytest.approx(0.70 - 0.74 + 0.03)
    assert s["mnist_min"] == pytest.approx(0.96) and s["nominal_max"] == pytest.approx(0.02)
    assert s["passed"] is False and s["missed"] == ["m/b"]
    text = learned.markdown({"m": result})
    assert "| m | table's evidence (energy) | 2 / 3 | -0.010 (b) | 0.960 | 0.020 | no |" in text
    assert "| m | -0.010 | -0.020 | energy |" in text
    assert loo.MNIST_TARGET == 0.95  # the far set above is the MNIST family's


def test_the_weight_is_chosen_on_the_other_models_selection_part():
    """Two made-up models: the learned evidence at weight 0.5 wins every set of model a's
    selection part, at 0.25 every set of b's; each rotation reports the other's choice."""
    labels = [*learned.FIXED, *(learned.weight_label(v, w) for v in ("learned", "learned+mass")
                                for w in learned.WEIGHTS)]  # fmt: skip

    def part(best: str) -> dict:
        aurocs = {**dict.fromkeys(labels, 0.70), best: 0.90}
        aurocs.update(MSP=0.75, MaxLogit=0.76, Energy=0.78, KNN=0.70)
        scores = {k: {"auroc": v, "fpr95": 0.5} for k, v in aurocs.items()}
        return {"x": {"family": "geometry", "scores": scores},
                "y": {"family": "blur", "scores": scores}}  # fmt: skip

    a_best, b_best = learned.weight_label("learned", 0.5), learned.weight_label("learned", 0.25)
    results = {
        m: {"sets": part(best), "parts": {"selection": part(best), "report": part(best)}}
        for m, best in (("a", a_best), ("b", b_best))
    }
    rotations = {r["held_out"]: r for r in learned.weight_rotations(results)}
    assert rotations["a"]["chosen"] == b_best and rotations["b"]["chosen"] == a_best
    # a's report part, scored with b's choice: 0.70 everywhere, 0.08 behind Energy
    assert rotations["a"]["summary"]["within"] is False and rotations["a"]["summary"]["beats"] == 0


def test_part_scores_judges_each_set_against_the_right_images(tmp_path, monkeypatch):
    import json

    import numpy as np

    from bench.alarms import collect, sets
    from surprise_monitor.calibrate.evidence_choice import CHOICE_IMAGES
    from surprise_monitor.monitor.atypicality import GATED_SCORE_NAME

    monkeypatch.setattr(collect, "folder", lambda name: tmp_path / name)
    monkeypatch.setattr(learned, "FAMILIES_RESULTS", tmp_path / "results")
    meta = {"hflip": {"family": "nominal"}, "grey_patch s1": {"family": "occlusion"}}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "m.json").write_text(
        json.dumps({"parts": {"selection": {"sets": meta}}})
    )
    kind = collect.table_kind(GATED_SCORE_NAME)
    (tmp_path / "m" / "sets" / kind).mkdir(parents=True)
    inlier = np.arange(CHOICE_IMAGES + 100, dtype=np.float64)  # image i scores i
    np.savez(tmp_path / "m" / "sets" / kind / "selection__cifar10.npz", score=inlier)
    judged = tmp_path / "m" / "families" / kind / "n4"
    judged.mkdir(parents=True)
    for name in meta:
        np.savez(judged / f"{sets.cache_stem('selection', name)}.npz", score=-np.ones(4))
    got = learned.part_scores("m", 4, "selection", lambda found, family: {"s": found["score"]})
    assert got["hflip"][0] == "nominal" and got["grey_patch s1"][0] == "occlusion"
    # the nominal set against its own base images unshifted (held-out images 500..503)
    np.testing.assert_array_equal(got["hflip"][1]["s"], inlier[CHOICE_IMAGES : CHOICE_IMAGES + 4])
    # a shifted set against the part's images the choice did not take (500..599)
    np.testing.assert_array_equal(got["grey_patch s1"][1]["s"], inlier[CHOICE_IMAGES:])
    np.testing.assert_array_equal(got["grey_patch s1"][2]["s"], -np.ones(4))
