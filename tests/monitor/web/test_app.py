"""The operator's page as an ASGI app (Starlette's TestClient): the alarms a run recorded,
newest first, filters, thumbnails, explanations on demand, escaping of hostile names."""

from __future__ import annotations

import dataclasses
import html.parser
import io
from html import escape

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from surprise_monitor.monitor import AlarmLog, SurpriseMonitor
from surprise_monitor.monitor.atypicality import ALARM_KINDS
from surprise_monitor.monitor.families import FAMILIES, family_columns, kind_of
from surprise_monitor.monitor.options import MetricsOptions
from surprise_monitor.monitor.web.app import alarm_app
from tests._models import SILENT, heldout_dataset, silent_photo_setup, with_silent_surprise

HOSTILE = ["<script>window.pwned=1</script>", "b&c\"'", "<img src=x onerror=alert(1)>"]
PLAIN = {"mean": [0.0] * 3, "std": [1.0] * 3}


class _Dom(html.parser.HTMLParser):
    """Tags with their attributes, and the page's text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> _Dom:
    dom = _Dom()
    dom.feed(page)
    return dom


@pytest.fixture
def served(calibrated):
    model, table = calibrated
    hostile = dataclasses.replace(table, class_names=list(HOSTILE))
    log = AlarmLog(capacity=100, keep_inputs=5, explain_kwargs=PLAIN)
    g = torch.Generator().manual_seed(1)
    noise = -5.0 + 9.4 * torch.rand(8, 3, 8, 8, generator=g)
    x = torch.cat([heldout_dataset(40, start=8000).tensors[0], noise])
    metrics = MetricsOptions(CollectorRegistry(), window=48)
    with SurpriseMonitor(model, hostile, alarm_log=log, metrics=metrics) as monitor:
        report = monitor.run(x, request_id="<b>req</b>").report
        app = alarm_app(log, monitor)
        with TestClient(app, root_path="/alarms") as client:
            yield client, log, report, monitor
    log.close()


def test_the_page_lists_the_runs_alarms_newest_first_escaped(served):
    client, log, report, _ = served
    page = client.get("/").text
    dom = parse(page)
    rows = [a for t, a in dom.tags if t == "tr" and a.get("class") == "alarm"]
    alarms = int(report.alarm.sum())
    assert len(rows) == alarms == len(log) >= 8
    assert [int(r["data-id"]) for r in rows] == sorted((r.id for r in log.recent()), reverse=True)
    assert [r["data-class"] for r in rows] == [r.class_name for r in log.recent()]
    assert set(r["data-class"] for r in rows) <= set(HOSTILE)
    scripts = [t for t, _ in dom.tags if t == "script"]
    assert len(scripts) == 1  # the page's own; no class name became a tag
    assert not any(t == "img" and a.get("onerror") == "alert(1)" for t, a in dom.tags)
    for name in log.class_names():  # each hostile name shows as text, never as markup
        assert escape(name) in page and name not in page
    assert "<script>window" not in page and "<img src=x" not in page
    assert "&lt;b&gt;req&lt;/b&gt;" in page and "<b>req</b>" not in page
    thumbs = [a["src"] for t, a in dom.tags if t == "img" and a.get("class") == "thumb"]
    assert thumbs[0] == f"/alarms/{rows[0]['data-id']}/thumbnail.png"
    header = next(a for t, a in dom.tags if t == "span" and a.get("id") == "rate")
    assert header is not None
    rate = float(report.alarm.float().mean()) * 100
    assert f"alarm rate {rate:.2f}% of the last 48 judged inputs; nominal 1.00%" in page


def test_filters_by_class_and_kind(served):
    client, log, _, _ = served
    for name in log.class_names():
        dom = parse(client.get("/", params={"class": name}).text)
        got = [a["data-class"] for t, a in dom.tags if t == "tr" and a.get("class") == "alarm"]
        assert got == [name] * len(log.recent(cls=name)) and got
    for kind in ("surprise", "expectation", "low_beta"):
        dom = parse(client.get("/", params={"kind": kind}).text)
        ids = [int(a["data-id"]) for t, a in dom.tags if t == "tr" and a.get("class") == "alarm"]
        assert ids == [r.id for r in log.recent(kind=kind)]
    bad = client.get("/", params={"kind": "<x>"})
    assert bad.status_code == 400 and "surprise" in bad.text


def test_thumbnails_json_and_explanations(served):
    client, log, report, _ = served
    newest = log.recent()[0]
    thumb = client.get(f"/{newest.id}/thumbnail.png")
    assert thumb.headers["content-type"] == "image/png" and thumb.content == newest.thumbnail
    data = client.get("/alarms.json").json()
    assert [a["id"] for a in data["alarms"]] == [r.id for r in log.recent()]
    assert data["status"]["recorded"] == log.recorded
    detail = client.get(f"/{newest.id}").text
    dom = parse(detail)
    figure = next(a for t, a in dom.tags if t == "img" and a.get("id") == "figure")
    assert figure["src"] == f"/alarms/{newest.id}/explanation.png"
    png = client.get(f"/{newest.id}/explanation.png")
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).width > 100
    parts = newest.report["components"]  # the score's parts, most atypical (lowest rank) first
    shown = "".join(dom.text[dom.text.index("score parts (tail rank)") + 1 :][:1])
    ranked = sorted(parts, key=lambda name: parts[name]["tail_rank"])
    assert shown == ", ".join(f"{n} {parts[n]['tail_rank']:.4f}" for n in ranked)
    assert sorted(ranked) == sorted(report.component_names) and len(ranked) == 7  # gated, KNN
    # the kind of atypicality (the family of the smallest family p-value), in the JSON and on
    # the page with what it means, and every family's p-value beside it
    kind = newest.report["alarm_kind"]
    ranks = [parts[n]["tail_rank"] for n in parts]
    family = newest.report["family_p_values"]
    assert kind == kind_of([family[f] for f in FAMILIES], ranks, family_columns(list(parts)))
    shown_kind = dom.text[dom.text.index("kind of atypicality") + 1]
    assert shown_kind == f"{kind.replace('_', ' ')}: {ALARM_KINDS[kind]}"
    shown_p = dom.text[dom.text.index("p-value per family") + 1]
    ordered = sorted(FAMILIES, key=lambda f: family[f])
    assert shown_p == ", ".join(f"{f.replace('_', ' ')} {family[f]:.4f}" for f in ordered)
    summary = client.get(f"/{newest.id}/explanation.json").json()
    assert summary["class"] == newest.report["class"]
    oldest = log.recent()[-1]  # its input left the log (keep_inputs=5)
    gone = client.get(f"/{oldest.id}/explanation.png")
    assert gone.status_code == 404 and "no longer kept" in gone.text
    assert client.get("/99999").status_code == 404


def test_an_explanation_that_cannot_be_made_is_named(calibrated):
    model, table = calibrated  # its data_source records no normalisation
    log = AlarmLog()
    g = torch.Generator().manual_seed(2)
    with SurpriseMonitor(model, table, alarm_log=log) as monitor:
        monitor(-5.0 + 9.4 * torch.rand(2, 3, 8, 8, generator=g))
        with TestClient(alarm_app(log, monitor), raise_server_exceptions=False) as client:
            answer = client.get(f"/{log.recent()[0].id}/explanation.png")
    log.close()
    assert answer.status_code == 500 and "normalisation is unknown" in answer.text
    assert answer.headers["content-type"].startswith("text/plain")


def test_an_alarm_whose_surprising_filters_are_silent_shows_no_region():
    """A real photo whose only surprising filter never fires (alpha 0 above a negative P99.9):
    the explanation's JSON and page say "no surprising filter fired" and name the alarm's
    component; no region is drawn (no yellow outline on the figure)."""
    model, table, probe = silent_photo_setup()
    with SurpriseMonitor(model, table) as monitor:
        report = monitor.inspect(probe)
    rigged = with_silent_surprise(table, int(report.classes[0]), report.alpha[0], only=True)
    log = AlarmLog(keep_inputs=4)
    with SurpriseMonitor(model, rigged, alarm_log=log) as monitor:
        report = monitor.inspect(probe)
        assert [f.filter for f in report.surprising_filters(0)] == [SILENT]
        assert float(report.alpha[0, SILENT]) == 0.0
        rec = log.record(report, probe[0], "req-1")
        with TestClient(alarm_app(log, monitor), root_path="/alarms") as client:
            before = client.get(f"/{rec.id}").text  # not computed yet: the page fetches it
            data = client.get(f"/{rec.id}/explanation.json").json()
            png = client.get(f"/{rec.id}/explanation.png").content
            page = client.get(f"/{rec.id}").text
    log.close()
    ranks = report.component_ranks[0].numpy()
    component = report.component_names[int(np.nanargmin(ranks))]
    assert data["note"].startswith("no surprising filter fired")
    assert f"the alarm comes from {component}" in data["note"]
    assert (data["filter"], data["has_region"], data["top_segment"]) == (SILENT, False, None)
    assert data["top_region_pixels"] == 0 and data["fired"] is False
    assert 'id="explanation-facts"' in before and "explanation.json" in before
    dom = parse(page)
    text = " ".join(dom.text)
    assert "no surprising filter fired" in text and f"the alarm comes from {component}" in text
    region = dom.text[dom.text.index("region") + 1]
    assert region == "no region"
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert not ((rgb[..., 0] > 200) & (rgb[..., 1] > 200) & (rgb[..., 2] < 60)).any()


def test_the_page_shows_how_sure_the_explanation_is():
    """A filter that fired: its region, and both shares on the page as in the JSON."""
    model, table, probe = silent_photo_setup()
    log = AlarmLog(keep_inputs=4)
    with SurpriseMonitor(model, table, alarm_log=log) as monitor:
        rec = log.record(monitor.inspect(probe), probe[0], None)
        with TestClient(alarm_app(log, monitor), root_path="/alarms") as client:
            data = client.get(f"/{rec.id}/explanation.json").json()
            dom = parse(client.get(f"/{rec.id}").text)
    log.close()
    assert data["has_region"] and data["fired"] and data["note"] == ""
    assert 0 < data["filter_share"] <= 1 and 0 < data["region_share"] <= 1
    shown = {
        t: dom.text[dom.text.index(t) + 1]
        for t in ("filter's share of the class score", "region's share of the saliency")
    }
    assert shown["filter's share of the class score"] == f"{100 * data['filter_share']:.2f}%"
    assert shown["region's share of the saliency"] == f"{100 * data['region_share']:.2f}%"
    assert dom.text[dom.text.index("region") + 1].startswith(f"superpixel {data['top_segment']},")
