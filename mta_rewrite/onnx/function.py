"""The ``mta::MultiTokenAttention`` ONNX function: MTA_SPEC.md in standard ONNX ops.

Every MTA site of an exported model is one node of domain ``mta`` (op type
``MultiTokenAttention``, version 1) with the configuration as attributes; the model carries this
function, so stock onnxruntime runs it by inlining the body (a native kernel registered for the
op would take precedence).

Inputs: q [B, Hq, n, d]; k, v [B, Hkv, n, d]; mask: a float additive mask of rank 4,
broadcastable to [B, Hq, n, n] (the exporter turns bool masks into 0/−inf and a missing mask into
a [1, 1, 1, 1] zero). Values ≤ −3.4e38 (−inf, float32's minimum) are forbidden keys.
Attributes: chunk_size, causal (0/1), scale, local_chunks, sinks, top_k, and optionally softcap (a
float; 0, the default, is none: ``CapScores``, which soft-caps the logits' product terms).

The body mirrors ``ops/chunked.py``: per query chunk, one key set [exact chunks (window, top-k
selected, blocks where the mask varies per query) | sinks | chunk summaries], one softmax. With
no mask, a causal flag or a key-padding mask ([.., 1, n]) nothing n×n is formed; a mask that
varies per query is read in chunk blocks at the mask's own heads Hm (1 or Hq), so the function
holds O(B·Hm·n²) floats then (the mask itself is n×n). Computation is in float32; the output has q's type.

A mask that varies per query but is, by its values, key padding or the causal triangle ∧ key
padding (what transformers models hand every layer, decoders with causal=False) is recognised at
run time, as the PyTorch op does (``ops.masks.simplify_mask``, where the reasoning is): an ``If``
in the body compares the mask with the triangle ∧ its last row, and if that fails with its last
row (O(n²) booleans of the mask's own size, not per head), and when one matches runs the
key-padding path with the triangle as causality.

The functions: ``MultiTokenAttention`` (the op) is ``SimplifyMask`` (the recognition) followed
by ``MultiTokenAttentionPrepared`` (the attention on the recognised mask, with the triangle flag
as a fifth input and per-key summary logits, zero for means, as a sixth).
``MultiTokenAttentionLearned`` is the op with learned summaries (a fifth input, the summary
weight [Hkv, d]; ``SummaryLogits`` turns it into the per-key logits k_s·w). ``SimplifyBoolMask`` is the recognition on a bool mask (True: allowed) and
``RecogniseMask`` the check both recognitions share; ``Forbidden`` makes a float mask's forbidden
values −inf, the form the prepared functions read. The exporter makes sites that share a mask
call ``MultiTokenAttentionPrepared`` directly, after one recognition node, and recognises a
model's bool mask as it is instead of turning it into 0 / −inf first
(``export.share_mask_preparation``). Boundary chunks: ``MultiTokenAttentionSegmented`` (and
…Learned, …Prepared), the attention run in chunk slots that ``SegmentSlots`` computes. Clustered
summaries: ``MultiTokenAttentionClustered``. ``AttendSets`` is the one softmax over a query
chunk's key set, in its three parts (exact keys, sinks, summaries), that the attention functions
share; docs/onnx.md says how the body is shaped for onnxruntime, with the measurements.
"""

from __future__ import annotations

import onnx
from onnxscript import FLOAT, INT64, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

DOMAIN = "mta"
OP_TYPE = "MultiTokenAttention"
VERSION = 1
mta_opset = Opset(DOMAIN, VERSION)


@script(mta_opset, default_opset=op)
def RecogniseMask(allowed):
    """(keep, recognised, triangle) for the allowed flags [Bm, Hm, nq, n] of a mask: keep
    [Bm, 1, 1, n] are the first head's last row (the keys the triangle leaves to the last query);
    recognised: the mask is square with n > 1 and every head allows exactly keep on every row
    (key padding) or the causal triangle ∧ keep; triangle: the second form and not the first.
    Both forms allow key 0 to every query exactly when keep does, an O(n) test that turns other
    masks away before any pass over n² flags (a sliding window's band fails it beyond the
    window's length). The triangle is tried next (what decoders build): then the padding form
    holds only when no key after the first is kept, an O(n) test; the padding form costs its own
    pass only when the triangle fails.

    Its ``If`` nodes follow one another, none inside another's branch, and neither do the callers'
    (``SimplifyMask``, ``SimplifyBoolMask``): onnxruntime (1.32) folds an ``If`` whose condition is
    a constant (a model whose mask is, e.g. built from buffers at static shapes) by inlining its
    branch, and failed to rename the values of an ``If`` inlined inside another's branch: a
    segmentation fault at session creation, or "… is not If node's input or previous node output in
    this subgraph" (``tests/onnx``: ``test_constant_masks_fold``)."""
    i0 = op.Constant(value_ints=[0])
    i1 = op.Constant(value_ints=[1])
    i3 = op.Constant(value_ints=[3])
    false = op.Cast(op.Constant(value_int=0), to=onnx.TensorProto.BOOL)
    NQ = op.Shape(allowed, start=2, end=3)
    NK = op.Shape(allowed, start=3, end=4)
    square = op.Squeeze(op.And(op.Greater(NQ, i1), op.Equal(NQ, NK)), i0)
    # (the last row first: the first head first copied the whole mask where it has one head)
    keep = op.Slice(op.Slice(allowed, op.Sub(NQ, i1), NQ, op.Constant(value_ints=[2])), i0, i1, i1)  # [Bm, 1, 1, n]
    first_key = op.Equal(op.Slice(allowed, i0, i1, i3), op.Slice(keep, i0, i1, i3))  # [Bm, Hm, nq, 1]
    pre = op.And(square, op.Cast(op.ReduceMin(op.Cast(first_key, to=onnx.TensorProto.UINT8), keepdims=0),
                                 to=onnx.TensorProto.BOOL))
    if pre:
        ar_n = op.Range(op.Constant(value_int=0), op.Squeeze(NK, i0), op.Constant(value_int=1))
        below = op.LessOrEqual(op.Unsqueeze(ar_n, [0]), op.Unsqueeze(ar_n, [1]))  # key ≤ query
        tri_ok = op.Cast(op.ReduceMin(op.Cast(op.Equal(allowed, op.And(below, keep)), to=onnx.TensorProto.UINT8),
                                      keepdims=0), to=onnx.TensorProto.BOOL)
        later = op.Cast(op.ReduceMax(op.Cast(op.Slice(keep, i1, NK, i3), to=onnx.TensorProto.UINT8), keepdims=0),
                        to=onnx.TensorProto.BOOL)  # a key after the first kept: not padding alone
    else:
        tri_ok = op.Identity(false)
        later = op.Identity(false)
    if op.And(pre, op.Not(tri_ok)):
        pad_ok = op.Cast(op.ReduceMin(op.Cast(op.Equal(allowed, keep), to=onnx.TensorProto.UINT8), keepdims=0),
                         to=onnx.TensorProto.BOOL)
    else:
        pad_ok = op.Identity(false)
    return keep, op.Or(tri_ok, pad_ok), op.And(tri_ok, later)


