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
    softcap: float = 0.0  # a tanh soft-cap on the scores (Gemma-2), which the op takes as its ``softcap``; 0: none

    @property
    def is_attention(self) -> bool:
        return self.kind != "softmax"

    def to_dict(self) -> dict:
        return asdict(self)


def listed(names: list[str], most: int = 3) -> str:
    """Names in natural order (layers.2 before layers.10), the first ``most`` and "…" for the rest."""
    import re

    order = sorted(names, key=lambda name: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)])
    return ", ".join(order[:most]) + (f", … ({len(order)} in all)" if len(order) > most else "")


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
            softcap=float(m.softcap),
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
    # "c64·L2·s4·k2" (+ " learned" / " boundary" / " clustered"), or "exact" for one chunk; + " softcap 50"
    config: str
    sink_logits: bool = False  # the site's learned sink logits ride along as one more token (n, d and sinks as the site's)


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
        sink = _drops_sink_token(node)  # the site's learned sink logits are one more token (and dimension)
        if (_hint(a["chunk_size"]) or 0) >= EXACT_CHUNK:
            config = "exact"
        else:
            fields = [_hint(a[f]) for f in ("chunk_size", "local_chunks", "sinks", "top_k")]
            if sink and fields[2]:
                fields[2] -= 1  # as the plan gave it: the extra token is the op's first sink
            config = MTAConfig(*fields).short
            config += "".join(f" {what}" for what, arg in (("learned", "summary_weight"), ("boundary", "segment_ids"),
                                                            ("clustered", "centroids")) if a[arg] is not None)
        if a.get("softcap"):
            config += f" softcap {float(a['softcap']):g}"
        four_d = qs is not None and len(qs) == 4
        less = 1 if sink else 0
        n, d = (_hint(qs[2]), _hint(qs[3])) if four_d else (None, None)
        calls.append(OpCall(
            name=_numbered_name(node, seen)[0],
            batch=_hint(qs[0]) if qs else None, q_heads=_hint(qs[1]) if four_d else None,
            kv_heads=_hint(ks[1]) if ks is not None and len(ks) == 4 else None,
            seq_len=None if n is None else n - less, head_dim=None if d is None else d - less,
            mask=kind, causal=bool(a["causal"]), config=config, sink_logits=sink,
        ))
    return calls


_WHOLE = 1 << 62  # a slice's end at least this: to the end of the dimension


def _drops_sink_token(node: fx.Node) -> bool:
    """Whether an op call's output is read only through ``passes.lower.drop_sink_token`` (in a
    graph ``rewrite`` returned) or what export makes of it (slices: ``1:`` of dimension 2, ``:-1``
    of dimension 3, whole ones around them): the call attends to a site's learned sink logits as
    one more token at position 0 and one more dimension (``passes.lower.sink_logit_operands``)."""
    from .lower import drop_sink_token

    users = list(node.users)
    if len(users) == 1 and users[0].target is drop_sink_token:
        return True
    dropped = set()
    while len(users) == 1 and users[0].target is torch.ops.aten.slice.Tensor:
        dim, start, end, step = (list(users[0].args[1:]) + [0, None, None, 1][len(users[0].args) - 1:])[:4]
        whole_end = end is None or (isinstance(end, int) and end >= _WHOLE)
        if step != 1:
            return False
        if dim == 2 and start == 1 and whole_end:
            dropped.add("token")
        elif dim in (3, -1) and start in (None, 0) and end == -1:
            dropped.add("dimension")
        elif not (start in (None, 0) and whole_end):
            return False
        users = list(users[0].users)
    return dropped == {"token", "dimension"}
