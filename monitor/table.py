"""The calibration table: per (class, filter) statistics of Grad-AMap alpha on training data,
per-class beta percentiles, exemplars and the alarm's part; its validation and queries.

The file format (safetensors plus JSON metadata, a checksum, an optional signature,
memory-mapped reads) is :mod:`surprise_monitor.monitor.table_file`; :meth:`CalibrationTable.save`
and :meth:`CalibrationTable.load` call it.
"""

from __future__ import annotations

import hmac
import logging
import math
from dataclasses import MISSING, dataclass, field, fields
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surprise_monitor.kernels import check_percentile_grid, quantile_at
from surprise_monitor.kernels.defaults import DEFAULT_SURPRISE_PCT
from surprise_monitor.monitor.probe.class_output import CLASS_OUTPUTS, DEFAULT_CLASS_OUTPUT
from surprise_monitor.monitor.table_alarm import AlarmCalibration, AlarmTableError
from surprise_monitor.monitor.table_file import (
    CHECK_CHUNK_BYTES,
    FORMAT_NAME,
    FORMAT_VERSION,
    TENSOR_NAMES,
    TableError,
    TableFile,
    read_table_file,
    signed_file,
    write_table_file,
)
from surprise_monitor.monitor.table_key import load_key

log = logging.getLogger(__name__)

#: Default percent levels of the alpha grid: dense in the tails, where the flags live.
DEFAULT_LEVELS: tuple[float, ...] = (
    0.0, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0, 45.0, 50.0,
    55.0, 60.0, 65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0, 97.5, 99.0, 99.5, 99.9, 100.0,
)  # fmt: skip
#: Levels that every grid must contain (the paper's thresholds and the usual tails).
REQUIRED_LEVELS: tuple[float, ...] = (
    0.0, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 97.5, 99.0, 99.5, 99.9, 100.0,
)  # fmt: skip
#: Percent levels of the per-class beta grid (0.1 steps), for calibrated low-beta thresholds.
DEFAULT_BETA_LEVELS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1001))