@script(mta_opset, default_opset=op)
def Forbidden(mf, allowed):
    """A float mask with its forbidden values (``allowed``: mf > −3.4e38; −inf and float32's
    minimum, what transformers fills with, are not) made −inf, the others kept: the form
    ``MultiTokenAttentionPrepared`` reads, so that it needs no pass of its own over the mask (the
    recognitions give it)."""
    return op.Add(mf, op.Where(allowed, op.Constant(value_float=0.0), op.Constant(value_float=float("-inf"))))


@script(mta_opset, default_opset=op)
def SimplifyMask(mask):
    """(mask, triangle): a float mask [Bm, Hm, nq, n] that varies per query but is, by its values,
    key padding or the causal triangle ∧ key padding, in every head and with no bias, becomes its
    key padding [Bm, 1, 1, n] (0 / −inf), with triangle True for the second form; any other mask
    comes back as it is with its forbidden values (≤ −3.4e38) made −inf (``Forbidden``), with
    False. ``ops.masks.simplify_mask`` in ONNX ops (the keep flags are the first head's last row;
    reads the mask a few times, O(Bm·Hm·n²) booleans, none per query head; the bias check only
    once the pattern matched). Its ``If`` nodes are not nested (``RecogniseMask`` says why)."""
    zero_f = op.Constant(value_float=0.0)
    false = op.Cast(op.Constant(value_int=0), to=onnx.TensorProto.BOOL)
    mf = op.Cast(mask, to=FLOAT.dtype)
    allowed = op.Greater(mf, op.Constant(value_float=-3.4e38))
    keep, recognised, triangle = RecogniseMask(allowed)
    if recognised:
        no_bias = op.Cast(op.ReduceMin(op.Cast(op.Or(op.Equal(mf, zero_f), op.Not(allowed)),
                                               to=onnx.TensorProto.UINT8), keepdims=0), to=onnx.TensorProto.BOOL)
    else:
        no_bias = op.Identity(false)
    if no_bias:
        out = op.Where(keep, zero_f, op.Constant(value_float=float("-inf")))
    else:
        out = Forbidden(mf, allowed)
    return out, op.And(no_bias, triangle)


@script(mta_opset, default_opset=op)
def SimplifyBoolMask(allowed):
    """``SimplifyMask`` for a bool mask (True: the key is allowed), as a model builds it before
    turning it into 0 / −inf: the same verdict and outputs as ``SimplifyMask`` on that float mask
    (which a bool mask cannot carry a bias of), without forming the float n×n mask unless the
    pattern does not match. The exporter hands it a site's bool mask directly
    (``export.share_mask_preparation``)."""
    zero_f = op.Constant(value_float=0.0)
    neg_inf = op.Constant(value_float=float("-inf"))
    keep, recognised, triangle = RecogniseMask(allowed)
    if recognised:
        out = op.Where(keep, zero_f, neg_inf)
    else:
        # 0 / −inf as (f − 1) / f of the flags f ∈ {0, 1}: onnxruntime's Where with constant
        # branches took 34 ms over 4096² flags, these three passes 20 ms
        f = op.Cast(allowed, to=FLOAT.dtype)
        out = op.Div(op.Sub(f, op.Constant(value_float=1.0)), f)
    return out, triangle


@script(mta_opset, default_opset=op)
def CapScores(s, softcap: float = 0.0):
    """Soft-capped logits, softcap·tanh(s / softcap) (Gemma-2's ``attn_logit_softcapping``), or
    ``s`` for ``softcap`` 0. The test is on an attribute, a constant once the function is inlined:
    onnxruntime folds the ``If`` away and runs the chosen branch's nodes only (no ``If``, and for
    no soft-cap not even an ``Identity``, in the optimised graph)."""
    cap = op.Constant(value_float=softcap)
    if op.Greater(cap, op.Constant(value_float=0.0)):
        out = op.Mul(op.Tanh(op.Div(s, cap)), cap)
    else:
        out = op.Identity(s)
    return out


@script(mta_opset, default_opset=op)
def AttendSets(le, ve, ls, vs, lm, vm):
    """One softmax over a query chunk's key set in three parts, exact keys, sinks and summaries
    (logits [.., c, X], values [.., X, d], each pair's batch axes broadcast by ``MatMul``), times
    the values: the parts are never concatenated (each ``Concat`` was a pass over the whole key
    set, of logits and of values). A row whose logits are all −inf (nothing to attend to) gives
    zeros.

    The exponent is clamped at −80 below the row's maximum (e^−80 ≈ 1.8e−35, a weight no float32
    sum can see beside the maximum's 1): onnxruntime's CPU ``Exp`` is 14× slower on arguments
    under about −87, whose results are subnormal or zero, and a key set is mostly −inf (forbidden
    keys, the causal triangle, chunks not summarised). A row with nothing to attend to is zeroed on
    the output, a [.., c, 1] factor, so its clamped weights never reach it."""
    im1 = op.Constant(value_ints=[-1])
    neg_inf = op.Constant(value_float=float("-inf"))
    floor = op.Constant(value_float=-80.0)
    mx = op.Max(op.ReduceMax(le, im1, keepdims=1), op.ReduceMax(ls, im1, keepdims=1), op.ReduceMax(lm, im1, keepdims=1))
    alive = op.Greater(mx, neg_inf)
    shift = op.Where(alive, mx, op.Constant(value_float=0.0))
    pe = op.Exp(op.Max(op.Sub(le, shift), floor))
    ps = op.Exp(op.Max(op.Sub(ls, shift), floor))
    pm = op.Exp(op.Max(op.Sub(lm, shift), floor))
    den = op.Sum(op.ReduceSum(pe, im1, keepdims=1), op.ReduceSum(ps, im1, keepdims=1),
                 op.ReduceSum(pm, im1, keepdims=1))
    num = op.Add(op.Add(op.MatMul(pe, ve), op.MatMul(ps, vs)), op.MatMul(pm, vm))
    return op.Mul(num, op.Div(op.Cast(alive, to=FLOAT.dtype), den))


