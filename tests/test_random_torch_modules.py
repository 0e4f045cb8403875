"""torch's own attention modules with random arguments: ``nn.MultiheadAttention`` (batch first or
not, biases, k and v from the query tensor, another tensor or another width (``kdim``/``vdim``),
attention masks built in the forward as the causal triangle or passed in as bool or float, 2-D or
3-D per head, ``is_causal``, key padding as bool or float, ``need_weights``) and the layers built on
it (``nn.TransformerEncoderLayer``, ``nn.TransformerEncoder`` with or without nested tensors,
``nn.TransformerDecoderLayer``, ``nn.Transformer``: pre- or post-norm, activations, masks and
padding), captured with and without gradients (torch's fast paths under ``no_grad``).

Each model must have one site per attention module, its self-attention rewritable unless it
returns its weights, cross-attention left exact; the rewrite with one chunk equals the model at the
example's shapes and at another batch and length; with several chunks it equals the model with each
self-attention module run by the float64 reference op (``reference_mha``: the module's projections,
its mask merged as torch merges it, the causality the graph can know: a triangle built in the
forward or ``is_causal`` without padding). A failure names its seed; ``MTA_RANDOM_TORCH_MODULES``
runs more. The search behind this file (2026-12-07: 80 modules, 60 layer stacks, 50 ONNX
exports by script) found no difference; it found that torch's own fast path of
``nn.TransformerEncoderLayer`` (eval, ``no_grad``) returns NaN everywhere for a float mask beside a
bool key padding (torch 2.13, CPU; the slow path and the rewrite do not), so the model is run with
gradients for the comparison.
"""

from __future__ import annotations

import os
import random
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mta_rewrite as mr
from mta_rewrite.ops import mta_attention_reference

CASES = int(os.environ.get("MTA_RANDOM_TORCH_MODULES", "6"))


def reference_mha(mha: nn.MultiheadAttention, query, key, value, key_padding_mask=None, need_weights=True,
                  attn_mask=None, average_attn_weights=True, is_causal=False, *, config: dict, causal: bool):
    """``mha``'s forward with its attention by the float64 reference op under ``config``: q, k, v
    projected as torch does (one in-projection or three), ``attn_mask`` ([n, n] or [B·H, n, n], bool
    True forbidding, or added) and ``key_padding_mask`` (the same, per key) merged into one additive
    mask, ``causal`` as given (``is_causal`` is a hint torch may drop; the caller says what holds)."""
    if mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    n, B, E = query.shape
    H, d = mha.num_heads, E // mha.num_heads
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq, bk, bv = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
    q, k, v = (F.linear(t, w, b).view(n, B, H, d).permute(1, 2, 0, 3)
               for t, w, b in ((query, wq, bq), (key, wk, bk), (value, wv, bv)))
    given = None
    for m in (attn_mask, None if key_padding_mask is None else key_padding_mask[:, None, None, :]):
        if m is None:
            continue
        if m.dim() == 3:
            m = m.view(B, H, n, n)
        m = torch.zeros(m.shape, dtype=torch.float64).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m.double()
        given = m if given is None else given + m
    y = mta_attention_reference(q, k, v, given, causal=causal, **config).to(query.dtype)
    y = mha.out_proj(y.permute(2, 0, 1, 3).reshape(n, B, E))
    return (y.transpose(0, 1) if mha.batch_first else y), None


def _padding(B: int, n: int, kind: str) -> torch.Tensor:
    """Two padded keys at the end of the first sequence (every query keeps key 0), bool or float."""
    pad = torch.zeros(B, n, dtype=torch.bool)
    pad[0, -2:] = True
    return torch.zeros(B, n).masked_fill(pad, float("-inf")) if kind == "float" else pad


