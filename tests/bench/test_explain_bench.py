"""The pointing benchmark's helpers (bench/explain): artefacts land where their masks say, the
pointing and mass metrics, and the Wilson interval; no model or data needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import cifar
from bench.explain import artefacts, metrics, report
from bench.explain.methods import random_superpixel_chance


@pytest.mark.parametrize("kind", list(artefacts.KINDS))
def test_artefact_changes_pixels_only_inside_its_mask(kind):
    rng = np.random.default_rng(0)
    image = rng.uniform(0.2, 0.8, (32, 32, 3)).astype(np.float32)
    donor = rng.uniform(0.0, 1.0, (32, 32, 3)).astype(np.float32)
    out, mask = artefacts.KINDS[kind](image, np.random.default_rng(1), donor)
    assert out.shape == image.shape and mask.shape == (32, 32) and mask.dtype == bool
    changed = (out != image).any(axis=2)
    assert changed.any() and not (changed & ~mask).any()
    side = {"patch of another image": 8, "magenta square": 8, "checker sticker": 10,
            "dead pixels": 6, "local blur": 10, "watermark": 12}[kind]  # fmt: skip
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    assert mask.sum() == side * side and len(rows) == len(cols) == side
    inside = out[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    if kind == "magenta square":
        assert np.array_equal(inside, np.broadcast_to([1.0, 0.0, 1.0], inside.shape))
    elif kind == "checker sticker":
        assert (
            set(np.unique(inside)) == {0.0, 1.0} and inside[0, 0, 0] == 0 and inside[0, 2, 0] == 1
        )
    elif kind == "dead pixels":
        assert not inside.any()
    elif kind == "patch of another image":
        windows = np.lib.stride_tricks.sliding_window_view(donor, (8, 8, 3))[..., 0, :, :, :]
        assert (windows == inside).all(axis=(2, 3, 4)).any()
    elif kind == "watermark":
        glyph = artefacts.glyph(12)
        src = image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        assert np.allclose(inside[glyph], 0.5 * src[glyph] + 0.5) and np.array_equal(
            inside[~glyph], src[~glyph]
        )


def test_positions_are_random_and_seeded():
    image = np.full((32, 32, 3), 0.5, dtype=np.float32)
    masks = [artefacts.magenta(image, np.random.default_rng(s), image)[1] for s in range(5)]
    again = artefacts.magenta(image, np.random.default_rng(0), image)[1]
    assert np.array_equal(masks[0], again) and len({m.tobytes() for m in masks}) > 1


def test_normalise_matches_to_tensor():
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    want = cifar.to_tensor(images)
    got = torch.stack([artefacts.normalise(p) for p in artefacts.pixels(images)])
    assert torch.allclose(got, want, atol=1e-6)


def test_pointing_and_mass_share():
    mask = np.zeros((4, 4), dtype=bool)
    mask[1:3, 1:3] = True
    saliency = np.zeros((4, 4))
    saliency[2, 2], saliency[0, 0] = 3.0, 1.0
    assert metrics.pointing_hit(saliency, mask) and metrics.mass_share(saliency, mask) == 0.75
    saliency[0, 0] = 5.0
    assert not metrics.pointing_hit(saliency, mask)
    # an all-zero map points nowhere (never at pixel 0), even when pixel 0 is in the mask
    mask[0, 0] = True
    assert not metrics.pointing_hit(np.zeros((4, 4)), mask)
    assert metrics.mass_share(np.zeros((4, 4)), mask) == 0.0


def test_wilson_interval():
    low, high = metrics.wilson(8, 10)
    assert low == pytest.approx(0.490, abs=1e-3) and high == pytest.approx(0.943, abs=1e-3)
    assert metrics.wilson(0, 0) == (0.0, 1.0) and metrics.wilson(0, 5)[0] == 0.0
    assert metrics.rate(8, 10)["rate"] == 0.8


def test_random_superpixel_chance_and_table():
    segments = np.repeat(np.arange(4), 4).reshape(4, 4)  # one row per segment
    mask = np.zeros((4, 4), dtype=bool)
    mask[1, 0] = mask[2, 3] = True
    assert random_superpixel_chance(segments, mask) == 0.5
    cell = metrics.rate(1, 2)
    group = {"n": 2, "monitor_region_overlaps": cell, "monitor_no_region": cell,
             "monitor_hit": cell,
             "gradcam_hit": cell, "gradcam++_hit": cell, "gradient_hit": cell,
             "random_pixel": 0.1, "random_superpixel": 0.2, "monitor_mass": 0.3,
             "gradcam_mass": 0.3, "gradcam++_mass": 0.3, "gradient_mass": 0.3}  # fmt: skip
    results = {"kinds": {"x": {"original_not_alarmed": 9, "alarmed": group}}}
    assert "| x (2 / 9) | 1/2 (9-91%) | 1 |" in report.table(results)


def test_top_region_is_the_superpixel_with_the_most_mass():
    segments = np.repeat(np.arange(4), 4).reshape(4, 4)  # one row per segment
    saliency = np.zeros((4, 4))
    saliency[1, :] = 1.0  # row 1: mass 4
    saliency[3, 0] = 3.0  # row 3: the argmax pixel, but mass 3
    region = metrics.top_region(saliency, segments)
    assert region.sum() == 4 and region[1].all()
    # a constant map singles out no region (never segment 0 by a tie-break)
    assert not metrics.top_region(np.ones((4, 4)), segments).any()
    cell = metrics.rate(1, 2)
    group = {"n": 2, "random_superpixel": 0.25,
             **{f"{m}_region_overlaps": cell for m in ("monitor", "gradcam", "gradcam++",
                                                       "gradient")}}  # fmt: skip
    text = report.region_table({"kinds": {"x": {"alarmed": group}}})
    assert "| x (2) | 1/2 (9-91%) | 1/2 (9-91%) | 1/2 (9-91%) | 1/2 (9-91%) | 25.0% |" in text
