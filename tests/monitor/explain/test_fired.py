"""Explanations pick a filter that fired, never draw a region from an all-zero gradient, and
say how sure they are (issue 25). Real photos; a TinyCNN whose filter ``SILENT`` never fires,
and tables where that silent filter is the "most surprising" one (its class range lies below
0), as on strong models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.explain import choose_filter, input_gradient
from surprise_monitor.monitor.explain.figures import to_rgb8
from surprise_monitor.monitor.explain.superpixels import has_region, region_share, top_region
from surprise_monitor.monitor.report import MonitorReport
from tests._models import SILENT, silent_photo_setup, with_silent_surprise


@pytest.fixture(scope="module")
def silent():
    """``(model, table, probe, c)``: the silent-filter setup and the probe's predicted class."""
    model, table, probe = silent_photo_setup()
    with SurpriseMonitor(model, table) as monitor:
        report = monitor.inspect(probe)
    assert float(report.alpha[0, SILENT]) == 0.0  # the filter never fires
    return model, table, probe, int(report.classes[0])


def _alpha(model, table, probe, label=None) -> torch.Tensor:
    """The probe's ``[N]`` alphas against ``label`` (else its prediction)."""
    with SurpriseMonitor(model, table) as monitor:
        labels = None if label is None else torch.tensor([label])
        return monitor.inspect(probe, labels=labels).alpha[0]


def _best_fired(report: MonitorReport, table, c: int) -> int | None:
    """Oracle (numpy): the surprising filter with alpha > 0 furthest beyond the class's range,
    (alpha - P99.9) / (P99.9 - P50) (inf for a flat range), then alpha - mu, then the id."""
    alpha = report.alpha[0].numpy().astype(np.float64)
    mu = report.mu[0].numpy().astype(np.float64)
    high = table.value_at(99.9)[c].numpy().astype(np.float64)
    med = table.value_at(50.0)[c].numpy().astype(np.float64)
    keys = []
    for n in np.nonzero(report.surprise[0].numpy())[0]:
        if alpha[n] > 0:
            spread = high[n] - med[n]
            far = (alpha[n] - high[n]) / spread if spread > 0 else np.inf
            keys.append((-far, -(alpha[n] - mu[n]), int(n)))
    return min(keys)[2] if keys else None


def _component(report: MonitorReport) -> str:
    """Oracle: the component with the smallest tail rank."""
    ranks = report.component_ranks[0].numpy()
    return report.component_names[int(np.nanargmin(ranks))]


def _yellow(png: np.ndarray) -> np.ndarray:
    return (png[..., 0] > 200) & (png[..., 1] > 200) & (png[..., 2] < 60)


def test_a_silent_most_surprising_filter_loses_to_one_that_fired(silent):
    model, table, probe, c = silent
    rigged = with_silent_surprise(table, c, _alpha(model, table, probe))
    with SurpriseMonitor(model, rigged) as monitor:
        report = monitor.inspect(probe)
        expl = monitor.explain(probe, exemplars_k=0)
    # By the old rule (largest alpha - mu) and by its distance beyond the class's range, the
    # silent filter comes first: alpha 0 above a negative P99.9.
    assert report.surprising_filters(0)[0].filter == SILENT
    assert float(rigged.value_at(99.9)[c, SILENT]) < 0 == float(report.alpha[0, SILENT])
    want = _best_fired(report, rigged, c)
    assert want is not None and want != SILENT
    assert (expl.filter, expl.kind, expl.fired, expl.note) == (want, "surprise", True, "")
    assert choose_filter(report, None, rigged).filter == want
    assert expl.alpha > expl.high and expl.alpha > 0
    assert np.abs(expl.gradient).max() > 0 and expl.has_region
    assert expl.top_segment == int(np.argmax(expl.scores))
    np.testing.assert_array_equal(expl.mask, expl.segments == expl.top_segment)


