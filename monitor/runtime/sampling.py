"""Which inputs the request path judges: one in K, or a seeded random fraction."""

from __future__ import annotations

import random
import threading

import torch


class Sampler:
    """Chooses which inputs to monitor: one in ``every`` (counted over all calls and threads,
    so exactly ``ceil(T / every)`` of T inputs) or a random ``fraction`` (seeded)."""

    def __init__(self, every: int = 1, fraction: float = 1.0, seed: int | None = 0) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"sample_every must be an integer >= 1, got {every!r}")
        fraction = float(fraction)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"sample_fraction must be in (0, 1], got {fraction}")
        if every > 1 and fraction < 1.0:
            raise ValueError("give sample_every or sample_fraction, not both")
        self.every = every
        self.fraction = fraction
        self._lock = threading.Lock()
        self._seen = 0
        self._rng = random.Random(seed)

    @property
    def takes_all(self) -> bool:
        """True when every input is monitored."""
        return self.every == 1 and self.fraction == 1.0

    def select(self, n: int) -> torch.Tensor:
        """``[n]`` bool: which of the next ``n`` inputs to monitor."""
        if self.takes_all:
            return torch.ones(n, dtype=torch.bool)
        with self._lock:
            start, self._seen = self._seen, self._seen + n
            if self.fraction < 1.0:
                draws = [self._rng.random() < self.fraction for _ in range(n)]
                return torch.tensor(draws, dtype=torch.bool)
        return (torch.arange(start, start + n) % self.every) == 0