@script(mta_opset, default_opset=op)
def MultiTokenAttentionPrepared(q, k, v, mask, triangle, key_logit, chunk_size: int, causal: int, scale: float,
                                local_chunks: int, sinks: int, top_k: int, softcap: float = 0.0):
    """The op on a mask that ``SimplifyMask`` (or ``SimplifyBoolMask``) has prepared, forbidden
    entries −inf (``Forbidden``): ``triangle`` (a bool scalar, its second output) adds causality. An exported model whose sites share one mask (every
    transformers model) prepares it once and calls this at every site. ``key_logit``
    (broadcastable to [B, Hkv, n]): the summaries weigh chunk j's keys by softmax over them of
    these logits; a zero is the mean, ``SummaryLogits`` gives learned summaries' k_s·w."""
    neg_inf = op.Constant(value_float=float("-inf"))
    pos_inf = op.Constant(value_float=float("inf"))
    zero_f = op.Constant(value_float=0.0)
    one_f = op.Constant(value_float=1.0)
    i0 = op.Constant(value_ints=[0])
    i1 = op.Constant(value_ints=[1])
    im1 = op.Constant(value_ints=[-1])
    s0 = op.Constant(value_int=0)
    s1 = op.Constant(value_int=1)

    qf = op.Cast(q, to=FLOAT.dtype)
    kf = op.Cast(k, to=FLOAT.dtype)
    vf = op.Cast(v, to=FLOAT.dtype)
    mf = op.Cast(mask, to=FLOAT.dtype)
    is_causal = op.Or(op.Cast(op.Constant(value_int=causal), to=onnx.TensorProto.BOOL), triangle)
    scale_t = op.Constant(value_float=scale)

    B = op.Shape(qf, start=0, end=1)
    H = op.Shape(qf, start=1, end=2)
    N = op.Shape(qf, start=2, end=3)
    D = op.Shape(qf, start=3, end=4)
    Hkv = op.Shape(kf, start=1, end=2)
    G = op.Div(H, Hkv)

    c = op.Min(op.Reshape(op.Constant(value_int=chunk_size), i1), N)
    nc = op.Div(op.Sub(op.Add(N, c), i1), c)
    npad = op.Mul(nc, c)
    padn = op.Sub(npad, N)
    L = op.Min(op.Reshape(op.Constant(value_int=local_chunks), i1), nc)
    S = op.Min(op.Reshape(op.Constant(value_int=sinks), i1), N)
    K = op.Min(op.Reshape(op.Constant(value_int=top_k), i1), nc)
    # (zero rows appended by Concat: onnxruntime's Pad took twice as long for the same copy)
    # grouped-query attention: k and v stay at their Hkv heads; what reads them per query head
    # (summaries, gathered exact chunks, sinks) takes query head h = hkv·G + g from head hkv
    zk = op.ConstantOfShape(op.Concat(B, Hkv, padn, D, axis=0))
    kp = op.Concat(kf, zk, axis=2)  # [B, Hkv, npad, d]
    vp = op.Concat(vf, zk, axis=2)
    qc = op.Reshape(op.Concat(qf, op.ConstantOfShape(op.Concat(B, H, padn, D, axis=0)), axis=2),
                    op.Concat(B, H, nc, c, D, axis=0))
    kc = op.Reshape(kp, op.Concat(B, Hkv, nc, c, D, axis=0))
    vc = op.Reshape(vp, op.Concat(B, Hkv, nc, c, D, axis=0))

    # positions
    npad_s = op.Squeeze(npad, i0)
    nc_s = op.Squeeze(nc, i0)
    c_s = op.Squeeze(c, i0)
    N_s = op.Squeeze(N, i0)
    S_s = op.Squeeze(S, i0)
    pos = op.Reshape(op.Range(s0, npad_s, s1), op.Concat(nc, c, axis=0))  # [nc, c]
    real = op.Less(pos, N_s)
    base = op.And(real, op.GreaterOrEqual(pos, S_s))  # keys that may enter a summary
    ar_c = op.Range(s0, c_s, s1)
    ii = op.Unsqueeze(op.Range(s0, nc_s, s1), [1])  # [nc, 1]
    jj = op.Unsqueeze(op.Range(s0, nc_s, s1), [0])  # [1, nc]

    # ---- the mask: its values with −inf where forbidden, query rows by chunk blocks -----------
    # One float tensor carries both the allowed flags (> −inf) and the bias, padded in "edge" mode
    # on both axes: a padding query repeats the last row (it is cut from the output), a padding key
    # repeats the last key (no consumer reads it: summaries take `base` keys, the exact part checks
    # kpos < n, sinks lie before n), and a mask broadcast over keys ([.., 1]) is spread the same way.
    Bm = op.Shape(mf, start=0, end=1)
    Hm = op.Shape(mf, start=1, end=2)
    NQ = op.Shape(mf, start=2, end=3)
    NK = op.Shape(mf, start=3, end=4)
    per_query = op.Greater(NQ, i1)
    mrow = op.Pad(mf, op.Concat(i0, i0, i0, i0, i0, i0, op.Where(per_query, op.Sub(npad, NQ), i0), op.Sub(npad, NK),
                                  axis=0), mode="edge")  # [Bm, Hm, npad or 1, npad]
    Iq = op.Where(per_query, nc, i1)
    cq = op.Where(per_query, c, i1)
    mb = op.Reshape(mrow, op.Concat(Bm, Hm, Iq, cq, nc, c, axis=0))  # [Bm, Hm, Iq, cq, nc, c]

    # ---- summaries: masked means over the first query row of each block ---------------------
    # A block (query chunk i, key chunk j) is summarised when every query row of it sees chunk j's
    # summarisable keys (`base`) as its first row does, allowed and bias alike (the values, −inf
    # where forbidden, the same in every row), and a bias constant over them.
    b0 = op.Squeeze(op.Gather(mb, i0, axis=3), [3])  # [Bm, Hm, Iq, nc, c]
    w = op.And(op.Greater(b0, neg_inf), base)
    # a key's values are the same in every row of the block when their maximum over the rows is
    # their minimum (−inf included): two reading passes over the mask, where comparing each row
    # with the first (after setting the other keys to −inf) took four, writing three
    varies = op.And(op.Not(op.Equal(op.ReduceMax(mb, op.Constant(value_ints=[3]), keepdims=0),
                                    op.ReduceMin(mb, op.Constant(value_ints=[3]), keepdims=0))), base)
    uniform = op.Not(op.Cast(op.ReduceMax(op.Cast(varies, to=onnx.TensorProto.UINT8), im1, keepdims=0),
                             to=onnx.TensorProto.BOOL))
    any_w = op.Cast(op.ReduceMax(op.Cast(w, to=onnx.TensorProto.UINT8), im1, keepdims=0), to=onnx.TensorProto.BOOL)
    bmax = op.ReduceMax(op.Where(w, b0, neg_inf), im1, keepdims=0)
    bmin = op.ReduceMin(op.Where(w, b0, pos_inf), im1, keepdims=0)
    const = op.Or(op.Equal(bmax, bmin), op.Not(any_w))
    uniform = op.And(uniform, const)  # [Bm, Hm, Iq, nc]
    summary_bias = op.Where(any_w, bmax, zero_f)
    n_j = op.ReduceSum(op.Cast(w, to=FLOAT.dtype), im1, keepdims=0)  # [Bm, Hm, Iq, nc]
    # summary weights: softmax over the chunk's kept keys of key_logit (zero: 1 / n_j, the mean)
    klog = op.Pad(op.Expand(op.Cast(key_logit, to=FLOAT.dtype), op.Concat(B, Hkv, N, axis=0)),
                  op.Concat(i0, i0, i0, i0, i0, padn, axis=0))
    klog = op.Reshape(op.Expand(op.Unsqueeze(klog, [2]), op.Concat(B, Hkv, G, npad, axis=0)),
                      op.Concat(B, H, i1, nc, c, axis=0))
    lw = op.Where(w, klog, neg_inf)  # [B, H, Iq, nc, c]
    lw_max = op.ReduceMax(lw, im1, keepdims=1)
    ew = op.Exp(op.Sub(lw, op.Where(op.Equal(lw_max, neg_inf), zero_f, lw_max)))
    aw = op.Div(ew, op.Max(op.ReduceSum(ew, im1, keepdims=1), op.Constant(value_float=1e-30)))
    aw = op.Reshape(aw, op.Concat(B, Hkv, G, op.Shape(aw, start=2), axis=0))  # [B, Hkv, G, Iq, nc, c]
    bar_shape = op.Concat(B, H, op.Shape(aw, start=3, end=5), D, axis=0)
    # chunk j's summaries are one product per (batch, key/value head, chunk) of all its weight rows
    # (G query heads × Iq query blocks) with its c keys; as an Einsum ("bhgijc,bhjcd->bhgijd")
    # onnxruntime took 24 ms each for k and v at 8 / 2 heads with a per-query mask, 4096 tokens
    Iq1 = op.Shape(aw, start=3, end=4)
    awt = op.Reshape(op.Transpose(aw, perm=[0, 1, 4, 2, 3, 5]), op.Concat(B, Hkv, nc, op.Mul(G, Iq1), c, axis=0))
    by_chunk = op.Concat(B, Hkv, nc, G, Iq1, D, axis=0)
    kbar = op.Reshape(op.Transpose(op.Reshape(op.MatMul(awt, kc), by_chunk), perm=[0, 1, 3, 4, 2, 5]),
                      bar_shape)  # [B, H, Iq, nc, d]
    vbar = op.Reshape(op.Transpose(op.Reshape(op.MatMul(awt, vc), by_chunk), perm=[0, 1, 3, 4, 2, 5]), bar_shape)

    # ---- which chunks each query chunk summarises, and which it attends exactly -------------
    L_s = op.Squeeze(L, i0)
    # (Where on booleans has no onnxruntime CPU kernel: choose with And/Or)
    not_window = op.Or(op.And(is_causal, op.Less(jj, op.Add(op.Sub(ii, L_s), s1))),
                       op.And(op.Not(is_causal), op.Greater(op.Abs(op.Sub(jj, ii)), op.Sub(L_s, s1))))  # [nc, nc]
    summarised = op.And(op.And(not_window, op.Greater(n_j, zero_f)), uniform)
    summarised = op.Expand(summarised, op.Concat(B, H, nc, nc, axis=0))
    nonuni = op.Expand(op.And(not_window, op.Not(uniform)), op.Concat(B, H, nc, nc, axis=0))
    # (TopK wants k ≥ 1: the lists are cut to their real length after it, empty where there is none,
    # so the exact key set carries no all-forbidden placeholder chunk)
    nx = op.Reshape(op.ReduceMax(op.ReduceSum(op.Cast(nonuni, to=INT64.dtype), im1, keepdims=0), keepdims=0), i1)
    nu_vals, nu_idx = op.TopK(op.Cast(nonuni, to=FLOAT.dtype), op.Max(nx, i1), axis=-1, largest=1, sorted=1)
    minus1 = op.Constant(value_int=-1)
    nonuni_list = op.Slice(op.Where(op.Greater(nu_vals, op.Constant(value_float=0.5)), nu_idx, minus1), i0, nx, im1)

    # top-k: chunks with the largest scale·q̄_i·k̄_j move from the summaries into the exact set
    counts = op.ReduceSum(op.Cast(real, to=FLOAT.dtype), im1, keepdims=0)  # [nc]
    qbar = op.Div(op.ReduceSum(qc, op.Constant(value_ints=[3]), keepdims=0), op.Unsqueeze(counts, [1]))
    qbar = op.Mul(qbar, scale_t)  # [B, H, nc, d]
    score = op.Squeeze(op.MatMul(op.Unsqueeze(qbar, [3]), op.Transpose(kbar, perm=[0, 1, 2, 4, 3])), [3])  # [B,H,nc,nc]
    score = op.Where(summarised, score, neg_inf)
    kk = op.Max(K, i1)
    top_vals, top_idx = op.TopK(score, kk, axis=-1, largest=1, sorted=1)
    chosen = op.And(op.Greater(top_vals, neg_inf), op.Greater(K, s0))
    select_list = op.Slice(op.Where(chosen, top_idx, minus1), i0, K, im1)
    picked = op.ScatterElements(op.ConstantOfShape(op.Concat(B, H, nc, nc, axis=0)), top_idx,
                                op.Cast(chosen, to=FLOAT.dtype), axis=-1)
    summarised = op.And(summarised, op.Not(op.Greater(picked, op.Constant(value_float=0.5))))

    offsets = op.Range(op.Sub(s1, L_s), op.Where(is_causal, s1, L_s), s1)
    win = op.Add(ii, op.Unsqueeze(offsets, [0]))
    win = op.Where(op.And(op.GreaterOrEqual(win, s0), op.Less(win, nc_s)), win, minus1)
    W = op.Shape(win, start=1, end=2)
    win = op.Expand(win, op.Concat(B, H, nc, W, axis=0))
    exact = op.Concat(win, select_list, nonuni_list, axis=-1)  # [B, H, nc, Ke]
    Ke = op.Shape(exact, start=3, end=4)
    exact_idx = op.Max(exact, s0)
    kpos = op.Reshape(op.Add(op.Unsqueeze(op.Mul(exact_idx, c_s), [4]), ar_c), op.Concat(B, H, nc, op.Mul(Ke, c), axis=0))
    kvalid = op.And(op.Reshape(op.Expand(op.Unsqueeze(op.GreaterOrEqual(exact, s0), [4]), op.Concat(B, H, nc, Ke, c, axis=0)),
                               op.Concat(B, H, nc, op.Mul(Ke, c), axis=0)), op.Less(kpos, N_s))
    gidx = op.Reshape(exact_idx, op.Concat(B, Hkv, G, nc, Ke, i1, axis=0))  # each query head's chunks at its k/v head
    kg = op.Reshape(op.GatherND(kc, gidx, batch_dims=2), op.Concat(B, H, nc, op.Mul(Ke, c), D, axis=0))
    vg = op.Reshape(op.GatherND(vc, gidx, batch_dims=2), op.Concat(B, H, nc, op.Mul(Ke, c), D, axis=0))

    # ---- logits of the exact part [B, H, nc, c, Ke·c] --------------------------------------
    # Keys' validity and the mask are a bias of [B, H, nc, cq, Ke·c] (cq = 1 unless the mask varies
    # per query); causality one of [c, Ke·c]: only the window's chunk at offset 0 (its entry L − 1,
    # the last with causality) holds keys after the query, every other exact chunk lies before the
    # query chunk. Both reach the logits in one pass (a full-size bool mask and Where took four).
    # The mask's rows (its values, −inf where forbidden) are read at the mask's own heads Hm (1 or
    # H): the query heads of a mask head are moved into the gathered axis and back, so a mask
    # shared by the heads is never repeated to them (with a per-query mask that copy was
    # B·H·n² floats, twice: 4.4 GB at 4096 tokens and 9 heads).
    HG = op.Div(H, Hm)
    mrow = op.Expand(op.Reshape(mrow, op.Concat(Bm, Hm, Iq, cq, npad, axis=0)), op.Concat(B, Hm, nc, cq, npad, axis=0))
    Kc = op.Mul(Ke, c)
    kidx = op.Expand(op.Reshape(kpos, op.Concat(B, Hm, HG, nc, i1, Kc, axis=0)),
                     op.Concat(B, Hm, HG, nc, cq, Kc, axis=0))
    kidx = op.Reshape(op.Transpose(kidx, perm=[0, 1, 3, 4, 2, 5]), op.Concat(B, Hm, nc, cq, op.Mul(HG, Kc), axis=0))
    mask_e = op.Reshape(op.GatherElements(mrow, kidx, axis=4), op.Concat(B, Hm, nc, cq, HG, Kc, axis=0))
    mask_e = op.Reshape(op.Transpose(mask_e, perm=[0, 1, 4, 2, 3, 5]), op.Concat(B, H, nc, cq, Kc, axis=0))
    bias_e = op.Add(mask_e, op.Where(op.Unsqueeze(kvalid, [3]), zero_f, neg_inf))  # [B, H, nc, cq, Ke·c]
    rel = op.Sub(op.Range(s0, op.Squeeze(op.Mul(Ke, c), i0), s1), op.Mul(op.Sub(L_s, s1), c_s))  # [Ke·c]
    tri_ok = op.Or(op.Not(is_causal), op.Or(op.LessOrEqual(rel, op.Unsqueeze(ar_c, [1])), op.GreaterOrEqual(rel, c_s)))
    le = op.Add(op.Add(CapScores(op.Mul(op.MatMul(qc, op.Transpose(kg, perm=[0, 1, 2, 4, 3])), scale_t),
                                 softcap=softcap), bias_e),
                op.Where(tri_ok, zero_f, neg_inf))  # [B, H, nc, c, Ke·c]

    # ---- sinks [B, H, nc, c, S] ----------------------------------------------------------------
    sink_pos = op.Range(s0, S_s, s1)
    sink_chunk = op.Div(sink_pos, c_s)
    dup = op.Cast(op.ReduceMax(op.Cast(op.Equal(op.Unsqueeze(exact, [4]), sink_chunk), to=INT64.dtype),
                               op.Constant(value_ints=[3]), keepdims=0), to=onnx.TensorProto.BOOL)  # [B,H,nc,S]
    future = op.And(is_causal, op.Greater(op.Unsqueeze(sink_chunk, [0]), ii))  # [nc, S]
    sink_ok = op.Unsqueeze(op.And(op.Not(dup), op.Not(future)), [3])
    s_mask = op.Slice(mrow, i0, S, op.Constant(value_ints=[4]))  # [B, Hm, nc, cq, S]
    # the sinks' rows per query head (a copy of S rows; allowzero: S may be 0, which Reshape would
    # otherwise read as "keep the input's dimension")
    sinks_wide, sinks_shape = op.Concat(B, Hkv, G, S, D, axis=0), op.Concat(B, H, S, D, axis=0)
    ks = op.Reshape(op.Expand(op.Unsqueeze(op.Slice(kp, i0, S, op.Constant(value_ints=[2])), [2]), sinks_wide),
                    sinks_shape, allowzero=1)  # [B, H, S, d]
    vs = op.Unsqueeze(op.Reshape(op.Expand(op.Unsqueeze(op.Slice(vp, i0, S, op.Constant(value_ints=[2])), [2]),
                                           sinks_wide), sinks_shape, allowzero=1), [2])  # [B, H, 1, S, d]
    ls = op.Add(CapScores(op.Mul(op.MatMul(qc, op.Unsqueeze(op.Transpose(ks, perm=[0, 1, 3, 2]), [2])), scale_t),
                          softcap=softcap),
                op.Add(s_mask, op.Where(sink_ok, zero_f, neg_inf)))

    # ---- summaries [B, H, nc, c, nc] -----------------------------------------------------------
    term = op.Add(op.Log(op.Max(n_j, one_f)), summary_bias)  # [Bm, Hm, Iq, nc]
    lm = op.Add(CapScores(op.Mul(op.MatMul(qc, op.Transpose(kbar, perm=[0, 1, 2, 4, 3])), scale_t), softcap=softcap),
                op.Unsqueeze(op.Where(summarised, term, neg_inf), [3]))

    # ---- one softmax over [exact | sinks | summaries] ------------------------------------------
    out = AttendSets(le, vg, ls, vs, lm, vbar)  # [B, H, nc, c, d]
    out = op.Slice(op.Reshape(out, op.Concat(B, H, npad, D, axis=0)), i0, N, op.Constant(value_ints=[2]))
    return op.CastLike(out, q)


