"""The per-family p-values of a calibrated gated table, end to end: the family nulls are the
held-out images' Tippett statistics (numpy on their judged ranks), a report's family p-values
are numpy's ranks of its own, each family's p-value holds its rate on fresh inputs, the alarm
kind is the family of the smallest one, the file keeps them, a table without them judges as
before, and the page and the JSON show them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from surprise_monitor.calibrate import calibrate
from surprise_monitor.calibrate.options import AlarmOptions, RunOptions
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.alarms.log import AlarmRecord
from surprise_monitor.monitor.atypicality import GATED_SCORE_NAME, alarm_kind
from surprise_monitor.monitor.families import FAMILIES, family_columns
from surprise_monitor.monitor.table import CalibrationTable
from surprise_monitor.monitor.web.page import detail_page
from tests._checks import assert_load_refuses, load_edited
from tests._models import class_images, trained_tiny_cnn

IMAGES, LABELS = class_images(4000, 3, seed=1)


@pytest.fixture(scope="module")
def gated():
    """A trained tiny CNN calibrated with the gated score (with its KNN bank) on 600 images,
    with a null of 400 held-out ones."""
    model = trained_tiny_cnn(steps=12)
    table = calibrate(
        model, TensorDataset(IMAGES[:600], LABELS[:600]),
        heldout=TensorDataset(IMAGES[600:1000], LABELS[600:1000]), progress=False,
        run=RunOptions(batch_size=50),
        alarm=AlarmOptions(reference_images=300, score=GATED_SCORE_NAME, evidence="energy+mass"),
    )  # fmt: skip
    return model, table


def _statistics(ranks: np.ndarray, names) -> np.ndarray:
    """numpy: each family's ``-log`` smallest tail rank."""
    return np.stack([-np.log(ranks[:, list(c)].min(axis=1)) for c in family_columns(names)], 1)


def _p(null: np.ndarray, t: np.ndarray) -> np.ndarray:
    """numpy: ``(1 + #{null >= t}) / (n + 1)``."""
    return (1 + (null[None, :] >= t[:, None]).sum(axis=1)) / (len(null) + 1)


def test_the_family_nulls_are_the_held_out_images_statistics(gated):
    model, table = gated
    a = table.alarm
    names = a.component_names()
    assert all(family_columns(names)), names  # every family has a component here
    with SurpriseMonitor(model, table) as monitor:
        held = monitor.inspect(IMAGES[600:1000])
        labelled = monitor.inspect(IMAGES[600:1000], LABELS[600:1000])
    for nulls, report in ((a.family_null_predicted, held), (a.family_null_labelled, labelled)):
        want = _statistics(report.component_ranks.double().numpy(), names)
        assert nulls.sizes == [400] * 3 == [a.null_predicted.size] * 3
        for f, null in enumerate(nulls.nulls):
            np.testing.assert_allclose(null.scores.numpy(), np.sort(want[:, f]), rtol=1e-5)


def test_a_report_s_family_p_values_are_numpy_s_and_hold_their_rate(gated):
    model, table = gated
    names = table.alarm.component_names()
    with SurpriseMonitor(model, table) as monitor:
        fresh = monitor.inspect(IMAGES[1000:3000])
    got = fresh.family_p_values.double().numpy()
    stats = _statistics(fresh.component_ranks.double().numpy(), names)
    for f, null in enumerate(table.alarm.family_null_predicted.nulls):
        np.testing.assert_allclose(got[:, f], _p(null.scores.double().numpy(), stats[:, f]),
                                   rtol=1e-5)  # fmt: skip
    rates = (got <= 0.1).mean(axis=0)  # fresh images are drawn as the held-out ones were
    assert (np.abs(rates - 0.1) <= 4 * np.sqrt(0.1 * 0.9 / 2000) + 3 * np.sqrt(0.09 / 400)).all()


