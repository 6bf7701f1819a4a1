"""Where a calibration run puts each batch's alpha, behind one protocol.

- :class:`SpillAccumulator` (exact mode): rows spilled to per-class files
  (:mod:`surprise_monitor.calibrate.spill`), merged across ranks
  (:func:`surprise_monitor.calibrate.distributed.class_sources`) and turned into exact statistics
  class by class (:mod:`surprise_monitor.calibrate.statistics`).
- :class:`SketchAccumulator` (``approximate``): fixed-grid histograms in memory
  (:mod:`surprise_monitor.calibrate.sketch`), summed across ranks, percentiles within the grid's
  accuracy.

The builder and the checkpoints only speak :class:`Accumulator`; the choice between the two is
made once, by :func:`make_accumulator`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from surprise_monitor.calibrate import distributed
from surprise_monitor.calibrate.alpha import RunMeta
from surprise_monitor.calibrate.distributed import Comm
from surprise_monitor.calibrate.sketch import HistogramSketch, LogGrid
from surprise_monitor.calibrate.spill import AlphaSpill
from surprise_monitor.calibrate.statistics import ClassStatistics, class_statistics

log = logging.getLogger(__name__)


class Accumulator(Protocol):
    """Collects alpha rows ``[B, N]`` with their classes and dataset indices, makes them durable
    for checkpoints, and turns every rank's rows into per-class statistics."""

    #: ``"exact"`` or ``"approximate"`` (recorded in the checkpoint settings).
    mode: str

    def settings(self) -> dict[str, Any]:
        """Settings that decide the accumulated values, beyond the run's own."""
        ...

    def reset(self) -> None:
        """Forget any state left in the work folder (a fresh start)."""
        ...

    def expect(self, images: int, mine: int) -> None:
        """``images`` in the whole run, ``mine`` still to come on this rank."""
        ...

    def start(self, meta: RunMeta) -> None:
        """Size the accumulator once the first batch told the filter and class counts (does
        nothing when it is sized already, e.g. restored from a checkpoint)."""
        ...

    def add(self, alpha: np.ndarray, classes: np.ndarray, indices: np.ndarray) -> None:
        """Add rows ``alpha[i]`` of class ``classes[i]`` and dataset index ``indices[i]``."""
        ...

    def commit(self, seq: int) -> dict[str, Any]:
        """Make the accumulated data durable; the manifest's record of it (``seq``: batches
        done)."""
        ...

    def committed(self, record: dict[str, Any]) -> None:
        """The manifest holding ``record`` is written: drop what older records needed."""
        ...

    def restore(self, meta: RunMeta, record: dict[str, Any]) -> None:
        """Go back to the state a manifest's ``record`` describes."""
        ...

    def statistics(
        self, comm: Comm, meta: RunMeta, levels: np.ndarray, beta_levels: np.ndarray
    ) -> list[ClassStatistics]:
        """Every class's statistics over all ranks' rows (the same list on every rank)."""
        ...


def make_accumulator(grid: LogGrid | None, work: Path, *, top_k: int, **exact: Any) -> Accumulator:
    """The exact accumulator (``grid=None``; ``exact``: the other arguments of
    :class:`SpillAccumulator`) or the approximate one on ``grid`` (which needs none of them)."""
    if grid is None:
        return SpillAccumulator(work, top_k=top_k, **exact)
    return SketchAccumulator(work, grid, top_k=top_k)


