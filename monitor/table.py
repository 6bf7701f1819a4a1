"""The calibration table: per (class, filter) statistics of Grad-AMap alpha on training data,
and its file format.

Stored as safetensors (tensors) plus JSON metadata; loading never unpickles. A SHA-256 over the
metadata and every tensor's bytes is kept in the header, so a truncated or edited file is refused
with a clear error instead of being used silently.

The alpha grid is stored class-major (``quantiles [K, N, Q]``): one class's grid is one contiguous
block of ``N * Q * 4`` bytes. :meth:`CalibrationTable.load` verifies the checksum with ordinary
reads, then memory-maps the large tensors (copy-on-write, never written back) and checks the grid's
values a few classes at a time, dropping the pages it read. The lookup reads a class's thresholds
from that class's block (:mod:`surprise_monitor.kernels.table`), so a monitor keeps in memory only
the blocks of the classes it has seen, the means and the beta grid; not the whole grid.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save as safetensors_save

from surprise_monitor.kernels import check_percentile_grid, quantile_at
from surprise_monitor.monitor.errors import SurpriseMonitorError
from surprise_monitor.monitor.files import atomic_write_bytes
from surprise_monitor.monitor.probe.class_output import CLASS_OUTPUTS
from surprise_monitor.monitor.table_alarm import PREFIX as ALARM_PREFIX
from surprise_monitor.monitor.table_alarm import AlarmCalibration, AlarmTableError

FORMAT_NAME = "surprise-monitor-table"
FORMAT_VERSION = 1
#: Tensors at least this large are memory-mapped from the file; smaller ones are copied.
MAP_BYTES = 1 << 20
#: Bytes of the alpha grid checked at a time when a table is validated.
CHECK_CHUNK_BYTES = 4 << 20
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip

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

#: Largest JSON header a table file may have (checked before it is read or parsed): metadata
#: and 8 tensor entries; 100,000 class names of 100 characters fit.
MAX_HEADER_BYTES = 16 << 20

_TENSOR_NAMES = (
    "levels", "quantiles", "mean", "counts",
    "beta_levels", "beta_quantiles", "top_indices", "top_alpha",
)  # fmt: skip


class TableError(SurpriseMonitorError, ValueError):
    """A calibration table file or object is invalid (corrupt, truncated, edited, inconsistent)."""


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
    class_output: str = "logit"  # the file's "score" field (its name before 0.2)
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
        self.validate()

    @property
    def grid_checked(self) -> bool:
        """True while the alpha grid and means are the tensors :meth:`validate` checked (so
        :func:`surprise_monitor.kernels.prepare_lookup_table` need not read them again)."""
        checked = getattr(self, "_checked", None)
        return checked is not None and checked[0] is self.quantiles and checked[1] is self.mean

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
        full = type(self).load(self.path)
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
    def validate(self) -> None:
        """Check shapes, dtypes and monotonicity; raise :class:`TableError` naming the problem."""
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
        prechecked = _is_prechecked(q, self.mean)
        per_class = max(1, q.shape[1] * q.shape[2] * q.element_size())
        try:
            check_percentile_grid(
                self.levels, q, self.mean, values=not prechecked,
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
            for name in _TENSOR_NAMES
        }
        if self.alarm is not None:
            tensors.update(self.alarm.tensors())
        return tensors

    def _signed(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and the file header, with its checksum, that :meth:`save` writes."""
        tensors = self._tensors()
        header = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "meta": json.dumps(self._metadata(), sort_keys=True),
        }
        # The data section does not depend on the metadata: serialise once to checksum it.
        entries, data = _split(safetensors_save(tensors, metadata=header))
        header["sha256"] = _checksum(header["meta"], entries, [data])
        return tensors, header

    def save(self, path: str | Path) -> Path:
        """Write the table to ``path`` (safetensors) atomically; returns the path."""
        path = Path(path)
        tensors, header = self._signed()
        atomic_write_bytes(path, safetensors_save(tensors, metadata=header))
        self.sha256 = header["sha256"]
        return path

    def fingerprint(self) -> str:
        """The table's SHA-256: its file's checksum when it was loaded or saved, else the one
        :meth:`save` would write."""
        if not self.sha256:
            self.sha256 = self._signed()[1]["sha256"]
        return self.sha256

    @classmethod
    def load(cls, path: str | Path, *, exemplars: bool = True) -> CalibrationTable:
        """Read a table written by :meth:`save`; refuse anything corrupt, truncated or edited.

        The checksum is verified with ordinary reads of the file; tensors of at least
        :data:`MAP_BYTES` are then memory-mapped from it (copy-on-write: writing to them never
        changes the file; the file must not be edited in place while the table is in use,
        which :meth:`save`'s atomic replacement never does), the others copied. The grid's
        values are checked a few classes at a time and the pages read are dropped again.
        ``exemplars=False`` leaves the exemplar tensors (``top_indices``, ``top_alpha``: 8 bytes
        per class, filter and exemplar) out until :meth:`ensure_exemplars` needs them; the
        monitor's inference path does not.
        """
        path = Path(path)
        if not path.is_file():
            raise TableError(f"{path}: no such calibration table file")
        try:
            header, entries, data_start = _verified_header(path)
            missing = [n for n in _TENSOR_NAMES if n not in entries]
            if missing:
                raise TableError(f"{path}: table lacks tensors {missing}")
            skip = set() if exemplars else {"top_indices", "top_alpha"}
            names = [n for n in _TENSOR_NAMES if n not in skip]
            names += [n for n in entries if n.startswith(ALARM_PREFIX)]
            tensors, releases = _read_tensors(path, entries, data_start, names)
            _check_mapped_grid(tensors, releases.get("quantiles"))
        except TableError:
            raise
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise TableError(
                f"{path}: not a readable calibration table (truncated or corrupt?): {exc}"
            ) from exc
        meta = _parse_meta(path, header.get("meta"))
        try:
            alarm_meta = meta.pop("alarm", None)
            if alarm_meta is not None:
                meta["alarm"] = AlarmCalibration.from_file(alarm_meta, tensors)
            with _prechecked(tensors["quantiles"], tensors["mean"]):
                table = cls(
                    path=path,
                    sha256=header["sha256"],
                    **meta,
                    **{name: tensors.get(name) for name in _TENSOR_NAMES},
                )
        except (TableError, AlarmTableError) as exc:
            raise TableError(f"{path}: {exc}") from exc
        _check_counts(path, header.get("meta", ""), table)
        return table

    # ------------------------------------------------------------- summaries
    def undersampled_classes(self, pct: float = 99.9) -> list[int]:
        """Classes with too few images for the pct-th percentile to differ from the extreme.

        With linear interpolation, the 99.9th percentile of n samples is an interpolation between
        the two largest values only when n >= 1000; below that it is pinned near the maximum.
        """
        need = images_needed(pct)
        return [c for c in range(self.num_classes) if int(self.counts[c]) < need]

    def __repr__(self) -> str:
        return (
            f"CalibrationTable(layer={self.layer!r}, classes={self.num_classes}, "
            f"filters={self.num_filters}, levels={self.levels.numel()}, "
            f"class_output={self.class_output!r}, images={int(self.counts.sum())})"
        )


