"""Detect attention in an exported graph and describe it in one canonical form.

Matching is generic, in the spirit of onnxscript's SDPA rule with alternatives rather than a list
of fixed op sequences. There are two anchors:

* the SDPA family (``aten.scaled_dot_product_attention`` and its backend variants): the operands
  are read off the call;
* ``softmax`` over the last dimension: from its input we walk *backwards* through score modifiers
  (scale as mul/div by a scalar or a per-head/per-query tensor, additive masks, ``masked_fill``
  and ``where`` with −inf or the dtype's minimum, casts, one ``tanh`` soft-cap: a·tanh(b·s) with
  numbers a, b is the op's ``softcap`` a at scale a·b) to a product of q and kᵀ (``matmul``,
  ``bmm``, ``baddbmm``, ``einsum``), and *forwards* through casts and eval-mode dropout to the
  product with v.

The result is an :class:`AttentionMatch`: canonical q, k, v operands, the scale, the masks in
the order and scaling the model applied them, causality, and—when the site must stay exact—the
reason. A check returns a reason, not a bool: "why was this attention not rewritten?" always
has an answer.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..ops.masks import forbidden_threshold

aten = torch.ops.aten

SDPA_TARGETS = {
    aten.scaled_dot_product_attention.default,
}
SOFTMAX_TARGETS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
FLEX_ATTENTION = getattr(torch.ops.higher_order, "flex_attention", None)
CAST_TARGETS = {
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default,
    aten.contiguous.default, aten.clone.default, aten.alias.default,
}
# Nodes that use a value without consuming it (export's metadata assertions).
IGNORED_USERS = {aten._assert_tensor_metadata.default}
MATMUL_TARGETS = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default, aten.einsum.default}
VIEW_TARGETS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# where(cond, scores, fill): with a tensor, or with a number for either branch (``torch.where(mask,
# s, torch.finfo(s.dtype).min)`` is where.ScalarOther)
WHERE_TARGETS = {aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf}
# In-place score modifiers (``scores /= math.sqrt(d)``, Falcon's eager attention) read as their
# functional forms: the walk only follows them on the scores' own chain, whose every node has one
# user, so nothing else sees the mutated tensor.
IN_PLACE = {
    aten.mul_.Tensor: aten.mul.Tensor, aten.mul_.Scalar: aten.mul.Scalar, aten.div_.Tensor: aten.div.Tensor,
    aten.div_.Scalar: aten.div.Scalar, aten.add_.Tensor: aten.add.Tensor, aten.sub_.Tensor: aten.sub.Tensor,
    aten.masked_fill_.Scalar: aten.masked_fill.Scalar, aten.masked_fill_.Tensor: aten.masked_fill.Tensor,
}


def _functional(target):
    return IN_PLACE.get(target, target)


class NoMatch(Exception):
    """Raised inside the matcher with the reason a candidate is not rewritable attention."""


@dataclass
class AttentionMatch:
    """One attention subgraph in canonical form (see the module docstring)."""

    anchor: fx.Node
    output: fx.Node | None = None
    kind: str = "manual"  # "sdpa" | "manual" | "flex" | "softmax" (a softmax that is not attention)
    q: fx.Node | None = None
    k: fx.Node | None = None  # [.., n, d] (already un-transposed when the graph had k itself)
    k_transposed: fx.Node | None = None  # the kᵀ operand when k itself is not in the graph
    v: fx.Node | None = None
    # [B·H, n, d] operands (bmm style): the op gets a head dimension of 1; with ``frame``, those of
    # them that are 3-D (the others already [B, H, n, d]) are viewed into it
    three_d: bool = False
    # (B, H) when 3-D products surround scores viewed as [B, H, n, n] (Bloom; or viewed so for the mask
    # and back before a 3-D softmax, older BART-style code): the op then gets the
    # operands viewed as [B, H, n, d], and the masks met before that view (``inner_masks``, in the
    # [B·H, ..] frame) are viewed the same way
    frame: tuple | None = None
    inner_masks: list[fx.Node] = field(default_factory=list)
    scale: float = 1.0
    scale_nodes: list[tuple[fx.Node, bool]] = field(default_factory=list)  # (tensor, divide?) folded into q
    sdpa_scale_default: bool = False  # SDPA with scale=None: the op's own default, 1/√d
    additive: list[tuple[fx.Node, float]] = field(default_factory=list)  # (mask, factor applied after it)
    # additive masks computed as x·c, c a masked score above the dtype's minimum (old BERT code's
    # (1.0 − attention_mask)·−10000.0): their values ≤ −1e4 are forbidden keys (see FORBIDDING)
    masked_scores: list[fx.Node] = field(default_factory=list)
    allowed: list[tuple[fx.Node, bool]] = field(default_factory=list)  # (bool mask, invert?)
    causal: bool = False
    chain: list[fx.Node] = field(default_factory=list)  # nodes the rewrite makes dead
    # GPT-OSS's learned sink logits: a per-head logit concatenated to the scores as one more column
    # before softmax, that column's probability dropped after it (the rewrite gives the op one more
    # token for it: passes.lower.sink_logit_operands)
    sink_logits: fx.Node | None = None
    # a tanh soft-cap on the scores (Gemma-2: softcap·tanh(s / softcap)), the op's ``softcap``; 0: none
    softcap: float = 0.0
    # einsum operands indexed in another order than [batch.., n, d] (heads after tokens, as code
    # written in JAX's style has it: "btnh,bsnh->bnts", then "bnts,bsnh->btnh"): the permutations
    # that bring q, k and v into that order, and the one that takes the op's [batch.., n, d]
    # output to the einsum's output order (None: already in order)
    q_perm: tuple[int, ...] | None = None
    k_perm: tuple[int, ...] | None = None
    v_perm: tuple[int, ...] | None = None
    out_perm: tuple[int, ...] | None = None
    reason: str | None = None
    # False when the walk from softmax back to q·kᵀ stopped at a score modifier the op cannot
    # take (a tanh inside the soft-cap, an exp): the masks further down were not read (the report says "not read")
    masks_read: bool = True

    @property
    def rewritable(self) -> bool:
        return self.reason is None

    @property
    def mask_kind(self) -> str:
        if self.kind == "flex":
            return "block mask"  # FlexAttention's mask is a program (mask_mod), not a tensor
        if not self.masks_read:
            return "not read"
        kinds = []
        if self.additive:
            kinds.append("additive")
        if self.allowed:
            kinds.append("bool")
        return "+".join(kinds) or "none"


# ---- small helpers over fx nodes ------------------------------------------------------------

def val(x: Any) -> Any:
    """The example value (FakeTensor, SymInt, number) behind a node or constant."""
    return x.meta.get("val") if isinstance(x, fx.Node) else x


def shape_of(x: Any) -> tuple | None:
    v = val(x)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def operand_shape(x: Any, perm: tuple[int, ...] | None) -> tuple | None:
    """The shape of a node (or a shape) in the op's [batch.., n, d] order: permuted by an einsum
    operand's ``perm`` (``AttentionMatch.q_perm`` …)."""
    shape = x if isinstance(x, tuple) else shape_of(x)
    return shape if shape is None or perm is None else tuple(shape[i] for i in perm)


def dtype_of(x: Any) -> torch.dtype | None:
    v = val(x)
    return v.dtype if isinstance(v, torch.Tensor) else None


