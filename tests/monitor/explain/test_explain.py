"""Explanations: the filter-restricted gradient, superpixel scores, the chosen filter, exemplars
and the figures (checked pixel by pixel where it matters)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from surprise_monitor.calibrate import calibrate
from surprise_monitor.calibrate.options import TableOptions
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.explain import (
    choose_filter,
    explain,
    input_gradient,
    load_images,
    most_surprising_filter,
)
from surprise_monitor.monitor.explain.figures import (
    BOUNDARY_RGB,
    boundary_pixels,
    default_scale,
    to_rgb8,
)
from surprise_monitor.monitor.explain.superpixels import (
    normalisation,
    ranked_segments,
    region_mask,
    segment,
    superpixel_scores,
    unnormalise,
)
from surprise_monitor.monitor.report import MonitorReport
from tests._models import (
    PHOTO_MEAN,
    PHOTO_STD,
    PHOTOS,
    ShortcutNet,
    TinyCNN,
    normalise,
    photo,
    photo_crops,
    seeded,
)
from tests.monitor.explain.test_fired import _best_fired


@pytest.fixture(scope="module")
def photo_setup(tmp_path_factory):
    """A TinyCNN, its table on photo crops (data_source: an npz file) and a probe image."""
    root = tmp_path_factory.mktemp("photos")
    images, labels = photo_crops()
    path = root / "train.npz"
    np.savez(path, x=images, y=labels, class_names=np.array(PHOTOS))
    x, y = normalise(images), torch.from_numpy(labels)
    model = seeded(TinyCNN(num_classes=4), seed=3)  # untrained: the mechanics do not need more
    source = {"kind": "npz", "path": str(path), "key": "x", "mean": list(PHOTO_MEAN),
              "std": list(PHOTO_STD)}  # fmt: skip
    table = calibrate(
        model,
        TensorDataset(x, y),
        progress=False,
        table=TableOptions(class_names=list(PHOTOS), data_source=source),
    )
    probe = normalise(photo("coffee", 128)[40:72, 40:72][None])  # zoomed in: unlike the crops
    return model, table, images, probe


# --------------------------------------------------------------- filter-restricted gradient
def _rewired_tiny(model: TinyCNN, x: torch.Tensor, cls: torch.Tensor, n: int) -> torch.Tensor:
    """Oracle: TinyCNN truncated after its final conv; only channel n stays connected to the
    input, the other channels are constants; the head re-applied by hand."""
    x = x.clone().requires_grad_(True)
    a = model.features[:3](x)
    const = a.detach()
    rewired = torch.cat([const[:, :n], a[:, n : n + 1], const[:, n + 1 :]], dim=1)
    logits = model.fc(model.pool(torch.relu(rewired)).flatten(1))
    (g,) = torch.autograd.grad(logits.gather(1, cls[:, None]).sum(), x)
    return g


def test_filter_gradient_matches_a_rewired_model():
    model = seeded(TinyCNN(num_classes=4, width=6), seed=5)
    x = torch.randn(3, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    cls = torch.tensor([0, 2, 3])
    for n in (0, 4, 11):
        got = input_gradient(model, "features.2", x, cls, n)
        want = _rewired_tiny(model, x, cls, n)
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
        with torch.inference_mode():  # the same inside a caller's inference_mode or no_grad
            inside = input_gradient(model, "features.2", x.clone(), cls, n)
        with torch.no_grad():
            torch.testing.assert_close(input_gradient(model, "features.2", x, cls, n), got)
        torch.testing.assert_close(inside, got)
    assert all(p.grad is None for p in model.parameters())


def test_filter_gradient_excludes_paths_around_the_layer():
    """ShortcutNet's final conv is block.conv2; the block's projection shortcut bypasses it and
    must carry no gradient (the oracle holds the shortcut constant)."""
    model = seeded(ShortcutNet(num_classes=3), seed=2)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    cls = torch.tensor([1, 2])
    b = model.block
    for n in (0, 7):
        xr = x.clone().requires_grad_(True)
        inner = torch.relu(model.stem(xr))
        a = b.conv2(b.relu(b.bn1(b.conv1(inner))))
        const = a.detach()
        rewired = torch.cat([const[:, :n], a[:, n : n + 1], const[:, n + 1 :]], dim=1)
        out = b.relu(b.bn2(rewired) + b.downsample(inner).detach())
        logits = model.fc(out.mean((2, 3)))
        (want,) = torch.autograd.grad(logits.gather(1, cls[:, None]).sum(), xr)
        torch.testing.assert_close(
            input_gradient(model, "block.conv2", x, cls, n), want, rtol=1e-5, atol=1e-9
        )
    every = input_gradient(model, "block.conv2", x, cls, list(range(12)))
    vanilla = input_gradient(model, "block.conv2", x, cls, None)
    assert (every - vanilla).abs().max() > 1e-3 * vanilla.abs().max()  # the shortcut's share


def test_channel_gradients_sum_to_the_vanilla_gradient_on_a_chain():
    model = seeded(TinyCNN(num_classes=4), seed=1)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    cls = torch.tensor([3, 1])
    total = sum(input_gradient(model, "features.2", x, cls, n) for n in range(16))
    vanilla = input_gradient(model, "features.2", x, cls, None)
    xr = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(model(xr).gather(1, cls[:, None]).sum(), xr)
    torch.testing.assert_close(vanilla, plain)
    torch.testing.assert_close(total, vanilla, rtol=1e-4, atol=1e-8)


def test_input_gradient_rejects_bad_arguments():
    model = seeded(TinyCNN(num_classes=4), seed=1)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="channels must lie in"):
        input_gradient(model, "features.2", x, 0, 16)
    with pytest.raises(ValueError, match="classes must lie in"):
        input_gradient(model, "features.2", x, 4, 0)
    with pytest.raises(ValueError, match="no module named"):
        input_gradient(model, "features.9", x, 0, 0)
    with pytest.raises(ValueError, match="training mode"):
        input_gradient(model.train(), "features.2", x, 0, 0)


# ------------------------------------------------------------------------------ superpixels
def test_superpixel_scores_sum_max_abs_gradient_per_region():
    image = photo("astronaut", 48).astype(np.float64) / 255.0
    labels = segment(image, 30)
    s = int(labels.max()) + 1
    assert 10 <= s <= 60 and set(np.unique(labels)) == set(range(s))
    grad = torch.randn(3, 48, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = grad.numpy()
    want_sum = np.zeros(s)
    count = np.zeros(s)
    for i in range(48):
        for j in range(48):
            k = labels[i, j]
            want_sum[k] += max(abs(g[0, i, j]), abs(g[1, i, j]), abs(g[2, i, j]))
            count[k] += 1
    np.testing.assert_allclose(superpixel_scores(grad, labels), want_sum, rtol=1e-12)
    np.testing.assert_allclose(
        superpixel_scores(grad, labels, reduce="mean"), want_sum / count, rtol=1e-12
    )
    order = ranked_segments(want_sum)
    assert want_sum[order[0]] == want_sum.max() and list(order) == sorted(
        range(s), key=lambda k: -want_sum[k]
    )
    with pytest.raises(ValueError, match="gradient is"):
        superpixel_scores(grad[:, :10], labels)


def test_slic_on_a_real_photo_follows_the_picture():
    image = photo("coffee", 64).astype(np.float64) / 255.0
    labels = segment(image, 50)
    # Pixels of one superpixel are much more alike than the image as a whole.
    spread = np.mean([image[labels == k].std(axis=0).mean() for k in range(labels.max() + 1)])
    assert spread < 0.5 * image.reshape(-1, 3).std(axis=0).mean()
    assert 25 <= labels.max() + 1 <= 80


def test_unnormalise_inverts_the_preprocessing_and_needs_the_values():
    images, _ = photo_crops()
    x = normalise(images[:1])
    back = unnormalise(x, PHOTO_MEAN, PHOTO_STD)
    np.testing.assert_allclose(back, images[0] / 255.0, atol=1e-6)
    assert normalisation({"mean": [0.1], "std": [2.0]}) == ((0.1,), (2.0,))
    assert normalisation(None, PHOTO_MEAN, PHOTO_STD) == (PHOTO_MEAN, PHOTO_STD)
    with pytest.raises(ValueError, match="pass mean=... and std="):
        normalisation({"kind": "imagefolder"})
    with pytest.raises(ValueError, match="positive"):
        normalisation(None, [0.0], [0.0])


# ------------------------------------------------------------------------- choosing filters
def _report(surprise, expectation, percentile, deviation) -> MonitorReport:
    n = len(percentile)
    alpha = torch.tensor([deviation], dtype=torch.float32)
    return MonitorReport(
        logits=torch.zeros(1, 2), classes=torch.tensor([0]), labels_given=False,
        alpha=alpha, mu=torch.zeros(1, n), percentile=torch.tensor([percentile]),
        surprise=torch.tensor([surprise]), expectation=torch.tensor([expectation]),
        beta=torch.zeros(1), beta_percentile=torch.zeros(1), low_beta=torch.zeros(1, dtype=bool),
        calibrated=torch.ones(1, dtype=bool), score=torch.zeros(1), p_value=torch.ones(1),
        alarm=torch.zeros(1, dtype=bool), components=torch.zeros(1, 1),
        component_ranks=torch.ones(1, 1), layer="l",
        class_names=("a", "b"),
    )  # fmt: skip


def test_choose_filter_prefers_surprise_then_expectation_then_the_highest_percentile():
    f, t = False, True
    r = _report([f, t, t, f], [t, f, f, f], [1, 99.95, 99.99, 50], [-1, 0.5, 0.2, 0])
    assert choose_filter(r, None)[:2] == (1, "surprise")  # largest alpha - mu among surprising
    r = _report([f, f, f, f], [f, t, t, f], [1, 0.01, 0.02, 50], [-1, -0.5, -0.9, 0])
    assert choose_filter(r, None)[:2] == (2, "expectation")  # most negative alpha - mu
    r = _report([f] * 4, [f] * 4, [10, 97, 97, 50], [0, 0.1, 0.3, 0])
    assert choose_filter(r, None)[:2] == (2, "unflagged")
    assert choose_filter(r, 0)[:2] == (0, "unflagged")
    # nothing flagged: the highest percentile among the filters that fired, not a silent one
    r = _report([f] * 4, [f] * 4, [10, 99, 97, 50], [0, 0, 0.3, 0.1])
    assert choose_filter(r, None)[:2] == (2, "unflagged") and r.highest_percentile_filter(0) == 1
    assert most_surprising_filter(r) == (2, "unflagged")
    silent = _report([f] * 3, [f] * 3, [10, 99, 50], [0, 0, 0])  # none fired: no region follows
    assert most_surprising_filter(silent) == (1, "unflagged")
    with pytest.raises(ValueError, match="outside the layer's 4 filters"):
        choose_filter(r, 4)


# ------------------------------------------------------------------------------ explanations
def test_explain_scores_the_most_surprising_filter(photo_setup):
    model, table, _, probe = photo_setup
    with SurpriseMonitor(model, table) as monitor:
        report = monitor.inspect(probe)
        surprising = report.surprising_filters(0)
        assert surprising, "the probe image should surprise some filter"
        expl = monitor.explain(probe, exemplars_k=0)
        assert monitor.last_report is report  # explaining leaves the monitor's report alone
    c = int(report.classes[0])
    n = _best_fired(report, table, c)
    assert n is not None, "the probe image should fire some surprising filter"
    assert (expl.filter, expl.kind, expl.cls, expl.label) == (n, "surprise", c, None)
    assert expl.alpha == pytest.approx(float(report.alpha[0, n])) and expl.alpha > 0
    assert expl.fired and expl.note == "" and expl.has_region
    assert expl.high == pytest.approx(float(table.value_at(99.9)[c, n]))
    assert expl.alpha > expl.high
    image = unnormalise(probe, PHOTO_MEAN, PHOTO_STD)
    np.testing.assert_array_equal(expl.image, image)
    np.testing.assert_array_equal(expl.segments, segment(image, 50))
    grad = input_gradient(model, table.layer, probe, c, n)[0]
    np.testing.assert_allclose(expl.gradient, grad.numpy())
    np.testing.assert_allclose(expl.scores, superpixel_scores(grad, expl.segments))
    assert expl.top_segment == int(np.argmax(expl.scores))
    np.testing.assert_array_equal(expl.mask, expl.segments == expl.top_segment)
    assert 0 < expl.mask.sum() < expl.mask.size
    assert expl.to_dict()["kind"] == "surprise"


def test_explain_with_a_label_and_a_chosen_filter(photo_setup):
    model, table, _, probe = photo_setup
    with SurpriseMonitor(model, table) as monitor:
        report = monitor.inspect(probe, labels=torch.tensor([1]))
        expl = explain(monitor, probe[0], filter=3, label=1, n_segments=20, exemplars_k=0)
        # the second positional argument is the label, in explain and fix alike
        positional = explain(monitor, probe[0], 1, filter=3, n_segments=20, exemplars_k=0)
        by_method = monitor.explain(probe[0], 2, filter=3, n_segments=20, exemplars_k=0)
        with pytest.raises(TypeError):
            monitor.explain(probe[0], 2, 3)  # the filter is a keyword only
        with pytest.raises(ValueError, match="one \\[C, H, W\\]"):
            monitor.explain(torch.cat([probe, probe]))
        with pytest.raises(ValueError, match="outside the layer"):
            monitor.explain(probe, filter=99)
    assert (expl.filter, expl.cls, expl.label) == (3, 1, 1)
    assert (positional.filter, positional.cls, positional.label) == (3, 1, 1)
    assert positional.alpha == expl.alpha
    assert (by_method.filter, by_method.cls, by_method.label) == (3, 2, 2)
    want = (
        "surprise"
        if report.surprise[0, 3]
        else ("expectation" if report.expectation[0, 3] else "unflagged")
    )
    assert expl.kind == want
    assert expl.alpha == pytest.approx(float(report.alpha[0, 3]))
    assert expl.n_segments == 20 and expl.num_segments == int(expl.segments.max()) + 1


def test_render_draws_the_boundary_exactly_on_the_top_region(photo_setup, tmp_path):
    model, table, _, probe = photo_setup
    with SurpriseMonitor(model, table) as monitor:
        expl = monitor.explain(probe, exemplars_k=0)
    out = tmp_path / "input.png"
    expl.render(out)
    png = np.asarray(Image.open(out).convert("RGB"))
    scale = default_scale(expl.image.shape)
    assert scale == 8 and png.shape == (32 * scale, 32 * scale, 3)
    expected_edge = boundary_pixels(expl.mask, scale)
    big_mask = np.repeat(np.repeat(expl.mask, scale, 0), scale, 1)
    assert expected_edge.any() and not (expected_edge & ~big_mask).any()  # inside the region
    # Every pixel of the region's edge is drawn: a region pixel next to a non-region pixel.
    pad = np.pad(big_mask, 1, constant_values=False)
    touches = ~(pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:])
    assert (expected_edge >= (big_mask & touches)).all()
    drawn = np.tile(BOUNDARY_RGB, (int(expected_edge.sum()), 1))
    np.testing.assert_array_equal(png[expected_edge], drawn)
    plain = to_rgb8(expl.image, scale)
    np.testing.assert_array_equal(png[~expected_edge], plain[~expected_edge])


def test_figure_shows_the_input_beside_its_exemplars(photo_setup, tmp_path):
    model, table, images, probe = photo_setup
    with SurpriseMonitor(model, table) as monitor:
        expl = monitor.explain(probe, label=2)  # exemplars: the table's top-k, from its npz
    c, n = expl.cls, expl.filter
    assert c == 2 and expl.exemplar_class == 2
    want = [int(i) for i in table.top_indices[c, n].tolist() if i >= 0]
    assert [e.index for e in expl.exemplars] == want and len(want) == table.top_k
    for e in expl.exemplars:
        np.testing.assert_allclose(e.image, images[e.index] / 255.0, atol=1e-6)
        x = normalise(images[e.index][None])
        grad = input_gradient(model, table.layer, x, c, n)[0]  # checked against a rewired net
        segments = segment(e.image, 50)
        scores = np.bincount(  # sum over each superpixel of max_c |g|, by numpy
            segments.ravel(), weights=grad.abs().amax(0).numpy().ravel().astype(np.float64)
        )
        np.testing.assert_array_equal(e.mask, region_mask(e.segments, [int(np.argmax(scores))]))
    path = expl.save_figure(tmp_path / "why.png", panel_inches=2.0, dpi=50)
    png = np.asarray(Image.open(path).convert("RGB")).astype(int)
    panels = 1 + len(expl.exemplars)
    assert png.shape[1:] == (2.0 * panels * 50, 3) and png.shape[0] > 2.0 * 50
    assert png.std() > 20  # pictures, not a blank canvas
    yellow = (png[..., 0] > 200) & (png[..., 1] > 200) & (png[..., 2] < 60)
    columns = np.nonzero(yellow.any(axis=0))[0]
    # Boundaries are drawn in the input's panel and in the exemplars' panels.
    width = png.shape[1] / panels
    assert set((columns // width).astype(int)) == set(range(panels))
    caption = expl.caption()
    assert "filter" in caption and PHOTOS[2] in caption and "P99.9" in caption


def test_exemplars_need_a_source_or_a_dataset(photo_setup):
    model, table, images, probe = photo_setup
    with pytest.raises(ValueError, match="pass dataset="):
        load_images([0, 1])
    ds = TensorDataset(normalise(images), torch.zeros(len(images)))
    got = load_images([5, 2], dataset=ds)
    torch.testing.assert_close(got, normalise(images[[5, 2]]))
    from_npz = load_images([5, 2], data_source=table.data_source)
    torch.testing.assert_close(from_npz, got)
    with pytest.raises(IndexError, match="outside"):
        load_images([len(images)], data_source=table.data_source)
    with pytest.raises(ValueError, match="kind 'hdf5'"):
        load_images([0], data_source={"kind": "hdf5"})


def test_a_misclassification_shows_both_classes_exemplars_with_a_key(photo_setup, tmp_path,
                                                                      monkeypatch):  # fmt: skip
    from surprise_monitor.monitor.explain import explanation

    model, table, _, probe = photo_setup
    with SurpriseMonitor(model, table) as monitor:
        prediction = int(monitor.inspect(probe).predictions[0])
        label = (prediction + 1) % table.num_classes
        expl = monitor.explain(probe, label=label)
    n = expl.filter
    assert expl.cls == label and expl.prediction == prediction
    assert [e.index for e in expl.exemplars] == [
        int(i) for i in table.top_indices[label, n].tolist() if i >= 0
    ]
    assert [e.index for e in expl.prediction_exemplars] == [
        int(i) for i in table.top_indices[prediction, n].tolist() if i >= 0
    ]
    caption = expl.caption()
    assert f"predicted: {PHOTOS[prediction]}" in caption and f"true: {PHOTOS[label]}" in caption
    assert "percentile" in caption and "usual P0.1..P99.9" in caption
    if expl.kind == "expectation":
        assert "MISSING" in caption and "expected" not in caption.split("\n")[2].lower()
    seen = {}
    real = explanation.grid_figure
    monkeypatch.setattr(explanation, "grid_figure",
                        lambda rows, title, path, **kw: seen.update(rows=rows, **kw)
                        or real(rows, title, path, **kw))  # fmt: skip
    path = expl.save_figure(tmp_path / "why.png", panel_inches=2.0, dpi=50)
    rows = seen["rows"]
    assert len(rows) == 2 and rows[1][0] is None and len(rows[1]) == 1 + table.top_k
    assert all(f"'{PHOTOS[prediction]}' training image" in p.caption for p in rows[1][1:])
    assert all(f"'{PHOTOS[label]}' training image" in p.caption for p in rows[0][1:])
    kinds = [kind for kind, _ in seen["legend"]]
    assert kinds == ["outline", "dimmed"] and "outline" in seen["legend"][0][1]
    png = np.asarray(Image.open(path).convert("RGB")).astype(int)
    yellow = (png[..., 0] > 200) & (png[..., 1] > 200) & (png[..., 2] < 60)
    assert yellow[png.shape[0] // 2 :].any()  # the second row's exemplars are outlined too
    assert expl.to_dict()["prediction_exemplars"][0]["index"] == expl.prediction_exemplars[0].index