@script(mta_opset, default_opset=op)
def MultiTokenAttention(q, k, v, mask, chunk_size: int, causal: int, scale: float, local_chunks: int, sinks: int,
                        top_k: int, softcap: float = 0.0):
    """The op (see the module's docstring): the mask recognised, then the attention."""
    mf, triangle = SimplifyMask(mask)  # (it casts the mask to float)
    mean = op.Constant(value_floats=[0.0])  # every key of a chunk weighs the same: the mean
    return MultiTokenAttentionPrepared(q, k, v, mf, triangle, mean, chunk_size=chunk_size, causal=causal, scale=scale,
                                       local_chunks=local_chunks, sinks=sinks, top_k=top_k, softcap=softcap)


@script(mta_opset, default_opset=op)
def SummaryLogits(k, summary_weight):
    """k_s·w for learned summaries: k [B, Hkv, n, d], summary_weight [Hkv, d] → [B, Hkv, n]."""
    w = op.Unsqueeze(op.Cast(summary_weight, to=FLOAT.dtype), [2])  # [Hkv, d, 1]
    return op.Squeeze(op.MatMul(op.Cast(k, to=FLOAT.dtype), w), [3])


@script(mta_opset, default_opset=op)
def MultiTokenAttentionLearned(q, k, v, mask, summary_weight, chunk_size: int, causal: int, scale: float,
                               local_chunks: int, sinks: int, top_k: int, softcap: float = 0.0):
    """The op with learned summaries (MTA_SPEC.md ``summary="learned"``): chunk j's summary weighs
    its keys by softmax_s(k_s·w), w = summary_weight[h] ([Hkv, d]), instead of their mean."""
    mf, triangle = SimplifyMask(mask)
    return MultiTokenAttentionPrepared(q, k, v, mf, triangle, SummaryLogits(k, summary_weight), chunk_size=chunk_size,
                                       causal=causal, scale=scale, local_chunks=local_chunks, sinks=sinks, top_k=top_k,
                                       softcap=softcap)