def live_users(node: fx.Node) -> list[fx.Node]:
    """Users that consume the value: not metadata assertions, not dead code."""
    out = []
    for user in node.users:
        if user.target in IGNORED_USERS:
            continue
        if user.op != "output" and user.op == "call_function" and not _is_live(user, set()):
            continue
        out.append(user)
    return out


def _is_live(node: fx.Node, seen: set) -> bool:
    if node in seen:
        return False
    seen.add(node)
    if node.op == "output":
        return True
    if node.op == "call_function" and node.is_impure() and node.target not in IGNORED_USERS:
        return True
    return any(u.target not in IGNORED_USERS and _is_live(u, seen) for u in node.users)


def bound_args(node: fx.Node) -> dict[str, Any]:
    """Arguments of an aten call by schema name, defaults filled in."""
    schema = node.target._schema
    out = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = None
    return out


def _constant(node: fx.Node) -> torch.Tensor | None:
    """The real tensor behind a constant node (get_attr, possibly wrapped in lift_fresh_copy)."""
    while node.op == "call_function" and node.target in (
        aten.lift_fresh_copy.default, aten.detach.default, aten.detach_.default, aten.clone.default
    ):
        node = node.args[0]
    if node.op != "get_attr" or node.graph.owning_module is None:
        return None
    obj = node.graph.owning_module
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.Tensor) else None


def _static(x: Any) -> Any:
    """An int/float/tensor when statically known (SymInts with a constant value, constants)."""
    if isinstance(x, fx.Node):
        const = _constant(x)
        if const is not None:
            return const
    v = val(x)
    if isinstance(v, (torch.SymInt, torch.SymFloat)):
        try:
            return v.node.maybe_as_int() if isinstance(v, torch.SymInt) else None
        except Exception:
            return None
    return v


def same_size(a: Any, b: Any) -> bool:
    """True when two sizes are provably equal: equal constants, or the same symbol."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return str(a) == str(b)
    return a == b


def _expr(size: Any, subs: dict) -> Any:
    """A size (int, SymInt or None) as a sympy expression with ``subs`` applied (ints and None as they are)."""
    return size.node.expr.xreplace(subs) if isinstance(size, torch.SymInt) else size


def equal_slice_lengths(graph: fx.Graph) -> dict:
    """Sizes that slices prove equal where torch.export cannot: a slice whose bounds depend on the
    input's values (``x[:, -u:]`` with u a prompt's real length, read by ``.item()``) gets a fresh
    unbacked size, so two slices with the same bounds of equally long dimensions (q's and k's
    text part, as a rotary embedding on the image tokens alone cuts them) get sizes it cannot tell
    apart, and q and k lengths that are equal at every run. Slicing is a function of the length
    and the bounds: this maps each such size's symbol to the first one cut the same way (the graph
    in order, so a slice of a slice is compared by its input's mapped length). Cached on the graph."""
    cached = graph.__dict__.get("_mta_equal_slice_lengths")
    if cached is not None:
        return cached
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    subs, first = {}, {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.slice.Tensor:
            continue
        out, x = val(node), val(node.args[0])
        if not isinstance(out, torch.Tensor) or not isinstance(x, torch.Tensor):
            continue
        bound = dict(zip(("dim", "start", "end", "step"), node.args[1:]), **node.kwargs)
        dim = int(bound.get("dim", 0)) % out.dim()
        size = out.shape[dim]
        if not isinstance(size, torch.SymInt) or not size.node.expr.is_Symbol \
                or not free_unbacked_symbols(size.node.expr):
            continue
        bounds = tuple(str(_expr(val(bound.get(b)), subs)) for b in ("start", "end", "step"))
        key = (str(_expr(x.shape[dim], subs)), dim) + bounds
        if key in first:
            subs[size.node.expr] = first[key]
        else:
            first[key] = size.node.expr
    graph.__dict__["_mta_equal_slice_lengths"] = subs
    return subs


def same_length(a: Any, b: Any, graph: fx.Graph | None) -> bool:
    """:func:`same_size`, or equal once the sizes that slices prove equal are identified
    (:func:`equal_slice_lengths`)."""
    if same_size(a, b):
        return True
    if graph is None or not (isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt)):
        return False
    subs = equal_slice_lengths(graph)
    if not subs:
        return False
    ea, eb = _expr(a, subs), _expr(b, subs)
    try:
        return bool((ea - eb).expand() == 0)
    except TypeError:
        return False


# A masked score: −inf, or a value at most −1e4 (what masking code writes: −inf, the dtype's
# minimum, −1e9, and −1e4, older fp16-safe code's: GPT-1, ports of GPT-2). Exact attention gives
# such a key zero weight (exp(−1e4 − m) underflows float32 for any row whose best logit m is above
# −9896), so it is a mask, not a bias.
FORBIDDING = -1e4


FILL_TARGETS = {aten.full.default: 1, aten.full_like.default: 1, aten.scalar_tensor.default: 0}


def _number(value: Any) -> int | float | None:
    """The number ``value`` stands for while matching: a number, a one-element constant, or a node
    filled with one number (``full``, ``full_like``, ``scalar_tensor``, ``zeros``); else None."""
    if isinstance(value, fx.Node) and value.op == "call_function":
        if value.target in (aten.zeros.default, aten.zeros_like.default):
            return 0
        if value.target in FILL_TARGETS:
            value = value.args[FILL_TARGETS[value.target]]
    value = _static(value)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.device.type == "meta" or isinstance(value, torch._subclasses.FakeTensor):
            return None  # a tensor whose value is not known while matching
        value = value.item()
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def is_forbidding_value(value: Any) -> bool:
    """Is ``value`` (a number, a one-element constant, or a tensor filled with one number) the
    fill value of masked-out scores?"""
    number = _number(value)
    return number is not None and number <= FORBIDDING


def _bias_to_the_op(value: Any, dtype: torch.dtype) -> bool:
    """Is ``value`` a masked score (≤ −1e4) above ``dtype``'s minimum, which the op, reading mask
    values, would take as a bias (−inf and the minimum it reads as forbidden)?"""
    number = _number(value)
    return number is not None and forbidden_threshold(dtype) < number <= FORBIDDING


# triangles of a filled tensor: a masked score above (or below) a diagonal, 0 elsewhere
TRIANGLE_TARGETS = {aten.triu.default, aten.tril.default}


def _forbidding_term(x: Any) -> tuple[fx.Node, bool] | None:
    """An additive mask built in the graph of 0s and masked scores f (≤ −1e4, see FORBIDDING) as
    a bool mask ``(cond, invert?)`` (the keys allowed: cond, or not cond; a float cond: its
    non-zero entries): ``where(c, 0, f)``, ``where(c, f, 0)``, ``zeros.masked_fill(c, f)`` and
    ``triu``/``tril`` of a tensor filled with f (the causal triangle as code writes it with −1e9 or
    −1e4). Only for an f above the mask dtype's minimum, which the op would take as a bias (no
    causality recognised, no key padding for the kernels, top-k ranking chunks the mask forbids);
    −inf and the minimum it already reads as forbidden. Adding f or masking with it gives those
    keys the same zero weight. None otherwise."""
    if not (isinstance(x, fx.Node) and x.op == "call_function"):
        return None
    dtype = dtype_of(x)
    if dtype is None or not dtype.is_floating_point:
        return None
    t = x.target
    if t in WHERE_TARGETS | {aten.where.Scalar}:
        cond, a, b = x.args[:3]
        if _number(a) == 0 and _bias_to_the_op(b, dtype):
            return cond, False
        if _bias_to_the_op(a, dtype) and _number(b) == 0:
            return cond, True
    elif t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        base, cond, value = x.args[:3]
        if _number(base) == 0 and _bias_to_the_op(value, dtype):
            return cond, True
    elif t in TRIANGLE_TARGETS:
        base = x.args[0]
        if isinstance(base, fx.Node) and base.op == "call_function" and base.target in FILL_TARGETS \
                and _bias_to_the_op(base, dtype):
            return x, True  # (allowed where the triangle left 0)
    return None


