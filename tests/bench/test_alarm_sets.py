"""bench.alarms.shifts and the family sets of bench.alarms.sets: every shift's shape, dtype,
determinism and strength; the exact ones by hand; the family sets on a small fake data folder
(sizes, labels, no image or class shared between the selection and report parts)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.alarms import sets, shifts

CASES = [(k, s) for k in shifts.KIND_FAMILY for s in shifts.severities(k)]
GRADED = [k for k in shifts.KIND_FAMILY if len(shifts.severities(k)) > 1]


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """25 colour 32 x 32 crops of scikit-image's photographs (real image statistics)."""
    pytest.importorskip("skimage")
    from tests._models import photo_crops

    return photo_crops()[0][::8]


def _rng(seed: int = 0) -> np.random.Generator:
    """A fresh generator."""
    return np.random.default_rng(seed)


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute pixel difference."""
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def test_families_declare_one_to_three_severities_and_cifar10c_kinds_exist():
    assert set(shifts.FAMILIES) == {"geometry", "photometric", "resolution", "noise", "blur",
                                    "contrast", "occlusion", "nominal"}  # fmt: skip
    for kinds in shifts.FAMILIES.values():
        for kind, params in kinds.items():
            assert 1 <= len(params) <= 3, kind
    single = {"invert", "channel_order", "rotate90", "rotate180", "vflip", "hflip"}
    assert {k for k in shifts.KIND_FAMILY if shifts.severities(k) == (1,)} == single
    assert shifts.severities("translate") == (1, 2)
    for kind, levels in shifts.FROM_CIFAR10C.items():
        assert kind in shifts.KIND_FAMILY and len(levels) == len(shifts.severities(kind))


@pytest.mark.parametrize(("kind", "severity"), CASES)
def test_every_shift_keeps_shape_and_dtype_and_is_deterministic(photos, kind, severity):
    out = shifts.shift(photos, kind, severity, _rng(3))
    assert out.dtype == np.uint8 and out.shape == photos.shape
    assert np.array_equal(out, shifts.shift(photos, kind, severity, _rng(3)))
    assert _distance(out, photos) > 0, kind
    assert np.array_equal(shifts.shift(photos[:0], kind, severity, _rng(3)), photos[:0])


@pytest.mark.parametrize("kind", GRADED)
def test_a_higher_severity_moves_the_images_further(photos, kind):
    top = shifts.severities(kind)[-1]
    d = [_distance(shifts.shift(photos, kind, s, _rng(1)), photos) for s in (1, top)]
    assert 0 < d[0] < d[1], (kind, d)


def test_the_exact_shifts_by_hand(photos):
    x = photos
    once = shifts.shift(x, "rotate180", 1, _rng())
    assert np.array_equal(once, x[:, ::-1, ::-1])
    assert np.array_equal(shifts.shift(once, "rotate180", 1, _rng()), x)
    quarter = shifts.shift(x, "rotate90", 1, _rng())
    assert np.array_equal(quarter[:, :, 0], x[:, 0, ::-1])  # first column = first row reversed
    assert np.array_equal(shifts.shift(quarter, "rotate90", 1, _rng()), once)
    assert np.array_equal(shifts.shift(x, "vflip", 1, _rng()), x[:, ::-1])
    assert np.array_equal(shifts.shift(x, "hflip", 1, _rng()), x[:, :, ::-1])
    assert np.array_equal(shifts.shift(x, "invert", 1, _rng()), 255 - x)
    grey = shifts.shift(x, "grayscale", 3, _rng())
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 0], grey[..., 2])
    luma = x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(grey[..., 0] - luma).max() <= 0.5 + 1e-9
    reduced = shifts.shift(x, "contrast", 3, _rng()).mean(axis=(1, 2))  # around the mean
    np.testing.assert_allclose(reduced, x.mean(axis=(1, 2)), atol=0.5)


def test_channel_order_permutes_each_images_channels(photos):
    out = shifts.shift(photos, "channel_order", 1, _rng(2))
    used = set()
    for a, b in zip(photos, out, strict=True):
        perms = [p for p in shifts.CHANNEL_ORDERS if np.array_equal(b, a[..., list(p)])]
        assert perms, "not a reordering of the channels"
        used.add(perms[0])
    assert len(used) > 1  # drawn per image


@pytest.mark.parametrize("s", [1, 2])
def test_nominal_translation_moves_pixels_by_exactly_s_with_reflection(photos, s):
    out = shifts.shift(photos, "translate", s, _rng(4))
    moves = [(dy, dx) for dy in (-s, 0, s) for dx in (-s, 0, s) if (dy, dx) != (0, 0)]
    seen = set()
    for a, b in zip(photos, out, strict=True):
        padded = np.pad(a, ((s, s), (s, s), (0, 0)), mode="reflect")
        found = [
            (dy, dx)
            for dy, dx in moves
            if np.array_equal(b, padded[s + dy : s + dy + 32, s + dx : s + dx + 32])
        ]
        assert found, "not a translation by s pixels"
        dy, dx = found[0]
        inner = b[max(0, -dy) : 32 - max(0, dy), max(0, -dx) : 32 - max(0, dx)]
        source = a[max(0, dy) : 32 + min(0, dy), max(0, dx) : 32 + min(0, dx)]
        assert np.array_equal(inner, source)  # out[i, j] = x[i + dy, j + dx] inside
        seen.add(found[0])
    assert len(seen) > 1


def test_occlusion_patches_cover_a_square_of_the_stated_side(photos):
    for severity, side in enumerate(shifts.FAMILIES["occlusion"]["grey_patch"], start=1):
        out = shifts.shift(photos, "grey_patch", severity, _rng(5))
        changed = np.any(out != photos, axis=-1)
        for img, mask in zip(out, changed, strict=True):
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            assert rows.max() - rows.min() < side and cols.max() - cols.min() < side
            assert np.all(img[mask] == 128)


def test_shift_refuses_unknown_kinds_severities_and_images():
    x = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="kind must be one of"):
        shifts.shift(x, "fog", 1, _rng())
    with pytest.raises(ValueError, match="severities 1..1"):
        shifts.shift(x, "invert", 2, _rng())
    with pytest.raises(ValueError, match="severities 1..3"):
        shifts.shift(x, "jpeg", 0, _rng())
    with pytest.raises(ValueError, match="uint8"):
        shifts.shift(x.astype(np.float32), "jpeg", 1, _rng())


def test_hsv_conversion_matches_scikit_image_and_inverts():
    skcolor = pytest.importorskip("skimage.color")
    rgb = _rng(6).random((500, 3))
    rgb[:50, 1] = rgb[:50, 0]  # ties
    rgb[50:60] = 0.5  # grey
    hsv = shifts.rgb_to_hsv(rgb)
    np.testing.assert_allclose(hsv, skcolor.rgb2hsv(rgb[None])[0], atol=1e-12)
    np.testing.assert_allclose(shifts.hsv_to_rgb(hsv), rgb, atol=1e-12)


# ------------------------------------------------------------------------------ family sets
def test_semantic_split_shares_no_class_and_no_image(fake_data):
    a, ya = sets.tinyimagenet_part("selection", 12)
    b, yb = sets.tinyimagenet_part("report", 12)
    assert set(ya) == {3, 8, 21} and set(yb) == {5, 13, 34}  # even / odd index in class list
    assert a.shape == b.shape == (12, 32, 32, 3)
    assert not {i.tobytes() for i in a} & {i.tobytes() for i in b}
    assert np.array_equal(sets.tinyimagenet_part("selection", 12)[0], a)
    with pytest.raises(ValueError, match="at most 18"):
        sets.tinyimagenet_part("report", 19)


def test_semantic_split_of_the_shared_file():
    try:
        a, ya = sets.tinyimagenet_part("selection", 2000)
        b, yb = sets.tinyimagenet_part("report", 2000)
    except (FileNotFoundError, OSError) as e:  # pragma: no cover - data ships with the machine
        pytest.skip(f"Tiny ImageNet file not found: {e}")
    assert not set(ya) & set(yb) and len(set(ya)) == 45 and len(set(yb)) == 44
    assert not {i.tobytes() for i in a} & {i.tobytes() for i in b}


def test_family_sets_on_a_fake_data_folder(fake_data):
    pytest.importorskip("skimage")
    from bench.cifar import load_cifar10

    n = 8
    test = load_cifar10("test")
    names = sets.families()
    assert list(names) == [*shifts.FAMILIES, "semantic", "far"]
    assert names["far"] == ["mnist", "fashion_mnist", "notmnist", "uniform"]
    parts = {part: sets.family_sets(part, n) for part in sets.PARTS}
    for part, got in parts.items():
        first = 5 if part == "selection" else 20  # past the selection part's choice images
        assert [(s.family, s.name) for s in got] == [(f, x) for f, xs in names.items() for x in xs]
        for s in got:
            assert isinstance(s, sets.ImageSet) and s.part == part
            assert s.images.shape == (n, 32, 32, 3) and s.images.dtype == np.uint8
            if s.family in shifts.FAMILIES:
                assert shifts.KIND_FAMILY[s.kind] == s.family and s.severity is not None
                assert np.array_equal(s.labels, test.labels[first : first + n])
            else:
                assert s.severity is None and np.array_equal(s.labels, -np.ones(n))
        hflip = next(s for s in got if s.name == "hflip")
        assert np.array_equal(hflip.images, test.images[first : first + n, :, ::-1])
    sel, rep = ({s.name: s for s in parts[p]} for p in sets.PARTS)
    for name in sel:  # no CIFAR image, shifted or not, on both sides; no other image either
        assert not {i.tobytes() for i in sel[name].images} & {i.tobytes() for i in rep[name].images}
    again = sets.family_sets("selection", n)
    assert all(
        np.array_equal(a.images, b.images) for a, b in zip(again, parts["selection"], strict=True)
    )
    with pytest.raises(ValueError, match="n must be in 1..20"):
        sets.family_sets("report", 21)
    with pytest.raises(ValueError, match="n must be in 1..15"):  # 20 images, from image 5
        sets.family_sets("selection", 16)
    with pytest.raises(ValueError, match="part must be one of"):
        sets.family_sets("train")


def test_the_selection_parts_shifts_leave_out_calibrations_choice_images():
    from surprise_monitor.calibrate.evidence_choice import CHOICE_IMAGES

    # the learned evidence is fitted on held-out images 0..CHOICE_IMAGES-1 as clean images
    assert sets.SELECTION_BASE == CHOICE_IMAGES
    assert sets.base_rows("selection", 500) == slice(CHOICE_IMAGES, CHOICE_IMAGES + 500)
    assert sets.base_rows("report", 500) == slice(0, 500)
    # a set judged from other base images is never read back: the selection part's stem says
    # where its base starts, the report part's is as before
    assert sets.cache_stem("selection", "grey_patch s2") == "selection-from500__grey_patch_s2"
    assert sets.cache_stem("report", "grey_patch s2") == "report__grey_patch_s2"
