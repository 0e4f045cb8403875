"""What the kernel tests share: where they run, their inputs and the padding mask.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1 before triton is imported); with CUDA, on the GPU.
"""

from __future__ import annotations

import os

import torch

CUDA = torch.cuda.is_available()
assert CUDA or os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets the interpreter without CUDA"
DEVICE = "cuda" if CUDA else "cpu"


def inputs(B, Hq, Hkv, n, d, dtype, seed=0, grad=False):
    """q [B, Hq, n, d], k and v [B, Hkv, n, d] (and with ``grad`` an output gradient like q),
    standard normal from one seeded generator, on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(B, h, n, d, generator=g) for h in (Hq, Hkv, Hkv)]
    if grad:
        tensors.append(torch.randn(B, Hq, n, d, generator=g))
    return [x.to(dtype).to(DEVICE) for x in tensors]


def padding(B, n):
    """A [B, 1, 1, n] key-padding mask: 5 left-padded keys in the first sequence, 7 right-padded
    in the last."""
    pad = torch.ones(B, 1, 1, n, dtype=torch.bool)
    pad[0, ..., :5] = False  # left padding
    pad[-1, ..., n - 7:] = False  # right padding
    return pad.to(DEVICE)


def strided(x, layout):
    """x [B, H, n, d] in a model's layouts: "transposed", a transposed [B, n, H, d] buffer, or
    "fused_slice", a slice of a fused projection (rows of d inside rows of 3·d: not dense)."""
    if layout == "transposed":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    B, H, n, d = x.shape
    wide = torch.zeros(B, n, H, 3 * d, dtype=x.dtype, device=x.device)
    wide[..., d:2 * d] = x.transpose(1, 2)
    return wide[..., d:2 * d].transpose(1, 2)
