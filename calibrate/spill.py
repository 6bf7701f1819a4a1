"""Streaming alpha values to disk, one raw float32 file per class, with bounded RAM.

Each class c gets ``class_{c}.alpha`` (rows of N float32 values, one row per image) and
``class_{c}.index`` (int64 dataset indices, one per row). Rows are buffered in memory up to
``buffer_bytes`` in total and then appended to the files, so memory does not grow with the
number of images.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from surprise_monitor.calibrate.statistics import FileRows

_CLASS_FILE = re.compile(r"class_(\d+)\.(alpha|index)")


class AlphaSpill:
    """Append-only per-class store of alpha rows and their dataset indices."""

    def __init__(
        self, directory: str | Path, num_filters: int, buffer_bytes: int = 32 << 20
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.num_filters = int(num_filters)
        self.buffer_bytes = int(buffer_bytes)
        self._rows: dict[int, list[np.ndarray]] = {}
        self._index: dict[int, list[np.ndarray]] = {}
        self._buffered = 0
        self._touched: set[int] = set()
        self.counts: dict[int, int] = {}

    def alpha_path(self, c: int) -> Path:
        """Class ``c``'s file of alpha rows."""
        return self.directory / f"class_{c}.alpha"

    def index_path(self, c: int) -> Path:
        """Class ``c``'s file of dataset indices."""
        return self.directory / f"class_{c}.index"

    def append(self, alpha: np.ndarray, classes: np.ndarray, indices: np.ndarray) -> None:
        """Add rows ``alpha[i]`` (``[B, N]`` float32) for ``classes[i]`` and ``indices[i]``."""
        alpha = np.ascontiguousarray(alpha, dtype=np.float32)
        if alpha.ndim != 2 or alpha.shape[1] != self.num_filters:
            raise ValueError(f"alpha rows must be [B, {self.num_filters}], got {alpha.shape}")
        for c in np.unique(classes):
            sel = classes == c
            c = int(c)
            self._rows.setdefault(c, []).append(alpha[sel])
            self._index.setdefault(c, []).append(np.asarray(indices[sel], dtype=np.int64))
            self.counts[c] = self.counts.get(c, 0) + int(sel.sum())
        self._buffered += alpha.nbytes + 8 * len(indices)
        if self._buffered >= self.buffer_bytes:
            self.flush()

    def flush(self) -> None:
        """Append every buffered row to its class's files."""
        for c, rows in self._rows.items():
            self._touched.add(c)
            with open(self.alpha_path(c), "ab") as f:
                for r in rows:
                    f.write(np.ascontiguousarray(r).tobytes())
            with open(self.index_path(c), "ab") as f:
                for i in self._index[c]:
                    f.write(i.tobytes())
        self._rows.clear()
        self._index.clear()
        self._buffered = 0

    def sync(self) -> dict[int, int]:
        """Flush, make every file written since the last sync durable (fsync), and return the
        rows stored per class: what a checkpoint manifest records."""
        self.flush()
        for c in sorted(self._touched):
            for path in (self.alpha_path(c), self.index_path(c)):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        self._touched.clear()
        return dict(sorted(self.counts.items()))

    def restore(self, rows: dict[int, int]) -> None:
        """Cut the class files back to ``rows[c]`` rows each (a checkpoint's record) and remove
        files of other classes: rows written after that checkpoint are dropped."""
        self._rows.clear()
        self._index.clear()
        self._buffered = 0
        for path in self.directory.iterdir():
            m = _CLASS_FILE.fullmatch(path.name)
            if m and int(m.group(1)) not in rows:
                path.unlink()
        for c, n in rows.items():
            for path, size in ((self.alpha_path(c), 4 * self.num_filters * n),
                               (self.index_path(c), 8 * n)):  # fmt: skip
                have = path.stat().st_size if path.exists() else 0
                if have < size:
                    raise ValueError(
                        f"{path}: {have} bytes, the checkpoint recorded {size}: the spill files "
                        "were changed or lost since the checkpoint"
                    )
                if have > size:
                    os.truncate(path, size)
        self.counts = {int(c): int(n) for c, n in rows.items()}
        self._touched = set(self.counts)

    def clear(self) -> None:
        """Remove every class file in the folder (a fresh start)."""
        self.restore({})

    def read_alpha(self, c: int) -> FileRows:
        """Class ``c``'s alpha rows ``[n_c, N]``, readable in chunks (flushes first)."""
        self.flush()
        return FileRows(self.alpha_path(c), self.num_filters)

    def read_indices(self, c: int) -> np.ndarray:
        """Class ``c``'s dataset indices, one per alpha row (flushes first)."""
        self.flush()
        path = self.index_path(c)
        return np.fromfile(path, dtype=np.int64) if path.exists() else np.zeros(0, np.int64)
