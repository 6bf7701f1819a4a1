"""Which filter an explanation or a fix is about, for sample 0 of a report.

The rule (:func:`choose_filter`), unless the caller names a filter:

1. a surprising filter that **fired**: flagged (``alpha > P_cn(surprise_pct)``) and ``alpha > 0``
   (``alpha_n = mean_ij(dO_c/dA_ij(n) * A_ij(n))`` is positive only where the filter's map is
   not zero). Surprising filters are ranked by how far they sit beyond the class's range,
   ``(alpha - P_cn(surprise_pct)) / (P_cn(surprise_pct) - P_cn(50))`` (infinite where the
   class's range is flat, ``P99.9 == P50``: any excess is then beyond all of it), then by
   ``alpha - mu``, then by id; filters that fired rank before filters that are merely above a
   negative threshold (alpha 0, "surprising" only because the class's P99.9 lies below 0);
2. else the most expected filter (most negative ``alpha - mu``): its explanation is about an
   absence;
3. else the highest-ranked surprising filter that did not fire, with no region drawn;
4. else (nothing flagged) the filter with the highest percentile among those that fired
   (``"unflagged"``; when none fired, the highest percentile of all: its gradient is zero and
   there is no region).

A fix (:func:`most_surprising_filter`) takes step 1, else step 4.

From step 2 on, ``Choice.note`` says "no surprising filter fired; the alarm comes from
<component>", naming the alarm's component with the smallest tail rank
(:func:`alarm_component`). Without a table the ranking of step 1 falls back on ``alpha - mu``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from surprise_monitor.monitor.report import MonitorReport
from surprise_monitor.monitor.table import CalibrationTable

#: The explanation's note when no surprising filter fired on the input.
NO_FIRED = "no surprising filter fired"


class Choice(NamedTuple):
    """The chosen filter and why (the first three fields are the old ``(filter, kind, reason)``)."""

    filter: int
    kind: str  # "surprise", "expectation" or "unflagged"
    reason: str  # how it was chosen
    note: str = ""  # "" when a surprising filter that fired was chosen (or the caller's)
    region: bool = True  # whether a region may be drawn (never for a surprise that did not fire)
    candidates: tuple[int, ...] = ()  # the surprising filters that fired, best first


def fired(report: MonitorReport, filter: int) -> bool:
    """Whether ``filter`` fires on sample 0: ``alpha > 0`` (its map is not zero where the class
    score's gradient reaches it; the report does not carry the activation itself)."""
    return float(report.alpha[0, filter]) > 0.0


def beyond_range(
    report: MonitorReport, table: CalibrationTable, surprise_pct: float
) -> torch.Tensor:
    """``[N]`` float64: how far each filter's alpha sits beyond the class's range,
    ``(alpha - P(surprise_pct)) / (P(surprise_pct) - P50)``; ``+inf`` (``-inf`` below) where the
    class's range is flat (``P(surprise_pct) <= P50``)."""
    c = int(report.classes[0])
    high = table.value_at(surprise_pct)[c].double()
    spread = high - table.value_at(50.0)[c].double()
    excess = report.alpha[0].double() - high
    flat = torch.where(excess > 0, math.inf, -math.inf)
    return torch.where(spread > 0, excess / spread.clamp_min(1e-300), flat)


def ranked_surprising(
    report: MonitorReport, table: CalibrationTable | None = None, surprise_pct: float = 99.9
) -> list[int]:
    """Sample 0's surprising filters, best first: those that fired before the others, then the
    furthest beyond the class's range (:func:`beyond_range`; without a table: ``alpha - mu``),
    then the largest ``alpha - mu``, then the lower id."""
    flagged = [f.filter for f in report.surprising_filters(0)]
    dev = report.deviation[0].double()
    far = beyond_range(report, table, surprise_pct) if table is not None else dev
    return sorted(flagged, key=lambda n: (not fired(report, n), -float(far[n]), -float(dev[n]), n))


def alarm_component(report: MonitorReport) -> str:
    """The alarm's component with the smallest tail rank on sample 0 (the part of the network
    that found the input least like the training images), else what flagged it."""
    parts = report.component_parts(0)
    ranked = [(p["tail_rank"], i, name) for i, (name, p) in enumerate(parts.items())
              if p["tail_rank"] is not None]  # fmt: skip
    if ranked:
        return min(ranked)[2]
    if bool(report.low_beta[0]):
        return "a low beta (the filters together)"
    return "the alarm's score (no component recorded)"


def no_fired_note(report: MonitorReport, silent: int) -> str:
    """``"no surprising filter fired; the alarm comes from <component>"``, with the count of
    surprising filters that did not fire when there are some."""
    which = f" ({silent} flagged surprising, none with alpha > 0)" if silent else ""
    return f"{NO_FIRED}{which}; the alarm comes from {alarm_component(report)}"


def choose_filter(
    report: MonitorReport,
    filter: int | None,
    table: CalibrationTable | None = None,
    surprise_pct: float = 99.9,
) -> Choice:
    """The filter to explain on sample 0 (see the module docstring for the rule): the caller's,
    else a surprising one that fired, else the most expected one, else a surprising one that did
    not fire (no region), else the filter with the highest percentile (``"unflagged"``)."""
    n_filters = int(report.alpha.shape[1])
    if filter is not None:
        filter = int(filter)
        if not 0 <= filter < n_filters:
            raise ValueError(f"filter {filter} is outside the layer's {n_filters} filters")
        return Choice(filter, kind_of(report, filter), "chosen by the caller")
    sur = ranked_surprising(report, table, surprise_pct)
    hot = tuple(n for n in sur if fired(report, n))
    if hot:
        why = f"the surprising filter furthest beyond the class's range of {len(hot)} that fired"
        return Choice(hot[0], "surprise", f"{why} ({len(sur)} surprising)", candidates=hot)
    note = no_fired_note(report, len(sur))
    exp = report.expected_filters(0)
    if exp:
        return Choice(exp[0].filter, "expectation",
                      f"most expected of {len(exp)} expected filters", note)  # fmt: skip
    if sur:
        why = f"most surprising of {len(sur)} surprising filters, none of which fired: no region"
        return Choice(sur[0], "surprise", why, note, region=False)
    best = highest_percentile_fired(report)
    return Choice(best, "unflagged", "no filter is flagged; the filter with the highest "
                  "percentile" + (" that fired" if fired(report, best) else ""),
                  note)  # fmt: skip


def most_surprising_filter(
    report: MonitorReport, table: CalibrationTable | None = None, surprise_pct: float = 99.9
) -> tuple[int, str]:
    """``(filter, kind)`` for sample 0: the best surprising filter that fired (as in
    :func:`choose_filter`), else the highest-percentile one that fired (``"unflagged"``; when no
    filter fired, the fix finds its gradient zero: no region)."""
    hot = [n for n in ranked_surprising(report, table, surprise_pct) if fired(report, n)]
    if hot:
        return hot[0], "surprise"
    return highest_percentile_fired(report), "unflagged"


def highest_percentile_fired(report: MonitorReport) -> int:
    """Sample 0's filter with the highest percentile rank among those that fired (alpha > 0;
    ties as :meth:`MonitorReport.highest_percentile_filter`: the larger ``alpha - mu``, then the
    lower id), or the highest-percentile filter of all when none fired."""
    alpha = report.alpha[0].double()
    hot = [n for n in range(int(alpha.numel())) if float(alpha[n]) > 0.0]
    if not hot:
        return report.highest_percentile_filter(0)
    pct, dev = report.percentile[0].double(), report.deviation[0].double()
    return max(hot, key=lambda n: (float(pct[n]), float(dev[n]), -n))


def kind_of(report: MonitorReport, filter: int) -> str:
    """Filter ``filter``'s kind for sample 0: ``"surprise"``, ``"expectation"`` (flagged so) or
    ``"unflagged"``."""
    if bool(report.surprise[0, filter]):
        return "surprise"
    return "expectation" if bool(report.expectation[0, filter]) else "unflagged"


def filter_share(report: MonitorReport, filter: int) -> float:
    """The share of the class score's first-order gradient at the layer that flows through
    ``filter`` on sample 0: ``|alpha_n| / sum_m |alpha_m|`` in [0, 1] (``alpha_n * H * W`` is
    filter n's term of the class score's first-order expansion at the layer); 0 when every
    alpha is 0."""
    a = report.alpha[0].double().abs()
    total = float(a.sum())
    return float(a[filter]) / total if total > 0 else 0.0
