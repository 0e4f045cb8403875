"""The module ``rewrite`` returns, used as an nn.Module (mta_rewrite/rewritten.py): eval() and
train(), deep copies, device moves, dtype changes, gradients and fine-tuning.

As torch.export hands it over, the module refused eval(), lost its call binding in a deep copy
and failed at its first call after .to(device) or .to(dtype) (the devices and dtypes its graph
names stayed); these tests fail before ``rewritten.finish``. Gradients are checked against
finite differences in float64 and, with one chunk, against the model's own."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._pytree import tree_map_only

import mta_rewrite as mr
from mta_rewrite import zoo

transformers = pytest.importorskip("transformers")

from .test_use_mta import CONFIG, llama  # noqa: E402  (a two-layer Llama with SDPA attention, seeded)


def ids(n=40, batch=2):
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(1))


def first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def test_eval_is_what_it_is_and_train_says_why_not():
    model, x = llama(), ids()
    fast = mr.rewrite(model, (x,), {"use_cache": False}, config=CONFIG)
    want = fast(x).logits
    assert fast.training is False
    assert fast.eval() is fast and fast.train(False) is fast  # (torch's unlifted module: NotImplementedError)
    holder = torch.nn.ModuleDict({"fast": fast}).eval()  # (nn.Module.eval reaches it through its parent)
    assert holder["fast"] is fast
    with pytest.raises(RuntimeError, match=r"cannot switch to training mode.*fine-tune it without train\(\)"):
        fast.train()
    assert fast.training is False
    torch.testing.assert_close(fast(x).logits, want, rtol=0, atol=0)


def test_a_deep_copy_binds_its_calls_and_keeps_what_rewrite_set():
    model, x = llama(), ids()
    fast = mr.rewrite(model, (x,), {"use_cache": False}, config=CONFIG)
    twin = copy.deepcopy(copy.deepcopy(fast))
    # called as the model is, the flag left out (before: "forward() missing 1 required positional argument")
    torch.testing.assert_close(twin(x).logits, fast(x).logits, rtol=0, atol=0)
    torch.testing.assert_close(twin(input_ids=ids(23, 1)).logits, fast(ids(23, 1)).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="captured with use_cache=False"):
        twin(x, use_cache=True)
    assert [s.name for s in twin.mta_sites] == [s.name for s in fast.mta_sites]
    assert twin.mta_plan == fast.mta_plan and twin.mta_boundaries is None and twin.training is False
    assert mr.count_mta_nodes(twin) == 2
    with pytest.raises(RuntimeError, match="cannot switch to training mode"):
        twin.train()
    # the copy has parameters of its own; the rewritten module shares the model's
    assert all(a is not b for a, b in zip(twin.parameters(), model.parameters()))
    assert all(a is b for a, b in zip(fast.parameters(), model.parameters()))


def test_pickling_is_one_error_that_says_how_to_save_it(tmp_path):
    """torch.save of the module (torch.export's does not pickle: "Can't pickle local object
    '_create_stateful_graph_module.<locals>.<lambda>'") says how to save it; its state dict saves,
    and copies are unaffected."""
    import io
    import pickle

    model, x = llama(), ids()
    fast = mr.rewrite(model, (x,), {"use_cache": False}, config=CONFIG)
    message = r"^a rewritten module does not pickle .*mta_rewrite.save_program\(module, path, args, kwargs\) .*load_module"
    with pytest.raises(TypeError, match=message):
        torch.save(fast, io.BytesIO())
    with pytest.raises(TypeError, match=message):
        pickle.dumps(fast)
    torch.save(fast.state_dict(), tmp_path / "weights.pt")
    state = torch.load(tmp_path / "weights.pt")
    assert state.keys() == fast.state_dict().keys()
    torch.testing.assert_close(copy.deepcopy(fast)(x).logits, fast(x).logits, rtol=0, atol=0)
    with pytest.raises(TypeError, match=message):
        pickle.dumps(copy.copy(fast))


def test_a_shallow_copy_binds_its_calls_and_shares_the_parameters():
    """``copy.copy`` (torch's GraphModule.__copy__: the same graph and parameters, no hooks) lost
    the binding as a deep copy did ("forward() missing 1 required positional argument")."""
    model, x = llama(), ids()
    fast = mr.rewrite(model, (x,), {"use_cache": False}, config=CONFIG)
    twin = copy.copy(copy.copy(fast))
    torch.testing.assert_close(twin(x).logits, fast(x).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="captured with use_cache=False"):
        twin(x, use_cache=True)
    assert twin.mta_plan == fast.mta_plan and twin.training is False
    assert all(a is b for a, b in zip(twin.parameters(), model.parameters()))
    torch.testing.assert_close(copy.deepcopy(twin)(x).logits, fast(x).logits, rtol=0, atol=0)
    # (one class per GraphModule: another module's copies are torch's own)
    plain = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    assert type(copy.copy(plain)).__copy__ is torch.fx.GraphModule.__copy__


def test_a_saved_rewritten_module_loads_back_as_rewrite_returned_it(tmp_path):
    """``load_module`` of what ``save_program`` wrote: the module ``rewrite`` returned, in another
    process's terms (calls bound by name, eval mode, deep copies, its plan, boundaries and sites back).
    ``load_program(path).module()`` is torch's module, which takes only the captured call's
    structure; ``fast(ids)`` fails on it ("Ran into a kwarg keyword mismatch")."""
    model, x = llama(), ids()
    plan = mr.Plan({"model.layers.0.self_attn": CONFIG,
                    "model.layers.1.self_attn": mr.HeadGroups(((CONFIG, (0, 1)), (None, (2, 3))))})
    boundaries = mr.Boundaries((5, 9), input="input_ids")
    fast = mr.rewrite(model, (x,), {"use_cache": False}, plan=plan, boundaries=boundaries)
    mr.save_program(fast, tmp_path / "fast.pt2", (x,), {"use_cache": False})
    other = ids(57, 3)
    with torch.no_grad():
        want = fast(other).logits
        assert (want - model(other, use_cache=False).logits).abs().max() > 1e-4  # (MTA, not exact)
        with pytest.raises(ValueError, match="kwarg keyword mismatch"):
            mr.load_program(tmp_path / "fast.pt2").module()(other)  # torch's
        loaded = mr.load_module(tmp_path / "fast.pt2")
        for call in (lambda m: m(other), lambda m: m(input_ids=other), lambda m: m(other, use_cache=False)):
            torch.testing.assert_close(call(loaded).logits, want, rtol=0, atol=0)
        with pytest.raises(ValueError, match="captured with use_cache=False"):
            loaded(other, use_cache=True)
        assert loaded.training is False and loaded.eval() is loaded
        assert loaded.mta_plan == fast.mta_plan and loaded.mta_boundaries == boundaries
        assert loaded.mta_sites == fast.mta_sites and len(fast.mta_sites) == 2  # (the report, until 2026-12-07 lost)
        twin = copy.deepcopy(loaded)
        torch.testing.assert_close(twin(other).logits, want, rtol=0, atol=0)
        assert twin.mta_plan == fast.mta_plan
    # a program saved from a model that is not rewritten loads as a module too, without a plan
    mr.save_program(model, tmp_path / "model.pt2", (x,), {"use_cache": False})
    plain = mr.load_module(tmp_path / "model.pt2")
    with torch.no_grad():
        torch.testing.assert_close(plain(other).logits, model(other, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    assert not hasattr(plain, "mta_plan") and not hasattr(plain, "mta_sites")
    with pytest.raises(ValueError, match="no such file"):
        mr.load_module(tmp_path / "missing.pt2")


@pytest.mark.parametrize("name", ["llama (sdpa)", "bert (eager)", "gpt2 (eager)", "baddbmm_alibi_viewed_4d",
                                  "nn.MultiheadAttention"])
def test_moving_the_module_moves_the_devices_its_graph_names(name):
    """``.to(device)`` moves the devices its graph's ``arange`` / ``zeros`` / metadata checks name
    (before: "Tensor device mismatch" at the first call). Without a GPU the meta device stands in
    for it: the call runs every op's meta kernel, the op's included (tests/kernels/test_gpu_models.py
    compares a module moved to CUDA with one rewritten there)."""
    case = next(c for c in zoo.all_cases() if c.name == name)
    model = case.build()
    args, kwargs = case.inputs(40)
    fast = mr.rewrite(model, args, kwargs, config=CONFIG)
    want = first(fast(*args, **kwargs))
    moved = copy.deepcopy(fast).to("meta")
    assert all(p.device.type == "meta" for p in [*moved.parameters(), *moved.buffers()])
    named = {str(n.kwargs["device"]) for n in moved.graph.nodes if "device" in n.kwargs}
    assert named <= {"meta"}
    meta_args, meta_kwargs = tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
    out = first(moved(*meta_args, **meta_kwargs))
    assert out.device.type == "meta" and out.shape == want.shape
    # a move to where it is, and a cast to the dtype it has, change nothing
    torch.testing.assert_close(first(fast.to("cpu").float()(*args, **kwargs)), want, rtol=0, atol=0)


def test_a_dtype_change_is_one_error_before_anything_moves():
    model, x = llama(), ids()
    fast = mr.rewrite(model, (x,), {"use_cache": False}, config=CONFIG)
    want = fast(x).logits
    for change in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double()):
        with pytest.raises(TypeError, match=r"captured in \(float32.*rewrite the model in (bfloat16|float16|float64)"):
            change(fast)
    assert {p.dtype for p in [*model.parameters(), *fast.parameters()]} == {torch.float32}
    torch.testing.assert_close(fast(x).logits, want, rtol=0, atol=0)
    # the way the message gives: the model in that dtype, then rewrite
    half = mr.rewrite(copy.deepcopy(model).to(torch.bfloat16), (x,), {"use_cache": False}, config=CONFIG)
    assert half(x).logits.dtype == torch.bfloat16


def _double(case, n):
    args, kwargs = case.inputs(n)
    return tree_map_only(torch.Tensor, lambda t: t.double() if t.is_floating_point() else t, (args, kwargs))


@pytest.mark.parametrize("name", ["scores_div_masked_fill", "bmm_3d_where", "gqa_expand_causal_buffer",
                                  "sdpa_causal_gqa", "nn.MultiheadAttention", "nn.TransformerEncoderLayer",
                                  "bert (eager)"])
def test_gradients_through_a_rewritten_model_are_its_derivatives(name):
    """In float64: gradcheck in the model's float input, and the gradient of a random weighting of
    the output in the parameters against a central difference along a random direction (measured
    2026-12-07 on 70 forms × configurations: within 1.5e-8)."""
    case = next(c for c in zoo.all_cases() if c.name == name)
    model = case.build().double()
    args, kwargs = _double(case, 19)
    fast = mr.rewrite(model, args, kwargs, config=mr.MTAConfig(chunk_size=4, local_chunks=1, sinks=2, top_k=1))
    assert mr.count_mta_nodes(fast) >= 1
    floats = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() == 3]

    def output(*xs):
        given = list(args)
        for i, x in zip(floats, xs):
            given[i] = x
        return first(fast(*given, **kwargs))

    if floats:
        xs = [args[i].detach().clone().requires_grad_() for i in floats]
        assert torch.autograd.gradcheck(output, xs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)
    params = list(fast.parameters())
    weights = torch.randn(output().shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def loss():
        return (output() * weights).sum()

    loss().backward()
    gen = torch.Generator().manual_seed(1)
    direction = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in params]
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction) if p.grad is not None).item()
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)
        up = loss().item()
        for p, d in zip(params, direction):
            p.sub_(2 * eps * d)
        down = loss().item()
    assert (up - down) / (2 * eps) == pytest.approx(analytic, rel=1e-6)


def test_fine_tuning_the_rewritten_model_trains_the_models_parameters():
    """With one chunk MTA is exact attention: the rewritten model's gradients are the model's own
    (left padding included), and a step of an optimiser over the rewritten module's parameters
    changes the model's, which are the same tensors (docs/api.md)."""
    model = llama()
    x = ids(48)
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    call = dict(input_ids=x, attention_mask=mask, use_cache=False)
    real = mask.bool()
    weights = torch.randn(*x.shape, 128, generator=torch.Generator().manual_seed(2))

    def grads(module):
        model.zero_grad()
        (module(**call).logits * weights)[real].sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    want = grads(model)
    fast = mr.rewrite(model, (), call, config=mr.MTAConfig(chunk_size=64))
    assert mr.count_mta_nodes(fast) == 2
    for got, expected in zip(grads(fast), want):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    several = mr.rewrite(model, (), call, config=CONFIG)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    opt = torch.optim.SGD(several.parameters(), lr=0.1)
    losses = []
    for _ in range(3):
        out = several(**call).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(out[real[:, 1:]], x[:, 1:][real[:, 1:]])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)


def test_use_mta_then_train_gives_the_rewritten_models_gradients():
    """The other way to fine-tune (docs/api.md): ``use_mta`` on the model in eval mode, then
    ``train()``. Llama's attention dropout is 0, so training mode changes nothing in its forward and
    the gradients are the rewritten model's; a layer with attention dropout above 0 is a one-line
    error in training mode."""
    model, x = llama(), ids()
    fast = mr.rewrite(model, (x,), {"use_cache": False}, config=CONFIG)
    model.zero_grad()
    fast(x).logits.pow(2).mean().backward()
    want = [p.grad.clone() for p in model.parameters()]
    wrapped = mr.use_mta(model, config=CONFIG).train()
    model.zero_grad()
    wrapped(x, use_cache=False).logits.pow(2).mean().backward()
    for got, expected in zip((p.grad for p in model.parameters()), want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=64)).eval()
    bert = mr.use_mta(bert, config=CONFIG).train()
    with pytest.raises(ValueError, match="MTA has no attention dropout"):
        bert(x)
