"""Hand-written attention composed at random from the forms the matcher reads (tests/test_rewrite.py
and the zoo test each form on its own): q, k, v from separate or fused projections, heads split by
view, permute, reshape or unflatten; grouped-query heads repeated as transformers' repeat_kv, by
repeat_interleave or expand + flatten; the scale on the scores, on q, on k or split across both, as
mul or div; q·kᵀ by matmul, @ with transpose or .mT, einsum or a 3-D bmm viewed back; a causal
buffer filled or selected with −inf, the dtype's minimum or −1e9, an additive or bool mask input,
the triangle added as triu of a fill; softmax as a function, a method, a module, in float32 and
cast back or with its dtype argument; dropout as a module or a function (eval mode); the product
with v by matmul, einsum, @ or a 3-D bmm; heads merged three ways. Each form must be one site: the
rewrite with one chunk equals the model (rows with a key to attend to), and with several chunks the
float64 reference op on the layer's own q, k, v with the mask and causality the form means (softmax
over [B, H, n, n] scores followed by a 3-D bmm with v, left exact until the evening of 2026-12-06,
included). A failure names its seed (``RandomAttention(
random.Random(seed))``); ``MTA_RANDOM_FORMS`` runs more forms than the default. The first such search
(2026-12-06) found the triangle added as ``triu(full(−1e9), 1)`` read as a bias. Beside them, SDPA
calls with random arguments (``RandomSdpa``), held to the same two checks.
"""

from __future__ import annotations

import math
import os
import random
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mta_rewrite as mr
from mta_rewrite.ops import mta_attention_reference

FORMS = int(os.environ.get("MTA_RANDOM_FORMS", "32"))
BATCHES = 4


