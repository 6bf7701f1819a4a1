"""bench.paper.fixing: the area-downsampled model, the breakdowns of the fix rate (by hand), and
resumable per-image rows."""

from __future__ import annotations

import pytest
import torch

from bench.paper import fixing
from bench.strong_models import VGGBN
from surprise_monitor.calibrate import calibrate, model_fingerprint
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.options import Execution
from surprise_monitor.monitor.probe import get_module


def _vgg() -> VGGBN:
    torch.manual_seed(0)
    m = VGGBN(width=4)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.3, 0.3)
            mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def test_area_downsampled_model_is_the_model_at_32_pixels():
    model = _vgg()
    wrapped = fixing.AreaDownsampled(model, 4)
    assert not wrapped.training and list(wrapped.state_dict()) == list(model.state_dict())
    assert model_fingerprint(wrapped) == model_fingerprint(model)
    assert get_module(wrapped, "features.24") is model.features[24]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 32, 32, generator=g)
    nearest = x.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # area-pools back to x
    with torch.no_grad():
        assert torch.allclose(wrapped(nearest), model(x), atol=1e-5)
        assert torch.equal(fixing.AreaDownsampled(model, 1)(x), model(x))
    up = fixing.upsample(x, 64)
    assert up.shape == (6, 3, 64, 64) and fixing.upsample(x, 32) is x
    table = calibrate(model, torch.utils.data.TensorDataset(x, torch.arange(6) % 3),
                      progress=False)  # fmt: skip
    with (
        SurpriseMonitor(model, table) as a,
        SurpriseMonitor(wrapped, table, execution=Execution(strict_input_size=False)) as b,
    ):
        assert torch.allclose(a.inspect(x).alpha, b.inspect(nearest).alpha, atol=1e-6)
    with pytest.raises(ValueError, match="factor"):
        fixing.AreaDownsampled(model, 0)


def _row(label, pred, kind, rank, attempts):
    """A row as fix_row writes it: ``attempts[method]`` = [n_segments, found, removed,
    removed_pixels, prediction] rows; pixels = 100."""
    row = {"label": label, "prediction": pred, "pixels": 100, "filter_kind": kind,
           "label_rank": rank}  # fmt: skip
    for m, att in attempts.items():
        fixed = [a for a in att if a[4] == label]
        row[m] = {"fixed": bool(fixed), "removed_pixels": min((a[3] for a in fixed), default=None),
                  "attempts": att, "seconds": 1.0}  # fmt: skip
    return row


ROWS = [
    _row(3, 2, "surprise", 2, {"surprise": [[10, 10, 1, 30, 3], [25, 24, 1, 5, 2]],
                            "vanilla": [[10, 10, 1, 30, 2], [25, 24, 1, 5, 3]],
                            "random": [[10, 10, 1, 30, 2], [25, 24, 1, 5, 2]]}),
    _row(1, 0, "unflagged", 4, {"surprise": [[10, 9, 1, 40, 0], [25, 25, 1, 4, 0]],
                             "vanilla": [[10, 9, 1, 40, 1], [25, 25, 1, 4, 0]],
                             "random": [[10, 9, 1, 40, 1], [25, 25, 1, 4, 0]]}),
    _row(0, 5, "surprise", 2, {"surprise": [[10, 10, 1, 20, 0], [25, 26, 1, 2, 0]],
                            "vanilla": [[10, 10, 1, 20, 5], [25, 26, 1, 2, 5]],
                            "random": [[10, 10, 1, 20, 5], [25, 26, 1, 2, 5]]}),
]  # fmt: skip


def test_breakdowns_by_hand():
    seg = fixing.by_segments(ROWS, fixing.METHODS)
    assert [seg["10"][m]["fixed"] for m in fixing.METHODS] == [2, 1, 1]  # rows 0+2, 1, 1
    assert [seg["25"][m]["fixed"] for m in fixing.METHODS] == [1, 1, 0]  # row 2; row 0
    budget = fixing.by_budget(ROWS, fixing.METHODS, budgets=(0.05, 0.3))
    assert [budget["0.05"][m]["fixed"] for m in fixing.METHODS] == [1, 1, 0]
    assert [budget["0.3"][m]["fixed"] for m in fixing.METHODS] == [2, 1, 0]
    assert budget["0.3"]["surprise"]["percent"] == pytest.approx(200 / 3)
    out = fixing.analyse(ROWS + [{"skipped": "already right", "label_rank": 1}])
    assert out["images"] == 3 and out["skipped"] == 1
    assert [out["methods"][m]["fixed"] for m in fixing.METHODS] == [2, 2, 1]
    assert out["subsets"]["flagged"]["images"] == 2 and out["subsets"]["lower"]["images"] == 1
    assert out["subsets"]["runner_up"]["methods"]["surprise"]["fixed"] == 2
    assert [out["changed"][m]["fixed"] for m in fixing.METHODS] == [2, 2, 1]
    diff = out["surprise_minus_random"]  # surprise fixed rows 0 and 2, random row 1
    assert (diff["only_first"], diff["only_second"]) == (2, 1) and out["seconds"] == 9.0


