"""``use_mta``: a transformers model's own forward (and ``generate``) with MTA on its prompts: a
prompt equals the rewritten graph (``rewrite``, itself tested against the float64 reference op);
decoding steps are exact SDPA over the cache; one-line errors for what it cannot take."""

from __future__ import annotations

import copy as copy_module
import sys
import warnings

import pytest
import torch

import mta_rewrite as mr

transformers = pytest.importorskip("transformers")

CONFIG = mr.MTAConfig(chunk_size=8, local_chunks=2, sinks=2, top_k=1)


def llama(layers: int = 2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, num_hidden_layers=layers, max_position_embeddings=512)
    return transformers.LlamaForCausalLM(cfg).eval()


def ids_and_mask(batch=2, n=70, pad=0):
    ids = torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0  # left padding, as generate gets it
    return ids, mask


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def graph_logits(model, ids, mask, **kwargs):
    """The logits of the graph ``rewrite`` makes of ``model`` (captured from this very call)."""
    graph = mr.rewrite(model, (), dict(input_ids=ids, attention_mask=mask, use_cache=False), **kwargs)
    return logits(graph, ids, mask)


def step_after_the_prefill(model, ids, mask, sequences, exact: str):
    """The reference for generate's second step: the cache a prefill under use_mta leaves, then the
    first generated token over it with the model's own ``exact`` attention (use_mta undone)."""
    first = model(input_ids=ids, attention_mask=mask, use_cache=True)
    model.set_attn_implementation(exact)
    token = sequences[:, ids.shape[1]:ids.shape[1] + 1]
    return model(input_ids=token, attention_mask=torch.cat([mask, torch.ones_like(token)], 1),
                 cache=first.past_key_values, use_cache=True).logits[:, -1]


@pytest.mark.parametrize("pad", [0, 9])
def test_a_prompt_equals_the_rewritten_graph(pad):
    """Every layer (config=) and one layer (plan=) on a prompt, with and without left padding:
    the rewritten graph's outputs (real positions); the model is not exact any more."""
    model = llama()
    ids, mask = ids_and_mask(pad=pad)
    exact = logits(model, ids, mask)
    layer0 = mr.Plan({"model.layers.0.self_attn": mr.MTAConfig(16, 1, 0, 0)})
    for kwargs in (dict(config=CONFIG), dict(plan=layer0)):
        graph = mr.rewrite(model, (), dict(input_ids=ids, attention_mask=mask, use_cache=False), **kwargs)
        with torch.no_grad():
            want = graph(input_ids=ids, attention_mask=mask, use_cache=False).logits
        got = logits(mr.use_mta(model, **kwargs), ids, mask)
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
        assert (got[real] - exact[real]).abs().max() > 1e-3
        model.set_attn_implementation("sdpa")  # undoes it
        torch.testing.assert_close(logits(model, ids, mask), exact)


def test_a_model_under_autocast_runs_mta_in_the_autocasts_dtype():
    """Under torch.autocast (bfloat16 on the CPU here; float16 or bfloat16 on a GPU, the common way
    to run a transformers model there), Llama's q and k leave its float32 rotary embedding while v
    leaves a bfloat16 linear: ``use_mta``, ``rewrite`` and ``generate`` failed with "q, k, v must
    share one float dtype" where the model's SDPA ran. Now both routes agree bit for bit, and MTA
    in the autocast's dtype is about as far from MTA in float32 as exact attention is from exact."""
    ids, mask = ids_and_mask(pad=5)
    call = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    real = mask.bool()
    with torch.no_grad():
        outside = mr.rewrite(llama(), (), call, config=CONFIG)
        mta32 = outside(**call).logits[real]
        exact32 = llama()(**call).logits[real]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            graph = mr.rewrite(llama(), (), call, config=CONFIG)(**call).logits[real]
            torch.testing.assert_close(outside(**call).logits[real], graph, rtol=0, atol=0)
            model = mr.use_mta(llama(), config=CONFIG)
            got = model(**call).logits[real]
            exact = llama()(**call).logits[real]
            model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
            mr.use_mta(llama(), config=CONFIG, decode=True).generate(ids, attention_mask=mask, max_new_tokens=3,
                                                                     do_sample=False)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, graph, rtol=0, atol=0)

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    assert (mta32 - exact32).abs().max() > 1e-3  # (MTA, not exact)
    assert rel(got, mta32) < 1.5 * rel(exact, exact32) and rel(got, mta32) < 0.02


GROUPS = mr.HeadGroups(((mr.MTAConfig(8, 1, 2, 0), (0, 1)), (None, (2, 3))))


@pytest.mark.parametrize("entry", [GROUPS, mr.Learned.from_tensor(mr.MTAConfig(8, 1, 2, 0), torch.randn(
    2, 16, generator=torch.Generator().manual_seed(3)))], ids=["head groups", "learned summaries"])
def test_plan_entries_equal_the_rewritten_graph(entry):
    """Per-head groups and learned summaries, as calibration writes them into plans."""
    model = llama(layers=1)
    ids, mask = ids_and_mask()
    plan = mr.Plan({"model.layers.0.self_attn": entry})
    graph = mr.rewrite(model, (), dict(input_ids=ids, attention_mask=mask, use_cache=False), plan=plan)
    with torch.no_grad():
        want = graph(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(logits(mr.use_mta(model, plan=plan), ids, mask), want, rtol=1e-5, atol=1e-5)


def test_generate_prefills_with_mta_and_decodes_exactly_over_the_cache():
    """The first generated token's scores are the rewritten graph's last logits on the prompt;
    the next step's are SDPA's over the cache the MTA prefill left (one token against it). With a
    chunk covering prompt and continuation, generation is the original model's, token for token."""
    model = llama()
    ids, mask = ids_and_mask(pad=5)
    with torch.no_grad():
        original = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        graph = mr.rewrite(model, (), dict(input_ids=ids, attention_mask=mask, use_cache=False), config=CONFIG)
        prompt_logits = graph(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
        mr.use_mta(model, config=CONFIG)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        torch.testing.assert_close(out.scores[0], prompt_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.scores[1], step_after_the_prefill(model, ids, mask, out.sequences, "sdpa"),
                                   rtol=1e-5, atol=1e-5)
        mr.use_mta(model, config=mr.MTAConfig(chunk_size=128))
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), original)


def separators(ids):
    """Two token ids of the prompt, as boundaries' separators: a few segments in each sequence."""
    return mr.Boundaries((int(ids[0, 20]), int(ids[1, 45])))


@pytest.mark.parametrize("pad", [0, 9])
def test_boundary_chunks_equal_the_rewritten_graph(pad):
    """Boundary chunks (boundaries=, and a plan's), segment ids from the prompt's token ids as the
    rewritten graph computes them: its outputs, not those of fixed chunks."""
    model = llama()
    ids, mask = ids_and_mask(pad=pad)
    inputs = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    boundaries = separators(ids)
    layer0 = {"model.layers.0.self_attn": mr.MTAConfig(16, 1, 0, 0)}
    real = mask.bool()
    for kwargs in (dict(config=CONFIG, boundaries=boundaries), dict(plan=mr.Plan(layer0, boundaries=boundaries))):
        with torch.no_grad():
            want = mr.rewrite(model, (), inputs, **kwargs)(**inputs).logits
            fixed = mr.rewrite(model, (), inputs, config=kwargs.get("config"), plan=mr.Plan(layer0) if "plan" in
                               kwargs else None)(**inputs).logits
        got = logits(mr.use_mta(model, **kwargs), ids, mask)
        torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
        assert (want[real] - fixed[real]).abs().max() > 1e-4  # (the boundaries change the outputs)
        model.set_attn_implementation("sdpa")
    with torch.no_grad():
        fixed = mr.rewrite(model, (), inputs, config=CONFIG)(**inputs).logits
    mr.use_mta(mr.use_mta(model, config=CONFIG, boundaries=boundaries), config=CONFIG)  # without them again: fixed chunks
    torch.testing.assert_close(logits(model, ids, mask)[real], fixed[real], rtol=1e-5, atol=1e-5)


def test_boundary_chunks_with_sink_logits_equal_the_rewritten_graph():
    """GPT-OSS (eager attention, learned sink logits: one more exact token of the op, with a
    segment of its own) under boundaries: the rewritten graph's values."""
    model = gpt_oss()
    ids, mask = ids_and_mask(pad=7)
    inputs = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    boundaries = separators(ids)
    with torch.no_grad():
        want = mr.rewrite(model, (), inputs, config=CONFIG, boundaries=boundaries)(**inputs).logits
        fixed = mr.rewrite(model, (), inputs, config=CONFIG)(**inputs).logits
        got = mr.use_mta(model, config=CONFIG, boundaries=boundaries)(**inputs).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    assert (want[real] - fixed[real]).abs().max() > 1e-4