class RandomAttention(nn.Module):
    """One attention layer of width D whose every form is drawn from ``r`` (``self.o``: the
    choices by name), its own mask input read as the form means (``make_mask``)."""

    def __init__(self, r: random.Random, D: int = 32):
        super().__init__()
        self.o = o = {}
        self.H = H = r.choice([2, 4])
        self.Hkv = Hkv = r.choice([h for h in (1, 2, 4) if H % h == 0])
        self.d = d = D // H
        o["proj"] = r.choice(["separate", "fused"])
        o["split"] = r.choice(["view_transpose", "permute", "reshape_transpose", "unflatten"])
        o["gqa"] = r.choice(["repeat_kv", "repeat_interleave", "expand_flatten"]) if Hkv < H else "none"
        o["scale_where"] = r.choice(["scores", "scores", "q", "k", "qk_sqrt"])
        o["scale_op"] = r.choice(["div", "mul"])
        o["scale_val"] = r.choice(["sqrt_d", "custom"])
        o["kt"] = r.choice(["transpose", "transpose_neg", "mT", "einsum", "bmm"])
        o["mask"] = r.choice(["none", "causal_buffer_fill", "causal_where", "additive_input", "bool_input_where",
                              "bool_input_fill", "causal_plus_padding", "causal_triu_add"])
        o["fill"] = r.choice(["-inf", "finfo_min", "-1e9"])
        o["softmax"] = r.choice(["F", "method", "module", "float_cast", "dtype_arg"])
        o["dropout"] = r.choice(["none", "module", "functional"])
        o["pv"] = r.choice(["matmul", "einsum", "bmm", "at"])
        o["merge"] = r.choice(["transpose_reshape", "permute_contiguous_view", "flatten"])
        self.custom_scale = r.choice([0.3, 0.125, 0.7])
        self.full_mask = r.random() < 0.5
        if o["proj"] == "separate":
            self.q, self.k, self.v = nn.Linear(D, H * d), nn.Linear(D, Hkv * d), nn.Linear(D, Hkv * d)
        else:
            self.qkv = nn.Linear(D, (H + 2 * Hkv) * d)
        self.out = nn.Linear(H * d, D)
        self.drop = nn.Dropout(0.1)
        self.sm = nn.Softmax(dim=-1)
        self.register_buffer("tri", torch.ones(512, 512, dtype=torch.bool).tril().view(1, 1, 512, 512), persistent=False)

    def scale(self):
        return 1 / math.sqrt(self.d) if self.o["scale_val"] == "sqrt_d" else self.custom_scale

    def heads(self, x, h):
        B, n, _ = x.shape
        s = self.o["split"]
        if s == "view_transpose":
            return x.view(B, n, h, self.d).transpose(1, 2)
        if s == "permute":
            return x.view(B, n, h, self.d).permute(0, 2, 1, 3)
        if s == "reshape_transpose":
            return x.reshape(B, -1, h, self.d).transpose(1, 2)
        return x.unflatten(-1, (h, self.d)).transpose(1, 2)

    def repeat(self, x):
        G = self.H // self.Hkv
        g = self.o["gqa"]
        if g == "none":
            return x
        B, h, n, d = x.shape
        if g == "repeat_kv":
            return x[:, :, None, :, :].expand(B, h, G, n, d).reshape(B, h * G, n, d)
        if g == "repeat_interleave":
            return x.repeat_interleave(G, dim=1)
        return x.unsqueeze(2).expand(-1, -1, G, -1, -1).flatten(1, 2)

    def qkv_of(self, x):
        if self.o["proj"] == "separate":
            q, k, v = self.q(x), self.k(x), self.v(x)
        else:
            q, k, v = self.qkv(x).split([self.H * self.d, self.Hkv * self.d, self.Hkv * self.d], dim=-1)
        return self.heads(q, self.H), self.heads(k, self.Hkv), self.heads(v, self.Hkv)

    def core(self, q, k, v, mask):
        o = self.o
        k, v = self.repeat(k), self.repeat(v)
        B, H, n, d = q.shape
        sc = self.scale()

        def apply(x, factor):
            return x / (1 / factor) if o["scale_op"] == "div" else x * factor

        if o["scale_where"] == "q":
            q = apply(q, sc)
        elif o["scale_where"] == "k":
            k = apply(k, sc)
        elif o["scale_where"] == "qk_sqrt":
            q, k = apply(q, math.sqrt(sc)), apply(k, math.sqrt(sc))
        kt = o["kt"]
        if kt == "transpose":
            s = torch.matmul(q, k.transpose(-2, -1))
        elif kt == "transpose_neg":
            s = q @ k.transpose(2, 3)
        elif kt == "mT":
            s = q @ k.mT
        elif kt == "einsum":
            s = torch.einsum("bhqd,bhkd->bhqk", q, k)
        else:
            s = torch.bmm(q.reshape(B * H, n, d), k.reshape(B * H, n, d).transpose(1, 2)).view(B, H, n, n)
        if o["scale_where"] == "scores":
            s = apply(s, sc)
        fill = {"-inf": float("-inf"), "finfo_min": torch.finfo(s.dtype).min, "-1e9": -1e9}[o["fill"]]
        m = o["mask"]
        if m == "causal_buffer_fill":
            s = s.masked_fill(~self.tri[:, :, :n, :n], fill)
        elif m == "causal_where":
            s = torch.where(self.tri[:, :, :n, :n], s, torch.tensor(fill, dtype=s.dtype))
        elif m == "additive_input":
            s = s + mask
        elif m == "bool_input_where":
            s = torch.where(mask, s, fill)
        elif m == "bool_input_fill":
            s = s.masked_fill(~mask, fill)
        elif m == "causal_plus_padding":
            s = s.masked_fill(~self.tri[:, :, :n, :n], fill) + mask
        elif m == "causal_triu_add":
            s = s + torch.triu(torch.full((n, n), fill, device=s.device), diagonal=1)
        sm = o["softmax"]
        if sm == "F":
            p = F.softmax(s, dim=-1)
        elif sm == "method":
            p = s.softmax(-1)
        elif sm == "module":
            p = self.sm(s)
        elif sm == "float_cast":
            p = torch.softmax(s.float(), dim=-1).type_as(q)
        else:
            p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        if o["dropout"] == "module":
            p = self.drop(p)
        elif o["dropout"] == "functional":
            p = F.dropout(p, 0.1, training=self.training)
        pv = o["pv"]
        if pv == "matmul":
            y = torch.matmul(p, v)
        elif pv == "einsum":
            y = torch.einsum("bhqk,bhkd->bhqd", p, v)
        elif pv == "bmm":
            y = torch.bmm(p.reshape(B * H, n, n), v.reshape(B * H, n, d)).view(B, H, n, d)
        else:
            y = p @ v
        return y

    def merge(self, y):
        B, H, n, d = y.shape
        mg = self.o["merge"]
        if mg == "transpose_reshape":
            return y.transpose(1, 2).reshape(B, n, H * d)
        if mg == "permute_contiguous_view":
            return y.permute(0, 2, 1, 3).contiguous().view(B, n, H * d)
        return y.transpose(1, 2).flatten(2)

    def forward(self, x, mask):
        q, k, v = self.qkv_of(x)
        return self.out(self.merge(self.core(q, k, v, mask)))

    def expected(self, x, mask, **config):
        """The layer with its attention by the float64 reference op under ``config``, given the mask
        (SDPA's convention: an additive input as it is, a bool input as the keys allowed) and the
        causality the form means."""
        q, k, v = self.qkv_of(x)
        m = self.o["mask"]
        causal = m in ("causal_buffer_fill", "causal_where", "causal_plus_padding", "causal_triu_add")
        given = mask if m in ("additive_input", "causal_plus_padding", "bool_input_where", "bool_input_fill") else None
        y = mta_attention_reference(q, k, v, given, causal=causal, scale=self.scale(), **config)
        return self.out(self.merge(y.to(x.dtype)))