def test_the_alarm_kind_is_the_family_of_the_smallest_p_value_on_the_page_and_in_json(gated):
    model, table = gated
    with SurpriseMonitor(model, table) as monitor:
        report = monitor.inspect(torch.cat([IMAGES[1000:1100], IMAGES[3000:3020] * 4.0]))
    alarmed = torch.nonzero(report.alarm).flatten().tolist()
    assert len(alarmed) >= 20
    # four times the pixel values (a camera's gain): the early stages' statistics say so
    assert {report.alarm_kind(i) for i in alarmed if i >= 100} == {"low_level"}
    for i in alarmed:
        p = report.family_p_values[i].tolist()
        kind = report.alarm_kind(i)
        assert p[FAMILIES.index(kind)] == min(p)
        sample = report.sample(i)
        assert sample["alarm_kind"] == kind
        assert sample["family_p_values"] == pytest.approx(dict(zip(FAMILIES, p, strict=True)))
    record = AlarmRecord(id=1, time=0.0, request_id=None, table_fingerprint="f" * 64,
                         report=report.sample(i), thumbnail=b"")  # fmt: skip
    html = detail_page(record, "/alarms")
    assert 'id="family-p"' in html
    ordered = sorted(FAMILIES, key=lambda f: sample["family_p_values"][f])
    shown = html.split('id="family-p">')[1].split("</dd>")[0]
    assert [s.rsplit(" ", 1)[0] for s in shown.split(", ")] == [
        f.replace("_", " ") for f in ordered
    ]
    assert sample["alarm_kind"].replace("_", " ") == shown.split(", ")[0].rsplit(" ", 1)[0]


def test_the_file_keeps_the_family_nulls(gated, tmp_path):
    model, table = gated
    path = table.save(tmp_path / "t.safetensors")
    back = CalibrationTable.load(path)
    for name in ("family_null_predicted", "family_null_labelled"):
        for m, n in zip(getattr(back.alarm, name).nulls, getattr(table.alarm, name).nulls,
                        strict=True):  # fmt: skip
            assert torch.equal(m.scores, n.scores)
    with SurpriseMonitor(model, back) as again, SurpriseMonitor(model, table) as now:
        torch.testing.assert_close(again.inspect(IMAGES[1000:1050], LABELS[1000:1050])
                                   .family_p_values,
                                   now.inspect(IMAGES[1000:1050], LABELS[1000:1050])
                                   .family_p_values)  # fmt: skip


def test_a_table_without_family_nulls_judges_and_names_kinds_as_before(gated, tmp_path):
    model, table = gated
    old = load_edited(table, tmp_path, lambda m: m["alarm"].pop("family_nulls") and None)
    assert old.alarm.family_null_predicted is None
    x = torch.cat([IMAGES[1000:1100], IMAGES[3000:3020] * 4.0])
    with SurpriseMonitor(model, old) as before, SurpriseMonitor(model, table) as now:
        was, report = before.inspect(x), now.inspect(x)
    assert torch.equal(was.score, report.score) and torch.equal(was.alarm, report.alarm)
    assert torch.isnan(was.family_p_values).all()
    names = old.alarm.component_names()
    for i in torch.nonzero(was.alarm).flatten().tolist():
        assert was.sample(i)["family_p_values"] == dict.fromkeys(FAMILIES)
        assert was.alarm_kind(i) == alarm_kind(
            names, was.component_ranks[i].tolist(), float(was.score[i]), None, old.alarm.evidence
        )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["alarm"].update(family_nulls=["colour"]), "unknown families"),
        (lambda m: m["alarm"].update(family_nulls="all"), "'alarm.family_nulls' must be a list"),
        (lambda m: m["alarm"].update(family_nulls=["class_evidence"]), "'low_level' is missing"),
    ],
)
def test_bad_family_nulls_are_a_table_error(gated, tmp_path, edit, message):
    _, table = gated
    assert_load_refuses(table, tmp_path, edit, message)