@script(mta_opset, default_opset=op)
def SegmentSlots(segment_ids, chunk_size: int, sinks: int):
    """Boundary chunks' layout (``ops/segments.py``) for segment ids [Bs, n]: (slot [Bs, n], the
    padded position of each token; source [Bs, N], the token at each padded position, a padding
    position taking its chunk's last real token; real [Bs, N]). A chunk ends where the id changes
    or after chunk_size tokens of a run; the first ``sinks`` tokens are chunked on their own."""
    i0 = op.Constant(value_ints=[0])
    i1 = op.Constant(value_ints=[1])
    s0 = op.Constant(value_int=0)
    s1 = op.Constant(value_int=1)
    seg = op.Cast(segment_ids, to=INT64.dtype)
    Bs = op.Shape(seg, start=0, end=1)
    n = op.Shape(seg, start=1, end=2)
    n_s = op.Squeeze(n, i0)
    shape = op.Concat(Bs, n, axis=0)
    t = op.Expand(op.Unsqueeze(op.Range(s0, n_s, s1), [0]), shape)  # [Bs, n]
    c = op.Constant(value_int=chunk_size)
    S_s = op.Squeeze(op.Min(op.Reshape(op.Constant(value_int=sinks), i1), n), i0)
    first_col = op.Equal(op.Slice(seg, i0, i1, i1), op.Slice(seg, i0, i1, i1))  # True [Bs, 1]
    change = op.Not(op.Equal(op.Slice(seg, i1, n, i1), op.Slice(seg, i0, op.Sub(n, i1), i1)))
    run = op.Concat(first_col, change, axis=1)  # an id change starts a run
    run = op.Or(op.And(run, op.GreaterOrEqual(t, S_s)),  # none inside the sinks; one right after them
                op.Or(op.Equal(t, s0), op.And(op.Equal(t, S_s), op.Greater(S_s, s0))))
    fill = op.Expand(n_s, shape)
    r = op.Sub(op.CumSum(op.Cast(run, to=INT64.dtype), s1), s1)  # run index of each token
    run_first = op.GatherElements(op.ScatterElements(fill, r, t, axis=1, reduction="min"), r, axis=1)
    starts = op.Or(run, op.Equal(op.Mod(op.Sub(t, run_first), c), s0))  # runs cut every c tokens
    cid = op.Sub(op.CumSum(op.Cast(starts, to=INT64.dtype), s1), s1)  # chunk index of each token
    first_of = op.ScatterElements(fill, cid, t, axis=1, reduction="min")  # [Bs, n] by chunk index
    len_of = op.ScatterElements(op.Expand(s0, shape), cid, op.Expand(s1, shape), axis=1, reduction="add")
    slot = op.Add(op.Mul(cid, c), op.Sub(t, op.GatherElements(first_of, cid, axis=1)))
    M = op.Add(op.ReduceMax(cid, keepdims=0), s1)
    p = op.Range(s0, op.Mul(M, c), s1)  # padded positions
    Np = op.Shape(p, start=0, end=1)
    m = op.Expand(op.Unsqueeze(op.Div(p, c), [0]), op.Concat(Bs, Np, axis=0))  # the chunk of each
    o = op.Mod(p, c)
    first = op.GatherElements(first_of, m, axis=1)
    length = op.GatherElements(len_of, m, axis=1)
    real = op.Less(o, length)
    source = op.Min(op.Max(op.Add(first, op.Min(o, op.Sub(length, s1))), s0), op.Sub(n_s, s1))
    return slot, source, real