def test_only_silent_surprising_filters_give_no_region_and_name_the_alarm(silent, tmp_path):
    model, table, probe, c = silent
    rigged = with_silent_surprise(table, c, _alpha(model, table, probe), only=True)
    with SurpriseMonitor(model, rigged) as monitor:
        report = monitor.inspect(probe)
        expl = monitor.explain(probe, exemplars_k=0)
    assert [f.filter for f in report.surprising_filters(0)] == [SILENT]
    assert not report.expectation[0].any()
    component = _component(report)
    assert expl.note.startswith(f"no surprising filter fired (1 flagged surprising, none with "
                                f"alpha > 0); the alarm comes from {component}")  # fmt: skip
    assert (expl.filter, expl.kind, expl.fired, expl.top_segment) == (SILENT, "surprise", False,
                                                                       None)  # fmt: skip
    assert not expl.mask.any() and expl.region_share == 0.0 and expl.filter_share == 0.0
    data = expl.to_dict()
    assert data["note"] == expl.note and data["alarm_component"] == component
    assert (data["top_segment"], data["has_region"], data["top_region_pixels"]) == (None, False, 0)
    assert "no region" in expl.caption() and expl.note in expl.title()
    path = expl.save_figure(tmp_path / "why.png", panel_inches=2.0, dpi=50)
    assert not _yellow(np.asarray(Image.open(path).convert("RGB")).astype(int)).any()


def test_an_all_zero_gradient_is_no_region_not_superpixel_0(silent, tmp_path):
    model, table, probe, _ = silent
    with SurpriseMonitor(model, table) as monitor:
        expl = monitor.explain(probe, filter=SILENT, exemplars_k=0)
    assert not np.abs(expl.gradient).any() and not expl.scores.any()
    assert expl.top_segment is None and not expl.mask.any() and not expl.fired
    assert "no region: filter 4: its gradient is zero" in expl.note
    png = np.asarray(expl.render(tmp_path / "input.png"))
    np.testing.assert_array_equal(png, to_rgb8(expl.image, 8))  # nothing drawn, no corner
    assert top_region(np.zeros(7)) is None and not has_region(np.full(3, 2.5))
    assert top_region(np.array([0.0, 2.0, 2.0])) == 1 and region_share(np.zeros(3), None) == 0


def test_the_shares_say_how_sure_the_explanation_is(silent):
    model, table, probe, c = silent
    with SurpriseMonitor(model, table) as monitor:
        report = monitor.inspect(probe)
        expl = monitor.explain(probe, exemplars_k=0)
    n = expl.filter
    alpha = report.alpha[0].numpy().astype(np.float64)
    assert expl.filter_share == pytest.approx(abs(alpha[n]) / np.abs(alpha).sum(), rel=1e-9)
    grad = input_gradient(model, table.layer, probe, c, n)[0].numpy().astype(np.float64)
    scores = np.bincount(expl.segments.ravel(), weights=np.abs(grad).max(0).ravel())
    top = int(np.argmax(scores))
    assert expl.top_segment == top
    assert expl.region_share == pytest.approx(scores[top] / scores.sum(), rel=1e-6)
    assert 0 < expl.filter_share <= 1 and 0 < expl.region_share <= 1
    data = expl.to_dict()
    assert (data["filter_share"], data["region_share"]) == (expl.filter_share, expl.region_share)
    caption = expl.caption()
    assert f"filter's share of the score {expl.filter_share:.0%}" in caption
    assert f"region's share of the saliency {expl.region_share:.0%}" in caption


def test_fix_without_a_fired_surprising_filter_uses_one_that_fired(silent):
    """Only the silent filter is surprising: the fix falls back on the highest-percentile
    filter that fired (not the silent one, whose percentile is higher), and removes regions."""
    model, table, probe, c = silent
    label = (c + 1) % table.num_classes
    alpha = _alpha(model, table, probe, label)
    rigged = with_silent_surprise(table, label, alpha, only=True)
    with SurpriseMonitor(model, rigged) as monitor:
        report = monitor.inspect(probe, labels=torch.tensor([label]))
        res = monitor.fix(probe, label)
    assert report.highest_percentile_filter(0) == SILENT
    pct = report.percentile[0].numpy()
    hot = np.flatnonzero(report.alpha[0].numpy() > 0)
    assert res.filter == int(hot[np.argmax(pct[hot])]) and res.filter_kind == "unflagged"
    assert res.attempts and res.note == ""


def test_fix_through_a_silent_filter_says_it_cannot_fix(silent, monkeypatch):
    """When the filter a fix gets has an all-zero gradient (no filter fired), no superpixel is
    removed and the note says why."""
    from surprise_monitor.monitor.explain import fixes

    model, table, probe, c = silent
    label = (c + 1) % table.num_classes
    monkeypatch.setattr(fixes, "most_surprising_filter", lambda *a: (SILENT, "unflagged"))
    with SurpriseMonitor(model, table) as monitor:
        res = monitor.fix(probe, label)
    assert res.filter == SILENT and not res.fixed and res.attempts == [] and res.mask is None
    assert (
        res.note
        == f"cannot fix: the gradient through filter {SILENT} is zero (no region to remove)"
    )
    assert res.to_dict()["note"] == res.note
