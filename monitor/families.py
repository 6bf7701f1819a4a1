"""Per-family p-values: how unusual each part of the network found an input, on one scale.

The score's components fall into three families (:data:`FAMILIES`, the keys of
:data:`~surprise_monitor.monitor.atypicality.ALARM_KINDS`):

- ``class_evidence``: the logits' energy and the final layer's expectation mass (the paper's
  expectation): the network's evidence for the class is low;
- ``low_level``: the early stages' energies and distances: low-level statistics (camera,
  lighting, a corruption, the preprocessing) unlike the training images';
- ``features``: the head layer's distances (class means, the whole head, the nearest
  training images): high-level features unlike any class's.

A family's statistic is Tippett's ``-log min_j r_j`` over its components' tail ranks (the
family's most extreme component decides), and its p-value is conformal: its rank among the
same statistic of the held-out images the alarm's null was made of (``(1 + #{null >= t}) /
(n + 1)``), so the three p-values are on one scale whatever the families' sizes and the
correlations within them, and none depends on how the alarm's score weighs the families
(the learned evidence's weights included). Each is a valid p-value for its family alone;
the alarm itself is the score's. The family with the smallest p-value is the alarm's kind
(:func:`kind_of`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from surprise_monitor.monitor.atypicality import (
    HEAD_COMPONENT,
    KNN_COMPONENT,
    STAGE_DISTANCE_COMPONENT,
    component_family,
)
from surprise_monitor.monitor.conformal import ConformalNull

#: The families, in the order of ``report.family_p_values``' columns.
FAMILIES: tuple[str, ...] = ("class_evidence", "low_level", "features")


def family_of(name: str, head_layers: Sequence[str] = ()) -> str:
    """The family of component ``name`` (:func:`component_family`), where a stage distance
    at a head layer (``head_layers``) is ``features``: it measures the head's features."""
    kind, _, layer = name.partition(":")
    if kind == STAGE_DISTANCE_COMPONENT and layer in head_layers:
        return "features"
    return component_family(name)


def family_columns(names: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Per family of :data:`FAMILIES`, the columns of components ``names`` it holds (empty
    for a family the score has no component of; a component of no family is in none)."""
    heads = [n.partition(":")[2] for n in names if n.partition(":")[0] in _HEAD_KINDS]
    families = [family_of(n, heads) for n in names]
    return tuple(tuple(j for j, f in enumerate(families) if f == family) for family in FAMILIES)


_HEAD_KINDS = (HEAD_COMPONENT, KNN_COMPONENT)


def family_statistics(
    ranks: torch.Tensor, columns: Sequence[Sequence[int] | torch.Tensor]
) -> torch.Tensor:
    """``[B, F]`` float32 Tippett statistics ``-log min_j r_j`` of ``[B, J]`` tail ranks over
    each family's ``columns`` (NaN ranks left out; NaN for a family without a finite rank; a
    rank that underflowed to 0 counts as the smallest positive float32, so stays finite).
    Columns given as int64 tensors on the ranks' device cost no host-to-device copy (the
    judge's, under CUDA graph capture)."""
    b = ranks.shape[0]
    out = torch.full((b, len(columns)), float("nan"), dtype=torch.float32, device=ranks.device)
    for f, cols in enumerate(columns):
        if len(cols) == 0:
            continue
        index = torch.as_tensor(cols, dtype=torch.int64, device=ranks.device)
        part = ranks.index_select(1, index).to(torch.float32)
        smallest = torch.nan_to_num(part, nan=float("inf")).amin(dim=1)
        floor = smallest.clamp(min=torch.finfo(torch.float32).tiny)  # a rank of 0: finite
        out[:, f] = torch.where(torch.isfinite(smallest), -torch.log(floor), out[:, f])
    return out


@dataclass(frozen=True)
class FamilyNulls:
    """The held-out images' family statistics (:func:`family_statistics`), one conformal null
    per family of :data:`FAMILIES` (``None`` for a family the score has no component of)."""

    nulls: tuple[ConformalNull | None, ...]

    def __post_init__(self) -> None:
        if len(self.nulls) != len(FAMILIES):
            raise ValueError(f"family nulls need {len(FAMILIES)} entries, got {len(self.nulls)}")

    @classmethod
    def of(cls, statistics: torch.Tensor) -> FamilyNulls:
        """The nulls of held-out ``[n, F]`` statistics (a column with a NaN: no null)."""
        if statistics.ndim != 2 or statistics.shape[1] != len(FAMILIES):
            raise ValueError(
                f"family statistics must be [n, {len(FAMILIES)}], got {list(statistics.shape)}"
            )
        cols = statistics.detach().to(torch.float32).cpu().unbind(dim=1)
        return cls(tuple(ConformalNull.of(c) if bool(torch.isfinite(c).all()) else None
                         for c in cols))  # fmt: skip

    def to(self, device: torch.device | str) -> FamilyNulls:
        """The same nulls on ``device``."""
        return FamilyNulls(tuple(None if n is None else n.to(device) for n in self.nulls))

    @property
    def sizes(self) -> list[int]:
        """Held-out images per family's null (0 for a family without one)."""
        return [0 if n is None else n.size for n in self.nulls]

    def p_values(self, statistics: torch.Tensor) -> torch.Tensor:
        """``[B, F]`` float32 p-values of ``[B, F]`` statistics, each among its family's null
        (NaN for a NaN statistic and for a family without a null)."""
        out = torch.full_like(statistics, float("nan"), dtype=torch.float32)
        for f, null in enumerate(self.nulls):
            if null is None:
                continue
            s = statistics[:, f]
            out[:, f] = torch.where(torch.isnan(s), s.to(torch.float32), null.p_values(s))
        return out


def kind_of(p_values: Sequence[float], tail_ranks: Sequence[float] = (),
            columns: Sequence[Sequence[int]] = ()) -> str | None:  # fmt: skip
    """The alarm kind of one input's family ``p_values`` (:data:`FAMILIES`' order): the
    family with the smallest p-value; ties (several families past every held-out image) go
    to the family whose smallest tail rank (``tail_ranks`` over its ``columns``) is smallest,
    then to the first listed. ``None`` when no p-value is finite."""
    found = [(p, f) for f, p in enumerate(p_values) if p == p]
    if not found:
        return None
    least = min(p for p, _ in found)
    tied = [f for p, f in found if p == least]

    def smallest_rank(f: int) -> float:
        """Family ``f``'s smallest finite tail rank (``inf`` without one)."""
        cols = columns[f] if f < len(columns) else ()
        ranks = [float(tail_ranks[j]) for j in cols if tail_ranks[j] == tail_ranks[j]]
        return min(ranks, default=float("inf"))

    return FAMILIES[min(tied, key=lambda f: (smallest_rank(f), f))]
