"""GPU kernels (Triton) behind ``torch.ops.mta.attention`` for CUDA tensors.

Dispatch for a CUDA call, after a mask that is key padding (∧ the causal triangle) by value has
been turned into key padding (``ops/masks.simplify_mask``: what transformers models pass):

- a configuration that is exact (one chunk, c ≥ n) → ``scaled_dot_product_attention`` (``is_causal``,
  or with the mask left; ``ops.attention.exact_sdpa``);
- no mask or a key-padding mask, fp16/bf16/fp32, triton installed → the fused Triton forward
  (``mta_fwd.py``);
- anything else (masks that vary per query, additive biases, float64) → the portable implementation
  (``ops/chunked.py``), correct for every mask.

Learned summaries (``summary_weight``) take the same routes: the pre-pass pools them. Soft-capped
logits (``softcap``, Gemma-2) too: the forward kernel caps every tile's logits (``_scores``), the
exact configuration runs the op's own exact path (SDPA has no cap). Clustered
summaries (``centroids``, non-causal) too (``dispatch_cuda_clustered``): the Triton kernels with
their own pre-pass (``clusters.py``) for no mask or key padding, else ``ops/clustered.py``.
Boundary chunks (``segment_ids``, ``dispatch_cuda_boundary``): for no mask or key padding the
Triton kernels read each chunk where it lies (``chunk_starts``: no padding slots); otherwise the
tokens are moved into padded chunk slots (``ops/segments.py``) and dispatched as above.

Gradients for a CUDA call (``backward_cuda``): no mask or a key-padding mask, fp16/bf16/fp32, more
than one chunk, tensors under 2^31 elements, no soft-cap → the Triton backward (``mta_bwd.py``; mean, learned
and clustered summaries; boundary chunks read where they lie, as in the forward); otherwise the op's
backward recomputes the forward with the portable implementation under autograd, on the same
device (no transfer to the CPU), boundary chunks unpadded where ``ops/varlen.py`` takes the mask
(no mask or key padding), else in padded slots.
"""

from __future__ import annotations

import functools

import torch