class RandomMha(nn.Module):
    """An ``nn.MultiheadAttention`` called on x with arguments drawn from ``r`` (``self.o``)."""

    def __init__(self, r: random.Random):
        super().__init__()
        E = r.choice([16, 24, 32])
        self.o = o = dict(
            E=E, H=r.choice([h for h in (1, 2, 4, 8) if E % h == 0]), batch_first=r.random() < 0.5,
            bias=r.random() < 0.8, kv=r.choice(["query", "scaled", "kdim"]),
            mask=r.choice(["none", "built_float", "built_bool", "is_causal", "bool_2d", "float_2d", "bool_3d",
                           "float_3d", "causal_input"]),
            padding=r.choice(["none", "bool", "float"]), need_weights=r.random() < 0.2, average=r.random() < 0.5)
        kdim = E + 8 if o["kv"] == "kdim" else None
        self.mha = nn.MultiheadAttention(E, o["H"], bias=o["bias"], batch_first=o["batch_first"], kdim=kdim, vdim=kdim)
        self.widen = nn.Linear(E, E + 8) if kdim else None

    def causal(self) -> bool:
        return self.o["mask"] in ("built_float", "built_bool", "is_causal")

    def forward(self, x, mask, padding, config=None):
        o = self.o
        n = x.shape[1] if o["batch_first"] else x.shape[0]
        kv = {"query": lambda: x, "scaled": lambda: x * 1.0, "kdim": lambda: self.widen(x)}[o["kv"]]()
        kw = {} if o["padding"] == "none" else {"key_padding_mask": padding}
        if o["mask"] in ("built_float", "is_causal"):
            kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(n, dtype=x.dtype)
            kw["is_causal"] = o["mask"] == "is_causal"
        elif o["mask"] == "built_bool":
            kw["attn_mask"] = torch.ones(n, n, dtype=torch.bool).triu(1)
        elif o["mask"] != "none":
            kw["attn_mask"] = mask
        attention = self.mha if config is None else \
            (lambda *a, **k: reference_mha(self.mha, *a, **k, config=config, causal=self.causal()))
        out, weights = attention(x, kv, kv, need_weights=o["need_weights"], average_attn_weights=o["average"], **kw)
        return (out, weights) if o["need_weights"] else out

    def inputs(self, B: int, n: int, g: torch.Generator) -> tuple:
        o = self.o
        x = torch.randn(B, n, o["E"], generator=g)
        x = x if o["batch_first"] else x.transpose(0, 1).contiguous()
        m = o["mask"]
        shape = (B * o["H"], n, n) if m.endswith("3d") else (n, n)
        mask = torch.zeros(1)
        if m == "causal_input":
            mask = torch.ones(n, n, dtype=torch.bool).triu(1)
        elif m.startswith("bool"):
            mask = (torch.rand(shape, generator=g) < 0.3) & ~torch.eye(n, dtype=torch.bool)  # the diagonal kept
        elif m.startswith("float"):
            mask = torch.randn(shape, generator=g)
        return x, mask, _padding(B, n, o["padding"])

    def sites(self) -> tuple[int, int]:
        """(attention sites, rewritable ones)."""
        return 1, int(not self.o["need_weights"])


class RandomTransformer(nn.Module):
    """One of torch's transformer layers or stacks with arguments drawn from ``r`` (``self.o``): x
    the sequence its self-attention runs over (the decoder's, for the decoders and nn.Transformer),
    ``memory`` the encoder's sequence (as long as x or not)."""

    def __init__(self, r: random.Random):
        super().__init__()
        E = r.choice([16, 32])
        self.o = o = dict(
            kind=r.choice(["encoder_layer", "encoder", "decoder_layer", "transformer"]), E=E,
            H=r.choice([h for h in (1, 2, 4) if E % h == 0]), batch_first=r.random() < 0.6,
            norm_first=r.random() < 0.5, activation=r.choice(["relu", "gelu", "F.gelu"]), bias=r.random() < 0.8,
            mask=r.choice(["none", "built", "causal_input", "float_input"]), is_causal=r.random() < 0.5,
            padding=r.choice(["none", "bool", "float"]), nested=r.random() < 0.5, memory=r.choice([0, 5]),
            memory_padding=r.random() < 0.5)
        o["is_causal"] = o["is_causal"] and o["mask"] in ("built", "causal_input")  # (torch: a hint of the mask)
        kw = dict(d_model=E, nhead=o["H"], dim_feedforward=2 * E, dropout=0.1, batch_first=o["batch_first"],
                  activation=F.gelu if o["activation"] == "F.gelu" else o["activation"], norm_first=o["norm_first"],
                  bias=o["bias"])
        self.net = {"encoder_layer": lambda: nn.TransformerEncoderLayer(**kw),
                    "encoder": lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(**kw), 2,
                                                             enable_nested_tensor=o["nested"]),
                    "decoder_layer": lambda: nn.TransformerDecoderLayer(**kw),
                    "transformer": lambda: nn.Transformer(num_encoder_layers=2, num_decoder_layers=1, **kw)}[o["kind"]]()

    def causal(self) -> bool:
        """What the graph can know of x's self-attention: causal where the triangle is built in the
        forward, or where ``is_causal`` reaches SDPA (torch drops the mask for it without padding)."""
        return self.o["mask"] == "built" or (self.o["is_causal"] and self.o["padding"] == "none")

    def forward(self, x, memory, mask, padding, memory_padding, config=None):
        o = self.o
        n = x.shape[1] if o["batch_first"] else x.shape[0]
        mask = None if o["mask"] == "none" else \
            nn.Transformer.generate_square_subsequent_mask(n, dtype=x.dtype) if o["mask"] == "built" else mask
        padding = None if o["padding"] == "none" else padding
        memory_padding = memory_padding if o["memory_padding"] else None
        patched = []
        if config is not None:  # every self-attention module by the reference (the encoder's in nn.Transformer: no mask)
            for name, mha in self.named_modules():
                if isinstance(mha, nn.MultiheadAttention) and name.endswith("self_attn"):
                    causal = self.causal() and not (o["kind"] == "transformer" and ".encoder." in f".{name}")
                    mha.forward = (lambda m, c: lambda *a, **k: reference_mha(m, *a, **k, config=config, causal=c))(
                        mha, causal)
                    patched.append(mha)
        try:
            if o["kind"] == "encoder":
                return self.net(x, mask=mask, src_key_padding_mask=padding, is_causal=o["is_causal"])
            if o["kind"] == "encoder_layer":
                return self.net(x, src_mask=mask, src_key_padding_mask=padding, is_causal=o["is_causal"])
            if o["kind"] == "decoder_layer":
                return self.net(x, memory, tgt_mask=mask, tgt_key_padding_mask=padding,
                                memory_key_padding_mask=memory_padding, tgt_is_causal=o["is_causal"])
            return self.net(memory, x, tgt_mask=mask, tgt_key_padding_mask=padding, src_key_padding_mask=memory_padding,
                            memory_key_padding_mask=memory_padding, tgt_is_causal=o["is_causal"])
        finally:
            for mha in patched:
                del mha.forward

    def inputs(self, B: int, n: int, g: torch.Generator) -> tuple:
        o = self.o
        x, memory = torch.randn(B, n, o["E"], generator=g), torch.randn(B, n + o["memory"], o["E"], generator=g)
        if not o["batch_first"]:
            x, memory = x.transpose(0, 1).contiguous(), memory.transpose(0, 1).contiguous()
        mask = {"causal_input": lambda: nn.Transformer.generate_square_subsequent_mask(n),
                "float_input": lambda: torch.randn(n, n, generator=g)}.get(o["mask"], lambda: torch.zeros(1))()
        memory_padding = torch.zeros(B, n + o["memory"], dtype=torch.bool)
        memory_padding[-1, -3:] = True
        return x, memory, mask, _padding(B, n, o["padding"]), memory_padding

    def sites(self) -> tuple[int, int]:
        own, cross = {"encoder_layer": (1, 0), "encoder": (2, 0), "decoder_layer": (1, 1), "transformer": (3, 1)}[
            self.o["kind"]]
        return own + cross, own