def test_label_rank():
    r = fixing.label_rank(torch.tensor([0.5, 2.0, 1.0, 3.0]), 2)
    assert r == {"label_rank": 3, "label_gap": pytest.approx(2.0)}


def test_rows_are_resumed_and_torn_lines_dropped(tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl"
    calls = []

    def fake_fix_row(monitor, x, label, methods, seed):
        calls.append(seed)
        if seed == 7:
            raise ValueError("the image is already classified as its label")
        return {"label": label, "seed": seed}

    monkeypatch.setattr(fixing, "fix_row", fake_fix_row)
    logits = torch.zeros(10, 4)
    x, y = torch.zeros(2, 3, 8, 8), torch.tensor([1, 2])
    rows = fixing.compute_rows(None, x, y, [5, 7], path, logits)
    assert calls == [5, 7] and rows[0]["seed"] == 5 and "skipped" in rows[1]
    with path.open("a") as f:
        f.write('{"test_index": 9, "lab')  # a run killed mid-line
    assert sorted(fixing.read_rows(path)) == [5, 7]
    again = fixing.compute_rows(None, x, y, [5, 7], path, logits)
    assert calls == [5, 7] and again == rows


def test_effects_blank_what_the_fix_blanks(tiny_strong):
    from bench.paper import fix_effects
    from bench.paper.common import test_images
    from surprise_monitor.monitor.explain import fix, superpixels

    s = tiny_strong
    x, y = test_images(s.data_dir, 0, 40)
    with torch.no_grad():
        wrong = (s.model(x).argmax(1) != y).nonzero().flatten().tolist()
    i = wrong[0]
    with s.monitor("train") as mon:
        effects = fix_effects.image_effects(mon, x[i], int(y[i]), seed=i)
        for m in fix_effects.METHODS:
            segs, order = fix_effects.ranked_regions(mon, x[i : i + 1], int(y[i]), m, seed=i)
            res = fix(mon, x[i], int(y[i]), method=m, n_segments=[50], remove=[1, 2, 3], seed=i)
            want = [a.removed_pixels for a in res.attempts]
            got = [int(superpixels.region_mask(segs, order[:r]).sum()) for r in (1, 2, 3)]
            assert got == want, m
            edited = x[i : i + 1].masked_fill(
                torch.from_numpy(superpixels.region_mask(segs, order[:2])), 0.0
            )
            with torch.no_grad():
                z, base = s.model(edited)[0].double(), s.model(x[i : i + 1])[0].double()
            p, c = int(base.argmax()), int(y[i])
            want_d = [z[c] - base[c], z[p] - base[p], z[c] - base[c] - z[p] + base[p]]
            assert effects[m][1] == pytest.approx([float(v) for v in want_d], abs=1e-5)


def test_effects_table_with_one_image_has_no_standard_error():
    from bench.paper import fix_effects

    one = {"mean": [0.5, -1.25], "se": None}
    two = {"mean": [0.5, -1.25], "se": [0.1, 0.2]}
    methods = {m: {"true_logit": one, "predicted_logit": two, "margin": one,
                   "true_logit_up": [1.0, 0.0]} for m in fix_effects.METHODS}  # fmt: skip
    results = {"m": {"title": "tiny", "effects": {"methods": methods, "remove": [1, 2]}}}
    lines = fix_effects.markdown(results)
    assert len(lines) == 2 + 2 * len(fix_effects.METHODS)
    assert "| +0.50 (one image) | +0.50 +- 0.10 | +0.50 (one image) | 100% |" in lines[2]
    assert "-1.25 +- 0.20" in lines[3]
