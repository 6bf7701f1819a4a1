"""The operator's page of recent alarms as plain server-rendered HTML (no build step, a few
lines of JS). Every value that comes from an input, a request or the table (class names,
request ids, report fields) is escaped with :func:`html.escape`; JSON shown on a page is
escaped too."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from surprise_monitor.monitor.alarms.log import KINDS, AlarmRecord
from surprise_monitor.monitor.atypicality import ALARM_KINDS

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;background:#fff}
header{display:flex;gap:2em;align-items:baseline;flex-wrap:wrap}
.rate{font-size:1.1em;padding:.3em .6em;border-radius:4px;background:#eef}
.rate.high{background:#fdd}
table{border-collapse:collapse;margin-top:1em}
th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:middle}
img.thumb{width:64px;height:64px;image-rendering:pixelated;border:1px solid #999}
.kind{font-size:.85em;padding:1px 5px;border-radius:3px;margin-right:3px;background:#eee}
.kind.surprise{background:#fed}.kind.expectation{background:#def}.kind.low_beta{background:#efe}
td.filters{font-family:monospace;font-size:.85em}
#figure{max-width:100%;border:1px solid #999}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px}dd{margin:0}
pre{background:#f6f6f6;padding:.8em;overflow:auto;max-height:30em}
"""

_SCRIPT = """
document.querySelectorAll('form.filters select').forEach(function (s) {
  s.addEventListener('change', function () { s.form.submit(); });
});
document.querySelectorAll('tr.alarm').forEach(function (row) {
  row.addEventListener('click', function (e) {
    if (e.target.tagName !== 'A') { window.location = row.dataset.href; }
  });
});
"""


def _page(title: str, body: str, script: str = "") -> str:
    """A whole HTML document."""
    js = f"<script>{script}</script>" if script else ""
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{body}{js}</body></html>"
    )


def _number(value: Any, fmt: str) -> str:
    """``value`` formatted, or an em dash for ``None``."""
    return "\u2014" if value is None else format(float(value), fmt)


def _parts(components: Any) -> str:
    """The score's components by tail rank, smallest (most atypical) first, escaped."""
    if not isinstance(components, dict) or not components:
        return "\u2014"
    ranked = sorted(
        components.items(),
        key=lambda kv: (kv[1] or {}).get("tail_rank") or 2.0,
    )
    return ", ".join(
        f"{escape(str(name))} {_number((part or {}).get('tail_rank'), '.4f')}"
        for name, part in ranked
    )


def _families(p_values: Any) -> str:
    """Each component family's p-value among held-out images', smallest first, escaped (a
    dash for a table without family nulls)."""
    if not isinstance(p_values, dict) or all(v is None for v in p_values.values()):
        return "\u2014"
    ranked = sorted(p_values.items(), key=lambda kv: 2.0 if kv[1] is None else kv[1])
    return ", ".join(
        f"{escape(str(name).replace('_', ' '))} {_number(p, '.4f')}" for name, p in ranked
    )


def _when(seconds: float) -> str:
    """A UTC time stamp."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def _percent(value: Any) -> str:
    """A fraction as a percentage with two decimals, or an em dash."""
    return _number(None if value is None else 100 * float(value), ".2f")


def rate_header(status: Mapping[str, Any]) -> str:
    """The header's alarm rate against its nominal value (``status``: ``alarm_rate`` nominal,
    ``window_alarm_rate``, ``window_size``, ``ks_distance``, ``recorded``; any may be None)."""
    nominal = status.get("alarm_rate")
    rate, m = status.get("window_alarm_rate"), status.get("window_size") or 0
    high = rate is not None and nominal is not None and m and rate > 2 * nominal
    text = (
        f"alarm rate {_percent(rate)}% of the last {int(m)} judged inputs; "
        f"nominal {_percent(nominal)}%"
    )
    ks = status.get("ks_distance")
    extra = f" &middot; drift (KS distance) {_number(ks, '.3f')}" if ks is not None else ""
    recorded = status.get("recorded")
    total = f" &middot; {int(recorded)} alarms recorded" if recorded is not None else ""
    kind = "rate high" if high else "rate"
    return f'<span class="{kind}" id="rate">{escape(text)}{extra}{total}</span>'


def _filters(items: Sequence[Mapping[str, Any]], limit: int = 3) -> str:
    """``#filter (percentile)`` for the first few flagged filters."""
    return (
        ", ".join(
            f"#{int(f['filter'])} (P{float(f['percentile']):.1f})" for f in list(items)[:limit]
        )
        or "\u2014"
    )