def _verified_header(path: Path) -> tuple[dict[str, str], dict[str, Any], int]:
    """The file's metadata header, its tensor entries and where the data starts, after checking
    the format, the size and the checksum with ordinary reads (``ValueError`` /
    :class:`TableError` otherwise)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if size <= 0:
            raise ValueError(f"bad header size {size}")
        if size > MAX_HEADER_BYTES:  # refused before it is read or parsed
            raise TableError(
                f"{path}: not a readable calibration table: a header of {size} bytes (a "
                f"table's has at most {MAX_HEADER_BYTES})"
            )
        entries = json.loads(f.read(size))
        if not isinstance(entries, dict):
            raise TableError(f"{path}: the safetensors header is not a JSON object")
        header = entries.pop("__metadata__", None) or {}
        if not isinstance(header, dict) or not isinstance(header.get("meta", ""), str):
            raise TableError(f"{path}: the header's __metadata__ is not a table's")
        _check_format(path, header)
        end = max((_data_end(path, name, e) for name, e in entries.items()), default=0)
        if path.stat().st_size != 8 + size + end:
            raise ValueError(
                f"the file has {path.stat().st_size} bytes, its header describes {8 + size + end}"
            )
        chunks = iter(lambda: f.read(1 << 20), b"")
        digest = _checksum(header.get("meta", ""), entries, chunks)
    if header.get("sha256") != digest:
        raise TableError(f"{path}: checksum mismatch: the file was edited or corrupted")
    return header, entries, 8 + size


def _data_end(path: Path, name: str, entry: Any) -> int:
    """Where tensor ``name``'s bytes end, from its header entry (:class:`TableError` naming the
    tensor when the entry is malformed)."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(v, int) and v >= 0 for v in offsets)
    ):
        raise TableError(f"{path}: tensor {name!r} has no valid data_offsets in the header")
    return int(offsets[1])