def _times_masked_score(x: Any) -> bool:
    """Is ``x`` a product y·c (or c·y) with c a number ≤ −1e4 above x's dtype's minimum? Added to
    the scores, its values ≤ −1e4 give their keys zero weight: forbidden keys, which the op would
    read as a bias (``(1.0 - attention_mask) * -10000.0``, old BERT code's key padding)."""
    if not (isinstance(x, fx.Node) and x.op == "call_function" and x.target in (aten.mul.Tensor, aten.mul.Scalar)):
        return False
    dtype = dtype_of(x)
    if dtype is None or not dtype.is_floating_point:
        return False
    return any(isinstance(c, (int, float)) and _bias_to_the_op(c, dtype) for c in x.args[:2])


def _added_forbidding_term(s: fx.Node) -> tuple[fx.Node, fx.Node, bool] | None:
    """For scores + t (either order) with t a :func:`_forbidding_term`: (the scores, cond, invert?)."""
    a, b = s.args[:2]
    for scores, term in ((a, b), (b, a)):
        if _reaches_product(scores) and not _reaches_product(term):
            found = _forbidding_term(term)
            if found is not None:
                return scores, *found
    return None


def _binary_constant(x: Any) -> bool:
    """A constant of 0s and 1s (a buffer, sliced or viewed as the scores need it; float, so the
    model multiplies the scores by it)."""
    while isinstance(x, fx.Node) and x.op == "call_function" and x.target in VIEW_TARGETS | {
            aten.slice.Tensor, aten.unsqueeze.default, aten.expand.default}:
        x = x.args[0]
    const = _constant(x) if isinstance(x, fx.Node) else None
    if const is None or not const.is_floating_point() or isinstance(const, torch._subclasses.FakeTensor) \
            or const.device.type == "meta":
        return False
    return bool(((const == 0) | (const == 1)).all())


