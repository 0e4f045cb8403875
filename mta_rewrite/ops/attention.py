"""``torch.ops.mta.attention``: the MTA custom op, its fake implementation and its autograd.

The signature and the math are those of MTA_SPEC.md. The op is opaque to torch.export (it
appears as one node ``mta.attention.default`` with its configuration as constant arguments),
runs the fused Triton kernels on CUDA (``kernels/``, with the dispatch rules there) and the
portable implementation on the CPU and every other device (``portable_fixed``: chunk by chunk,
``chunked.py``, or for many small chunks in query blocks, ``varlen.py``). It differentiates in q, k
and v without keeping activations between forward and backward, only the inputs: on CUDA, where
the Triton backward applies (no mask or key padding), through its kernels
(``kernels/mta_bwd.py``); otherwise by recomputing the forward under autograd. Gradients with
respect to ``attn_mask`` are not computed (masks are constants in every model we rewrite); the
top-k selection is piecewise constant and has no gradient, as in the spec. Learned summary
weights (``summary_weight``) get their gradient from the same paths: the Triton backward on CUDA
(which passes the summaries' gradients on through the softmax weights, ``mta_bwd._spread_learned``),
the portable recomputation elsewhere (calibration fits them on the CPU).
Boundary chunks (``segment_ids``) run without padding on the CPU for no mask or key padding
(``varlen.py``, top-k included, differentiated by recomputation), and on CUDA for no mask or key padding
on the Triton forward reading each chunk where it lies (``kernels.dispatch_cuda_boundary``);
otherwise they move the tokens into padded chunk slots (``segments.py``) and run every path above
there. Their gradients on CUDA come from the Triton backward reading the chunks where they lie
(no mask or key padding, no soft-cap); otherwise, on every device, from the portable
recomputation: unpadded where ``varlen.py`` takes the mask, else in the slots (the
same function as the unpadded forward). Clustered summaries (``centroids``,
``clustered.py``) run their own portable implementation, or on CUDA for no mask or key padding the
Triton kernels (``kernels/clusters.py``); their gradients come from the Triton backward where the
forward ran the kernels, else from recomputation with the portable implementation.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .chunked import NEG, _compute_dtype, mta_attention_chunked, soft_capped
from .clustered import check_clustered, mta_attention_clustered
from .layout import in_layout_of
from .masks import normalize_mask, simplify_mask
from .segments import check_segment_ids, from_slots, segment_layout, segmented, slot_mask, to_slots
from .varlen import blocks_beat_chunks, mta_attention_varlen, takes

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_devices(q, k, v, attn_mask=None, summary_weight=None, segment_ids=None, centroids=None) -> None:
    """Every tensor argument on q's device, or a one-line ValueError. (The dispatcher does not
    check it: a mask on the meta device beside CPU tensors sent the call to the op's fake
    implementation, which returned an uninitialised tensor.)"""
    named = dict(k=k, v=v, attn_mask=attn_mask, summary_weight=summary_weight, segment_ids=segment_ids,
                 centroids=centroids)
    for name, x in named.items():
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")


def check_inputs(q, k, v, attn_mask, chunk_size, causal, scale, local_chunks, sinks, top_k, summary_weight=None,
                 segment_ids=None, softcap: float = 0.0) -> None:
    """Validate the op's arguments; raise ValueError/TypeError with a one-line message."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):  # (was "'NoneType' object has no attribute 'dim'")
            raise TypeError(f"{name} must be a tensor [B, H, n, d], got {type(x).__name__}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D [B, H, n, d]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.dtype not in _FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one float dtype (fp16, bf16, fp32, fp64); got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Hq, n, d = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != d:
        raise ValueError(f"k and v must be [B, Hkv, n, d] matching q {tuple(q.shape)}; got {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[2] != n:
        raise ValueError(f"MTA is self-attention: q has {n} tokens but k has {k.shape[2]}")
    if min(Hq, k.shape[1], d) < 1:  # (were ZeroDivisionErrors below and in the default scale)
        raise ValueError(f"q, k, v need at least one head and a head size d of at least 1; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]})")
    if n < 1:
        raise ValueError("sequence length must be at least 1")
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if local_chunks < 1:
        raise ValueError(f"local_chunks must be at least 1, got {local_chunks}")
    if sinks < 0 or top_k < 0:
        raise ValueError(f"sinks and top_k must be non-negative, got sinks={sinks}, top_k={top_k}")
    check_devices(q, k, v, attn_mask)
    if summary_weight is not None:
        if tuple(summary_weight.shape) != (k.shape[1], d):
            raise ValueError(f"summary_weight must be [Hkv, d] = [{k.shape[1]}, {d}]; got {tuple(summary_weight.shape)}")
        if not summary_weight.is_floating_point() or summary_weight.device != q.device:
            raise ValueError(f"summary_weight must be a float tensor on {q.device}; got {summary_weight.dtype} on {summary_weight.device}")
    if segment_ids is not None:
        check_segment_ids(segment_ids, B, n, q.device)
    if not softcap >= 0.0 or softcap == float("inf"):
        raise ValueError(f"softcap must be a finite number ≥ 0 (0: no soft-cap), got {softcap!r}")


@torch.library.custom_op("mta::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    summary_weight: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    centroids: torch.Tensor | None = None,
    *,
    chunk_size: int,
    causal: bool = False,
    scale: float | None = None,
    local_chunks: int = 1,
    sinks: int = 0,
    top_k: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Multi-Token Attention (MTA_SPEC.md). Output: q's shape, dtype and memory layout (that of
    ``torch.empty_like(q)``). ``summary_weight`` [Hkv, d]: learned summaries (the spec's
    ``summary="learned"``): chunk j's summary weighs its keys by softmax_s(k_s·w) instead of
    1/n_j; None (or w = 0) is the mean. ``segment_ids`` [B, n] integers: boundary chunks (the spec's
    "boundary" grouping, ``segments.py``): a chunk ends where the id changes, runs are cut to at
    most ``chunk_size`` tokens; None is fixed chunks. ``centroids`` [Hkv, K, d]: clustered summaries
    (the spec's learned clustering of keys, non-causal, ``clustered.py``): the keys outside a
    query's window summarised per nearest centroid instead of per chunk. ``softcap`` > 0: every
    logit's product term is soft-capped, softcap·tanh(scale·q·k / softcap) for a key and
    softcap·tanh(scale·q·k̄_j / softcap) for a summary, before the mask and log n_j are added
    (Gemma-2's ``attn_logit_softcapping``; docs/op.md); 0 is none."""
    return _checked(PORTABLE, q, k, v, attn_mask, summary_weight, segment_ids, centroids, chunk_size=chunk_size,
                    causal=causal, scale=scale, local_chunks=local_chunks, sinks=sinks, top_k=top_k, softcap=softcap)


def attention_autograd(q, k, v, attn_mask=None, summary_weight=None, segment_ids=None, centroids=None, *,
                       chunk_size: int, causal: bool = False, scale: float | None = None, local_chunks: int = 1,
                       sinks: int = 0, top_k: int = 0, rows_from: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """The op's value (same arguments), for callers that differentiate it many times on short
    inputs: on the CPU its implementation called directly, so autograd keeps the activations and
    the backward does not run the forward again, as the op's own backward must (it keeps only
    the inputs); on other devices the op (its Triton backward on CUDA). Calibration fits learned
    summaries through it: a step (forward + backward in the weight) on SmolLM2's layer shape at
    512 tokens takes 7.5–8.9 instead of 13.4–14.6 ms on the CPU box (two runs). ``rows_from``: for
    callers that read the output's rows from that query on only (``use_mta`` on a prompt continued
    over a cache): fixed chunks leave the query chunks wholly before it uncomputed, zeros, on the
    CPU (``chunked.py``) and, where no gradient is wanted, on CUDA (the Triton forward's grid starts
    at the query block holding it: ``kernels.dispatch_cuda``); everywhere else every row is computed.
    Under torch.compile it is the op on every device, one node the compiler does not look into (the
    CPU implementation traced into the graph with a plan's second configuration failed in
    Inductor's lowering: "Exponent must be non-negative"), every row computed."""
    if q.is_cuda and rows_from and not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (q, k, v, summary_weight))):
        from ..kernels import CUDA

        return _checked(CUDA, q, k, v, attn_mask, summary_weight, segment_ids, centroids, chunk_size=chunk_size,
                        causal=causal, scale=scale, local_chunks=local_chunks, sinks=sinks, top_k=top_k,
                        rows_from=rows_from, softcap=softcap)
    if q.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.ops.mta.attention(q, k, v, attn_mask, summary_weight, segment_ids, centroids,
                                       chunk_size=chunk_size, causal=causal, scale=scale, local_chunks=local_chunks,
                                       sinks=sinks, top_k=top_k, softcap=softcap)
    return _checked(PORTABLE, q, k, v, attn_mask, summary_weight, segment_ids, centroids, chunk_size=chunk_size,
                    causal=causal, scale=scale, local_chunks=local_chunks, sinks=sinks, top_k=top_k,
                    rows_from=rows_from, softcap=softcap)


class Implementations(NamedTuple):
    """One device's implementations of the op's three forms: fixed chunks (q, k, v, attn_mask,
    **config), boundary chunks (q, k, v, attn_mask, segment_ids, **config) and clustered summaries
    (q, k, v, attn_mask, chunk_size, scale, local_chunks, sinks, centroids); every one takes
    ``softcap`` too."""

    fixed: Callable
    boundary: Callable
    clustered: Callable


def _checked(impl: Implementations, q, k, v, attn_mask, summary_weight, segment_ids, centroids, rows_from: int = 0,
             **config):
    """The op by one device's implementations, its inputs checked first (:func:`check_inputs`)."""
    check_inputs(q, k, v, attn_mask, config["chunk_size"], config["causal"], config["scale"], config["local_chunks"],
                 config["sinks"], config["top_k"], summary_weight, segment_ids, config.get("softcap", 0.0))
    return _forward(impl, q, k, v, attn_mask, summary_weight, segment_ids, centroids, rows_from=rows_from, **config)


def _forward(impl: Implementations, q, k, v, attn_mask, summary_weight, segment_ids, centroids, *, causal,
             rows_from: int = 0, **config):
    """The op once its inputs are checked, by the device's implementations (``PORTABLE``, or the
    CUDA dispatch's). ``rows_from`` (``attention_autograd``'s): passed to the fixed- and
    boundary-chunk implementations (which may compute every row)."""
    attn_mask, causal = simplify_mask(attn_mask, q.shape[0], q.shape[1], q.shape[2], causal)
    if centroids is not None:
        check_clustered(centroids, q, k, attn_mask, causal, config["top_k"], summary_weight, segment_ids)
        return impl.clustered(q, k, v, attn_mask, chunk_size=config["chunk_size"], scale=config["scale"],
                              local_chunks=config["local_chunks"], sinks=config["sinks"], centroids=centroids,
                              softcap=config.get("softcap", 0.0))
    kwargs = dict(config, causal=causal, summary_weight=summary_weight)
    if rows_from:
        kwargs["rows_from"] = rows_from
    if segment_ids is not None:
        return impl.boundary(q, k, v, attn_mask, segment_ids, **kwargs)
    return impl.fixed(q, k, v, attn_mask, **kwargs)


def portable_fixed(q, k, v, attn_mask=None, rows_from: int = 0, **config):
    """Fixed-chunk MTA off the CUDA kernels: chunk by chunk (``chunked.py``), or in query blocks
    (``varlen.py``) where those are faster (``varlen.blocks_beat_chunks``: small chunks, many of
    them) and apply (no mask or key padding, no top-k). One chunk (c ≥ n) is exact attention:
    ``scaled_dot_product_attention`` (:func:`exact_sdpa`, as on CUDA), 2.6× faster on the CPU than
    the chunk machinery around one whole-sequence key set (SmolLM2's layer, 2048 tokens, causal:
    56 → 22 ms); the exact groups of a site planned per group of heads, and the exact sites of a
    rewritten program, run so. ``rows_from`` (``attention_autograd``'s): the query chunks (or
    blocks) wholly before that row are not computed."""
    if config["chunk_size"] >= q.shape[2]:
        return exact_sdpa(q, k, v, attn_mask, config["causal"], config["scale"], config.get("softcap", 0.0))
    if config["top_k"] == 0 and blocks_beat_chunks(config["chunk_size"], q.shape[2]) and takes(attn_mask, *q.shape[:3]):
        return mta_attention_varlen(q, k, v, attn_mask, None, rows_from=rows_from, **config)
    return mta_attention_chunked(q, k, v, attn_mask, rows_from=rows_from, **config)


def exact_sdpa(q, k, v, attn_mask, causal: bool, scale, softcap: float = 0.0):
    """Exact attention (the op with one chunk) by ``scaled_dot_product_attention``: ``is_causal``
    when no mask is left (after ``simplify_mask``), else the mask's allowed keys (∧ the triangle)
    and its bias. A query with nothing to attend to (a left-padded position under the triangle)
    outputs zeros, the op's rule: SDPA computes its row over every key (finite, no NaN in the
    gradients) and the row is zeroed. Soft-capped logits (``softcap`` > 0), which SDPA cannot
    take: :func:`exact_soft_capped`."""
    if softcap:
        return exact_soft_capped(q, k, v, attn_mask, causal, scale, softcap)
    gqa = q.shape[1] != k.shape[1]
    B, H, n = q.shape[:3]
    if attn_mask is None and not (causal and scale is not None and scale <= 0):
        return in_layout_of(q, F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa))
    # (a scale ≤ 0 with causality takes the triangle as a mask: the CPU flash kernel's is_causal
    # scales its −inf for future keys with the rest of the row, +inf or NaN, and returns NaN)
    mask = normalize_mask(attn_mask, B, H, n)
    allowed = mask.allowed if mask is not None else torch.ones(1, 1, n, n, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    empty = ~allowed.any(-1, keepdim=True)
    has_empty = bool(empty.any())
    if has_empty:
        allowed = allowed | empty
    if mask is not None and mask.bias is not None:
        allowed = torch.where(allowed, mask.bias.to(q.dtype), float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    if has_empty:
        out = out.masked_fill(empty, 0.0)
    return in_layout_of(q, out)


# Query rows per block of :func:`exact_soft_capped`: its scores are [B, Hq, rows, n] floats.
_EXACT_ROWS = 512


def exact_soft_capped(q, k, v, attn_mask, causal: bool, scale, softcap: float):
    """Exact attention with soft-capped logits, softmax(softcap·tanh(scale·q·kᵀ / softcap) + mask)·v
    (what Gemma-2's eager attention computes), in blocks of :data:`_EXACT_ROWS` queries so that
    the scores held at once are [B, Hq, 512, n], not n × n. Grouped-query attention puts a group's
    query heads in one product with their key/value head (no copy of k, v); with causality a block
    reads only the keys up to its last query (half the work of the n × n scores the model's own
    attention computes), and without gradients the cap, the triangle and the mask are applied in
    place. A query with nothing to attend to outputs zeros. Half types are computed in fp32."""
    B, Hq, n, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    cdt = _compute_dtype(q.dtype)
    scale = d ** -0.5 if scale is None else float(scale)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    qg = q.to(cdt).reshape(B, Hkv, G, n, d)
    kt, vv = k.to(cdt).transpose(-1, -2), v.to(cdt)  # [B, Hkv, d, n], [B, Hkv, n, d]
    mask = normalize_mask(attn_mask, B, Hq, n)
    out = torch.empty(B, Hkv, G, n, d, dtype=cdt, device=q.device)
    keys = torch.arange(n, device=q.device)
    for lo in range(0, n, _EXACT_ROWS):
        hi = min(n, lo + _EXACT_ROWS)
        r, m = hi - lo, hi if causal else n  # (with causality the keys after the block's last query are all future)
        s = torch.matmul(qg[:, :, :, lo:hi].reshape(B, Hkv, G * r, d), kt[..., :m]).view(B, Hkv, G, r, m)
        s = soft_capped(s * scale, softcap) if grad else s.mul_(scale / softcap).tanh_().mul_(softcap)
        ok = None
        if mask is not None:
            allowed = (mask.allowed[:, :, lo:hi] if mask.per_query else mask.allowed)[..., :m]
            # [Bm, Hkv, G, r|1, m] per head, else [Bm, 1, 1, r|1, m]
            ok = allowed.reshape(allowed.shape[0], Hkv, G, *allowed.shape[2:]) if mask.per_head else \
                allowed.unsqueeze(2)
            if mask.bias is not None:
                bias = (mask.bias[:, :, lo:hi] if mask.per_query else mask.bias)[..., :m].reshape(ok.shape).to(cdt)
                s = s + bias if grad else s.add_(bias)
        if causal:
            future = keys[lo:m].view(1, -1) > keys[lo:hi].view(-1, 1)  # [r, m − lo]: the block's own keys
            if ok is None and not grad:
                s[..., lo:].masked_fill_(future, NEG)  # (the keys before the block are all allowed)
            else:
                tri = torch.cat([future.new_ones(r, lo), ~future], dim=-1)
                ok = tri if ok is None else ok & tri
        if ok is not None:  # (NEG, finite: a row with nothing to attend to stays finite, then zeros)
            s = s.masked_fill(~ok, NEG) if grad else s.masked_fill_(~ok, NEG)
        p = torch.softmax(s, dim=-1)
        if mask is not None:  # (only a mask can leave a row empty: with causality alone a query sees itself)
            p = p.masked_fill(~ok.any(-1, keepdim=True), 0.0)
        out[:, :, :, lo:hi] = torch.matmul(p.view(B, Hkv, G * r, m), vv[:, :, :m]).view(B, Hkv, G, r, d)
    return in_layout_of(q, out.reshape(B, Hq, n, d).to(q.dtype))


def _unpadded_boundaries(q, attn_mask) -> bool:
    """Whether the portable implementation runs boundary chunks without padding slots
    (``varlen.py``): for the masks it takes."""
    return takes(attn_mask, *q.shape[:3])


def portable_boundary(q, k, v, attn_mask, segment_ids, rows_from: int = 0, **config):
    """Boundary chunks off the CUDA kernels: without padding (``varlen.py``) where it applies,
    its query blocks wholly before ``rows_from`` not computed, else the fixed-chunk
    implementation in padded chunk slots (``segments.py``: every row)."""
    if _unpadded_boundaries(q, attn_mask):
        return mta_attention_varlen(q, k, v, attn_mask, segment_ids, rows_from=rows_from, **config)
    return in_layout_of(q, segmented(portable_fixed, q, k, v, attn_mask, segment_ids, **config))


PORTABLE = Implementations(portable_fixed, portable_boundary, mta_attention_clustered)


@attention.register_kernel("cuda")
def _(q, k, v, attn_mask=None, summary_weight=None, segment_ids=None, centroids=None, *, chunk_size, causal=False,
      scale=None, local_chunks=1, sinks=0, top_k=0, softcap=0.0):
    from ..kernels import CUDA  # triton is imported only when a CUDA tensor arrives

    return _checked(CUDA, q, k, v, attn_mask, summary_weight, segment_ids, centroids, chunk_size=chunk_size,
                    causal=causal, scale=scale, local_chunks=local_chunks, sinks=sinks, top_k=top_k, softcap=softcap)


@attention.register_fake
def _(q, k, v, attn_mask=None, summary_weight=None, segment_ids=None, centroids=None, *, chunk_size, causal=False,
      scale=None, local_chunks=1, sinks=0, top_k=0, softcap=0.0):
    check_devices(q, k, v, attn_mask, summary_weight, segment_ids, centroids)
    torch._check(k.shape[2] == q.shape[2], lambda: "MTA is self-attention: q and k need the same length")
    return torch.empty_like(q)  # q's layout, as every implementation returns it


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    ctx.save_for_backward(*inputs)  # q, k, v, attn_mask, summary_weight, segment_ids, centroids
    ctx.config = keyword_only_inputs


def _triton_grads(q, k, v, attn_mask, summary_weight, grad_out, needs, config, segment_ids=None, centroids=None):
    """(dq, dk, dv, dw) from the Triton backward (CUDA, where ``kernels.backward_cuda`` applies;
    dw for learned summaries), None where not needed; or None where it does not apply."""
    if not q.is_cuda or config.get("softcap"):  # (the Triton backward has no soft-cap: recomputed)
        return None
    from ..kernels import backward_cuda  # the Triton backward where it applies (kernels/__init__.py)

    grads = backward_cuda(q, k, v, attn_mask, grad_out, segment_ids=segment_ids, centroids=centroids,
                          summary_weight=summary_weight, **config)
    if grads is None:
        return None
    grads = (*grads, None)[:4]  # (dq, dk, dv[, dw])
    return tuple(g if need else None for g, need in zip(grads, needs))


def _grads(q, k, v, attn_mask, summary_weight, grad_out, needs, config):
    """(dq, dk, dv, dw) of fixed-chunk MTA, None where not needed."""
    grads = _triton_grads(q, k, v, attn_mask, summary_weight, grad_out, needs, config)
    if grads is not None:
        return grads
    return _recomputed(lambda q, k, v, w: portable_fixed(q, k, v, attn_mask, summary_weight=w, **config),
                       (q, k, v, summary_weight), grad_out, needs)


def _recomputed(fn, inputs, grad_out, needs):
    """The gradients of ``fn(*inputs)`` (inputs: q, k, v, summary_weight or None) against
    ``grad_out`` by recomputing it under autograd, None where ``needs`` says not needed."""
    with torch.enable_grad():
        leaves = [None if x is None else x.detach().requires_grad_(need) for x, need in zip(inputs, needs)]
        out = fn(*leaves)
        wanted = [x for x in leaves if x is not None and x.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)


def _gradients(grad_out, q, k, v, attn_mask, summary_weight, segment_ids, centroids, needs, config):
    """(dq, dk, dv, dw) of the op, None where ``needs`` says not needed."""
    config = dict(config)  # the forward's simplification of the mask (its verdict is cached)
    attn_mask, config["causal"] = simplify_mask(attn_mask, q.shape[0], q.shape[1], q.shape[2], config["causal"])
    if centroids is not None:  # the Triton backward on CUDA, else recomputed (the cluster choice has no gradient)
        grads = _triton_grads(q, k, v, attn_mask, None, grad_out, needs, config, centroids=centroids)
        dq, dk, dv, _ = grads or _recomputed(
            lambda q, k, v, _: mta_attention_clustered(q, k, v, attn_mask, chunk_size=config["chunk_size"],
                                                       scale=config["scale"], local_chunks=config["local_chunks"],
                                                       sinks=config["sinks"], centroids=centroids,
                                                       softcap=config.get("softcap", 0.0)),
            (q, k, v, None), grad_out, (*needs[:3], False))
        return dq, dk, dv, None
    if segment_ids is None:
        dq, dk, dv, dw = _grads(q, k, v, attn_mask, summary_weight, grad_out, needs, config)
    elif (grads := _triton_grads(q, k, v, attn_mask, summary_weight, grad_out, needs, config, segment_ids)):
        dq, dk, dv, dw = grads  # CUDA: the Triton backward reading the chunks where they lie, as the forward
    elif _unpadded_boundaries(q, attn_mask):  # recomputed unpadded where the portable path is
        dq, dk, dv, dw = _recomputed(
            lambda q, k, v, w: mta_attention_varlen(q, k, v, attn_mask, segment_ids, summary_weight=w, **config),
            (q, k, v, summary_weight), grad_out, needs)
    else:  # the fixed-chunk gradients in the slots, moved back (a slot's padding has none)
        lay = segment_layout(segment_ids, q.shape[0], config["chunk_size"], config["sinks"])
        mask = slot_mask(attn_mask, lay, q.shape[0], q.shape[1], q.shape[2])
        padded = [to_slots(x.contiguous(), lay) for x in (q, k, v, grad_out)]
        dq, dk, dv, dw = _grads(*padded[:3], mask, summary_weight, padded[3], needs,
                                dict(config, chunk_size=lay.width))  # (the slots' chunk size)
        dq, dk, dv = (None if g is None else from_slots(g, lay) for g in (dq, dk, dv))
    return dq, dk, dv, dw


@torch.library.custom_op("mta::attention_backward", mutates_args=())
def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    summary_weight: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    centroids: torch.Tensor | None,
    needs: list[bool],
    *,
    chunk_size: int,
    causal: bool,
    scale: float | None,
    local_chunks: int,
    sinks: int,
    top_k: int,
    softcap: float = 0.0,
) -> list[torch.Tensor]:
    """The gradients of ``mta::attention`` [dq, dk, dv, dw], contiguous (``needs``: which are
    wanted; one not wanted, or dw without ``summary_weight``, is an empty tensor). A soft-capped
    call's are recomputed through the portable implementation, as its forward ran.

    An op of its own so that a trace of the backward (torch.compile's AOTAutograd) sees one node:
    the gradients read the mask's values (``simplify_mask``) and choose their implementation by
    them, which a trace cannot follow (it failed with "unhashable type: non-nested SymInt" on the
    mask's cache key, and torch.compile ran such a model's backward outside the compiled graph)."""
    config = dict(chunk_size=chunk_size, causal=causal, scale=scale, local_chunks=local_chunks, sinks=sinks, top_k=top_k)
    if softcap:
        config["softcap"] = softcap
    # an op's implementation runs below autograd (its keys excluded): the recomputed gradients
    # need it back, as they had inside the autograd formula this op replaces
    with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.AutogradFunctionality, False):
        grads = _gradients(grad_out, q, k, v, attn_mask, summary_weight, segment_ids, centroids, tuple(needs), config)
    # a wanted gradient that does not depend on its input (the weight at one chunk) is zeros
    return [g.contiguous() if g is not None else x.new_zeros(x.shape) if need and x is not None else q.new_empty(0)
            for g, x, need in zip(grads, (q, k, v, summary_weight), needs)]


@attention_backward.register_fake
def _(grad_out, q, k, v, attn_mask, summary_weight, segment_ids, centroids, needs, *, chunk_size, causal, scale,
      local_chunks, sinks, top_k, softcap=0.0):
    return [x.new_empty(x.shape) if need and x is not None else q.new_empty(0)
            for x, need in zip((q, k, v, summary_weight), needs)]


def _backward(ctx, grad_out):
    q, k, v, attn_mask, summary_weight, segment_ids, centroids = ctx.saved_tensors
    needs = [*ctx.needs_input_grad[:3], summary_weight is not None and ctx.needs_input_grad[4]]
    dq, dk, dv, dw = (g if need else None for g, need in zip(torch.ops.mta.attention_backward(
        grad_out, q, k, v, attn_mask, summary_weight, segment_ids, centroids, needs, **ctx.config), needs))
    return dq, dk, dv, None, dw, None, None


attention.register_autograd(_backward, setup_context=_setup_context)


# Under torch.autocast, q, k and v go to the autocast's dtype, as torch casts SDPA's (one of its
# "lower precision" ops): a model's q and k come out of its float32 rotary embedding while v
# comes out of a bfloat16 linear, and the op refused the mix ("q, k, v must share one float
# dtype … got torch.float32, torch.float32, torch.bfloat16"), where the model's SDPA ran.
# (torch.library.register_autocast fixes one dtype at registration; this reads the autocast's.)
_autocast_library = torch.library.Library("mta", "IMPL")


def _register_autocast(device_type: str) -> None:
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keyset, q, k, v, *args, **kwargs):
        dtype = torch.get_autocast_dtype(device_type)

        def cast(x):
            eligible = x.is_floating_point() and x.device.type == device_type and x.dtype != torch.float64
            return x.to(dtype) if eligible else x

        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return torch.ops.mta.attention.default(cast(q), cast(k), cast(v), *args, **kwargs)

    _autocast_library.impl("attention", kernel, key, with_keyset=True)


for _device_type in ("cpu", "cuda"):
    _register_autocast(_device_type)
