"""bench.paper.fix_choice: what the filter choice found (by hand), the section beside Section
4.5's rates, and a run on a tiny model where no region comes from a silent filter and the
controls are Section 4.5's."""

from __future__ import annotations

import pytest

from bench.paper import common, fix_choice, fixing


def _row(kind, surprise, vanilla, random, attempts=True):
    """A row with one attempt per method (fixed = the attempt predicts the label 1)."""
    row = {"label": 1, "prediction": 0, "pixels": 100, "filter_kind": kind, "label_rank": 2}
    for m, ok in (("surprise", surprise), ("vanilla", vanilla), ("random", random)):
        att = [[10, 10, 1, 20, 1 if ok else 0]] if (attempts or m != "surprise") else []
        row[m] = {"fixed": ok, "removed_pixels": 20 if ok else None, "attempts": att,
                  "seconds": 1.0}  # fmt: skip
    return row


ROWS = [
    _row("surprise", True, True, False),
    _row("surprise", True, False, False),
    _row("unflagged", False, True, True),
    _row("unflagged", False, True, True, attempts=False),
]


def test_choice_kind_by_hand():
    assert [fix_choice.choice_kind(r) for r in ROWS] == ["fired", "fired", "unflagged", "no_region"]


def test_section_sets_the_new_choice_beside_the_papers():
    before = {"vgg_bn": {"native": fixing.analyse(ROWS[2:] + ROWS[2:])}}  # 0 of 4 fixed
    res = {"vgg_bn": {"title": "VGG-BN", "native": fixing.analyse(ROWS),
                      "by_choice": {}, "choice_counts": {}}}  # fmt: skip
    used = ROWS
    groups = {k: [r for r in used if fix_choice.choice_kind(r) == k] for k in fix_choice.KINDS}
    res["vgg_bn"]["by_choice"] = {k: fix_choice.summarise(v, fixing.METHODS) for k, v in
                                  groups.items()}  # fmt: skip
    res["vgg_bn"]["choice_counts"] = {k: len(v) for k, v in groups.items()}
    text = fix_choice.markdown(res, before)
    assert "| VGG-BN | paper's: most surprising, silent or not (Section 4.5's run of other " in text
    assert "| VGG-BN | **fired: the explanation's (now)** | 4 | 50.0% +- 25.0 |" in text
    assert "| VGG-BN | - a surprising filter that fired | 2 | 100.0% +- 0.0 |" in text
    # 4 failures; the paper's filter fired: unknown (no filter_alpha); 2 fired, 1 none, 1 no region
    assert "| VGG-BN | 4 | - | 2 | 1 | 1 | -" in text  # other vanilla fixes: not the same run
    same = {"vgg_bn": {"native": fixing.analyse([*ROWS[:2], *ROWS[2:]])}}
    same["vgg_bn"]["native"]["methods"]["surprise"]["percent"] = 25.0
    again = fix_choice.markdown(res, same)
    assert "| VGG-BN | 4 | - | 2 | 1 | 1 | +25.0 +- " in again
    assert "other weights" in text and "other weights" not in again


def test_run_draws_no_region_from_a_silent_filter(tiny_strong):
    s = tiny_strong
    out = fix_choice.run_model(s, 40)
    n = out["native"]["images"]
    assert n > 0 and sum(out["choice_counts"].values()) == n
    rows = list(fixing.read_rows(fixing.rows_path(s, fix_choice.VARIANT)).values())
    used = [r for r in rows if "skipped" not in r]
    with s.monitor("train") as mon:
        idx = [r["test_index"] for r in used]
        x, y = common.test_images(s.data_dir, 0, 40)
        fixing.add_filter_alpha(mon, x[idx], y[idx], used)
        for r in used:
            if r["filter_alpha"] <= 0:  # a silent chosen filter: no region, not fixed
                assert r["surprise"]["attempts"] == [] and not r["surprise"]["fixed"]
            if r["filter_kind"] == "surprise":  # flagged only when it fired
                assert r["filter_alpha"] > 0
        # the controls do not depend on the choice: Section 4.5's rows, recomputed
        logits, _ = common.test_logits(s)
        again = fixing.compute_rows(mon, x[idx], y[idx], idx, s.data_dir / "again.jsonl", logits,
                                    methods=("vanilla", "random"))  # fmt: skip
    for a, b in zip(used, again, strict=True):
        for m in ("vanilla", "random"):
            assert a[m]["attempts"] == b[m]["attempts"], m
    assert out["native"]["methods"]["vanilla"]["fixed"] == sum(r["vanilla"]["fixed"] for r in used)
    with pytest.raises(KeyError):
        out["by_choice"]["nothing"]