def test_generate_with_boundary_chunks():
    """generate's prefill chunks the prompt by its boundaries: the first scores are the rewritten
    graph's last logits; the next step is exact over the cache."""
    model = llama()
    ids, mask = ids_and_mask(pad=5)
    boundaries = separators(ids)
    with torch.no_grad():
        graph = mr.rewrite(model, (), dict(input_ids=ids, attention_mask=mask, use_cache=False), config=CONFIG,
                           boundaries=boundaries)
        prompt_logits = graph(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
        mr.use_mta(model, config=CONFIG, boundaries=boundaries)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        torch.testing.assert_close(out.scores[0], prompt_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.scores[1], step_after_the_prefill(model, ids, mask, out.sequences, "sdpa"),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pad", [5, 0])
def test_decoding_with_boundary_chunks_gives_the_one_prompt_logits(pad):
    """use_mta(decode=True) with boundary chunks: each decoding step (teacher-forced over the cache,
    separators among the new tokens, so segments and chunks start during decoding) scores as the op
    over the whole sequence so far does (top_k 0), each sequence with its own chunks; not as exact
    decoding does. A plan per group of heads with boundaries, too (its exact group exactly), and
    learned summaries."""
    model = llama()
    ids, mask = ids_and_mask(n=50, pad=pad)
    boundaries = separators(ids)
    groups = mr.HeadGroups(((DECODING, (0, 3)), (None, (1,)), (mr.MTAConfig(6, 1, 1, 0), (2,))))
    learned = mr.Learned.from_tensor(DECODING, torch.randn(2, 16, generator=torch.Generator().manual_seed(4)))
    for entry in (DECODING, groups, learned):
        plan = mr.Plan({f"model.layers.{i}.self_attn": entry for i in range(2)}, boundaries=boundaries)
        whole, steps, exact, cache = teacher_forced(model, plan, ids, mask)
        torch.testing.assert_close(steps, whole, rtol=1e-5, atol=1e-5)
        assert (exact - whole).abs().max() > 1e-3  # (exact decoding differs)
        sums = vars(cache.layers[0])["_mta_chunk_sums"][0, 0, 2]
        assert not torch.equal(sums.done[0], sums.done[1])  # (each sequence its own chunks)


def teacher_forced(model, plan, ids, mask):
    """24 new tokens with the plan's separators among them (in both sequences, at different places)
    after the prompt ``ids``: the logits one forward of the whole sequence gives them under
    ``use_mta(model, plan=plan)``, those of teacher-forced decoding steps over the prompt's cache
    with ``decode=True`` and without (exact), and the decoding cache."""
    n = ids.shape[1]
    sep = torch.tensor(plan.boundaries.separators)
    new = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    new[0, ::5], new[1, 2::7] = sep[0], sep[1]
    sequence = torch.cat([ids, new], 1)
    whole_mask = torch.cat([mask, torch.ones_like(new)], 1)
    with torch.no_grad():
        whole = mr.use_mta(model, plan=plan)(input_ids=sequence, attention_mask=whole_mask,
                                             use_cache=False).logits[:, n:]
        steps, caches = [], []
        for decode in (True, False):
            mr.use_mta(model, plan=plan, decode=decode)
            cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
            logits = []
            for t in range(24):
                logits.append(model(input_ids=new[:, t:t + 1], attention_mask=whole_mask[:, :n + 1 + t], cache=cache,
                                    use_cache=True).logits[:, -1])
            steps.append(torch.stack(logits, 1))
            caches.append(cache)
    return whole, steps[0], steps[1], caches[0]


def test_boundary_chunks_follow_a_reordered_cache():
    """The token ids the hooks keep for a cache follow its reorder_cache (beam search),
    batch_select_indices and batch_repeat_interleave: after each, a decoding step's segments are
    those of the sequences the cache now holds (its scores the op's over the whole reordered
    sequences); generate with beams runs."""
    model = llama()
    ids, mask = ids_and_mask(n=50)
    boundaries = separators(ids)
    sep = torch.tensor(boundaries.separators)
    new = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    new[0, ::3], new[1, 1::4] = sep[0], sep[1]
    plan = mr.Plan({f"model.layers.{i}.self_attn": DECODING for i in range(2)}, boundaries=boundaries)
    changes = [(lambda c: c.reorder_cache(torch.tensor([1, 0])), [1, 0]),
               (lambda c: c.batch_select_indices(torch.tensor([1, 1])), [1, 1]),
               (lambda c: c.batch_repeat_interleave(2), [0, 0, 1, 1])]
    for change, rows in changes:
        with torch.no_grad():
            mr.use_mta(model, plan=plan, decode=True)
            cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
            for t in range(6):
                model(input_ids=new[:, t:t + 1], attention_mask=torch.ones(2, 51 + t), cache=cache, use_cache=True)
            change(cache)
            sequence = torch.cat([ids, new], 1)[rows]
            steps = [model(input_ids=sequence[:, 56 + t:57 + t], attention_mask=torch.ones(len(rows), 57 + t),
                           cache=cache, use_cache=True).logits[:, -1] for t in range(6)]
            whole = model(input_ids=sequence, attention_mask=torch.ones_like(sequence), use_cache=False).logits
        torch.testing.assert_close(torch.stack(steps, 1), whole[:, 56:], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False)


def test_what_boundary_chunks_cannot_take_is_one_line():
    model = llama()
    ids, mask = ids_and_mask()
    boundaries = separators(ids)
    clustered = mr.Clustered(mr.MTAConfig(8, 1, 0, 0), (((0.0,) * 16,) * 2,) * 2)
    cases = [
        (dict(plan=mr.Plan({"model.layers.0.self_attn": clustered}, boundaries=boundaries)),
         "a site with clustered summaries takes no boundaries (its summaries are by cluster, not chunk)"),
        (dict(plan=mr.Plan({}, boundaries=boundaries), boundaries=mr.Boundaries((3,))),
         f"the plan says {boundaries} but boundaries= says boundaries after tokens [3] of input_ids: give one"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as info:
            mr.use_mta(model, **kwargs)
        assert str(info.value) == message
    with pytest.raises(ValueError, match=r"^boundaries read the model input 'token_ids', which LlamaForCausalLM's "
                                         r"forward does not take \(its inputs: input_ids, attention_mask, .*labels, "
                                         r"use_cache, logits_to_keep\)$"):
        mr.use_mta(model, config=CONFIG, boundaries=mr.Boundaries((3,), input="token_ids"))
    assert model.config._attn_implementation == "sdpa"  # nothing was changed
    mr.use_mta(model, config=CONFIG, boundaries=boundaries)
    with pytest.raises(ValueError) as info, torch.no_grad():
        model(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask)
    assert str(info.value) == ("boundary chunks read the segments from the model's input_ids, which this call did not "
                               "give (as token ids [B, n]): call the model with input_ids=")
    with pytest.raises(ValueError) as info, torch.no_grad():
        model.model(input_ids=ids, attention_mask=mask)  # (the inner model: no segment ids of its own call)
    assert str(info.value).startswith("boundary chunks read the segments from the model's input_ids")


@pytest.mark.parametrize("build, pad", [("llama", 5), ("llama", 0), ("llama_eager", 5), ("gpt_oss", 5)])
def test_generate_over_a_static_cache_prefills_with_mta(build, pad):
    """generate(cache_implementation="static") hands the prefill every slot of the cache (keys
    longer than the prompt, masked after it; without padding, SDPA gets no mask but is_causal): the
    prompt still runs the op (it ran exact, silently, before), the next step is the model's own
    attention over the cache."""
    model = globals()[build]()
    own = model.config._attn_implementation
    ids, mask = ids_and_mask(pad=pad)
    with torch.no_grad():
        graph = mr.rewrite(model, (), dict(input_ids=ids, attention_mask=mask, use_cache=False), config=CONFIG)
        prompt_logits = graph(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
        mr.use_mta(model, config=CONFIG)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, cache_implementation="static")
        torch.testing.assert_close(out.scores[0], prompt_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.scores[1], step_after_the_prefill(model, ids, mask, out.sequences, own),
                                   rtol=1e-5, atol=1e-5)


DECODING = mr.MTAConfig(chunk_size=8, local_chunks=2, sinks=2, top_k=0)


@pytest.mark.parametrize("build, pad, cache", [("llama", 5, "dynamic"), ("llama", 0, "dynamic"),
                                               ("llama_eager", 5, "dynamic"), ("llama", 5, "static"),
                                               ("llama", 0, "static")])
def test_decoding_with_mta_gives_the_one_prompt_logits(build, pad, cache):
    """use_mta(decode=True): every step of generate (dynamic and static caches, SDPA and eager,
    with and without left padding) scores as the op over the whole sequence so far does (top_k 0:
    the step is the one prompt's row), not as exact decoding over the cache does; the chunk sums
    live on the cache's layers, one per chunk the last step's window had left."""
    model = globals()[build]()
    ids, mask = ids_and_mask(n=30, pad=pad)
    options = dict(max_new_tokens=20, do_sample=False, output_scores=True, return_dict_in_generate=True,
                   **(dict(cache_implementation="static") if cache == "static" else {}))
    with torch.no_grad():
        exact = torch.stack(mr.use_mta(model, config=DECODING).generate(ids, attention_mask=mask, **options).scores, 1)
        out = mr.use_mta(model, config=DECODING, decode=True).generate(ids, attention_mask=mask, **options)
        whole_mask = torch.cat([mask, torch.ones_like(out.sequences[:, 30:])], 1)
        whole = model(input_ids=out.sequences, attention_mask=whole_mask, use_cache=False).logits[:, 29:-1]
    torch.testing.assert_close(torch.stack(out.scores, 1), whole, rtol=1e-5, atol=1e-5)
    assert (exact[:, 1:] - whole[:, 1:]).abs().max() > 1e-3  # (where the sequences agree, exact decoding differs)
    for layer in out.past_key_values.layers:
        assert vars(layer)["_mta_chunk_sums"][0, 0, 2].chunks == 48 // 8 - 2 + 1  # (the last step's query: token 48)


def generated_and_whole(model, ids, mask, pad_token_id=None, **use_mta):
    """``generate`` (greedy, 20 new tokens) of ``model`` under ``use_mta(model, **use_mta)``: its
    scores [B, 20, V], the logits one forward of the generated sequences gives at the same
    positions (at generate's position ids), and its output."""
    n = ids.shape[1]
    with torch.no_grad():
        out = mr.use_mta(model, **use_mta).generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                                                    output_scores=True, return_dict_in_generate=True,
                                                    pad_token_id=pad_token_id)
        whole_mask = torch.cat([mask, torch.ones_like(out.sequences[:, n:])], 1)
        positions = (whole_mask.cumsum(-1) - 1).masked_fill_(whole_mask == 0, 1)  # (generate's position ids)
        whole = model(input_ids=out.sequences, attention_mask=whole_mask, position_ids=positions,
                      use_cache=False).logits[:, n - 1:-1]
    return torch.stack(out.scores, 1), whole, out


DECODERS = {  # attention modules handed the cache under different names (layer_past, past_key_values, cache)
    "gpt_neox": lambda t: t.GPTNeoXConfig(vocab_size=128, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                          intermediate_size=128, max_position_embeddings=512),
    "falcon": lambda t: t.FalconConfig(vocab_size=128, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                       new_decoder_architecture=True, num_kv_heads=2),
    "gpt2": lambda t: t.GPT2Config(vocab_size=128, n_embd=64, n_head=4, n_layer=2, n_positions=512),
    "opt": lambda t: t.OPTConfig(vocab_size=128, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                 ffn_dim=128, max_position_embeddings=512, word_embed_proj_dim=64),
    "phi": lambda t: t.PhiConfig(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                 num_hidden_layers=2, intermediate_size=128, max_position_embeddings=512),
}


@pytest.mark.parametrize("name", DECODERS)
def test_decoding_with_mta_in_other_decoder_families(name):
    """use_mta(decode=True) on decoders whose attention takes the cache as ``layer_past`` (GPT-NeoX,
    Falcon: their steps were exact, silently, until 2026-12-05), ``past_key_values`` or ``cache``:
    every step scores as the op over the whole sequence so far, with left padding (at generate's
    positions: GPT-2's are absolute), and every layer keeps chunk sums."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(DECODERS[name](transformers)).eval()
    ids, mask = ids_and_mask(n=30, pad=5)
    scores, whole, out = generated_and_whole(model, ids, mask, pad_token_id=0, config=DECODING, decode=True)
    torch.testing.assert_close(scores, whole, rtol=1e-5, atol=1e-5)
    assert all("_mta_chunk_sums" in vars(layer) for layer in out.past_key_values.layers)


def test_decoding_with_learned_summaries_gives_the_one_prompt_logits():
    """A plan of learned summaries (as calibrate --learn-summaries writes it) decodes with them: each
    step's scores are the op's over the whole sequence so far, with padding (at generate's positions:
    a learned summary's weights softmax(k_s·w) see the keys' rotary angles, which the mean's do not)."""
    model = llama()
    ids, mask = ids_and_mask(n=30, pad=5)
    weights = torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(4))
    plan = mr.Plan({f"model.layers.{i}.self_attn": mr.Learned.from_tensor(DECODING, weights[i]) for i in range(2)})
    scores, whole, out = generated_and_whole(model, ids, mask, plan=plan, decode=True)
    means, _, _ = generated_and_whole(model, ids, mask, config=DECODING, decode=True)
    torch.testing.assert_close(scores, whole, rtol=1e-5, atol=1e-5)
    assert (means[:, 1:] - whole[:, 1:]).abs().max() > 1e-3  # (not the means')


def test_decoding_with_head_groups_gives_the_one_prompt_logits():
    """A plan per group of heads (calibrate's per-head groups, learned summaries on one layer)
    decodes with each group's configuration, its exact group exactly: every step's scores are the
    op's over the whole sequence so far, with padding (at generate's positions, for the learned
    layer); not those of exact decoding. Groups split a key/value head's query heads (0 and 1 read
    key/value head 0; 1 is exact)."""
    model = llama()
    ids, mask = ids_and_mask(n=30, pad=5)
    groups = mr.HeadGroups(((DECODING, (0, 3)), (None, (1,)), (mr.MTAConfig(6, 1, 1, 0), (2,))))
    weight = torch.randn(2, 16, generator=torch.Generator().manual_seed(4))
    plan = mr.Plan({"model.layers.0.self_attn": groups,
                    "model.layers.1.self_attn": mr.Learned.from_tensor(groups, weight)})
    exact, _, _ = generated_and_whole(model, ids, mask, plan=plan)
    scores, whole, out = generated_and_whole(model, ids, mask, plan=plan, decode=True)
    torch.testing.assert_close(scores, whole, rtol=1e-5, atol=1e-5)
    assert (exact[:, 1:] - whole[:, 1:]).abs().max() > 1e-3
    assert sorted(vars(out.past_key_values.layers[0])["_mta_chunk_sums"]) == [(0, 0, 2), (2, 1, 2)]


def test_two_threads_generating_with_one_model_each_read_their_own_call():
    """A server's threads generating with one model at once: each call's cache (decoding steps'
    chunk sums) and segments (boundary chunks) are its own thread's. Both kept on the model until
    2026-12-07: each thread read whichever call came last (by script, 24 of 24 concurrent decodings
    differed from the same run alone; with boundaries 22 of 24 failed). The two calls are made to
    meet inside every attention layer (a barrier after use_mta's own hooks), where they overwrote
    each other."""
    import threading

    model = llama()
    mr.use_mta(model, config=CONFIG, decode=True, boundaries=mr.Boundaries((5, 17, 40)))
    prompts = [torch.randint(1, 128, (1, 50), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    options = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        alone = [model.generate(p, attention_mask=torch.ones_like(p), **options) for p in prompts]
    barrier = threading.Barrier(2)

    def meet(module, args, kwargs):
        try:
            barrier.wait(timeout=10)
        except threading.BrokenBarrierError:
            pass

    hooks = [layer.self_attn.register_forward_pre_hook(meet, with_kwargs=True) for layer in model.model.layers]
    together, errors = [None, None], []

    def generate(i):
        try:
            with torch.no_grad():
                together[i] = model.generate(prompts[i], attention_mask=torch.ones_like(prompts[i]), **options)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=generate, args=(i,)) for i in range(2)]
    try:
        [t.start() for t in threads]
        [t.join() for t in threads]
    finally:
        [h.remove() for h in hooks]
    assert not errors, errors
    for got, want in zip(together, alone):
        assert torch.equal(got.sequences, want.sequences)
        torch.testing.assert_close(torch.stack(got.scores, 1), torch.stack(want.scores, 1), rtol=0, atol=0)


LOAD_AND_GENERATE = """
import sys, torch
model = torch.load(sys.argv[1], weights_only=False)  # (mta_rewrite imported by the unpickling alone)
ids, mask = torch.load(sys.argv[2])
with torch.no_grad():
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
torch.save((model.config._attn_implementation, torch.stack(out.scores, 1)), sys.argv[3])
"""


def test_a_model_under_use_mta_saved_whole_runs_so_in_another_process(tmp_path):
    """``torch.save(model)`` of a model under use_mta (boundary chunks, decoding with MTA; eager
    attention) and ``torch.load`` in a fresh process: generate's scores as before the save. Until
    2026-12-07 the save failed ("Can't pickle local object '_watch_calls.<locals>.forget'": use_mta's
    hooks were closures), and a fresh process had no "mta_eager" registered."""
    import os
    import subprocess

    model = llama_eager()
    mr.use_mta(model, config=DECODING, decode=True, boundaries=mr.Boundaries((5, 17, 40)))
    ids, mask = ids_and_mask(n=50, pad=5)
    with torch.no_grad():
        want = torch.stack(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                          output_scores=True, return_dict_in_generate=True).scores, 1)
    torch.save(model, tmp_path / "model.pt")
    torch.save((ids, mask), tmp_path / "inputs.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(mr.__file__)),
                                                                     os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(tmp_path / "model.pt"),
                           str(tmp_path / "inputs.pt"), str(tmp_path / "scores.pt")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    implementation, got = torch.load(tmp_path / "scores.pt")
    assert implementation == "mta_eager"
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert vars(model.model.layers[0].self_attn)["_mta_call"].cache is None  # (the save kept no call's cache)


def test_use_mta_again_on_a_copy_replaces_its_hooks_and_keeps_its_attention():
    """use_mta on a deep copy (or an unpickled model) of a model under use_mta: its own hooks
    replaced, not doubled, and its exact calls still the model's original attention (eager here).
    Until 2026-12-07 both were kept in tables keyed by the model object, which a copy is not: the
    copy got a second set of hooks and was switched to "mta" (SDPA for its exact calls)."""
    model = llama_eager()
    mr.use_mta(model, config=CONFIG, boundaries=mr.Boundaries((5, 17, 40)))
    for make in (copy_module.deepcopy, pickle_round_trip):
        copied = make(model)
        mr.use_mta(copied, config=CONFIG, boundaries=mr.Boundaries((5, 17)))
        assert copied.config._attn_implementation == "mta_eager"
        hooks = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in (copied, copied.model.layers[0].self_attn)]
        assert hooks == [len(m._forward_pre_hooks) + len(m._forward_hooks)
                         for m in (model, model.model.layers[0].self_attn)] == [4, 2]  # (the model takes a cache too)
        ids, mask = ids_and_mask(n=50)
        fresh = mr.use_mta(llama_eager(), config=CONFIG, boundaries=mr.Boundaries((5, 17)))
        assert torch.equal(logits(copied, ids, mask), logits(fresh, ids, mask))


def test_use_mta_on_a_peft_model_works_on_the_model_it_wraps():
    """PEFT's ``get_peft_model`` wraps a transformers model in a PeftModel that hands attribute
    lookups on to it (``set_attn_implementation``, ``config``) and gives it back merged
    (``merge_and_unload``). use_mta of the wrapper (boundary chunks, eager attention, the wrapper
    left in training mode, as get_peft_model leaves it) runs its forward and ``generate`` as use_mta
    of the merged model does, and what it did stays with the model it wraps. Until 2026-12-07 it was
    kept on the wrapper: boundaries were refused ("PeftModel's forward does not take input_ids",
    its forward is ``(*args, **kwargs)``), and without them the merged model lost it (use_mta again
    switched its exact calls to SDPA; ``torch.save`` of it failed to load in a fresh process)."""
    peft = pytest.importorskip("peft")

    boundaries = mr.Boundaries((5, 17, 40))
    wrapped = peft.get_peft_model(llama_eager(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False))
    merged = mr.use_mta(copy_module.deepcopy(wrapped).merge_and_unload(), config=DECODING, decode=True,
                        boundaries=boundaries)
    assert mr.use_mta(wrapped, config=DECODING, decode=True, boundaries=boundaries) is wrapped
    ids, mask = ids_and_mask(n=50, pad=5)
    real = mask.bool()
    torch.testing.assert_close(logits(wrapped, ids, mask)[real], logits(merged, ids, mask)[real], rtol=1e-5, atol=1e-5)
    options = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, output_scores=True,
                   return_dict_in_generate=True)
    with torch.no_grad():
        got = torch.stack(wrapped.generate(input_ids=ids, **options).scores, 1)
        want = torch.stack(merged.generate(ids, **options).scores, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    unwrapped = wrapped.merge_and_unload()
    assert vars(unwrapped)["_mta_installed"].original == "eager"
    torch.testing.assert_close(logits(unwrapped, ids, mask)[real], logits(merged, ids, mask)[real])
    mr.use_mta(unwrapped, config=CONFIG)
    assert unwrapped.config._attn_implementation == "mta_eager"  # (was "mta": SDPA for the exact calls)
    # a plan names a layer as find_attention does for the wrapper, or for the model it wraps
    wrapped = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    call = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    site = mr.find_attention(wrapped.eval(), (), call)[0].name
    assert site == "base_model.model.model.layers.0.self_attn"
    want = graph_logits(wrapped, ids, mask, plan=mr.Plan({site: CONFIG}))
    for name in (site, "model.layers.0.self_attn"):
        got = logits(mr.use_mta(copy_module.deepcopy(wrapped), plan=mr.Plan({name: CONFIG})), ids, mask)
        torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_use_mta_on_a_module_holding_a_transformers_model_works_on_that_model():
    """A module of the user's (or sentence-transformers' SentenceTransformer) that is no
    transformers model but holds one: use_mta works on the one it holds (its forward, called by the
    holder's, runs MTA: the holder's output is what it gives with use_mta on the held model).
    Until 2026-12-07: "use_mta takes a transformers model (PreTrainedModel); Classifier is not one".
    A module holding two (two towers) is a one-line error naming them."""

    class Classifier(torch.nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone, self.head = backbone, torch.nn.Linear(64, 3)

        def forward(self, input_ids, attention_mask):
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            return self.head(hidden[:, -1])

    ids, mask = ids_and_mask(pad=9)
    torch.manual_seed(0)
    holder = Classifier(llama().model).eval()
    want = copy_module.deepcopy(holder)
    mr.use_mta(want.backbone, config=CONFIG)
    assert mr.use_mta(holder, config=CONFIG, boundaries=mr.Boundaries((5, 17))) is holder
    assert holder.backbone.config._attn_implementation == "mta"
    mr.use_mta(want.backbone, config=CONFIG, boundaries=mr.Boundaries((5, 17)))
    with torch.no_grad():
        torch.testing.assert_close(holder(ids, mask), want(ids, mask), rtol=0, atol=0)
        exact = Classifier(llama().model).eval()
        exact.load_state_dict(holder.state_dict())
        assert (holder(ids, mask) - exact(ids, mask)).abs().max() > 1e-4

    class Towers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.document = llama().model, llama().model

    with pytest.raises(ValueError, match=r"^Towers holds 2 transformers models \(document, query\): use_mta each of "
                                         r"them$"):
        mr.use_mta(Towers(), config=CONFIG)


def pickle_round_trip(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_decoding_with_mta_under_torch_compile():
    """generate with a compiled forward and a plan of a different configuration per layer decodes
    as the uncompiled model does: each layer's steps under its own configuration, its sums on its
    own cache layer (a compiled frame reused across layers handed the second layer's first step
    the first layer's module, whose configuration and sums it then used: wrong from that step on,
    until 2026-12-05). The cache a call was handed is kept on its module during the call only
    (until 2026-12-06 a dict of ours keyed by the module, whose store dynamo traced over every
    module use_mta had watched in the process; CI saw it fail there once)."""
    model = llama()
    ids, mask = ids_and_mask(n=30, pad=5)
    plan = mr.Plan({"model.layers.0.self_attn": mr.MTAConfig(8, 2, 2, 0),
                    "model.layers.1.self_attn": mr.MTAConfig(4, 2, 2, 0)})
    options = dict(max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            eager = mr.use_mta(model, plan=plan, decode=True).generate(ids, attention_mask=mask, **options)
            model.forward = torch.compile(model.forward)
            compiled = model.generate(ids, attention_mask=mask, **options)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(torch.stack(compiled.scores, 1), torch.stack(eager.scores, 1), rtol=1e-5, atol=1e-5)
    sums = [vars(layer)["_mta_chunk_sums"] for layer in compiled.past_key_values.layers]
    assert [s[0, 0, 2].chunk_size for s in sums] == [8, 4]
    # the cache each call was handed is the module's while the call runs, never after it
    held = [name for name, module in model.named_modules() if getattr(vars(module).get("_mta_call"), "cache", None)
            is not None]
    assert held == [] and "_mta_call" in vars(model.model.layers[0].self_attn)


def test_a_prompt_continued_over_the_cache_under_torch_compile():
    """A compiled forward continuing a prompt over a cache (the op over the whole sequence, graph
    breaks at the mask checks) with a plan of a different configuration per layer gives the
    uncompiled logits: each layer under its own configuration (until 2026-12-05 the second layer
    ran under the first one's: 1.2e-3 off), the op one node Inductor does not lower. The masks'
    readings run outside the graphs (until 2026-12-06 dynamo traced them, and their cache of
    readings, guarding on its size: a recompile per reading)."""
    from mta_rewrite.ops import masks

    model = llama()
    ids, mask = ids_and_mask(n=160, pad=5)
    mr.use_mta(model, plan=mr.Plan({"model.layers.0.self_attn": mr.MTAConfig(8, 2, 2, 0),
                                    "model.layers.1.self_attn": mr.MTAConfig(16, 1, 2, 1)}))
    eager, _ = continued(model, ids, mask, 100)
    readings, structure = [], masks._structure

    def watched(*args, **kwargs):
        readings.append(torch.compiler.is_compiling())
        return structure(*args, **kwargs)

    torch._dynamo.reset()
    try:
        masks._structure = watched
        model.forward = torch.compile(model.forward)
        compiled, _ = continued(model, ids, mask, 100)
    finally:
        masks._structure = structure
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert readings and not any(readings)  # (read, and never while dynamo traced)


@pytest.mark.parametrize("saved", [False, True], ids=["as made", "saved and loaded"])
def test_decoding_with_mta_follows_changes_to_the_cache(saved):
    """A cache reordered (beam search), cropped (assisted generation), its batch selected or
    repeated, or reset and refilled, drops its layers' chunk sums: the next step is computed over
    the cache as it is then, as over a copy of it that never had sums; generate with beams runs.
    A cache saved and loaded (``torch.save`` / ``torch.load``: a prompt's cache kept on disk) too;
    until 2026-12-07 the loaded cache's methods were the class's own and kept the sums."""
    model = llama()
    ids, mask = ids_and_mask(n=45)
    mr.use_mta(model, config=mr.MTAConfig(8, 1, 2, 1), decode=True)

    def step(cache, token):
        n = cache.get_seq_length() + 1
        return model(input_ids=token, attention_mask=torch.ones(token.shape[0], n, dtype=torch.long), cache=cache,
                     use_cache=True).logits

    def without_sums(cache):
        fresh = copy_module.deepcopy(cache)
        for layer in fresh.layers:
            vars(layer).pop("_mta_chunk_sums")
        return fresh

    changes = [lambda c: c.reorder_cache(torch.tensor([1, 0])), lambda c: c.crop(-11),
               lambda c: c.batch_repeat_interleave(2), lambda c: c.batch_select_indices(torch.tensor([3, 0]))]
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        for change in changes:
            token = ids[:1, 7:8].expand(cache.layers[0].keys.shape[0], 1)
            step(cache, token)
            if saved:  # (with its chunk sums)
                cache = pickle_round_trip(cache)
            reference = without_sums(cache)
            change(cache)
            change(reference)
            assert "_mta_chunk_sums" not in vars(cache.layers[0])
            token = token[:1].expand(cache.layers[0].keys.shape[0], 1)
            torch.testing.assert_close(step(cache, token), step(reference, token), rtol=1e-5, atol=1e-5)
        cache.reset()
        assert "_mta_chunk_sums" not in vars(cache.layers[0])
        model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False)


def continued(model, ids, mask, cached: int, cache=None):
    """The logits of ids[:, cached:] continued over the cache of a forward of ids[:, :cached] (a
    dynamic cache, or ``cache``), and a copy of that cache as it was before the continuation."""
    with torch.no_grad():
        out = model(input_ids=ids[:, :cached], attention_mask=mask[:, :cached], cache=cache, use_cache=True)
        before = copy_module.deepcopy(out.past_key_values)
        return model(input_ids=ids[:, cached:], attention_mask=mask, cache=out.past_key_values,
                     use_cache=True).logits, before


@pytest.mark.parametrize("build, pad", [("llama", 5), ("llama", 0), ("llama_eager", 5)])
def test_a_prompt_continued_over_the_cache_runs_the_op(build, pad, monkeypatch):
    """A prompt continued over a cache (a second turn) runs the op over the whole sequence: without
    top-k its logits are those of the one prompt of all its tokens, over a dynamic and a static
    cache (they ran the model's own attention before); with top-k, from the first chunk after the
    cache on. Not the model's own attention over the cache. The op is given transformers' mask as
    key padding [B, 1, 1, n] (no mask without padding), causal: nothing n × n."""
    from mta_rewrite import interface

    model = globals()[build]()
    own = model.config._attn_implementation
    ids, mask = ids_and_mask(n=160, pad=pad)
    config = mr.MTAConfig(8, 2, 2, 0)
    whole = logits(mr.use_mta(model, config=config), ids, mask)
    given, site_output = [], interface.site_output

    def spy(config, original, q, k, v, mask, causal, *args, **kwargs):
        given.append((None if mask is None else tuple(mask.shape), causal))
        return site_output(config, original, q, k, v, mask, causal, *args, **kwargs)

    monkeypatch.setattr(interface, "site_output", spy)
    got, cache = continued(model, ids, mask, 44)
    assert given[-1] == ((2, 1, 1, 160) if pad else None, True), given
    torch.testing.assert_close(got, whole[:, 44:], rtol=1e-5, atol=1e-5)
    static, _ = continued(model, ids, mask, 44, transformers.StaticCache(config=model.config, max_cache_len=192))
    torch.testing.assert_close(static, whole[:, 44:], rtol=1e-5, atol=1e-5)
    model.set_attn_implementation(own)
    with torch.no_grad():
        exact = model(input_ids=ids[:, 44:], attention_mask=mask, cache=cache, use_cache=True).logits
    assert (got - exact).abs().max() > 1e-4
    last = mr.Plan({"model.layers.1.self_attn": mr.MTAConfig(8, 1, 0, 1)})  # (a layer's rows feed the next's keys)
    whole = logits(mr.use_mta(model, plan=last), ids, mask)
    got, _ = continued(model, ids, mask, 44)
    torch.testing.assert_close(got[:, 4:], whole[:, 48:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pad", [5, 0])
def test_boundary_chunks_continued_over_the_cache_are_the_one_prompt(pad, monkeypatch):
    """Boundary chunks on a prompt continued over a cache the model's hooks saw filled (returned by
    the first call, or passed to it): the segments of the whole sequence, the one prompt's logits;
    generate(prefill_chunk_size=...) with boundaries gives the one-piece prefill's first scores,
    its later pieces computing the rows from their own query block on only (``rows_from``)."""
    attention_module = sys.modules["mta_rewrite.ops.attention"]
    varlen, rows = attention_module.mta_attention_varlen, []
    monkeypatch.setattr(attention_module, "mta_attention_varlen",
                        lambda *a, **kw: rows.append(kw["rows_from"]) or varlen(*a, **kw))
    model = llama()
    ids, mask = ids_and_mask(n=160, pad=pad)
    boundaries = separators(ids)
    whole = logits(mr.use_mta(model, config=mr.MTAConfig(8, 2, 2, 0), boundaries=boundaries), ids, mask)
    fixed = logits(mr.use_mta(model, config=mr.MTAConfig(8, 2, 2, 0)), ids, mask)
    assert (whole - fixed).abs().max() > 1e-4  # (the boundaries change the values)
    mr.use_mta(model, config=mr.MTAConfig(8, 2, 2, 0), boundaries=boundaries)
    got, _ = continued(model, ids, mask, 44)
    torch.testing.assert_close(got, whole[:, 44:], rtol=1e-5, atol=1e-5)
    got, _ = continued(model, ids, mask, 44, transformers.DynamicCache(config=model.config))
    torch.testing.assert_close(got, whole[:, 44:], rtol=1e-5, atol=1e-5)
    kwargs = dict(attention_mask=mask, max_new_tokens=2, do_sample=False, output_scores=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        one = model.generate(ids, **kwargs)
        rows.clear()
        pieces = model.generate(ids, prefill_chunk_size=64, **kwargs)
    torch.testing.assert_close(pieces.scores[0], one.scores[0], rtol=1e-5, atol=1e-5)
    assert sorted(set(rows)) == [0, 64, 128]  # (each of the 2 layers, each piece)


def test_a_chunked_prefill_is_the_one_prompt():
    """generate(prefill_chunk_size=64): the prompt in three calls over the cache gives the first
    scores and the tokens of the prefill in one call (it was MTA for the first piece only)."""
    model = mr.use_mta(llama(), config=mr.MTAConfig(8, 2, 2, 0))
    ids, mask = ids_and_mask(n=160, pad=5)
    kwargs = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, output_scores=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        one = model.generate(ids, **kwargs)
        pieces = model.generate(ids, prefill_chunk_size=64, **kwargs)
        model.set_attn_implementation("sdpa")
        exact = model.generate(ids, prefill_chunk_size=64, **kwargs)
    torch.testing.assert_close(pieces.scores[0], one.scores[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(pieces.sequences, one.sequences)
    assert (pieces.scores[0] - exact.scores[0]).abs().max() > 1e-4


def test_what_a_continued_prompt_keeps_exact():
    """The model's own attention over the cache for: fewer new tokens than a chunk (7 after 153:
    decoding, as assisted generation's candidates are, though the op's flops would be fewer),
    boundary chunks over a cache whose tokens the model's hooks did not see (filled without
    boundaries: its segments begin in tokens they do not know; a deep copy of a cache they filled
    keeps its tokens and runs the op as the cache does), GPT-OSS's sliding-window layer (its cache
    keeps the window only); the other layers run the op (GPT-OSS's with its sink logits: the one
    prompt's values)."""
    model = llama()
    ids, mask = ids_and_mask(n=160, pad=5)
    config = mr.MTAConfig(8, 2, 2, 0)
    got, cache = continued(mr.use_mta(model, config=config), ids, mask, 153)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        exact = model(input_ids=ids[:, 153:], attention_mask=mask, cache=cache, use_cache=True).logits
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)
    _, cache = continued(mr.use_mta(model, config=config), ids, mask, 44)  # (no boundaries: no hooks)
    mr.use_mta(model, config=config, boundaries=separators(ids))
    with torch.no_grad():
        got = model(input_ids=ids[:, 44:], attention_mask=mask, cache=copy_module.deepcopy(cache), use_cache=True).logits
        model.set_attn_implementation("sdpa")
        exact = model(input_ids=ids[:, 44:], attention_mask=mask, cache=cache, use_cache=True).logits
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)
    mr.use_mta(model, config=config, boundaries=separators(ids))
    own, cache = continued(model, ids, mask, 44)
    with torch.no_grad():
        copied = model(input_ids=ids[:, 44:], attention_mask=mask, cache=copy_module.deepcopy(cache),
                       use_cache=True).logits
    torch.testing.assert_close(copied, own, rtol=1e-5, atol=1e-5)
    assert (own - exact).abs().max() > 1e-4
    model = gpt_oss()  # layer 0 slides over 24 tokens, layer 1 attends to all (with its sink logits)
    layer1 = mr.Plan({"model.layers.1.self_attn": config})
    whole = logits(mr.use_mta(model, plan=layer1), ids, mask)
    torch.testing.assert_close(continued(model, ids, mask, 44)[0], whole[:, 44:], rtol=1e-5, atol=1e-5)
    got, cache = continued(mr.use_mta(model, config=config), ids, mask, 44)
    mr.use_mta(model, plan=layer1)
    with torch.no_grad():
        want = model(input_ids=ids[:, 44:], attention_mask=mask, cache=copy_module.deepcopy(cache),
                     use_cache=True).logits
        model.set_attn_implementation("eager")
        exact = model(input_ids=ids[:, 44:], attention_mask=mask, cache=cache, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - exact).abs().max() > 1e-4


def test_the_continued_prompts_gate_counts_the_rows_each_device_computes():
    """The gate's op flops (``interface._op_flops``): on the CPU and on CUDA the query chunks before
    the first new token are not computed (``rows_from``), so 512 new tokens after 15872 cached take
    the op there (SmolLM2's head size, c128 L2 s4 k2); a device without ``rows_from`` computes
    every row (the spec's cost of all n), more than exact attention of the 512 rows. Boundary
    chunks: on the CPU for key padding, trimmed by query blocks of 128 (their window range: the
    block and L chunks before it; with top-k the chunks its query chunks select, at most
    top_k·(block + c) tokens: since 2026-12-05, every row before), on CUDA for key padding by
    chunks (the kernels); with a mask per query, every row."""
    from mta_rewrite.calibration.cost import mta_flops
    from mta_rewrite.interface import _op_flops

    config, n, m, d = mr.MTAConfig(128, 2, 4, 2), 16384, 512, 64
    exact = 4.0 * m * n * d
    every_row = mta_flops(config, n, d, True)
    assert _op_flops(config, n, n - m, d, torch.device("meta")) == every_row > exact
    chunks = 4.0 * d * (m * (128 * 4 + 4 + 128) + n)
    for device in ("cpu", "cuda"):
        assert _op_flops(config, n, n - m, d, torch.device(device)) == chunks < exact / 10
    blocks_top_k = 4.0 * d * (m * (128 + 128 * 2 + 4 + 128 + 2 * (128 + 128)) + n)
    assert _op_flops(config, n, n - m, d, torch.device("cpu"), boundary=True) == blocks_top_k < exact / 10
    assert _op_flops(config, n, n - m, d, torch.device("cuda"), boundary=True) == chunks
    no_top_k = mr.MTAConfig(128, 2, 4, 0)
    blocks = 4.0 * d * (m * (128 + 128 * 2 + 4 + 128) + n)
    assert _op_flops(no_top_k, n, n - m, d, torch.device("cpu"), boundary=True) == blocks < exact / 10
    for device in ("cpu", "cuda"):
        assert _op_flops(no_top_k, n, n - m, d, torch.device(device), True, False) == mta_flops(no_top_k, n, d, True)


def gemma2(cap: float = 1.0):
    """A Gemma-2 from its config (random weights, eager attention: transformers' only one for its
    soft-cap): every layer soft-caps its scores (``attn_logit_softcapping``, here low enough to bend
    these scores: q and k projections scaled up from the initialisation's, whose scores are ~1e-3),
    every other layer a sliding window of 16 tokens."""
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=16, intermediate_size=128, num_hidden_layers=2, pad_token_id=0,
                                    sliding_window=16, attn_logit_softcapping=cap, attn_implementation="eager")
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(40.0)
            layer.self_attn.k_proj.weight.mul_(40.0)
    return model


@pytest.mark.parametrize("pad", [0, 9])
def test_a_soft_capping_model_runs_mta_with_its_cap(pad):
    """Gemma-2 soft-caps every layer's scores (tanh): ``rewrite`` finds the cap in the graph and
    ``use_mta`` takes it from the model's call (``softcap``); a prompt equals the rewritten graph,
    one chunk (nothing approximated) the original model, and generate prefills with MTA. (Both
    were left exact before: the op had no soft-cap.)"""
    model = gemma2()
    ids, mask = ids_and_mask(pad=pad)
    exact = logits(model, ids, mask)
    call = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    sites = mr.find_attention(model, (), call)
    assert [s.softcap for s in sites] == [1.0, 1.0] and all(s.rewritable for s in sites)
    graph = mr.rewrite(model, (), call, config=CONFIG)
    with torch.no_grad():
        want = graph(**call).logits
    got = logits(mr.use_mta(model, config=CONFIG), ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    assert (got[real] - exact[real]).abs().max() > 1e-3
    one_chunk = logits(mr.use_mta(model, config=mr.MTAConfig(chunk_size=1 << 20)), ids, mask)
    torch.testing.assert_close(one_chunk[real], exact[real], rtol=1e-5, atol=1e-5)
    mr.use_mta(model, config=CONFIG)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    torch.testing.assert_close(out.scores[0], want[:, -1], rtol=1e-5, atol=1e-5)
    model.set_attn_implementation("eager")
    torch.testing.assert_close(logits(model, ids, mask), exact)


def test_decoding_a_soft_capping_model_caps_its_steps():
    """Gemma-2 under use_mta(decode=True): its full-attention layer's steps soft-cap their logits as
    the prompt's op does (they stayed exact until 2026-12-06), so every step scores as the op over
    the whole sequence so far, with padding; the sliding layer decodes exactly, no sums kept."""
    model = gemma2()
    ids, mask = ids_and_mask(n=30, pad=5)
    scores, whole, out = generated_and_whole(model, ids, mask, config=DECODING, decode=True)
    exact, _, _ = generated_and_whole(model, ids, mask, config=DECODING)
    torch.testing.assert_close(scores, whole, rtol=1e-5, atol=1e-5)
    assert (exact[:, 1:] - whole[:, 1:]).abs().max() > 1e-2
    assert [sorted(vars(layer).get("_mta_chunk_sums", {})) for layer in out.past_key_values.layers] == [[], [(0, 0, 2)]]
    assert mr.interface.decoding_layers(out) == (1, 2)  # (what generate --decode prints)


@pytest.mark.parametrize("pad", [0, 5])
def test_decoding_with_sink_logits_gives_the_one_prompt_logits(pad):
    """GPT-OSS under use_mta(decode=True) with a plan on its full-attention layer: its steps take
    the learned sink logits (s_aux) as the prompt's op does, one more token before the sequence
    (they stayed exact until 2026-12-06), so every step scores as the op over the whole sequence
    so far; sink logits far from 0 (the initialisation's are ~0.02) so that they matter."""
    model = gpt_oss()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.tensor([2.0, -1.0, 0.5, 3.0]))
    ids, mask = ids_and_mask(n=12, pad=pad)  # (steps from token 12: the first summary at 15, with the sink token's)
    plan = mr.Plan({"model.layers.1.self_attn": DECODING})
    scores, whole, out = generated_and_whole(model, ids, mask, plan=plan, decode=True)
    exact, _, _ = generated_and_whole(model, ids, mask, plan=plan)
    torch.testing.assert_close(scores, whole, rtol=1e-5, atol=1e-5)
    assert (exact[:, 1:] - whole[:, 1:]).abs().max() > 5e-4
    assert [sorted(vars(layer).get("_mta_chunk_sums", {})) for layer in out.past_key_values.layers] == [[], [(0, 0, 2)]]


def test_decoding_with_boundary_chunks_and_sink_logits_gives_the_one_prompt_logits():
    """GPT-OSS with boundary chunks (a plan on its full-attention layer) and left padding:
    teacher-forced steps with separators among the new tokens take the sink logits as the prompt's
    op does, one more token first with the first token's segment and one more sink (exact until
    2026-12-06), so each scores as the op over the whole sequence so far."""
    model = gpt_oss()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.tensor([2.0, -1.0, 0.5, 3.0]))
    ids, mask = ids_and_mask(n=50, pad=5)
    plan = mr.Plan({"model.layers.1.self_attn": DECODING}, boundaries=separators(ids))
    whole, steps, exact, cache = teacher_forced(model, plan, ids, mask)
    torch.testing.assert_close(steps, whole, rtol=1e-5, atol=1e-5)
    assert (exact - whole).abs().max() > 1e-4
    sums = vars(cache.layers[1])["_mta_chunk_sums"][0, 0, 2]
    assert sums.shift == 1 and not torch.equal(sums.done[0], sums.done[1])


def test_rewrite_after_use_mta_says_so():
    """A model under use_mta captures with op calls in place of attention: ``rewrite`` says that
    use_mta did it and how to undo it (it said "already rewritten", which the user had not done)."""
    model = mr.use_mta(llama(layers=1), config=CONFIG)
    ids, mask = ids_and_mask()
    with pytest.raises(ValueError) as info:
        mr.rewrite(model, (), dict(input_ids=ids, attention_mask=mask, use_cache=False), config=CONFIG)
    assert str(info.value) == ('the model runs MTA through use_mta: 1 site(s) call mta.attention and no attention is '
                               'left to rewrite (model.set_attn_implementation("sdpa") or "eager" undoes use_mta)')


def test_what_use_mta_cannot_take_is_one_line():
    model = llama()
    cases = [
        (dict(model=torch.nn.Linear(2, 2), config=CONFIG), "use_mta takes a transformers model (PreTrainedModel); "
                                                           "Linear is not one: use rewrite() for it"),
        (dict(model=model), "give use_mta one of config= (every attention layer) or plan= (the layers it names)"),
        (dict(model=model, plan=mr.Plan({"model.layers.7.self_attn": CONFIG, "model.layers.12.self_attn": "exact"})),
         "the plan names 2 module(s) this LlamaForCausalLM lacks (model.layers.7.self_attn, model.layers.12.self_attn): "
         "a plan for another model?"),
        (dict(model=model, config=mr.HeadGroups(((CONFIG, (0,)),))),
         "config must be an MTAConfig, got HeadGroups (per-layer choices go in a Plan)"),
        (dict(model=model, plan={"model.layers.0.self_attn": CONFIG}), "plan must be a Plan, got dict"),
        (dict(model=model, config=CONFIG, decode="yes"), "decode must be True or False, got 'yes'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as info:
            mr.use_mta(**kwargs)
        assert str(info.value) == message
    assert model.config._attn_implementation == "sdpa"  # nothing was changed
    model.set_attn_implementation("flex_attention")
    with pytest.raises(ValueError, match='^LlamaForCausalLM runs flex_attention attention: load it with '
                                         'attn_implementation="sdpa" or "eager" for use_mta'):
        mr.use_mta(model, config=CONFIG)


def llama_eager():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, num_hidden_layers=2, max_position_embeddings=512,
                                   attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg).eval()


def gpt_oss():
    """GPT-OSS (eager attention only in transformers; learned sink logits, a sliding window on its
    second layer)."""
    torch.manual_seed(0)
    return transformers.GptOssForCausalLM(transformers.GptOssConfig(
        vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64,
        num_hidden_layers=2, num_local_experts=2, num_experts_per_tok=1, sliding_window=24,
        max_position_embeddings=512)).eval()


@pytest.mark.parametrize("build", [gpt_oss, llama_eager],
                         ids=["gpt-oss", "llama-eager"])
def test_a_model_with_eager_attention_prefills_with_mta_and_decodes_with_its_own(build):
    """A model loaded with eager attention (GPT-OSS has no other in transformers) keeps it for
    its exact calls, with eager's float masks: its prompt equals the rewritten graph (GPT-OSS's
    sink logits as one more exact token, as the rewrite gives them) and the step after the prefill
    is its own eager attention over the cache."""
    model = build()
    ids, mask = ids_and_mask(pad=5)
    with torch.no_grad():
        graph = mr.rewrite(model, (), dict(input_ids=ids, attention_mask=mask, use_cache=False), config=CONFIG)
        want = graph(input_ids=ids, attention_mask=mask, use_cache=False).logits
        exact = logits(model, ids, mask)
        mr.use_mta(model, config=CONFIG)
        assert model.config._attn_implementation == "mta_eager"
        got = logits(model, ids, mask)
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
        assert (got[real] - exact[real]).abs().max() > 1e-4  # (GPT-OSS's logits here are ~0.2)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        torch.testing.assert_close(out.scores[0], want[:, -1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.scores[1], step_after_the_prefill(model, ids, mask, out.sequences, "eager"),
                                   rtol=1e-5, atol=1e-5)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_use_mta_on_the_gpu():
    """On CUDA the prompt runs the Triton kernels (through the op): the same logits as on the CPU,
    and generate runs; a prompt continued over the cache (the kernel's grid from the first new
    query block on) gives the CPU's logits."""
    model = llama()
    ids, mask = ids_and_mask(pad=5)
    want = logits(mr.use_mta(model, config=CONFIG), ids, mask)
    ids2, mask2 = ids_and_mask(n=160, pad=5)
    want2, _ = continued(model, ids2, mask2, 44)
    model.cuda()
    got = logits(model, ids.cuda(), mask.cuda()).cpu()
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        out = model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=4, do_sample=False)
    assert out.shape == (2, ids.shape[1] + 4)
    got2, _ = continued(model, ids2.cuda(), mask2.cuda(), 44)
    torch.testing.assert_close(got2.cpu(), want2, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["bart (sdpa)", "t5 (eager)"])
def test_cross_attention_stays_exact(name):
    """An encoder-decoder's decoder inputs as long as its encoder's: every attention call has q
    and k of one length, yet the decoder's cross-attention (the same module class as its
    self-attention, told by ``key_value_states`` at the call) is not self-attention. It took the
    op under ``config=`` (here BART 1.8e-4 off the rewritten graph, T5 0.51); it stays exact, and
    the model gives the rewritten graph's values."""
    from mta_rewrite import zoo

    case = next(c for c in zoo.survey_cases() if c.name == name)
    torch.manual_seed(0)
    model = case.build()
    args, kwargs = case.inputs(case.lengths[0])
    assert kwargs["decoder_input_ids"].shape == kwargs["input_ids"].shape
    config = mr.MTAConfig(chunk_size=4)  # (short sequences: small chunks, no window beyond their own)
    with torch.no_grad():
        exact = model(*args, **kwargs).last_hidden_state
        want = mr.rewrite(model, args, kwargs, config=config)(*args, **kwargs).last_hidden_state
        got = mr.use_mta(model, config=config)(*args, **kwargs).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    if name.startswith("bart"):  # (T5's self-attention is exact anyway: its position bias varies in every block)
        assert (got - exact).abs().max() > 1e-4


def deepseek_v32(attn: str):
    """A small DeepSeek-V3.2: its lightning indexer keeps 8 keys per query (of 40 tokens here)."""
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(
        "deepseek_v32", num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=128, max_position_embeddings=512, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
        q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, qk_head_dim=16,
        head_dim=8, index_topk=8, index_head_dim=16, index_n_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        mlp_layer_types=["dense", "sparse"], layer_types=["indexed_attention"] * 2)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def inkling2():
    """A small Inkling-2 (eager: its only attention): learned sink logits per query row (``sinks``) and
    a relative position bias handed to the attention function, and attention over depth."""
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(
        "inkling2_text", num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16, vocab_size=128,
        unpadded_vocab_size=128, max_position_embeddings=512, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        layer_types=["hybrid_sliding", "hybrid"])
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


@pytest.mark.parametrize("build", ["deepseek_v32_sdpa", "deepseek_v32_eager", "inkling2"])
def test_what_layers_hand_their_attention_function_besides_q_k_v_is_not_dropped(build):
    """transformers' sparse-attention models (DeepSeek-V3.2 and the models sharing its code: GLM-5,
    Mistral-Large-4, HY-V4, …) fold their indexer's token selection into the mask only under eager
    and SDPA; under use_mta's implementation they pass it as ``indices`` and the mask without it,
    and use_mta ran them as dense attention: with one chunk (exact) 0.30 from the model's own
    logits. Inkling-2 hands its learned sink logits per query row as ``sinks``, which use_mta
    dropped. Now one chunk reproduces the model, and an MTA configuration computes what the
    rewritten graph (which captures the model's own eager or SDPA code) computes."""
    model = deepseek_v32(build.rsplit("_", 1)[1]) if build.startswith("deepseek") else inkling2()
    ids, mask = ids_and_mask(n=40, pad=7)
    keep = mask.bool()
    want, rewritten = logits(model, ids, mask), graph_logits(model, ids, mask, config=CONFIG)
    mr.use_mta(model, config=mr.MTAConfig(chunk_size=10**6))
    torch.testing.assert_close(logits(model, ids, mask)[keep], want[keep], rtol=1e-5, atol=1e-5)
    mr.use_mta(model, config=CONFIG)
    torch.testing.assert_close(logits(model, ids, mask)[keep], rewritten[keep], rtol=1e-5, atol=1e-5)


def test_token_selection_from_input_ids_alone():
    """DeepSeek-V3.2 called with input ids alone, one sequence (transformers builds the causal
    mask the indexer's selection is folded into): one chunk reproduces the model, MTA computes
    what the rewritten graph computes."""
    model = deepseek_v32("sdpa")
    ids, _ = ids_and_mask(batch=1, n=40)
    call = dict(input_ids=ids, use_cache=False)
    with torch.no_grad():
        want = model(**call).logits
        rewritten = mr.rewrite(model, (), call, config=CONFIG)(**call).logits
    mr.use_mta(model, config=mr.MTAConfig(chunk_size=10**6))
    with torch.no_grad():
        torch.testing.assert_close(model(**call).logits, want, rtol=1e-5, atol=1e-5)
    mr.use_mta(model, config=CONFIG)
    with torch.no_grad():
        torch.testing.assert_close(model(**call).logits, rewritten, rtol=1e-5, atol=1e-5)


def test_a_tensor_use_mta_would_not_read_is_a_one_line_error():
    """A tensor a layer hands its attention function that MTA does not read (MiniMax-M3's
    ``block_indices``, its block-sparse selection, which transformers folds into the mask only
    under eager and SDPA) would be dropped, the outputs wrong: a one-line error instead."""
    from mta_rewrite.interface import mta_attention_forward

    layer = torch.nn.Module()
    vars(layer)["_mta_config"] = CONFIG
    q = k = v = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match=r"^use_mta cannot run Module: it hands its attention function block_indices, "
                                         r"which MTA does not read \(its outputs would be wrong\); use rewrite\(\) for "
                                         r"this model$"):
        mta_attention_forward(layer, q, k, v, None, scaling=0.35, block_indices=torch.zeros(1, 16, 2, dtype=torch.long))


def test_a_composite_model_whose_attention_lives_in_another_modeling_module():
    """Fuyu loaded with eager attention: its language model is Persimmon's, whose modeling module
    holds the eager attention; use_mta looked for it in Fuyu's own module only and refused ("has no
    eager_attention_forward"). It runs, and computes what the rewritten graph computes."""
    torch.manual_seed(0)
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=512, pad_token_id=0)
    cfg = transformers.AutoConfig.for_model("fuyu", **text, bos_token_id=1, eos_token_id=2,
                                            text_config=dict(model_type="persimmon", **text))
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    ids, mask = ids_and_mask(n=40, pad=7)
    keep = mask.bool()
    exact, want = logits(model, ids, mask), graph_logits(model, ids, mask, config=CONFIG)
    mr.use_mta(model, config=CONFIG)
    got = logits(model, ids, mask)
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
    assert (got[keep] - exact[keep]).abs().max() > 1e-3  # MTA, not exact


def git():
    torch.manual_seed(0)
    cfg = transformers.GitConfig(vocab_size=128, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                                 num_hidden_layers=2, max_position_embeddings=512,
                                 vision_config=dict(hidden_size=32, num_attention_heads=2, intermediate_size=32,
                                                    num_hidden_layers=1, image_size=32, patch_size=16))
    return transformers.GitForCausalLM._from_config(cfg, attn_implementation="eager").eval()


def test_attention_use_mta_cannot_reach_is_named():
    """GIT's text decoder computes its attention in its own code (only its vision tower calls
    transformers' attention interface): use_mta accepted it and ran nothing through MTA, silently.
    Its text layers are named in a one-line warning, and they are indeed the model's own (the
    logits do not move); a model whose attention all goes through the interface gets no warning."""
    model = git()
    ids, mask = ids_and_mask(n=40, pad=7)
    keep = mask.bool()
    exact = logits(model, ids, mask)
    with pytest.warns(UserWarning, match=r"^2 attention module\(s\) of GitForCausalLM compute their attention in "
                                         r"their own code, not through transformers' attention interface "
                                         r"\(git\.encoder\.layer\.0\.attention\.self, "
                                         r"git\.encoder\.layer\.1\.attention\.self\): use_mta leaves them as they "
                                         r"are, exact \(rewrite\(\) captures"):
        mr.use_mta(model, config=CONFIG)
    torch.testing.assert_close(logits(model, ids, mask)[keep], exact[keep], rtol=0, atol=0)

    model = llama()
    exact = logits(model, ids, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mr.use_mta(model, config=CONFIG)
    assert (logits(model, ids, mask)[keep] - exact[keep]).abs().max() > 1e-3


def test_the_trainers_token_count_passes_through_use_mta(tmp_path):
    """transformers' Trainer calls the model with ``num_items_in_batch`` (a tensor, the loss's token
    count across gradient-accumulation steps), which reaches every attention function in its
    keyword arguments and which eager and SDPA attention do not read. use_mta took it for a tensor
    it would drop ("use_mta cannot run LlamaAttention: it hands its attention function
    num_items_in_batch"), so Trainer stopped at its first step, until 2026-12-07. Now the loss is the
    one without it, and a Trainer's first logged loss is its first batch's."""
    model = mr.use_mta(llama(), config=CONFIG)
    ids, _ = ids_and_mask(batch=2, n=40)
    want = model(input_ids=ids, labels=ids, use_cache=False).loss
    count = torch.tensor((ids.shape[1] - 1) * ids.shape[0])
    torch.testing.assert_close(model(input_ids=ids, labels=ids, use_cache=False, num_items_in_batch=count).loss, want)

    class Same(torch.utils.data.Dataset):  # (every item the same sequence: the first batch known)
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return dict(input_ids=ids[0], labels=ids[0])

    model.train()
    single = model(input_ids=ids[:1].expand(2, -1), labels=ids[:1].expand(2, -1), use_cache=False).loss
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2,
                                          logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                                          disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Same())
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and abs(logged[0] - float(single)) < 1e-3
    assert model.config._attn_implementation == "mta"


def test_attention_weights_under_use_mta_are_the_weights_mta_puts_on_each_token():
    """``output_attentions=True`` of an eager model under use_mta: each MTA layer gives the weights
    it puts on each token (``ops.weights``: a key's own probability plus its share of the summaries
    holding it), [B, H, n, n], which give the layer's output as W @ v (checked against the values
    and the output of the layer's own projections), sum to 1 on every real query, are 0 above the
    diagonal, and with one chunk are eager attention's own weights. Until 2026-12-07 the MTA layers
    gave none, and ``attentions`` came back empty, silently. A decoding step through MTA
    (``decode=True``) gives none, and a warning says so."""
    model = llama_eager()
    ids, mask = ids_and_mask(pad=9)
    rows = mask.bool()[:, None, :, None].expand(-1, 4, -1, ids.shape[1])
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask, use_cache=False, output_attentions=True).attentions
        mr.use_mta(model, config=mr.MTAConfig(chunk_size=1024))
        one = model(input_ids=ids, attention_mask=mask, use_cache=False, output_attentions=True).attentions
        for got, want in zip(one, eager, strict=True):
            torch.testing.assert_close(got[rows], want[rows], rtol=1e-6, atol=1e-6)
        mr.use_mta(model, config=CONFIG)
        seen = {}
        layer = model.model.layers[1].self_attn
        hooks = [layer.v_proj.register_forward_hook(lambda mod, args, out: seen.update(v=out)),
                 layer.o_proj.register_forward_pre_hook(lambda mod, args: seen.update(out=args[0]))]
        weights = model(input_ids=ids, attention_mask=mask, use_cache=False, output_attentions=True).attentions
        for hook in hooks:
            hook.remove()
    assert len(weights) == 2 and weights[1].shape == (2, 4, 70, 70)
    B, n = ids.shape
    v = seen["v"].view(B, n, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
    real = mask.bool()
    torch.testing.assert_close((weights[1] @ v).transpose(1, 2).reshape(B, n, 64)[real], seen["out"][real],
                               rtol=1e-5, atol=1e-6)
    for got, want in zip(weights, eager):
        torch.testing.assert_close(got.sum(-1)[rows[..., 0]], torch.ones(rows[..., 0].sum().item()))
        assert not got.triu(1).any() and (got - want)[rows].abs().max() > 1e-3  # (MTA's, not eager's)
    decoding = mr.use_mta(llama_eager(), config=DECODING, decode=True)
    with pytest.warns(UserWarning, match=r"^use_mta: a decoding step through MTA \(decode=True\) gives no attention "
                                         r"weights"):
        decoding.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, output_attentions=True,
                          return_dict_in_generate=True)


def test_attention_dropout_in_training_mode_is_a_clear_error():
    """A model in training mode whose attention drops out: MTA has no attention dropout, a
    one-line error at the layer's call that says what to do; in eval() the same model runs the op.
    Training mode itself is no error: use_mta takes a model in it, whose layers without attention
    dropout (Llama's default) then compute what they do in eval() (until 2026-12-07 use_mta refused
    any model in training mode, as PEFT's wrappers are)."""
    ids, mask = ids_and_mask()
    want = graph_logits(llama(), ids, mask, config=CONFIG)
    torch.testing.assert_close(logits(mr.use_mta(llama().train(), config=CONFIG), ids, mask), want,
                               rtol=1e-5, atol=1e-5)
    model = llama()
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    mr.use_mta(model.train(), config=CONFIG)
    with pytest.raises(ValueError, match=r"^MTA has no attention dropout, and LlamaAttention has 0.1 in training "
                                         r"mode: put the model in eval\(\), or set its attention dropout to 0 to "
                                         r"train it with MTA$"):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    model.eval()
    torch.testing.assert_close(logits(model, ids, mask), want, rtol=1e-5, atol=1e-5)


def test_a_key_padding_mask_of_minus_ten_thousand_is_key_padding_as_in_the_rewrite():
    """MarkupLM hands its attention function old BERT code's mask, (1 − mask)·−10000 per key: the op
    reads those keys as forbidden under use_mta as in the rewritten graph (passes.lower.combine_masks),
    so the two agree exactly with top-k; before, use_mta gave the op −10000 as a bias (2e-4 apart)."""
    config = transformers.MarkupLMConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.MarkupLMModel(config).eval()
    ids = torch.randint(5, 100, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, 29:] = 0  # padding from partway through a chunk
    mta = mr.MTAConfig(chunk_size=6, local_chunks=1, sinks=2, top_k=1)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        want = mr.rewrite(model, (ids,), dict(attention_mask=mask), config=mta)(ids, attention_mask=mask)
        mr.use_mta(model, config=mta)
        got = model(ids, attention_mask=mask)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0, atol=1e-6)


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """Every attention call of a model as the float64 reference of ``MTAConfig(8, 1, 2, 1)`` under
    the mask transformers built for it (an attention function of transformers' interface: it reads
    the mask as given, not as use_mta reads it)."""
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    causal = causal and attention_mask is None and query.shape[2] > 1
    mask = None if attention_mask is None else attention_mask[..., :key.shape[2]]
    out = mr.mta_attention_reference(query, key, value, mask, chunk_size=8, causal=causal, scale=scaling,
                                     local_chunks=1, sinks=2, top_k=1)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def test_a_vision_language_model_with_images_runs_mta_under_the_masks_it_builds():
    """Gemma-3 called with two images per sequence: its language model attends bidirectionally
    within each image's tokens and causally elsewhere, its vision tower over each image's patches.
    ``use_mta`` equals the same model with every attention call the float64 reference under the
    mask transformers built (an attention function of its own: an independent reading of the mask)
    and the graph ``rewrite`` makes with the images, and with one chunk the model itself (the tenth
    search, 2026-12-07: ten vision-language families so, by script)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register("mta_test_reference", _reference_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("mta_test_reference", eager_mask)
    text = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, layer_types=["full_attention"] * 2, max_position_embeddings=256)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(0)
    image = torch.full((2, 4), cfg.image_token_id)
    ids = torch.cat([torch.randint(4, 96, (2, 5), generator=g), image, torch.randint(4, 96, (2, 6), generator=g), image,
                     torch.randint(4, 96, (2, 24), generator=g)], 1)
    inputs = dict(input_ids=ids, pixel_values=torch.randn(4, 3, 32, 32, generator=g), attention_mask=torch.ones_like(ids),
                  token_type_ids=(ids == cfg.image_token_id).long(), use_cache=False)
    config = mr.MTAConfig(8, 1, 2, 1)
    with torch.no_grad():
        original = model(**inputs).logits
        reference = copy_module.deepcopy(model)
        reference.set_attn_implementation("mta_test_reference")
        want = reference(**inputs).logits
        got = mr.use_mta(copy_module.deepcopy(model), config=config)(**inputs).logits
        exact = mr.use_mta(copy_module.deepcopy(model), config=mr.MTAConfig(10**6))(**inputs).logits
        rewritten = mr.rewrite(copy_module.deepcopy(model), (), inputs, config=config)(**inputs).logits
    assert (want - original).abs().max() > 1e-3  # (MTA changes this model's outputs: the check can see a difference)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rewritten, got, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(exact, original, rtol=1e-5, atol=1e-5)
    # boundary chunks: the language model's layers chunk by the segments of the token ids, the vision
    # tower's (over patches) by chunk_size alone, in use_mta as in rewrite (until 2026-12-07 both
    # refused: "the model's input_ids has [2, 39] tokens but SiglipAttention attends over 16")
    boundaries = mr.Boundaries(tuple(range(10, 30)))
    with torch.no_grad():
        got = mr.use_mta(copy_module.deepcopy(model), config=config, boundaries=boundaries)(**inputs).logits
        with pytest.warns(UserWarning, match=r"boundaries: 2 attention site\(s\) attend over another sequence"):
            rewritten = mr.rewrite(copy_module.deepcopy(model), (), inputs, config=config, boundaries=boundaries)
        torch.testing.assert_close(rewritten(**inputs).logits, got, rtol=1e-6, atol=1e-6)
    assert (got - want).abs().max() > 1e-3  # (the segments changed the language model's chunks)


@pytest.mark.parametrize("decoder_tokens", [30, 45])
def test_boundary_chunks_of_an_encoder_decoder_are_its_encoders(decoder_tokens):
    """Boundaries read the encoder's ``input_ids``: T5's encoder chunks by their segments, its
    decoder (over its own ids) by chunk_size alone, in use_mta as in rewrite. Until 2026-12-07
    use_mta refused decoder ids of another length and, of the same length (45), chunked the decoder
    by the encoder's segments: 0.13 from the rewrite."""
    cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(0)
    ids, decoder_ids = torch.randint(4, 100, (2, 45), generator=g), torch.randint(4, 100, (2, decoder_tokens), generator=g)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=decoder_ids, use_cache=False)
    config, boundaries = mr.MTAConfig(8, 1, 2, 1), mr.Boundaries(tuple(range(10, 30)))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the decoder's sites, named: another sequence than input_ids)
        got = mr.use_mta(copy_module.deepcopy(model), config=config, boundaries=boundaries)(**inputs).logits
        want = mr.rewrite(copy_module.deepcopy(model), (), inputs, config=config, boundaries=boundaries)(**inputs).logits
        plain = mr.use_mta(copy_module.deepcopy(model), config=config)(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert (got - plain).abs().max() > 1e-3  # (the encoder's segments matter)


def test_boundary_chunks_read_from_the_decoders_ids_leave_the_encoder_apart():
    """Boundaries read from ``decoder_input_ids`` (Whisper: its encoder attends over audio frames):
    the decoder chunks by their segments, the encoder by chunk_size alone, in use_mta as in
    rewrite. The encoder's 40 frames are as many as the decoder's ids here: until 2026-12-07
    use_mta gave the encoder the decoder's segments (4.1e-6 from the rewrite)."""
    cfg = transformers.WhisperConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=40,
                                     max_target_positions=64, pad_token_id=0, decoder_start_token_id=1, eos_token_id=2,
                                     bos_token_id=1)
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(0)
    inputs = dict(input_features=torch.randn(2, 16, 80, generator=g),
                  decoder_input_ids=torch.randint(4, 100, (2, 40), generator=g), use_cache=False)
    config, boundaries = mr.MTAConfig(8, 1, 2, 1), mr.Boundaries(tuple(range(10, 30)), input="decoder_input_ids")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the encoder's sites, named: another sequence)
        got = mr.use_mta(copy_module.deepcopy(model), config=config, boundaries=boundaries)(**inputs).logits
        want = mr.rewrite(copy_module.deepcopy(model), (), inputs, config=config, boundaries=boundaries)(**inputs).logits
        plain = mr.use_mta(copy_module.deepcopy(model), config=config)(**inputs).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - plain).abs().max() > 1e-4  # (the decoder's segments matter)
