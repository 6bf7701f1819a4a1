"""bench.alarms.stage_stats: the stage distance against scipy's Mahalanobis, the halves of the
fit, and the channel means against a forward pass read by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis
from torch import nn

from bench.alarms import stage_stats
from bench.cifar import to_tensor


def test_the_distance_is_scipy_s_mahalanobis_squared_with_the_shrunk_covariance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    y = rng.normal(size=(7, 6)) * 3
    for shrink in (0.0, 0.01, 0.5):
        fit = stage_stats.StageMahalanobis.fit(x, shrink)
        cov = np.cov(x, rowvar=False)
        cov = (1 - shrink) * cov + shrink * np.trace(cov) / 6 * np.eye(6)
        vi = np.linalg.inv(cov)
        want = [mahalanobis(v, x.mean(axis=0), vi) ** 2 for v in y]
        np.testing.assert_allclose(fit(y), want, rtol=1e-8)
    with pytest.raises(ValueError, match="channel means"):
        stage_stats.StageMahalanobis.fit(x[:1])
    with pytest.raises(ValueError, match="shrink"):
        stage_stats.StageMahalanobis.fit(x, 2.0)


def test_fitted_uses_the_first_half_and_scores_the_second():
    rng = np.random.default_rng(1)
    means = rng.normal(size=(100, 5))
    stats = stage_stats.fitted(["a", "b"], [2, 3], means)
    assert stats.reference.shape == (50, 2)
    first = stage_stats.StageMahalanobis.fit(means[:50, 2:])
    np.testing.assert_allclose(stats.reference[:, 1], first(means[50:, 2:]))
    want = stage_stats.StageMahalanobis.fit(means[:50, :2])(means[:3, :2])
    np.testing.assert_allclose(stats.distances(means[:3])[:, 0], want)
    with pytest.raises(ValueError, match="channel means"):
        stats.distances(means[:, :4])
    assert stage_stats.names_of(["a", "b"]) == ("stage_mahalanobis:a", "stage_mahalanobis:b")


def test_channel_means_are_the_layers_outputs_averaged_over_space():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.Flatten())
    images = np.random.default_rng(2).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    got = stage_stats.channel_means(model, ["1", "2"], images)
    with torch.no_grad():
        first = model[1](model[0](to_tensor(images)))
        second = model[2](first)
    want = torch.cat([first.mean(dim=(2, 3)), second.mean(dim=(2, 3))], dim=1).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(KeyError, match="no layer"):
        stage_stats.channel_means(model, ["9"], images)
