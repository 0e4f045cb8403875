"""Rewritten models on a CUDA GPU give what the same rewritten models give on the CPU.

The CPU runs the portable implementation, the GPU the fused Triton forward (key padding and no
mask) or the portable implementation (other masks): fp32 models, so both compute in full
precision and must agree to rounding. Skips without CUDA.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import mta_rewrite as mr
from mta_rewrite import zoo
from mta_rewrite.demo import to_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
logging.getLogger("torch._export").setLevel(logging.ERROR)

CONFIG = mr.MTAConfig(chunk_size=16, local_chunks=2, sinks=2, top_k=1)


def _rewritten_outputs(model, args, kwargs, device):
    model = copy.deepcopy(model).to(device)
    args, kwargs = to_device(args, device), to_device(kwargs, device)
    gm = mr.rewrite(model, args, kwargs, config=CONFIG)
    assert mr.count_mta_nodes(gm) >= 1
    with torch.no_grad():
        out = gm(*args, **kwargs)
    return (out if isinstance(out, torch.Tensor) else out[0]).float().cpu()


@pytest.mark.parametrize("name", ["baddbmm_key_padding", "scores_div_masked_fill", "sdpa_causal_gqa", "sdpa_fused_qkv_contiguous_view",
                                  "two_layers", "baddbmm_alibi_viewed_4d"])
def test_hand_written_forms_cpu_vs_gpu(name):
    case = next(c for c in zoo.hand_written_cases() if c.name == name)
    model = case.build()
    args, kwargs = case.inputs(150)
    cpu = _rewritten_outputs(model, args, kwargs, "cpu")
    gpu = _rewritten_outputs(model, args, kwargs, "cuda")
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["bloom (eager)", "gemma3 (sdpa)"])
def test_models_with_bias_or_band_masks_cpu_vs_gpu(name):
    """Bloom's ALiBi (a bias: every block attended exactly) and Gemma-3's sliding-window band (a
    mask that varies per query): on CUDA the portable implementation, giving what the CPU gives."""
    pytest.importorskip("transformers")
    case = next(c for c in zoo.all_cases() if c.name == name)
    model = case.build()
    args, kwargs = case.inputs(150)
    cpu = _rewritten_outputs(model, args, kwargs, "cpu")
    gpu = _rewritten_outputs(model, args, kwargs, "cuda")
    keep = kwargs["attention_mask"].bool()  # (padded query rows are zeros in MTA, not compared)
    torch.testing.assert_close(gpu[keep], cpu[keep], rtol=1e-4, atol=1e-4)


def test_tiny_causal_lm_cpu_vs_gpu():
    model = zoo.TinyCausalLM().eval()
    ids = zoo.byte_tokens(zoo.real_text(), 700, batch=2)
    cpu = _rewritten_outputs(model, (ids,), {}, "cpu")
    gpu = _rewritten_outputs(model, (ids,), {}, "cuda")
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["llama (sdpa)", "bert (eager)", "nn.MultiheadAttention", "falcon (sdpa)", "falcon (eager)"])
def test_transformers_models_take_the_kernels_on_the_gpu(name, monkeypatch):
    """transformers models (and nn.MultiheadAttention) hand attention a [B, 1, n, n] (or per-head)
    mask that is key padding ∧ the causal triangle by value: on CUDA the op recognises it and runs
    the fused Triton forward (it took the portable implementation before), giving what the CPU
    gives."""
    if "(" in name:
        pytest.importorskip("transformers")
    from mta_rewrite.kernels import mta_fwd

    case = next(c for c in zoo.all_cases() if c.name == name)
    model = case.build()
    args, kwargs = case.inputs(150)
    cpu = _rewritten_outputs(model, args, kwargs, "cpu")
    launches = []
    launch = mta_fwd.mta_forward_triton
    monkeypatch.setattr(mta_fwd, "mta_forward_triton", lambda *a, **kw: launches.append(kw["causal"]) or launch(*a, **kw))
    gpu = _rewritten_outputs(model, args, kwargs, "cuda")
    assert len(launches) == case.rewritable  # every attention layer ran on the kernel
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)


def test_clustered_plan_takes_the_kernels_on_the_gpu(monkeypatch):
    """A BERT rewritten with clustered summaries at every site (its padding mask, recognised as
    key padding): on CUDA each site runs the clustered Triton path, giving what the CPU gives."""
    pytest.importorskip("transformers")
    from mta_rewrite.kernels import mta_fwd

    case = next(c for c in zoo.all_cases() if c.name == "bert (eager)")
    model = case.build()
    args, kwargs = case.inputs(150)
    g = torch.Generator().manual_seed(0)
    plan = mr.Plan({site.name: mr.Clustered.from_tensor(mr.MTAConfig(16, local_chunks=2, sinks=2),
                                                        torch.randn(site.kv_heads, 12, site.head_dim, generator=g))
                    for site in mr.find_attention(model, args, kwargs) if site.rewritable})

    def outputs(device):
        moved = copy.deepcopy(model).to(device)
        a, kw = to_device(args, device), to_device(kwargs, device)
        gm = mr.rewrite(moved, a, kw, plan=plan)
        with torch.no_grad():
            return gm(*a, **kw)[0].float().cpu()

    cpu = outputs("cpu")
    launches = []
    launch = mta_fwd.mta_forward_triton
    monkeypatch.setattr(mta_fwd, "mta_forward_triton",
                        lambda *a, **kw: launches.append(kw.get("centroids") is not None) or launch(*a, **kw))
    gpu = outputs("cuda")
    assert launches == [True] * len(plan.sites)
    keep = kwargs["attention_mask"].bool()  # (padded query rows are not compared)
    torch.testing.assert_close(gpu[keep], cpu[keep], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["scores_div_masked_fill", "einsum_gqa_repeat_interleave", "bmm_3d_where"])
def test_exact_sites_on_the_gpu_equal_the_original(name):
    """Every site left exact (``Plan({})``) runs the op's exact path on CUDA (SDPA after the mask is
    recognised) and gives the original model's output."""
    case = next(c for c in zoo.hand_written_cases() if c.name == name)
    model = case.build().to("cuda")
    args, kwargs = to_device(case.inputs(150), "cuda")
    gm = mr.rewrite(model, args, kwargs, plan=mr.Plan({}))
    assert mr.api.count_exact_nodes(gm) == case.rewritable
    with torch.no_grad():
        torch.testing.assert_close(gm(*args, **kwargs), model(*args, **kwargs), rtol=1e-4, atol=1e-4)


