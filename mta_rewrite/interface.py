"""``use_mta``: a transformers model's own forward, and so its ``generate``, with MTA attention.

``rewrite`` captures a model as a graph that computes whole sequences: an encoder's input, a
language model's prompt. Generation runs the model's own forward token by token over a KV cache,
which a graph does not hold. ``use_mta`` takes the other road for transformers models: it
registers the op with transformers' attention interface (``AttentionInterface``, under the name
``"mta"``; masks as transformers builds them for SDPA) and sets the model's attention to it. Then
each planned layer computes a **prompt** (queries and keys of one length, nothing cached before
them: the prefill of ``generate``, or any plain forward; over a static cache, its slots after the
prompt sliced off: ``_prompt``) with the op under the site's
configuration, through the same function calibration measures sites with
(``calibration.probe.site_output``: MTAConfig, HeadGroups, Learned, Clustered; GPT-OSS's learned
sink logits as one more exact token, as the rewrite gives them). Every other call, a decoding step
(one query over the cache) or a prompt continued over a cache, and every layer the plan leaves
exact, is the model's own attention (SDPA or eager, whichever it was loaded with, with the masks
transformers builds for it), exact, as the model ran before; so is cross-attention (a decoder's
layer given the encoder's states, seen at the call: ``CROSS_ARGUMENTS``). So the prompt
costs O(n^1.5) instead of O(n²) and each new token attends exactly to the cache (k and v are the
model's own: MTA changes which keys a query reads, not what is stored), O(n) per token.

Plan names are the module paths ``find_attention`` and ``calibrate`` give the sites
(``model.layers.0.self_attn``): a plan calibrated on the captured model applies to the model
as it is. Boundary chunks (``boundaries=`` or the plan's) need the token ids, which the attention
interface does not see: a forward pre-hook on the model computes each call's segment ids from its
token-id input (``Boundaries.input``, as the rewritten graph computes them from the same input) and
the planned layers' prompts read them. ``model.set_attn_implementation("sdpa")`` (or "eager")
undoes ``use_mta``.
"""

from __future__ import annotations

import functools
import inspect
import sys
import weakref

import torch

from .calibration.probe import site_output
from .config import Boundaries, Clustered, HeadGroups, Learned, MTAConfig, Plan
from .ops.masks import forbidden_threshold
from .passes.lower import segment_ids_from_separators

# the attention implementations use_mta sets, by the one the model had: its exact calls go to that
# one, with the masks transformers builds for it (SDPA's bool masks, eager's float ones)
NAMES = {"sdpa": "mta", "eager": "mta_eager"}

# attention module → its configuration (None or absent: exact, the model's own attention)
_CONFIGS: "weakref.WeakKeyDictionary[torch.nn.Module, MTAConfig | HeadGroups | Learned | Clustered]" = \
    weakref.WeakKeyDictionary()
# model → the attention implementation it had before use_mta
_ORIGINAL: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()
# the arguments by which a module is told to attend to another sequence (an encoder-decoder's
# decoder: BART's, T5's, Whisper's key_value_states; BERT-style cross-attention's
# encoder_hidden_states): one module class serves self- and cross-attention, so which one a call
# is shows at the call only. module (watched) → whether its current call is cross-attention
CROSS_ARGUMENTS = ("key_value_states", "encoder_hidden_states")
_CROSS: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


class _Segments:
    """Boundary chunks under use_mta: the segment ids of the model's current call (None outside
    one, or when it was given no token ids), set by the model's forward hooks, read by its
    attention modules."""

    def __init__(self, boundaries: Boundaries):
        self.boundaries = boundaries
        self.ids: torch.Tensor | None = None


