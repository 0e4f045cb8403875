"""Lower matched attention to ``torch.ops.mta.attention`` by plan.

Each rewritable :class:`~mta_rewrite.passes.match.AttentionMatch` whose site the plan gives an
:class:`~mta_rewrite.config.MTAConfig` is replaced by one ``mta.attention`` node fed with the
canonical operands: q (times any tensor-valued scale), k (un-transposed; GQA's repeat_kv
stripped), v, and the model's own masks combined into one (scaled as the model scaled them).
What the replaced subgraph computed is then dead and removed. With boundaries
(:class:`~mta_rewrite.config.Boundaries`) one node computes segment ids from the model's token ids
and every site's op reads them (boundary chunks).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..config import Boundaries, Clustered, HeadGroups, Learned, MTAConfig
from ..ops.layout import dense_order, is_permuted
from .match import FORBIDDING, IGNORED_USERS, AttentionMatch, dtype_of, shape_of, strip_repeat_kv, val

aten = torch.ops.aten


def forbid_masked_scores(mask: torch.Tensor) -> torch.Tensor:
    """An additive mask with its masked scores (values ≤ −1e4, see ``match.FORBIDDING``) made −inf:
    forbidden keys to the op, which reads values above the dtype's minimum as a bias. Exact
    attention gives them zero weight either way."""
    return mask.masked_fill(mask <= FORBIDDING, float("-inf"))


def combine_masks(allowed: list, additive: list, masked_scores: tuple = ()):
    """One SDPA-style mask from the model's masks: bool masks (or 0/1 ones) AND-ed; with any additive mask,
    everything becomes one float mask (forbidden positions −inf). ``masked_scores``: the additive
    masks whose values ≤ −1e4 are forbidden keys (``AttentionMatch.masked_scores``): those values
    become −inf, which the op reads as forbidden (as a bias, −1e4 leaves no causality or key
    padding to recognise). Called from the graph."""
    keep = None
    for cond, invert in allowed:
        if cond.dtype != torch.bool:  # (a multiplicative mask's 0s and 1s)
            cond = cond != 0
        cond = ~cond if invert else cond
        keep = cond if keep is None else keep & cond
    total = None
    for mask, factor in additive:
        if not isinstance(mask, torch.Tensor):
            continue  # a constant shift of every score: softmax ignores it
        term = mask
        if any(mask is x for x in masked_scores):  # (its values as the model wrote them, before any scale)
            term = forbid_masked_scores(term)
        term = term if factor == 1.0 else term * factor
        total = term if total is None else total + term
    if total is None:
        return keep
    if keep is not None:
        total = torch.where(keep, total, float("-inf"))
    return total


def head_dim_mask(mask):
    """A mask of bmm-style [B·H, n, n] attention gets the head dimension the op's [B·H, 1, n, d] layout has."""
    return mask.unsqueeze(1) if mask is not None and mask.dim() == 3 else mask


