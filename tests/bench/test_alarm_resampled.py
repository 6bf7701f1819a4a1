"""bench.alarms.resampled: the paired bootstrap of the done-when checks, on sets whose
verdicts are known by construction."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from bench.alarms import loo
from bench.alarms.resampled import CHECKS, pass_shares, resampled_checks

BASELINES = ("MSP", "MaxLogit", "Energy", "KNN", "Mahalanobis")


def _scores(rng: np.random.Generator, n: int, shift: dict[str, float]) -> dict[str, np.ndarray]:
    """Per-image scores of ``n`` images: every baseline and ``"mine"`` standard normal, moved
    up by ``shift[name]`` (0 where not named)."""
    return {k: rng.normal(size=n) + shift.get(k, 0.0) for k in ("mine", *BASELINES)}


def _sets(mine: float, logit: float, n: int = 150, seed: int = 0) -> dict:
    """A near-OOD, an MNIST, a noise and a nominal set judged against one reference of 300
    images: ``mine`` and the logit baselines shifted by ``mine`` / ``logit`` on the shifted
    sets; the nominal set the reference's own first ``n`` images, unchanged."""
    rng = np.random.default_rng(seed)
    reference = _scores(rng, 300, {})
    shift = {"mine": mine, **{b: logit for b in loo.LOGIT_BASELINES}}
    same = {k: v[:n] for k, v in reference.items()}
    return {
        "tinyimagenet": ("semantic", reference, _scores(rng, n, shift)),
        "mnist": ("far", reference, _scores(rng, n, shift)),
        "gaussian_noise_s1": ("noise", reference, _scores(rng, n, shift)),
        "hflip": ("nominal", same, {k: v.copy() for k, v in same.items()}),
    }


def test_the_auroc_is_the_oracle_s_on_the_unresampled_sets():
    """The AUROCs behind each verdict are scikit-learn's on the drawn images: with a score that
    separates perfectly, the MNIST set's AUROC is 1 in every draw, as scikit-learn gives it on
    the whole set."""
    sets = _sets(mine=50.0, logit=0.0)
    family, reference, found = sets["mnist"]
    labels = np.r_[np.zeros(300), np.ones(150)]
    assert roc_auc_score(labels, np.r_[reference["mine"], found["mine"]]) == 1.0
    verdicts = resampled_checks(sets, "mine", "m", resamples=20)
    assert all(v["mnist_min"] == 1.0 for v in verdicts)


def test_a_clear_winner_passes_every_draw_and_a_clear_loser_none():
    """A score far ahead of every baseline passes in every resample; one far behind the logit
    baselines misses the margins check in every resample."""
    win = pass_shares(resampled_checks(_sets(mine=3.0, logit=0.5), "mine", "m", resamples=30))
    assert win == {**dict.fromkeys(CHECKS, 1.0), "resamples": 30}
    lose = pass_shares(resampled_checks(_sets(mine=0.0, logit=2.0), "mine", "m", resamples=30))
    assert lose["within"] == 0.0 and lose["passed"] == 0.0 and lose["beats_half"] == 0.0


def test_the_nominal_set_is_drawn_with_its_unshifted_twin():
    """The nominal set equals its reference image for image, so a paired draw leaves its AUROC
    at exactly 0.5 every time; unpaired draws of 150 against 150 would stray by about 0.03."""
    verdicts = resampled_checks(_sets(mine=3.0, logit=0.5), "mine", "m", resamples=50)
    assert all(v["nominal_max"] == 0.0 for v in verdicts)


def test_every_score_is_judged_on_the_same_draw():
    """A score equal to the logit baselines (here all one score) on every image has their AUROC
    in every draw: the margins check always holds (margin 0) and it never beats them. Separate
    draws per score would miss the margin now and then and win about half the sets."""
    sets = _sets(mine=0.0, logit=1.0)
    for _, reference, found in sets.values():
        for name in ("mine", "MSP", "MaxLogit"):
            reference[name], found[name] = reference["Energy"].copy(), found["Energy"].copy()
    shares = pass_shares(resampled_checks(sets, "mine", "m", resamples=40))
    assert shares["within"] == 1.0 and shares["beats_half"] == 0.0


def test_the_shifted_sets_share_one_draw_of_their_base_images():
    """Two shifted sets of the same base images (here equal) get the same draw in every
    resample: in a close race they miss the margin together or not at all. Two far sets, whose
    images are their own, are drawn apart and part ways in some resamples."""
    sets = _sets(mine=0.0, logit=0.09, n=120)
    sets["gaussian_noise_s2"] = sets["gaussian_noise_s1"]
    sets["notmnist"] = sets["mnist"]
    verdicts = resampled_checks(sets, "mine", "m", resamples=200)
    missed = [set(v["missed"]) for v in verdicts]
    noise = [{"m/gaussian_noise_s1", "m/gaussian_noise_s2"} & m for m in missed]
    assert all(len(n) != 1 for n in noise) and any(noise) and not all(noise)
    far = [{"m/mnist", "m/notmnist"} & m for m in missed]
    assert any(len(f) == 1 for f in far)


def test_the_draws_are_reproducible_and_the_shares_count_them():
    """The same seed gives the same verdicts; a share is the fraction of draws that pass."""
    sets = _sets(mine=0.35, logit=0.3, n=60)
    a = resampled_checks(sets, "mine", "m", resamples=25, seed=3)
    assert a == resampled_checks(sets, "mine", "m", resamples=25, seed=3)
    shares = pass_shares(a)
    assert shares["passed"] == sum(v["passed"] for v in a) / 25
    assert 0.0 < shares["beats_half"] < 1.0  # a close race: some draws each way


def test_bad_input_is_refused():
    """References of different sizes for the non-nominal sets, or no verdicts, are errors."""
    sets = _sets(mine=1.0, logit=0.0)
    family, reference, found = sets["mnist"]
    sets["mnist"] = (family, {k: v[:200] for k, v in reference.items()}, found)
    with pytest.raises(ValueError, match="references differ in size"):
        resampled_checks(sets, "mine", "m", resamples=2)
    sets = _sets(mine=1.0, logit=0.0)
    family, reference, found = sets["gaussian_noise_s1"]
    sets["gaussian_noise_s1"] = (family, reference, {k: v[:100] for k, v in found.items()})
    with pytest.raises(ValueError, match="shifted sets differ in size"):
        resampled_checks(sets, "mine", "m", resamples=2)
    with pytest.raises(ValueError, match="no verdicts"):
        pass_shares([])
