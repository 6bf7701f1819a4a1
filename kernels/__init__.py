"""Compute kernels for the surprise monitor: math on tensors, nothing about files or models.

``grad_amap`` turns a layer's activation and gradient into per-filter alpha scores;
``percentile_lookup`` ranks alpha against a per-class calibration table and derives the
surprise / expectation flags and beta. Each op has three modules, as in Liger-Kernel: a
dispatcher with the validation (``amap.py``, ``lookup.py``), a plain-PyTorch path that is both
the reference and the production path on CPU (``*_torch.py``) and a fused Triton kernel for
CUDA tensors (``*_triton.py``, imported lazily, only when the Triton backend runs).
``grid.py`` holds the percentile-grid math both the ops and the table format use.
"""

from surprise_monitor.kernels._types import LookupResult, LookupTable
from surprise_monitor.kernels.amap import grad_amap
from surprise_monitor.kernels.grid import check_percentile_grid, percentile_rank, quantile_at
from surprise_monitor.kernels.lookup import percentile_lookup
from surprise_monitor.kernels.table import prepare_lookup_table

__all__ = [
    "LookupResult",
    "LookupTable",
    "check_percentile_grid",
    "grad_amap",
    "percentile_lookup",
    "percentile_rank",
    "prepare_lookup_table",
    "quantile_at",
]