def heads_frame_mask(mask, B, H):
    """A mask in the [B·H, .., n] frame of bmm-style scores that the model views as [B, H, n, n]
    (ALiBi's [B·H, 1, n] bias in Bloom): the same values as [B, H, .., n]; one broadcast over
    B·H, or of fewer dimensions, needs no view. Called from the graph."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 3 or mask.shape[0] == 1:
        return mask
    return mask.reshape(B, H, *mask.shape[1:])


EXACT_CHUNK = 1 << 30  # chunk_size ≥ n: one chunk, MTA is exact attention
EXACT = MTAConfig(EXACT_CHUNK)


def takes_exact_path(m: AttentionMatch) -> bool:
    """Whether a site left exact runs the op's exact path (one chunk: SDPA after the mask is
    recognised by value) under ``rewrite(lower_exact=True)``, and in calibration's probe: every
    rewritable site but an SDPA call without a mask, which already is what that path runs (a site
    with learned sink logits takes it with its extra token, :func:`sink_logit_operands`)."""
    return m.rewritable and not (m.kind == "sdpa" and m.mask_kind == "none")


def sink_logit_operands(q, k, v, mask, column, scale: float):
    """The op's operands for attention with **learned sink logits** (GPT-OSS): each query row's
    logit ``column`` [B|1, Hq|1, n|1, 1] (or without its last dimension, [B|1, Hq|1, n|1]: the term
    Granite-SWA subtracts from the scores' logsumexp) joins its scores in softmax with a value of zero. It
    becomes one more token, at position 0, that the op attends exactly (a sink): q, k and v get
    one more dimension, q's holding ``column / scale`` and k's 1 for that token and 0 for the real
    keys, so scale·q'·k' is scale·q·k for a real key and the sink logit for the new one; v's is 0
    (its row too). The mask gets the new key allowed for every query and a first row that allows
    only it (the triangle stays a triangle); the first output row and the extra dimension are
    dropped after the op (:func:`drop_sink_token`). Called from the graph."""
    B, Hq, n, d = q.shape
    if column.dim() == q.dim() - 1:
        column = column.unsqueeze(-1)
    logit = (column.to(q.dtype) / scale).expand(B, Hq, n, 1)
    q = F.pad(torch.cat([q, logit], dim=-1), (0, 0, 1, 0))
    k = torch.cat([F.pad(torch.ones_like(k[:, :, :1, :1]), (d, 0)), F.pad(k, (0, 1))], dim=2)
    v = F.pad(v, (0, 1, 1, 0))
    if mask is not None:
        allow, forbid = (True, False) if mask.dtype == torch.bool else (0.0, float("-inf"))
        mask = F.pad(mask, (1, 0), value=allow)  # every query may attend to the sink
        if mask.shape[-2] > 1:  # the new query row: only the sink (its output is dropped)
            mask = torch.cat([F.pad(torch.full_like(mask[..., :1, 1:], forbid), (1, 0), value=allow), mask], dim=-2)
    return q, k, v, mask


def sink_token_segments(segment_ids):
    """Boundary chunks' segment ids [B, n] for :func:`sink_logit_operands`' operands: the extra
    token at position 0 takes the first token's segment (it is a sink, attended exactly; the
    first segment's chunks count from it, later segments start where they did). Called from the
    graph."""
    return torch.cat([segment_ids[:, :1], segment_ids], dim=1)


def drop_sink_token(out):
    """The op's output without :func:`sink_logit_operands`' token and dimension. Called from the graph."""
    return out[:, :, 1:, :-1]


def with_sink_token(config: MTAConfig | HeadGroups | Learned) -> MTAConfig | HeadGroups | Learned:
    """``config`` for the operands :func:`sink_logit_operands` makes: the token it puts first is one
    more sink (every head group's, a group left exact stays exact), and learned summaries' weight
    one more dimension, 0 (the real keys' is 0 there, so w·k is unchanged; the new token, a sink,
    is in no summary). Clustered summaries are refused with a one-line error: they are for
    non-causal attention over one key-padding mask, and the extra token's query row (which attends
    to it alone) makes the mask vary per query."""
    if isinstance(config, MTAConfig):
        return dataclasses.replace(config, sinks=config.sinks + 1)
    if isinstance(config, HeadGroups):
        return HeadGroups(tuple((None if c is None else with_sink_token(c), heads) for c, heads in config.groups))
    if isinstance(config, Learned):
        return Learned(with_sink_token(config.config), tuple(row + (0.0,) for row in config.weight))
    raise ValueError(f"a site with learned sink logits takes an MTAConfig, HeadGroups or Learned, not "
                     f"{type(config).__name__} (clustered summaries need one key-padding mask for every query, and "
                     "the extra token's row attends to it alone)")


def grouped_attention(q, k, v, mask, groups, causal, scale, summary_weight=None, segment_ids=None, attend=None,
                      softcap: float = 0.0):
    """MTA with a different configuration per group of query heads (``HeadGroups.op_groups``);
    a group with config None is exact. ``summary_weight`` [Hkv, d]: learned summaries (each group
    gets its heads' rows); ``segment_ids``: boundary chunks. Called from the graph. ``attend``: the
    op (None) or ``ops.attention.attention_autograd`` (calibration's fitting). ``softcap``: the
    site's soft-cap, every group's."""
    attend = attend or torch.ops.mta.attention
    Hq, Hkv = q.shape[1], k.shape[1]
    G = Hq // Hkv
    per_head_mask = mask is not None and mask.dim() >= 3 and mask.shape[-3] == Hq and Hq > 1
    outs, order = [], []
    for cfg, heads in groups:
        idx = torch.tensor(heads, dtype=torch.long, device=q.device)
        kv_idx = idx // G
        m = mask.index_select(mask.dim() - 3, idx) if per_head_mask else mask
        kwargs = dict(cfg) if cfg is not None else {"chunk_size": EXACT_CHUNK}
        if softcap:
            kwargs["softcap"] = softcap
        w = summary_weight.index_select(0, kv_idx) if summary_weight is not None and cfg is not None else None
        seg = segment_ids if cfg is not None else None
        outs.append(attend(q.index_select(1, idx), k.index_select(1, kv_idx), v.index_select(1, kv_idx), m, w, seg,
                           causal=causal, scale=scale, **kwargs))
        order.extend(heads)
    # (the inverse permutation computed here, a constant of the graph: an argsort of the constant
    # order ran on every call, and in ONNX as a TopK that onnxscript's optimiser warned it left unfolded)
    inverse = torch.tensor(_inverse(tuple(order)), dtype=torch.long, device=q.device)
    return torch.cat(outs, dim=1).index_select(1, inverse)


def attention_call(g: fx.Graph, q, k, v, mask, config, kw: dict, weight: fx.Node | None = None,
                   segments: fx.Node | None = None, centroids: fx.Node | None = None) -> fx.Node:
    """The graph node computing one site with ``config`` (an MTAConfig or HeadGroups; ``weight``:
    the node holding the learned summary weight, if any; ``segments``: the segment ids node of
    boundary chunks, if any; ``centroids``: the node holding clustered summaries' centroids)."""
    if isinstance(config, HeadGroups):
        return g.call_function(grouped_attention, (q, k, v, mask, config.op_groups(), kw["causal"], kw["scale"], weight,
                                                   segments, None, kw.get("softcap", 0.0)))
    args = (q, k, v, mask, weight, segments) + ((centroids,) if centroids is not None else ())
    return g.call_function(torch.ops.mta.attention.default, args, dict(config.op_kwargs(), **kw))


def segment_ids_from_separators(token_ids: torch.Tensor, separators: tuple[int, ...]) -> torch.Tensor:
    """[B, n] segment ids from token ids: a segment ends after each separator token. Called from
    the graph."""
    sep = torch.tensor(separators, dtype=token_ids.dtype, device=token_ids.device)
    # (not torch.isin: it decomposes to searchsorted, which torch.onnx cannot export)
    ends = (token_ids.unsqueeze(-1) == sep).any(-1).to(torch.int64)
    return torch.cumsum(ends, dim=-1) - ends  # separators before the token, the token itself excluded


def add_segment_ids(gm: fx.GraphModule, boundaries: Boundaries) -> fx.Node:
    """One node, after the inputs, computing the segment ids of ``boundaries`` from the model's
    token-id input; a one-line error when the model has no such [B, n] integer input."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    source = next((n for n in inputs if n.name == boundaries.input or n.target == boundaries.input), None)
    if source is None:
        names = ", ".join(n.name for n in inputs) or "none"
        raise ValueError(f"boundaries read the model input {boundaries.input!r}, which this model does not take "
                         f"(its inputs: {names})")
    example = val(source)
    if isinstance(example, torch.Tensor) and (example.dim() != 2 or example.is_floating_point()):
        raise ValueError(f"boundaries need token ids [B, n] (integers) in {boundaries.input!r}; "
                         f"it is {example.dtype} {list(example.shape)}")
    with gm.graph.inserting_after(inputs[-1]):
        return gm.graph.call_function(segment_ids_from_separators, (source, tuple(boundaries.separators)))


def _buffer_node(gm: fx.GraphModule, prefix: str, value: torch.Tensor) -> fx.Node:
    """A get_attr node of a new buffer ``{prefix}{i}`` of the module holding ``value``."""
    name = f"{prefix}{sum(1 for b, _ in gm.named_buffers() if b.startswith(prefix))}"
    gm.register_buffer(name, value)
    return gm.graph.get_attr(name)


def _parameter_nodes(gm: fx.GraphModule, config) -> tuple:
    """(the MTAConfig or HeadGroups, the node of a learned summary weight or None, the node of
    clustered summaries' centroids or None), the tensors stored as buffers of the module."""
    if isinstance(config, Learned):
        return config.config, _buffer_node(gm, "mta_summary_weight_", config.tensor()), None
    if isinstance(config, Clustered):
        return config.config, None, _buffer_node(gm, "mta_centroids_", config.tensor())
    return config, None, None


def _canonical_operands(g: fx.Graph, m: AttentionMatch):
    """Insert (before the site's output) the nodes that give the op its canonical operands:
    q (times tensor-valued scales), k (un-transposed, GQA repeat stripped), v, the combined mask."""
    q = _permuted(g, m.q, m.q_perm)
    for factor, divide in m.scale_nodes:
        q = g.call_function(aten.div.Tensor if divide else aten.mul.Tensor, (q, factor))
    k = m.k if m.k is not None else g.call_function(aten.transpose.int, (m.k_transposed, -2, -1))
    k, v = _permuted(g, k, m.k_perm), _permuted(g, m.v, m.v_perm)
    if not m.three_d:
        kb, gk = strip_repeat_kv(k)
        vb, gv = strip_repeat_kv(v)
        if gk == gv > 1:
            k, v = kb, vb
    else:
        k_node = m.k if m.k is not None else m.k_transposed
        q, k, v = (_op_layout(g, m, x, like) for x, like in ((q, m.q), (k, k_node), (v, m.v)))
    mask = None
    if m.allowed or m.additive:
        framed = {} if m.frame is None else \
            {x: g.call_function(heads_frame_mask, (x, *m.frame)) for x in set(m.inner_masks)}
        allowed = [(framed.get(c, c), invert) for c, invert in m.allowed]
        additive = [(framed.get(x, x), f) for x, f in m.additive]
        scored = tuple(framed.get(x, x) for x in m.masked_scores)
        mask = g.call_function(combine_masks, (allowed, additive, scored) if scored else (allowed, additive))
        if m.three_d and m.frame is None:
            mask = g.call_function(head_dim_mask, (mask,))
    return q, k, v, mask


def _permuted(g: fx.Graph, x: fx.Node, perm: tuple[int, ...] | None) -> fx.Node:
    """``x`` permuted (an einsum operand in another index order: ``AttentionMatch.q_perm`` …)."""
    return x if perm is None else g.call_function(aten.permute.default, (x, list(perm)))


def _inverse(perm: tuple[int, ...]) -> list[int]:
    return sorted(range(len(perm)), key=perm.__getitem__)


def _op_layout(g: fx.Graph, m: AttentionMatch, x: fx.Node, like: fx.Node) -> fx.Node:
    """A [B·H, n, d] operand (or the site's output) of a bmm-style site in the op's 4-D layout:
    [B, H, n, d] when the model views its scores so (``m.frame``; one already 4-D there, as
    ``like``, the graph's node it stands for, shows, is as it is), else [B·H, 1, n, d]."""
    if m.frame is not None:
        if len(shape_of(like) or ()) == 4:
            return x
        return g.call_function(aten.unflatten.int, (x, 0, list(m.frame)))
    return g.call_function(aten.unsqueeze.default, (x, 1))


def _attention_kwargs(m: AttentionMatch) -> dict:
    kw = dict(causal=m.causal, scale=None if m.sdpa_scale_default else float(m.scale))
    if m.softcap:  # (only then: programs rewritten without one keep the op's call as it was)
        kw["softcap"] = float(m.softcap)
    return kw


def memory_order(x) -> list[int] | None:
    """The dimensions of a node's value from outermost to innermost in memory, read from the
    traced example's strides, when that is not simply their order: None for a contiguous value
    (up to dimensions of size 1), an unknown one, or one that is not dense (an expanded or
    overlapping view has no memory order to restore)."""
    v = val(x)
    if not isinstance(v, torch.Tensor):
        return None

    def hint(s):  # a symbolic size or stride: its value in the traced example
        return s.node.hint if isinstance(s, torch.SymInt) else int(s)

    sizes, strides = [hint(s) for s in v.shape], [hint(s) for s in v.stride()]
    if None in sizes or None in strides:
        return None
    order = dense_order(sizes, strides)
    return order if order is not None and is_permuted(sizes, order) else None


def _restore_layout(g: fx.Graph, node: fx.Node, order: list[int] | None) -> fx.Node:
    """Give the new output the replaced subgraph's memory order. torch.export drops calls that
    were no-ops when traced (``.contiguous()`` after ``transpose(1, 2)`` of SDPA's output, which
    followed q's transposed [B, n, H, d] buffer), so later ``view`` nodes can depend on that order.
    The op returns q's layout, usually that same order: then ``contiguous`` of the permuted output
    is free; otherwise it is one copy."""
    if order is None:
        return node
    node = g.call_function(aten.permute.default, (node, order))
    node = g.call_function(aten.contiguous.default, (node,))
    return g.call_function(aten.permute.default, (node, _inverse(order)))


def _finish(g: fx.Graph, m: AttentionMatch, node: fx.Node) -> fx.Node:
    """Back from the op's [B, H, n, d] in q's dtype to what the site produced: its shape, dtype
    and memory order."""
    if m.frame is not None:
        if len(shape_of(m.output) or ()) != 4:
            node = g.call_function(aten.flatten.using_ints, (node, 0, 1))
    elif m.three_d:
        node = g.call_function(aten.squeeze.dim, (node, 1))
    want = dtype_of(m.output)
    if want is not None:  # the op returns q's dtype; the model's output may differ (no-op if not)
        node = g.call_function(aten.to.dtype, (node, want))
    order = memory_order(m.output)
    if m.out_perm is not None:  # an einsum's output order: dense in it, as the einsum returned it
        node = g.call_function(aten.permute.default, (node, list(m.out_perm)))
        if order is None:
            return g.call_function(aten.contiguous.default, (node,))
    return _restore_layout(g, node, order)


def _example_size(node, dim: int) -> int | None:
    """A dimension of a node's traced example value (a symbolic size's value in the example)."""
    v = val(node)
    if not isinstance(v, torch.Tensor):
        return None
    size = v.shape[dim]
    return size.node.hint if isinstance(size, torch.SymInt) else int(size)


def _q_dim(m: AttentionMatch, dim: int) -> int:
    """Where a dimension of the site's q in the op's order (n at -2, d at -1) is in q as traced."""
    ndim = len(val(m.q).shape) if isinstance(val(m.q), torch.Tensor) else 0
    return dim if m.q_perm is None or not ndim else m.q_perm[dim % ndim]


def _q_size(m: AttentionMatch, dim: int) -> int | None:
    """A dimension of the site's q in the op's order (n at -2, d at -1), in the traced example."""
    return _example_size(m.q, _q_dim(m, dim))


def _raw_size(node, dim: int):
    """A dimension of a node's traced value as traced: an int, or a SymInt in a dynamic program."""
    v = val(node)
    return v.shape[dim] if isinstance(v, torch.Tensor) and v.dim() > abs(dim) - (dim < 0) else None


def on_token_sequence(segments: fx.Node, m: AttentionMatch) -> bool:
    """Whether a site attends over the sequence of the model's token input, whose tokens the
    segment ids of boundary chunks number: its query length is that input's length (the same
    symbol in a dynamic program, the same number in a static one). A vision tower's patches or a
    sequence with a prepended token are others."""
    ids, n = _raw_size(segments.args[0], 1), _raw_size(m.q, _q_dim(m, -2))
    if ids is None or n is None:
        return True  # (unknown: the op checks the lengths when it runs)
    if isinstance(ids, torch.SymInt) or isinstance(n, torch.SymInt):
        return isinstance(ids, torch.SymInt) and isinstance(n, torch.SymInt) and ids.node.expr == n.node.expr
    return int(ids) == int(n)


def sites_apart(segments: fx.Node, planned: list) -> set[str]:
    """The names of the sites of ``planned`` ([(match, site)], the sites boundary chunks would
    chunk) that attend over another sequence than the model's token input (:func:`on_token_sequence`):
    they chunk by ``chunk_size`` alone, with a warning that names them; a one-line ValueError when
    no site attends over the token input (boundaries would apply to none). Until 2026-12-07 any
    such site was a one-line error for the whole rewrite, so a vision-language model (its vision
    tower attends over patches) took no boundaries at all."""
    import warnings

    from .sites import listed

    apart = [(m, site) for m, site in planned if not on_token_sequence(segments, m)]
    if not apart:
        return set()
    ids = _example_size(segments.args[0], 1)
    described = [f"{site.name}: {_q_size(m, -2)} tokens" for m, site in apart]
    if len(apart) == len(planned):
        raise ValueError(f"boundaries apply to no attention site: each attends over another sequence than the "
                         f"model's token input ({ids} tokens; {listed(described)}); rewrite without boundaries")
    warnings.warn(f"boundaries: {len(apart)} attention site(s) attend over another sequence than the model's token "
                  f"input ({ids} tokens) and chunk by chunk_size alone ({listed(described)})", stacklevel=3)
    return {site.name for _, site in apart}


def _check_segment_length(segments: fx.Node, m: AttentionMatch) -> None:
    """Boundaries give one id per token of the model's token input: a site that attends over
    another number of tokens (a prepended token, a pooled sequence) cannot use them."""
    ids, n = _example_size(segments.args[0], 1), _q_size(m, -2)
    if ids is not None and n is not None and ids != n:
        raise ValueError(f"boundaries give {ids} segment ids (one per token of the model's token input) but an "
                         f"attention site attends over {n} tokens; rewrite without boundaries")


def lower_match(gm: fx.GraphModule, m: AttentionMatch, config: MTAConfig | HeadGroups | Learned | Clustered,
                segments: fx.Node | None = None) -> fx.Node:
    """Replace one site by ``torch.ops.mta.attention`` and erase what it computed before
    (``segments``: the segment ids node of boundary chunks)."""
    if isinstance(config, Clustered) and segments is not None:
        raise ValueError("a site with clustered summaries takes no boundaries (its summaries are by cluster, not chunk)")
    if segments is not None:
        _check_segment_length(segments, m)
    if m.sink_logits is not None:
        config = with_sink_token(config)  # (a one-line error for one it cannot take, before the graph changes)
    g = gm.graph
    out = m.output
    before = set(g.nodes)
    with g.inserting_before(out):
        q, k, v, mask = _canonical_operands(g, m)
        config, weight, centroids = _parameter_nodes(gm, config)
        kw = _attention_kwargs(m)
        if m.sink_logits is not None:  # one more token the op attends exactly (sink_logit_operands)
            if kw["scale"] is None:  # the default 1/√d is q's own, before q grows a dimension
                kw["scale"] = float(_q_size(m, -1)) ** -0.5
            operands = g.call_function(sink_logit_operands, (q, k, v, mask, m.sink_logits, kw["scale"]))
            q, k, v, mask = (g.call_function(operator.getitem, (operands, i)) for i in range(4))
            if segments is not None:
                segments = g.call_function(sink_token_segments, (segments,))
        node = attention_call(g, q, k, v, mask, config, kw, weight, segments, centroids)
        if m.sink_logits is not None:
            node = g.call_function(drop_sink_token, (node,))
        node = _finish(g, m, node)
    _inherit_module(m.anchor, [n for n in g.nodes if n not in before])
    out.replace_all_uses_with(node)
    # The replaced subgraph is dead now, but DCE would keep it: export's metadata assertions
    # look at it, and dropout counts as impure. Erase it explicitly, last node first.
    order = {n: i for i, n in enumerate(g.nodes)}
    for c in sorted(set(m.chain) | {out}, key=order.__getitem__, reverse=True):
        for user in list(c.users):
            if user.target in IGNORED_USERS:
                g.erase_node(user)
        if not c.users:
            g.erase_node(c)
    return node


def _inherit_module(anchor: fx.Node, nodes: list[fx.Node]) -> None:
    """The nodes a rewrite adds belong to the layer of the attention they replace: they take its
    ``nn_module_stack`` (and stack trace), which a program captured again from the rewritten module
    keeps, so its op calls are named by layer (``mta-rewrite find``), not as the model's root."""
    for key in ("nn_module_stack", "stack_trace"):
        if key in anchor.meta:
            for n in nodes:
                n.meta.setdefault(key, anchor.meta[key])


def lower_match_to_hook(gm: fx.GraphModule, m: AttentionMatch, name: str, hook, segments: fx.Node | None = None) -> fx.Node:
    """Route one site through ``hook(original, q, k, v, mask, name, causal, scale, segment_ids,
    sink_logits, softcap)`` while keeping the original subgraph: the hook returns either the original output
    (bit-identical) or its own. Calibration uses it to switch sites between exact and candidate
    configurations. ``segments``: the segment ids node of boundary chunks (else None is passed);
    ``sink_logits``: the site's learned sink logits (GPT-OSS; None for other sites), the column
    :func:`sink_logit_operands` turns into one more token."""
    if segments is not None:
        _check_segment_length(segments, m)
    g = gm.graph
    out = m.output
    readers = set(out.users)
    with g.inserting_before(out.next):  # (inserting_before keeps the nodes in creation order)
        original = out if m.out_perm is None else g.call_function(aten.permute.default, (out, _inverse(m.out_perm)))
        original = _op_layout(g, m, original, m.output) if m.three_d else original
        keep = set(out.users) - readers  # the new readers of the original output: they keep reading it
        q, k, v, mask = _canonical_operands(g, m)
        kw = _attention_kwargs(m)
        call = g.call_function(hook, (original, q, k, v, mask, name, kw["causal"], kw["scale"], segments,
                                      m.sink_logits, kw.get("softcap", 0.0)))
        node = _finish(g, m, call)
    keep.add(call)
    out.replace_all_uses_with(node, delete_user_cb=lambda user: user not in keep)
    return node


def _has_effects(node: fx.Node) -> bool:
    """fx's impurity, and functorch's calls in an exported graph: torch.export records vmap's
    level changes (``_vmap_increment_nesting`` …, around FlexAttention's block-mask code) as
    calls whose results nothing reads; fx counts them pure (its jvp twins it does not), and
    dropping them left the vmap levels unbalanced ("your tensor may have escaped from inside a
    function being vmapped")."""
    return node.is_impure() or (node.op == "call_function"
                                and str(getattr(node.target, "__module__", "")).startswith("torch._functorch"))


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    """Drop what the rewrite left unread (the original attention subgraphs), nothing with effects."""
    gm.graph.eliminate_dead_code(is_impure_node=_has_effects)
    gm.recompile()