# module of a model used with boundaries → that model's _Segments; model → its hooks' handles
_SEGMENTS: "weakref.WeakKeyDictionary[torch.nn.Module, _Segments]" = weakref.WeakKeyDictionary()
_HOOKS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def use_mta(model: torch.nn.Module, *, config: MTAConfig | None = None, plan: Plan | None = None,
            boundaries: Boundaries | None = None) -> torch.nn.Module:
    """Run ``model`` (a transformers model loaded with SDPA or eager attention) with MTA on its
    prompts: every attention layer under ``config``, or each layer ``plan`` names under its entry
    (the others exact); ``boundaries`` (or the plan's): boundary chunks, segments ending after
    separator tokens of the model's token ids, as ``rewrite`` takes them. Returns the model,
    changed in place (its ``config._attn_implementation`` is "mta", or "mta_eager" for a model
    loaded with eager attention); ``model.generate(...)`` then prefills with MTA and decodes
    exactly over the cache with the model's own attention. A one-line ValueError for a model or
    plan it cannot take."""
    from .api import resolve_boundaries

    if (config is None) == (plan is None):
        raise ValueError("give use_mta one of config= (every attention layer) or plan= (the layers it names)")
    if config is not None and not isinstance(config, MTAConfig):
        raise ValueError(f"config must be an MTAConfig, got {type(config).__name__} (per-layer choices go in a Plan)")
    if plan is not None and not isinstance(plan, Plan):
        raise ValueError(f"plan must be a Plan, got {type(plan).__name__}")
    boundaries = resolve_boundaries(boundaries, plan)
    original = _check_model(model)
    chosen = {}
    if plan is not None:
        modules = dict(model.named_modules())
        missing = [name for name in plan if name not in modules]
        if missing:
            from .passes.sites import listed

            raise ValueError(f"the plan names {len(missing)} module(s) this {type(model).__name__} lacks "
                             f"({listed(missing)}): a plan for another model?")
        chosen = {modules[name]: plan.config_for(name) for name in plan if plan.config_for(name) is not None}
        if boundaries is not None and any(isinstance(entry, Clustered) for entry in chosen.values()):
            raise ValueError("a site with clustered summaries takes no boundaries (its summaries are by cluster, not "
                             "chunk)")
    signature = _token_input(model, boundaries)
    _register()
    for handle in _HOOKS.pop(model, ()):
        handle.remove()
    segments = _Segments(boundaries) if boundaries is not None else None
    for module in model.modules():
        _CONFIGS.pop(module, None)
        _SEGMENTS.pop(module, None)
        entry = config if config is not None else chosen.get(module)
        if entry is not None:
            _CONFIGS[module] = entry  # (with config=, every module: only attention layers call the interface)
        if segments is not None:
            _SEGMENTS[module] = segments
        _watch_cross_attention(module)
    if segments is not None:
        _HOOKS[model] = _segment_hooks(model, segments, signature)
    _ORIGINAL[model] = original
    model.set_attn_implementation(NAMES[original])
    return model


def _token_input(model: torch.nn.Module, boundaries: Boundaries | None) -> inspect.Signature | None:
    """For boundary chunks: the signature of the model's forward, which must take their token-id
    input (a one-line error if not; checked before use_mta changes anything). None without them."""
    if boundaries is None:
        return None
    signature = inspect.signature(model.forward)
    if boundaries.input not in signature.parameters:
        named = [name for name, p in signature.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        raise ValueError(f"boundaries read the model input {boundaries.input!r}, which {type(model).__name__}'s "
                         f"forward does not take (its inputs: {', '.join(named)})")
    return signature


def _segment_hooks(model: torch.nn.Module, segments: _Segments, signature: inspect.Signature) -> tuple:
    """The model's forward hooks for boundary chunks: before a call, the segment ids of its token
    ids (as the rewritten graph computes them, ``passes.lower.segment_ids_from_separators``; None
    when the call gives none); after it, None (so a later call of an inner module alone never
    reads them). Their handles."""
    boundaries = segments.boundaries

    def before(model, args, kwargs):
        tokens = signature.bind_partial(*args, **kwargs).arguments.get(boundaries.input)
        integers = isinstance(tokens, torch.Tensor) and tokens.dim() == 2 and not tokens.is_floating_point()
        segments.ids = segment_ids_from_separators(tokens, boundaries.separators) if integers else None

    def after(model, args, kwargs, output):
        segments.ids = None

    return (model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, with_kwargs=True))


def _watch_cross_attention(module: torch.nn.Module) -> None:
    """For a module whose forward takes one of CROSS_ARGUMENTS: a pre-hook that notes whether
    each call is given one (that call is cross-attention, which MTA is not; it stays exact: q and
    k of one length do not make it self-attention). Once per module."""
    if module in _CROSS:
        return
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return
    names = [name for name in CROSS_ARGUMENTS if name in signature.parameters]
    if not names:
        return

    def note(mod, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        _CROSS[mod] = any(bound.get(name) is not None for name in names)

    module.register_forward_pre_hook(note, with_kwargs=True)
    _CROSS[module] = False


def _check_model(model) -> str:
    """The attention implementation the model had before use_mta ("sdpa" or "eager": its exact
    calls go there), for a transformers model whose attention layers call its attention
    interface; else a one-line error."""
    name = type(model).__name__
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "_can_set_attn_implementation"):
        raise ValueError(f"use_mta takes a transformers model (PreTrainedModel); {name} is not one: use rewrite() for it")
    if not model._can_set_attn_implementation():
        raise ValueError(f"{name}'s attention does not go through transformers' attention interface: use rewrite() "
                         "for it")
    original = model.config._attn_implementation
    original = _ORIGINAL.get(model, "sdpa") if original in NAMES.values() else original
    if original not in NAMES:
        raise ValueError(f"{name} runs {original} attention: load it with attn_implementation=\"sdpa\" or \"eager\" "
                         "for use_mta (its exact calls run that one)")
    if original == "eager" and _eager_function(type(model)) is None:
        raise ValueError(f"{name}'s modeling module has no eager_attention_forward: load it with "
                         "attn_implementation=\"sdpa\" for use_mta")
    if model.training:
        raise ValueError(f"{name} is in training mode: put the model in eval() (MTA has no attention dropout)")
    return original


