"""bench.alarms.loo on a synthetic AUROC table of four models: each rotation chooses by the
rule on what it may see (and nothing else), the MNIST gate and the nominal exclusion, the
tie-breaks, the issue's checks by hand, the Markdown and the command line on results files."""

from __future__ import annotations

import copy
import json

import pytest

from bench.alarms import loo

MODELS = ("A", "B", "C", "D")
FAMILY_OF = {
    "mnist": "far",
    "fashion_mnist": "far",
    "notmnist": "far",
    "uniform": "far",
    "tinyimagenet": "semantic",
    "gaussian_noise s2": "noise",
    "hflip": "nominal",
}
#: the best logit baseline's AUROC per set (MSP's; MaxLogit, Energy a little lower)
BEST = {"mnist": 0.935, "fashion_mnist": 0.935, "notmnist": 0.935, "uniform": 0.935,
        "tinyimagenet": 0.80, "gaussian_noise s2": 0.70, "hflip": 0.5}  # fmt: skip
#: each candidate's margin over BEST (nominal sets: its AUROC minus 0.5)
MARGIN = {"good": 0.05, "ok": 0.02, "loud": 0.06, "weak": 0.10}


def _scores(s: str, model: str) -> dict[str, float]:
    """Every score's AUROC on set ``s`` of ``model`` (same in both parts)."""
    b = BEST[s]
    out = {"MSP": b, "MaxLogit": b - 0.01, "Energy": b - 0.005, "KNN": b + 0.01,
           "Mahalanobis": b - 0.02}  # fmt: skip
    if s == "hflip":
        out.update({k: 0.5 for k in out})
        out.update({"good": 0.51, "ok": 0.49, "loud": 0.60, "weak": 0.50})
        return out
    for name, m in MARGIN.items():
        out[name] = b + m
    if s in ("mnist", "fashion_mnist", "notmnist"):
        out["weak"] = 0.90  # fails the MNIST gate
    if model == "D" and s == "tinyimagenet":
        out["good"] = b - 0.05  # good is best everywhere except on model D's near-OOD set
    return out


def _aurocs() -> dict:
    """aurocs[model][part][set][score]."""
    return {m: {part: {s: _scores(s, m) for s in FAMILY_OF} for part in loo.PARTS} for m in MODELS}


def _seen(aurocs: dict, models=MODELS, part: str = "selection") -> dict:
    """One part of some models (a copy)."""
    return copy.deepcopy({m: aurocs[m][part] for m in models})


def test_each_model_rotation_chooses_by_the_rule_on_the_other_models():
    got = loo.leave_one_model_out(_aurocs(), FAMILY_OF)
    assert [r["held_out"] for r in got] == list(MODELS)
    # D seen: good's worst margin is -0.05 (D's tinyimagenet), ok's +0.02; D held out: good
    assert {r["held_out"]: r["chosen"] for r in got} == {"A": "ok", "B": "ok", "C": "ok",
                                                          "D": "good"}  # fmt: skip
    for r in got:
        assert r["held_out"] not in r["seen_models"] and len(r["seen_models"]) == 3
        assert {row["model"] for row in r["rows"]} == {r["held_out"]}
        assert [row["set"] for row in r["rows"]] == list(FAMILY_OF)
        ranking = {x["name"]: x for x in r["ranking"]}
        assert not ranking["weak"]["kept"] and not ranking["weak"]["mnist_ok"]
        assert not ranking["loud"]["kept"] and not ranking["loud"]["nominal_ok"]


def test_the_held_out_report_uses_the_report_part_only():
    base = _aurocs()
    before = loo.leave_one_model_out(base, FAMILY_OF)
    changed = copy.deepcopy(base)
    changed["A"]["report"]["mnist"]["ok"] = 0.10  # the held-out model's report part
    changed["B"]["report"]["tinyimagenet"]["good"] = 0.10  # another model's report part
    after = loo.leave_one_model_out(changed, FAMILY_OF)
    assert [r["chosen"] for r in after] == [r["chosen"] for r in before]  # no rotation moves
    rows_a = {row["set"]: row for row in after[0]["rows"]}
    assert rows_a["mnist"]["auroc"] == 0.10 and rows_a["mnist"]["mnist_ok"] is False
    assert not after[0]["summary"]["passed"] and before[0]["summary"]["passed"]
    # the held-out model's selection part does not move its own rotation (it moves the others)
    changed["A"]["selection"]["tinyimagenet"]["ok"] = 0.10
    after = loo.leave_one_model_out(changed, FAMILY_OF)
    assert after[0]["chosen"] == "ok" and after[1]["chosen"] == "good"
    # a selection figure of a model the rotation sees does move it
    changed["B"]["selection"]["tinyimagenet"]["ok"] = 0.10
    assert loo.leave_one_model_out(changed, FAMILY_OF)[0]["chosen"] == "good"


