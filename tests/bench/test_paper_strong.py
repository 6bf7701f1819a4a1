"""Smoke test of ``python -m bench.paper`` on the strong-model path, with a tiny stand-in for
``vgg_bn`` (fixture ``tiny_strong``: 160 training and 40 test images of real-photo crops)."""

from __future__ import annotations

import json

import pytest

from bench.paper import __main__ as paper_main
from bench.paper import common


def test_the_paper_report_is_written_for_a_strong_model(tiny_strong, capsys):
    s = tiny_strong
    assert s.strong and s.n_test() == 10000 and s.n_test(40) == 40
    assert s.table("train").num_filters == 32  # VGGBN(width=4): 8 * 4 filters at features.24
    paper_main.main(["--archs", "vgg_bn", "--n-test", "40", "--per-kind", "1",
                     "--upsample-images", "3"])  # fmt: skip
    out = paper_main.HERE
    report = (out / "REPORT.md").read_text()
    for heading in ("1. Filter ranking", "2. Beta", "3. Surprise", "4. Fixing", "Wall time"):
        assert heading in report
    for fig in ("ranking.png", "beta.png", "beta-head-input.png", "fix-rate.png"):
        assert (common.FIGURES / fig).stat().st_size > 1000
    res = {n: json.loads((common.RESULTS / f"{n}.json").read_text())["vgg_bn"]
           for n in ("ranking", "beta", "failures", "fixing")}  # fmt: skip
    rank = res["ranking"]
    assert rank["images"] == 40 and rank["filters"] == 32
    assert rank["after_bn"]["layer"] == "features.26" and rank["after_bn"]["images"] == 20
    for m in rank["methods"].values():
        assert 0.0 <= m["auc"] <= 1.5 and m["auc_se"] >= 0.0
        assert m["normalised_accuracy"][0] == pytest.approx(1.0)
    b = res["beta"]
    assert b["true"]["images"] == 40 and b["tables"]["test_range"] == [20, 40]
    for who in ("true", "pred"):  # beta is an increasing function of the logit minus r
        assert b[who]["spearman_seen_logit"] == pytest.approx(1.0, abs=1e-3)
        head = b["head_input"][who]  # at the head's input the head is affine: r = the bias
        assert head["residual_std_ratio"] == pytest.approx(0.0, abs=1e-4)
    assert b["head_input"]["layer"] == "features.26" and b["head_input"]["table_images"] == 160
    assert "_beta" not in b["head_input"]  # the per-image array stays out of results/*.json
    assert "figures/beta-head-input.png" in report
    f = res["failures"]
    assert f["misclassified"] + f["correct"] == 40
    wrong = round((1 - s.test_accuracy) * 40)
    assert f["misclassified"] == wrong == res["fixing"]["misclassified"]
    fix = res["fixing"]["native"]
    assert fix["images"] + fix["skipped"] == wrong
    for size in ("32", "64", "128"):
        assert res["fixing"]["resolution"][size]["images"] <= 3
    assert "surprise - vanilla" in capsys.readouterr().out + report


def test_atypical_inputs_on_the_strong_path(tiny_strong, fake_cifar):
    import numpy as np

    from bench.paper import atypical

    for split in ("train", "test"):  # classes 0..3: pytorch-ood's Mahalanobis needs them all
        with np.load(fake_cifar / f"cifar10_{split}.npz") as d:
            np.savez(fake_cifar / f"cifar10_{split}.npz", x=d["x"], y=d["y"] // 2,
                     class_names=d["class_names"])  # fmt: skip
    rng = np.random.default_rng(0)
    for name in atypical.OOD_FILES.values():  # stand-ins for the MNIST-family files
        np.savez(fake_cifar / f"{name}.npz", x=rng.integers(0, 256, (12, 28, 28, 1), np.uint8))
    assert atypical.image_ranges(tiny_strong, 10, 10) == (20, 30, 40)
    with pytest.raises(ValueError, match="at most"):
        atypical.image_ranges(tiny_strong, 5000, 5000)
    r = atypical.run([tiny_strong], 10, 10)["vgg_bn"]
    assert r["test_range"] == [20, 30] and r["n_ood"] == 10
    assert set(r["metrics_train"]["KNN"]) == set(r["metrics_heldout_pred"]["percentile z2"])
    assert 0.0 <= r["metrics_train"]["Mahalanobis"]["MNIST"]["auroc"] <= 1.0
    assert "in-distribution test images 20..29" in atypical.markdown({"vgg_bn": r})
