"""Which inputs the request path judges: one in K, or a seeded random fraction."""

from __future__ import annotations

import random
import threading

import torch

from surprise_monitor.monitor.options import Sampling


class Sampler:
    """Chooses which inputs to monitor, as ``sampling`` says: one in ``sampling.every``
    (counted over all calls and threads, so exactly ``ceil(T / every)`` of T inputs) or a
    random ``sampling.fraction`` (seeded by ``sampling.seed``). The values are checked by
    :class:`~surprise_monitor.monitor.options.Sampling` itself."""

    def __init__(self, sampling: Sampling | None = None) -> None:
        sampling = Sampling() if sampling is None else sampling
        if not isinstance(sampling, Sampling):
            raise TypeError(f"Sampler takes a Sampling, got {type(sampling).__name__}")
        self.sampling = sampling
        self._lock = threading.Lock()
        self._seen = 0
        self._rng = random.Random(sampling.seed)

    @property
    def takes_all(self) -> bool:
        """True when every input is monitored."""
        return self.sampling.takes_all

    def select(self, n: int) -> torch.Tensor:
        """``[n]`` bool: which of the next ``n`` inputs to monitor."""
        if self.takes_all:
            return torch.ones(n, dtype=torch.bool)
        every, fraction = self.sampling.every, self.sampling.fraction
        with self._lock:
            start, self._seen = self._seen, self._seen + n
            if fraction < 1.0:
                draws = [self._rng.random() < fraction for _ in range(n)]
                return torch.tensor(draws, dtype=torch.bool)
        return (torch.arange(start, start + n) % every) == 0
