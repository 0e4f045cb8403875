"""transformers decoders drawn at random (family, heads, grouped key/value heads, head size, SDPA or
eager attention, a sliding window, batch, length, left padding) with a random MTA configuration or
a plan per layer (a configuration, exact, groups of query heads with one group perhaps exact, or
learned summaries over either; tests/test_use_mta.py tests each case on Llama): ``use_mta`` on a prompt equals
the graph ``rewrite`` makes of the same call (two independent routes to the op, ``rewrite``'s
tested against the float64 reference), and with ``decode=True`` and no top-k, a prefill then
single-token steps over the cache give the one prompt's logits. Sliding-window families are left
out of the decoding check: their layers decode exactly, and a prompt's short last chunk may
summarise part of the chunk outside its window (docs/api.md, sliding-window layers). A failure
names its seed; ``MTA_RANDOM_MODELS`` runs more. The first search (2026-12-06, 120 + 120 models):
use_mta and rewrite within 2.4e-7 everywhere, decoding within 2.4e-7 of the one prompt outside
sliding windows; the fourth (50 models with head groups and learned summaries in their plans, the
night of 2026-12-06): the same, within 2.4e-7.
"""

from __future__ import annotations

import os
import random
import warnings

import pytest
import torch

import mta_rewrite as mr
from mta_rewrite.config import HeadGroups, Learned

transformers = pytest.importorskip("transformers")

MODELS = int(os.environ.get("MTA_RANDOM_MODELS", "8"))
FAMILIES = ["llama", "mistral", "qwen2", "gemma", "gemma2", "phi3", "olmo2", "gpt2"]


def random_decoder(r: random.Random, sliding: bool = True):
    """(family, its layer names' prefix and attention module, a model with random weights)."""
    family = r.choice([f for f in FAMILIES if sliding or f != "gemma2"])
    H = r.choice([2, 4])
    kv, d = r.choice([1, H]), r.choice([8, 16])
    common = dict(vocab_size=97, hidden_size=H * d, num_attention_heads=H, intermediate_size=2 * H * d,
                  num_hidden_layers=2, max_position_embeddings=512, pad_token_id=0)
    window = r.choice([None, 16, 40]) if sliding else None
    if family == "gpt2":
        cfg, cls = transformers.GPT2Config(vocab_size=97, n_embd=H * d, n_head=H, n_layer=2, n_positions=512), \
            transformers.GPT2LMHeadModel
    elif family == "mistral":
        cfg, cls = transformers.MistralConfig(num_key_value_heads=kv, head_dim=d, sliding_window=window, **common), \
            transformers.MistralForCausalLM
    elif family == "gemma2":
        cfg, cls = transformers.Gemma2Config(num_key_value_heads=kv, head_dim=d, sliding_window=r.choice([16, 40]),
                                             **common), transformers.Gemma2ForCausalLM
    elif family == "gemma":
        cfg, cls = transformers.GemmaConfig(num_key_value_heads=kv, head_dim=d, **common), transformers.GemmaForCausalLM
    else:
        config_cls, cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                           "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
                           "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM)}[family]
        cfg = config_cls(num_key_value_heads=kv, **common)
    # (Gemma-2 has no SDPA path in transformers)
    cfg._attn_implementation = "eager" if family == "gemma2" else r.choice(["sdpa", "eager"])
    torch.manual_seed(r.randrange(1000))
    model = cls(cfg).eval()
    names = [f"transformer.h.{i}.attn" if family == "gpt2" else f"model.layers.{i}.self_attn" for i in range(2)]
    return f"{family} ({cfg._attn_implementation}, window {getattr(cfg, 'sliding_window', None)})", names, model


def heads_of(model) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) of a random decoder."""
    cfg = model.config
    H = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    d = getattr(cfg, "head_dim", None) or (getattr(cfg, "hidden_size", None) or cfg.n_embd) // H
    return H, getattr(cfg, "num_key_value_heads", None) or H, d


def random_choice(r: random.Random, names: list[str], top_k: bool = True, model=None) -> dict:
    """One configuration for every layer, or a plan: per layer a configuration, exact, and with
    ``model`` also groups of query heads (one group exact or not) and learned summaries."""
    def config():
        return mr.MTAConfig(r.choice([4, 8, 16]), r.choice([1, 2]), r.choice([0, 2, 5]),
                            r.choice([0, 1, 2]) if top_k else 0)

    def entry():
        kind = r.choice(["config", "exact", "groups", "learned"] if model is not None else ["config"] * 7 + ["exact"] * 3)
        if kind in ("config", "exact"):
            return config() if kind == "config" else "exact"
        H, Hkv, d = heads_of(model)
        heads = r.sample(range(H), H)
        cut = r.randrange(1, H)
        groups = HeadGroups(((config(), tuple(sorted(heads[:cut]))), (r.choice([None, config()]), tuple(sorted(heads[cut:])))))
        if kind == "groups":
            return groups
        return Learned(r.choice([config(), groups]), [[r.gauss(0, 0.5) for _ in range(d)] for _ in range(Hkv)])

    if r.random() < 0.5:
        return dict(config=config())
    return dict(plan=mr.Plan({name: entry() for name in names}))


def random_prompt(r: random.Random, seed: int):
    B, n = r.choice([1, 2]), r.choice([30, 48, 65])
    ids = torch.randint(1, 97, (B, n), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if B > 1:
        mask[0, :r.choice([0, 0, 7])] = 0  # left padding, as generate gets it
    return ids, mask


@pytest.mark.parametrize("seed", range(MODELS))
def test_use_mta_on_a_random_decoder_equals_the_rewritten_graph(seed):
    r = random.Random(seed)
    desc, names, model = random_decoder(r)
    ids, mask = random_prompt(r, seed)
    choice = random_choice(r, names, model=model)
    call = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        want = mr.rewrite(model, (), call, **choice)(**call).logits
        got = mr.use_mta(model, **choice)(**call).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"seed {seed}: {desc}, {ids.shape}, {choice}: {m}")


@pytest.mark.parametrize("seed", range(MODELS))
def test_decoding_a_random_decoder_gives_the_one_prompt_logits(seed):
    r = random.Random(1000 + seed)
    desc, names, model = random_decoder(r, sliding=False)
    ids, mask = random_prompt(r, seed)
    choice = random_choice(r, names, top_k=False, model=model)  # (with top-k a step ranks chunks by its own query)
    n, steps = ids.shape[1], r.choice([1, 3, 6])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        decoding = mr.use_mta(model, decode=True, **choice)
        full = decoding(input_ids=ids, attention_mask=mask, use_cache=False).logits
        out = decoding(input_ids=ids[:, :n - steps], attention_mask=mask[:, :n - steps], use_cache=True)
        rows = [out.logits[:, -1]]
        for t in range(n - steps, n):
            out = decoding(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1],
                           past_key_values=out.past_key_values, use_cache=True)
            rows.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(rows, 1), full[:, n - steps - 1:], rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"seed {seed}: {desc}, {ids.shape}, {steps} steps, {choice}: {m}")
