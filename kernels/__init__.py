"""Compute kernels for the surprise monitor.

``grad_amap`` turns a layer's activation and gradient into per-filter alpha scores;
``percentile_lookup`` ranks alpha against a per-class calibration table and derives the
surprise / expectation flags and beta. Each has a pure-PyTorch reference
(:mod:`kernels.reference`, also the CPU production path) and a Triton kernel used for CUDA
tensors. Triton is imported lazily, only when the Triton backend actually runs.
"""

from kernels import reference
from kernels._types import LookupResult, LookupTable
from kernels.amap import grad_amap
from kernels.lookup import percentile_lookup
from kernels.table import prepare_lookup_table

__all__ = [
    "LookupResult",
    "LookupTable",
    "grad_amap",
    "percentile_lookup",
    "prepare_lookup_table",
    "reference",
]