def _eager_function(cls):
    """transformers' eager attention of a model or attention class (each modeling file has its own)."""
    return getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(NAMES["sdpa"], functools.partial(mta_attention_forward, exact=sdpa_attention_forward))
    AttentionMaskInterface.register(NAMES["sdpa"], sdpa_mask)
    AttentionInterface.register(NAMES["eager"], functools.partial(mta_attention_forward, exact=None))
    AttentionMaskInterface.register(NAMES["eager"], eager_mask)


def mta_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          is_causal=None, *, exact=None, **kwargs):
    """transformers' attention function "mta" / "mta_eager": query [B, Hq, m, d], key and value
    [B, Hkv, n, d] (the cache included), the mask transformers built for the model's own
    attention → ([B, m, Hq, d], None). A prompt (``_prompt``) of a planned layer runs the op under
    its configuration (learned sink logits, GPT-OSS's ``s_aux``, as one more exact token, as the
    rewrite gives them); anything else ``exact``, the model's own attention (None: the eager
    attention of the layer's modeling module)."""
    config = _CONFIGS.get(module)
    prompt = None if config is None or _CROSS.get(module, False) else _prompt(query, key, value, attention_mask)
    if prompt is None:
        exact = exact or _eager_function(type(module))
        return exact(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                     **kwargs)
    key, value, attention_mask = prompt
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{type(module).__name__} soft-caps its scores (tanh), which MTA cannot: leave it exact")
    if dropout:
        raise ValueError("MTA has no attention dropout: put the model in eval()")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True)) and attention_mask is None
    if kwargs.get("position_bias") is not None:  # (T5's: a float mask, as SDPA gets it)
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        bias = kwargs["position_bias"][..., :key.shape[2]]
        attention_mask = create_position_bias_mask(bias, attention_mask, causal, query, key)
        causal = False
    sinks = kwargs.get("s_aux")
    out = site_output(config, None, query, key, value, attention_mask, causal, scaling, dtype=query.dtype,
                      segment_ids=_segment_ids(module, query),
                      sink_logits=None if sinks is None else sinks.reshape(1, -1, 1, 1))
    return out.transpose(1, 2).contiguous(), None


def _prompt(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None):
    """(key, value, attention_mask) of a call that is a prompt, the m > 1 queries' own keys with
    nothing cached before them; None for any other call. Over a dynamic cache that is m = n; a
    static cache (``cache_implementation="static"``, fixed-length k and v, the prompt's written
    first) hands the prefill all n > m of its slots, and its mask forbids every key after the first
    m: those are sliced off. (A prompt continued over a cache has a key after the first m that its
    mask allows: its last query's own.)"""
    m, n = query.shape[2], key.shape[2]
    if m < 2 or n < m:
        return None
    if n == m:
        return key, value, attention_mask
    if attention_mask is None:
        return None
    after = attention_mask[..., m:]
    if not (~after if after.dtype == torch.bool else after <= forbidden_threshold(after.dtype)).all():
        return None
    return key[:, :, :m], value[:, :, :m], attention_mask[..., :m]


def _segment_ids(module, query: torch.Tensor) -> torch.Tensor | None:
    """Boundary chunks' segment ids [B, n] for a prompt of ``module`` (None without boundaries);
    a one-line error when its model's call gave no token ids of the prompt's batch and length."""
    segments = _SEGMENTS.get(module)
    if segments is None:
        return None
    ids, name = segments.ids, segments.boundaries.input
    if ids is None:
        raise ValueError(f"boundary chunks read the segments from the model's {name}, which this call did not give "
                         f"(as token ids [B, n]): call the model with {name}=")
    if tuple(ids.shape) != (query.shape[0], query.shape[2]):
        raise ValueError(f"boundary chunks: the model's {name} has {list(ids.shape)} tokens but "
                         f"{type(module).__name__} attends over {query.shape[2]} of a batch of {query.shape[0]}")
    return ids
