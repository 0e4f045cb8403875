"""Generation survey: ``use_mta(model, config, decode=True)`` on transformers decoder families,
small random-weight models built from config objects (no download).

    python benchmarks/survey_generate.py [--attn sdpa eager] [--cache dynamic static] [--tag T]

Per family, attention implementation and cache (dynamic, or ``cache_implementation="static"``):
``generate`` (greedy, 2 sequences of 30 tokens, the first
left-padded by 5, 20 new tokens) with every layer ``MTAConfig(8, 2, 2, 0)``, prompts and decoding
steps through MTA; its scores against one forward of the whole generated sequence through the same
rewritten model (without top-k each step is the one prompt's row, so they agree to float rounding
where everything works; at generate's position ids), how many layers decoded through MTA (chunk
sums on their cache layers; sliding-window layers stay exact by design) and, for contrast, how far
exact decoding over the cache (the default) is from that forward. Gemma-2 (its soft-cap at 1, to
bend these scores) and GPT-OSS (learned sink logits; both its layers full attention, as a plan
for decoding would leave its sliding ones exact) only with eager attention, transformers' only one
for them. Writes
benchmarks/results/survey_generate_<date>[_<tag>].md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mta_rewrite as mr  # noqa: E402
from mta_rewrite.config import atomic_write_text  # noqa: E402
from mta_rewrite.interface import decoding_layers  # noqa: E402
from mta_rewrite.timing import cpu_name, results_name  # noqa: E402

CONFIG = mr.MTAConfig(8, 2, 2, 0)
SMALL = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
             max_position_embeddings=512)
GQA = dict(SMALL, num_key_value_heads=2)
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # (ids inside the small vocabulary)
FAMILIES = {
    "Llama": lambda t: t.LlamaConfig(**GQA),
    "Qwen2": lambda t: t.Qwen2Config(**GQA),
    "Qwen3": lambda t: t.Qwen3Config(**GQA, head_dim=16),
    "Qwen3-MoE": lambda t: t.Qwen3MoeConfig(**GQA, head_dim=16, moe_intermediate_size=32, num_experts=4,
                                            num_experts_per_tok=2),
    "Mistral": lambda t: t.MistralConfig(**GQA, sliding_window=None),
    "Phi-3": lambda t: t.Phi3Config(**GQA, **TOKENS),
    "Phi": lambda t: t.PhiConfig(**GQA),
    "Gemma": lambda t: t.GemmaConfig(**dict(SMALL, num_key_value_heads=1), head_dim=16),
    "Gemma-3 (1 sliding + 1 global layer)": lambda t: t.Gemma3TextConfig(
        **dict(SMALL, num_key_value_heads=1), head_dim=16, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"]),
    "Gemma-2 (soft-cap 1; 1 sliding + 1 global layer)": lambda t: t.Gemma2Config(
        **dict(SMALL, num_key_value_heads=1), head_dim=16, sliding_window=16, attn_logit_softcapping=1.0),
    "GPT-OSS (sink logits; 2 full-attention layers)": lambda t: t.GptOssConfig(
        **GQA, head_dim=16, num_local_experts=2, num_experts_per_tok=1, layer_types=["full_attention"] * 2),
    "StableLM": lambda t: t.StableLmConfig(**GQA),
    "OLMo-2": lambda t: t.Olmo2Config(**GQA, **TOKENS),
    "Granite": lambda t: t.GraniteConfig(**GQA),
    "Starcoder2": lambda t: t.Starcoder2Config(**GQA, sliding_window=None, **TOKENS),
    "Cohere": lambda t: t.CohereConfig(**GQA, **TOKENS),
    "GLM": lambda t: t.GlmConfig(**GQA, **TOKENS),
    "Helium": lambda t: t.HeliumConfig(**GQA, head_dim=16),
    "SmolLM3": lambda t: t.SmolLM3Config(**GQA, **TOKENS),
    "EXAONE-4": lambda t: t.Exaone4Config(**GQA, sliding_window=None, layer_types=["full_attention"] * 2),
    "GPT-NeoX": lambda t: t.GPTNeoXConfig(**SMALL),
    "Falcon": lambda t: t.FalconConfig(vocab_size=128, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                       new_decoder_architecture=True, num_kv_heads=2),
    "GPT-2": lambda t: t.GPT2Config(vocab_size=128, n_embd=64, n_head=4, n_layer=2, n_positions=512),
    "GPT-J": lambda t: t.GPTJConfig(vocab_size=128, n_embd=64, n_head=4, n_layer=2, n_positions=512, rotary_dim=8),
    "OPT": lambda t: t.OPTConfig(vocab_size=128, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                 ffn_dim=128, max_position_embeddings=512, word_embed_proj_dim=64),
}
# --boundaries: a fifth of the token ids end a segment (segments of ~5 tokens, in the prompt and
# among the generated tokens, cut to chunks of at most 8)
BOUNDARIES = mr.Boundaries(tuple(range(3, 128, 5)))
EAGER_ONLY = ("Gemma-2 (soft-cap 1; 1 sliding + 1 global layer)", "GPT-OSS (sink logits; 2 full-attention layers)")


def survey(name: str, attn: str, cache: str, boundaries: mr.Boundaries | None = None) -> list:
    import transformers

    torch.manual_seed(0)
    config = FAMILIES[name](transformers)
    config._attn_implementation = attn
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    options = dict(max_new_tokens=20, do_sample=False, output_scores=True, return_dict_in_generate=True,
                   pad_token_id=0, **(dict(cache_implementation="static") if cache == "static" else {}))
    with torch.no_grad():
        exact = torch.stack(mr.use_mta(model, config=CONFIG, boundaries=boundaries).generate(
            ids, attention_mask=mask, **options).scores, 1)
        out = mr.use_mta(model, config=CONFIG, boundaries=boundaries, decode=True).generate(ids, attention_mask=mask,
                                                                                            **options)
        whole_mask = torch.cat([mask, torch.ones_like(out.sequences[:, 30:])], 1)
        positions = (whole_mask.cumsum(-1) - 1).masked_fill_(whole_mask == 0, 1)  # (generate's position ids)
        whole = model(input_ids=out.sequences, attention_mask=whole_mask, position_ids=positions,
                      use_cache=False).logits[:, 29:-1]
    decoded, layers = decoding_layers(out)
    error = float((torch.stack(out.scores, 1) - whole).abs().max())
    contrast = float((exact[:, 1:] - whole[:, 1:]).abs().max())  # (the first score is the prompt's: both MTA)
    return [name, model.config._attn_implementation, cache, f"{decoded} / {layers}", f"{error:.1e}",
            f"{contrast:.1e}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attn", nargs="+", default=["sdpa", "eager"], choices=["sdpa", "eager"])
    ap.add_argument("--cache", nargs="+", default=["dynamic", "static"], choices=["dynamic", "static"])
    ap.add_argument("--boundaries", action="store_true",
                    help="boundary chunks too: every fifth token id a separator (BOUNDARIES)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    import transformers

    boundaries = BOUNDARIES if args.boundaries else None

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    header = ["family", "attention (under use_mta)", "cache", "layers decoding through MTA",
              "max abs Δ vs the one-prompt op", "exact decoding's max abs Δ"]
    rows = []
    for name in FAMILIES:
        for attn in args.attn:
            if attn == "sdpa" and name in EAGER_ONLY:
                continue  # (transformers has no SDPA attention for them)
            for cache in args.cache:
                try:
                    row = survey(name, attn, cache, boundaries)
                except Exception as error:  # (a family this transformers cannot build or run: said in its row)
                    message = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
                    row = [name, attn, cache, message, "", ""]
                rows.append(row)
                print(" | ".join(row), flush=True)
    date = dt.date.today().isoformat()
    lines = [f"# use_mta(decode=True) across decoder families ({date}, {cpu_name()}, torch {torch.__version__}, "
             f"transformers {transformers.__version__})", "",
             f"`python benchmarks/survey_generate.py{' --boundaries' if boundaries else ''}`: every layer "
             f"`{CONFIG.short}`"
             + (", boundary chunks (every fifth token id a separator)" if boundaries else "")
             + ", 2 sequences of 30 tokens (one left-padded by 5), 20 new tokens, float32, random weights.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    path = Path(__file__).resolve().parent / "results" / f"{results_name('survey_generate', args.tag)}.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
