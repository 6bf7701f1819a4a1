"""Calibration on several processes (``torchrun``): sharding, and merging the per-class data.

Sharding: the data's global batch list (batch ``b`` holds dataset indices ``b*B ... b*B+B-1``,
exactly the batches of a one-process run) is dealt round-robin: rank ``r`` of ``W`` computes
batches ``r, r+W, r+2W, ...``. Every image's alpha is therefore computed in the same batch as in
a one-process run with the same batch size, so the spilled values are bit-identical.

Merge (exact mode): class ``c`` belongs to rank ``c % W``, which computes its statistics from the
class's rows of every rank. When all ranks see one folder (``spill_dir`` / ``checkpoint_dir``
on one machine or a shared file system; checked with a token every rank writes), the owner reads
the other ranks' spill files directly. Otherwise the rows are sent to the owner over
torch.distributed (point-to-point, in chunks of ``chunk_bytes``, on a gloo group even when the
main backend is nccl) and written to its disk first, so no rank holds more than one chunk.
Statistics sort a class's rows by dataset index before any sum, so they do not depend on which
rank sent what. Each owner then broadcasts its classes' statistics, so every rank returns the
same table.

Approximate mode: the ranks' sketches are summed class by class with ``all_reduce``
(:meth:`surprise_monitor.calibrate.sketch.HistogramSketch.reduce`).
"""

from __future__ import annotations

import json
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from surprise_monitor.calibrate.spill import AlphaSpill
from surprise_monitor.calibrate.statistics import ClassStatistics, ConcatRows, FileRows, RowSource


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a distributed run (``rank 0 of 1`` without one)."""

    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        """True with more than one process."""
        return self.world_size > 1


def current() -> DistInfo:
    """The default process group's rank and size, if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size())
    return DistInfo()


def init_from_env(device: str) -> tuple[DistInfo, str, bool]:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1).

    Backend: nccl for a CUDA device, gloo otherwise; on CUDA each process takes
    ``cuda:LOCAL_RANK``. Returns ``(info, device, initialised_here)``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return current(), device, False
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if dist.is_initialized():
        return current(), device, False
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return current(), device, True


def shard_dir(root: str | Path, info: DistInfo) -> Path:
    """The folder of one rank's files: ``root`` itself in a one-process run."""
    root = Path(root)
    return root if not info.distributed else root / f"rank{info.rank}-of-{info.world_size}"