def _multiplicative_mask(s: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(scores, b) when ``s`` is s·b + c·(1 − b) (or s·b − C·(1 − b)) with b a constant of 0s and
    1s and c a masked score (≤ −1e4): where(b, s, c), b the keys allowed. GPT-1's causal mask,
    ``w * b + -1e4 * (1 - b)``, and the ports of GPT-2 that wrote it so."""
    if s.kwargs.get("alpha", 1) != 1:
        return None
    sign = 1 if _functional(s.target) is aten.add.Tensor else -1
    pairs = [(s.args[0], s.args[1])] + ([(s.args[1], s.args[0])] if sign == 1 else [])
    for product, term in pairs:
        if not (isinstance(product, fx.Node) and product.op == "call_function"
                and _functional(product.target) is aten.mul.Tensor and live_users(product) == [s]):
            continue
        for scores, keep in (product.args[:2], product.args[1::-1]):
            if isinstance(keep, fx.Node) and _fills_where_zero(term, keep, sign) and _reaches_product(scores) \
                    and _binary_constant(keep):
                return scores, keep
    return None


def _fills_where_zero(term: Any, keep: fx.Node, sign: int) -> bool:
    """Is ``term`` (added with ``sign``) c·(1 − keep), c a masked score?"""
    if not (isinstance(term, fx.Node) and term.op == "call_function" and term.target is aten.mul.Tensor):
        return False
    return any(isinstance(fill, (int, float)) and isinstance(rest, fx.Node) and rest.op == "call_function"
               and rest.target is aten.rsub.Scalar and rest.args[0] is keep and rest.args[1] == 1
               and rest.kwargs.get("alpha", 1) == 1 and is_forbidding_value(sign * fill)
               for rest, fill in (term.args[:2], term.args[1::-1]))


def _scalarish(x: Any) -> bool:
    """A scale factor the op can absorb: a number, or a tensor broadcast over keys (last dim 1)."""
    if isinstance(x, (int, float)):
        return True
    s = shape_of(x)
    return s is not None and (len(s) == 0 or _static(s[-1]) == 1)


# ---- the matcher ----------------------------------------------------------------------------

def find_matches(graph: fx.Graph) -> list[AttentionMatch]:
    """Every attention candidate in graph order, rewritable or with its reason."""
    matches = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in SDPA_TARGETS:
            matches.append(_match_sdpa(node))
        elif node.target in SOFTMAX_TARGETS:
            matches.append(_match_softmax(node))
        elif node.target is FLEX_ATTENTION:
            matches.append(_match_flex(node))
    order = {n: i for i, n in enumerate(graph.nodes)}
    sources = _input_sources(graph)
    for m in matches:
        if m.rewritable:
            _check_one_sequence(m, sources)
        if m.rewritable:
            _check_masks_do_not_read_qk(m, order)
    return matches


def _input_sources(graph: fx.Graph) -> dict[fx.Node, frozenset]:
    """For every node, the graph inputs (placeholders: the model's own inputs, parameters being
    attributes) its value is computed from, through any op."""
    sources: dict[fx.Node, frozenset] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            sources[node] = frozenset([node.name])
        else:
            sources[node] = frozenset().union(*(sources.get(a, frozenset()) for a in node.all_input_nodes))
    return sources


def _check_one_sequence(m: AttentionMatch, sources: dict) -> None:
    """Self-attention reads q and k off one sequence: both computed from the same model inputs. A
    decoder's cross-attention reads k off the encoder's output (not computed from the decoder's
    input ids) while q is: it is cross-attention even when both lengths happen to be equal, which
    the shapes alone cannot tell when the capture is static. Inputs named as masks do not count:
    they gate a sequence, they are not one (Inkling's keys pass a short convolution that zeroes
    padded tokens first, so its first layer's k reads ``attention_mask`` and its q does not)."""
    k = m.k if m.k is not None else m.k_transposed
    if not isinstance(m.q, fx.Node) or not isinstance(k, fx.Node):
        return
    q_from, k_from = sources.get(m.q, frozenset()), sources.get(k, frozenset())
    if any("mask" not in name.lower() for name in q_from ^ k_from):
        m.reason = (f"cross-attention: q and k are computed from different model inputs (q: {', '.join(sorted(q_from))}; "
                    f"k: {', '.join(sorted(k_from)) or 'none'}) (MTA is self-attention)")


def _check_masks_do_not_read_qk(m: AttentionMatch, order: dict) -> None:
    """A term added to the scores that is computed from the layer's own q or k (DeBERTa's
    relative-position c2p/p2c scores) is part of the score function, not a mask: the op would
    treat it as a constant (no gradient to q or k) and could summarise nothing. Such a site stays
    exact, with the reason. q and k here include what they are made of just before the product
    (:func:`_made_of`: Funnel's position scores read q, its content scores q + a learned bias).
    Only nodes after the earliest of those are searched."""
    targets = set()
    for x in (m.q, m.k, m.k_transposed):
        if isinstance(x, fx.Node):
            targets |= _made_of(x)
    if not targets:
        return
    floor = min(order[t] for t in targets)
    for term in [x for x, _ in m.additive] + [c for c, _ in m.allowed]:
        stack, seen = [term], set()
        while stack:
            n = stack.pop()
            if not isinstance(n, fx.Node) or n in seen or order.get(n, -1) < floor:
                continue
            if n in targets:
                m.reason = (f"a term added to the scores ({term.name}) is computed from the layer's q or k "
                            "(relative-position scores, e.g. DeBERTa's c2p/p2c): not a mask, left exact")
                return
            seen.add(n)
            if n.op != "call_function" or n.target in SHAPE_ONLY:  # (a mask built to q's size is a mask)
                continue
            if n.target in LIKE_SECOND:  # (mask.type_as(q): q's dtype only)
                stack.append(n.args[0])
            else:
                stack.extend(n.all_input_nodes)


# Ops that give a tensor's own values in another shape, order or dtype.
REARRANGE_TARGETS = VIEW_TARGETS | CAST_TARGETS | {
    aten.transpose.int, aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default,
}
AFFINE_TARGETS = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar}


def _made_of(x: fx.Node, depth: int = 8) -> set[fx.Node]:
    """``x`` and the tensors it is made of by rearranging its values (views, transposes, casts) or by
    combining them with constants (a learned bias or scale: parameters, numbers), walked back
    ``depth`` steps: the q of a score product ``(q + bias) @ kᵀ`` is made of q."""
    out = {x}
    while depth > 0 and x.op == "call_function":
        t = _functional(x.target)
        if t in REARRANGE_TARGETS:
            x = x.args[0]
        elif t in AFFINE_TARGETS:
            live = [a for a in x.args[:2] if isinstance(a, fx.Node) and not _from_constants(a)]
            if len(live) != 1:
                break
            x = live[0]
        else:
            break
        if not isinstance(x, fx.Node):
            break
        out.add(x)
        depth -= 1
    return out


def _from_constants(node: fx.Node, depth: int = 6) -> bool:
    """A value computed from parameters, buffers and constants alone (no model input)."""
    if node.op == "get_attr":
        return True
    if node.op != "call_function" or depth == 0:
        return False
    return all(_from_constants(a, depth - 1) for a in node.all_input_nodes)


# Ops that read only their input's shape, dtype or device, never its values.
SHAPE_ONLY = {
    aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default,
    aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default,
    aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default,
}
# Ops whose second operand gives only a dtype or a shape.
LIKE_SECOND = {aten.type_as.default, aten.expand_as.default, aten.view_as.default, aten.reshape_as.default, aten.to.other}


def _check_self_attention(m: AttentionMatch, q_shape, k_shape) -> None:
    if q_shape is None or k_shape is None:
        raise NoMatch("shapes of q and k are unknown")
    if not same_length(q_shape[-2], k_shape[-2], m.anchor.graph if m.anchor is not None else None):
        # (another sequence's keys, or keys beside the sequence's own: nn.MultiheadAttention's add_bias_kv /
        # add_zero_attn, memory tokens; a static capture's lengths cannot tell them apart)
        raise NoMatch(f"cross-attention or added keys: {q_shape[-2]} queries attend to {k_shape[-2]} keys (MTA is "
                      "self-attention over one sequence's own keys)")
    if not same_size(q_shape[-1], k_shape[-1]):
        raise NoMatch(f"q and k head sizes differ ({q_shape[-1]} vs {k_shape[-1]})")


def _match_sdpa(node: fx.Node) -> AttentionMatch:
    m = AttentionMatch(anchor=node, output=node, kind="sdpa")
    try:
        a = bound_args(node)
        m.q, m.k, m.v = a["query"], a["key"], a["value"]
        qs, ks, vs = shape_of(m.q), shape_of(m.k), shape_of(m.v)
        _check_self_attention(m, qs, ks)
        # (compared size by size, never as tuples: == on data-dependent sizes asks torch to decide them.
        # Their lengths are not compared: SDPA itself needs them equal at every run, whatever the capture proves.)
        if len(ks) != len(vs) or not all(same_size(a, b) for i, (a, b) in enumerate(zip(ks, vs)) if i != len(ks) - 2):
            raise NoMatch(f"k and v shapes differ ({ks} vs {vs})")
        if len(qs) not in (3, 4) or len(ks) != len(qs):
            raise NoMatch(f"SDPA on {len(qs)}-D tensors (the op takes 3-D or 4-D)")
        m.three_d = len(qs) == 3
        dropout = _static(a.get("dropout_p", 0.0))
        if dropout not in (0, 0.0, None):
            raise NoMatch(f"attention dropout p={dropout} (training mode): put the model in eval()")
        m.causal = bool(_static(a.get("is_causal", False)))
        mask = a.get("attn_mask")
        if mask is not None and dtype_of(mask) == torch.bool:
            m.allowed.append((mask, False))
        elif mask is not None:
            m.additive.append((mask, 1.0))
        scale = a.get("scale")
        if scale is None:
            m.sdpa_scale_default = True
        else:
            m.scale = float(_static(scale))
        if not m.three_d and _static(ks[1]) != _static(qs[1]) and not a.get("enable_gqa", False) \
                and _static(ks[1]) != 1:  # (one k/v head broadcast over the query heads: multi-query, e.g. Falcon)
            raise NoMatch("k/v heads differ from q heads without enable_gqa (and do not broadcast)")
        m.chain = [node]
    except NoMatch as exc:
        m.reason = str(exc)
    return m


def _match_flex(node: fx.Node) -> AttentionMatch:
    """FlexAttention (``flex_attention``, transformers' ``attn_implementation="flex_attention"``):
    found and reported, not rewritten. Its masking and score changes are programs (``mask_mod``,
    ``score_mod``) over index tensors, not masks in the graph that the op could take."""
    q, k, v = node.args[:3]
    return AttentionMatch(anchor=node, output=node, kind="flex", q=q, k=k, v=v, reason=(
        "FlexAttention: its mask and score_mod are programs over positions, which the op cannot take; the "
        "same attention through scaled_dot_product_attention (transformers: attn_implementation=\"sdpa\" "
        "or \"eager\") is rewritten"))


def _match_softmax(node: fx.Node) -> AttentionMatch:
    m = AttentionMatch(anchor=node, kind="manual")
    try:
        x = node.args[0]
        dim = _static(node.args[1])
        xs = shape_of(x)
        if xs is None or dim not in (-1, len(xs) - 1):
            m.kind = "softmax"
            raise NoMatch(f"softmax over dim {dim}, not the last one: not attention")
        chain = [node]
        # forwards: P → (casts, eval dropout, a view from [B, H, n, n] to [B·H, n, n]) → P @ v
        p = node
        forward_view = drop_last = None
        # nodes of the site that read the scores for their dtype or shape only, not their values:
        # a cast back after softmax by ``type_as(scores)`` (XLM, fairseq), a mask's
        # ``expand_as(scores)`` (:func:`_unexpanded`)
        meta_reads: set[fx.Node] = set()
        while True:
            users = live_users(p)
            if len(users) != 1:
                if not _reaches_product(x):  # (a mixture of experts' router: softmax, then top-k and a gather)
                    m.kind = "softmax"
                    raise NoMatch(f"softmax output used {len(users)} times, its input not a product of q and kᵀ: "
                                  "not attention")
                raise NoMatch(f"the attention probabilities ({p.name}) are used {len(users)} times: leaving it exact")
            u = users[0]
            if u.op == "call_function" and u.target in CAST_TARGETS:
                if u.target in LIKE_SECOND:
                    meta_reads.add(u)
                p = u
            elif u.op == "call_function" and u.target in (aten.dropout.default, aten.native_dropout.default):
                a = bound_args(u)
                if a.get("train") and _static(a.get("p")) not in (0, 0.0):
                    raise NoMatch("dropout on the attention probabilities in training mode: put the model in eval()")
                if u.target is aten.native_dropout.default:
                    raise NoMatch("native_dropout on the probabilities (training graph)")
                p = u
            elif u.op == "call_function" and u.target in VIEW_TARGETS and forward_view is None and _folds_heads(p, u):
                forward_view = u
                p = u
            elif u.op == "call_function" and u.target in (aten.matmul.default, aten.bmm.default):
                if u.args[0] is not p:
                    raise NoMatch("the probabilities are the right operand of the product with v")
                m.v, m.output = u.args[1], u
                break
            elif u.op == "call_function" and u.target is aten.einsum.default:
                _einsum_pv(m, u, p)
                break
            elif drop_last is None and _drops_last_column(u, p):  # GPT-OSS drops its sink column
                drop_last = p = u
            else:
                m.kind = "softmax"
                raise NoMatch(f"softmax output feeds {getattr(u.target, '__name__', u.target)}, not a product with v")
            chain.append(p)
        # backwards: scores ← modifiers ← q·kᵀ
        factor = 1.0
        s = x
        row_max = None  # the max node of an x − max(x) shift: x's one other reader
        # (older BART-style code: 3-D scores viewed as [B, H, n, n] to add the mask, viewed back to
        # [B·H, n, n] before a 3-D softmax: the view back, met first walking down, and the masks
        # met above it, in the [B·H, ..] frame)
        back_view, inner_above = None, (0, 0)
        masks_above_cap = None  # (additive, bool) masks met before a tanh soft-cap: those after it are inside
        # Granite-SWA's learned sinks: a logsumexp of the scores softmax reads, as they are (casts
        # aside), scales the output by sigmoid(lse − sink) (:func:`_sink_scale`)
        lse = _scores_logsumexp(x)
        while True:
            if s.op != "call_function":
                m.kind = "softmax"
                raise NoMatch("softmax input is not a product of q and kᵀ")
            if len([u for u in live_users(s) if u is not row_max and u is not lse and u not in meta_reads]) != 1:
                raise NoMatch(f"the attention scores ({s.name}) are used elsewhere: leaving it exact")
            chain.append(s)
            t = _functional(s.target)
            if t in CAST_TARGETS:
                s = s.args[0]
            elif t in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
                a, b = s.args[0], s.args[1]
                divide = t in (aten.div.Tensor, aten.div.Scalar)
                if _reaches_product(a) and _scalarish(b):
                    chain_side, f = a, b
                elif not divide and _reaches_product(b) and _scalarish(a):
                    chain_side, f = b, a
                else:
                    raise NoMatch(_unsupported(s, "not a scale by a number or a per-head tensor"))
                if isinstance(f, (int, float)):
                    if f == 0 or (f < 0):
                        raise NoMatch(f"score scale {f} is not positive")
                    factor *= (1.0 / f) if divide else f
                else:
                    m.scale_nodes.append((f, divide))
                s = chain_side
            elif t is aten.tanh.default and masks_above_cap is None:
                # a soft-cap, a·tanh(b·s): the numbers met so far (applied after tanh) are a, the
                # cap; those below multiply b, and the op's scale is their product a·b
                if m.scale_nodes:
                    raise NoMatch("a soft-cap scaled by a tensor after its tanh: not representable (the op's cap is "
                                  "a number)")
                if m.sink_logits is not None or drop_last is not None:
                    raise NoMatch("learned sink logits with a tanh soft-cap: left exact")
                m.softcap = factor
                masks_above_cap = (len(m.additive), len(m.allowed))
                s = s.args[0]
            elif t is aten.sub.Tensor and _row_max_of(s.args[1], s.args[0]):
                # x − max(x) along the rows: softmax is unchanged by it (a guard against overflow)
                if masks_above_cap is not None:
                    raise NoMatch("a row-maximum shift inside a tanh soft-cap changes the logits: left exact")
                row_max = s.args[1].args[0] if s.args[1].target is operator.getitem else s.args[1]
                s = s.args[0]
            elif t is aten.cat.default and drop_last is not None and m.sink_logits is None and _appends_column(s):
                m.sink_logits = s.args[0][1]  # [scores, sink logits]: GPT-OSS's learned sinks
                s = s.args[0][0]
            elif t in (aten.add.Tensor, aten.sub.Tensor) and (masked := _multiplicative_mask(s)) is not None:
                s, keep = masked  # s·b + c·(1 − b), b of 0s and 1s: where(b, s, c)
                m.allowed.append((keep, False))
            elif t is aten.add.Tensor and s.kwargs.get("alpha", 1) == 1 and factor > 0 and not m.scale_nodes \
                    and (forbidding := _added_forbidding_term(s)) is not None:
                # 0s and masked scores added: a bool mask (where(c, 0, −1e9), triu(full(−1e9), 1), …)
                s, cond, invert = forbidding
                m.allowed.append((cond, invert))
            elif t in (aten.add.Tensor, aten.sub.Tensor):
                a, b = s.args[0], s.args[1]
                alpha = s.kwargs.get("alpha", 1)
                if _reaches_product(a) and not _reaches_product(b):
                    mask, sign, s = _unexpanded(b, a, meta_reads), (alpha if t is aten.add.Tensor else -alpha), a
                elif t is aten.add.Tensor and _reaches_product(b) and not _reaches_product(a):
                    mask, sign, s = _unexpanded(a, b, meta_reads), 1, b
                else:
                    raise NoMatch(_unsupported(s, "not an additive mask"))
                m.additive.append((mask, factor * sign))
                if sign > 0 and factor > 0 and not m.scale_nodes and _times_masked_score(mask):
                    m.masked_scores.append(mask)
            elif t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
                scores, cond, value = s.args[:3]
                if not is_forbidding_value(value):
                    raise NoMatch(f"masked_fill with {_static(value)} (not −inf or ≤ −1e4): not representable as a mask")
                m.allowed.append((_unexpanded(cond, scores, meta_reads), True))
                s = scores
            elif t in WHERE_TARGETS:
                cond, a, b = s.args[:3]
                if _reaches_product(a) and is_forbidding_value(b):
                    m.allowed.append((_unexpanded(cond, a, meta_reads), False))
                    s = a
                elif _reaches_product(b) and is_forbidding_value(a):
                    m.allowed.append((_unexpanded(cond, b, meta_reads), True))
                    s = b
                else:
                    raise NoMatch(f"where({s.name}) does not mask scores with −inf or ≤ −1e4")
            elif t in VIEW_TARGETS and forward_view is None and back_view is None and m.frame is None \
                    and _folds_heads(s.args[0], s):
                back_view, inner_above = s, (len(m.additive), len(m.allowed))
                s = s.args[0]
            elif t in VIEW_TARGETS and ((forward_view or back_view) is not None or len(shape_of(m.output) or ()) == 4) \
                    and m.frame is None and _folds_heads(s, s.args[0]):
                # (GPT-NeoX-Japanese: a 3-D q·kᵀ viewed as [B, H, n, n], softmax and the product with
                # a 4-D v in that frame: the 3-D operands are viewed into it, the rest is there)
                m.frame = _heads_of(s)
                inner_from = (len(m.additive), len(m.allowed))
                s = s.args[0]
            elif t in MATMUL_TARGETS:
                _product(m, s, factor)
                break
            else:
                name = getattr(t, "__name__", str(t))
                if any(_reaches_product(a, depth=6) for a in s.args if isinstance(a, fx.Node)):
                    raise NoMatch(f"unsupported score modifier {name} ({s.name}): left exact")
                m.kind = "softmax"
                raise NoMatch(f"softmax input comes from {name}, not from q·kᵀ: not attention")
        if lse is not None:
            _sink_scale(m, lse, chain)
        m.chain = chain
        if masks_above_cap is not None and masks_above_cap != (len(m.additive), len(m.allowed)):
            raise NoMatch("a mask inside the tanh of a soft-cap (tanh(s + mask)): not a mask the op can take, "
                          "left exact")
        if drop_last is not None and m.sink_logits is None:
            m.kind = "softmax"
            raise NoMatch(f"softmax output feeds {drop_last.target.__name__}, not a product with v")
        if (forward_view or back_view) is not None and m.frame is None and not m.three_d:
            # the mirror of GPT-NeoX-Japanese's form: a 4-D q·kᵀ whose scores are viewed as
            # [B·H, n, n] (after softmax, or before it with masks in that frame) for a 3-D product
            # with v: bmm style in the scores' [B, H] frame (q and k as they are, v and the output
            # viewed between [B·H, n, d] and [B, H, n, d] as the frame's 3-D operands are)
            m.frame, m.three_d = _heads_of_scores(forward_view or back_view), True
            inner_from = (len(m.additive), len(m.allowed))
        if ((forward_view or back_view) is not None and m.frame is None) or (m.frame is not None and not m.three_d):
            raise NoMatch("the scores are viewed between [B·H, n, n] and [B, H, n, n] on one side of softmax only")
        if m.frame is not None:
            m.inner_masks = [mask for mask, _ in m.additive[inner_from[0]:] + m.additive[:inner_above[0]]] + \
                [c for c, _ in m.allowed[inner_from[1]:] + m.allowed[:inner_above[1]]]
        qs, ks = operand_shape(m.q, m.q_perm), shape_of(m.k if m.k is not None else m.k_transposed)
        if m.k is None and ks is not None:
            ks = ks[:-2] + (ks[-1], ks[-2])
        ks = operand_shape(ks, m.k_perm)
        _check_self_attention(m, qs, ks)
        vs = operand_shape(m.v, m.v_perm)
        if vs is None or not same_size(vs[-1], ks[-1]) or \
                (len(vs) != len(ks) and (m.frame is None or {len(vs), len(ks)} != {3, 4})):
            raise NoMatch(f"v {vs} does not match k {ks} (MTA needs k and v of one shape)")
        if not m.three_d and not same_size(vs[-3], ks[-3]):
            raise NoMatch(f"k and v have different head counts ({ks[-3]} vs {vs[-3]})")
        if m.sink_logits is not None and (m.three_d or m.frame is not None):
            raise NoMatch("learned sink logits on 3-D (bmm) scores: left exact")
    except NoMatch as exc:
        m.reason = str(exc)
        if m.kind == "manual" and m.q is None and m.v is not None:
            _read_operands_below(m, node.args[0])
    return m


def _unexpanded(mask, scores, meta_reads: set):
    """A mask broadcast to the scores' shape by ``expand_as(mask, scores)`` (XLM's padding mask) is
    the mask itself, which the op broadcasts: the expand_as, noted in ``meta_reads``, reads only
    the scores' shape, and goes with the site."""
    if isinstance(mask, fx.Node) and mask.op == "call_function" and mask.target is aten.expand_as.default \
            and mask.args[1] is scores:
        meta_reads.add(mask)
        return mask.args[0]
    return mask


def _scores_logsumexp(x: fx.Node) -> fx.Node | None:
    """A ``logsumexp`` over the last dimension of the scores softmax reads (``x``, or what ``x`` is
    a cast of), or None."""
    while isinstance(x, fx.Node):
        for u in live_users(x):
            if u.op == "call_function" and u.target is aten.logsumexp.default and u.args[0] is x \
                    and len(u.args[1]) == 1 and _last_dim(x, u.args[1][0]) \
                    and not (u.args[2] if len(u.args) > 2 else u.kwargs.get("keepdim", False)):
                return u
        if x.op != "call_function" or _functional(x.target) not in CAST_TARGETS:
            return None
        x = x.args[0]
    return None


def _sink_scale(m: AttentionMatch, lse: fx.Node, chain: list) -> None:
    """Learned sink logits written as a scale of the output (Granite-SWA's eager attention):
    ``softmax(s) @ v * sigmoid(logsumexp(s) − sink)[..., None]``. With Z = Σ exp(s), that factor is
    Z / (Z + exp(sink)): the same attention as GPT-OSS's extra column of logits with a value of 0.
    The site's output becomes the scaled product, and ``m.sink_logits`` the sink term (a value
    from parameters and constants, [1|B, H, 1|n]: one dimension short of a column, which
    ``passes.lower.sink_logit_operands`` takes too)."""
    def through(node: fx.Node, targets) -> fx.Node:  # along a run of single users in ``targets``
        while len(users := live_users(node)) == 1 and users[0].op == "call_function" \
                and _functional(users[0].target) in targets:
            node = users[0]
            chain.append(node)
        return node

    def single_user(node: fx.Node, target) -> fx.Node:
        users = live_users(node)
        if len(users) != 1 or users[0].op != "call_function" or _functional(users[0].target) is not target:
            raise NoMatch("a logsumexp of the attention scores beside softmax, not a sink scale of its output: "
                          "left exact")
        chain.append(users[0])
        return users[0]

    if m.output is None or m.output.target is aten.einsum.default or m.three_d or m.frame is not None \
            or m.sink_logits is not None or m.softcap:
        raise NoMatch("a logsumexp of the attention scores beside softmax with 3-D or einsum products, other sink "
                      "logits or a soft-cap: left exact")
    chain.append(lse)
    lse_out = through(lse, CAST_TARGETS)
    sub = single_user(lse_out, aten.sub.Tensor)
    sink = sub.args[1]
    if sub.args[0] is not lse_out or not isinstance(sink, fx.Node) or not _from_constants(sink) \
            or len(shape_of(sink) or ()) != len(shape_of(m.output)) - 1:
        raise NoMatch("a logsumexp of the attention scores less something that is not a learned per-head logit: "
                      "left exact")
    factor = through(single_user(through(sub, CAST_TARGETS), aten.sigmoid.default),
                     CAST_TARGETS | {aten.unsqueeze.default})
    scaled = single_user(factor, aten.mul.Tensor)
    if set(scaled.args[:2]) != {m.output, factor} or len(live_users(m.output)) != 1 \
            or len(shape_of(factor) or ()) != len(shape_of(m.output)) or _static(shape_of(factor)[-1]) != 1:
        raise NoMatch("a sigmoid of a logsumexp of the attention scores that does not scale their product with v "
                      "per query: left exact")
    chain.append(m.output)
    m.output, m.sink_logits = scaled, sink


def _read_operands_below(m: AttentionMatch, scores: fx.Node) -> None:
    """For the report of a site left exact because a score modifier stands between its q·kᵀ and
    softmax (Gemma-2's tanh soft-cap): q and k read off the product below the scores, so that
    ``find_attention`` gives its shapes; the masks above the modifier were not read."""
    product = next((n for n in _below(scores) if _functional(n.target) in MATMUL_TARGETS), None)
    if product is None:
        return
    read = AttentionMatch(anchor=m.anchor)
    try:
        _product(read, product, 1.0)
    except NoMatch:
        return
    m.q, m.k, m.k_transposed, m.q_perm, m.k_perm = read.q, read.k, read.k_transposed, read.q_perm, read.k_perm
    m.additive, m.allowed, m.masks_read = [], [], False


def _below(node: fx.Node, most: int = 8):
    """The op nodes ``node`` is computed from, itself first, depth first up to ``most`` steps; a
    product (MATMUL_TARGETS) is given but not gone below (q and kᵀ are not score modifiers)."""
    stack, seen = [(node, 0)], set()
    while stack:
        n, depth = stack.pop()
        if not isinstance(n, fx.Node) or n in seen or depth > most or n.op != "call_function":
            continue
        seen.add(n)
        yield n
        if _functional(n.target) not in MATMUL_TARGETS:
            stack.extend((a, depth + 1) for a in n.args if isinstance(a, fx.Node))


def _last_dim(x: Any, dim: Any) -> bool:
    shape = shape_of(x)
    return shape is not None and _static(dim) in (-1, len(shape) - 1)


def _drops_last_column(u: fx.Node, p: fx.Node) -> bool:
    """``p[..., :-1]``: a slice of the probabilities' last dimension that drops its last column."""
    if u.op != "call_function" or u.target is not aten.slice.Tensor or u.args[0] is not p:
        return False
    a = bound_args(u)
    if not _last_dim(p, a["dim"]) or _static(a["start"]) not in (None, 0) or _static(a["step"]) != 1:
        return False
    end, width = _static(a["end"]), shape_of(p)[-1]
    return end == -1 or (isinstance(end, int) and isinstance(_static(width), int) and end == _static(width) - 1) \
        or (end is not None and not isinstance(end, int) and str(end) == str(width - 1))


def _row_max_of(b: Any, a: Any) -> bool:
    """Is ``b`` the maximum of ``a`` along its last dimension, kept as a column (``a.max(-1,
    keepdim=True).values`` or ``amax``)?"""
    if not isinstance(b, fx.Node) or b.op != "call_function":
        return False
    if b.target is operator.getitem and b.args[1] == 0:
        src = b.args[0]
        return isinstance(src, fx.Node) and src.target is aten.max.dim and src.args[0] is a \
            and _last_dim(a, src.args[1]) and bool(src.args[2] if len(src.args) > 2 else src.kwargs.get("keepdim"))
    if b.target is aten.amax.default and b.args[0] is a:
        dims = b.args[1] if len(b.args) > 1 else b.kwargs.get("dim")
        keep = b.args[2] if len(b.args) > 2 else b.kwargs.get("keepdim", False)
        return isinstance(dims, (list, tuple)) and len(dims) == 1 and _last_dim(a, dims[0]) and bool(keep)
    return False


def _appends_column(s: fx.Node) -> bool:
    """``cat([scores, column], dim=-1)``: one column joined to the scores, not computed from them."""
    parts = s.args[0]
    dim = s.args[1] if len(s.args) > 1 else s.kwargs.get("dim", 0)
    if len(parts) != 2 or not _last_dim(parts[0], dim) or not _reaches_product(parts[0]) or _reaches_product(parts[1]):
        return False
    column = shape_of(parts[1])
    return column is not None and _static(column[-1]) == 1


def _folds_heads(four_d: fx.Node, three_d: fx.Node) -> bool:
    """Are these the same [B, H, n, n] and [B·H, n, n] scores (a 4-D and a 3-D value with the same
    last two dimensions; one is a view of the other)?"""
    a, b = shape_of(four_d), shape_of(three_d)
    if a is None or b is None or (len(a), len(b)) != (4, 3):
        return False
    return same_size(a[-1], b[-1]) and same_size(a[-2], b[-2])


def _heads_of_scores(view: fx.Node) -> tuple:
    """(−1, H) of [B, H, n, n] scores that ``view`` takes to [B·H, n, n]: H from their shape, which
    must be a number (the head count; the batch is left to the view)."""
    heads = _static(shape_of(view.args[0])[1])
    if not isinstance(heads, int):
        raise NoMatch(f"scores viewed from [B, H, n, n] to [B·H, n, n] with a head count that is not a number ({heads})")
    return (-1, heads)


def _heads_of(view: fx.Node) -> tuple:
    """(B, H) of a view of [B·H, n, n] scores as [B, H, n, n]: its first two target sizes (ints
    or the graph's size nodes; one of them may be −1, as the view had it)."""
    sizes = view.args[1]
    if not isinstance(sizes, (list, tuple)) or len(sizes) != 4 or \
            sum(isinstance(x, int) and x < 0 for x in sizes[:2]) > 1:
        raise NoMatch(f"scores viewed as {sizes}: batch and heads not given")
    return tuple(sizes[:2])


MODIFIER_TARGETS = CAST_TARGETS | {
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.add.Tensor, aten.sub.Tensor,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.tanh.default, *WHERE_TARGETS,
}


def _unsupported(node: fx.Node, what: str) -> str:
    """Name the op that stands between the scores and softmax (e.g. a tanh soft-cap)."""
    for n in _below(node):
        if _functional(n.target) not in MODIFIER_TARGETS | MATMUL_TARGETS and any(
                _reaches_product(a, 6) for a in n.args if isinstance(a, fx.Node)):
            return f"unsupported score modifier {getattr(n.target, '__name__', n.target)} ({n.name}): left exact"
    return f"unsupported score modifier {node.name}: {what}"


def _reaches_product(node: Any, depth: int = 12) -> bool:
    """Does ``node`` come from a q·kᵀ product through score modifiers only?"""
    while isinstance(node, fx.Node) and depth > 0 and node.op == "call_function":
        t = _functional(node.target)
        if t in MATMUL_TARGETS:
            return True
        if t in CAST_TARGETS or t in VIEW_TARGETS or t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor,
                                                             aten.tanh.default):
            node = node.args[0]
        elif t in (aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar, aten.add.Tensor, aten.sub.Tensor):
            return _reaches_product(node.args[0], depth - 1) or (
                isinstance(node.args[1], fx.Node) and _reaches_product(node.args[1], depth - 1))
        elif t in WHERE_TARGETS:
            return _reaches_product(node.args[1], depth - 1) or _reaches_product(node.args[2], depth - 1)
        else:
            return False
        depth -= 1
    return False