def test_the_mnist_gate_and_the_nominal_exclusion():
    aurocs = _aurocs()
    seen = _seen(aurocs, ("A", "B", "C"))
    assert loo.rule(seen, FAMILY_OF) == "good"
    # without the nominal set, loud (margin +0.06) is no longer excluded
    no_nominal = {m: {s: v for s, v in sets.items() if s != "hflip"} for m, sets in seen.items()}
    assert loo.rule(no_nominal, FAMILY_OF) == "loud"
    # without the MNIST family, the gate does not apply and weak (+0.10 elsewhere) wins
    no_far = {
        m: {s: v for s, v in sets.items() if FAMILY_OF[s] != "far"} for m, sets in seen.items()
    }
    assert loo.rule(no_far, FAMILY_OF) == "weak"
    # if no candidate passes the gate, all stay
    for sets in seen.values():
        for s in ("mnist", "fashion_mnist", "notmnist"):
            sets[s] = {**sets[s], "good": 0.9, "ok": 0.9, "loud": 0.9}
    ranking = loo.rank_candidates(seen, FAMILY_OF)
    assert all(not r["mnist_ok"] for r in ranking)
    assert {r["name"] for r in ranking if r["kept"]} == {"good", "ok", "weak"}  # loud: nominal
    # a candidate at |AUROC - 0.5| = 0.05 exactly is still nominal
    seen = _seen(aurocs, ("A", "B", "C"))
    for sets in seen.values():
        sets["hflip"] = {**sets["hflip"], "loud": 0.55}
    assert loo.rule(seen, FAMILY_OF) == "loud"


def test_the_rule_s_figures_and_tie_breaks():
    aurocs = _aurocs()
    ranking = loo.rank_candidates(_seen(aurocs), FAMILY_OF)
    good = next(r for r in ranking if r["name"] == "good")
    assert good["worst_margin"] == pytest.approx(-0.05) and good["worst_set"] == "D/tinyimagenet"
    assert good["mnist_min"] == pytest.approx(0.985)
    assert good["nominal_max_deviation"] == pytest.approx(0.01)
    # beats every baseline (KNN = best + 0.01) on 6 non-nominal sets x 4 models, but D's near-OOD
    assert good["sets_won"] == 23
    assert [r["name"] for r in ranking][:2] == ["ok", "good"]
    # equal worst margins (+0.02, on the noise set): the most sets won, then the name
    seen = {"A": {s: _scores(s, "A") for s in ("gaussian_noise s2", "tinyimagenet")}}
    seen["A"]["tinyimagenet"]["KNN"] = 0.95
    for name, near in (("x0", 0.85), ("x1", 0.85), ("x2", 0.96)):  # x2 alone beats KNN there
        seen["A"]["gaussian_noise s2"][name] = 0.72
        seen["A"]["tinyimagenet"][name] = near
    ranking = loo.rank_candidates(seen, FAMILY_OF, ["x0", "x1", "x2"])
    assert {r["worst_margin"] for r in ranking} == {0.02}
    assert [(r["name"], r["sets_won"]) for r in ranking] == [("x2", 2), ("x0", 1), ("x1", 1)]
    assert loo.rule(seen, FAMILY_OF, ["x1", "x0"]) == "x0"