@script(mta_opset, default_opset=op)
def MultiTokenAttentionSegmentedPrepared(q, k, v, mask, triangle, key_logit, segment_ids, chunk_size: int, causal: int,
                                         scale: float, local_chunks: int, sinks: int, top_k: int, softcap: float = 0.0):
    """``MultiTokenAttentionPrepared`` with boundary chunks (``segment_ids`` [B or 1, n]): q, k, v,
    the prepared mask and the key logits moved into padded chunk slots (``SegmentSlots``; padding
    keys forbidden, padding queries zero), the attention there, the real rows moved back."""
    i1 = op.Constant(value_ints=[1])
    zero_f = op.Constant(value_float=0.0)
    neg_inf = op.Constant(value_float=float("-inf"))
    i0 = op.Constant(value_ints=[0])
    slot, source, real = SegmentSlots(segment_ids, chunk_size=chunk_size, sinks=sinks)
    B = op.Shape(q, start=0, end=1)
    H = op.Shape(q, start=1, end=2)
    n = op.Shape(q, start=2, end=3)
    D = op.Shape(q, start=3, end=4)
    Hkv = op.Shape(k, start=1, end=2)
    Np = op.Shape(source, start=1, end=2)
    src = op.Expand(source, op.Concat(B, Np, axis=0))
    keep = op.Expand(real, op.Concat(B, Np, axis=0))
    keep4 = op.Unsqueeze(keep, [1, 3])  # [B, 1, Np, 1]
    qs = op.Where(keep4, op.GatherElements(q, op.Expand(op.Unsqueeze(src, [1, 3]), op.Concat(B, H, Np, D, axis=0)), axis=2),
                  op.CastLike(zero_f, q))
    kv_idx = op.Expand(op.Unsqueeze(src, [1, 3]), op.Concat(B, Hkv, Np, D, axis=0))
    ks = op.Where(keep4, op.GatherElements(k, kv_idx, axis=2), op.CastLike(zero_f, k))
    vs = op.Where(keep4, op.GatherElements(v, kv_idx, axis=2), op.CastLike(zero_f, v))
    mf = op.Cast(mask, to=FLOAT.dtype)
    Hm = op.Shape(mf, start=1, end=2)
    NQ = op.Shape(mf, start=2, end=3)
    me = op.Expand(mf, op.Concat(B, Hm, NQ, n, axis=0))
    cols = op.GatherElements(me, op.Expand(op.Unsqueeze(src, [1, 2]), op.Concat(B, Hm, NQ, Np, axis=0)), axis=3)
    if op.Squeeze(op.Greater(NQ, i1), i0):  # rows too: a padding query takes its chunk's last real query's row
        ms = op.GatherElements(cols, op.Expand(op.Unsqueeze(src, [1, 3]), op.Concat(B, Hm, Np, Np, axis=0)), axis=2)
    else:
        ms = op.Identity(cols)
    ms = op.Where(op.Unsqueeze(keep, [1, 2]), ms, neg_inf)
    kl = op.Expand(op.Cast(key_logit, to=FLOAT.dtype), op.Concat(B, Hkv, n, axis=0))
    kls = op.GatherElements(kl, op.Expand(op.Unsqueeze(src, [1]), op.Concat(B, Hkv, Np, axis=0)), axis=2)
    out = MultiTokenAttentionPrepared(qs, ks, vs, ms, triangle, kls, chunk_size=chunk_size, causal=causal, scale=scale,
                                      local_chunks=local_chunks, sinks=sinks, top_k=top_k, softcap=softcap)
    back = op.Expand(op.Unsqueeze(op.Expand(slot, op.Concat(B, n, axis=0)), [1, 3]), op.Concat(B, H, n, D, axis=0))
    return op.GatherElements(out, back, axis=2)


@script(mta_opset, default_opset=op)
def MultiTokenAttentionSegmented(q, k, v, mask, segment_ids, chunk_size: int, causal: int, scale: float,
                                 local_chunks: int, sinks: int, top_k: int, softcap: float = 0.0):
    """The op with boundary chunks (MTA_SPEC.md "boundary"; ``segment_ids`` [B or 1, n] integers)."""
    mf, triangle = SimplifyMask(mask)
    mean = op.Constant(value_floats=[0.0])
    return MultiTokenAttentionSegmentedPrepared(q, k, v, mf, triangle, mean, segment_ids, chunk_size=chunk_size,
                                                causal=causal, scale=scale, local_chunks=local_chunks, sinks=sinks,
                                                top_k=top_k, softcap=softcap)