from ..ops.attention import Implementations
from ..ops.chunked import mta_attention_chunked
from ..ops.clustered import mta_attention_clustered
from ..ops.layout import in_layout_of
from ..ops.masks import simplify_mask
from ..ops.segments import chunk_bounds, segmented


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_keep(q, attn_mask):
    """What the Triton forward takes as the mask: [B, n] bool key-padding flags, or None for no
    mask; False where the kernels do not apply (not fp16/bf16/fp32, triton missing, or a mask that
    is not key padding: the caller then takes the portable implementation)."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not triton_available():
        return False
    from .mta_fwd import key_padding

    return key_padding(attn_mask, q.shape[0], q.shape[1], q.shape[2])


def dispatch_cuda(q, k, v, attn_mask, *, chunk_size, causal, scale, local_chunks, sinks, top_k, summary_weight=None,
                  rows_from: int = 0, softcap: float = 0.0):
    """Fixed chunks on CUDA, by the rules of this module's docstring. ``rows_from``
    (``attention_autograd``'s): the caller reads the rows from that query on only; the kernels and
    the portable implementation leave the query blocks (chunks) wholly before it uncomputed."""
    n = q.shape[2]
    # a transformers model's [B, 1, n, n] mask is key padding (∧ the causal triangle) by value: as
    # such it runs on the fused kernels instead of the portable implementation (ops/masks.py)
    attn_mask, causal = simplify_mask(attn_mask, q.shape[0], q.shape[1], n, causal)
    kwargs = dict(chunk_size=chunk_size, causal=causal, scale=scale, local_chunks=local_chunks, sinks=sinks, top_k=top_k,
                  softcap=softcap)
    if chunk_size >= n:
        # exact: SDPA (is_causal, or with the mask left), in q's layout like every other path (the
        # flash and cuDNN backends return a transposed [B, n, H, d] buffer whatever q's layout;
        # soft-capped: the op's own exact path, SDPA has no cap)
        from ..ops.attention import exact_sdpa

        return exact_sdpa(q, k, v, attn_mask, causal, scale, softcap)
    keep = kernel_keep(q, attn_mask)
    if keep is not False:
        from .mta_fwd import mta_forward_triton

        return mta_forward_triton(q, k, v, keep, summary_weight=summary_weight, rows_from=rows_from, **kwargs)
    return mta_attention_chunked(q, k, v, attn_mask, summary_weight=summary_weight, rows_from=rows_from, **kwargs)


def dispatch_cuda_clustered(q, k, v, attn_mask, *, chunk_size, scale, local_chunks, sinks, centroids, softcap=0.0):
    """Clustered summaries on CUDA (inputs checked by ``ops.clustered.check_clustered``, the mask
    already simplified): one chunk → SDPA (the window covers every key), no mask or key padding
    in fp16/bf16/fp32 → the Triton kernels, otherwise the portable implementation."""
    n = q.shape[2]
    if chunk_size >= n:
        from ..ops.attention import exact_sdpa

        return exact_sdpa(q, k, v, attn_mask, False, scale, softcap)
    keep = kernel_keep(q, attn_mask)
    if keep is not False:
        from .mta_fwd import mta_forward_triton

        return mta_forward_triton(q, k, v, keep, chunk_size=chunk_size, scale=scale, local_chunks=local_chunks,
                                  sinks=sinks, centroids=centroids, softcap=softcap)
    return mta_attention_clustered(q, k, v, attn_mask, chunk_size=chunk_size, scale=scale, local_chunks=local_chunks,
                                   sinks=sinks, centroids=centroids, softcap=softcap)


def dispatch_cuda_boundary(q, k, v, attn_mask, segment_ids, *, chunk_size, causal, scale, local_chunks, sinks, top_k,
                           summary_weight=None, rows_from: int = 0, softcap: float = 0.0):
    """Boundary chunks on CUDA (the mask already simplified): no mask or key padding in
    fp16/bf16/fp32 → the Triton kernels reading the chunks where they lie (``chunk_bounds``: no
    padding slots, no gathers); otherwise the tokens moved into padded chunk slots and
    :func:`dispatch_cuda` there (``ops/segments.py``). ``rows_from``: the Triton kernels leave the
    chunks wholly before it (in every sequence) uncomputed; the slots compute every row."""
    kwargs = dict(chunk_size=chunk_size, causal=causal, scale=scale, local_chunks=local_chunks, sinks=sinks, top_k=top_k,
                  summary_weight=summary_weight, softcap=softcap)
    keep = kernel_keep(q, attn_mask)
    if keep is not False:
        from .mta_fwd import mta_forward_triton

        starts = chunk_bounds(segment_ids, q.shape[0], chunk_size, sinks)
        return mta_forward_triton(q, k, v, keep, chunk_starts=starts, rows_from=rows_from, **kwargs)
    return in_layout_of(q, segmented(dispatch_cuda, q, k, v, attn_mask, segment_ids, **kwargs))


def backward_cuda(q, k, v, attn_mask, grad_out, *, chunk_size, causal, scale, local_chunks, sinks, top_k,
                  segment_ids=None, centroids=None, summary_weight=None):
    """(dq, dk, dv) from the Triton backward, or None where it does not apply (the caller then
    recomputes through the portable implementation, or for boundary chunks computes the gradients
    in padded slots). ``segment_ids``: boundary chunks, read where they lie (``chunk_bounds``) as
    ``dispatch_cuda_boundary``'s forward reads them. ``centroids``: clustered summaries, as
    ``dispatch_cuda_clustered``'s forward computes them. ``summary_weight``: learned summaries;
    the result is then (dq, dk, dv, dw)."""
    n = q.shape[2]
    exact = segment_ids is None and chunk_size >= n  # one fixed chunk: SDPA ran the forward
    keep = False if exact else kernel_keep(q, attn_mask)
    if keep is False:
        return None
    from .mta_bwd import mta_backward_triton
    from .mta_fwd import WIDE_OFFSETS_FROM

    # each query chunk's clustered summaries: [B, Hkv, nc·K, d]
    summaries = 0 if centroids is None else k.shape[0] * -(-n // chunk_size) * centroids.numel()
    if max(summaries, *(t.numel() for t in (q, k, v, grad_out))) >= WIDE_OFFSETS_FROM:
        return None  # the backward kernels index contiguous copies with 32-bit offsets
    starts = None if segment_ids is None else chunk_bounds(segment_ids, q.shape[0], chunk_size, sinks)
    return mta_backward_triton(q, k, v, keep, grad_out, chunk_size=chunk_size, causal=causal, scale=scale,
                               local_chunks=local_chunks, sinks=sinks, top_k=top_k, chunk_starts=starts,
                               centroids=centroids, summary_weight=summary_weight)


CUDA = Implementations(dispatch_cuda, dispatch_cuda_boundary, dispatch_cuda_clustered)
