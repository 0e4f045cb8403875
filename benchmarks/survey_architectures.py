"""Architecture survey: every causal-LM architecture the installed transformers registers, built
from its own default config shrunk to a few layers and small sizes (random weights, no download),
then captured, searched for attention and rewritten.

    python benchmarks/survey_architectures.py [--types llama gemma4_text …] [--attn eager sdpa] [--tag T]

Per architecture (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``) and attention implementation: the model is
built by ``AutoModelForCausalLM.from_config`` from ``AutoConfig.for_model(type, **shrunk)`` (the
default config's own sizes replaced where it has them, nested text and vision configs too; per-layer
lists of kinds cut to 4 layers keeping each kind; what a few types need besides, ``PER_TYPE``; more
than 30M parameters after that is skipped), called once on 2 × 24 token ids with the first sequence
left-padded (``use_cache=False`` where the forward names it), then ``find_attention`` and ``rewrite``: the sites found and
rewritable, SDPA calls counted while the model ran (with ``sdpa``: its attention layers, the count
``found`` should reach), the largest difference on real positions between the model and its
rewrite with one chunk (``MTAConfig(10**6)``: exact) at 24 and 40 tokens (dynamic length), whether
``MTAConfig(8, 1, 2, 1)`` runs to finite outputs, and the reasons of sites left exact. Then
``use_mta`` (the model's own forward with its attention through transformers' attention
interface, no capture) under the same ``MTAConfig(8, 1, 2, 1)`` at 40 tokens: how far it is from the
rewrite's output (two paths to the same op calls), how far it moved the model's, or why it
refused; it runs where capture fails or fixed the length too. Rows where
transformers itself refused (no such attention implementation, a shrunk config its validation
rejects, a forward that fails on the model itself) say so and are not counted as ours.
Writes benchmarks/results/survey_architectures_<date>[_<tag>].md (and .json).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mta_rewrite as mr  # noqa: E402
from mta_rewrite.calibration.metrics import first_tensor  # noqa: E402
from mta_rewrite.timing import cpu_machine, results_name, save_results  # noqa: E402

# sizes replaced where the default config has the field (4 layers: hybrids that interleave full
# attention every few layers keep one; mamba_d_head × mamba_n_heads = mamba_d_ssm = 2, the default
# mamba_expand, × hidden_size)
SHRINK = dict(
    num_hidden_layers=4, n_layer=4, num_layers=4, n_layers=4, hidden_size=64, n_embd=64, d_model=64, emb_dim=64,
    intermediate_size=128, n_inner=128, ffn_dim=128, encoder_ffn_dim=128, decoder_ffn_dim=128,
    num_attention_heads=4, n_head=4, n_heads=4, num_heads=4, encoder_attention_heads=4, decoder_attention_heads=4,
    num_key_value_heads=2, num_kv_heads=2, head_dim=16, kv_channels=16, rotary_dim=8, vocab_size=128,
    max_position_embeddings=512, sliding_window=16,
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, num_experts_per_token=2,
    moe_intermediate_size=32, n_shared_experts=1, num_shared_experts=1, shared_expert_intermediate_size=32,
    shared_experts_intermediate_size=32,
    first_k_dense_replace=1, n_group=1, num_expert_group=1, topk_group=1,
    q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    mamba_n_heads=4, mamba_d_head=32, mamba_d_ssm=128, mamba_d_state=4, mamba_n_groups=1, ssm_state_size=4,
    vocab_size_per_layer_input=128, hidden_size_per_layer_input=16,
    index_topk=8,  # (DeepSeek-V3.2's indexer and its kin: 8 keys per query, so the selection matters at 24 and 40)
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
NESTED = ("text_config", "vision_config")
# per-layer lists (a layer's kind, or its size), cut to the shrunk layer count
LAYER_LISTS = ("layer_types", "layers_block_type", "attention_layers", "attn_layers", "mlp_layer_types")
# what a type's default config needs besides the shrink, to be a coherent small model of its kind
PER_TYPE = {
    "gpt_neo": dict(attention_types=[[["global", "local"], 2]]),  # the pattern × repeats must give the layer count
    "xmod": dict(default_language="en_XX"),  # its adapters need a language
    # the default lists no attention layer at all (Mamba only): Granite-4.0-H interleaves them
    "granitemoehybrid": dict(layer_types=["mamba", "attention", "mamba", "attention"]),
    "bamba": dict(attn_layer_indices=[1, 3]),  # likewise (Bamba-9B has three in 32)
    "zaya": dict(num_experts_per_tok=1),  # the only routing it supports
    "kolibri1_1": dict(index_num_heads=2),  # at most the query heads per key head
    # the last two layers reuse the cache of the last earlier layer of their kind: both kinds before them
    "gemma3n_text": dict(layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2),
    # its attention reads attn_config.rope_theta, which the default attn_config lacks; clip_qkv None fails
    # torch.clamp; the expert sizes live in ffn_config
    "dbrx": dict(attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(hidden_size=64, ffn_hidden_size=128, moe_num_experts=4, moe_top_k=1)),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"] * 2),  # the default is None
    # the shared attention block is tied across its layers: two of them (the default has one in six)
    "zamba": dict(attn_layer_period=2, attn_layer_offset=1, layers_block_type=["linear_attention", "hybrid"] * 2),
    # the default puts one attention layer in eight, the first at layer 4: none in a shrunk model
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1),
    "reformer": dict(is_decoder=True, axial_pos_embds_dim=[32, 32]),  # the axial sizes must sum to the hidden size
    "mamba2": dict(num_heads=8, head_dim=16),  # heads × head_dim must be hidden size × expand
    # the rope parameters are per layer type (the default has none)
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    # its indexed-attention layers need their indexer's sizes (unset by default)
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
                           indexer_compress_ratio=4),
}
PER_TYPE["qwen4_exp"] = dict(text_config=PER_TYPE["qwen4_exp_text"])  # (merged into the shrunk text config)
MAX_PARAMETERS = 30e6
EXACT, SMALL_MTA = mr.MTAConfig(10**6), mr.MTAConfig(8, 1, 2, 1)


class _CountSdpa(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


class _CountOpCalls(TorchDispatchMode):
    """Calls of ``torch.ops.mta.attention`` while a model runs."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "mta":
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _inputs(n: int, vocab: int, flag: bool) -> dict:
    """Token ids, the first sequence left-padded, and ``use_cache=False`` where the forward names
    it (``flag``; as ``mta-rewrite capture`` does: the config's ``use_cache`` is off)."""
    ids = torch.randint(3, max(4, min(vocab, 100)), (2, n), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, n, dtype=torch.long)
    mask[0, : n // 5] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask, **({"use_cache": False} if flag else {})}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}"


def _shrink(default: dict) -> dict:
    """The fields of one (possibly nested) config dict that the shrink replaces."""
    shrunk = {k: v for k, v in SHRINK.items() if k in default}
    layers = next((default[k] for k in ("num_hidden_layers", "num_layers", "n_layer", "n_layers") if k in default), None)
    for key, value in default.items():
        if isinstance(value, list) and layers and len(value) == layers:
            if key in SHRINK:  # a size per layer (Gemma-3n's intermediate_size)
                shrunk[key] = [SHRINK[key]] * SHRINK["num_hidden_layers"]
            elif key in LAYER_LISTS:
                shrunk[key] = _layer_kinds(value, SHRINK["num_hidden_layers"])
    if "qk_rope_head_dim" in shrunk:  # multi-head latent attention: head_dim is the rotary part, a head per query head
        shrunk.update({k: v for k, v in (("head_dim", SHRINK["qk_rope_head_dim"]),
                                          ("num_key_value_heads", SHRINK["num_attention_heads"]),
                                          ("qk_head_dim", SHRINK["qk_rope_head_dim"] + SHRINK["qk_nope_head_dim"]))
                       if k in default})
    return shrunk


def _layer_kinds(kinds: list, n: int) -> list:
    """The first ``n`` of a per-layer list of kinds, with each kind that would otherwise be lost put
    in place of a repeated one, from the end (Zamba2's one hybrid layer in six)."""
    out = list(kinds[:n])
    for kind in dict.fromkeys(kinds):
        spare = [i for i in range(n - 1, -1, -1) if out.count(out[i]) > 1]
        if kind not in out and spare:
            out[spare[0]] = kind
    return out


def build(model_type: str, attn: str):
    """The shrunk model, or raises (transformers' own refusal)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    default = AutoConfig.for_model(model_type).to_dict()
    shrunk = _shrink(default)
    for sub in NESTED:
        if isinstance(default.get(sub), dict):
            shrunk[sub] = {**_shrink(default[sub]), "model_type": default[sub].get("model_type")}
    for key, value in PER_TYPE.get(model_type, {}).items():
        nested = isinstance(value, dict) and isinstance(shrunk.get(key), dict)
        shrunk[key] = {**shrunk[key], **value} if nested else value
    config = AutoConfig.for_model(model_type, **shrunk)
    with torch.device("meta"):
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"{size / 1e6:.0f}M parameters after shrinking (a size the shrink does not reach)")
    for part in (config, getattr(config, "text_config", None)):
        if part is not None and hasattr(part, "use_cache"):
            part.use_cache = False  # a KV cache is not a graph output
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", 128)
    return model, vocab


def survey(model_type: str, attn: str) -> dict:
    row = {"type": model_type, "attn": attn}
    try:
        model, vocab = build(model_type, attn)
    except Exception as exc:  # noqa: BLE001  (transformers refuses in many ways)
        row.update(outcome="not built", detail=_one_line(exc))
        return row
    flag = "use_cache" in inspect.signature(model.forward).parameters
    example = _inputs(24, vocab, flag)
    try:
        with torch.no_grad(), _CountSdpa() as counted:
            model(**example)
        row["sdpa_calls"] = counted.calls
    except Exception as exc:  # noqa: BLE001
        row.update(outcome="model fails", detail=_one_line(exc))
        return row
    mta = None  # the rewrite's output under SMALL_MTA at 40 tokens, for use_mta to agree with
    with torch.no_grad():
        try:
            program = mr.capture(model, (), example)  # once: found and rewritten from the same program
            sites = mr.find_attention(program)
        except Exception as exc:  # noqa: BLE001
            row.update(outcome="capture fails", detail=_one_line(exc))
            program = None
        if program is not None:
            attention = [s for s in sites if s.is_attention]
            row.update(found=len(attention), rewritable=sum(s.rewritable for s in attention),
                       reasons=sorted({s.reason for s in attention if not s.rewritable}))
            try:
                exact = mr.rewrite(program, config=EXACT)
                worst = 0.0
                for n in (24, 40):
                    call = _inputs(n, vocab, flag)
                    keep = call["attention_mask"].bool()
                    a, b = first_tensor(model(**call)), first_tensor(exact(**call))
                    worst = max(worst, (a[keep] - b[keep]).abs().max().item())
                row["exact_error"] = worst
                call = _inputs(40, vocab, flag)
                mta = first_tensor(mr.rewrite(program, config=SMALL_MTA)(**call))
                row["mta_finite"] = bool(torch.isfinite(mta[call["attention_mask"].bool()]).all())
                row["outcome"] = "ok" if worst < 1e-4 and row["mta_finite"] else "wrong"
            except Exception as exc:  # noqa: BLE001
                # (a length the model's code fixes, Mamba's loop over the tokens: the program takes no other)
                fixed = "does not fit the rewritten model" in str(exc)
                row.update(outcome="shape fixed by the model" if fixed else "rewrite fails", detail=_one_line(exc))
        row.update(_use_mta(model, vocab, flag, mta))
    return row


def _use_mta(model, vocab: int, flag: bool, rewritten: torch.Tensor | None) -> dict:
    """``use_mta(model, config=SMALL_MTA)`` (the model's own forward, its attention through
    transformers' attention interface, no capture) at 40 tokens: how far it moved the model's
    output (0 where no layer took MTA) and how far it is from the rewrite's output under the same
    configuration (None where the rewrite did not run: capture failed, or a length the program
    fixed); or the one-line reason it refused or failed. Last: it changes the model."""
    call = _inputs(40, vocab, flag)
    keep = call["attention_mask"].bool()
    original = first_tensor(model(**call))
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            mr.use_mta(model, config=SMALL_MTA)
    except ValueError as exc:
        return {"use_mta": "refused", "use_mta_detail": _one_line(exc)}
    # (attention the model computes in its own code, which use_mta names: GIT's text decoder)
    own = [_one_line(w.message) for w in warned if "in their own code" in str(w.message)]
    try:
        with _CountOpCalls() as counted:
            out = first_tensor(model(**call))
    except Exception as exc:  # noqa: BLE001
        return {"use_mta": "fails", "use_mta_detail": _one_line(exc)}
    found = {"use_mta": "ran", "use_mta_op_calls": counted.calls,
             "use_mta_moved": (out[keep] - original[keep]).abs().max().item()}
    if own:
        found["use_mta_detail"] = own[0]
    if rewritten is not None:
        found["use_mta_vs_rewrite"] = (out[keep] - rewritten[keep]).abs().max().item()
    return found


def markdown(rows: list[dict], machine: str, transformers_version: str) -> str:
    ours = [r for r in rows if r["outcome"] not in ("not built", "model fails", "shape fixed by the model")]
    full = [r for r in ours if r.get("found") and r["found"] == r.get("rewritable")]
    ran = [r for r in rows if "use_mta" in r]
    compared = [r for r in ran if "use_mta_vs_rewrite" in r]
    without = [r for r in ran if r["use_mta"] == "ran" and "use_mta_vs_rewrite" not in r]
    lines = [
        f"Generated by `python benchmarks/survey_architectures.py` ({machine}, transformers {transformers_version}).",
        "",
        f"{len({r['type'] for r in rows})} causal-LM architectures × {len({r['attn'] for r in rows})} attention "
        f"implementations: {len(rows)} rows; {len(ours)} built and ran at two lengths (the others: transformers "
        f"refused the implementation or the shrunk config, the model failed on itself, or its code fixes the "
        f"sequence length, so no program takes a second one); of those, "
        f"{sum(r['outcome'] == 'ok' for r in ours)} rewrite with one chunk to the model's outputs (max |Δ| < 1e-4 "
        f"at two lengths) and run an MTA configuration to finite outputs, {len(full)} with every attention site "
        "rewritable.",
        "",
        f"`use_mta` (the model's own forward, no capture) on the {len(ran)} rows that ran: "
        f"{sum(r.get('use_mta') == 'ran' for r in ran)} ran under `MTAConfig(8, 1, 2, 1)`; where the rewrite "
        f"ran too ({len(compared)} rows), {sum(r['use_mta_vs_rewrite'] < 1e-5 for r in compared)} agree with it to "
        f"1e-5 (max |Δ| {max((r['use_mta_vs_rewrite'] for r in compared), default=0):.1e}); "
        f"{len(without)} ran where no rewrite could (capture failed, or the program takes the example's length only); "
        f"{sum(r.get('use_mta') == 'refused' for r in ran)} refused (attention not through transformers' attention "
        f"interface, or no attention at all), {sum(r.get('use_mta') == 'fails' for r in ran)} failed; "
        f"{sum(r.get('use_mta') == 'ran' and 'use_mta_detail' in r for r in ran)} ran with a warning naming attention "
        "the model computes in its own code (use_mta leaves it exact). Op calls: "
        "`torch.ops.mta.attention` calls in that forward; Δ model: how far it moved the model's output (about 1e-7 "
        "where every call came out exact: a sliding window of 16 tokens leaves no distant chunk to summarise at 40, "
        "and Qwen4-exp's per-query token selection leaves no chunk whole).",
        "",
        "| architecture | attention | outcome | SDPA calls | found | rewritable | max abs err, 1 chunk | use_mta: op calls, "
        "Δ rewrite / Δ model "
        "| left exact, and why / what failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        why = r.get("detail") or "; ".join(r.get("reasons", []))
        if r.get("use_mta_detail"):
            why = f"{why}; use_mta {r['use_mta']}: {r['use_mta_detail']}" if why else \
                f"use_mta {r['use_mta']}: {r['use_mta_detail']}"
        err = f"{r['exact_error']:.1e}" if "exact_error" in r else ""
        use = ""
        if r.get("use_mta") == "ran":
            vs = f"{r['use_mta_vs_rewrite']:.1e}" if "use_mta_vs_rewrite" in r else "–"
            use = f"{r['use_mta_op_calls']}, {vs} / {r['use_mta_moved']:.1e}"
        elif r.get("use_mta"):
            use = r["use_mta"]
        lines.append(f"| {r['type']} | {r['attn']} | {r['outcome']} | {r.get('sdpa_calls', '')} | {r.get('found', '')} | "
                     f"{r.get('rewritable', '')} | {err} | {use} | {why.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="*", default=None, help="model types (default: every causal LM)")
    parser.add_argument("--attn", nargs="*", default=["eager", "sdpa"])
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()
    rows = []
    for model_type in args.types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        for attn in args.attn:
            start = time.perf_counter()
            row = survey(model_type, attn)
            row["seconds"] = round(time.perf_counter() - start, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    machine = cpu_machine()
    save_results(Path(__file__).parent / "results", results_name("survey_architectures", args.tag), rows, machine,
                 markdown(rows, machine, transformers.__version__))


if __name__ == "__main__":
    main()
