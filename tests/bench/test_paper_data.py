"""Data helpers of the paper scripts: OOD padding, shifts, and clear errors for missing data."""

from __future__ import annotations

import numpy as np
import pytest

from bench.paper.atypical import SHIFTS, shift_images
from bench.paper.common import arg_parser, gray_to_cifar, load_gray_npz, parse


def _images(n: int = 6) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(40, 216, (n, 1, 1, 3))
    return np.clip(base + rng.integers(-30, 31, (n, 32, 32, 3)), 0, 255).astype(np.uint8)


def test_gray_to_cifar_pads_and_copies_channels():
    g = np.arange(2 * 28 * 28, dtype=np.uint32).reshape(2, 28, 28, 1).astype(np.uint8)
    out = gray_to_cifar(g)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    for c in range(3):
        assert np.array_equal(out[:, 2:30, 2:30, c], g[..., 0])
    assert out[:, :2].max() == 0 and out[:, 30:].max() == 0 and out[:, :, :2].max() == 0
    with pytest.raises(ValueError, match="expected"):
        gray_to_cifar(np.zeros((1, 28, 28, 3), np.uint8))


def test_shifts_change_the_images_as_intended():
    x = _images()
    f = x.astype(np.float64)
    grey = lambda a: a @ np.array([0.299, 0.587, 0.114])  # noqa: E731
    for kind, levels in SHIFTS.items():
        diffs = []
        for level in levels:
            y = shift_images(x, kind, level)
            assert y.shape == x.shape and y.dtype == np.uint8
            diffs.append(np.abs(y.astype(np.float64) - f).mean())
        assert diffs[0] > 0 and diffs[0] < diffs[2], kind  # stronger = further from the original
    noisy = shift_images(x, "noise", 0.08).astype(np.float64)
    assert np.std(noisy - f) == pytest.approx(0.08 * 255, rel=0.15)
    low = shift_images(x, "contrast", 0.25).astype(np.float64)
    ratio = grey(low).std(axis=(1, 2)) / grey(f).std(axis=(1, 2))
    assert np.allclose(ratio, 0.25, atol=0.03)
    assert np.array_equal(shift_images(x, "noise", 0.04), shift_images(x, "noise", 0.04))
    with pytest.raises(ValueError, match="kind"):
        shift_images(x, "rotate", 1)


def test_missing_data_is_named(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="mnist_test.npz"):
        load_gray_npz("mnist_test", tmp_path)
    with pytest.raises(SystemExit) as exc:
        parse(arg_parser("x"), ["--data-dir", str(tmp_path / "nowhere")])
    assert exc.value.code == 2
    assert "data not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(arg_parser("x"), ["--data-dir", str(tmp_path)])  # a folder without CIFAR-10
    assert "cifar10_train.npz is missing" in capsys.readouterr().err