def _product(m: AttentionMatch, s: fx.Node, factor: float) -> None:
    """Read q and kᵀ off the score product (matmul, bmm, baddbmm or einsum)."""
    t = s.target
    if t is aten.einsum.default:
        _einsum_qk(m, s)
    else:
        if t is aten.baddbmm.default:
            a = bound_args(s)
            beta, alpha = _static(a["beta"]), _static(a["alpha"])
            if not isinstance(alpha, (int, float)) or not isinstance(beta, (int, float)) or alpha <= 0:
                raise NoMatch("baddbmm with non-constant alpha/beta")
            if beta != 0:
                m.additive.append((a["self"], factor * beta))
            factor *= alpha
            qa, kb = a["batch1"], a["batch2"]
        else:
            qa, kb = s.args[0], s.args[1]
        qs, kbs = shape_of(qa), shape_of(kb)
        if qs is None or kbs is None:
            raise NoMatch("unknown operand shapes of the score product")
        if len(qs) not in (3, 4) or len(kbs) != len(qs):
            raise NoMatch(f"score product of {len(qs)}-D and {len(kbs)}-D tensors")
        m.q = qa
        m.three_d = len(qs) == 3
        kt = _untranspose(kb)
        if kt is not None:
            m.k = kt
        else:
            m.k_transposed = kb
    m.scale *= factor