class SpillAccumulator:
    """Exact mode: alpha rows spilled to ``work`` (one file pair per class).

    Args:
        work: this rank's spill folder.
        top_k: exemplars kept per (class, filter).
        root: the folder all ranks' shards live under (``None``: a private temporary one), for
            the distributed merge through a shared folder.
        merge: ``"auto"`` or ``"send"`` (see
        :func:`surprise_monitor.calibrate.distributed.class_sources`).
        budget: working memory of the per-class statistics, in bytes.
        progress: show a progress bar over the classes.
        device: where the percentiles and exemplars are computed (torch; a GPU when
            calibrating on one), ``None`` for numpy (see
            :func:`surprise_monitor.calibrate.statistics.class_statistics`).
    """

    mode = "exact"

    def __init__(
        self,
        work: Path,
        *,
        top_k: int,
        root: Path | None,
        merge: str,
        budget: int,
        progress: bool,
        device: torch.device | None,
    ) -> None:
        self.work, self.top_k, self.root = work, top_k, root
        self.merge, self.budget, self.progress = merge, budget, progress
        self.device = device
        self.images: tuple[int, int] | None = None  # (all images, this rank's to come)
        self.spill: AlphaSpill | None = None

    def settings(self) -> dict[str, Any]:
        """Nothing beyond the run's settings: spilled rows do not depend on ``top_k``."""
        return {}

    def reset(self) -> None:
        """Remove every class file in the work folder."""
        AlphaSpill(self.work, 1).clear()

    def expect(self, images: int, mine: int) -> None:
        """Remember the image counts for the disk-use message."""
        self.images = (images, mine)

    def start(self, meta: RunMeta) -> None:
        """Open the spill and say how much disk it will take."""
        if self.spill is not None:
            return
        self.spill = AlphaSpill(self.work, meta.num_filters)
        if self.images is not None:
            _announce_disk(meta.num_filters, self.images, self.work)

    def add(self, alpha: np.ndarray, classes: np.ndarray, indices: np.ndarray) -> None:
        """Append the rows to their classes' files (buffered)."""
        assert self.spill is not None
        self.spill.append(alpha, classes, indices)

    def commit(self, seq: int) -> dict[str, Any]:
        """fsync the spill; the rows stored per class."""
        rows = self.spill.sync() if self.spill is not None else {}
        return {"rows": {str(c): n for c, n in rows.items()}}

    def committed(self, record: dict[str, Any]) -> None:
        """Nothing to drop: the files only grow."""

    def restore(self, meta: RunMeta, record: dict[str, Any]) -> None:
        """Cut the class files back to the recorded rows."""
        rows = {int(c): int(n) for c, n in record.get("rows", {}).items()}
        self.spill = AlphaSpill(self.work, meta.num_filters)
        self.spill.restore(rows)

    def statistics(
        self, comm: Comm, meta: RunMeta, levels: np.ndarray, beta_levels: np.ndarray
    ) -> list[ClassStatistics]:
        """Exact statistics: each class on its owner rank, from all ranks' rows, then shared."""
        spill = self.spill or AlphaSpill(self.work, meta.num_filters)
        k, nf = int(meta.num_classes or 0), meta.num_filters
        recv = self.work / "recv"
        sources = distributed.class_sources(comm, spill, k, self.root, recv, merge=self.merge)
        off = not self.progress or comm.info.rank != 0
        mine: dict[int, ClassStatistics] = {}
        for c in tqdm(sorted(sources), desc="statistics", unit="class", disable=off):
            alpha, indices = sources[c]
            mine[c] = class_statistics(
                alpha, indices, levels, beta_levels, self.top_k, self.budget, self.device
            )
        shutil.rmtree(recv, ignore_errors=True)
        return distributed.share_statistics(
            comm, mine, k, nf, len(levels), len(beta_levels), self.top_k
        )


