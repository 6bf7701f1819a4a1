"""Fakes for the Ray Serve integration's tests that need no Ray."""

from __future__ import annotations

from collections import defaultdict

import pytest


class FakeRayMetrics:
    """Stands in for ``ray.serve.metrics``: records what each metric was given, and refuses
    what Ray refuses (non-positive bounds and increments, unknown or missing tags)."""

    def __init__(self) -> None:
        self.made: dict[str, _Metric] = {}

    def _make(self, kind: str, name: str, description: str = "", tag_keys=(), boundaries=None):
        assert name not in self.made, f"{name} made twice"
        if boundaries is not None:
            assert all(b > 0 for b in boundaries), boundaries  # Ray's own check
        metric = _Metric(kind, name, tuple(tag_keys), boundaries)
        self.made[name] = metric
        return metric

    def Counter(self, name, **kw):  # noqa: N802 - Ray's class names
        return self._make("counter", name, **kw)

    def Gauge(self, name, **kw):  # noqa: N802
        return self._make("gauge", name, **kw)

    def Histogram(self, name, **kw):  # noqa: N802
        return self._make("histogram", name, **kw)


class _Metric:
    def __init__(self, kind, name, tag_keys, boundaries):
        self.kind, self.name, self.tag_keys, self.boundaries = kind, name, tag_keys, boundaries
        self.values: dict[tuple, float] = defaultdict(float)
        self.observed: dict[tuple, list[float]] = defaultdict(list)
        self.sets = 0

    def _key(self, tags):
        assert set(tags) == set(self.tag_keys), (self.name, tags, self.tag_keys)
        return tuple(sorted(tags.items()))

    def inc(self, value, tags=None):
        assert value > 0, f"{self.name}: Ray refuses inc({value})"
        self.values[self._key(tags or {})] += value

    def set(self, value, tags=None):
        self.values[self._key(tags or {})] = value
        self.sets += 1

    def observe(self, value, tags=None):
        self.observed[self._key(tags or {})].append(value)

    def total(self, **match) -> float:
        return sum(v for k, v in self.values.items() if set(match.items()) <= set(k))


@pytest.fixture()
def fake_ray_metrics() -> FakeRayMetrics:
    return FakeRayMetrics()