def _untranspose(kb: fx.Node) -> fx.Node | None:
    """If kb is a transpose of the last two dims of some k, return that k."""
    if isinstance(kb, fx.Node) and kb.op == "call_function" and kb.target is aten.transpose.int:
        x, d0, d1 = kb.args
        nd = len(shape_of(x) or ())
        if nd and {d0 % nd, d1 % nd} == {nd - 2, nd - 1}:
            return x
    if isinstance(kb, fx.Node) and kb.op == "call_function" and kb.target is aten.permute.default:
        x, perm = kb.args
        nd = len(perm)
        if list(perm) == list(range(nd - 2)) + [nd - 1, nd - 2]:
            return x
    return None


def _parse_einsum(eq: str) -> tuple[list[str], str]:
    eq = eq.replace(" ", "")
    if "->" not in eq or "." in eq:
        raise NoMatch(f"einsum '{eq}' without an explicit output or with ellipsis")
    lhs, out = eq.split("->")
    return lhs.split(","), out


def _order(letters: str, want: str) -> tuple[int, ...] | None:
    """The permutation taking an einsum operand indexed ``letters`` to the order ``want`` (None
    when it is that order already)."""
    perm = tuple(letters.index(c) for c in want)
    return None if perm == tuple(range(len(perm))) else perm


