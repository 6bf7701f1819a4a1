"""Refuse a table whose alpha does not vary: every percentile would be a tie.

A zero-initialised layer after the target layer (the last batch norm of timm's ``resnet50d`` or
``regnety_002``, the head of torchvision's ViT), an untrained or dead classifier head, or a
target layer the class score does not depend on give a zero gradient: alpha is 0 (or another
constant) for every image. The calibration then runs to the end and writes a table whose
percentiles all tie, and the monitor flags nothing, or everything.

The check reads what the statistics hold already, on every path (exact, approximate, any
number of ranks): the 0 and 100 percent levels of each (class, filter) cell are the exact
minimum and maximum of its alpha (the sketch keeps them exactly too). A cell is *constant* when
they are equal (for a class of one image: when its one value is 0); a filter is *flat* when its
cell is constant in every class with images. More than :data:`DEGENERATE_SHARE` of the filters
flat refuses the table (:class:`DegenerateTableError`), unless
``TableOptions(allow_degenerate=True)`` (``--allow-degenerate``) turns it into a warning. A
filter that varies in some classes only (a class score that reads a few filters, as a
one-filter-per-class head does) is not flat.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from surprise_monitor.monitor.advice import advise
from surprise_monitor.monitor.errors import SurpriseMonitorError
from surprise_monitor.monitor.table import CalibrationTable

log = logging.getLogger(__name__)

#: A table with more than this share of flat filters is refused.
DEGENERATE_SHARE = 0.5

_CAUSES = (
    "Likely causes: a zero-initialised layer after the target layer (the last batch norm of "
    "timm's resnet50d / regnety_002, the head of torchvision's ViT: load trained weights), an "
    "untrained or dead classifier head, or a target layer the class score does not depend on "
    "(the wrong layer: try another with {layer})."
)


class DegenerateTableError(SurpriseMonitorError, ValueError):
    """The calibration's alpha is constant for most filters: the table would be all ties."""


@dataclass(frozen=True)
class AlphaSpread:
    """How much of a table's alpha varies, from its 0 and 100 percent levels."""

    filters: int  # N
    flat_filters: int  # constant in every class with images
    cells: int  # (class, filter) cells of classes with images
    constant_cells: int  # minimum == maximum (one image: its value is 0)
    zero_share: float  # share of all alpha values in cells that are 0 on every image

    @classmethod
    def of(cls, table: CalibrationTable) -> AlphaSpread:
        """The spread of ``table``'s alpha (classes without images left out)."""
        levels = table.levels
        low = table.quantiles[..., int(torch.argmin(levels))]
        high = table.quantiles[..., int(torch.argmax(levels))]
        used = table.counts > 0
        low, high, counts = low[used], high[used], table.counts[used]
        zero = (low == 0) & (high == 0)
        constant = ((low == high) & (counts[:, None] > 1)) | zero
        values = float(counts.sum()) * table.num_filters
        zero_values = float((zero * counts[:, None]).sum())
        return cls(
            filters=table.num_filters,
            flat_filters=int(constant.all(0).sum()) if len(counts) else 0,
            cells=int(constant.numel()),
            constant_cells=int(constant.sum()),
            zero_share=zero_values / values if values else 0.0,
        )

    @property
    def degenerate(self) -> bool:
        """True when more than :data:`DEGENERATE_SHARE` of the filters are flat."""
        return self.filters > 0 and self.flat_filters > DEGENERATE_SHARE * self.filters

    def line(self) -> str:
        """The shares, for people."""
        text = (
            f"alpha is constant for {_percent(self.constant_cells / max(self.cells, 1))} of "
            f"(class, filter) cells ({self.flat_filters} of {self.filters} filters in every "
            "class)"
        )
        if self.zero_share == 1:
            return text + "; 100% of alphas are 0"
        if self.zero_share > 0:
            return text + f"; at least {_percent(self.zero_share)} of alphas are 0"
        return text


def _percent(share: float) -> str:
    """A share as a whole percentage that says 100% or 0% only when it is exactly so."""
    if 0 < share < 1:
        return f"{min(99, max(1, round(100 * share)))}%"
    return f"{round(100 * share)}%"


def check_spread(table: CalibrationTable, allow: bool) -> AlphaSpread:
    """The spread of ``table``'s alpha; a degenerate one raises :class:`DegenerateTableError`
    naming the shares and the likely causes (worded for the library and, through
    :func:`~surprise_monitor.monitor.advice.advise`, for ``surprise-calibrate``), or is
    logged as a warning when ``allow``."""
    spread = AlphaSpread.of(table)
    if not spread.degenerate:
        return spread
    found = f"at layer {table.layer!r}, {spread.line()}: every percentile of the table ties"
    if allow:
        log.warning("calibrate: %s; kept as asked (allow_degenerate)", found)
        return spread
    api = (
        f"calibration refused: {found}. {_CAUSES.format(layer='layer=')} Keep such a table "
        "anyway with table=TableOptions(allow_degenerate=True)."
    )
    cli = (
        f"calibration refused: {found}. {_CAUSES.format(layer='--layer')} Keep such a table "
        "anyway with --allow-degenerate."
    )
    raise advise(DegenerateTableError(api), cli)