def _row(rec: AlarmRecord, base: str) -> str:
    """One alarm's table row."""
    r = rec.report
    kinds = "".join(f'<span class="kind {escape(k)}">{escape(k)}</span>' for k in rec.kinds)
    atypical = r.get("alarm_kind")
    if atypical:
        kinds = (
            f'<span class="atypical" title="{escape(ALARM_KINDS.get(atypical, atypical))}">'
            f"{escape(atypical.replace('_', ' '))}</span> " + kinds
        )
    href = f"{base}/{rec.id}"
    return (
        f'<tr class="alarm" id="alarm-{rec.id}" data-id="{rec.id}" '
        f'data-class="{escape(rec.class_name)}" data-kinds="{escape(" ".join(rec.kinds))}" '
        f'data-href="{escape(href)}">'
        f'<td>{rec.id}</td><td title="{escape(_when(rec.time))}">'
        f"{escape(_when(rec.time)[11:19])}</td>"
        f'<td><img class="thumb" alt="input {rec.id}" src="{escape(href)}/thumbnail.png"></td>'
        f'<td class="class">{escape(rec.class_name)}</td>'
        f'<td class="score">{_number(r.get("score"), ".3f")}</td>'
        f'<td class="p">{_number(r.get("p_value"), ".4f")}</td><td>{kinds}</td>'
        f'<td class="filters">{escape(_filters(r.get("surprising_filters", [])))}</td>'
        f'<td class="filters">{escape(_filters(r.get("expected_filters", [])))}</td>'
        f"<td>{escape(rec.request_id or '')}{_replica(rec)}</td>"
        f'<td><a class="explain" href="{escape(href)}">explain</a></td></tr>'
    )


def _kind_text(report: Mapping[str, Any]) -> str:
    """What the alarm's kind tells the operator (``report["alarm_kind"]``), or a dash."""
    kind = report.get("alarm_kind")
    if not kind:
        return "\u2014"
    return f"{kind.replace('_', ' ')}: {ALARM_KINDS.get(kind, 'another part of the score')}"


def _replica(rec: AlarmRecord) -> str:
    """The replica that judged the alarm, under its request id (nothing with one process)."""
    if not rec.replica:
        return ""
    return f'<br><small class="replica">replica {escape(rec.replica)}</small>'


def _select(name: str, options: Sequence[str], chosen: str | None, label: str) -> str:
    """A filter ``<select>`` with an "all" option."""
    opts = ['<option value="">all</option>'] + [
        f'<option value="{escape(o)}"{" selected" if o == chosen else ""}>{escape(o)}</option>'
        for o in options
    ]
    return f'<label>{escape(label)} <select name="{name}">{"".join(opts)}</select></label>'


def list_page(
    records: Sequence[AlarmRecord],
    status: Mapping[str, Any],
    base: str,
    classes: Sequence[str],
    cls: str | None = None,
    kind: str | None = None,
) -> str:
    """The page of recent alarms, newest first, with the class / kind filters."""
    form = (
        f'<form class="filters" method="get" action="{escape(base)}/">'
        f"{_select('class', classes, cls, 'class')} {_select('kind', KINDS, kind, 'flag')}"
        "<noscript><button>filter</button></noscript></form>"
    )
    head = (
        "<tr><th>#</th><th>time (UTC)</th><th>input</th><th>class</th><th>score</th>"
        "<th>p-value</th><th>flags</th><th>most surprising filters</th>"
        "<th>most expected (missing)</th><th>request</th><th></th></tr>"
    )
    rows = "".join(_row(r, base) for r in records)
    empty = "" if records else '<p id="empty">No alarms recorded (for this filter).</p>'
    body = (
        f"<header><h1>Recent alarms</h1>{rate_header(status)}</header>{form}"
        f'<table id="alarms"><thead>{head}</thead><tbody>{rows}</tbody></table>{empty}'
        "<p>Click an alarm for its explanation: the region of the input behind the filter "
        "that explains it, and that filter's training exemplars.</p>"
    )
    return _page("Recent alarms", body, _SCRIPT)


