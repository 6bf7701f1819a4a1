"""The calibration table's file format: safetensors tensors plus JSON metadata, never unpickled.

A SHA-256 over the metadata and every tensor's bytes is kept in the header, so a truncated or
edited file is refused with a clear error instead of being used silently. Anyone can recompute
it after a deliberate edit, so a table can also be signed: an HMAC-SHA256 of the same bytes
under a secret key (:mod:`~.table_key`), in the header's ``hmac_sha256`` field, which a reader
given the key requires and checks (:class:`TableSignatureError`). :func:`read_table_file`
verifies the checksum (and the signature) in one pass of ordinary reads, then memory-maps the
large tensors (copy-on-write, never written back) and checks the alpha grid's values a few
classes at a time, dropping the pages it read; :func:`write_table_file` checksums (and signs)
and writes a file atomically. The alpha grid is stored class-major (``quantiles [K, N, Q]``):
one class's grid is one contiguous block, so the lookup (:mod:`surprise_monitor.kernels.table`)
reads only the blocks of the classes it sees.

The table's own model, its validation and queries are :mod:`surprise_monitor.monitor.table`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import mmap
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save as safetensors_save

from surprise_monitor.kernels import check_percentile_grid
from surprise_monitor.monitor.errors import SurpriseMonitorError
from surprise_monitor.monitor.files import atomic_write_bytes
from surprise_monitor.monitor.table_alarm import PREFIX as ALARM_PREFIX
from surprise_monitor.monitor.table_key import load_key

FORMAT_NAME = "surprise-monitor-table"
FORMAT_VERSION = 1
#: Tensors at least this large are memory-mapped from the file; smaller ones are copied.
MAP_BYTES = 1 << 20
#: Bytes of the alpha grid checked at a time when a table is validated.
CHECK_CHUNK_BYTES = 4 << 20
#: Largest JSON header a table file may have (checked before it is read or parsed): metadata
#: and 8 tensor entries; 100,000 class names of 100 characters fit.
MAX_HEADER_BYTES = 16 << 20
#: The header field that holds a signed table's HMAC-SHA256 (hex), beside ``sha256``.
SIGNATURE_FIELD = "hmac_sha256"
#: The alpha table's tensors, in file order (the alarm's are named with ``ALARM_PREFIX``).
TENSOR_NAMES = (
    "levels", "quantiles", "mean", "counts",
    "beta_levels", "beta_quantiles", "top_indices", "top_alpha",
)  # fmt: skip
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class TableError(SurpriseMonitorError, ValueError):
    """A calibration table file or object is invalid (corrupt, truncated, edited, inconsistent)."""


class TableSignatureError(TableError):
    """A table read with a key is not signed, or its signature does not match the key."""


@dataclass(frozen=True)
class TableFile:
    """What :func:`read_table_file` read and verified: the table's fields from the metadata
    (``class_output`` named so, the alarm's metadata left as JSON), its tensors, the file's
    checksum, whether the alpha grid's values were already checked (a mapped grid is
    checked in chunks while it is read; a copied one is left to the table), whether the file
    is signed and whether its signature was verified (only when read with a key)."""

    path: Path
    sha256: str
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    grid_values_checked: bool
    counts_meta: dict[str, Any]  # the metadata's num_classes / num_filters, checked by the table
    signed: bool = False
    signature_verified: bool = False


def read_table_file(
    path: str | Path, *, exemplars: bool = True, key: bytes | str | Path | None = None
) -> TableFile:
    """Read and verify a table file (:class:`TableError` for anything corrupt, truncated or
    edited); ``exemplars=False`` leaves ``top_indices`` / ``top_alpha`` out. With a ``key``
    (bytes or a key file, :func:`~.table_key.load_key`) the file must be signed with it
    (:class:`TableSignatureError` otherwise); without one a signature is not checked."""
    path = Path(path)
    key = None if key is None else load_key(key)
    if not path.is_file():
        raise TableError(f"{path}: no such calibration table file")
    try:
        header, entries, data_start = _verified_header(path, key)
        missing = [n for n in TENSOR_NAMES if n not in entries]
        if missing:
            raise TableError(f"{path}: table lacks tensors {missing}")
        skip = set() if exemplars else {"top_indices", "top_alpha"}
        names = [n for n in TENSOR_NAMES if n not in skip]
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
    raw = json.loads(header.get("meta", "{}"))
    counts = {k: raw[k] for k in ("num_classes", "num_filters") if k in raw}
    signed = SIGNATURE_FIELD in header
    return TableFile(
        path, header["sha256"], meta, tensors, "quantiles" in releases, counts,
        signed=signed, signature_verified=signed and key is not None,
    )  # fmt: skip


def write_table_file(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    meta: dict,
    key: bytes | str | Path | None = None,
) -> str:
    """Write ``tensors`` (CPU, contiguous, file dtypes) and the JSON ``meta`` to ``path``
    atomically, with its checksum, and signed when a ``key`` is given; returns the checksum."""
    body, sha256 = signed_file(tensors, meta, key)
    atomic_write_bytes(Path(path), body)
    return sha256


def signed_file(
    tensors: dict[str, torch.Tensor], meta: dict, key: bytes | str | Path | None = None
) -> tuple[bytes, str]:
    """The bytes of a table file with its checksum (and, with a ``key``, its HMAC-SHA256 in
    the header's :data:`SIGNATURE_FIELD`), and the checksum."""
    key = None if key is None else load_key(key)
    header = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "meta": json.dumps(meta, sort_keys=True),
    }
    # The data section does not depend on the metadata: serialise once to checksum it.
    entries, data = _split(safetensors_save(tensors, metadata=header))
    header["sha256"], signature = _digests(header["meta"], entries, [data], key)
    if signature is not None:
        header[SIGNATURE_FIELD] = signature
    return safetensors_save(tensors, metadata=header), header["sha256"]