def test_calibrate_on_the_gpu_measures_costs_by_default():
    """No cost constants exist for GPUs: calibrating a CUDA model times its candidates there."""
    model = zoo.TinyCausalLM(d=64, heads=4, layers=2).eval().to("cuda")
    text = zoo.real_text()
    data = [(zoo.byte_tokens(text[i * 2000:], 512).to("cuda"),) for i in range(3)]
    plan = mr.calibrate(model, data, budget=1.0, metric="kl", progress=False,
                        candidates=[mr.MTAConfig(64, 1, 0, 0), mr.MTAConfig(32, 2, 4, 1)])
    assert plan.metadata["costs"].startswith("measured on ") and torch.cuda.get_device_name() in plan.metadata["costs"]
    fast = mr.rewrite(model, data[0], plan=plan)
    with torch.no_grad():
        assert torch.isfinite(fast(*data[0])).all()


@pytest.mark.parametrize("name", ["llama (sdpa)", "bert (eager)", "baddbmm_key_padding"])
def test_a_module_rewritten_on_the_cpu_and_moved_runs_as_one_rewritten_on_the_gpu(name):
    """``rewrite`` on the CPU, then ``.to("cuda")`` (mta_rewrite/rewritten.py): the devices its graph
    names move with the tensors, and the moved module gives what the module rewritten on the GPU
    gives (torch's unlifted module failed at its first call: "Tensor device mismatch")."""
    if "(" in name:
        pytest.importorskip("transformers")
    case = next(c for c in zoo.all_cases() if c.name == name)
    model = case.build()
    args, kwargs = case.inputs(150)
    moved = copy.deepcopy(mr.rewrite(model, args, kwargs, config=CONFIG)).to("cuda")
    with torch.no_grad():
        out = moved(*to_device(args, "cuda"), **to_device(kwargs, "cuda"))
    got = (out if isinstance(out, torch.Tensor) else out[0]).float().cpu()
    want = _rewritten_outputs(model, args, kwargs, "cuda")
    keep = kwargs["attention_mask"].bool() if "attention_mask" in kwargs else slice(None)
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-4)


def test_a_model_under_cuda_autocast_runs_the_kernels_in_its_dtype(monkeypatch):
    """Under torch.autocast("cuda", bfloat16) the op casts q, k, v to bfloat16 (Llama's q and k
    leave its float32 rotary embedding, v a bfloat16 linear: before 2026-12-07 "q, k, v must share
    one float dtype") and the Triton forward runs; ``use_mta`` gives what ``rewrite`` gives, and MTA
    in bfloat16 is about as far from MTA in float32 as exact attention is from exact."""
    from mta_rewrite.kernels import mta_fwd

    from ..test_use_mta import llama  # (skips without transformers)

    model = llama().cuda()
    ids = torch.randint(0, 128, (2, 150), generator=torch.Generator().manual_seed(1)).cuda()
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    call = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    real = mask.bool()
    launches = []
    launch = mta_fwd.mta_forward_triton
    monkeypatch.setattr(mta_fwd, "mta_forward_triton", lambda *a, **kw: launches.append(1) or launch(*a, **kw))
    with torch.no_grad():
        mta32 = mr.rewrite(copy.deepcopy(model), (), call, config=CONFIG)(**call).logits[real].float()
        exact32 = model(**call).logits[real].float()
        launches.clear()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            graph = mr.rewrite(copy.deepcopy(model), (), call, config=CONFIG)(**call).logits[real]
            assert launches, "the Triton forward did not run under autocast"
            got = mr.use_mta(copy.deepcopy(model), config=CONFIG)(**call).logits[real]
            exact = model(**call).logits[real]
    assert got.dtype == graph.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), graph.float(), rtol=2e-2, atol=2e-2)

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    assert rel(graph, mta32) < 2 * rel(exact, exact32) + 1e-3


def test_load_module_to_the_gpu_runs_as_a_module_rewritten_there(tmp_path):
    """A program saved on the CPU (``save_program`` of a rewritten module) and loaded with
    ``load_module(path, "cuda")``: the module binds its calls and gives what the module rewritten
    on the GPU gives."""
    from ..test_use_mta import llama  # (skips without transformers)

    model = llama()
    ids = torch.randint(0, 128, (2, 150), generator=torch.Generator().manual_seed(1))
    fast = mr.rewrite(model, (ids,), {"use_cache": False}, config=CONFIG)
    mr.save_program(fast, tmp_path / "fast.pt2", (ids,), {"use_cache": False})
    loaded = mr.load_module(tmp_path / "fast.pt2", "cuda")
    with torch.no_grad():
        got = loaded(ids.cuda()).logits.float().cpu()
    want = _rewritten_outputs(model, (ids,), {"use_cache": False}, "cuda")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert loaded.mta_plan == fast.mta_plan