_EXPLAIN_SCRIPT = """
var box = document.getElementById('explanation-facts');
if (box && box.dataset.src) {
  fetch(box.dataset.src).then(function (r) { return r.ok ? r.json() : null; })
    .then(function (d) {
      if (!d) { box.textContent = 'the explanation could not be computed'; return; }
      var pct = function (v) { return (100 * v).toFixed(1) + '%'; };
      var lines = ['filter ' + d.filter + ' (' + d.kind + ')',
        d.has_region ? 'region: superpixel ' + d.top_segment + ', ' + pct(d.region_share) +
          ' of the saliency' : 'no region',
        'the filter carries ' + pct(d.filter_share) + " of the class score's gradient"];
      if (d.note) { lines.push(d.note); }
      box.textContent = lines.join(' \u00b7 ');
    });
}
"""


def explanation_facts(data: Mapping[str, Any] | None, src: str) -> str:
    """The explanation's filter, region, shares and note (escaped), from its summary
    (``Explanation.to_dict()``); ``None``: a placeholder the page's script fills from ``src``."""
    if data is None:
        return (
            f'<p id="explanation-facts" data-src="{escape(src)}">computing the explanation '
            "(filter, region and how sure it is)\u2026</p>"
        )
    region = (
        f"superpixel {int(data['top_segment'])}, {_percent(data.get('region_share'))}% of the "
        "saliency"
        if data.get("has_region")
        else "no region"
    )
    note = str(data.get("note") or "")
    shown = f'<p id="explanation-note"><strong>{escape(note)}</strong></p>' if note else ""
    return (
        f'<dl id="explanation-facts"><dt>filter</dt><dd id="explanation-filter">'
        f"{int(data['filter'])} ({escape(str(data.get('kind')))})</dd>"
        f'<dt>region</dt><dd id="explanation-region">{escape(region)}</dd>'
        f'<dt>filter\'s share of the class score</dt><dd id="filter-share">'
        f"{_percent(data.get('filter_share'))}%</dd>"
        f'<dt>region\'s share of the saliency</dt><dd id="region-share">'
        f"{_percent(data.get('region_share'))}%</dd>"
        f"<dt>alarm component</dt><dd>{escape(str(data.get('alarm_component') or ''))}</dd>"
        f"</dl>{shown}<p>A low share means a weak explanation: the filter carries little of "
        "the class score, or the region holds little of its saliency; look at the other "
        "filters and at the score's parts.</p>"
    )


def detail_page(rec: AlarmRecord, base: str, explanation: Mapping[str, Any] | None = None) -> str:
    """One alarm: its thumbnail, report, the explanation figure (computed on demand) and the
    explanation's facts (``explanation``, its summary when computed; else the page fetches
    it): the filter, the region or "no region", how sure it is, and why a region is missing."""
    href = f"{base}/{rec.id}"
    r = rec.report
    facts = (
        f'<dl><dt>class</dt><dd id="class">{escape(rec.class_name)}</dd>'
        f"<dt>score</dt><dd>{_number(r.get('score'), '.4f')}</dd>"
        f"<dt>p-value</dt><dd>{_number(r.get('p_value'), '.5f')}</dd>"
        f'<dt>kind of atypicality</dt><dd id="alarm-kind">{escape(_kind_text(r))}</dd>'
        f'<dt>p-value per family</dt><dd id="family-p">{_families(r.get("family_p_values"))}</dd>'
        f'<dt>score parts (tail rank)</dt><dd id="parts">{_parts(r.get("components"))}</dd>'
        f"<dt>time</dt><dd>{escape(_when(rec.time))}</dd>"
        f"<dt>request</dt><dd>{escape(rec.request_id or '')}</dd>"
        + (f'<dt>replica</dt><dd id="replica">{escape(rec.replica)}</dd>' if rec.replica else "")
        + f"<dt>table</dt><dd><code>{escape(rec.table_fingerprint[:16])}</code></dd></dl>"
    )
    figure = (
        f'<img id="figure" alt="explanation of alarm {rec.id}" src="{escape(href)}/explanation.png"'
        " onload=\"document.body.dataset.figure='loaded:'+this.naturalWidth\""
        " onerror=\"document.body.dataset.figure='failed'\">"
    )
    report = escape(json.dumps(r, indent=2))
    body = (
        f'<p><a href="{escape(base)}/">&larr; recent alarms</a></p>'
        f"<h1>Alarm {rec.id}</h1>"
        f'<img class="thumb" alt="input" src="{escape(href)}/thumbnail.png">{facts}'
        f"<h2>Explanation</h2>{explanation_facts(explanation, f'{href}/explanation.json')}"
        f'{figure}<h2>Report</h2><pre id="report">{report}</pre>'
    )
    return _page(f"Alarm {rec.id}", body, "" if explanation is not None else _EXPLAIN_SCRIPT)