def _verified_header(
    path: Path, key: bytes | None = None
) -> tuple[dict[str, str], dict[str, Any], int]:
    """The file's metadata header, its tensor entries and where the data starts, after checking
    the format, the size, the checksum and (with a ``key``) the signature with ordinary reads
    (``ValueError`` / :class:`TableError` otherwise)."""
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
        digest, signature = _digests(header.get("meta", ""), entries, chunks, key)
    if header.get("sha256") != digest:
        raise TableError(f"{path}: checksum mismatch: the file was edited or corrupted")
    if signature is not None:
        _check_signature(path, header.get(SIGNATURE_FIELD), signature)
    return header, entries, 8 + size


def _check_signature(path: Path, stored: Any, computed: str) -> None:
    """:class:`TableSignatureError` unless the header's signature ``stored`` is ``computed``
    (compared in constant time)."""
    if stored is None:
        raise TableSignatureError(
            f"{path} is not signed; sign it with surprise-calibrate --sign-key or "
            "table.save(..., key=...)"
        )
    if not isinstance(stored, str) or not hmac.compare_digest(stored.encode(), computed.encode()):
        raise TableSignatureError(
            f"{path}: signature mismatch: the table was changed after it was signed, or signed "
            "with another key"
        )


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
        if not isinstance(meta, dict):
            raise ValueError(f"it is a {type(meta).__name__}")
    except ValueError as exc:  # malformed, or not an object: one message names both
        raise TableError(
            f"{path}: the metadata is not valid JSON or not a JSON object: {exc}"
        ) from exc
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


def _split(body: bytes) -> tuple[dict[str, Any], bytes]:
    """A serialised safetensors file's tensor entries (no metadata) and its data section."""
    (size,) = struct.unpack("<Q", body[:8])
    entries = json.loads(body[8 : 8 + size])
    entries.pop("__metadata__", None)
    return entries, body[8 + size :]


def _digests(
    meta_json: str, entries: dict[str, Any], chunks: Iterable[bytes], key: bytes | None
) -> tuple[str, str | None]:
    """SHA-256 over the metadata JSON, the tensor entries (dtype, shape, offsets) and the data,
    and with a ``key`` the HMAC-SHA256 of the same bytes (else ``None``), in one pass."""
    hashes = [hashlib.sha256()]
    if key is not None:
        hashes.append(hmac.new(key, digestmod=hashlib.sha256))
    for part in (meta_json.encode(), json.dumps(entries, sort_keys=True).encode()):
        for h in hashes:
            h.update(part)
    for chunk in chunks:
        for h in hashes:
            h.update(chunk)
    return hashes[0].hexdigest(), hashes[1].hexdigest() if key is not None else None
