"""Which filter an explanation or a fix is about, for sample 0 of a report."""

from __future__ import annotations

from surprise_monitor.monitor.report import MonitorReport


def choose_filter(report: MonitorReport, filter: int | None) -> tuple[int, str, str]:
    """``(filter, kind, reason)`` for sample 0: the caller's filter, else the most surprising one
    (largest ``alpha - mu``), else the most expected one (most negative ``alpha - mu``), else the
    filter with the highest percentile (``"unflagged"``)."""
    n_filters = int(report.alpha.shape[1])
    if filter is not None:
        filter = int(filter)
        if not 0 <= filter < n_filters:
            raise ValueError(f"filter {filter} is outside the layer's {n_filters} filters")
        return filter, kind_of(report, filter), "chosen by the caller"
    sur = report.surprising_filters(0)
    if sur:
        return sur[0].filter, "surprise", f"most surprising of {len(sur)} surprising filters"
    exp = report.expected_filters(0)
    if exp:
        return exp[0].filter, "expectation", f"most expected of {len(exp)} expected filters"
    best = report.highest_percentile_filter(0)
    return best, "unflagged", "no filter is flagged; the filter with the highest percentile"


def most_surprising_filter(report: MonitorReport) -> tuple[int, str]:
    """``(filter, kind)`` for sample 0: the most surprising filter, else the highest-percentile
    one (``"unflagged"``)."""
    sur = report.surprising_filters(0)
    if sur:
        return sur[0].filter, "surprise"
    return report.highest_percentile_filter(0), "unflagged"


def kind_of(report: MonitorReport, filter: int) -> str:
    """Filter ``filter``'s kind for sample 0: ``"surprise"``, ``"expectation"`` (flagged so) or
    ``"unflagged"``."""
    if bool(report.surprise[0, filter]):
        return "surprise"
    return "expectation" if bool(report.expectation[0, filter]) else "unflagged"