@script(mta_opset, default_opset=op)
def MultiTokenAttentionSegmentedLearned(q, k, v, mask, segment_ids, summary_weight, chunk_size: int, causal: int,
                                        scale: float, local_chunks: int, sinks: int, top_k: int, softcap: float = 0.0):
    """The op with boundary chunks and learned summaries."""
    mf, triangle = SimplifyMask(mask)
    return MultiTokenAttentionSegmentedPrepared(q, k, v, mf, triangle, SummaryLogits(k, summary_weight), segment_ids,
                                                chunk_size=chunk_size, causal=causal, scale=scale,
                                                local_chunks=local_chunks, sinks=sinks, top_k=top_k, softcap=softcap)


@script(mta_opset, default_opset=op)
def MultiTokenAttentionClustered(q, k, v, mask, centroids, chunk_size: int, scale: float, local_chunks: int,
                                 sinks: int, softcap: float = 0.0):
    """The op with clustered summaries (``ops/clustered.py``; non-causal): ``centroids``
    [Hkv, K, d]; every key outside a query chunk's window (not a sink, allowed) is in the summary
    of its nearest centroid. ``mask``: read as key padding (its last row; the PyTorch op refuses
    a mask that varies per query, which this function cannot)."""
    neg_inf = op.Constant(value_float=float("-inf"))
    zero_f = op.Constant(value_float=0.0)
    one_f = op.Constant(value_float=1.0)
    i0 = op.Constant(value_ints=[0])
    i1 = op.Constant(value_ints=[1])
    im1 = op.Constant(value_ints=[-1])
    s0 = op.Constant(value_int=0)
    s1 = op.Constant(value_int=1)
    minus1 = op.Constant(value_int=-1)

    qf = op.Cast(q, to=FLOAT.dtype)
    kf = op.Cast(k, to=FLOAT.dtype)
    vf = op.Cast(v, to=FLOAT.dtype)
    mu = op.Cast(centroids, to=FLOAT.dtype)
    scale_t = op.Constant(value_float=scale)
    B = op.Shape(qf, start=0, end=1)
    H = op.Shape(qf, start=1, end=2)
    N = op.Shape(qf, start=2, end=3)
    D = op.Shape(qf, start=3, end=4)
    Hkv = op.Shape(kf, start=1, end=2)
    G = op.Div(H, Hkv)
    Kc = op.Shape(mu, start=1, end=2)
    mu4 = op.Reshape(op.Expand(op.Unsqueeze(mu, [1]), op.Concat(Hkv, G, Kc, D, axis=0)), op.Concat(H, Kc, D, axis=0))

    c = op.Min(op.Reshape(op.Constant(value_int=chunk_size), i1), N)
    nc = op.Div(op.Sub(op.Add(N, c), i1), c)
    npad = op.Mul(nc, c)
    padn = op.Sub(npad, N)
    L = op.Min(op.Reshape(op.Constant(value_int=local_chunks), i1), nc)
    S = op.Min(op.Reshape(op.Constant(value_int=sinks), i1), N)
    # grouped-query attention: every query head gets its key/value head (padded first: one copy)
    zk = op.ConstantOfShape(op.Concat(B, Hkv, padn, D, axis=0))
    kp = op.Reshape(op.Expand(op.Unsqueeze(op.Concat(kf, zk, axis=2), [2]), op.Concat(B, Hkv, G, npad, D, axis=0)),
                    op.Concat(B, H, npad, D, axis=0))
    v4 = op.Reshape(op.Expand(op.Unsqueeze(op.Concat(vf, zk, axis=2), [2]), op.Concat(B, Hkv, G, npad, D, axis=0)),
                    op.Concat(B, H, npad, D, axis=0))
    qc = op.Reshape(op.Concat(qf, op.ConstantOfShape(op.Concat(B, H, padn, D, axis=0)), axis=2),
                    op.Concat(B, H, nc, c, D, axis=0))
    kc = op.Reshape(kp, op.Concat(B, H, nc, c, D, axis=0))
    vc = op.Reshape(v4, op.Concat(B, H, nc, c, D, axis=0))
    npad_s = op.Squeeze(npad, i0)
    nc_s = op.Squeeze(nc, i0)
    c_s = op.Squeeze(c, i0)
    N_s = op.Squeeze(N, i0)
    S_s = op.Squeeze(S, i0)
    L_s = op.Squeeze(L, i0)
    pos = op.Range(s0, npad_s, s1)  # [npad]

    # ---- the mask as key padding: its last row, keys padded as forbidden ----------------------
    mf = op.Cast(mask, to=FLOAT.dtype)
    NQ = op.Shape(mf, start=2, end=3)
    row = op.Slice(mf, op.Sub(NQ, i1), NQ, op.Constant(value_ints=[2]))  # [Bm, Hm, 1, n|1]
    key_ok = op.Greater(op.Expand(row, op.Concat(i1, i1, i1, N, axis=0)), op.Constant(value_float=-3.4e38))
    key_ok = op.Pad(key_ok, op.Concat(i0, i0, i0, i0, i0, i0, i0, padn, axis=0))  # [Bm, Hm, 1, npad] (pad: False)
    key_ok = op.Squeeze(key_ok, [2])  # [Bm, Hm, npad]
    keep = op.And(key_ok, op.And(op.Less(pos, N_s), op.GreaterOrEqual(pos, S_s)))  # keys a summary may hold

    # ---- clusters: nearest centroid, per-chunk sums, totals minus the window's chunks ----------
    half = op.Unsqueeze(op.Mul(op.ReduceSum(op.Mul(mu4, mu4), im1, keepdims=0), op.Constant(value_float=-0.5)), [1])
    score = op.Add(op.MatMul(kp, op.Transpose(mu4, perm=[0, 2, 1])), half)  # [B, H, npad, K]
    nearest = op.ArgMax(score, axis=-1, keepdims=1)  # ties: the first
    member = op.And(op.Equal(nearest, op.Range(s0, op.Squeeze(Kc, i0), s1)), op.Unsqueeze(keep, [-1]))
    member = op.Reshape(op.Cast(member, to=FLOAT.dtype), op.Concat(B, H, nc, c, Kc, axis=0))
    ck = op.Einsum(member, kc, equation="bhjck,bhjcd->bhjkd")  # [B, H, nc, K, d]
    cv = op.Einsum(member, vc, equation="bhjck,bhjcd->bhjkd")
    cn = op.ReduceSum(member, op.Constant(value_ints=[3]), keepdims=0)  # [B, H, nc, K]
    ii = op.Range(s0, nc_s, s1)
    lo = op.Max(op.Add(op.Sub(ii, L_s), s1), s0)  # the window's chunks: lo … hi (non-causal)
    hi1 = op.Min(op.Add(ii, L_s), nc_s)  # hi + 1
    zk = op.Expand(zero_f, op.Concat(B, H, i1, Kc, D, axis=0))
    csk = op.Concat(zk, op.CumSum(ck, op.Constant(value_int=2)), axis=2)  # [B, H, nc + 1, K, d]: prefix sums over chunks
    csv = op.Concat(zk, op.CumSum(cv, op.Constant(value_int=2)), axis=2)
    csn = op.Concat(op.Expand(zero_f, op.Concat(B, H, i1, Kc, axis=0)), op.CumSum(cn, op.Constant(value_int=2)), axis=2)
    last = op.Reshape(nc, i1)
    count = op.Sub(op.Sub(op.Gather(csn, last, axis=2), op.Gather(csn, hi1, axis=2)), op.Neg(op.Gather(csn, lo, axis=2)))
    inv = op.Unsqueeze(op.Div(one_f, op.Max(count, one_f)), [-1])
    kbar = op.Mul(op.Add(op.Sub(op.Gather(csk, last, axis=2), op.Gather(csk, hi1, axis=2)), op.Gather(csk, lo, axis=2)), inv)
    vbar = op.Mul(op.Add(op.Sub(op.Gather(csv, last, axis=2), op.Gather(csv, hi1, axis=2)), op.Gather(csv, lo, axis=2)), inv)
    term = op.Where(op.Greater(count, op.Constant(value_float=0.5)), op.Log(op.Max(count, one_f)), neg_inf)

    # ---- exact part: the window's chunks [B, H, nc, c, W·c] and the sinks ----------------------
    offsets = op.Range(op.Sub(s1, L_s), L_s, s1)
    win = op.Add(op.Unsqueeze(ii, [1]), op.Unsqueeze(offsets, [0]))  # [nc, W]
    win = op.Where(op.And(op.GreaterOrEqual(win, s0), op.Less(win, nc_s)), win, minus1)
    W = op.Shape(win, start=1, end=2)
    win = op.Expand(win, op.Concat(B, H, nc, W, axis=0))
    win_idx = op.Max(win, s0)
    kpos = op.Reshape(op.Add(op.Unsqueeze(op.Mul(win_idx, c_s), [4]), op.Range(s0, c_s, s1)),
                      op.Concat(B, H, nc, op.Mul(W, c), axis=0))
    valid = op.Reshape(op.Expand(op.Unsqueeze(op.GreaterOrEqual(win, s0), [4]), op.Concat(B, H, nc, W, c, axis=0)),
                       op.Concat(B, H, nc, op.Mul(W, c), axis=0))
    key_okB = op.Expand(op.Unsqueeze(key_ok, [2]), op.Concat(B, H, nc, npad, axis=0))  # [B, H, nc, npad]
    valid = op.And(op.And(valid, op.Less(kpos, N_s)), op.GatherElements(key_okB, kpos, axis=3))
    gidx = op.Unsqueeze(win_idx, [4])
    kg = op.Reshape(op.GatherND(kc, gidx, batch_dims=2), op.Concat(B, H, nc, op.Mul(W, c), D, axis=0))
    vg = op.Reshape(op.GatherND(vc, gidx, batch_dims=2), op.Concat(B, H, nc, op.Mul(W, c), D, axis=0))
    le = CapScores(op.Mul(op.MatMul(qc, op.Transpose(kg, perm=[0, 1, 2, 4, 3])), scale_t), softcap=softcap)
    le = op.Add(le, op.Where(op.Unsqueeze(valid, [3]), zero_f, neg_inf))
    sink_pos = op.Range(s0, S_s, s1)
    in_window = op.LessOrEqual(op.Abs(op.Sub(op.Unsqueeze(op.Div(sink_pos, c_s), [0]), op.Unsqueeze(ii, [1]))),
                               op.Sub(L_s, s1))  # [nc, S]
    sink_ok = op.And(op.Not(in_window), op.Unsqueeze(op.Slice(key_ok, i0, S, op.Constant(value_ints=[2])), [2]))
    ks = op.Slice(kp, i0, S, op.Constant(value_ints=[2]))  # [B, H, S, d]
    vs = op.Slice(v4, i0, S, op.Constant(value_ints=[2]))
    ls = CapScores(op.Mul(op.MatMul(qc, op.Unsqueeze(op.Transpose(ks, perm=[0, 1, 3, 2]), [2])), scale_t),
                   softcap=softcap)
    ls = op.Add(ls, op.Where(op.Unsqueeze(sink_ok, [3]), zero_f, neg_inf))
    lm = op.Add(CapScores(op.Mul(op.MatMul(qc, op.Transpose(kbar, perm=[0, 1, 2, 4, 3])), scale_t), softcap=softcap),
                op.Unsqueeze(term, [3]))

    # ---- one softmax over [window | sinks | clusters] -------------------------------------------
    out = AttendSets(le, vg, ls, op.Unsqueeze(vs, [2]), lm, vbar)  # [B, H, nc, c, d]
    out = op.Slice(op.Reshape(out, op.Concat(B, H, npad, D, axis=0)), i0, N, op.Constant(value_ints=[2]))
    return op.CastLike(out, q)


