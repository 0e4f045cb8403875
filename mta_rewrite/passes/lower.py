"""Lower matched attention to ``torch.ops.mta.attention`` by plan.

Each rewritable :class:`~mta_rewrite.passes.match.AttentionMatch` whose site the plan gives an
:class:`~mta_rewrite.config.MTAConfig` is replaced by one ``mta.attention`` node fed with the
canonical operands: q (times any tensor-valued scale), k (un-transposed; GQA's repeat_kv
stripped), v, and the model's own masks combined into one (scaled as the model scaled them).
What the replaced subgraph computed is then dead and removed.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..config import MTAConfig
from .match import IGNORED_USERS, AttentionMatch, dtype_of, strip_repeat_kv

aten = torch.ops.aten


def combine_masks(allowed: list, additive: list):
    """One SDPA-style mask from the model's masks: bool masks AND-ed; with any additive mask,
    everything becomes one float mask (forbidden positions −inf). Called from the graph."""
    keep = None
    for cond, invert in allowed:
        cond = ~cond if invert else cond
        keep = cond if keep is None else keep & cond
    total = None
    for mask, factor in additive:
        if not isinstance(mask, torch.Tensor):
            continue  # a constant shift of every score: softmax ignores it
        term = mask if factor == 1.0 else mask * factor
        total = term if total is None else total + term
    if total is None:
        return keep
    if keep is not None:
        total = torch.where(keep, total, float("-inf"))
    return total


def head_dim_mask(mask):
    """A mask of bmm-style [B·H, n, n] attention gets the head dimension the op's [B·H, 1, n, d] layout has."""
    return mask.unsqueeze(1) if mask is not None and mask.dim() == 3 else mask


def lower_match(gm: fx.GraphModule, m: AttentionMatch, config: MTAConfig) -> fx.Node:
    g = gm.graph
    out = m.output
    with g.inserting_before(out):
        q = m.q
        for factor, divide in m.scale_nodes:
            q = g.call_function(aten.div.Tensor if divide else aten.mul.Tensor, (q, factor))
        k = m.k if m.k is not None else g.call_function(aten.transpose.int, (m.k_transposed, -2, -1))
        v = m.v
        if not m.three_d:
            kb, gk = strip_repeat_kv(k)
            vb, gv = strip_repeat_kv(v)
            if gk == gv > 1:
                k, v = kb, vb
        else:
            q, k, v = (g.call_function(aten.unsqueeze.default, (x, 1)) for x in (q, k, v))
        mask = None
        if m.allowed or m.additive:
            mask = g.call_function(combine_masks, (list(m.allowed), list(m.additive)))
            if m.three_d:
                mask = g.call_function(head_dim_mask, (mask,))
        kwargs = dict(config.op_kwargs(), causal=m.causal, scale=None if m.sdpa_scale_default else float(m.scale))
        node = g.call_function(torch.ops.mta.attention.default, (q, k, v, mask), kwargs)
        if m.three_d:
            node = g.call_function(aten.squeeze.dim, (node, 1))
        want = dtype_of(out)
        if want is not None:  # the op returns q's dtype; the model's output may differ (no-op if not)
            node = g.call_function(aten.to.dtype, (node, want))
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


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    gm.graph.eliminate_dead_code()
    gm.recompile()