def _distinct(*terms: str) -> bool:
    return all(len(set(t)) == len(t) for t in terms)


def _einsum_qk(m: AttentionMatch, s: fx.Node) -> None:
    """q and k of ``einsum(eq, q, k)`` whose output is the scores [batch.., i, j]: q indexed by the
    batch letters, i and one contracted letter, k by the batch letters, j and that letter, in any
    order (the op gets them permuted to [batch.., n, d])."""
    eq, operands = s.args[0], s.args[1]
    ins, out = _parse_einsum(eq)
    if len(ins) != 2 or len(out) not in (3, 4):
        raise NoMatch(f"einsum '{eq}' is not a q·kᵀ product")
    a, b = ins
    qi, ki = out[-2], out[-1]
    contracted = [c for c in a if c in b and c not in out]
    if len(contracted) != 1 or qi not in a or ki not in b or qi in b or ki in a:
        raise NoMatch(f"einsum '{eq}' is not a q·kᵀ product")
    batch, c = out[:-2], contracted[0]
    if not _distinct(a, b, out) or sorted(a) != sorted(batch + qi + c) or sorted(b) != sorted(batch + ki + c):
        raise NoMatch(f"einsum '{eq}': q and k are not indexed by the scores' batch letters, a token and one "
                      "contracted letter each")
    m.q, m.k = operands
    m.q_perm, m.k_perm = _order(a, batch + qi + c), _order(b, batch + ki + c)
    m.three_d = len(out) == 3


