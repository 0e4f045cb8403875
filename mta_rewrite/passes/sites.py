"""Attention sites: stable names and the report a user reads (what was found, and why not)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.fx as fx

from .match import AttentionMatch, operand_shape, shape_of, strip_repeat_kv


@dataclass(frozen=True)
class AttentionSite:
    """One attention subgraph of a model, as ``find_attention`` reports it."""

    name: str  # module path of the layer (stable across captures), "#2" etc. when a layer has several
    # "sdpa" | "manual" | "mha" | "flex" (FlexAttention, reported only) | "softmax" (a softmax that is not attention)
    kind: str
    batch: int | None
    q_heads: int | None
    kv_heads: int | None
    seq_len: int | None
    head_dim: int | None
    mask: str  # "none" | "bool" | "additive" | "additive+bool" | "block mask" (FlexAttention)
    causal: bool
    rewritable: bool
    reason: str = ""
    node: str = ""  # the anchor node in the captured graph

    @property
    def is_attention(self) -> bool:
        return self.kind != "softmax"

    def to_dict(self) -> dict:
        return asdict(self)


def _hint(x) -> int | None:
    if isinstance(x, torch.SymInt):
        return x.node.hint if x.node.hint is not None else None
    return int(x) if isinstance(x, int) else None


def module_path(node: fx.Node) -> tuple[str, str]:
    """(module path, module class name) of the innermost module a node was traced in."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return path, cls_name.rsplit(".", 1)[-1]


def _numbered_name(node: fx.Node, seen: dict[str, int]) -> tuple[str, str]:
    """(name, module class) of a node: its module path (``root`` for the model's own forward),
    suffixed #2, #3 … for the second and later in one layer (``seen`` counts them)."""
    path, cls = module_path(node)
    base = path or "root"
    seen[base] = seen.get(base, 0) + 1
    return (base if seen[base] == 1 else f"{base}#{seen[base]}"), cls


def describe(matches: list[AttentionMatch]) -> list[AttentionSite]:
    """Sites for matches, named by module path (suffixed #2, #3 … for repeats in one layer)."""
    seen: dict[str, int] = {}
    sites = []
    for m in matches:
        name, cls = _numbered_name(m.anchor, seen)
        kind = m.kind
        if kind != "softmax" and cls == "MultiheadAttention":
            kind = "mha"
        qs = operand_shape(m.q, m.q_perm) if m.q is not None else None
        k = m.k if m.k is not None else m.k_transposed
        ks = shape_of(strip_repeat_kv(k)[0]) if m.k_perm is None else operand_shape(k, m.k_perm)
        batch = q_heads = kv_heads = n = d = None
        if qs is not None:
            if len(qs) == 4:
                batch, q_heads, n, d = (_hint(x) for x in qs)
                kv_heads = _hint(ks[1]) if ks is not None and len(ks) == 4 else None
            elif len(qs) == 3 and m.frame is not None:  # [B·H, n, d], the scores viewed as [B, H, n, n]
                batch, q_heads = (_hint(x.meta.get("val") if isinstance(x, fx.Node) else x) for x in m.frame)
                if q_heads is not None and q_heads < 0:  # (viewed as [B, -1, n, n])
                    q_heads = _hint(qs[0]) // batch if batch else None
                if batch is not None and batch < 0:  # (viewed as [-1, H, n, n])
                    batch = _hint(qs[0]) // q_heads if q_heads else None
                kv_heads, n, d = q_heads, _hint(qs[1]), _hint(qs[2])
            elif len(qs) == 3:  # [B·H, n, d]: heads folded into the batch
                batch, n, d = (_hint(x) for x in qs)
                q_heads = kv_heads = 1
        sites.append(AttentionSite(
            name=name, kind=kind, batch=batch, q_heads=q_heads, kv_heads=kv_heads, seq_len=n, head_dim=d,
            mask=m.mask_kind, causal=m.causal, rewritable=m.rewritable, reason=m.reason or "", node=m.anchor.name,
        ))
    return sites


@dataclass(frozen=True)
class OpCall:
    """One ``mta.attention`` call of a rewritten program, as ``mta-rewrite find`` lists it."""

    name: str  # module path of the layer, as its site was named ("#2" … for repeats, a per-head plan's groups)
    batch: int | None
    q_heads: int | None
    kv_heads: int | None
    seq_len: int | None
    head_dim: int | None
    mask: str  # "none" | "bool" | "additive"
    causal: bool
    config: str  # "c64·L2·s4·k2" (+ " learned" / " boundary" / " clustered"), or "exact" for one chunk


def describe_op_calls(graph: fx.Graph) -> list[OpCall]:
    """The ``mta.attention`` calls of a rewritten graph with their configuration, in graph order:
    what ``rewrite`` made of the sites (``find_attention`` no longer sees them as attention)."""
    from ..config import MTAConfig
    from .lower import EXACT_CHUNK
    from .match import bound_args, dtype_of

    seen: dict[str, int] = {}
    calls = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.mta.attention.default:
            continue
        a = bound_args(node)
        qs, ks = shape_of(a["q"]), shape_of(a["k"])
        mask = a["attn_mask"]
        kind = "none" if mask is None else "bool" if dtype_of(mask) == torch.bool else "additive"
        if (_hint(a["chunk_size"]) or 0) >= EXACT_CHUNK:
            config = "exact"
        else:
            config = MTAConfig(*(_hint(a[f]) for f in ("chunk_size", "local_chunks", "sinks", "top_k"))).short
            config += "".join(f" {what}" for what, arg in (("learned", "summary_weight"), ("boundary", "segment_ids"),
                                                            ("clustered", "centroids")) if a[arg] is not None)
        four_d = qs is not None and len(qs) == 4
        calls.append(OpCall(
            name=_numbered_name(node, seen)[0],
            batch=_hint(qs[0]) if qs else None, q_heads=_hint(qs[1]) if four_d else None,
            kv_heads=_hint(ks[1]) if ks is not None and len(ks) == 4 else None,
            seq_len=_hint(qs[2]) if four_d else None, head_dim=_hint(qs[3]) if four_d else None,
            mask=kind, causal=bool(a["causal"]), config=config,
        ))
    return calls