@dataclass(eq=False)
class CalibrationTable:
    """Per (class, filter) distribution of alpha, as gathered on training images with true labels.

    Shapes: K classes, N filters, Q alpha grid levels, Qb beta grid levels, k exemplars.
    """

    layer: str
    levels: torch.Tensor  # [Q] float64 percent levels, 0 ... 100
    quantiles: torch.Tensor  # [K, N, Q] float32: quantiles[c, n, q] = P_cn(levels[q])
    mean: torch.Tensor  # [K, N] float32: mu_cn
    counts: torch.Tensor  # [K] int64: calibration images per class
    beta_levels: torch.Tensor  # [Qb] float64
    beta_quantiles: torch.Tensor  # [K, Qb] float32: percentiles of beta per class
    # Exemplars: None when loaded with exemplars=False (see ensure_exemplars()).
    top_indices: torch.Tensor | None  # [K, N, k] int32 dataset indices, -1 = none
    top_alpha: torch.Tensor | None  # [K, N, k] float32 alpha of those exemplars (NaN = none)
    class_names: list[str]
    class_output: str = DEFAULT_CLASS_OUTPUT  # the file's "score" field (its name before 0.2)
    input_shape: tuple[int, ...] = ()
    model_fingerprint: str = ""
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    layer_reason: str = ""
    data_source: dict[str, Any] | None = None
    layer_fingerprint: str = ""  # the layer's own weights (monitor.fingerprint.layer_fingerprint)
    path: Path | None = None  # the file it was loaded from, if any
    sha256: str = ""  # that file's checksum when loaded (or saved): exemplars must match it
    # The alarm's profile grids, score reference and conformal nulls (monitor.table_alarm);
    # None for a table made without them (no score, no alarms).
    alarm: AlarmCalibration | None = None

    def __post_init__(self) -> None:
        self.validate()  # a table built directly is always checked in full

    @property
    def grid_checked(self) -> bool:
        """True while the alpha grid and means are the tensors :meth:`validate` checked (so
        :func:`surprise_monitor.kernels.prepare_lookup_table` need not read them again)."""
        checked = getattr(self, "_checked", None)
        return checked is not None and checked[0] is self.quantiles and checked[1] is self.mean

    @property
    def signed(self) -> bool:
        """True when the file it was loaded from is signed (checked or not)."""
        return getattr(self, "_signed", False)

    @property
    def signature_verified(self) -> bool:
        """True when it was loaded with a key that verified its file's signature."""
        return getattr(self, "_signature_verified", False)

    # ------------------------------------------------------------------ shapes
    @property
    def num_classes(self) -> int:
        """K, the number of classes."""
        return int(self.quantiles.shape[0])

    @property
    def num_filters(self) -> int:
        """N, the number of filters at the layer."""
        return int(self.quantiles.shape[1])

    @property
    def top_k(self) -> int:
        """k, the exemplars kept per (class, filter) (loads them if they were left on disk)."""
        self.ensure_exemplars()
        return int(self.top_indices.shape[2])

    def ensure_exemplars(self) -> None:
        """Load the exemplar tensors if :meth:`load` skipped them (``exemplars=False``)."""
        if self.top_indices is not None and self.top_alpha is not None:
            return
        if self.path is None:
            raise TableError("this table has no exemplars and no file to load them from")
        key = getattr(self, "_key", None)  # the file is read as it was: verified with its key
        full = type(self).from_checked_file(read_table_file(self.path, key=key))
        if full.sha256 != self.sha256:  # pinned: exemplars only from the file that was loaded
            raise TableError(
                f"{self.path}: the file changed since this table was loaded (checksum "
                f"{full.sha256[:12]}, loaded {self.sha256[:12]}); load it again"
            )
        self.top_indices, self.top_alpha = full.top_indices, full.top_alpha

    def value_at(self, pct: float) -> torch.Tensor:
        """The pct-th percentile of alpha per (class, filter), ``[K, N]``, from the grid.

        Exact at grid levels; linear in the level between two grid levels otherwise.
        """
        return quantile_at(self.quantiles, self.levels.to(self.quantiles.dtype), float(pct))

    def beta_value_at(self, pct: float) -> torch.Tensor:
        """The pct-th percentile of the calibration betas per class, ``[K]``."""
        return quantile_at(
            self.beta_quantiles, self.beta_levels.to(self.beta_quantiles.dtype), float(pct)
        )

    # -------------------------------------------------------------- validation
    def validate(self, grid_values: bool = True) -> None:
        """Check shapes, dtypes and monotonicity; raise :class:`TableError` naming the problem.
        ``grid_values=False`` skips reading the alpha grid's values (its shapes and levels are
        still checked): for a grid already checked, as :meth:`from_checked_file` does."""
        q = self.quantiles
        if q.ndim != 3:
            raise TableError(f"quantiles must be [K, N, Q], got shape {tuple(q.shape)}")
        k, n, nq = q.shape
        expect = {
            "levels": (nq,),
            "mean": (k, n),
            "counts": (k,),
            "beta_quantiles": (k, self.beta_levels.shape[0]),
        }
        for name, shape in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise TableError(f"{name} has shape {got}, expected {shape} for K={k}, N={n}")
        if (self.top_indices is None) != (self.top_alpha is None):
            raise TableError("top_indices and top_alpha must be given together")
        if self.top_indices is not None:
            if self.top_indices.ndim != 3 or tuple(self.top_indices.shape[:2]) != (k, n):
                raise TableError(f"top_indices has shape {tuple(self.top_indices.shape)}")
            if self.top_alpha.shape != self.top_indices.shape:
                raise TableError("top_alpha and top_indices shapes differ")
        if len(self.class_names) != k:
            raise TableError(f"{len(self.class_names)} class names for {k} classes")
        per_class = max(1, q.shape[1] * q.shape[2] * q.element_size())
        try:
            check_percentile_grid(
                self.levels, q, self.mean, values=grid_values,
                chunk=max(1, CHECK_CHUNK_BYTES // per_class),
            )  # fmt: skip
            check_percentile_grid(
                self.beta_levels, self.beta_quantiles,
                names=("beta_levels", "beta_quantiles"), axes=("class",),
            )  # fmt: skip
        except ValueError as exc:
            raise TableError(str(exc)) from exc
        self._checked = (q, self.mean)
        if bool((self.counts < 0).any()):
            raise TableError("negative class counts")
        if self.class_output not in CLASS_OUTPUTS:
            raise TableError(f"unknown class output {self.class_output!r}; one of {CLASS_OUTPUTS}")
        if self.alarm is not None:
            try:
                self.alarm.validate(self.levels)
            except AlarmTableError as exc:
                raise TableError(str(exc)) from exc

    # -------------------------------------------------------------------- I/O
    def _metadata(self) -> dict[str, Any]:
        """The JSON metadata stored in the file's header."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "layer": self.layer,
            "layer_reason": self.layer_reason,
            "num_classes": self.num_classes,
            "num_filters": self.num_filters,
            "class_names": list(self.class_names),
            "levels": [float(v) for v in self.levels],
            "score": self.class_output,  # the file keeps the name it had, for old readers
            "input_shape": list(self.input_shape),
            "model_fingerprint": self.model_fingerprint,
            "created": self.created,
            "images_per_class": [int(c) for c in self.counts],
            "top_k": self.top_k,
            "data_source": self.data_source,
            "layer_fingerprint": self.layer_fingerprint,
            "alarm": None if self.alarm is None else self.alarm.metadata(),
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor, on the CPU, contiguous, in its file dtype."""
        dtypes = {
            "levels": torch.float64, "beta_levels": torch.float64,
            "counts": torch.int64, "top_indices": torch.int32,
        }  # fmt: skip
        self.ensure_exemplars()
        tensors = {
            name: getattr(self, name)
            .detach()
            .cpu()
            .to(dtypes.get(name, torch.float32))
            .contiguous()
            for name in TENSOR_NAMES
        }
        if self.alarm is not None:
            tensors.update(self.alarm.tensors())
        return tensors

    def save(self, path: str | Path, key: bytes | str | Path | None = None) -> Path:
        """Write the table to ``path`` (safetensors) atomically, signed with ``key`` when given
        (the key's bytes or its file, :func:`~.table_key.load_key`); returns the path."""
        path = Path(path)
        self.sha256 = write_table_file(path, self._tensors(), self._metadata(), key)
        return path

    def verified_with(self, key: bytes | str | Path) -> bool:
        """True when the table was loaded from a file whose signature ``key`` verified."""
        mine = getattr(self, "_key", None)
        return (
            self.signature_verified
            and mine is not None
            and hmac.compare_digest(mine, load_key(key))
        )

    def fingerprint(self) -> str:
        """The table's SHA-256: its file's checksum when it was loaded or saved, else the one
        :meth:`save` would write."""
        if not self.sha256:
            self.sha256 = signed_file(self._tensors(), self._metadata())[1]
        return self.sha256

    @classmethod
    def load(
        cls, path: str | Path, *, exemplars: bool = True, key: bytes | str | Path | None = None
    ) -> CalibrationTable:
        """Read a table written by :meth:`save`; refuse anything corrupt, truncated or edited.

        The checksum is verified with ordinary reads of the file; tensors of at least
        :data:`~.table_file.MAP_BYTES` are then memory-mapped from it (copy-on-write: writing
        to them never changes the file; the file must not be edited in place while the table is
        in use, which :meth:`save`'s atomic replacement never does), the others copied. The grid's
        values are checked a few classes at a time and the pages read are dropped again.
        ``exemplars=False`` leaves the exemplar tensors (``top_indices``, ``top_alpha``: 8 bytes
        per class, filter and exemplar) out until :meth:`ensure_exemplars` needs them; the
        monitor's inference path does not.

        With a ``key`` (its bytes or its file, :func:`~.table_key.load_key`) the file must be
        signed with it (:class:`~.table_file.TableSignatureError` otherwise: unsigned, or
        changed since it was signed); it is kept (never shown) to read the exemplars later.
        Without one a table loads signed or not, and one INFO line says its authenticity was not
        checked. :attr:`signed` and :attr:`signature_verified` record which.
        """
        key = None if key is None else load_key(key)
        file = read_table_file(path, exemplars=exemplars, key=key)
        table = cls.from_checked_file(file)
        table._key = key
        if key is None:
            log.info(
                "%s: calibration table loaded without a key, its authenticity not checked (%s)",
                file.path, "the table is signed" if file.signed else "the table is not signed",
            )  # fmt: skip
        return table

    @classmethod
    def from_checked_file(cls, file: TableFile) -> CalibrationTable:
        """The table of a verified file (:func:`~.table_file.read_table_file`): its fields,
        tensors and alarm part, validated without reading again a grid the reader checked."""
        meta = dict(file.meta)
        try:
            alarm_meta = meta.pop("alarm", None)
            if alarm_meta is not None:
                meta["alarm"] = AlarmCalibration.from_file(alarm_meta, file.tensors)
            given = {
                "path": file.path, "sha256": file.sha256, **meta,
                **{name: file.tensors.get(name) for name in TENSOR_NAMES},
            }  # fmt: skip
            table = cls.__new__(cls)  # the dataclass's fields, without __post_init__'s check
            for f in fields(cls):
                if f.name in given:
                    value = given[f.name]
                elif f.default is not MISSING:
                    value = f.default
                else:
                    value = f.default_factory()  # type: ignore[misc]
                setattr(table, f.name, value)
            table.validate(grid_values=not file.grid_values_checked)
            table._signed, table._signature_verified = file.signed, file.signature_verified
        except (TableError, AlarmTableError) as exc:
            raise TableError(f"{file.path}: {exc}") from exc
        for name, have in (("num_classes", table.num_classes), ("num_filters", table.num_filters)):
            if name in file.counts_meta and file.counts_meta[name] != have:
                raise TableError(
                    f"{file.path}: metadata field {name!r} is {file.counts_meta[name]!r}, the "
                    f"tensors hold {have}"
                )
        return table

    # ------------------------------------------------------------- summaries
    def undersampled_classes(self, pct: float = DEFAULT_SURPRISE_PCT) -> list[int]:
        """Classes with too few images for the pct-th percentile to differ from the extreme.

        With linear interpolation, the 99.9th percentile (the default) of n samples is an
        interpolation between the two largest values only when n >= 1000; below that it is
        pinned near the maximum.
        """
        need = images_needed(pct)
        return [c for c in range(self.num_classes) if int(self.counts[c]) < need]

    def __repr__(self) -> str:
        return (
            f"CalibrationTable(layer={self.layer!r}, classes={self.num_classes}, "
            f"filters={self.num_filters}, levels={self.levels.numel()}, "
            f"class_output={self.class_output!r}, images={int(self.counts.sum())})"
        )


def images_needed(pct: float) -> int:
    """Images a class needs for its pct-th percentile to be more than an extreme:
    ``ceil(100 / min(pct, 100 - pct))``, in exact decimal arithmetic (``100 - 99.9`` is
    0.0999999... in floating point, which would ask for 1001 images instead of 1000)."""
    tail = min(Fraction(str(pct)), 100 - Fraction(str(pct)))
    return math.ceil(100 / tail) if tail > 0 else 1


def levels_with_required(levels: tuple[float, ...] | list[float] | np.ndarray) -> np.ndarray:
    """Sorted union of ``levels`` and :data:`REQUIRED_LEVELS` (float64)."""
    lv = np.unique(np.concatenate([np.asarray(levels, np.float64), REQUIRED_LEVELS]))
    if lv[0] < 0 or lv[-1] > 100:
        raise ValueError(f"percent levels must lie in [0, 100], got {lv[0]} .. {lv[-1]}")
    return lv