PREPARED_OP_TYPE = "MultiTokenAttentionPrepared"
LEARNED_OP_TYPE = "MultiTokenAttentionLearned"
SUMMARY_LOGITS_OP_TYPE = "SummaryLogits"
SIMPLIFY_OP_TYPE = "SimplifyMask"
SIMPLIFY_BOOL_OP_TYPE = "SimplifyBoolMask"
SEGMENTED_OP_TYPE = "MultiTokenAttentionSegmented"
SEGMENTED_LEARNED_OP_TYPE = "MultiTokenAttentionSegmentedLearned"
SEGMENTED_PREPARED_OP_TYPE = "MultiTokenAttentionSegmentedPrepared"
CLUSTERED_OP_TYPE = "MultiTokenAttentionClustered"


def function_proto() -> onnx.FunctionProto:
    """The op's function alone. It calls ``mta::SimplifyMask`` (which calls ``mta::RecogniseMask``)
    and ``mta::MultiTokenAttentionPrepared``: a model needs them all, see :func:`function_protos`."""
    return MultiTokenAttention.to_function_proto()


def function_protos(opset: int = 18) -> list[onnx.FunctionProto]:
    """Every function an exported model carries: the op (with mean and with learned summaries),
    the learned summaries' key logits, the attention on a prepared mask, the mask recognition for
    float and for bool masks, and the check both share; each importing the
    standard domain at ``opset`` (the model's: the bodies are written against opset 18, and every
    op they use keeps its meaning up to opset 23) and the ``mta`` domain (they call each other)."""
    protos = [function_proto(), MultiTokenAttentionLearned.to_function_proto(), SummaryLogits.to_function_proto(),
              MultiTokenAttentionPrepared.to_function_proto(), SimplifyMask.to_function_proto(),
              SimplifyBoolMask.to_function_proto(), RecogniseMask.to_function_proto(),
              MultiTokenAttentionSegmented.to_function_proto(), MultiTokenAttentionSegmentedLearned.to_function_proto(),
              MultiTokenAttentionSegmentedPrepared.to_function_proto(), SegmentSlots.to_function_proto(),
              MultiTokenAttentionClustered.to_function_proto(), AttendSets.to_function_proto(),
              Forbidden.to_function_proto(), CapScores.to_function_proto()]
    for fn in protos:
        del fn.opset_import[:]
        fn.opset_import.extend([onnx.helper.make_opsetid("", opset), onnx.helper.make_opsetid(DOMAIN, VERSION)])
    return protos