def _einsum_pv(m: AttentionMatch, u: fx.Node, p: fx.Node) -> None:
    """v and the output of ``einsum(eq, p, v)``: p indexed [batch.., i, j] as the scores are, v
    by the batch letters, j and a feature letter, the output by the batch letters, i and that
    letter, in any order (the op's output is permuted to the einsum's)."""
    eq, operands = u.args[0], u.args[1]
    ins, out = _parse_einsum(eq)
    if len(ins) != 2 or operands[0] is not p:
        raise NoMatch(f"einsum '{eq}' is not a probabilities·v product")
    a, b = ins
    batch, qi, ki = a[:-2], a[-2:-1], a[-1:]
    features = [c for c in b if c not in a]
    if (len(a) != len(out) or len(features) != 1 or not _distinct(a, b, out)
            or sorted(b) != sorted(batch + ki + features[0]) or sorted(out) != sorted(batch + qi + features[0])):
        raise NoMatch(f"einsum '{eq}': not probabilities [batch.., n, n] times v indexed by the batch letters, a "
                      "token and a feature letter")
    canonical = batch + qi + features[0]  # the op's output order
    m.v, m.output = operands[1], u
    m.v_perm, m.out_perm = _order(b, batch + ki + features[0]), _order(canonical, out)


def _whole_slice(node: Any) -> bool:
    """``x[:, :, ...]`` in the graph: aten.slice over a whole dimension (start 0, no end, step 1),
    a no-op that indexing with None between full slices leaves (transformers' repeat_kv,
    ``x[:, :, None, :, :]``)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is aten.slice.Tensor):
        return False
    args = list(node.args) + [None] * (5 - len(node.args))
    start, end, step = args[2], args[3], args[4] if args[4] is not None else 1
    return start in (None, 0) and (end is None or (isinstance(end, int) and end >= 2**62)) and step == 1


def _through_whole_slices(node: Any) -> Any:
    while _whole_slice(node):
        node = node.args[0]
    return node


def strip_repeat_kv(node: fx.Node) -> tuple[fx.Node, int]:
    """If ``node`` repeats k/v heads (GQA's repeat_kv: unsqueeze-expand-reshape, or
    repeat_interleave on dim 1), return the unrepeated tensor and the repeat count. Whole-dimension
    slices around the unsqueeze (``x[:, :, None, :, :]``) are seen through."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return node, 1
    if node.target in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        src = node.args[0]
        if src.op == "call_function" and src.target is aten.expand.default:
            base = _through_whole_slices(src.args[0])
            if base.op == "call_function" and base.target is aten.unsqueeze.default and base.args[1] == 2:
                x = _through_whole_slices(base.args[0])
                xs, es, os_ = shape_of(x), shape_of(src), shape_of(node)
                if xs and es and os_ and len(xs) == 4 and len(es) == 5 and len(os_) == 4:
                    g = _static(es[2])
                    if isinstance(g, int) and g >= 1 and same_size(os_[2], xs[2]) and same_size(os_[3], xs[3]):
                        return x, g
    if node.target is aten.repeat_interleave.self_int:
        x, reps = node.args[0], node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        xs = shape_of(x)
        if xs and len(xs) == 4 and dim in (1, -3) and isinstance(_static(reps), int):
            return x, int(_static(reps))
    return node, 1