def test_the_checks_by_hand():
    base = {"MSP": 0.80, "MaxLogit": 0.79, "Energy": 0.81, "KNN": 0.83, "Mahalanobis": 0.70}

    def row(auroc: float, s: str, family: str) -> dict:
        return loo.set_report({**base, "x": auroc}, "x", s, family)

    r = row(0.795, "tinyimagenet", "semantic")
    assert (r["best_logit"], r["best_logit_auroc"]) == ("Energy", 0.81)
    assert r["margin"] == pytest.approx(-0.015) and r["within"] and r["tolerance"] == 0.02
    assert r["knn"] == 0.83 and r["beats"] is False and r["mnist_ok"] is None
    assert not row(0.785, "tinyimagenet", "semantic")["within"]
    assert row(0.785, "jpeg s1", "resolution")["within"]
    assert row(0.78, "jpeg s1", "resolution")["within"]  # -0.03 exactly
    assert not row(0.775, "jpeg s1", "resolution")["within"]
    assert row(0.84, "jpeg s1", "resolution")["beats"]
    assert not row(0.949, "mnist", "far")["mnist_ok"] and row(0.95, "mnist", "far")["mnist_ok"]
    assert row(0.90, "uniform", "far")["mnist_ok"] is None
    nominal = row(0.56, "hflip", "nominal")
    assert nominal["nominal_deviation"] == pytest.approx(0.06) and not nominal["nominal_ok"]
    assert nominal["within"] is None and nominal["beats"] is None
    assert row(0.46, "hflip", "nominal")["nominal_ok"]
    # the summary: beats on at least half the non-nominal sets
    rows = [
        {"model": "A", **row(a, s, f)}
        for a, s, f in [
            (0.84, "a", "noise"),
            (0.82, "b", "noise"),
            (0.96, "mnist", "far"),
            (0.50, "hflip", "nominal"),
        ]  # fmt: skip
    ]
    s = loo.summary(rows)
    assert (s["beats"], s["beats_of"], s["beats_half"]) == (2, 3, True)
    assert s["within"] and s["mnist_ok"] and s["nominal_ok"] and s["passed"]
    rows[0] = {"model": "A", **row(0.81, "a", "noise")}
    s = loo.summary(rows)
    assert (s["beats"], s["beats_half"], s["passed"]) == (1, False, False)


def test_the_held_out_model_d_report_checked_by_hand():
    d = loo.leave_one_model_out(_aurocs(), FAMILY_OF)[3]
    assert d["chosen"] == "good"
    rows = {r["set"]: r for r in d["rows"]}
    assert rows["tinyimagenet"]["margin"] == pytest.approx(-0.05)
    assert rows["tinyimagenet"]["within"] is False
    assert all(rows[s]["within"] for s in FAMILY_OF if s not in ("tinyimagenet", "hflip"))
    assert all(rows[s]["mnist_ok"] for s in ("mnist", "fashion_mnist", "notmnist"))
    s = d["summary"]
    assert s["missed"] == ["D/tinyimagenet"] and not s["within"]
    assert (s["beats"], s["beats_of"], s["beats_half"]) == (5, 6, True)
    assert s["nominal_ok"] and s["mnist_ok"] and not s["passed"]


def test_each_family_rotation_chooses_without_the_family():
    got = {r["held_out"]: r for r in loo.leave_one_family_out(_aurocs(), FAMILY_OF)}
    assert list(got) == ["far", "semantic", "noise", "nominal"]
    # far out: no MNIST gate, weak wins; semantic out: good's weak spot unseen
    # nominal out: loud is not excluded; noise out: as with everything seen, ok
    assert {f: r["chosen"] for f, r in got.items()} == {
        "far": "weak", "semantic": "good", "noise": "ok", "nominal": "loud"}  # fmt: skip
    for family, r in got.items():
        assert {row["family"] for row in r["rows"]} == {family}
        assert {row["model"] for row in r["rows"]} == set(MODELS)
    assert not got["far"]["summary"]["mnist_ok"]
    assert not got["nominal"]["summary"]["nominal_ok"]
    assert got["semantic"]["summary"]["missed"] == ["D/tinyimagenet"]
    # checks with no held-out set of their kind are not applicable (None), not passed
    assert got["semantic"]["summary"]["mnist_ok"] is None
    assert got["semantic"]["summary"]["nominal_ok"] is None
    assert got["nominal"]["summary"]["within"] is None
    assert got["nominal"]["summary"]["beats_half"] is None


def test_candidates_must_be_everywhere():
    aurocs = _aurocs()
    del aurocs["B"]["report"]["uniform"]["good"]  # good cannot be reported on B
    assert all(r["chosen"] != "good" for r in loo.leave_one_model_out(aurocs, FAMILY_OF))
    assert loo.candidates_of(_seen(aurocs)) == ["good", "loud", "ok", "weak"]
    with pytest.raises(ValueError, match="two models"):
        loo.leave_one_model_out({"A": aurocs["A"]}, FAMILY_OF)


