"""find_attention and rewrite over the zoo: coverage, exactness, the reference op, negatives."""

from __future__ import annotations

import logging
import subprocess
import sys
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import mta_rewrite as mr
from mta_rewrite import zoo
from mta_rewrite.ops import mta_attention_reference
from mta_rewrite.passes import match

from .zoo_programs import captured

logging.getLogger("torch._export").setLevel(logging.ERROR)
logging.getLogger("torch.export").setLevel(logging.ERROR)

HAS_TRANSFORMERS = True
try:
    import transformers  # noqa: F401
except ImportError:  # pragma: no cover - CI installs it
    HAS_TRANSFORMERS = False

EXACT = mr.MTAConfig(chunk_size=10**6)  # one chunk: MTA equals exact attention


def first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


def real_positions(out: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Outputs at padded query positions are not compared: a fully masked row is zero in MTA
    (MTA_SPEC.md) and garbage or NaN in the original."""
    mask = kwargs.get("attention_mask")
    return out if mask is None else out[mask.bool()]


def cases(family):
    out = [c for c in zoo.all_cases() if c.family == family]
    marks = [pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed")] if family == "transformers" else []
    return [pytest.param(c, id=c.name, marks=marks) for c in out]


def square_products(gm) -> list[str]:
    """Products (matmul, bmm, baddbmm, einsum) whose result is n × n in its last two dimensions
    (one symbolic size twice): q·kᵀ scores, or p·v's probabilities' shape."""
    out = []
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if n.op == "call_function" and n.target in match.MATMUL_TARGETS and isinstance(val, torch.Tensor) \
                and val.dim() >= 2 and not isinstance(val.shape[-1], int) and str(val.shape[-1]) == str(val.shape[-2]):
            out.append(n.name)
    return out


POSITIVE = cases("hand-written") + cases("torch") + cases("transformers")


@pytest.mark.parametrize("case", POSITIVE)
def test_zoo_found_and_rewritten_exactly(case):
    torch.manual_seed(0)
    model = case.build()
    args, kwargs = case.inputs(case.lengths[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sites = mr.find_attention(model, args, kwargs)
        attention = [s for s in sites if s.is_attention]
        assert len(attention) == case.attention, [s.to_dict() for s in sites]
        assert sum(s.rewritable for s in attention) == case.rewritable, [s.reason for s in attention]
        assert len({s.name for s in sites}) == len(sites), "site names must be unique"
        rewritten = mr.rewrite(model, args, kwargs, config=EXACT)
    assert mr.count_mta_nodes(rewritten) == case.rewritable
    if case.rewritable == case.attention:  # nothing left exact: no n × n scores are computed any more
        assert not square_products(rewritten), square_products(rewritten)
    # GQA: the op gets the key/value heads, not copies repeated to the query heads
    ops = [n for n in rewritten.graph.nodes if n.target is torch.ops.mta.attention.default]
    for site, node in zip([s for s in attention if s.rewritable], ops):
        if site.kv_heads is not None and site.q_heads is not None and site.kv_heads < site.q_heads:
            assert node.args[1].meta["val"].shape[1] == site.kv_heads, (site.name, node.args[1].meta["val"].shape)
    with torch.no_grad():
        for n in case.lengths:  # the example length and another one (dynamic sequence length)
            a, kw = case.inputs(n)
            want = real_positions(first_tensor(model(*a, **kw)), kw)
            got = real_positions(first_tensor(rewritten(*a, **kw)), kw)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", POSITIVE)
def test_sites_left_exact_run_the_ops_exact_path(case):
    """With a plan that approximates nothing, every rewritable site that is not already an SDPA call
    without a mask calls the op with one chunk (exact attention by SDPA, the mask recognised):
    the output is the original model's; lower_exact=False leaves the graph's attention as captured."""
    model, program = captured(case).model, captured(case).program
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sites = [s for s in mr.find_attention(program) if s.rewritable]
        fast = mr.rewrite(program, plan=mr.Plan({}))
        kept = mr.rewrite(program, plan=mr.Plan({}), lower_exact=False)
    lowered = [s for s in sites if not (s.kind == "sdpa" and s.mask == "none")]
    assert mr.api.count_exact_nodes(fast) == len(lowered), [(s.kind, s.mask) for s in sites]
    assert mr.count_mta_nodes(fast) == 0
    assert mr.api.count_exact_nodes(kept) == mr.count_mta_nodes(kept) == 0
    with torch.no_grad():
        for n in case.lengths:
            a, kw = case.inputs(n)
            want = real_positions(first_tensor(model(*a, **kw)), kw)
            got = real_positions(first_tensor(fast(*a, **kw)), kw)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", cases("negative"))
def test_never_rewrite_wrongly(case):
    model = case.build()
    args, kwargs = case.inputs(case.lengths[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sites = mr.find_attention(model, args, kwargs)
        rewritten = mr.rewrite(model, args, kwargs, config=mr.MTAConfig(chunk_size=4, top_k=1))
    assert sum(s.is_attention for s in sites) == case.attention
    assert all(not s.rewritable and s.reason for s in sites), [s.to_dict() for s in sites]
    assert mr.count_mta_nodes(rewritten) == 0
    if case.name != "dropout_training":  # random in training mode
        with torch.no_grad():
            torch.testing.assert_close(first_tensor(rewritten(*args, **kwargs)), first_tensor(model(*args, **kwargs)))


EXPECTED_REASONS = {
    "probs_returned": "probabilities",
    "hard_cap_clamp": "unsupported score modifier clamp",
    "soft_cap_over_mask": "a mask inside the tanh of a soft-cap",
    "relative_scores_from_q": "computed from the layer's q or k",
    "cross_attention": "cross-attention",
    "cross_attention_same_length": "computed from different model inputs (q: x; k: memory)",
    "softmax_not_attention": "not attention",
    "masked_fill_finite": "masked_fill",
    "scores_times_weights": "unsupported score modifier mul",
    "dropout_training": "training",
}


@pytest.mark.parametrize("name,fragment", sorted(EXPECTED_REASONS.items()))
def test_reasons_say_why(name, fragment):
    case = next(c for c in zoo.negative_cases() if c.name == name)
    args, kwargs = case.inputs(case.lengths[0])
    sites = mr.find_attention(case.build(), args, kwargs)
    assert any(fragment in s.reason for s in sites), [s.reason for s in sites]


@pytest.mark.parametrize("extra,keys", [({"add_bias_kv": True}, 41), ({"add_zero_attn": True}, 41),
                                        ({"add_bias_kv": True, "add_zero_attn": True}, 42)])
def test_keys_added_beside_the_sequence_are_said_to_be_so(extra, keys):
    """nn.MultiheadAttention's add_bias_kv / add_zero_attn append keys to the sequence's own: the
    site stays exact, and its reason names added keys beside cross-attention (it said
    cross-attention only, which these are not; a static capture's lengths cannot tell the two apart)."""
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True, **extra)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    model, x = Model().eval(), torch.randn(2, 40, 32)
    (site,) = mr.find_attention(model, (x,))
    assert not site.rewritable
    assert site.reason.startswith(f"cross-attention or added keys: 40 queries attend to {keys} keys")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (no site rewritable: rewrite warns so)
        fast = mr.rewrite(model, (x,), config=mr.MTAConfig(8))
    assert mr.count_mta_nodes(fast) == 0
    torch.testing.assert_close(fast(x), model(x))


def test_a_site_left_exact_for_its_score_modifier_reports_its_shapes():
    """A site with a score modifier the op cannot take between q·kᵀ and softmax (a clamp) was
    listed with no shapes ("None·None/None·None·None") and mask "none": the walk from softmax
    stopped at the modifier. Its shapes are read off the product below it; its masks, above the
    modifier, are "not read"."""
    case = next(c for c in zoo.negative_cases() if c.name == "hard_cap_clamp")
    (x, mask), _ = case.inputs(case.lengths[0])
    model = case.build()
    (site,) = mr.find_attention(model, (x, mask))
    assert not site.rewritable and "clamp" in site.reason
    assert (site.batch, site.q_heads, site.kv_heads, site.seq_len, site.head_dim) == \
        (x.shape[0], model.h, model.h, x.shape[1], model.dh)
    assert site.mask == "not read"


def test_rewrite_warns_when_what_was_asked_for_is_left_exact():
    """One configuration for every site, and none of the attention rewritable (a model left in
    training mode): a warning with the reason. A plan naming a site that is not rewritable: the
    same. No warning when the sites asked for are rewritten, or a plan leaves a site exact."""
    dropout = next(c for c in zoo.negative_cases() if c.name == "dropout_training")
    args, _ = dropout.inputs(24)
    with pytest.warns(UserWarning, match=r"1 attention site\(s\) asked for MTA left exact \(.*training mode.*eval\(\)"):
        assert mr.count_mta_nodes(mr.rewrite(dropout.build(), args, config=mr.MTAConfig(8))) == 0
    name = mr.find_attention(dropout.build(), args)[0].name
    with pytest.warns(UserWarning, match="asked for MTA left exact"):
        mr.rewrite(dropout.build(), args, plan=mr.Plan({name: mr.MTAConfig(8)}))
    two = next(c for c in zoo.hand_written_cases() if c.name == "two_layers")
    args, kwargs = two.inputs(24)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert mr.count_mta_nodes(mr.rewrite(two.build(), args, kwargs, config=mr.MTAConfig(8))) == 2
        assert mr.count_mta_nodes(mr.rewrite(two.build(), args, kwargs, plan=mr.Plan({"layers.0": "exact"}))) == 0


# one-layer models with a small chunk: exactly the float64 reference op on that layer's q, k, v
ONE_LAYER = [
    ("scores_div_masked_fill", lambda m, x, mask: (m.heads(x), mask, dict(causal=False))),
    ("scale_on_q_additive_mask", lambda m, x, pad: (m.heads(x), torch.where(pad[:, None, None, :], 0.0, torch.finfo(x.dtype).min), {})),
    ("bmm_3d_where", lambda m, x, mask: (m.heads(x), mask[:, None], {})),
    ("einsum_gqa_repeat_interleave", lambda m, x: (m.heads(x), None, {})),
    ("einsum_heads_after_tokens", lambda m, x, mask: (m.heads(x), mask, {})),
    ("baddbmm_alibi_viewed_4d", lambda m, x, mask: (m.heads(x), m.alibi(x.shape[0], x.shape[1]).view(x.shape[0], m.h, 1, -1)
                                                    + torch.where(mask, 0.0, torch.finfo(x.dtype).min), {})),
    ("bmm_scores_viewed_for_mask", lambda m, x, mask: (m.heads(x), torch.where(mask, 0.0, torch.finfo(x.dtype).min), {})),
    ("baddbmm_viewed_to_four_d", lambda m, x, mask: (m.heads(x), torch.where(mask, 0.0, torch.finfo(x.dtype).min), {})),
    ("four_d_scores_bmm_with_v", lambda m, x, mask: (m.heads(x), torch.where(mask, 0.0, torch.finfo(x.dtype).min), {})),
    ("gqa_expand_causal_buffer", lambda m, x: (m.heads(x), torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril(), {})),
    ("keys_gated_by_mask", lambda m, x, pad: ((m.heads(x)[0], *m.heads(x * pad[..., None])[1:]), None, dict(causal=True))),
    ("sdpa_causal_gqa", lambda m, x: (m.heads(x), None, dict(causal=True))),
    ("multiplicative_causal_buffer", lambda m, x, pad: (m.heads(x), pad[:, None, None, :], dict(causal=True))),
    ("soft_cap_tanh", lambda m, x, mask: (m.heads(x), mask, dict(softcap=m.cap))),
]


@pytest.mark.parametrize("name,extract", ONE_LAYER, ids=[n for n, _ in ONE_LAYER])
def test_one_layer_equals_reference_op(name, extract):
    case = next(c for c in zoo.hand_written_cases() if c.name == name)
    model = case.build()
    args, kwargs = case.inputs(40)
    config = mr.MTAConfig(chunk_size=6, local_chunks=2, sinks=2, top_k=1)
    rewritten = mr.rewrite(model, args, kwargs, config=config)
    (q, k, v), mask, extra = extract(model, *args)
    scale = None if name.startswith("sdpa") or name == "keys_gated_by_mask" else model.dh ** -0.5
    ref = mta_attention_reference(q, k, v, mask, scale=scale, **extra, **config.op_kwargs())
    with torch.no_grad():
        want = model.merge(ref.float())
        got = rewritten(*args, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _MultipliedMask(zoo.MultiplicativeCausalBuffer):
    """The multiplicative causal mask in the forms code writes it (the buffer of 0s and 1s)."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form

    def forward(self, x):
        q, k, v = self.heads(x)
        n = q.shape[-2]
        w = q @ k.transpose(-1, -2) / math.sqrt(self.dh)
        b = self.bias[:, :, :n, :n]
        w = {"gpt-1": lambda: w * b + -1e4 * (1 - b), "minus": lambda: w * b - 1e10 * (1 - b),
             "swapped": lambda: (1 - b) * -1e9 + b * w, "finite": lambda: w * b + -1.0 * (1 - b)}[self.form]()
        return self.merge(torch.softmax(w, dim=-1) @ v)


@pytest.mark.parametrize("form", ["gpt-1", "minus", "swapped", "finite"])
def test_multiplicative_masks_are_bool_masks(form):
    """The scores times a buffer of 0s and 1s, a masked value added where it is 0: where(b, s, c).
    With c ≤ −1e4 it is the causal mask (the float64 reference op on the layer's q, k, v with
    causal=True); with c = −1 the masked keys keep a weight: left exact, the model's outputs."""
    model = _MultipliedMask(form).eval()
    x = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(1))
    (site,) = mr.find_attention(model, (x,))
    config = mr.MTAConfig(chunk_size=6, local_chunks=2, sinks=2, top_k=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = mr.rewrite(model, (x,), config=config)
    with torch.no_grad():
        if form == "finite":
            assert not site.rewritable and "unsupported score modifier" in site.reason
            torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)
            return
        assert site.rewritable and site.mask == "bool", site.reason
        want = model.merge(mta_attention_reference(*model.heads(x), None, causal=True, scale=model.dh ** -0.5,
                                                   **config.op_kwargs()).float())
        torch.testing.assert_close(fast(x), want, rtol=1e-5, atol=1e-5)


class _FilledMask(zoo._Proj):
    """A mask of 0s and a finite masked score built in the forward and added to the scores, in the
    forms code writes it (−1e9, −1e4: above the dtype's minimum, so by its values a bias)."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form

    def forward(self, x, keep):
        q, k, v = self.heads(x)
        n = q.shape[-2]
        s = q @ k.transpose(-1, -2) / math.sqrt(self.dh)
        s = {"triu": lambda: s + torch.triu(torch.full((n, n), -1e9), diagonal=1),
             "triu_first": lambda: torch.full((n, n), -1e4).triu(1) + s,
             "where": lambda: s + torch.where(keep, 0.0, -1e4),
             "where_swapped": lambda: s + torch.where(~keep, -1e9, 0.0),
             "masked_zeros": lambda: s + torch.zeros(n, n).masked_fill(~keep[0, 0], -1e9),
             "bias": lambda: s + torch.where(keep, 0.0, -5.0)}[self.form]()
        return self.merge(torch.softmax(s, dim=-1) @ v)


@pytest.mark.parametrize("form", ["triu", "triu_first", "where", "where_swapped", "masked_zeros", "bias"])
def test_added_masks_of_a_finite_masked_score_are_bool_masks(form):
    """0s and −1e9 (or −1e4) added to the scores are a mask, as masked_fill with them is: the site
    takes it as the keys allowed (the causal triangle recognised as causality, top-k never ranking
    a chunk the mask forbids), equal to the float64 reference op with that bool mask; before, the
    op took −1e9 as a bias, and its top-k ranked future chunks (0.06 from the reference with the
    triangle). A finite bias (−5) stays a bias: the reference with the float mask."""
    model = _FilledMask(form).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 40, 32, generator=g)
    tri = torch.ones(40, 40, dtype=torch.bool).tril()
    keep = (tri & (torch.rand(40, 40, generator=g) > 0.2)) | torch.eye(40, dtype=torch.bool)
    keep = keep.expand(2, 1, 40, 40)
    (site,) = mr.find_attention(model, (x, keep))
    assert site.rewritable and site.mask == ("additive" if form == "bias" else "bool"), (site.mask, site.reason)
    config = mr.MTAConfig(chunk_size=6, local_chunks=1, sinks=2, top_k=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = mr.rewrite(model, (x, keep), config=config)
    mask = {"triu": tri, "triu_first": tri, "bias": torch.where(keep, 0.0, -5.0)}.get(form, keep)
    with torch.no_grad():
        want = model.merge(mta_attention_reference(*model.heads(x), mask, scale=model.dh ** -0.5,
                                                   **config.op_kwargs()).float())
        torch.testing.assert_close(fast(x, keep), want, rtol=1e-5, atol=1e-5)


class _ScaledComplement(zoo._Proj):
    """Old BERT code's key padding: the 0/1 attention mask turned into (1 − mask)·−10000 in the
    forward and added to the scores (``get_extended_attention_mask`` before transformers used the
    dtype's minimum; MarkupLM still does), or a 0/1 "forbidden" mask times −1e9."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form

    def forward(self, x, attention_mask):
        q, k, v = self.heads(x)
        ext = attention_mask[:, None, None, :].to(x.dtype)
        if self.form == "scaled_after":  # the mask added before the scale: −10000 / √d, still no weight
            s = (q @ k.transpose(-1, -2) + (1.0 - ext) * -10000.0) / math.sqrt(self.dh)
        else:
            ext = (1.0 - ext) * -10000.0 if self.form == "bert" else -1e9 * (ext == 0).to(x.dtype)
            s = q @ k.transpose(-1, -2) / math.sqrt(self.dh) + ext
        return self.merge(torch.softmax(s, dim=-1) @ v)


@pytest.mark.parametrize("form", ["bert", "forbidden_times", "scaled_after"])
def test_key_padding_times_a_finite_masked_score_is_key_padding(form, monkeypatch):
    """(1 − mask)·−10000 added to the scores: its −10000s give their keys zero weight, so the op gets
    them as −inf, forbidden, and so key padding (the GPU kernels take it; summaries leave padded
    keys out): the mask the op gets is the bool key padding in values, and the output the float64
    reference op's with it, top-k included. Before, the op read −10000 as a bias (a block of a
    chunk half padded computed exactly, the CUDA dispatch on the portable implementation)."""
    import importlib

    op_module = importlib.import_module("mta_rewrite.ops.attention")
    model = _ScaledComplement(form).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 40, 32, generator=g)
    attention_mask = torch.ones(2, 40, dtype=torch.long)
    attention_mask[0, 29:] = 0  # right padding, partway through a chunk
    attention_mask[1, :5] = 0  # left padding
    config = mr.MTAConfig(chunk_size=6, local_chunks=1, sinks=2, top_k=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = mr.rewrite(model, (x, attention_mask), config=config)
    seen = []
    original = op_module.simplify_mask
    monkeypatch.setattr(op_module, "simplify_mask", lambda mask, *args: seen.append(mask) or original(mask, *args))
    keep = attention_mask.bool()[:, None, None, :]
    with torch.no_grad():
        got = fast(x, attention_mask)
        want = model.merge(mta_attention_reference(*model.heads(x), keep, scale=model.dh ** -0.5,
                                                   **config.op_kwargs()).float())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (mask,) = seen
    assert torch.equal(mask > torch.finfo(mask.dtype).min, keep.expand_as(mask))
    assert set(mask.unique().tolist()) == {0.0, float("-inf")}, mask.unique()


class _ShiftedScores(zoo._Proj):
    """softmax(s − max(s)) by hand, as GPT-OSS writes it: softmax does not change under the shift."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, x, mask):
        q, k, v = self.heads(x)
        s = (q @ k.transpose(-1, -2) * self.dh ** -0.5).masked_fill(~mask, float("-inf"))
        s = s - (s.max(dim=-1, keepdim=True).values if self.how == "max" else s.amax(-1, keepdim=True))
        return self.merge(torch.softmax(s, dim=-1) @ v)


@pytest.mark.parametrize("how", ["max", "amax"])
def test_scores_shifted_by_their_row_max_are_attention(how):
    """``s − s.max(-1, keepdim=True)`` before softmax (a guard against overflow) was "an additive
    mask" computed from the scores: the site was left exact. softmax is unchanged by the shift: it
    is rewritten, and equals the float64 reference op on the layer's q, k, v."""
    model = _ShiftedScores(how).eval()
    x = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(40, 40, dtype=torch.bool).tril().expand(2, 1, 40, 40)
    (site,) = mr.find_attention(model, (x, mask))
    assert site.rewritable, site.reason
    config = mr.MTAConfig(chunk_size=6, local_chunks=2, sinks=2, top_k=1)
    fast = mr.rewrite(model, (x, mask), config=config)
    with torch.no_grad():
        want = model.merge(mta_attention_reference(*model.heads(x), mask, scale=model.dh ** -0.5,
                                                   **config.op_kwargs()).float())
        torch.testing.assert_close(fast(x, mask), want, rtol=1e-5, atol=1e-5)


class _EitherOrder(zoo._Proj):
    """Operands in the order some code writes them; masked by a bool ``allowed`` [B, 1, n, n]."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.head_scale = torch.nn.Parameter(0.5 + torch.rand(1, self.h, 1, 1, generator=torch.Generator().manual_seed(3)))

    def forward(self, x, allowed):
        q, k, v = self.heads(x)
        scale, no = self.dh ** -0.5, float("-inf")
        s = {"mask_first": lambda: torch.where(allowed, 0.0, torch.finfo(x.dtype).min) + q @ k.transpose(-1, -2) * scale,
             "fill_first": lambda: torch.where(~allowed, no, q @ k.transpose(-1, -2) * scale),
             "scale_tensor_first": lambda: (self.head_scale * (q @ k.transpose(-1, -2))).masked_fill(~allowed, no),
             "key_permuted": lambda: (q @ k.permute(0, 1, 3, 2) * scale).masked_fill(~allowed, no),
             "shifted_by_a_number": lambda: (2.5 + q @ k.transpose(-1, -2) * scale - 1.0).masked_fill(~allowed, no),
             "negative_scale": lambda: (q @ k.transpose(-1, -2) * -scale).masked_fill(~allowed, no)}[self.form]()
        return self.merge(torch.softmax(s, dim=-1) @ v)


@pytest.mark.parametrize("form", ["mask_first", "fill_first", "scale_tensor_first", "key_permuted", "shifted_by_a_number",
                                  "negative_scale"])
def test_operands_in_either_order(form):
    """The additive mask left of the scores (``mask + s``), ``where(forbidden, −inf, s)`` with the
    fill first, a per-head scale tensor left of q·kᵀ, kᵀ written as a permute of all four
    dimensions, a number added to (or taken from) every score, which softmax ignores: read as their
    usual order is (the float64 reference op on the layer's q, k, v, the per-head scale on q). A
    negative scale is not a softmax temperature the op can take: left
    exact with its reason, the model's outputs."""
    model = _EitherOrder(form).eval()
    x = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(1))
    allowed = zoo._causal_pad(40)
    (site,) = mr.find_attention(model, (x, allowed))
    config = mr.MTAConfig(chunk_size=6, local_chunks=2, sinks=2, top_k=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = mr.rewrite(model, (x, allowed), config=config)
    with torch.no_grad():
        if form == "negative_scale":
            assert not site.rewritable and "score scale" in site.reason and "not positive" in site.reason, site.reason
            assert mr.count_mta_nodes(fast) == 0
            torch.testing.assert_close(fast(x, allowed), model(x, allowed), rtol=0, atol=0)
            return
        assert site.rewritable, site.reason
        q, k, v = model.heads(x)
        scale = model.dh ** -0.5
        if form == "scale_tensor_first":
            q, scale = q * model.head_scale, 1.0
        want = model.merge(mta_attention_reference(q, k, v, allowed, scale=scale, **config.op_kwargs()).float())
        torch.testing.assert_close(fast(x, allowed), want, rtol=1e-5, atol=1e-5)


class _FrameByMinusOne(zoo._Proj):
    """GPT-NeoX-Japanese's frame (3-D q·kᵀ viewed as [B, H, n, n] for the mask, softmax and the
    product with a 4-D v) with the batch or the heads of the view given as −1."""

    def __init__(self, view: str):
        super().__init__()
        self.view = view

    def forward(self, x, mask):
        q, k, v = self.heads(x)
        B, H, n, dh = q.shape
        s = torch.bmm(q.reshape(B * H, n, dh), k.reshape(B * H, n, dh).transpose(1, 2)) * dh ** -0.5
        s = s.view(*((B, -1) if self.view == "heads" else (-1, H)), n, n) + torch.where(mask, 0.0, torch.finfo(s.dtype).min)
        return self.merge(torch.matmul(F.softmax(s, dim=-1), v))


@pytest.mark.parametrize("view", ["heads", "batch"])
def test_a_frame_viewed_with_minus_one_reports_its_batch_and_heads(view):
    """Scores [B·H, n, n] viewed as [B, −1, n, n] or [−1, H, n, n]: the site reports the batch and
    the heads the view resolves to, and is rewritten (the float64 reference op)."""
    model = _FrameByMinusOne(view).eval()
    x, mask = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(1)), zoo._causal_pad(40)
    (site,) = mr.find_attention(model, (x, mask))
    assert site.rewritable, site.reason
    assert (site.batch, site.q_heads, site.kv_heads, site.seq_len, site.head_dim) == (2, model.h, model.h, 40, model.dh)
    config = mr.MTAConfig(chunk_size=6, local_chunks=2, sinks=2, top_k=1)
    fast = mr.rewrite(model, (x, mask), config=config)
    with torch.no_grad():
        want = model.merge(mta_attention_reference(*model.heads(x), mask, scale=model.dh ** -0.5,
                                                   **config.op_kwargs()).float())
        torch.testing.assert_close(fast(x, mask), want, rtol=1e-5, atol=1e-5)


class _SoftCapped(zoo._Proj):
    """Soft-caps as models write them: a·tanh(b·s) for numbers a, b in any arrangement of mul and div."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, x, mask):
        q, k, v = self.heads(x)
        s = q @ k.transpose(-1, -2)
        if self.how == "gemma2":  # scale, / cap, tanh, * cap, + mask
            s = torch.tanh(s * self.dh ** -0.5 / 2.0) * 2.0
        elif self.how == "reciprocal":  # cap · tanh(s · (1 / (cap · √d)))
            s = 2.0 * torch.tanh(s * (1.0 / (2.0 * math.sqrt(self.dh))))
        elif self.how == "scale_after":  # tanh of the raw scores, then one factor: a = 0.8, b = 1
            s = torch.tanh(s) * 0.8
        s = s.masked_fill(~mask, float("-inf"))
        return self.merge(torch.softmax(s, dim=-1) @ v)


@pytest.mark.parametrize("how,cap,scale", [("gemma2", 2.0, None), ("reciprocal", 2.0, None), ("scale_after", 0.8, 0.8)])
def test_soft_capped_scores_are_rewritten_with_the_cap(how, cap, scale):
    """A tanh soft-cap between q·kᵀ and softmax, a·tanh(b·s), is the op's ``softcap`` a at scale
    a·b: the site is rewritten (it was left exact), the op call carries the cap, and the model
    equals the float64 reference op with that cap and scale, which differs from it without."""
    model = _SoftCapped(how).eval()
    x = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(40, 40, dtype=torch.bool).tril().expand(2, 1, 40, 40)
    (site,) = mr.find_attention(model, (x, mask))
    assert site.rewritable and site.softcap == pytest.approx(cap), site.reason
    config = mr.MTAConfig(chunk_size=6, local_chunks=2, sinks=2, top_k=1)
    fast = mr.rewrite(model, (x, mask), config=config)
    (node,) = [n for n in fast.graph.nodes if n.target is torch.ops.mta.attention.default]
    assert node.kwargs["softcap"] == pytest.approx(cap)
    scale = model.dh ** -0.5 if scale is None else scale  # (None: the model's 1/√d)
    q, k, v = model.heads(x)
    with torch.no_grad():
        want = model.merge(mta_attention_reference(q, k, v, mask, scale=scale, softcap=cap,
                                                   **config.op_kwargs()).float())
        torch.testing.assert_close(fast(x, mask), want, rtol=1e-5, atol=1e-5)
        uncapped = model.merge(mta_attention_reference(q, k, v, mask, scale=scale, **config.op_kwargs()).float())
        assert (uncapped - want).abs().max() > 1e-3


def sink_site_reference(model: zoo.SinkLogits, x, mask, **config) -> torch.Tensor:
    """The float64 reference op (MTA_SPEC) on ``zoo.SinkLogits``' site with ``config``, its
    learned sink logit given as token 0 (logit scale·q'·k' = the learned value, value 0, always
    attended exactly: one more sink): the site's output [B, H, n, d] before the heads are merged."""
    q, k, v = (t.double() for t in model.heads(x))
    B, H, n, d = q.shape
    scale = model.dh ** -0.5
    sink = model.sinks.detach().double().view(1, -1, 1, 1).expand(B, -1, n, 1)
    q1 = torch.cat([torch.zeros(B, H, 1, d + 1, dtype=torch.float64), torch.cat([q, sink / scale], -1)], 2)
    k1 = torch.cat([torch.nn.functional.pad(torch.ones(B, H, 1, 1, dtype=torch.float64), (d, 0)),
                    torch.nn.functional.pad(k, (0, 1))], 2)
    v1 = torch.nn.functional.pad(v, (0, 1, 1, 0))
    allowed = torch.nn.functional.pad(mask == 0, (1, 0, 1, 0), value=True)
    config = dict(config, sinks=config.get("sinks", 0) + 1)
    if config.get("summary_weight") is not None:  # learned summaries: w·k' = w·k for a real key (k' is 0 there)
        config["summary_weight"] = torch.nn.functional.pad(config["summary_weight"].double(), (0, 1))
    if config.get("segment_ids") is not None:  # boundary chunks: the extra token in the first token's segment
        config["segment_ids"] = torch.cat([config["segment_ids"][:, :1], config["segment_ids"]], dim=1)
    return mta_attention_reference(q1, k1, v1, allowed, scale=scale, **config)[:, :, 1:, :-1]


@pytest.mark.parametrize("form", [zoo.SinkLogits, zoo.SinkScale], ids=["column", "scale"])
def test_learned_sink_logits_are_rewritten(form):
    """GPT-OSS's eager attention (learned sink logits) was reported as "a softmax that is not
    attention" ("softmax output feeds slice.Tensor"): a user saw no attention in the model at all.
    It is a site; the rewrite gives the sink logit to the op as one more token at position 0 that
    it attends exactly (``passes.lower.sink_logit_operands``): one chunk equals the model itself,
    and an MTA configuration equals the float64 reference op on that longer sequence. The same
    sinks written as a scale of the output (Granite-SWA: sigmoid(logsumexp(s) − sink)) were left
    exact ("the attention scores are used elsewhere"); they are the same site."""
    model = form().eval()
    x, mask = zoo.sink_inputs(24)
    (site,) = mr.find_attention(model, (x, mask))
    assert (site.kind, site.rewritable, site.q_heads, site.seq_len, site.mask) == ("manual", True, 4, 24, "additive")
    exact, config = mr.MTAConfig(10**6), mr.MTAConfig(chunk_size=6, local_chunks=2, sinks=2, top_k=1)
    one_chunk, fast = (mr.rewrite(model, (x, mask), config=c) for c in (exact, config))
    assert mr.count_mta_nodes(fast) == 1
    for n in (24, 37):
        x, mask = zoo.sink_inputs(n, B=3, seed=n)
        with torch.no_grad():
            torch.testing.assert_close(one_chunk(x, mask), model(x, mask), rtol=1e-5, atol=1e-5)
            ref = sink_site_reference(model, x, mask, chunk_size=6, local_chunks=2, sinks=2, top_k=1)
            torch.testing.assert_close(fast(x, mask), model.merge(ref.float()), rtol=1e-5, atol=1e-5)
            assert not torch.allclose(fast(x, mask), model(x, mask), atol=1e-3)  # an approximation


class _NotASinkScale(zoo.SinkLogits):
    """Forms near Granite-SWA's sink scale that are not it: the logsumexp of the scores before
    their mask, a sink added instead of subtracted, the logsumexp also returned."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, x, mask):
        q, k, v = self.heads(x)
        raw = q @ k.transpose(-1, -2) * self.dh ** -0.5
        s = raw + mask
        lse = torch.logsumexp(raw if self.how == "unmasked" else s, dim=-1)
        term = lse + self.sinks.view(1, -1, 1) if self.how == "added" else lse - self.sinks.view(1, -1, 1)
        o = torch.softmax(s, dim=-1) @ v * term.sigmoid().unsqueeze(-1)
        return (self.merge(o), lse) if self.how == "returned" else self.merge(o)


@pytest.mark.parametrize("how", ["unmasked", "added", "returned"])
def test_what_only_looks_like_a_sink_scale_is_left_exact(how):
    model = _NotASinkScale(how).eval()
    x, mask = zoo.sink_inputs(24)
    (site,) = mr.find_attention(model, (x, mask))
    assert not site.rewritable and ("logsumexp" in site.reason or "used elsewhere" in site.reason), site.reason
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = mr.rewrite(model, (x, mask), config=mr.MTAConfig(6, 1))
    assert mr.count_mta_nodes(fast) == 0
    with torch.no_grad():
        torch.testing.assert_close(first_tensor(fast(x, mask)), first_tensor(model(x, mask)))


class _TokensThenSinkLogits(torch.nn.Module):
    """Token ids, embedded, into ``zoo.SinkLogits``: a site with learned sink logits that boundary
    chunks can read segments for."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 32)
        self.sink = zoo.SinkLogits()

    def forward(self, input_ids, mask):
        return self.sink(self.embed(input_ids), mask)


def test_learned_sink_logits_take_boundary_chunks():
    """Boundary chunks at a sink site were refused ("its extra token has no segment"): the extra
    token takes the first token's segment (``passes.lower.sink_token_segments``), so later
    segments start where they did, and the rewritten site equals the float64 reference with those
    segment ids, at another length too."""
    torch.manual_seed(0)
    model = _TokensThenSinkLogits().eval()
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 20, (2, 30), generator=gen)
    _, mask = zoo.sink_inputs(30)
    config = dict(chunk_size=5, local_chunks=1, sinks=1, top_k=1)
    fast = mr.rewrite(model, (ids, mask), config=mr.MTAConfig(**config), boundaries=mr.Boundaries((7,)))
    assert mr.count_mta_nodes(fast) == 1
    for n in (30, 43):
        ids = torch.randint(0, 20, (2, n), generator=gen)
        _, mask = zoo.sink_inputs(n, seed=n)
        segments = torch.cumsum((ids == 7).long(), dim=1) - (ids == 7).long()
        assert segments.max() >= 2  # several segments
        with torch.no_grad():
            want = sink_site_reference(model.sink, model.embed(ids), mask, segment_ids=segments, **config)
            torch.testing.assert_close(fast(ids, mask), model.sink.merge(want.float()), rtol=1e-5, atol=1e-5)
            plain = sink_site_reference(model.sink, model.embed(ids), mask, **config)
            assert not torch.allclose(want, plain, atol=1e-3)  # the boundaries matter


def test_learned_sink_logits_take_head_groups_learned_summaries_and_the_exact_path():
    """A sink site takes what calibration can choose for it: per-head groups (each group's
    configuration gets the extra token as one more sink, a group left exact stays exact), learned
    summaries (the weight gets the extra dimension, 0) and, left exact, the op's exact path with
    its extra token (GPT-OSS with eager attention, 4 layers at 2048 tokens: 2.3× faster with
    nothing approximated, ``benchmarks/bench_exact_sites.py``). Clustered summaries, which need one
    key-padding mask for every query, are refused with one line."""
    model = zoo.SinkLogits().eval()
    x, mask = zoo.sink_inputs(40, B=2, seed=3)
    config = mr.MTAConfig(chunk_size=8, local_chunks=1, sinks=1, top_k=1)
    groups = mr.HeadGroups(((config, (0, 2)), (None, (1, 3))))
    grouped = mr.rewrite(model, (x, mask), plan=mr.Plan({"root": mr.PlanEntry(groups)}))
    left_exact = mr.rewrite(model, (x, mask), plan=mr.Plan({}))
    assert mr.api.count_exact_nodes(left_exact) == 1 and mr.count_mta_nodes(left_exact) == 0
    x, mask = zoo.sink_inputs(53, B=3, seed=4)
    with torch.no_grad():
        want = sink_site_reference(model, x, mask, chunk_size=8, local_chunks=1, sinks=1, top_k=1)
        want[:, [1, 3]] = sink_site_reference(model, x, mask, chunk_size=10**6)[:, [1, 3]]
        torch.testing.assert_close(grouped(x, mask), model.merge(want.float()), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(left_exact(x, mask), model(x, mask), rtol=1e-5, atol=1e-5)
    weight = torch.randn(4, 8, generator=torch.Generator().manual_seed(7))
    learned = mr.rewrite(model, (x, mask), plan=mr.Plan({"root": mr.PlanEntry(mr.Learned.from_tensor(config, weight))}))
    with torch.no_grad():
        want = sink_site_reference(model, x, mask, chunk_size=8, local_chunks=1, sinks=1, top_k=1, summary_weight=weight)
        torch.testing.assert_close(learned(x, mask), model.merge(want.float()), rtol=1e-5, atol=1e-5)
        means = sink_site_reference(model, x, mask, chunk_size=8, local_chunks=1, sinks=1, top_k=1)
        assert not torch.allclose(want, means, atol=1e-3)  # the weight matters
    clustered = mr.Clustered.from_tensor(mr.MTAConfig(8), torch.zeros(4, 3, 8))
    with pytest.raises(ValueError, match=r"^a site with learned sink logits takes an MTAConfig, HeadGroups or Learned, "
                                         r"not Clustered \(clustered summaries need one key-padding mask"):
        mr.rewrite(model, (x, mask), plan=mr.Plan({"root": mr.PlanEntry(clustered)}))


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
def test_gpt_oss_with_its_sink_logits_is_rewritten():
    """transformers' GPT-OSS (eager attention: its only one; sliding-window layers too): both
    layers are sites, one chunk gives the model's logits, and MTA runs on both."""
    small = dict(vocab_size=100, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                 intermediate_size=64, num_hidden_layers=2, max_position_embeddings=256, num_local_experts=2,
                 num_experts_per_tok=1, sliding_window=16)
    model = zoo._hf(lambda t: t.GptOssConfig(**small), "GptOssForCausalLM", "eager")()
    gen = torch.Generator().manual_seed(0)
    ids, mask = torch.randint(0, 100, (2, 40), generator=gen), torch.ones(2, 40, dtype=torch.long)
    mask[0, :5] = 0
    kwargs = {"attention_mask": mask, "use_cache": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sites = [s for s in mr.find_attention(model, (ids,), kwargs) if s.is_attention]
        assert [(s.name, s.rewritable) for s in sites] == [(f"model.layers.{i}.self_attn", True) for i in (0, 1)]
        one_chunk = mr.rewrite(model, (ids,), kwargs, config=mr.MTAConfig(10**6))
        fast = mr.rewrite(model, (ids,), kwargs, config=mr.MTAConfig(8, 1, 2))
    assert mr.count_mta_nodes(fast) == 2
    ids, mask = torch.randint(0, 100, (3, 57), generator=gen), torch.ones(3, 57, dtype=torch.long)
    mask[1, :7] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask, use_cache=False).logits
        real = mask.bool()
        torch.testing.assert_close(one_chunk(ids, attention_mask=mask).logits[real], want[real], rtol=0, atol=1e-5)
        assert not torch.allclose(fast(ids, attention_mask=mask).logits[real], want[real], atol=1e-3)


def test_view_that_needs_the_attention_layout_runs_and_equals_the_reference():
    """nanoGPT's ``y.transpose(1, 2).contiguous().view(B, n, C)``: torch.export drops the
    ``.contiguous()`` (a no-op on SDPA's traced output, which follows q's memory order), so the
    ``view`` needs the rewritten attention to have that order too."""
    case = next(c for c in zoo.hand_written_cases() if c.name == "sdpa_fused_qkv_contiguous_view")
    model = case.build()
    config = mr.MTAConfig(chunk_size=6, local_chunks=2, sinks=2, top_k=1)
    rewritten = mr.rewrite(model, *case.inputs(40), config=config)
    for n in (40, 53):  # the example length and another one
        (x,), _ = case.inputs(n)
        B, _, C = x.shape
        with torch.no_grad():
            q, k, v = (t.view(B, n, 4, C // 4).transpose(1, 2) for t in model.c_attn(x).split(C, dim=2))
            ref = mta_attention_reference(q, k, v, causal=True, **config.op_kwargs())
            want = model.c_proj(ref.float().transpose(1, 2).reshape(B, n, C))
            got = rewritten(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_memory_order_of_a_value():
    from mta_rewrite.passes.lower import memory_order

    x = torch.empty(2, 5, 4, 8)
    assert memory_order(x) is None  # contiguous: nothing to restore
    assert memory_order(x.transpose(1, 2)) == [0, 2, 1, 3]  # a transposed [B, n, H, d] buffer
    assert memory_order(torch.empty(1, 5, 1, 8).transpose(0, 2)) is None  # only size-1 dims moved
    assert memory_order(torch.empty(2, 1, 8).expand(2, 5, 8)) is None  # not dense: no order to restore
    assert memory_order(x[..., :4]) is None  # a slice is not dense either


def test_plan_per_site_and_errors(tmp_path):
    case = next(c for c in zoo.hand_written_cases() if c.name == "two_layers")
    model = case.build()
    args, _ = case.inputs(30)
    names = [s.name for s in mr.find_attention(model, args)]
    assert names == ["layers.0", "layers.1"]
    plan = mr.Plan({"layers.0": "exact", "layers.1": mr.MTAConfig(chunk_size=8, sinks=2)})
    path = plan.save(tmp_path / "plan.json")
    loaded = mr.Plan.load(path)
    assert loaded == plan
    rewritten = mr.rewrite(model, args, plan=loaded)
    assert mr.count_mta_nodes(rewritten) == 1
    with pytest.raises(ValueError, match=r"^the plan names 1 site\(s\) this model does not have: layers.7 \(a plan made "
                                         r"for another model\? this one's attention sites: layers.0, layers.1\)$"):
        mr.rewrite(model, args, plan=mr.Plan({"layers.7": mr.MTAConfig(8)}))
    # a plan of a 30-layer model: a line that names a few, in layer order, not all 28 it lacks
    other = mr.Plan({f"layers.{i}": mr.MTAConfig(8) for i in range(30)})
    with pytest.raises(ValueError, match=r"^the plan names 28 site\(s\) this model does not have: layers.2, layers.3, "
                                         r"layers.4, … \(28 in all\) \(a plan made for another model"):
        mr.rewrite(model, args, plan=other)
    with pytest.raises(ValueError, match="exactly one"):
        mr.rewrite(model, args)


def test_config_validation_and_json():
    cfg = mr.MTAConfig(chunk_size=64, local_chunks=2, sinks=4, top_k=2)
    assert mr.MTAConfig.from_json(cfg.to_json()) == cfg
    for bad in (dict(chunk_size=0), dict(chunk_size=8, local_chunks=0), dict(chunk_size=8, top_k=-1), dict(chunk_size=1.5)):
        with pytest.raises(ValueError):
            mr.MTAConfig(**bad)
    with pytest.raises(ValueError, match="version"):
        mr.MTAConfig.from_dict({"version": 99, "chunk_size": 8})


def test_hand_edited_plans_are_one_line_errors_naming_the_site(tmp_path):
    """A plan file edited by hand, malformed at any level, is a ValueError (the CLI's one-line
    error) that says where, never an AttributeError or KeyError from inside the parser."""
    good = mr.Plan({"a": mr.MTAConfig(8), "b": "exact"}).to_dict()
    cases = [
        ([1, 2], "not an mta-rewrite plan"),
        ({**good, "sites": [1]}, "a plan's sites must be an object of site name → entry, got list"),
        ({**good, "metadata": 3}, "a plan's metadata must be an object, got int"),
        ({**good, "sites": {"a": 5}}, "plan site 'a': a site's entry is an object with a \"config\", got 5"),
        ({**good, "sites": {"a": {"config": "fast"}}}, "plan site 'a': config must be 'exact' or an object"),
        ({**good, "sites": {"a": {"config": {"chunk_size": 8, "window": 2}}}}, "plan site 'a': unknown MTAConfig fields"),
        ({**good, "sites": {"a": {"config": {"head_groups": [{"config": "exact"}]}}}}, "plan site 'a': missing field 'heads'"),
        ({**good, "sites": {"a": {"config": {"chunk_size": 0}}}}, "plan site 'a': chunk_size must be an integer ≥ 1"),
        ({**good, "sites": {"a": {"config": {"chunk_size": 2 ** 64}}}}, "plan site 'a': chunk_size must be an integer ≥ 1 "
                                                                        "below 2**63"),
        # (a random search of mutated plans, 2026-12-06: "'float' object is not iterable")
        ({**good, "boundaries": {"separators": 1.5}}, "boundaries' separators must be a list of token ids, got 1.5"),
        ({**good, "boundaries": {"separators": [2 ** 63]}}, "non-negative token ids (below 2**63)"),
    ]
    import json

    for data, message in cases:
        with pytest.raises(ValueError) as info:
            mr.Plan.from_json(json.dumps(data))
        assert message in str(info.value), (data, str(info.value))
    assert mr.Plan.from_dict(good) == mr.Plan({"a": mr.MTAConfig(8), "b": "exact"})


SAVE_LOAD_CHILD = """
import sys, torch, mta_rewrite
ep = torch.export.load(sys.argv[1])
x = torch.load(sys.argv[2])
torch.save(ep.module()(x), sys.argv[3])
"""


def test_rewritten_program_saves_and_loads_in_a_fresh_process(tmp_path):
    case = next(c for c in zoo.hand_written_cases() if c.name == "gqa_expand_causal_buffer")
    model = case.build()
    (x,), _ = case.inputs(24)
    rewritten = mr.rewrite(model, (x,), config=mr.MTAConfig(chunk_size=4, top_k=1))
    ep = mr.capture(rewritten, (x,))  # torch.export, dynamic sequence length
    assert mr.count_mta_nodes(ep) == 1
    torch.export.save(ep, tmp_path / "model.pt2")
    x2 = torch.randn(2, 50, 32)
    torch.save(x2, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", SAVE_LOAD_CHILD, str(tmp_path / "model.pt2"), str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), rewritten(x2))


def test_head_groups_are_exactly_the_reference_per_head():
    case = next(c for c in zoo.hand_written_cases() if c.name == "einsum_gqa_repeat_interleave")
    model = case.build()
    (x,), _ = case.inputs(40)
    cfg = mr.MTAConfig(6, sinks=2, top_k=1)
    groups = mr.HeadGroups(((cfg, (0, 3)), (None, (1, 2))))
    plan = mr.Plan({"root": groups})
    assert mr.Plan.from_json(plan.to_json()) == plan
    rewritten = mr.rewrite(model, (x,), plan=plan)
    q, k, v = model.heads(x)
    approx = mta_attention_reference(q, k, v, scale=model.dh ** -0.5, **cfg.op_kwargs())
    exact = mta_attention_reference(q, k, v, scale=model.dh ** -0.5, chunk_size=10**6)
    want = approx.clone()
    want[:, 1:3] = exact[:, 1:3]
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), model.merge(want.float()), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exactly once"):
        mr.HeadGroups(((cfg, (0, 1)), (None, (1, 2))))
    # learned summaries per group: each approximated head's summaries use its key/value head's row
    w = torch.randn(k.shape[1], k.shape[3], generator=torch.Generator().manual_seed(2))
    learned = mr.rewrite(model, (x,), plan=mr.Plan({"root": mr.Learned.from_tensor(groups, w)}))
    want = exact.clone()
    approx = mta_attention_reference(q, k, v, scale=model.dh ** -0.5, summary_weight=w, **cfg.op_kwargs())
    want[:, [0, 3]] = approx[:, [0, 3]]
    with torch.no_grad():
        torch.testing.assert_close(learned(x), model.merge(want.float()), rtol=1e-5, atol=1e-5)


class _MaskShapedLikeQ(torch.nn.Module):
    """Masks built from q's size and dtype only (`torch.ones(q.size(-2), …)`, `.type_as(q)`)."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x, pad):
        B, n, _ = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / 8 ** 0.5
        bias = torch.where(pad, 0.0, -1e9)[:, None, None, :].type_as(q)
        tri = torch.ones(q.size(-2), q.size(-2), dtype=torch.bool, device=q.device).tril()
        return (s + bias).masked_fill(~tri, float("-inf")).softmax(-1) @ v


def test_a_mask_built_to_qs_size_and_dtype_is_still_a_mask():
    """Only a term computed from q's or k's values is score function (relative_scores_from_q);
    one that reads q's size or dtype is a mask, and the site is rewritten (and exact with one chunk)."""
    x = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(0))
    pad = torch.ones(2, 24, dtype=torch.bool)
    pad[0, -4:] = False
    model = _MaskShapedLikeQ().eval()
    sites = mr.find_attention(model, (x, pad))
    assert [(s.rewritable, s.mask) for s in sites] == [(True, "additive+bool")], [s.reason for s in sites]
    with torch.no_grad():
        torch.testing.assert_close(mr.rewrite(model, (x, pad), config=EXACT)(x, pad), model(x, pad), rtol=1e-5, atol=1e-5)


def test_learned_configuration_validation_and_json():
    cfg = mr.MTAConfig(8, sinks=2)
    learned = mr.Learned(cfg, ((0.5, -1.0), (2.0, 0.0)))
    assert learned.short == "c8·L1·s2·k0·learned"
    plan = mr.Plan({"a": learned, "b": cfg, "c": "exact"})
    again = mr.Plan.from_json(plan.to_json())
    assert again == plan and again.config_for("a") == learned and again.config_for("b") == cfg
    assert torch.equal(again.config_for("a").tensor(), torch.tensor([[0.5, -1.0], [2.0, 0.0]]))
    with pytest.raises(ValueError, match="rows of one length"):
        mr.Learned(cfg, ((1.0, 2.0), (3.0,)))
    with pytest.raises(ValueError, match="MTAConfig or HeadGroups"):
        mr.Learned("exact", ((1.0,),))


def test_learned_summaries_reach_the_op_of_every_site_that_has_them():
    """rewrite gives a learned site's op its weight (a buffer of the module) and the others none;
    the rewritten model differs from the one with means only there."""
    case = next(c for c in zoo.hand_written_cases() if c.name == "two_layers")
    model = case.build()
    args, kwargs = case.inputs(40)
    sites = [s for s in mr.find_attention(model, args, kwargs) if s.rewritable]
    cfg = mr.MTAConfig(8, sinks=1)
    w = torch.randn(sites[0].kv_heads, sites[0].head_dim, generator=torch.Generator().manual_seed(0))
    fast = mr.rewrite(model, args, kwargs, plan=mr.Plan({sites[0].name: mr.Learned.from_tensor(cfg, w),
                                                          sites[1].name: cfg}))
    ops = [n for n in fast.graph.nodes if n.target is torch.ops.mta.attention.default]
    assert [n.args[4] is not None for n in ops] == [True, False]
    assert torch.equal(getattr(fast, ops[0].args[4].target), w)
    means = mr.rewrite(model, args, kwargs, config=cfg)
    a, kw = case.inputs(57)
    with torch.no_grad():
        assert (fast(*a, **kw) - means(*a, **kw)).abs().max() > 1e-4


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
@pytest.mark.parametrize("padded", [False, True])
def test_exact_sites_with_a_mask_run_the_ops_exact_path(padded):
    """A site the plan leaves exact that calls SDPA with transformers' materialised mask runs
    through the op with one chunk (the mask recognised by value, the triangle as is_causal): the
    model's output is unchanged (within float error), and lower_exact=False keeps the
    captured SDPA call."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   use_cache=False, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(1))
    kwargs = {"input_ids": ids}
    if padded:
        mask = torch.ones(2, 96, dtype=torch.long)
        mask[1, 80:] = 0
        kwargs["attention_mask"] = mask
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = mr.capture(model, (), kwargs)  # once: find_attention and rewrite take the program
        sites = mr.find_attention(program)
        assert len(sites) == 3 and all(s.rewritable and s.mask != "none" for s in sites)
        plan = mr.Plan({sites[1].name: mr.MTAConfig(32, 1, 4, 0)})
        fast = mr.rewrite(program, plan=plan)
        kept = mr.rewrite(program, plan=plan, lower_exact=False)

    def op_chunks(gm):
        return sorted(n.kwargs["chunk_size"] for n in gm.graph.nodes if n.target is torch.ops.mta.attention.default)

    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    assert op_chunks(fast) == [32, 1 << 30, 1 << 30]  # the planned site, and the two exact ones
    assert op_chunks(kept) == [32] and sum(n.target is sdpa for n in kept.graph.nodes) == 2
    assert mr.api.count_mta_nodes(fast) == mr.api.count_mta_nodes(kept) == 1  # the sites that run MTA
    with torch.no_grad():
        got, want = first_tensor(fast(**kwargs)), first_tensor(kept(**kwargs))
    real = slice(None) if not padded else (kwargs["attention_mask"].bool())
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)


class _Unregistered:
    def __init__(self, y):
        self.y = y


class _ReturnsAnUnregisteredObject(torch.nn.Module):
    def forward(self, x):
        return _Unregistered(torch.softmax(x @ x.transpose(-1, -2), dim=-1) @ x)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
def test_a_model_returning_what_a_graph_cannot_is_one_clear_error():
    """A language model called without use_cache=False returns a KV cache object, which no graph
    can return: one CaptureError that says what to do, at once (not after a static capture that
    fails the same way, with a warning blaming the dynamic shapes)."""
    model = zoo._hf(lambda t: t.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_positions=64),
                    "GPT2LMHeadModel", "sdpa")()
    model.config.use_cache = True  # as a pretrained model comes
    ids = torch.randint(0, 100, (1, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "dynamic capture failed" fallback warning
        with pytest.raises(mr.CaptureError, match=r"its output holds a transformers\.cache_utils\.\w*Cache, "
                                                          r"which a graph cannot return \(a KV cache: call the model "
                                                          r"with use_cache=False\)"):
            mr.rewrite(model, (ids,), config=mr.MTAConfig(8))
        with pytest.raises(mr.CaptureError, match="_Unregistered, which a graph cannot return .register it"):
            mr.find_attention(_ReturnsAnUnregisteredObject(), (torch.randn(1, 8, 4),))
    with torch.no_grad():  # called as the message says, it captures and rewrites
        fast = mr.rewrite(model, (ids,), {"use_cache": False}, config=EXACT)
        assert mr.count_mta_nodes(fast) == 1  # the one layer, as one chunk: equal to the model
        torch.testing.assert_close(fast(ids, use_cache=False).logits, model(ids, use_cache=False).logits)


class _BranchesOnData(torch.nn.Module):
    """A forward that branches on a data-dependent size (as Kolibri-1.1's indexer does, on the
    unique rows of its mask)."""

    def forward(self, x):
        if len(torch.unique(x[:, 0].long())) == 0:
            return x
        return torch.softmax(x @ x.transpose(-1, -2), dim=-1) @ x


def test_a_data_dependent_branch_is_one_error_without_torchs_graph_dump(capfd):
    """torch.export prints the whole graph traced so far to stderr when a data-dependent guard stops
    it (once per wrapper: thousands of lines for a language model); capture keeps that out, and
    the error says what stopped it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(mr.CaptureError, match="torch.export could not capture _BranchesOnData: .*data-dependent"):
            mr.find_attention(_BranchesOnData(), (torch.randn(4, 8),))
    err = capfd.readouterr().err
    assert "def forward" not in err, err[:300]


class _FlexAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):
        from torch.nn.attention.flex_attention import flex_attention

        B, n, _ = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        return flex_attention(q, k, v).transpose(1, 2).reshape(B, n, 32)


def test_a_compiled_model_is_rewritten_as_the_model_it_wraps():
    """``torch.compile(model)`` captures as ``model``: its sites were named ``_orig_mod.layers.0``,
    so a plan written for the model (or calibrated on it) named sites the compiled one "lacks"."""
    case = next(c for c in zoo.hand_written_cases() if c.name == "two_layers")
    model = case.build()
    args, kwargs = case.inputs(24)
    compiled = torch.compile(model)
    assert [s.name for s in mr.find_attention(compiled, args, kwargs)] == ["layers.0", "layers.1"]
    plan = mr.Plan({"layers.1": mr.MTAConfig(8, sinks=2)})
    fast = mr.rewrite(compiled, args, kwargs, plan=plan)
    a, kw = case.inputs(40)
    torch.testing.assert_close(fast(*a, **kw), mr.rewrite(model, args, kwargs, plan=plan)(*a, **kw), rtol=0, atol=0)


def test_flex_attention_is_reported_and_left_exact():
    """FlexAttention's masks and score changes are programs over positions (``mask_mod``,
    ``score_mod``), which the op cannot take. ``find_attention`` said nothing of it (no site at
    all, as if the model had no attention); it is now a ``flex`` site with the reason and what to
    do, and a rewrite leaves it exact with the usual warning, and runs (the rewrite's dead-code pass
    dropped functorch's vmap level changes around the block-mask code, which fx counts pure: "your
    tensor may have escaped from inside a function being vmapped"). A transformers model loaded with
    ``attn_implementation="flex_attention"`` does not capture on the CPU at all: one CaptureError
    saying to load it with SDPA or eager attention (it was torch's "FlexAttention does not support
    backward on CPU", after a warning blaming dynamic shapes); a module that calls FlexAttention
    itself, with gradients: one CaptureError saying to capture it without them."""
    model = _FlexAttention().eval().requires_grad_(False)  # (FlexAttention captures on the CPU without grads)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    # (rewrite first: once torch.export has traced FlexAttention at static shapes, as find_attention
    # does, its later dynamic captures of the model come out specialised to the example: torch's state)
    with pytest.warns(UserWarning, match=r"1 attention site\(s\) asked for MTA left exact \(root: FlexAttention"):
        fast = mr.rewrite(model, (x,), config=mr.MTAConfig(4))
    y = torch.randn(3, 24, 32)
    torch.testing.assert_close(fast(y), model(y))  # (it failed: the rewrite's clean-up dropped vmap's level changes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own notes on FlexAttention in eager mode
        (site,) = mr.find_attention(model, (x,))
        assert (site.kind, site.mask, site.rewritable, site.q_heads, site.seq_len) == ("flex", "block mask", False, 4, 16)
        assert 'attn_implementation="sdpa"' in site.reason
    # with gradients, on the CPU: no transformers model to load otherwise, so the way round is to
    # capture without them (until 2026-12-08 it said to load the model with attn_implementation="sdpa")
    with pytest.raises(mr.CaptureError) as info:
        mr.capture(_FlexAttention().eval(), (x,))
    assert str(info.value) == (
        "torch.export could not capture _FlexAttention, which runs FlexAttention (FlexAttention does not support "
        "backward on CPU. Please set the input requires_grad to False or use another device.): capture it without "
        "gradients (under torch.no_grad(), or its parameters requires_grad_(False): FlexAttention has no backward on "
        "the CPU); its FlexAttention then stays exact (a flex site) and its other attention can be rewritten")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [s.kind for s in mr.find_attention(_FlexAttention().eval(), (x,))] == ["flex"]
    if not HAS_TRANSFORMERS:
        return
    llama = zoo._hf(lambda t: t.LlamaConfig(vocab_size=100, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                            intermediate_size=64, num_hidden_layers=1, max_position_embeddings=64),
                    "LlamaForCausalLM", "flex_attention")()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="dynamic capture failed")  # at once, no fallback
        with pytest.raises(mr.CaptureError, match=r"LlamaForCausalLM, which runs FlexAttention \(.*\): load it with "
                                                  r'attn_implementation="sdpa" or "eager"'):
            mr.find_attention(llama, (torch.randint(0, 100, (2, 16)),), {"use_cache": False})


def test_batch_of_two_check_compares_outputs_piece_by_piece(monkeypatch):
    """The check of a program captured at batch 2 against the model compares outputs within
    rounding, relative to the largest magnitude, in pieces (SmolLM2's logits at 8K tokens are 1.6 GB:
    whole float64 copies took the capture past 24 GB; a 2K capture now peaks at 2.1 GB instead of
    7.6). Pieces of 5 elements: every verdict must see past the first."""
    import importlib

    capture = importlib.import_module("mta_rewrite.capture")
    monkeypatch.setattr(capture, "_COMPARE_ELEMENTS", 5)
    g = torch.Generator().manual_seed(0)
    e = torch.randn(3, 7, generator=g) * 1000
    same = capture._same_outputs
    assert same({"logits": e, "n": 3}, {"logits": e.clone(), "n": 3})
    near = e.clone()
    near[2, 6] += 0.05  # 5e-5 of the largest magnitude (~2000)
    assert same(e, near)
    far = e.clone()
    far[2, 6] += 1.0  # 5e-4 of it
    assert not same(e, far)
    holes = e.clone()
    holes[1, 3], holes[2, 5] = float("inf"), float("nan")
    assert same(holes, holes.clone())
    one_sided = holes.clone()
    one_sided[2, 5] = 0.0
    assert not same(holes, one_sided)
    z = torch.complex(e, e)
    imag = z.clone()
    imag[2, 6] = torch.complex(z[2, 6].real, z[2, 6].imag + 1.0)  # (float64 copies kept the real parts only)
    assert same(z, z.clone()) and not same(z, imag)
    assert not same(e, e.double()) and not same(e, e[:2])
    assert not same((e,), [e]) and not same({"n": 3}, {"n": 4})


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
def test_an_example_of_one_sequence_captures_a_program_for_any_batch():
    """torch.export fixes a dimension of size 1 at 1: a language model rewritten from one sequence
    (the usual example) took batches of one only ("Guard failed: input_ids.size()[0] == 1" at
    batch 3). Capture widens such an example to batch 2 and checks the program against the model
    at the example: the program and its rewrites now take any batch."""
    model = zoo._hf(lambda t: t.LlamaConfig(vocab_size=100, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                            intermediate_size=64, num_hidden_layers=1, max_position_embeddings=256),
                    "LlamaForCausalLM", "sdpa")()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 100, (1, 40), generator=gen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = mr.capture(model, (ids,))
        fast = mr.rewrite(program, config=mr.MTAConfig(8, 1))
        exact = mr.rewrite(program, config=EXACT)
    assert not [w for w in caught if "batches of one" in str(w.message)]
    batch = torch.randint(0, 100, (3, 29), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(batch).logits, model(batch).logits)
        torch.testing.assert_close(exact(batch).logits, model(batch).logits, rtol=1e-4, atol=1e-4)
        one_by_one = torch.cat([fast(batch[i:i + 1]).logits for i in range(3)])
        torch.testing.assert_close(fast(batch).logits, one_by_one, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(fast(batch).logits, model(batch).logits, atol=1e-3)  # MTA, not exact


class _BranchesOnABatchOfOne(torch.nn.Module):
    def forward(self, x):
        if x.shape[0] == 1:  # a model may treat one sequence differently: a program from batch 2 would not
            x = x * 2
        return torch.softmax(x @ x.transpose(-1, -2), dim=-1) @ x


def test_a_batch_of_one_the_model_treats_apart_stays_fixed_with_a_warning():
    """Widening is checked: where the program captured at batch 2 does not reproduce the model at
    the example's batch of one, the example is captured as given, and a warning says the program
    takes batches of one only."""
    model, x = _BranchesOnABatchOfOne().eval(), torch.randn(1, 12, 8)
    with pytest.warns(UserWarning, match=r"takes batches of one only \(the program captured at batch 2 does not "
                                         r"reproduce the model's outputs at batch 1\)"):
        program = mr.capture(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x))
    with pytest.raises(Exception, match="Guard failed"):
        program.module()(torch.randn(2, 12, 8))


class _CausalOnlyWhileExporting(torch.nn.Module):
    """Attention that is causal while torch.export traces it and bidirectional when run, as
    transformers' PaliGemma with SDPA and no token_type_ids is (the causal mask built only while
    exporting, ``is_causal`` False); or, ``differs=False``, causal either way."""

    def __init__(self, differs: bool = True):
        super().__init__()
        self.differs = differs

    def forward(self, x):
        return F.scaled_dot_product_attention(x, x, x, is_causal=torch.compiler.is_exporting() or not self.differs)


@pytest.mark.parametrize("batch", [1, 2])
def test_a_program_that_does_not_reproduce_the_model_is_captured_with_a_warning(batch):
    """capture checks the program against the model on the example it was captured from, at any
    batch, and says where they differ and by how much: until 2026-12-07 only a program widened
    from batch 1 was checked, and a program traced down another path than the model runs (PaliGemma
    with SDPA) was captured, rewritten and calibrated with no word."""
    model, x = _CausalOnlyWhileExporting().eval(), torch.randn(batch, 2, 16, 8)
    with pytest.warns(UserWarning, match=r"the captured program does not reproduce _CausalOnlyWhileExporting on the "
                                         r"example \(the output differs by up to [0-9.]+ where the model's largest "
                                         r"value is [0-9.]+\): torch.export traced another path") as caught:
        program = mr.capture(model, (x,))
    # (what it warns about: the program is causal, the model is not)
    torch.testing.assert_close(program.module()(x), F.scaled_dot_product_attention(x, x, x, is_causal=True))
    if batch == 1:  # the batch-2 program is off the model as the example's own: kept, it takes any batch
        assert len(caught) == 1, [str(w.message) for w in caught]
        y = torch.randn(3, 2, 16, 8)
        torch.testing.assert_close(program.module()(y), F.scaled_dot_product_attention(y, y, y, is_causal=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mr.capture(_CausalOnlyWhileExporting(differs=False).eval(), (x,))  # (a program that agrees: no warning)


class _PositionsFromNumpy(torch.nn.Module):
    """Attention over positions that numpy computes from the length: a SymInt in np.arange makes
    an array of objects, which np.sin does not take, so dynamic capture fails and only the
    example's length captures."""

    def __init__(self, attend=F.scaled_dot_product_attention):
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.attend = torch.nn.Linear(16, 48), attend

    def forward(self, x):
        import numpy as np

        n = x.shape[1]
        x = x + torch.from_numpy(np.sin(np.arange(n) / 7.0)).float()[:, None]
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return self.attend(q, k, v).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("batch", [1, 2])
def test_a_model_dynamic_capture_fails_on_is_captured_at_its_shapes_and_rewritten(batch):
    """Where dynamic capture fails for a reason about shapes, capture falls back to the example's
    static shapes with a warning. The fallback failed the same way ("torch.export could not
    capture …: loop of ufunc does not support argument 0 of type float"): torch.export marks the example's
    tensors dynamic and removes the marks only when it succeeds, so the static capture traced the
    same tensors as dynamic, and the caller's tensors kept the marks. A failed capture now leaves
    them as they were: the model is captured at its shapes and rewritten (against the float64
    reference), and the same tensors export statically after."""
    model, x = _PositionsFromNumpy().eval(), torch.randn(batch, 20, 16, generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match=r"dynamic capture failed \(loop of ufunc .*\); capturing with the "
                                         r"example's static shapes"):
        program = mr.capture(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))
        fast = mr.rewrite(program, config=mr.MTAConfig(4, 1, 2, 1))(x)
        want = _PositionsFromNumpy(lambda q, k, v: mta_attention_reference(
            q, k, v, chunk_size=4, local_chunks=1, sinks=2, top_k=1).float())(x)
    assert mr.count_mta_nodes(mr.rewrite(program, config=mr.MTAConfig(4, 1, 2, 1))) == 1
    torch.testing.assert_close(fast, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fast, model(x), atol=1e-3)  # MTA, not exact
    torch.export.export(model, (x,), strict=False)  # (failed before: the tensors still marked dynamic)


def test_capture_leaves_the_examples_dimension_marks_as_they_were():
    """A caller's own marks (``torch._dynamo.mark_dynamic``, as for torch.compile) made the static
    capture (``dynamic=False``, and the fallback) dynamic in the marked dimension, and a dynamic
    capture removed them from the caller's tensor. Each capture now traces without them where it is
    static and leaves them as they were."""
    model, x = _PositionsFromNumpy(lambda q, k, v: F.scaled_dot_product_attention(q, k, v)).eval(), zoo._x(20, d=16)
    x = x + 0  # (the zoo's tensors are shared)
    torch._dynamo.mark_dynamic(x, 0)
    marks = {name: value for name, value in vars(x).items()}
    assert marks, "mark_dynamic sets attributes on the tensor"
    with pytest.warns(UserWarning, match="capturing with the example's static shapes"):
        program = mr.capture(model, (x,))  # (dynamic fails: numpy over the length; then static)
    (shape,) = [n.meta["val"].shape for n in program.graph.nodes if n.op == "placeholder" and n.name == "x"]
    assert all(isinstance(size, int) for size in shape), shape
    assert vars(x) == marks
    assert mr.capture(_BranchesOnABatchOfOne(), (x,)) is not None and vars(x) == marks  # (a dynamic capture)


class _RelativeScoresFromQBeforeItsBias(zoo.RelativeScoresFromQ):
    """Funnel's form of relative attention: the content scores take q plus a learned bias, the
    position scores q before that bias (plus another): the term added to the scores is computed
    from the layer's q, one step before the q of the product."""

    def __init__(self):
        super().__init__()
        self.content_bias = torch.nn.Parameter(torch.randn(self.h, 1, self.dh) * 0.1)
        self.position_bias = torch.nn.Parameter(torch.randn(self.h, 1, self.dh) * 0.1)

    def forward(self, x):
        q, k, v = self.heads(x)
        n = x.shape[1]
        pos = torch.arange(n)
        c2p = (q + self.position_bias) @ self.rel.T
        index = (pos[None, :] - pos[:, None] + 255).expand(*c2p.shape[:2], n, n)
        s = (q + self.content_bias) @ k.transpose(-1, -2) / math.sqrt(self.dh) + torch.gather(c2p, -1, index)
        return self.merge(s.softmax(-1) @ v)


def test_relative_scores_from_q_before_a_bias_are_not_a_mask():
    """Funnel's relative attention was rewritten, its position scores taken for a bias mask: the
    check for terms computed from the layer's q looked for q itself, and the product's q is
    q + bias. It now also looks through what q is made of before the product (a bias, a scale,
    views)."""
    (site,) = mr.find_attention(_RelativeScoresFromQBeforeItsBias().eval(), (zoo._x(24),))
    assert not site.rewritable and "is computed from the layer's q or k" in site.reason, site.reason


class _ReadsTwoInputs(torch.nn.Module):
    def forward(self, a, b):
        return a.cumsum(-1) + 2 * b.flip(-1)


def test_an_example_that_gives_one_tensor_twice_captures_two_inputs():
    """torch.export merges inputs that alias each other: from ``(x, x)`` it captured a program that
    reads the second input in place of the first (off by 3 on other inputs), and a cross-attention
    layer called with its memory = x looked like self-attention and was rewritten. capture now
    copies a tensor the example gives again (``model(ids, labels=ids)``, ``decoder_input_ids=ids``)."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 5, generator=gen), torch.randn(2, 5, generator=gen)
    program = mr.capture(_ReadsTwoInputs(), (x, x))
    torch.testing.assert_close(program.module()(x, y), _ReadsTwoInputs()(x, y))
    cross = zoo.CrossAttention().eval()
    x, memory = zoo._x(24), zoo._x(24, seed=1)
    (site,) = mr.find_attention(cross, (x, x))
    assert not site.rewritable and site.reason.startswith("cross-attention: q and k are computed from different"), \
        site.reason
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (nothing rewritable: rewrite says so)
        fast = mr.rewrite(cross, (x, x), config=mr.MTAConfig(4))
    with torch.no_grad():
        torch.testing.assert_close(fast(x, memory), cross(x, memory))


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
def test_the_rewritten_model_binds_its_calls_by_name_as_the_model_does(tmp_path):
    """A language model captured as ``model(ids, use_cache=False)`` and rewritten took exactly that
    call: ``fast(ids)`` and ``fast(input_ids=ids, use_cache=False)`` failed with torch's "Ran into
    a kwarg keyword mismatch". Calls now bind by parameter name as the model's forward does; a
    flag given another value than the captured one, or an input the capture did not have, is a
    ValueError saying so. The module still captures and saves from a call written either way."""
    model = zoo._hf(lambda t: t.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_positions=64),
                    "GPT2LMHeadModel", "sdpa")()
    gen = torch.Generator().manual_seed(5)
    ids, other = torch.randint(0, 100, (2, 24), generator=gen), torch.randint(0, 100, (3, 17), generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = mr.rewrite(model, (ids,), {"use_cache": False}, config=mr.MTAConfig(4, 1))
    with torch.no_grad():
        want = fast(other, use_cache=False).logits  # the captured form
        assert (want - model(other, use_cache=False).logits).abs().max() > 1e-4  # MTA, not exact
        for got in (fast(other), fast(input_ids=other), fast(other, False), fast(input_ids=other, use_cache=False)):
            torch.testing.assert_close(got.logits, want, rtol=0, atol=0)
    errors = {"it gives use_cache=True, and the model was captured with use_cache=False": dict(use_cache=True),
              "the captured model takes no input 'attention_mask'": dict(attention_mask=torch.ones_like(other))}
    for message, kwargs in errors.items():
        with pytest.raises(ValueError, match=r"this call does not fit the rewritten model, captured as "
                                             rf"model\(input_ids, use_cache=False\): {message}"):
            fast(other, **kwargs)
    # the example written as a calibration sample is (a dict of the forward's inputs: keyword
    # arguments; it was one positional argument: "'dict' object has no attribute 'size'"), and a
    # configuration given where the keyword arguments go is a TypeError that says so
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_dict = mr.rewrite(model, {"input_ids": ids, "use_cache": False}, config=mr.MTAConfig(4, 1))
    with torch.no_grad():
        torch.testing.assert_close(from_dict(other).logits, want, rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"kwargs must be a dict of keyword arguments, got MTAConfig \(a configuration "
                                        r"or a plan is given by name"):
        mr.rewrite(model, (ids,), mr.MTAConfig(4, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mr.save_program(fast, tmp_path / "fast.pt2", (ids,))  # captured from fast(ids)
    with torch.no_grad():
        # (torch.export's own module: called as it was captured, fast(ids) bound to fast(ids, use_cache=False))
        torch.testing.assert_close(mr.load_program(tmp_path / "fast.pt2").module()(other, use_cache=False).logits, want)
    # capturing the rewritten model from an example it does not take says so, before torch.export runs
    with pytest.raises(mr.CaptureError, match=r"^the example does not fit the rewritten model, captured as "
                                              r"model\(input_ids, use_cache=False\): it gives use_cache=True"):
        mr.save_program(fast, tmp_path / "wrong.pt2", (ids,), {"use_cache": True})
    assert not (tmp_path / "wrong.pt2").exists()
    with pytest.raises(TypeError, match=r"^expected a torch.nn.Module or ExportedProgram, got function"):
        mr.capture(lambda x: x, (ids,))


def test_save_program_writes_a_temporary_file_torch_takes_without_a_warning(tmp_path):
    """save_program writes through a temporary file that ends in .pt2 as the file asked for does:
    torch.export.save logs a warning for any other name ("Expect archive file to be a file ending
    in .pt2, or is a buffer. Instead got {…/.fast.pt2.x1y2.tmp}", on every save through the API
    before). Nothing but the program is left in the folder."""
    log = logging.getLogger("torch.export.pt2_archive._package")
    records = []

    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    keep, level = _Keep(level=logging.DEBUG), log.level
    log.addHandler(keep)
    log.setLevel(logging.WARNING)  # (the suite's other modules quiet torch.export's loggers)
    try:
        mr.save_program(torch.nn.Linear(4, 4), tmp_path / "fast.pt2", (torch.randn(3, 4),), dynamic=False)
    finally:
        log.removeHandler(keep)
        log.setLevel(level)
    assert not records, records
    assert [p.name for p in tmp_path.iterdir()] == ["fast.pt2"]
    ep, x = mr.load_program(tmp_path / "fast.pt2"), torch.randn(3, 4)
    torch.testing.assert_close(ep.module()(x), x @ ep.state_dict["weight"].T + ep.state_dict["bias"])


class _ScalesLengthsOfFour(torch.nn.Module):
    """Attention whose code depends on the sequence length: torch.export keeps the length dynamic
    but records that it is a multiple of 4 (the example's, 24, is)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)

    def forward(self, x):
        B, n, _ = x.shape
        q, k, v = self.proj(x).view(B, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y * 2 if n % 4 == 0 else y


def test_a_call_the_programs_shape_guards_refuse_is_a_one_line_error():
    """A rewritten model called with a shape its program's guards refuse (a length the model's code
    constrained at capture, a batch torch.export fixed at 1) raised torch's bare ``AssertionError:
    Guard failed: x.size()[1] % 4 == 0`` from inside its graph. It is a ValueError that says what
    the program requires and why; a call that satisfies the guards runs as before."""
    torch.manual_seed(0)
    model = _ScalesLengthsOfFour().eval()
    fast = mr.rewrite(model, (torch.randn(2, 24, 16),), config=mr.MTAConfig(8, 1))
    ok = torch.randn(3, 28, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(ok), mr.rewrite(model, (ok,), config=mr.MTAConfig(8, 1))(ok), rtol=0, atol=0)
        with pytest.raises(ValueError, match=r"^this call does not fit the rewritten model, which requires "
                                             r"x\.size\(\)\[1\] % 4 == 0 \(a condition torch\.export recorded when "
                                             r"it captured the model, whose code depends on that size: give inputs "
                                             r"that satisfy it\)$"):
            fast(torch.randn(2, 37, 16))
    # a program the user captured from one sequence: torch.export fixed its batch at 1
    x = torch.randn(1, 24, 16)
    dims = {"x": {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO}}
    one = mr.rewrite(torch.export.export(model, (x,), dynamic_shapes=dims, strict=False), (x,),
                     config=mr.MTAConfig(8, 1))
    with torch.no_grad(), pytest.raises(ValueError, match=r"which requires x\.size\(\)\[0\] == 1 \(torch\.export "
                                                          r"fixes every size of 0 or 1 in the example it captures "
                                                          r"from: capture again from an example where that size is "
                                                          r"larger\)$"):
        one(torch.randn(2, 24, 16))


class _InputsThroughKwargs(torch.nn.Module):
    """A flag and a tensor reaching forward through ``**kwargs``, as ``return_dict`` reaches every
    transformers 5 model and ``use_cache`` GraniteMoE's."""

    def forward(self, x, **kwargs):
        if kwargs.get("bias") is not None:
            x = x + kwargs["bias"]
        y = torch.softmax(x @ x.transpose(-1, -2), dim=-1) @ x
        return y * 2 if kwargs.get("flag") else y


def test_inputs_through_kwargs_are_captured_with_dynamic_shapes():
    """torch.export (non-strict) cannot match dynamic shapes to inputs passed through the forward's
    ``**kwargs`` ("Must provide a tree_name when there might be a mismatch"): capture fell back to
    the example's static shapes, so a transformers 5 model rewritten from ``model(ids,
    return_dict=False)`` took that batch and length only. Such inputs are now named in the
    forward's signature while torch.export runs: the program takes any length, flags as captured,
    tensors as inputs; the model's forward is as it was after."""
    model, gen = _InputsThroughKwargs(), torch.Generator().manual_seed(2)
    x, bias = torch.randn(2, 8, 4, generator=gen), torch.randn(4, generator=gen)
    hooked = _InputsThroughKwargs()
    hooked.forward = lambda *args, **kwargs: 3 * _InputsThroughKwargs.forward(hooked, *args, **kwargs)  # as accelerate
    for m, scale in ((model, 1), (hooked, 3)):
        forward = m.__dict__.get("forward")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            program = mr.capture(m, (x,), {"flag": True, "bias": bias})
        assert m.__dict__.get("forward") is forward
        longer, other = torch.randn(3, 13, 4, generator=gen), torch.randn(4, generator=gen)
        want = scale * 2 * _InputsThroughKwargs()(longer, bias=other)
        torch.testing.assert_close(program.module()(longer, flag=True, bias=other), want)
    # transformers 5: return_dict and output_hidden_states go through **kwargs
    llama = zoo._hf(lambda t: t.LlamaConfig(vocab_size=100, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                            intermediate_size=64, num_hidden_layers=1, max_position_embeddings=256),
                    "LlamaForCausalLM", "eager")()
    ids, batch = torch.randint(0, 100, (2, 24), generator=gen), torch.randint(0, 100, (3, 40), generator=gen)
    flags = {"return_dict": False, "output_hidden_states": True}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = mr.rewrite(llama, (ids,), flags, config=EXACT)
    with torch.no_grad():
        got, want = exact(batch), llama(batch, **flags)
    assert isinstance(got, tuple) and len(got) == len(want) == 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class _InnerSizeOff(torch.nn.Module):
    """A model whose shapes do not fit its example: the product fails on fake tensors already."""

    def forward(self, x):
        return x @ torch.ones(x.shape[-1] + 1, 4)


def test_a_model_failing_on_fake_tensors_is_one_error_without_torchs_logged_traceback(capfd):
    """torch logs an operator's failure on fake tensors at ERROR with its traceback (twenty lines
    of torch's internals) before raising it; capture's error gives the reason in one line, and
    the record reaches no handler (one on torch's logger itself here: pytest's own capture of
    logging would hide it from stderr), and nothing else reaches stderr."""
    import logging

    log = logging.getLogger("torch._subclasses.fake_tensor")
    records = []

    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    keep = _Keep(level=logging.DEBUG)
    before = list(log.filters)
    log.addHandler(keep)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (dynamic capture failed; the static one fails the same way)
            with pytest.raises(mr.CaptureError, match=r"could not capture _InnerSizeOff: .*same reduction dim"):
                mr.capture(_InnerSizeOff(), (torch.randn(2, 8, 4),))
    finally:
        log.removeHandler(keep)
    assert not [r for r in records if "failed while attempting to run meta" in r], records
    err = capfd.readouterr().err
    assert "Traceback" not in err, err[:300]
    assert log.filters == before  # the logger as it was


def test_a_model_that_fails_on_its_example_is_said_to(capfd):
    """When export fails and the model (in eval mode) fails on the example by itself, the error
    is the model's own ("X fails on the example: TypeError: …"), at once: no warning that dynamic
    capture failed, no second, static capture failing the same way. Such an error read as a limit
    of torch.export ("torch.export could not capture …: … unexpected keyword argument", from a
    TransformerEncoder called with its layer's keyword). In training mode the model is not run
    (dropout, running statistics): the error is torch.export's, as before."""

    class _WrongKeyword(torch.nn.Module):
        def __init__(self):
            super().__init__()
            layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
            self.encoder = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

        def forward(self, x):
            return self.encoder(x, src_mask=None)  # (TransformerEncoder's keyword is mask)

    x, x4 = torch.randn(2, 8, 16), torch.randn(2, 8, 4)
    for model, dynamic in ((_InnerSizeOff().eval(), True), (_InnerSizeOff().eval(), False), (_WrongKeyword().eval(), True)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (no warning: the dynamic capture's failure is the model's)
            with pytest.raises(mr.CaptureError) as info:
                mr.capture(model, (x4 if isinstance(model, _InnerSizeOff) else x,), dynamic=dynamic)
        message = str(info.value)
        if isinstance(model, _InnerSizeOff):
            assert message.startswith("_InnerSizeOff fails on the example: RuntimeError: mat1 and mat2 shapes cannot be "
                                      "multiplied"), message
        else:
            assert message == ("_WrongKeyword fails on the example: TypeError: TransformerEncoder.forward() got an "
                               "unexpected keyword argument 'src_mask'"), message
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(mr.CaptureError, match=r"^torch.export could not capture _InnerSizeOff: .*same reduction dim"):
            mr.capture(_InnerSizeOff().train(), (x4,))


def test_record_calls_gives_the_example_of_a_module_something_else_calls():
    """``record_calls``: the first ``count`` calls of a module as its caller made them (positional
    and keyword arguments, tensors copied), the example ``rewrite`` captures it from; the hook is
    gone after the block; bad arguments are one-line errors."""

    class _Attention(torch.nn.Module):
        def forward(self, x, scale=1.0, mask=None):
            q = k = v = x.unflatten(-1, (2, 4)).transpose(1, 2)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2).flatten(2)

    class _App(torch.nn.Module):  # something else that calls the module, twice
        def __init__(self):
            super().__init__()
            self.attention = _Attention()

        def forward(self, x):
            x = x.clone()
            first = self.attention(x, scale=0.5)
            x.mul_(2)  # (changed in place after the call: the record keeps what was passed)
            return first + self.attention(x, scale=0.5)

    app, x = _App(), torch.randn(2, 12, 8)
    with mr.record_calls(app.attention) as calls:
        app(x)
    assert len(calls) == 1 and not app.attention._forward_pre_hooks
    args, kwargs = calls[0]
    assert kwargs == {"scale": 0.5} and torch.equal(args[0], x)
    with mr.record_calls(app.attention, count=5) as calls:
        app(x)
    assert len(calls) == 2 and torch.equal(calls[1].args[0], 2 * x)
    fast = mr.rewrite(app.attention, *calls[0], config=mr.MTAConfig(chunk_size=4))
    reference = mta_attention_reference(*(x.unflatten(-1, (2, 4)).transpose(1, 2),) * 3, chunk_size=4, scale=0.5)
    torch.testing.assert_close(fast(x, scale=0.5), reference.transpose(1, 2).flatten(2).float(), rtol=0, atol=1e-5)
    with pytest.raises(TypeError, match="^record_calls records the calls of a torch.nn.Module, got method$"):
        with mr.record_calls(app.forward):
            pass
    for count in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="^count must be a positive int"):
            with mr.record_calls(app.attention, count=count):
                pass


class _CutAtThePromptLength(torch.nn.Module):
    """Image tokens and a prompt cut to its real length, read from the data (``.item()``: a size
    torch.export cannot know); ``kind`` says what attends to what:
    ``rotary_on_image_tokens``: one sequence, q and k cut at the prompt to scale their image part
    (as diffusers' HunyuanVideo-Framepack applies its rotary embedding): self-attention;
    ``queries_before_the_cut``: the image part's queries attend to the prompt part's keys;
    ``prompt_as_keys``: the image tokens' queries attend to the prompt alone."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, image, text, length):
        text = text[:, :length.item()]
        u = text.shape[1]
        q, k, v = self.qkv(torch.cat([image, text], 1)).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        if self.kind == "rotary_on_image_tokens":
            rot = torch.linspace(0.5, 1.5, image.shape[1]).view(-1, 1)
            q = torch.cat([q[:, :, :-u] * rot, q[:, :, -u:]], 2)
            k = torch.cat([k[:, :, :-u] * rot, k[:, :, -u:]], 2)
        elif self.kind == "queries_before_the_cut":
            torch._check(u >= 1)  # (SDPA's shape checks want to know the keys are not empty)
            torch._check(u <= 8)
            q, k, v = q[:, :, :-u], k[:, :, -u:], v[:, :, -u:]
        else:
            torch._check(u >= 1)
            _, k, v = self.qkv(text).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
            q = q[:, :, :image.shape[1]]
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("kind", ["rotary_on_image_tokens", "queries_before_the_cut", "prompt_as_keys"])
def test_lengths_read_from_the_data_are_compared_by_how_they_were_cut(kind):
    """Each cut at a data-dependent length gets its own unknown size from torch.export; q and k cut
    with the same bounds from one sequence are the same length at every run (the site is
    rewritten and follows the prompt's length), while different cuts, or another sequence's
    keys, stay exact as cross-attention."""
    torch.manual_seed(0)
    model = _CutAtThePromptLength(kind).eval()
    image, text = torch.randn(1, 12, 16), torch.randn(1, 8, 16)
    (site,) = mr.find_attention(model, (image, text, torch.tensor(5)))
    if kind != "rotary_on_image_tokens":
        assert not site.rewritable and site.reason.startswith("cross-attention"), site.reason
        return
    assert site.rewritable, site.reason
    config = mr.MTAConfig(chunk_size=4, local_chunks=1, sinks=1)
    one = mr.rewrite(model, (image, text, torch.tensor(5)), config=mr.MTAConfig(chunk_size=1 << 20))
    fast = mr.rewrite(model, (image, text, torch.tensor(5)), config=config)
    with torch.no_grad():
        for length in (5, 2, 8):
            args = (image, text, torch.tensor(length))
            torch.testing.assert_close(one(*args), model(*args), rtol=0, atol=1e-6)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(F, "scaled_dot_product_attention", lambda q, k, v: mta_attention_reference(
                    q, k, v, chunk_size=4, local_chunks=1, sinks=1).to(q.dtype))
                reference = model(*args)
            assert (reference - model(*args)).abs().max() > 1e-3  # (MTA differs from exact attention here)
            got = fast(*args)
            assert got.shape[2] == 12 + length
            torch.testing.assert_close(got, reference, rtol=0, atol=1e-6)