#: Metadata fields: name -> (required, check, what it must be).
_META_FIELDS: dict[str, tuple[bool, Any, str]] = {
    "layer": (True, lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "class_names": (
        True, lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
        "a list of strings",
    ),
    "score": (True, lambda v: isinstance(v, str), "a string"),
    "input_shape": (
        True,
        lambda v: isinstance(v, list) and len(v) in (0, 3)
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in v),
        "[] or [C, H, W] positive integers",
    ),
    "model_fingerprint": (True, lambda v: isinstance(v, str), "a string"),
    "created": (True, lambda v: isinstance(v, str), "a string"),
    "layer_reason": (False, lambda v: isinstance(v, str), "a string"),
    "data_source": (False, lambda v: v is None or isinstance(v, dict), "an object or null"),
    "layer_fingerprint": (False, lambda v: isinstance(v, str), "a string"),
    "alarm": (False, lambda v: v is None or isinstance(v, dict), "an object or null"),
}  # fmt: skip


def _parse_meta(path: Path, text: Any) -> dict[str, Any]:
    """The table's fields from its JSON metadata; :class:`TableError` naming the field that is
    missing or of the wrong type (or saying the JSON is malformed)."""
    if not isinstance(text, str):
        raise TableError(f"{path}: the header has no 'meta' JSON")
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise TableError(f"{path}: the metadata is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise TableError(f"{path}: the metadata is not a JSON object")
    out: dict[str, Any] = {}
    for name, (required, ok, what) in _META_FIELDS.items():
        if name not in meta:
            if required:
                raise TableError(f"{path}: metadata field {name!r} is missing")
            continue
        if not ok(meta[name]):
            raise TableError(f"{path}: metadata field {name!r} must be {what}")
        out[name] = meta[name]
    out["input_shape"] = tuple(out["input_shape"])
    out["class_output"] = out.pop("score")  # the file's name for the differentiated class output
    return out


def _check_counts(path: Path, text: str, table: CalibrationTable) -> None:
    """:class:`TableError` when the metadata's class or filter count disagrees with the
    tensors."""
    meta = json.loads(text)
    for name, have in (("num_classes", table.num_classes), ("num_filters", table.num_filters)):
        if name in meta and meta[name] != have:
            raise TableError(
                f"{path}: metadata field {name!r} is {meta[name]!r}, the tensors hold {have}"
            )


def _check_format(path: Path, header: dict[str, str]) -> None:
    """:class:`TableError` unless the header names this format and a version this code reads."""
    if header.get("format") != FORMAT_NAME:
        raise TableError(f"{path}: not a surprise-monitor calibration table")
    if header.get("format_version") != str(FORMAT_VERSION):
        raise TableError(
            f"{path}: table format version {header.get('format_version')} is not supported "
            f"(this library reads version {FORMAT_VERSION})"
        )


def _read_tensors(
    path: Path, entries: dict[str, Any], data_start: int, names: Iterable[str]
) -> tuple[dict[str, torch.Tensor], dict[str, Callable[[], None]]]:
    """The named tensors of a verified file: large ones mapped (with a function that drops
    their pages from memory), small ones copied. Any tensor set: the names and the header
    entries decide."""
    tensors: dict[str, torch.Tensor] = {}
    releases: dict[str, Callable[[], None]] = {}
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if data_start else None
    for name in names:
        entry = entries[name]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {name!r} has unsupported dtype {entry['dtype']}")
        start, stop = (data_start + int(o) for o in entry["data_offsets"])
        shape = tuple(int(d) for d in entry["shape"])
        count = math.prod(shape)
        if not data_start <= start <= stop <= file_size or count * dtype.itemsize != stop - start:
            raise ValueError(f"tensor {name!r}: bytes {start}..{stop} do not hold shape {shape}")
        if count == 0:
            tensors[name] = torch.zeros(shape, dtype=dtype)
            continue
        t = torch.frombuffer(mapped, dtype=dtype, count=count, offset=start).view(shape)
        if stop - start < MAP_BYTES:
            t = t.clone()
        else:
            releases[name] = _page_release(mapped, start, stop - start)
        tensors[name] = t
    return tensors, releases


def _page_release(mapped: mmap.mmap, start: int, nbytes: int) -> Callable[[], None]:
    """A function that drops the pages of ``[start, start + nbytes)`` of a private read-only
    mapping from the process (they are read from the file again when touched)."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None or not hasattr(mapped, "madvise"):
        return lambda: None
    lo = start // mmap.PAGESIZE * mmap.PAGESIZE

    def release() -> None:
        """Drop the pages."""
        mapped.madvise(advice, lo, start + nbytes - lo)

    return release


def _check_mapped_grid(
    tensors: dict[str, torch.Tensor], release: Callable[[], None] | None
) -> None:
    """Check a mapped alpha grid and its means a few classes at a time, dropping the pages read
    after each (:class:`TableError`); a copied grid is checked by the table itself."""
    if release is None:
        return
    q, mean, levels = tensors["quantiles"], tensors["mean"], tensors["levels"]
    per_class = max(1, q[:1].numel() * q.element_size())
    try:
        check_percentile_grid(
            levels, q, mean, chunk=max(1, CHECK_CHUNK_BYTES // per_class), after_chunk=release
        )
    except ValueError as exc:
        raise TableError(str(exc)) from exc


_PRECHECKED = threading.local()


@contextmanager
def _prechecked(*tensors: torch.Tensor) -> Iterator[None]:
    """While the block runs in this thread, :meth:`CalibrationTable.validate` trusts the values
    of exactly these tensor objects (:meth:`CalibrationTable.load` checked them in chunks)."""
    _PRECHECKED.ids = tuple(id(t) for t in tensors)
    try:
        yield
    finally:
        _PRECHECKED.ids = ()


def _is_prechecked(*tensors: torch.Tensor) -> bool:
    """True when every tensor is one :func:`_prechecked` vouches for."""
    ids = getattr(_PRECHECKED, "ids", ())
    return all(id(t) in ids for t in tensors)


def _split(body: bytes) -> tuple[dict[str, Any], bytes]:
    """A serialised safetensors file's tensor entries (no metadata) and its data section."""
    (size,) = struct.unpack("<Q", body[:8])
    entries = json.loads(body[8 : 8 + size])
    entries.pop("__metadata__", None)
    return entries, body[8 + size :]


def _checksum(meta_json: str, entries: dict[str, Any], chunks: Iterable[bytes]) -> str:
    """SHA-256 over the metadata JSON, the tensor entries (dtype, shape, offsets) and the data."""
    h = hashlib.sha256(meta_json.encode())
    h.update(json.dumps(entries, sort_keys=True).encode())
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


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