def test_markdown_marks_the_checks():
    aurocs = _aurocs()
    text = loo.markdown(
        loo.leave_one_model_out(aurocs, FAMILY_OF), loo.leave_one_family_out(aurocs, FAMILY_OF)
    )
    assert "### Held out: D (chosen on the selection part of A, B, C): `good`" in text
    assert "## Leave one family out" in text and "### Held out: nominal: `loud`" in text
    assert text.count("- held out **") == 8
    assert "| tinyimagenet | semantic | **0.750** |" in text and "**miss**" in text
    assert "missed: D/tinyimagenet" in text
    assert "MNIST family >= 0.95: n/a" in text


def _results_file(aurocs: dict, model: str) -> dict:
    """``python -m bench.alarms``' format for one model."""
    parts = {
        part: {
            "in_distribution_images": 5000,
            "sets": {
                s: {
                    "images": 100,
                    "alarm_rate": 0.1,
                    "scores": {k: {"auroc": v, "fpr95": 0.5} for k, v in scores.items()},
                }
                for s, scores in sets.items()
            },  # fmt: skip
        }
        for part, sets in aurocs[model].items()
    }
    return {"model": model, "parts": parts, "alarm_rates": {}}


def test_main_reads_the_results_files_and_writes_loo_json(tmp_path, capsys):
    aurocs = _aurocs()
    for m in MODELS:
        (tmp_path / f"{m}.json").write_text(json.dumps(_results_file(aurocs, m)))
    (tmp_path / "class_rates.json").write_text(json.dumps({"resnet18": {}}))
    assert loo.read_results(sorted(tmp_path.glob("*.json"))) == aurocs
    assert loo.main(["--results", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "loo.json").read_text())
    assert out["models"] == list(MODELS)
    assert [r["chosen"] for r in out["by_model"]] == ["ok", "ok", "ok", "good"]
    assert "## Leave one model out" in capsys.readouterr().out
    # run again: loo.json itself is not read as a model
    assert loo.main(["--results", str(tmp_path), "--models", "A,B"]) == 0
    assert json.loads((tmp_path / "loo.json").read_text())["models"] == ["A", "B"]


def test_family_map_names_the_family_sets_and_the_earlier_sets():
    got = loo.family_map(["mnist", "tinyimagenet", "hflip", "translate s1", "noise 0.08"])
    assert got == {"mnist": "far", "tinyimagenet": "semantic", "hflip": "nominal",
                   "translate s1": "nominal", "noise 0.08": "noise"}  # fmt: skip


def test_each_model_s_own_choice_sees_only_its_own_synthetic_selection_sets():
    aurocs = _aurocs()
    # on model C's own noise set "ok" is ahead of "good"; elsewhere "good" is
    for part in loo.PARTS:
        aurocs["C"][part]["gaussian_noise s2"]["good"] = 0.70
    # semantic and far figures must not count: make "ok" best there on every model (unseen)
    for m in MODELS:
        aurocs[m]["selection"]["tinyimagenet"]["ok"] = 0.99
    got = {r["model"]: r for r in loo.own_choice(aurocs, FAMILY_OF, ("good", "ok"))}
    assert {m: r["chosen"] for m, r in got.items()} == {"A": "good", "B": "good", "C": "ok",
                                                         "D": "good"}  # fmt: skip
    # the choice looked at the model's own noise and nominal sets only
    for r in got.values():
        assert len(r["ranking"]) == 2
    # reported on the model's own report part, every set
    assert {row["set"] for row in got["D"]["rows"]} == set(FAMILY_OF)
    assert {row["model"] for row in got["D"]["rows"]} == {"D"}
    assert got["D"]["summary"]["missed"] == ["D/tinyimagenet"]
    # a held-out family leaves every model's choice and is the only one reported
    by_family = {
        r["held_out"]: r for r in loo.own_choice_by_family(aurocs, FAMILY_OF, ("good", "ok"))
    }
    noise = by_family["noise"]
    assert {row["set"] for row in noise["rows"]} == {"gaussian_noise s2"}
    assert "C: good" in noise["chosen"]  # without its noise set C has nothing to prefer ok on
    text = loo.markdown([], [], list(got.values()), list(by_family.values()))
    assert "## Each model's own choice among the variants" in text
    assert "### C: chose `ok` on its own synthetic sets" in text
