"""Run Triton kernels through the interpreter on CPU-only machines.

Must run before any test imports ``kernels.*_triton`` (``@triton.jit`` reads
``TRITON_INTERPRET`` when the kernel module is imported). Importing torch does not import
triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