class SketchAccumulator:
    """Approximate mode: a :class:`~surprise_monitor.calibrate.sketch.HistogramSketch` in memory;
    checkpoints
    save it as ``sketch-<batches done>.safetensors`` in ``work``."""

    mode = "approximate"

    def __init__(self, work: Path, grid: LogGrid, *, top_k: int) -> None:
        self.work, self.grid, self.top_k = work, grid, top_k
        self.sketch: HistogramSketch | None = None

    def settings(self) -> dict[str, Any]:
        """The grid, and ``top_k`` (the exemplars live in the sketch state)."""
        return {"sketch_grid": self.grid.settings(), "sketch_top_k": self.top_k}

    def reset(self) -> None:
        """Remove every sketch state in the work folder."""
        _remove_sketch_states(self.work, keep=None)

    def expect(self, images: int, mine: int) -> None:
        """Nothing to prepare: the sketch's size does not depend on the images."""

    def start(self, meta: RunMeta) -> None:
        """Allocate the histograms and say how much memory they hold."""
        if self.sketch is not None:
            return
        k, n = int(meta.num_classes or 0), meta.num_filters
        log.info(
            "calibrate: approximate mode: the sketch of %d classes x %d filters x %d bins holds "
            "%s in memory (no spill)", k, n, self.grid.num_bins,
            human_bytes(HistogramSketch.memory_bytes(k, n, self.top_k, self.grid)),
        )  # fmt: skip
        self.sketch = HistogramSketch(k, n, self.top_k, self.grid)

    def add(self, alpha: np.ndarray, classes: np.ndarray, indices: np.ndarray) -> None:
        """Count the rows in the histograms."""
        assert self.sketch is not None
        self.sketch.add(alpha, classes, indices)

    def commit(self, seq: int) -> dict[str, Any]:
        """Save the state to a new file; its name."""
        if self.sketch is None:
            return {"sketch": None}
        name = f"sketch-{seq}.safetensors"
        self.sketch.save(self.work / name)
        return {"sketch": name}

    def committed(self, record: dict[str, Any]) -> None:
        """Remove the states older manifests named."""
        _remove_sketch_states(self.work, keep=record.get("sketch"))

    def restore(self, meta: RunMeta, record: dict[str, Any]) -> None:
        """Load the recorded state (none: nothing was added yet); remove the others."""
        name = record.get("sketch")
        if name is not None:
            self.start(meta)
            assert self.sketch is not None
            self.sketch.load(self.work / name)
        _remove_sketch_states(self.work, keep=name)

    def statistics(
        self, comm: Comm, meta: RunMeta, levels: np.ndarray, beta_levels: np.ndarray
    ) -> list[ClassStatistics]:
        """Statistics from the histograms summed over the ranks."""
        self.start(meta)
        sketch = self.sketch
        assert sketch is not None
        sketch.reduce(comm)
        if sketch.overflow:
            log.warning(
                "calibrate: %d alpha values lie beyond the sketch grid's max_magnitude %g; "
                "their percentiles are bounded only by the exact min/max",
                sketch.overflow, self.grid.max_magnitude,
            )  # fmt: skip
        return [sketch.statistics(c, levels, beta_levels) for c in range(sketch.num_classes)]


def spill_bytes_per_image(num_filters: int) -> int:
    """Disk per image in exact mode: ``num_filters`` float32 alpha values and an int64 index."""
    return 4 * num_filters + 8


def human_bytes(n: float) -> str:
    """``n`` bytes for people: ``1.5 GB``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def _announce_disk(num_filters: int, images: tuple[int, int], work: Path) -> None:
    """Log the spill's disk use (all images, this rank's) and warn when the disk is short."""
    per = spill_bytes_per_image(num_filters)
    total, mine = images
    need = per * mine
    log.info(
        "calibrate: the alpha spill takes %d bytes per image (%d filters x 4 + 8 for the index): "
        "%s for all %d images; this process adds %s for its %d in %s",
        per, num_filters, human_bytes(per * total), total, human_bytes(need), mine, work,
    )  # fmt: skip
    free = shutil.disk_usage(work).free
    if free < need:
        log.warning("calibrate: %s has %s free, the spill needs %s", work, human_bytes(free),
                    human_bytes(need))  # fmt: skip


def _remove_sketch_states(work: Path, keep: str | None) -> None:
    """Remove the sketch state files in ``work`` other than ``keep``."""
    for path in work.glob("sketch-*.safetensors"):
        if path.name != keep:
            path.unlink(missing_ok=True)