def make_mask(model: RandomAttention, B: int, n: int) -> torch.Tensor:
    """The mask input of ``model``'s form: key padding (two left-padded keys in the first sequence)
    added as the minimum, or as bool ([B, 1, 1, n] or materialised [B, 1, n, n]); else unused zeros."""
    m = model.o["mask"]
    pad = torch.ones(B, 1, 1, n, dtype=torch.bool)
    pad[0, ..., :2] = False  # left padding
    if m in ("additive_input", "causal_plus_padding"):
        return torch.where(pad, 0.0, torch.finfo(torch.float32).min)
    if m in ("bool_input_where", "bool_input_fill"):
        return pad.expand(B, 1, n, n).clone() if model.full_mask else pad
    return torch.zeros(B, 1, 1, n)


def _form_rewrites_as_it_means(seed: int) -> None:
    r = random.Random(seed)
    torch.manual_seed(seed)
    model = RandomAttention(r).eval()
    desc = f"seed {seed}: heads {model.H}/{model.Hkv} {model.o}"
    B, n = 2, 24
    x = torch.randn(B, n, 32)
    mask = make_mask(model, B, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sites = [s for s in mr.find_attention(model, (x, mask)) if s.is_attention]
        assert len(sites) == 1, f"{desc}: {sites}"
        assert sites[0].rewritable, f"{desc}: {sites[0].reason}"
        config = dict(chunk_size=r.choice([3, 4, 8]), local_chunks=r.choice([1, 2]), sinks=r.choice([0, 2]),
                      top_k=r.choice([0, 1]))
        with torch.no_grad():
            exact = mr.rewrite(model, (x, mask), config=mr.MTAConfig(chunk_size=4096))
            # (batch 0's first two queries see only padded keys under causality: the op gives them zeros)
            torch.testing.assert_close(exact(x, mask)[:, 2:], model(x, mask)[:, 2:], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{desc}, one chunk: {m}")
            fast = mr.rewrite(model, (x, mask), config=mr.MTAConfig(**config))
            x2 = torch.randn(B, 37, 32)
            mask2 = make_mask(model, B, 37)
            torch.testing.assert_close(fast(x2, mask2)[:, 2:], model.expected(x2, mask2, **config)[:, 2:],
                                       rtol=1e-4, atol=1e-4, msg=lambda m: f"{desc}, {config}: {m}")


@pytest.mark.parametrize("batch", range(BATCHES))
def test_random_forms_rewrite_as_they_mean(batch):
    per = -(-FORMS // BATCHES)
    for seed in range(batch * per, min(FORMS, (batch + 1) * per)):
        _form_rewrites_as_it_means(seed)


class RandomSdpa(nn.Module):
    """One attention layer calling ``scaled_dot_product_attention`` with arguments drawn from ``r``:
    no mask, ``is_causal``, a bool or additive mask input (key padding, [B, 1, 1, n] or materialised,
    or the triangle ∧ key padding), an ALiBi-like bias per head; a scale or none; grouped-query heads
    by ``enable_gqa`` or repeated."""

    def __init__(self, r: random.Random, D: int = 32):
        super().__init__()
        self.H = H = r.choice([2, 4])
        self.Hkv = Hkv = r.choice([h for h in (1, 2, 4) if H % h == 0])
        self.d = d = D // H
        self.o = dict(mask=r.choice(["none", "causal_flag", "bool_input", "float_input", "bool_causal_input", "bias"]),
                      scale=r.choice([None, 0.2, 1.3]), gqa=r.choice(["enable_gqa", "repeat"]) if Hkv < H else "none",
                      full=r.random() < 0.5)
        self.q, self.kv, self.out = nn.Linear(D, H * d), nn.Linear(D, 2 * Hkv * d), nn.Linear(H * d, D)

    def qkv(self, x):
        B, n, _ = x.shape
        k, v = self.kv(x).view(B, n, 2 * self.Hkv, self.d).transpose(1, 2).chunk(2, dim=1)
        return self.q(x).view(B, n, self.H, self.d).transpose(1, 2), k, v

    def forward(self, x, mask):
        q, k, v = self.qkv(x)
        o, kw = self.o, dict(scale=self.o["scale"])
        if o["gqa"] == "enable_gqa":
            kw["enable_gqa"] = True
        elif o["gqa"] == "repeat":
            k, v = (y.repeat_interleave(self.H // self.Hkv, dim=1) for y in (k, v))
        if o["mask"] == "causal_flag":
            kw["is_causal"] = True
        elif o["mask"] != "none":
            kw["attn_mask"] = mask
        return self.out(F.scaled_dot_product_attention(q, k, v, **kw).transpose(1, 2).flatten(2))

    def mask(self, B: int, n: int) -> torch.Tensor:
        m = self.o["mask"]
        pad = torch.ones(B, 1, 1, n, dtype=torch.bool)
        pad[0, ..., :2] = False
        padding = pad.expand(B, 1, n, n).clone() if self.o["full"] else pad
        i = torch.arange(n)
        return {"bool_input": padding, "float_input": torch.where(padding, 0.0, torch.finfo(torch.float32).min),
                "bool_causal_input": (torch.ones(n, n, dtype=torch.bool).tril() & pad).expand(B, 1, n, n).clone(),
                "bias": -(i[None] - i[:, None]).abs().float().mul(0.2).expand(B, self.H, n, n).clone()
                }.get(m, torch.zeros(B, 1, 1, n))

    def expected(self, x, mask, **config):
        q, k, v = self.qkv(x)
        given = None if self.o["mask"] in ("none", "causal_flag") else mask
        y = mta_attention_reference(q, k, v, given, causal=self.o["mask"] == "causal_flag", scale=self.o["scale"],
                                    **config)
        return self.out(y.float().transpose(1, 2).flatten(2))


@pytest.mark.parametrize("seed", range(int(os.environ.get("MTA_RANDOM_FORMS", "32")) // 4))
def test_random_sdpa_calls_rewrite_as_they_mean(seed):
    """SDPA with random arguments (``RandomSdpa``): one rewritable site, the one-chunk rewrite equal
    to the model, several chunks equal to the float64 reference on the layer's q, k, v (rows with a
    key to attend to)."""
    r = random.Random(seed)
    torch.manual_seed(seed)
    model = RandomSdpa(r).eval()
    desc = f"seed {seed}: heads {model.H}/{model.Hkv} {model.o}"
    x = torch.randn(2, 24, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (site,) = [s for s in mr.find_attention(model, (x, model.mask(2, 24))) if s.is_attention]
        assert site.rewritable, f"{desc}: {site.reason}"
        config = dict(chunk_size=r.choice([3, 4, 8]), local_chunks=r.choice([1, 2]), sinks=r.choice([0, 2]),
                      top_k=r.choice([0, 1]))
        exact = mr.rewrite(model, (x, model.mask(2, 24)), config=mr.MTAConfig(chunk_size=4096))
        fast = mr.rewrite(model, (x, model.mask(2, 24)), config=mr.MTAConfig(**config))
    with torch.no_grad():
        torch.testing.assert_close(exact(x, model.mask(2, 24))[:, 2:], model(x, model.mask(2, 24))[:, 2:],
                                   rtol=1e-5, atol=1e-5, msg=lambda m: f"{desc}, one chunk: {m}")
        x2, mask2 = torch.randn(2, 37, 32), model.mask(2, 37)
        torch.testing.assert_close(fast(x2, mask2)[:, 2:], model.expected(x2, mask2, **config)[:, 2:],
                                   rtol=1e-4, atol=1e-4, msg=lambda m: f"{desc}, {config}: {m}")