def _runs_as_it_means(cls, seed: int) -> None:
    r = random.Random(seed)
    torch.manual_seed(seed)
    model = cls(r).eval()
    g = torch.Generator().manual_seed(seed)
    grad = r.random() < 0.5  # captured with gradients or under no_grad (torch's fast paths)
    desc = f"seed {seed}, {'with' if grad else 'without'} gradients: {model.o}"
    config = dict(chunk_size=r.choice([3, 4, 8]), local_chunks=r.choice([1, 2]), sinks=r.choice([0, 2]),
                  top_k=r.choice([0, 1]))
    example, other = model.inputs(2, 24, g), model.inputs(3, 29, g)

    def model_output(inputs):  # (with gradients: torch's own fast path is NaN for a float mask beside padding)
        with torch.enable_grad():
            out = model(*inputs)
        return tuple(t.detach() for t in out) if isinstance(out, tuple) else out.detach()

    with warnings.catch_warnings(), torch.set_grad_enabled(grad):
        warnings.simplefilter("ignore")
        sites = [s for s in mr.find_attention(model, example) if s.is_attention]
        assert (len(sites), sum(s.rewritable for s in sites)) == model.sites(), \
            f"{desc}: {[(s.name, s.rewritable, s.reason) for s in sites]}"
        exact = mr.rewrite(model, example, config=mr.MTAConfig(chunk_size=4096))
        fast = mr.rewrite(model, example, config=mr.MTAConfig(**config))
    assert mr.count_mta_nodes(fast) == model.sites()[1], desc
    with torch.no_grad():
        for inputs in (example, other):
            torch.testing.assert_close(exact(*inputs), model_output(inputs), rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{desc}, one chunk: {m}")
            if model.sites()[1]:
                with torch.enable_grad():
                    want = model(*inputs, config=config).detach()
                torch.testing.assert_close(fast(*inputs), want, rtol=1e-4, atol=1e-4,
                                           msg=lambda m: f"{desc}, {config}: {m}")


@pytest.mark.parametrize("seed", range(CASES))
def test_random_multihead_attention_rewrites_as_it_means(seed):
    _runs_as_it_means(RandomMha, seed)


@pytest.mark.parametrize("seed", range(CASES))
def test_random_transformer_layers_rewrite_as_they_mean(seed):
    _runs_as_it_means(RandomTransformer, seed)
