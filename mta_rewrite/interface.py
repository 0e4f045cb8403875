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
sink logits as one more exact token, as the rewrite gives them). A prompt continued over a cache
(a second turn, a chunked prefill) runs the op over the whole sequence, the cached positions'
queries zeros, where its new tokens fill a chunk and that costs fewer flops than exact attention
of its queries (``_continues_with_mta``). Every other call, a decoding step (one query over the
cache, or fewer than a chunk: assisted generation's candidates), and every layer the plan leaves
exact, is the model's own attention (SDPA or eager, whichever it was loaded with, with the masks
transformers builds for it), exact, as the model ran before; so is cross-attention (a decoder's
layer given the encoder's states, seen at the call: ``CROSS_ARGUMENTS``). So the prompt
costs O(n^1.5) instead of O(n²) and each new token attends exactly to the cache (k and v are the
model's own: MTA changes which keys a query reads, not what is stored), O(n) per token; with
``decode=True`` a decoding step of a layer planned with an MTAConfig (learned summaries too) is the op's row for its
position instead (``_decode``, ``ops.decode``: the distant chunks' summaries kept on the cache's
layer), O(√n) per token.

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
import re
import sys
import threading
import warnings
from typing import NamedTuple

import torch

from .calibration.probe import site_output
from .config import Boundaries, Clustered, HeadGroups, Learned, MTAConfig, Plan
from .ops.masks import continued_key_padding, decode_row, forbidden_threshold, read_outside_graphs
from .ops.weights import effective_weights
from .passes.lower import forbid_masked_scores, segment_ids_from_separators

# the attention implementations use_mta sets, by the one the model had: its exact calls go to that
# one, with the masks transformers builds for it (SDPA's bool masks, eager's float ones)
NAMES = {"sdpa": "mta", "eager": "mta_eager"}

# The state use_mta gives a module lives in the module's own attributes, where torch.compile
# guards what a compiled frame read (a frame reused for another layer sees that layer's; a lookup
# keyed by the module in a dict of ours was folded into the frame unguarded: a plan's second layer
# ran under the first one's configuration in a continued prompt):
# _mta_config: its configuration (absent: exact, the model's own attention); _mta_decode: whether
# its decoding steps run MTA (use_mta(..., decode=True)); _mta_segments: its model's _Segments
# (boundary chunks); _mta_cross: whether its current call is cross-attention, _mta_call: the
# cache its current call was handed, per thread (_CallState; _watch_calls; None between calls). Nothing a compiled frame
# runs touches a dict of ours: dynamo traced the hook's store into a WeakKeyDictionary keyed by
# the module by building every entry's module (every model use_mta had watched in the process),
# and on CI's clean clone (2026-12-06) failed inside it with an internal error. The model itself
# keeps _mta_installed (_Installed: its attention before use_mta), and its hooks are objects of
# ours (_NoteCall, _SegmentHook), so a deep copy or an unpickled model carries all of it.
# the arguments by which a module is told to attend to another sequence (an encoder-decoder's
# decoder: BART's, T5's, Whisper's key_value_states; BERT-style cross-attention's
# encoder_hidden_states): one module class serves self- and cross-attention, so which one a call
# is shows at the call only (the module's _mta_cross)
CROSS_ARGUMENTS = ("key_value_states", "encoder_hidden_states")
# the arguments by which an attention module is handed the KV cache (transformers 5.x: cache;
# before: past_key_values, past_key_value; GPT-NeoX's and Falcon's: layer_past)
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


class _CallState(threading.local):
    """The cache a module's current call was handed, in the thread making the call: two threads
    generating with one model at once (a server's) each read their own. Kept on the module itself
    until 2026-12-07, where each thread's decoding steps read the cache of whichever call came last:
    with ``decode=True`` every one of 24 concurrent generations differed from the same run alone.
    A copy (deep copy, pickle) starts empty."""

    cache = None

    def __reduce__(self):
        return type(self), ()


class _Segments(threading.local):
    """Boundary chunks under use_mta: the segment ids of the model's current call (None outside
    one, or when it was given no token ids), set by the model's forward hooks, read by its
    attention modules: of the whole sequence so far where the call continues one over a cache
    whose tokens the hooks saw (kept with the cache: ``_keep_tokens``), else of the call's own
    tokens. Per thread (``threading.local``: each thread starts from ``__init__``): until 2026-12-07
    two threads calling one model at once read each other's segments (22 of 24 concurrent
    generations failed, "the model's input_ids has [1, 33] tokens but LlamaAttention attends over 90")."""

    def __init__(self, boundaries: Boundaries):
        self.boundaries = boundaries
        self.call: torch.Tensor | None = None  # the token ids the current call's segments are of
        self._ids: torch.Tensor | None = None
        self._bounds: dict = {}
        self.tokens: torch.Tensor | None = None  # the current call's whole sequence (None: unknown)

    @property
    def ids(self) -> torch.Tensor | None:
        """The current call's segment ids, computed at the first prompt that reads them (a decoding
        step reads none: ~1 ms at 8K tokens with 107 separators, per step, saved)."""
        if self._ids is None and self.call is not None:
            self._ids = segment_ids_from_separators(self.call, self.boundaries.separators)
        return self._ids

    def set_call(self, tokens: torch.Tensor | None) -> None:
        self.call, self._ids, self._bounds = tokens, None, {}

    def chunk_bounds(self, chunk_size: int, sinks: int, sink_token: bool = False) -> torch.Tensor:
        """[B, M + 1]: the chunk starts of each sequence of the current call, then its end
        (``ops.segments.chunk_bounds``, chunks of at most ``chunk_size``), once per call and
        chunking (a decoding step's layers share them). ``sink_token``: of the sequence with a
        learned sink logit's token first, one more sink (as the prompt's op chunks it)."""
        from .ops.segments import chunk_bounds
        from .passes.lower import sink_token_segments

        if (chunk_size, sinks, sink_token) not in self._bounds:
            ids = sink_token_segments(self.ids) if sink_token else self.ids
            self._bounds[chunk_size, sinks, sink_token] = chunk_bounds(ids, ids.shape[0], chunk_size,
                                                                       sinks + sink_token)
        return self._bounds[chunk_size, sinks, sink_token]

    def __reduce__(self):
        return type(self), (self.boundaries,)  # (a copy, deep or pickled, starts between calls)


class _Installed:
    """What ``use_mta`` did to a model, kept on it (``_mta_installed``) so a copy of it has it too:
    the attention implementation the model had before (its exact calls run that one) and whether
    its decoding steps run MTA. Unpickled (``torch.save(model)`` / ``torch.load`` in another
    process), it registers ``"mta"`` with transformers' attention interface again (``_prepare``),
    which the model's configuration names."""

    def __init__(self, original: str, decode: bool):
        self.original, self.decode = original, decode

    def __reduce__(self):
        return _installed, (self.original, self.decode)


def _installed(original: str, decode: bool) -> _Installed:
    _prepare(decode)
    return _Installed(original, decode)


def _prepare(decode: bool) -> None:
    """What a process needs before a model under use_mta runs: ``"mta"`` and ``"mta_eager"``
    registered with transformers' interfaces, the mask readings (and, for ``decode``, the
    decoding steps) outside torch.compile's graphs."""
    global _DECODE_OUTSIDE_GRAPHS
    if decode and _DECODE_OUTSIDE_GRAPHS is None:
        _DECODE_OUTSIDE_GRAPHS = torch.compiler.disable(_decode)
    read_outside_graphs()  # (the mask readings of a compiled forward: outside its graphs)
    _register()


def _drop_hooks(module: torch.nn.Module, kind: type) -> None:
    """Remove ``module``'s forward hooks that are ``kind`` instances: an earlier use_mta's, found on
    the module itself (so a deep copy's and an unpickled model's too, which no handle reaches)."""
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [key for key, hook in hooks.items() if isinstance(hook, kind)]:
            # (hook ids are unique across these dicts: RemovableHandle's one counter)
            for table in (module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs, module._forward_hooks,
                          module._forward_hooks_with_kwargs, module._forward_hooks_always_called):
                table.pop(key, None)


def use_mta(model: torch.nn.Module, *, config: MTAConfig | None = None, plan: Plan | None = None,
            boundaries: Boundaries | None = None, decode: bool = False) -> torch.nn.Module:
    """Run ``model`` (a transformers model loaded with SDPA or eager attention) with MTA on its
    prompts: every attention layer under ``config``, or each layer ``plan`` names under its entry
    (the others exact); ``boundaries`` (or the plan's): boundary chunks, segments ending after
    separator tokens of the model's token ids, as ``rewrite`` takes them. Returns the model,
    changed in place (its ``config._attn_implementation`` is "mta", or "mta_eager" for a model
    loaded with eager attention); ``model.generate(...)`` then prefills with MTA and decodes
    exactly over the cache with the model's own attention, or with ``decode=True`` decodes with MTA
    too: each step's query attends to its window, sinks and top-k chunks and to one summary per
    distant chunk, kept with the cache between steps (``_decode``). A wrapper that hands attribute
    lookups on to a transformers model (PEFT's PeftModel) is taken as that model
    (:func:`_transformers_model`), and returned. In training mode a layer with attention dropout
    above 0 is refused at its call (MTA has none). A one-line ValueError for a model or plan it
    cannot take."""
    from .api import resolve_boundaries

    if (config is None) == (plan is None):
        raise ValueError("give use_mta one of config= (every attention layer) or plan= (the layers it names)")
    if config is not None and not isinstance(config, MTAConfig):
        raise ValueError(f"config must be an MTAConfig, got {type(config).__name__} (per-layer choices go in a Plan)")
    if plan is not None and not isinstance(plan, Plan):
        raise ValueError(f"plan must be a Plan, got {type(plan).__name__}")
    if not isinstance(decode, bool):
        raise ValueError(f"decode must be True or False, got {decode!r}")
    boundaries = resolve_boundaries(boundaries, plan)
    wrapper, model = model, _transformers_model(model)
    original = _check_model(model)
    own = [name for name, module in model.named_modules() if _own_attention(type(module))]
    if own:
        from .passes.sites import listed

        warnings.warn(f"{len(own)} attention module(s) of {type(model).__name__} compute their attention in their own "
                      f"code, not through transformers' attention interface ({listed(own)}): use_mta leaves them as "
                      "they are, exact (rewrite() captures the model and rewrites hand-written attention)", stacklevel=2)
    _prepare(decode)
    chosen = {}
    if plan is not None:
        modules = dict(model.named_modules())
        if wrapper is not model:  # (names as the wrapper gives them, a plan calibrated on it: also its model's)
            modules.update((name, module) for name, module in wrapper.named_modules())
        missing = [name for name in plan if name not in modules]
        if missing:
            from .passes.sites import listed

            raise ValueError(f"the plan names {len(missing)} module(s) this {type(model).__name__} lacks "
                             f"({listed(missing)}): a plan for another model?")
        chosen = {modules[name]: plan.config_for(name) for name in plan if plan.config_for(name) is not None}
        if boundaries is not None and any(isinstance(entry, Clustered) for entry in chosen.values()):
            raise ValueError("a site with clustered summaries takes no boundaries (its summaries are by cluster, not "
                             "chunk)")
    _token_input(model, boundaries)  # (its one-line error before anything changes)
    _drop_hooks(model, _SegmentHook)
    segments = _Segments(boundaries) if boundaries is not None else None
    apart = _apart_from_tokens(model, boundaries) if segments is not None else set()
    for module in model.modules():
        for name in ("_mta_config", "_mta_segments"):
            vars(module).pop(name, None)
        vars(module)["_mta_decode"] = decode  # (every module: a compiled call may be handed another layer's, _decode)
        entry = config if config is not None else chosen.get(module)
        if entry is not None:
            vars(module)["_mta_config"] = entry  # (config=: every module; only attention layers use it)
        if segments is not None and id(module) not in apart:
            vars(module)["_mta_segments"] = segments
        _watch_calls(module)
    if segments is not None:
        _segment_hooks(model, segments)
    vars(model)["_mta_installed"] = _Installed(original, decode)
    model.set_attn_implementation(NAMES[original])
    return wrapper


def _apart_from_tokens(model: torch.nn.Module, boundaries: Boundaries) -> set[int]:
    """The ids of the modules of ``model`` that attend over another sequence than the token ids
    boundary chunks read (``boundaries.input``), so chunk by ``chunk_size`` alone, as ``rewrite``
    chunks such sites (``passes.lower.sites_apart``): the towers built from a configuration of
    another modality (:func:`_other_towers`: a vision-language model's vision tower, over patches),
    and in an encoder-decoder the stack that does not read that input (the decoder, over its own
    ids, for ``input_ids``; the encoder for ``decoder_input_ids``). Until 2026-12-07 a
    vision-language model failed at its vision tower's first layer ("the model's input_ids has
    [2, 39] tokens but SiglipAttention attends over 16 of a batch of 4"), and an encoder-decoder's
    decoder chunked by the encoder's segments where its ids were as long (T5: 0.13 from rewrite)."""
    towers = _other_towers(model)
    roots = [module for module in model.modules() if any(getattr(module, "config", None) is t for t in towers)]
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        stack = None
        try:
            stack = model.get_encoder() if boundaries.input.startswith("decoder_") else model.get_decoder()
        except (AttributeError, NotImplementedError, ValueError):
            pass
        if isinstance(stack, torch.nn.Module) and stack is not model:
            roots.append(stack)
    return {id(module) for root in roots for module in root.modules()}


def _other_towers(model: torch.nn.Module) -> list:
    """The configurations a model nests besides its text's for another modality (a
    vision-language model's ``vision_config``, an audio tower's)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    nested = [getattr(config, name, None) for name in getattr(config, "sub_configs", None) or {}
              if any(word in name for word in _OTHER_MODALITIES)]  # (T5Gemma's "encoder" attends over the ids)
    return [part for part in nested if part is not None and part is not text and part is not config]


# the names of nested configurations whose layers attend over something else than token ids
_OTHER_MODALITIES = ("vision", "visual", "image", "video", "audio", "speech")


def _transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model ``model`` is, or the one it wraps and hands attribute lookups on to
    (PEFT's ``PeftModel``: its ``set_attn_implementation`` and ``config`` are its base model's):
    use_mta works on that one, its hooks and what it did kept there. So they stay with it when the
    wrapper gives it back (``merge_and_unload``), boundary chunks read its forward's token ids (a
    wrapper's is ``forward(*args, **kwargs)``; its ``generate`` calls the inner model's forward),
    and a plan names its modules as ``find_attention`` does for it (or for the wrapper). Until
    2026-12-07 a PeftModel's merged model lost what use_mta did (``torch.save`` of it then failed to
    load in a fresh process, "`mta` is not a valid attention implementation"; use_mta again
    switched an eager model to SDPA) and boundaries were refused ("PeftModel's forward does not
    take input_ids"). A module that is no transformers model but holds one (sentence-transformers'
    SentenceTransformer, whose first module holds it as ``auto_model``; a user's own head around a
    backbone): the one it holds, outermost; several (two towers) are a one-line error naming them,
    to use_mta each."""
    owner = getattr(getattr(model, "set_attn_implementation", None), "__self__", None)
    if isinstance(owner, torch.nn.Module):
        return owner
    held, inside = [], set()
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if _is_transformers_model(module):
            held.append((name, module))
            inside.add(name + ".")
    if len(held) > 1:
        from .passes.sites import listed

        raise ValueError(f"{type(model).__name__} holds {len(held)} transformers models "
                         f"({listed([name for name, _ in held])}): use_mta each of them")
    return held[0][1] if held else model


def _is_transformers_model(module) -> bool:
    """Whether ``module`` is (or passes itself off as) a transformers model whose attention
    implementation can be set (``PreTrainedModel``)."""
    return hasattr(module, "set_attn_implementation") and hasattr(module, "_can_set_attn_implementation")


def _token_input(model: torch.nn.Module, boundaries: Boundaries | None) -> None:
    """For boundary chunks: check that the model's forward takes their token-id input (a one-line
    error if not; checked before use_mta changes anything)."""
    if boundaries is None:
        return
    signature = inspect.signature(model.forward)
    if boundaries.input not in signature.parameters:
        named = [name for name, p in signature.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        raise ValueError(f"boundaries read the model input {boundaries.input!r}, which {type(model).__name__}'s "
                         f"forward does not take (its inputs: {', '.join(named)})")


class _ForwardHook:
    """Hooks of use_mta's that are objects (so a model under use_mta pickles and deep-copies with
    them) and read their module's forward signature: read when first needed, kept, and not
    pickled (read again after)."""

    _signature: inspect.Signature | None = None
    _kwargs_name: str | None = None  # (the forward's **kwargs parameter, if it has one)

    def _forward_signature(self, module) -> inspect.Signature:
        if self._signature is None:
            self._signature = inspect.signature(module.forward)
            self._kwargs_name = next((name for name, p in self._signature.parameters.items()
                                      if p.kind == p.VAR_KEYWORD), None)
        return self._signature

    def __getstate__(self) -> dict:
        return {name: value for name, value in vars(self).items() if name not in ("_signature", "_kwargs_name")}


class _SegmentHook(_ForwardHook):
    """The model's forward hooks for boundary chunks (``before``, ``after``: one object per role, so
    that an unpickled or deep-copied model has them, and its own segments): before a call, the
    token ids whose segments its prompts read (as the rewritten graph computes them,
    ``passes.lower.segment_ids_from_separators``, when first read; None when the call gives none):
    the whole sequence's where the call continues a cache whose tokens hooks saw (kept with the
    cache object, passed to a call or returned by it, so a deep copy of it has them too; the cache
    holding as many tokens as they saw, or fewer: a cropped cache), else the call's own; after it,
    None (so a later call of an inner module alone never reads them)."""

    def __init__(self, segments: _Segments, after: bool):
        self.segments, self.after = segments, after

    def __call__(self, model, args, kwargs, output=None):
        if self.after:
            self._after(output)
        else:
            self._before(model, args, kwargs)

    def _before(self, model, args, kwargs):
        segments = self.segments
        bound = self._forward_signature(model).bind_partial(*args, **kwargs).arguments
        tokens = bound.get(segments.boundaries.input)
        if not (isinstance(tokens, torch.Tensor) and tokens.dim() == 2 and not tokens.is_floating_point()):
            segments.set_call(None)
            segments.tokens = None
            return
        extra = bound.get(self._kwargs_name) or {}
        cache = next((x for x in (bound.get("cache"), bound.get("past_key_values"), extra.get("cache"),
                                  extra.get("past_key_values")) if x is not None), None)
        cached = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
        seen = None if cache is None else vars(cache).get("_mta_tokens")
        if cached == 0:
            sequence = tokens
        elif seen is not None and seen.shape[0] == tokens.shape[0] and seen.shape[1] >= cached:
            sequence = torch.cat([seen[:, :cached], tokens], dim=1)
        else:
            sequence = None  # a cache of tokens the hooks did not see
        segments.tokens = sequence
        if cache is not None:
            _keep_tokens(cache, sequence)
        segments.set_call(tokens if sequence is None else sequence)

    def _after(self, output):
        segments = self.segments
        segments.set_call(None)
        cache = _output_cache(output)  # (a cache the model made for the call)
        if cache is not None and segments.tokens is not None:
            _keep_tokens(cache, segments.tokens)


def _segment_hooks(model: torch.nn.Module, segments: _Segments) -> None:
    """Register ``_SegmentHook``'s two hooks on ``model``."""
    model.register_forward_pre_hook(_SegmentHook(segments, after=False), with_kwargs=True)
    model.register_forward_hook(_SegmentHook(segments, after=True), with_kwargs=True)


def _change_tokens(change):
    """What a Cache method that reorders, selects or repeats its sequences first does to the token
    ids the boundary hooks keep with that cache: the same."""
    def action(cache, argument):
        tokens = vars(cache).get("_mta_tokens")
        if tokens is not None:
            vars(cache)["_mta_tokens"] = change(tokens, argument)

    return action


# the Cache methods that reorder, select or repeat its sequences (beam search, generate's expansion)
_BATCH_CHANGES = {"reorder_cache": _change_tokens(lambda tokens, index: tokens[index.to(tokens.device)]),
                  "batch_select_indices": _change_tokens(lambda tokens, index: tokens[index.to(tokens.device)]),
                  "batch_repeat_interleave": _change_tokens(lambda tokens, repeats: tokens.repeat_interleave(
                      repeats, dim=0))}


def _keep_tokens(cache, tokens: torch.Tensor | None) -> None:
    """Keep ``tokens``, the token ids of the sequences ``cache`` holds (None: not known), with it
    (``_mta_tokens``), its ``_BATCH_CHANGES`` methods made to change them alike."""
    if not hasattr(cache, "__dict__"):
        return
    vars(cache)["_mta_tokens"] = tokens
    _before_methods(cache, "_mta_follows_tokens")


def _before_methods(obj, flag: str) -> None:
    """Make each method of ``obj`` that ``_BEFORE[flag]`` names call its action with ``obj`` and the
    method's arguments before it runs (on this object only, so other caches are untouched). Once
    per object and ``flag``."""
    if vars(obj).get(flag):
        return
    for name in _BEFORE[flag]:
        if callable(getattr(obj, name, None)):
            setattr(obj, name, _Preceded(obj, name, flag))
    vars(obj)[flag] = True


class _Preceded:
    """``obj.<name>`` preceded by ``_BEFORE[flag][name]``. An object, not a bound closure, so a
    cache holding it pickles with it (a bound method pickles as ``getattr(obj, name)``, which gave
    the class's plain method back: until 2026-12-07 an unpickled cache's ``crop`` and
    ``reorder_cache`` kept the chunk sums and token ids of what they had dropped or reordered); a
    deep copy is bound to the copy."""

    def __init__(self, obj, name: str, flag: str):
        self.obj, self.name, self.flag = obj, name, flag
        self.__name__ = name

    def __call__(self, *args, **kwargs):
        _BEFORE[self.flag][self.name](self.obj, *args, **kwargs)
        return getattr(type(self.obj), self.name)(self.obj, *args, **kwargs)


def _output_cache(output):
    """The cache a model's output holds (transformers 5.25 names it ``cache``, before
    ``past_key_values``), without touching the deprecated name where the new one is there."""
    if isinstance(output, dict):
        return output.get("cache", output.get("past_key_values"))
    return getattr(output, "past_key_values", None)


def decoding_layers(output) -> tuple[int, int]:
    """(how many layers of the cache a ``generate(..., return_dict_in_generate=True)`` output or a
    model's output holds decoded through MTA, how many layers it has): a layer counts when it holds
    chunk sums (``use_mta(..., decode=True)`` keeps them there from its first step that summarised
    a chunk; a reorder, crop or reset drops them). (0, 0) for an output without such a cache."""
    layers = getattr(_output_cache(output), "layers", None)
    if not isinstance(layers, (list, tuple)):
        return 0, 0
    return sum("_mta_chunk_sums" in vars(layer) for layer in layers), len(layers)


class _NoteCall(_ForwardHook):
    """``_watch_calls``'s pre-hook: notes at a module's call whether it is given one of its
    ``cross`` arguments (``_mta_cross``) and the cache it is handed among its ``caches``
    (``_mta_call``). An object, not a closure, so a model under use_mta pickles (``torch.save``)."""

    def __init__(self, cross: list, caches: list, first: int):
        self.cross, self.caches, self.first = cross, caches, first  # first: the first of them's position

    def __call__(self, mod, args, kwargs):
        if len(args) <= self.first:
            bound = kwargs
        else:
            bound = self._forward_signature(mod).bind_partial(*args, **kwargs).arguments
        if self.cross:
            mod._mta_cross = any(bound.get(name) is not None for name in self.cross)
        if self.caches:
            mod._mta_call.cache = next((bound[name] for name in self.caches if bound.get(name) is not None), None)


def _forget_call(mod, args, kwargs, output) -> None:
    """``_watch_calls``'s hook after a call (also after an exception): the module does not keep a
    cache alive after its call."""
    mod._mta_call.cache = None


def _watch_calls(module: torch.nn.Module) -> None:
    """For a module whose forward takes one of CROSS_ARGUMENTS or CACHE_ARGUMENTS: a pre-hook that
    notes at each call whether it is given one of the former (that call is cross-attention, which
    MTA is not; it stays exact: q and k of one length do not make it self-attention), and the cache
    it is handed (a decoding step's chunk sums live on the cache's layer), which a hook after the
    call (also after an exception) lets go of. Once per module (its copies included: the hook is
    looked for on the module)."""
    if any(isinstance(hook, _NoteCall) for hook in module._forward_pre_hooks.values()):
        return
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return
    cross = [name for name in CROSS_ARGUMENTS if name in signature.parameters]
    caches = [name for name in CACHE_ARGUMENTS if name in signature.parameters]
    if not cross and not caches:
        return
    names = list(signature.parameters)
    first = min(names.index(name) for name in cross + caches)  # (fewer positional arguments: all by keyword)
    module.register_forward_pre_hook(_NoteCall(cross, caches, first), with_kwargs=True)
    if caches:
        module.register_forward_hook(_forget_call, with_kwargs=True, always_call=True)
    if cross:
        vars(module)["_mta_cross"] = False
    if caches:
        vars(module)["_mta_call"] = _CallState()


def _check_model(model) -> str:
    """The attention implementation the model had before use_mta ("sdpa" or "eager": its exact
    calls go there), for a transformers model whose attention layers call its attention
    interface; else a one-line error."""
    name = type(model).__name__
    if not _is_transformers_model(model):
        raise ValueError(f"use_mta takes a transformers model (PreTrainedModel); {name} is not one: use rewrite() for it")
    if not model._can_set_attn_implementation():
        raise ValueError(f"{name}'s attention does not go through transformers' attention interface: use rewrite() "
                         "for it")
    original = model.config._attn_implementation
    if original in NAMES.values():
        installed = vars(model).get("_mta_installed")
        original = installed.original if isinstance(installed, _Installed) else "sdpa"
    if original not in NAMES:
        raise ValueError(f"{name} runs {original} attention: load it with attn_implementation=\"sdpa\" or \"eager\" "
                         "for use_mta (its exact calls run that one)")
    # (a composite model's attention may live in another modeling module: Fuyu's in Persimmon's)
    if original == "eager" and not any(_eager_function(type(m)) is not None for m in model.modules()):
        raise ValueError(f"{name}'s modeling modules have no eager_attention_forward (no attention through "
                         "transformers' attention interface, or none at all): load it with attn_implementation=\"sdpa\" "
                         "for use_mta, or use rewrite() for it")
    return original  # (training mode too: a layer with attention dropout is refused at its call)


# what an attention class's code says when its attention goes through transformers' interface
_INTERFACE = re.compile(r"ALL_ATTENTION_FUNCTIONS|attention_interface|eager_attention_forward|_attn_implementation")


@functools.cache
def _own_attention(cls) -> bool:
    """Does this module class (an ...Attention class) compute a softmax in its own code, none of
    its code reaching transformers' attention interface? (GIT's text attention, Gemma-3n's audio
    attention: use_mta cannot reach them.) Read from the
    source of the class and of its bases; a class whose source is not there: no."""
    if "Attention" not in cls.__name__:
        return False
    code = []
    for base in cls.__mro__:
        if base is torch.nn.Module or not issubclass(base, torch.nn.Module):
            continue
        try:
            code.append(inspect.getsource(base))
        except (OSError, TypeError):
            return False
    text = "\n".join(code)
    return "softmax" in text and not _INTERFACE.search(text)


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
    attention → ([B, m, Hq, d], None). A prompt (``_prompt``; one continued over a cache where
    ``_continues_with_mta``: the op over the whole sequence, the m new rows computed and returned)
    of a planned layer runs the op under its configuration (learned sink logits, GPT-OSS's
    ``s_aux``, as one more exact token, as the rewrite gives them); anything else ``exact``, the
    model's own attention (None: the eager attention of the layer's modeling module).

    What else the layer hands over that changes what attention computes is read or refused: a
    relative position bias (``position_bias``: T5's, Inkling's) as a float mask; learned sink logits,
    per head (``s_aux``) or per query row (``sinks``, Inkling-2's), as one more exact token; a
    sparse-attention indexer's token selection (``indices``) folded into the mask
    (:func:`_token_selection`); any other tensor is a one-line error (:func:`_check_unread`), never
    silently dropped."""
    config = getattr(module, "_mta_config", None)
    causal_call = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    _check_unread(module, kwargs)
    if kwargs.get("indices") is not None:
        attention_mask = _token_selection(query, key, attention_mask, kwargs.pop("indices"), causal_call)
    prompt = None if config is None or getattr(module, "_mta_cross", False) else \
        _prompt(query, key, value, attention_mask, causal_call)
    if prompt is not None and prompt.cached and not _continues_with_mta(module, config, query, prompt.key, prompt.mask,
                                                                         kwargs):
        prompt = None
    if prompt is None and query.shape[2] == 1 and getattr(module, "_mta_decode", False):
        out = (_DECODE_OUTSIDE_GRAPHS or _decode)(module, query, key, value, attention_mask, scaling, kwargs)
        if out is not None:
            _no_weights(kwargs)
            return out.transpose(1, 2).contiguous(), None
    if prompt is None:
        exact = exact or _eager_function(type(module))
        return exact(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                     **kwargs)
    key, value, attention_mask = prompt.key, prompt.value, prompt.mask
    m = query.shape[2]
    if prompt.cached:  # the whole sequence's queries, those of the cached tokens zeros (see _Prompt)
        query = torch.cat([query.new_zeros(*query.shape[:2], prompt.cached, query.shape[3]), query], dim=2)
    if dropout:
        raise ValueError(f"MTA has no attention dropout, and {type(module).__name__} has {dropout:g} in training mode: "
                         "put the model in eval(), or set its attention dropout to 0 to train it with MTA")
    if prompt.cached:  # causal with no mask or key padding [B, 1, 1, n]; else the mask says it all
        causal = attention_mask is None or attention_mask.shape[-2] == 1
    else:
        causal = causal_call and attention_mask is None
    if kwargs.get("position_bias") is not None:  # (T5's: a float mask, as SDPA gets it)
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        bias = kwargs["position_bias"][..., :key.shape[2]]
        attention_mask = create_position_bias_mask(bias, attention_mask, causal, query, key)
        causal = False
    if attention_mask is not None and attention_mask.is_floating_point() and attention_mask.shape[-2] == 1:
        # a mask per key of a masked score above the dtype's minimum ((1 − mask)·−10000, MarkupLM's):
        # forbidden keys, as the rewrite reads the same mask (passes.lower.combine_masks), not a bias
        attention_mask = forbid_masked_scores(attention_mask)
    sinks = kwargs.get("s_aux")  # (GPT-OSS's, one per head)
    sinks = None if sinks is None else sinks.reshape(1, -1, 1, 1)
    if kwargs.get("sinks") is not None:  # (Inkling-2's, one per query row [B, Hq, m, 1]; the cached rows' dropped)
        sinks = torch.nn.functional.pad(kwargs["sinks"], (0, 0, prompt.cached, 0))
    segment_ids = _segment_ids(module, query)

    def run(values):
        return site_output(config, None, query, key, values, attention_mask, causal, scaling, dtype=query.dtype,
                           segment_ids=segment_ids, sink_logits=sinks, rows_from=prompt.cached,
                           softcap=float(kwargs.get("softcap") or 0.0))  # (Gemma-2's attn_logit_softcapping)

    out = run(value)
    # output_attentions=True: the weights MTA puts on each token (a key's own probability plus its
    # share of the summaries that hold it), which give the output as W @ v (ops/weights.py)
    weights = effective_weights(run, key)[:, :, -m:] if kwargs.get("output_attentions") else None
    return out[:, :, -m:].transpose(1, 2).contiguous(), weights


def _no_weights(kwargs: dict) -> None:
    """Warn (once) that a decoding step through MTA (``decode=True``) asked for the attention
    weights (``output_attentions=True``) gives none: it reads the chunk sums kept on the cache, not
    the values a weight matrix is read from. A prompt gives them (:func:`effective_weights`)."""
    if kwargs.get("output_attentions"):
        warnings.warn("use_mta: a decoding step through MTA (decode=True) gives no attention weights "
                      "(output_attentions=True); prompts, and steps decoded exactly, give them", stacklevel=3)


# tensors transformers' attention layers hand their attention function that mta_attention_forward
# reads (``s_aux``, ``sinks``, ``position_bias``, ``indices``) or that eager and SDPA attention do not
# read either (positions; FlashAttention's packed-sequence offsets and a packed batch's sequence
# index, which the mask also says; the loss's token count, ``num_items_in_batch``, which the
# Trainer passes to every forward: until 2026-12-07 it stopped training under use_mta)
_READ_TENSORS = frozenset({"s_aux", "sinks", "position_bias", "indices", "position_ids", "cache_position",
                           "cu_seq_lens_q", "cu_seq_lens_k", "seq_idx", "num_items_in_batch"})


def _check_unread(module, kwargs: dict) -> None:
    """A one-line ValueError for a tensor the layer hands its attention function that MTA would not
    read, so would drop: MiniMax-M3's block-sparse selection (``block_indices``: transformers folds it
    into the mask only under eager and SDPA, and use_mta's implementation is neither)."""
    unread = [name for name, value in kwargs.items() if isinstance(value, torch.Tensor) and name not in _READ_TENSORS]
    if unread:
        raise ValueError(f"use_mta cannot run {type(module).__name__}: it hands its attention function "
                         f"{', '.join(unread)}, which MTA does not read (its outputs would be wrong); use rewrite() for "
                         "this model")


def _token_selection(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                     indices: torch.Tensor, causal: bool) -> torch.Tensor:
    """The mask with a sparse-attention indexer's selection folded in: ``indices`` [B, m, K], the
    keys each query may attend (DeepSeek-V3.2's lightning indexer, and the models that share its
    code: GLM-MoE-DSA, Mistral-Large-4, HY-V4, AXK2, dots3). Those models fold it into the mask
    themselves only under eager and SDPA attention; under any other implementation, use_mta's
    included, they pass ``indices`` for a kernel to read and the mask as it was: so use_mta ran
    them as dense attention (DeepSeek-V3.2 with its top-k at 8 of 40 tokens, one chunk: 0.30 from
    the model's own output). Folded as their eager path does: a boolean mask ANDed, a float mask
    filled with the dtype's minimum; no mask (SDPA's causal skip): the triangle, if ``causal``."""
    B, m, n = query.shape[0], query.shape[2], key.shape[2]
    selected = torch.zeros(B, m, n, dtype=torch.bool, device=query.device).scatter(-1, indices.long(), True)
    selected = selected.unsqueeze(1)
    if attention_mask is None:
        if causal and m > 1:
            selected = selected & torch.ones(m, n, dtype=torch.bool, device=query.device).tril(n - m)
        return selected
    if attention_mask.dtype == torch.bool:
        return attention_mask & selected
    return attention_mask.masked_fill(~selected, torch.finfo(attention_mask.dtype).min)


class _Prompt(NamedTuple):
    """A call that runs the op (``_prompt``): the keys, values and mask of the whole sequence so far
    ([B, H, n, d], [B, H|1, n, n] or None) and how many of its n tokens come from the cache before
    the call's m = n − cached queries (0: a prompt)."""

    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    cached: int


def _prompt(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
            causal: bool) -> _Prompt | None:
    """The call as a prompt of the op, or None for a call that stays exact (a decoding step: one
    query; a mask this cannot read).

    A prompt: m > 1 queries. Over a dynamic cache its keys are the n ≥ m tokens so far; a static
    cache (``cache_implementation="static"``) hands over all its slots, and the mask forbids every
    slot after the sequence's last token: those are sliced off (the sequence ends after the last key
    any query may attend, and is at least m long). Its prefill without padding comes with no mask
    at all (``causal``: SDPA's ``is_causal``, whose triangle starts at the first key, so the queries
    are the first m tokens). When n > m the queries continue a cached
    sequence (a second turn, a chunked prefill, ``prefill_chunk_size``): they are its last m
    tokens, and the call runs the op over the whole sequence with zero queries in the cached
    positions (their outputs dropped). A mask that is the causal triangle ∧ key padding (what
    decoders build) becomes the op's causal path with the last query's row as key padding, nothing
    n × n built; any other gets rows for the cached positions made from the first new query's row
    cut to the triangle (their outputs are dropped; they decide only which blocks are uniform
    enough to summarise). Each new query keeps its own row, so the op computes what it would in a
    prompt of all n tokens, except that top-k ranks a chunk that straddles the cache by the mean
    of its queries in the call (a zero query scales the mean, not the order). A float mask with
    values other than 0 and forbidden (a bias) stays exact."""
    m, n = query.shape[2], key.shape[2]
    if m < 2 or n < m:
        return None
    if n == m:
        return _Prompt(key, value, attention_mask, 0)
    if attention_mask is None:  # causal: the prefill of a static cache (the slots after m are in the future)
        return _Prompt(key[:, :, :m], value[:, :, :m], None, 0) if causal else None
    if attention_mask.dim() != 4 or attention_mask.shape[2] != m:
        return None

    def allows(mask):
        return mask if mask.dtype == torch.bool else mask > forbidden_threshold(mask.dtype)

    if bool(allows(attention_mask[..., -1]).any()):
        total = n
    else:  # the last slots empty (a static cache): the sequence ends after the last key a query may attend
        columns = allows(attention_mask).flatten(0, 2).any(0).nonzero()
        total = max(m, int(columns[-1]) + 1 if len(columns) else 0)
    cached = total - m
    if cached == 0:
        return _Prompt(key[:, :, :m], value[:, :, :m], attention_mask[..., :m], 0)
    key, value = key[:, :, :total], value[:, :, :total]
    causal_padding, padding = continued_key_padding(attention_mask, total)  # (read once per mask tensor)
    if causal_padding:
        return _Prompt(key, value, padding, cached)  # the triangle ∧ key padding: the op's causal path
    allowed = allows(attention_mask[..., :total])
    if attention_mask.dtype != torch.bool and not bool(((attention_mask[..., :total] == 0) | ~allowed).all()):
        return None  # a bias (a float mask with values other than 0 and forbidden): exact
    before = allowed[..., :1, :] & torch.ones(cached, total, dtype=torch.bool, device=allowed.device).tril_()
    return _Prompt(key, value, torch.cat([before, allowed], dim=2), cached)


def _continues_with_mta(module, config, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                        kwargs: dict) -> bool:
    """Whether a prompt continued over a cache (m queries after p = n − m cached tokens) runs the op
    over the whole sequence: where the m new tokens fill at least one chunk (fewer are decoding, as
    assisted generation's candidates verified over the cache are: exact, as every decoding step)
    and the op has fewer flops (:func:`_op_flops`) than exact attention of the m queries over the n
    keys; else the model's own attention. Exact too: a sliding-window layer (its cache keeps the
    last tokens only, whose positions in the sequence the call does not give), boundary chunks
    whose segments are not known for the whole sequence (a cache the model's hooks did not see
    filled), clustered summaries (non-causal), a position bias (T5's)."""
    segments = getattr(module, "_mta_segments", None)
    n = key.shape[2]
    if segments is not None and (segments.ids is None or segments.ids.shape[1] != n):
        return False
    if isinstance(config, Clustered) or kwargs.get("sliding_window") or kwargs.get("position_bias") is not None:
        return False
    m, d = query.shape[2], query.shape[3]
    config = config.config if isinstance(config, Learned) else config
    groups = config.groups if isinstance(config, HeadGroups) else ((config, range(query.shape[1])),)
    if m < min((cfg.chunk_size for cfg, _ in groups if cfg is not None), default=n + 1):
        return False
    exact = 4.0 * m * n * d
    key_padding = mask is None or mask.shape[-2] == 1  # (else a mask per query: _prompt's general path)
    op = sum(len(heads) * _op_flops(cfg, n, n - m, d, query.device, segments is not None, key_padding)
             for cfg, heads in groups)
    return op < exact * query.shape[1]


def _op_flops(config: MTAConfig | None, n: int, cached: int, d: int, device: torch.device,
              boundary: bool = False, key_padding: bool = True) -> float:
    """Flops per head of the op over n tokens whose first ``cached`` rows are dropped (MTA_SPEC.md's
    cost model; ``boundary``: boundary chunks, about as many as fixed ones; ``key_padding``: no mask
    or key padding, else a mask per query). The rows before the first new query are not computed
    (``attention_autograd``'s ``rows_from``) by whole query chunks of fixed chunks on the CPU and
    on CUDA and of boundary chunks for key padding on CUDA (the Triton kernels), by whole query
    blocks (``ops.varlen``) where the CPU runs those (boundary chunks for key padding; many small
    fixed chunks without top-k, ``ops.varlen.blocks_beat_chunks``); each row left reads its window,
    sinks, top-k chunks (in query blocks, the chunks any query chunk of its block selects: at most
    top_k·(block + c) tokens) and at most every chunk's summary. Elsewhere (boundary chunks in
    padded slots, other devices) every row is computed (``calibration.cost.mta_flops``). None or
    one chunk: exact attention of all n tokens."""
    from .calibration.cost import exact_flops, mta_flops
    from .ops.varlen import blocks_beat_chunks, query_block

    if config is None or config.chunk_size >= n:
        return exact_flops(n, d, True)
    c, L, s, nc = config.chunk_size, config.local_chunks, config.sinks, -(-n // config.chunk_size)
    if device.type == "cpu" and key_padding and (boundary or config.top_k == 0 and blocks_beat_chunks(c, n)):
        block = query_block(c)  # (a block's window range: its own queries and L chunks before them)
        rows, keys = n - cached // block * block, block + c * L + s + nc + config.top_k * (block + c)
    elif (device.type in ("cpu", "cuda") and not boundary) or (device.type == "cuda" and key_padding):
        rows, keys = n - cached // c * c, c * (L + config.top_k) + s + nc
    else:
        return mta_flops(config, n, d, True)
    return 4.0 * d * (rows * min(keys, n) + n)  # (+ the summary pass over k and v)


# the cache layer methods that change keys or values it already holds (beam search's reorder,
# assisted generation's crop, batch selection, reset): each drops the layer's chunk sums first
_LAYER_CHANGES = dict.fromkeys(("reset", "reorder_cache", "crop", "batch_repeat_interleave", "batch_select_indices",
                                 "lazy_initialization"), lambda layer, *args, **kwargs: vars(layer).pop(
                                     "_mta_chunk_sums", None))
# what _before_methods makes methods do first, by the flag it marks an object with
_BEFORE = {"_mta_follows_tokens": _BATCH_CHANGES, "_mta_watched": _LAYER_CHANGES}


def _decode(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling,
            kwargs: dict) -> torch.Tensor | None:
    """A decoding step (one query per sequence) of a layer ``use_mta(..., decode=True)`` planned, by
    ``ops.decode.decode_step`` (head groups: ``grouped_decode_step``): [B, Hq, 1, d], or None where
    it stays exact (the model's own attention): clustered summaries, boundary chunks without the
    whole sequence's segments (a cache the hooks did not see filled), a sliding-window layer, a
    position bias, a mask per head or with a bias, a cache that is not a transformers ``Cache``
    with ``layers`` (or a module without ``layer_idx``), and a step whose window still reaches the
    first token (nothing summarised yet: the step is exact attention). A soft-cap (``softcap``,
    Gemma-2's) caps the step's logits, and learned sink logits (``s_aux``, GPT-OSS's) are one more
    token before the sequence, as the prompt's op takes them (with boundary chunks, the segments
    of that sequence). The mask's one row per sequence says which keys the query may see (None:
    all) and where the sequence ends (a static cache's slots after the last key it allows are
    empty). The chunk sums live on the cache's layer (``_mta_chunk_sums``), dropped by any of
    ``_LAYER_CHANGES`` and rebuilt when their mask, batch or device differ.

    Runs outside torch.compile's graphs (``_DECODE_OUTSIDE_GRAPHS``: the chunk sums are Python
    state, the mask's reading data-dependent). The cache layer that holds ``key`` must be the
    module's (else exact): a compiled frame reused across layers once handed the second layer's
    first decoding step the first layer's module (transformers 5.25, torch 2.13, while use_mta's
    state lived in dicts keyed by the module)."""
    from .ops.decode import grouped_decode_step

    config, weight = getattr(module, "_mta_config", None), None
    if config is None:
        return None  # (a layer the plan leaves exact)
    cache = getattr(getattr(module, "_mta_call", None), "cache", None)
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, (list, tuple)):
        return None
    index = getattr(module, "layer_idx", None)
    if not isinstance(index, int) or not 0 <= index < len(layers) or getattr(module, "_mta_cross", False):
        return None
    # another layer holding the keys: not this call's module; none: a cache handing out copies of
    # its keys (a quantized one's), the module's own index
    if getattr(layers[index], "keys", None) is not key and any(getattr(layer, "keys", None) is key
                                                               for layer in layers):
        return None
    if isinstance(config, Learned):
        config, weight = config.config, config.tensor(query.device)
    segments = getattr(module, "_mta_segments", None)
    if not isinstance(config, (MTAConfig, HeadGroups)):
        return None
    groups = config.groups if isinstance(config, HeadGroups) else ((config, range(query.shape[1])),)
    sink_logit = kwargs.get("s_aux")  # (GPT-OSS's learned sink logits [Hq])
    if kwargs.get("sliding_window") or kwargs.get("position_bias") is not None or kwargs.get("sinks") is not None:
        return None  # (a window, a bias, sink logits per query row: the model's own exact step)
    layer = layers[index]
    if getattr(layer, "is_sliding", False):
        return None
    B, n = query.shape[0], key.shape[2]
    allowed, length = None, n
    if mask is not None:
        row = decode_row(mask, B, query.shape[1], n)  # (once per mask tensor: the layers share it)
        if row is None:
            return None  # (a bias, nothing to see, a mask per head or query)
        allowed, length = row
    bounds = None
    if segments is not None:  # the whole sequence's segments (the hooks saw the cache filled), else exact
        ids = segments.ids
        if ids is None or ids.shape[0] != B or ids.shape[1] < length:
            return None
        bounds = functools.partial(segments.chunk_bounds, sink_token=sink_logit is not None)
    elif all(cfg is None or (length - (sink_logit is None)) // cfg.chunk_size < cfg.local_chunks for cfg, _ in groups):
        return None  # (the window still reaches the first token, a sink logit's one before the sequence: exact)
    _watch_layer(layer)
    out, vars(layer)["_mta_chunk_sums"] = grouped_decode_step(
        query, key, value, allowed, length, groups, scaling, vars(layer).get("_mta_chunk_sums"), weight, bounds,
        float(kwargs.get("softcap") or 0.0),  # (Gemma-2's attn_logit_softcapping, as the prompt's op takes it)
        None if sink_logit is None else sink_logit.detach())
    return out


# torch.compiler.disable(_decode), made by the first use_mta(..., decode=True): not at import, where
# it imported triton.language before a caller could ask for Triton's interpreter (TRITON_INTERPRET,
# read when triton.language is imported: the kernels' tests and gpu_bench.py --dry-run failed)
_DECODE_OUTSIDE_GRAPHS = None


def _watch_layer(layer) -> None:
    """Make each of ``_LAYER_CHANGES`` that ``layer`` (a transformers cache layer) has drop its
    chunk sums before it runs (on this object only). Once per layer."""
    _before_methods(layer, "_mta_watched")


def _segment_ids(module, query: torch.Tensor) -> torch.Tensor | None:
    """Boundary chunks' segment ids [B, n] for a prompt of ``module`` (None without boundaries, or
    with a warning for a prompt over another sequence than the token ids'); a one-line error when
    its model's call gave no token ids."""
    segments = getattr(module, "_mta_segments", None)
    if segments is None:
        return None
    ids, name = segments.ids, segments.boundaries.input
    if ids is None:
        raise ValueError(f"boundary chunks read the segments from the model's {name}, which this call did not give "
                         f"(as token ids [B, n]): call the model with {name}=")
    if tuple(ids.shape) != (query.shape[0], query.shape[2]):
        # another sequence than the token ids' (an encoder-decoder's decoder over its own ids, a
        # prepended token): chunks of chunk_size, as rewrite chunks such sites (passes.lower.sites_apart)
        warnings.warn(f"boundary chunks: {type(module).__name__} attends over {query.shape[2]} tokens of a batch of "
                      f"{query.shape[0]}, another sequence than the model's {name} ({list(ids.shape)}): it chunks by "
                      "chunk_size alone", stacklevel=3)
        return None
    return ids