class Comm:
    """Collectives on CPU tensors for one distributed run (a gloo group)."""

    def __init__(self, info: DistInfo) -> None:
        self.info = info
        self.group = None
        if info.distributed and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")

    def broadcast_json(self, obj: object, src: int) -> object:
        """``obj`` of rank ``src`` on every rank (JSON, no pickling; for small metadata)."""
        if not self.info.distributed:
            return obj
        data = json.dumps(obj).encode() if self.info.rank == src else b""
        size = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(size, src, group=self.group)
        sent = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else None
        return json.loads(bytes(self._broadcast_bytes(sent, int(size), src).numpy()).decode())

    def broadcast_tensors(
        self, tensors: dict[str, torch.Tensor] | None, src: int
    ) -> dict[str, torch.Tensor]:
        """Rank ``src``'s named tensors on every rank, bit for bit, as CPU tensors.

        Names, dtypes and shapes go as JSON; the data as one byte buffer (every tensor's raw
        bytes, in order) in one ``broadcast``, so any dtype, NaN payloads and signed zeros
        arrive unchanged. ``tensors`` is only read on rank ``src``.
        """
        mine = {}
        if self.info.rank == src:
            assert tensors is not None, "the sending rank must give its tensors"
            mine = dict(tensors)
        if not self.info.distributed:
            return {k: v.detach().cpu().contiguous() for k, v in mine.items()}
        spec = self.broadcast_json(
            [[k, str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in mine.items()], src
        )
        assert isinstance(spec, list)
        dtypes = [getattr(torch, d) for _, d, _ in spec]
        sizes = [math.prod(s) * torch.empty((), dtype=d).element_size()
                 for (_, _, s), d in zip(spec, dtypes, strict=True)]  # fmt: skip
        sent = torch.cat([_as_bytes(v) for v in mine.values()]) if mine else None
        parts = torch.split(self._broadcast_bytes(sent, sum(sizes), src), sizes)
        return {
            name: part.clone().view(dtype).reshape(shape)
            for (name, _, shape), dtype, part in zip(spec, dtypes, parts, strict=True)
        }

    def _broadcast_bytes(self, sent: torch.Tensor | None, size: int, src: int) -> torch.Tensor:
        """Rank ``src``'s ``sent`` (``size`` uint8 values; ``None`` elsewhere) on every rank."""
        buf = sent if self.info.rank == src and sent is not None else None
        buf = torch.empty(size, dtype=torch.uint8) if buf is None else buf
        if size:
            dist.broadcast(buf, src, group=self.group)
        return buf

    def all_reduce(self, array: np.ndarray, op: str = "sum") -> np.ndarray:
        """Reduce a numpy array over all ranks in place (``sum``, ``min`` or ``max``)."""
        if self.info.distributed:
            ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
            t = torch.from_numpy(np.ascontiguousarray(array))
            dist.all_reduce(t, ops[op], group=self.group)
            array[...] = t.numpy()
        return array

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` is true on every rank."""
        return bool(self.all_reduce(np.array([int(flag)], np.int64), "min")[0])

    def all_gather(self, array: np.ndarray) -> list[np.ndarray]:
        """Every rank's ``array`` (same shape and dtype everywhere), in rank order."""
        if not self.info.distributed:
            return [array]
        t = torch.from_numpy(np.ascontiguousarray(array))
        out = [torch.empty_like(t) for _ in range(self.info.world_size)]
        dist.all_gather(out, t, group=self.group)
        return [o.numpy() for o in out]

    def send(self, array: np.ndarray, dst: int) -> None:
        """Send ``array`` to rank ``dst`` (blocking)."""
        dist.send(torch.from_numpy(np.ascontiguousarray(array)), dst, group=self.group)

    def recv(self, shape: tuple[int, ...], dtype: np.dtype, src: int) -> np.ndarray:
        """Receive an array of ``shape`` and ``dtype`` from rank ``src`` (blocking)."""
        t = torch.from_numpy(np.empty(shape, dtype))
        dist.recv(t, src, group=self.group)
        return t.numpy()


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's values as flat uint8 bytes, on the CPU (any dtype, shape and strides)."""
    flat = torch.empty(t.numel(), dtype=t.dtype)  # fresh: a view's odd strides cannot leak in
    return flat.copy_(t.detach().reshape(-1)).view(torch.uint8)


def owner(c: int, info: DistInfo) -> int:
    """The rank that computes class ``c``'s statistics."""
    return c % info.world_size


def shared_folder(comm: Comm, root: Path | None) -> bool:
    """True when every rank can read every other rank's shard folder under ``root``."""
    info = comm.info
    if root is None:
        comm.all_true(False)  # keep the collectives in step
        return False
    nonce = comm.broadcast_json(secrets.token_hex(16) if info.rank == 0 else None, 0)
    token = shard_dir(root, info) / ".merge-token"
    token.write_text(f"{nonce} {info.rank}")
    comm.all_true(True)  # every token is written before anyone looks
    seen = True
    for r in range(info.world_size):
        path = shard_dir(root, DistInfo(r, info.world_size)) / ".merge-token"
        try:
            seen &= path.read_text() == f"{nonce} {r}"
        except OSError:
            seen = False
    shared = comm.all_true(seen)
    comm.all_true(True)  # everyone has looked: the tokens can go
    token.unlink(missing_ok=True)
    return shared


def class_sources(
    comm: Comm,
    spill: AlphaSpill,
    num_classes: int,
    root: Path | None,
    work: Path,
    merge: str,
    chunk_bytes: int = 8 << 20,
) -> dict[int, tuple[RowSource, np.ndarray]]:
    """For each class this rank owns: all ranks' rows of it and their dataset indices.

    ``merge``: ``RunOptions.merge`` (``"auto"``: read a shared folder when there is one, else
    send; ``"send"``).
    """
    info = comm.info
    spill.sync()
    if not info.distributed:
        return {c: (spill.read_alpha(c), spill.read_indices(c)) for c in range(num_classes)}
    if merge not in ("auto", "send"):
        raise ValueError(f"merge must be 'auto' or 'send', got {merge!r}")
    mine = [c for c in range(num_classes) if owner(c, info) == info.rank]
    if merge == "auto" and shared_folder(comm, root):
        assert root is not None
        return {c: _shared_rows(info, root, spill.num_filters, c) for c in mine}
    recv = _received_spill(comm, spill, num_classes, work, chunk_bytes)
    nf = spill.num_filters
    out = {}
    for c in mine:
        sources = [spill.read_alpha(c), recv.read_alpha(c)]
        indices = np.concatenate([spill.read_indices(c), recv.read_indices(c)])
        out[c] = (ConcatRows(sources, nf), indices)
    return out


def _shared_rows(
    info: DistInfo, root: Path, num_filters: int, c: int
) -> tuple[RowSource, np.ndarray]:
    """Class ``c``'s rows and indices read straight from every rank's shard folder."""
    spills = [
        AlphaSpill(shard_dir(root, DistInfo(r, info.world_size)), num_filters, buffer_bytes=0)
        for r in range(info.world_size)
    ]
    sources: list[RowSource] = [FileRows(s.alpha_path(c), num_filters) for s in spills]
    indices = np.concatenate([s.read_indices(c) for s in spills])
    return ConcatRows(sources, num_filters), indices


def _received_spill(
    comm: Comm, spill: AlphaSpill, num_classes: int, work: Path, chunk_bytes: int
) -> AlphaSpill:
    """Send every class's rows to its owner in chunks; the rows this rank received for its
    own classes, spilled to ``work``."""
    info, nf = comm.info, spill.num_filters
    recv = AlphaSpill(work, nf, buffer_bytes=0)
    recv.clear()
    rows_per_chunk = max(1, chunk_bytes // (4 * nf + 8))
    for c in range(num_classes):
        o = owner(c, info)
        if info.rank != o:
            rows = spill.read_alpha(c)
            n = rows.shape[0]
            comm.send(np.array([n], np.int64), o)
            index = spill.read_indices(c)
            for r0 in range(0, n, rows_per_chunk):
                comm.send(rows.read_rows(r0, r0 + rows_per_chunk), o)
                comm.send(index[r0 : r0 + rows_per_chunk], o)
            continue
        for src in range(info.world_size):
            if src == o:
                continue
            n = int(comm.recv((1,), np.int64, src)[0])
            for r0 in range(0, n, rows_per_chunk):
                m = min(rows_per_chunk, n - r0)
                alpha = comm.recv((m, nf), np.float32, src)
                index = comm.recv((m,), np.int64, src)
                recv.append(alpha, np.full(m, c), index)
        recv.flush()
    return recv


def share_statistics(
    comm: Comm,
    mine: dict[int, ClassStatistics],
    num_classes: int,
    num_filters: int,
    num_levels: int,
    num_beta_levels: int,
    top_k: int,
) -> list[ClassStatistics]:
    """Every class's statistics on every rank: each owner broadcasts its classes'."""
    info = comm.info
    if not info.distributed:
        return [mine[c] for c in range(num_classes)]
    nf, q, qb, k = num_filters, num_levels, num_beta_levels, top_k
    out = []
    for c in range(num_classes):
        o = owner(c, info)
        floats = np.empty(nf * q + nf + qb + nf * k, np.float32)
        ints = np.empty(nf * k + 1, np.int64)
        if info.rank == o:
            s = mine[c]
            floats[:] = np.concatenate(
                [s.quantiles.ravel(), s.mean, s.beta_quantiles, s.top_alpha.ravel()]
            )
            ints[:] = np.concatenate([s.top_indices.ravel(), [s.count]])
        tf, ti = torch.from_numpy(floats), torch.from_numpy(ints)
        dist.broadcast(tf, o, group=comm.group)
        dist.broadcast(ti, o, group=comm.group)
        cut = np.cumsum([nf * q, nf, qb])
        quantiles, mean, beta, top_alpha = np.split(floats, cut)
        out.append(
            ClassStatistics(
                quantiles.reshape(nf, q).copy(), mean.copy(), beta.copy(),
                ints[:-1].reshape(nf, k).copy(), top_alpha.reshape(nf, k).copy(), int(ints[-1]),
            )
        )  # fmt: skip
    return out
