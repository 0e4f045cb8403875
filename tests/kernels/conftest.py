"""Without CUDA, the kernels run in Triton's interpreter: set it before anything imports triton
(``@triton.jit`` decides between compiled and interpreted when the kernel module is imported)."""

import os

import torch

# every fused launch checks its tickets and waits (mta_fwd.CHECK_SYNC)
os.environ.setdefault("MTA_CHECK_SYNC", "1")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
