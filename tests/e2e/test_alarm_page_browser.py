"""End to end in a real headless browser: the service's (``python -m surprise_monitor.serve``)
operator page renders the alarms of a test run, escapes hostile class names, the explanation
figure loads, and a screenshot is not blank. Needs Debian's ``chromium`` (``.ci/run`` installs
it; marker ``browser``, its own CI step). Bounded: a few requests, each browser run under 120 s."""

from __future__ import annotations

import html.parser
import io
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from bench._serve_process import start_service, stop_process
from tests._models import heldout_dataset

HOSTILE = [
    "<script>document.title='PWNED'</script>",
    '<img src=x onerror="document.body.dataset.pwned=1">',
    'bird & "friends"',
]

pytestmark = pytest.mark.browser
needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="chromium is missing (Debian package 'chromium'; .ci/run installs it)",
)


def chromium(args: list[str], profile: Path, timeout: float = 120) -> str:
    """Headless chromium with flags that avoid hangs on a machine without network; stdout."""
    cmd = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


class Dom(html.parser.HTMLParser):
    """Start tags with their attributes, and the text of each element id'd or classed."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.title = ""
        self._in_title = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_title = tag == "title"

    def handle_data(self, data):
        if self._in_title:
            self.title += data

    def handle_endtag(self, tag):
        self._in_title = False

    def all(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        return [
            a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())
        ]


@pytest.fixture
def page_service(saved_tiny_model, tmp_path):
    """The example service over a table with hostile class names whose data_source records the
    normalisation and the training images (an npz of the calibration images, un-normalised),
    so explanations show exemplars; a run of normal and noise inputs sent to it. Yields (url,
    alarms JSON, a folder)."""
    from surprise_monitor.calibrate import CalibrationTable
    from tests._models import class_images

    _, _, args = saved_tiny_model
    table = CalibrationTable.load(args[args.index("--table") + 1])
    table.class_names = list(HOSTILE)
    images = class_images(600, 3, seed=1)[0]  # the calibration images, in index order
    raw = (images * 0.2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    np.savez(tmp_path / "train.npz", x=raw.permute(0, 2, 3, 1).numpy())
    table.data_source = {"kind": "npz", "path": str(tmp_path / "train.npz"), "key": "x",
                         "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}  # fmt: skip
    saved = table.save(tmp_path / "hostile.safetensors")
    args = [*args[: args.index("--table")], "--table", str(saved), "--alarm-log", "100",
            "--alarm-audit", str(tmp_path / "audit" / "alarms.jsonl")]  # fmt: skip
    proc, url = start_service(args, tmp_path / "serve.log")
    try:
        normal = heldout_dataset(60, start=9000).tensors[0]
        g = torch.Generator().manual_seed(5)
        noise = -5.0 + 9.4 * torch.rand(6, 3, 8, 8, generator=g)  # the images' range
        for i, x in enumerate([normal[:30], torch.cat([normal[30:], noise])]):
            resp = httpx.post(url + "/predict", json={"inputs": x.tolist()},
                              headers={"X-Request-ID": f"run-{i}"}, timeout=60)  # fmt: skip
            assert resp.status_code == 200, resp.text
        alarms = httpx.get(url + "/alarms/alarms.json", timeout=30).json()
        assert len(alarms["alarms"]) >= 6
        yield url, alarms, tmp_path
    finally:
        stop_process(proc)


@needs_chromium
def test_the_page_renders_the_runs_alarms_in_chromium(page_service):
    url, alarms, tmp = page_service
    dom = Dom(chromium(["--dump-dom", url + "/alarms/"], tmp / "profile"))
    rows = dom.all("tr", **{"class": "alarm"})
    assert [int(r["data-id"]) for r in rows] == [a["id"] for a in alarms["alarms"]]
    assert [r["data-class"] for r in rows] == [a["class_name"] for a in alarms["alarms"]]
    assert {r["data-class"] for r in rows} <= set(HOSTILE)
    assert dom.title == "Recent alarms"  # no class name ran as a script
    body = dom.all("body")[0]
    assert "data-pwned" not in body  # no class name became an element with a handler
    assert len(dom.all("script")) == 1
    assert len(dom.all("img", **{"class": "thumb"})) == len(rows)
    rate = [a for t, a in dom.tags if t == "span" and a.get("id") == "rate"]
    assert rate and len(dom.all("select")) == 2
    kind = Dom(chromium(["--dump-dom", url + "/alarms/?kind=surprise"], tmp / "profile"))
    want = [a["id"] for a in alarms["alarms"] if "surprise" in a["kinds"]]
    assert [int(r["data-id"]) for r in kind.all("tr", **{"class": "alarm"})] == want
    audit = (tmp / "audit" / "alarms.jsonl").read_text().splitlines()
    assert len(audit) == len(rows)


@needs_chromium
def test_the_explanation_figure_loads(page_service):
    url, alarms, tmp = page_service
    newest = alarms["alarms"][0]
    page = chromium(["--dump-dom", "--virtual-time-budget=60000", f"{url}/alarms/{newest['id']}"],
                    tmp / "profile")  # fmt: skip
    dom = Dom(page)
    body = dom.all("body")[0]
    assert (body.get("data-figure") or "").startswith("loaded:"), body
    assert int(body["data-figure"].split(":")[1]) > 100  # the figure's natural width
    assert newest["request_id"] == "run-1"
    summary = httpx.get(f"{url}/alarms/{newest['id']}/explanation.json", timeout=60).json()
    assert summary["class"] == newest["report"]["class"]
    assert len(summary["exemplars"]) >= 1  # the filter's training exemplars are in the figure


@needs_chromium
def test_a_screenshot_shows_the_page(page_service):
    url, alarms, tmp = page_service
    shot = tmp / "page.png"
    chromium([f"--screenshot={shot}", "--window-size=1280,800", url + "/alarms/"],
             tmp / "profile")  # fmt: skip
    picture = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB"))
    assert picture.shape == (800, 1280, 3)
    assert picture.std() > 10  # not blank
    gray = picture.mean(axis=2)
    rows_with_ink = np.count_nonzero((gray < 128).sum(axis=1) > 5)
    assert rows_with_ink > 100  # text and thumbnails on many lines
    colours = np.unique(picture.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 50  # thumbnails of noise are colourful
