"""A switchable copy of the model: every rewritable site can be exact or any MTA configuration,
and can record what flows into it, without capturing the model again.

Each site is lowered to :func:`site_hook` with its original subgraph kept (see
``passes.lower.lower_match_to_hook``). "Exact" at a site is what the rewritten model runs there when
the plan leaves it exact (``rewrite(lower_exact=True)``, the default): the op's exact path (one
chunk: SDPA after the mask is recognised by value) at every site ``passes.lower.takes_exact_path``
names, and the original subgraph, bit for bit, at the others (SDPA calls without a mask) or with
``Probe(lower_exact=False)``. The original subgraphs of exact-path sites are then not run by the
cursors below; hand-written softmax(QKᵀ)V, which materialises the n × n scores, is several times
slower than SDPA on the CPU, and with a materialised causal mask SDPA is 1.8× slower than the
``is_causal`` path (see ``rewrite``): calibrating SmolLM2 with eager attention at 2048 tokens took
1041 s with the original subgraphs, 875 s so, the same plan (``bench_calibration_smollm2.py --attn
eager``). The two exacts differ by rounding (5e-6 on MiniLM's hidden
states, 2e-4 on SmolLM2's logits of scale 47: ``benchmarks/bench_exact_sites.py``).

Three ways to run it: :meth:`Probe.run`, a whole forward pass with a fixed configuration per site
(every site's exact attention computed, then replaced, and able to record); :meth:`Probe.forward`,
the same pass without computing what only an MTA site's original output needs (verification);
and :class:`Cursor`, a forward pass executed node by node (the captured graph's own nodes: the
same operators in the same order) that stops at each site, lets the caller choose what the site
returns, and can be forked there. The search walks the tree of upstream plans with cursors, so a
layer that several plans share is computed once instead of once per plan (see ``search``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch.fx._pytree import tree_flatten_spec
from torch.utils import _pytree as pytree

from ..calls import Call, CallSignature, as_call
from ..capture import capture
from ..config import Boundaries, Clustered, HeadGroups, Learned, MTAConfig
from ..ops.attention import attention_autograd
from ..passes.lower import (EXACT, add_segment_ids, drop_sink_token, eliminate_dead_code, grouped_attention,
                            lower_match_to_hook, sink_logit_operands, sink_token_segments, sites_apart,
                            takes_exact_path, with_sink_token)
from ..passes.match import find_matches
from ..passes.sites import AttentionSite, describe


@dataclass
class SiteRecord:
    """What flowed through one site on one sample: canonical operands and the exact output."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    causal: bool
    scale: float | None
    exact: torch.Tensor
    segment_ids: torch.Tensor | None = None  # boundary chunks' segment ids, if the probe has boundaries
    sink_logits: torch.Tensor | None = None  # the site's learned sink logits (GPT-OSS), if it has them
    softcap: float = 0.0  # the site's tanh soft-cap (Gemma-2), the op's ``softcap``; 0: none


@dataclass
class ProbeState:
    configs: dict[str, MTAConfig] = field(default_factory=dict)  # sites not named run exact
    exact_path: frozenset = frozenset()  # sites whose exact output is the op's exact path, not the original
    record: set[str] = field(default_factory=set)
    records: dict[str, list[SiteRecord]] = field(default_factory=dict)


_ACTIVE: list[ProbeState] = []


def site_hook(original, q, k, v, mask, name, causal, scale, segment_ids=None, sink_logits=None, softcap=0.0):
    """Called from the probe graph at every site: exact (the original output, or the op's exact
    path at the active state's ``exact_path`` sites) or MTA."""
    state = _ACTIVE[-1] if _ACTIVE else None
    if state is None:
        return original
    if name in state.exact_path:
        original = exact_output(q, k, v, mask, causal, scale, original.dtype, sink_logits, softcap)
    if name in state.record:
        record = SiteRecord(q.detach(), k.detach(), v.detach(), None if mask is None else mask.detach(), causal, scale,
                            original.detach(), segment_ids, None if sink_logits is None else sink_logits.detach(),
                            softcap)
        state.records.setdefault(name, []).append(record)
    return site_output(state.configs.get(name), original, q, k, v, mask, causal, scale, segment_ids=segment_ids,
                       sink_logits=sink_logits, softcap=softcap)


def site_output(config, original, q, k, v, mask, causal, scale, dtype: torch.dtype | None = None, weight=None,
                segment_ids=None, autograd: bool = False, sink_logits=None, rows_from: int = 0, softcap: float = 0.0):
    """What a site returns under ``config`` (None: exact, the original output), in the original
    output's dtype (``dtype`` when the original was not computed). ``weight``: a learned summary
    weight for an MTAConfig or HeadGroups (a tensor: calibration fits it through this call); a
    ``Learned`` config carries its own. ``segment_ids``: boundary chunks. ``autograd``: computed by
    ``ops.attention.attention_autograd`` (the same values; cheaper to differentiate on the CPU).
    ``sink_logits``: the site's learned sink logits (GPT-OSS), given to the op as the rewritten
    model gives them, one more token it attends exactly (``passes.lower.sink_logit_operands``).
    ``rows_from``: the caller reads the output's rows from that query on only (``use_mta`` on a
    prompt continued over a cache); the op's implementation may leave the rows before it uncomputed
    (``attention_autograd``'s). ``softcap``: the site's tanh soft-cap (Gemma-2), the op's."""
    if config is None:
        return original
    dtype = original.dtype if original is not None else dtype
    if sink_logits is not None:
        scale = q.shape[-1] ** -0.5 if scale is None else scale  # q's own 1/√d, before q grows a dimension
        q, k, v, mask = sink_logit_operands(q, k, v, mask, sink_logits, scale)
        weight = None if weight is None else torch.nn.functional.pad(weight, (0, 1))  # (as with_sink_token pads it)
        segment_ids = None if segment_ids is None else sink_token_segments(segment_ids)
        return drop_sink_token(site_output(with_sink_token(config), None, q, k, v, mask, causal, scale, dtype, weight,
                                           segment_ids, autograd, rows_from=rows_from + 1 if rows_from else 0,
                                           softcap=softcap))
    if isinstance(config, Learned):
        config, weight = config.config, config.tensor(q.device)
    if isinstance(config, Clustered):
        return torch.ops.mta.attention(q, k, v, mask, None, None, config.tensor(q.device), causal=causal, scale=scale,
                                       softcap=softcap, **config.config.op_kwargs()).to(dtype)
    attend = attention_autograd if autograd else torch.ops.mta.attention
    if rows_from:
        attend = functools.partial(attention_autograd, rows_from=rows_from)
    if isinstance(config, HeadGroups):
        return grouped_attention(q, k, v, mask, config.op_groups(), causal, scale, weight, segment_ids,
                                 attend, softcap).to(dtype)
    return attend(q, k, v, mask, weight, segment_ids, causal=causal, scale=scale, softcap=softcap,
                  **config.op_kwargs()).to(dtype)


def exact_output(q, k, v, mask, causal, scale, dtype: torch.dtype, sink_logits=None,
                 softcap: float = 0.0) -> torch.Tensor:
    """A site's exact output as the rewritten model computes it where the plan leaves the site
    exact: the op with one chunk (``passes.lower.EXACT``), in ``dtype`` (``sink_logits``: with
    them, as one more token; ``softcap``: the site's soft-cap)."""
    return site_output(EXACT, None, q, k, v, mask, causal, scale, dtype, sink_logits=sink_logits, softcap=softcap)


@contextlib.contextmanager
def active(state: ProbeState):
    _ACTIVE.append(state)
    try:
        yield state
    finally:
        _ACTIVE.pop()


class Probe:
    """The model captured once, every rewritable site routed through :func:`site_hook`
    (``boundaries``: every MTA configuration with boundary chunks, the segment ids computed in the
    graph as the rewritten model computes them). ``lower_exact``: a site left exact gives the
    op's exact path where ``rewrite(lower_exact=True)`` would run it (see the module's docstring);
    False: the original subgraph everywhere, as ``rewrite(lower_exact=False)`` keeps it."""

    def __init__(self, model: torch.nn.Module, args: tuple, kwargs: dict, boundaries: Boundaries | None = None,
                 lower_exact: bool = True):
        ep = capture(model, args, kwargs, dynamic=True)
        self.module = ep.module()
        # a saved program is called as it was captured (its example inputs); a module as the first sample
        example = getattr(ep, "example_inputs", None) if ep is model else (tuple(args), dict(kwargs))
        self.signature = CallSignature(self.module, example)
        self.boundaries = boundaries
        matches = find_matches(self.module.graph)
        self.sites: list[AttentionSite] = describe(matches)
        segments = add_segment_ids(self.module, boundaries) if boundaries is not None else None
        apart = set() if segments is None else sites_apart(segments, [(m, s) for m, s in zip(matches, self.sites)
                                                                      if s.rewritable])
        for m, site in zip(matches, self.sites):
            if site.rewritable:
                lower_match_to_hook(self.module, m, site.name, site_hook, None if site.name in apart else segments)
        eliminate_dead_code(self.module)
        self.rewritable = [s for s in self.sites if s.rewritable]
        self.exact_path = frozenset(s.name for m, s in zip(matches, self.sites) if lower_exact and takes_exact_path(m))
        self._program = None

    def run(self, sample: Any, configs: dict[str, MTAConfig] | None = None, record: set[str] | None = None):
        """One forward pass with ``configs`` (site → MTAConfig; others exact); returns
        (output, records)."""
        args, kwargs = as_call(self.bind(sample))
        state = ProbeState(dict(configs or {}), self.exact_path, set(record or ()))
        with active(state), torch.no_grad():
            out = self.module(*args, **kwargs)
        release_freed_memory()
        return out, state.records

    @property
    def program(self) -> "_Program":
        if self._program is None:
            self._program = _Program(self.module, self.exact_path)
        return self._program

    def bind(self, sample: Any, index: int | None = None) -> "Call":
        """``sample`` as a call of the captured model (see :class:`CallSignature`); ``index``: the
        sample's position, named in the error when it does not fit."""
        return self.signature.bind(sample, index)

    def cursor(self, sample: Any) -> "Cursor":
        """A forward pass on ``sample``, to be run site by site (see :class:`Cursor`)."""
        return Cursor(self.program, self.bind(sample))

    def forward(self, sample: Any, configs: dict[str, MTAConfig] | None = None):
        """The model's output with ``configs`` (site → MTAConfig or HeadGroups; others exact), as
        :meth:`run` gives it, bit for bit, but without computing the original subgraph of a site
        that runs MTA (:meth:`run` computes every site's exact attention and then replaces it).
        Verifying a plan end to end costs what the rewritten model costs: on SmolLM2 at 1024
        tokens exact attention is 23% of a forward pass."""
        return self.program.forward(self.bind(sample), dict(configs or {}))


@dataclass
class SiteCall:
    """A forward pass stopped at a site: the site's name and what flows into it (``record.exact``
    is the site's exact output there; None where the cursor did not compute it, ``dtype`` then
    says its dtype)."""

    name: str
    record: SiteRecord
    dtype: torch.dtype | None = None

    def output(self, config) -> torch.Tensor:
        """What the site returns under ``config`` (None: exact), as in the probe graph."""
        r = self.record
        if config is None and r.exact is None:  # an exact-path site a verifying pass had not computed
            r.exact = exact_output(r.q, r.k, r.v, r.mask, r.causal, r.scale, self.dtype, r.sink_logits, r.softcap)
        return site_output(config, r.exact, r.q, r.k, r.v, r.mask, r.causal, r.scale, self.dtype,
                           segment_ids=r.segment_ids, sink_logits=r.sink_logits, softcap=r.softcap)


class _Program:
    """The probe graph as a list of nodes: what to free after each node, where the sites are, and
    which nodes no pass runs (``skip``: the original subgraphs of the ``exact_path`` sites)."""

    def __init__(self, gm: torch.fx.GraphModule, exact_path: frozenset = frozenset()):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.interpreter = torch.fx.Interpreter(gm, garbage_collect_values=False)
        last_use: dict = {}
        for i, node in enumerate(self.nodes):
            for used in node.all_input_nodes:
                last_use[used] = i
        self.free_after: list[list] = [[] for _ in self.nodes]
        for i, node in enumerate(self.nodes):
            if node.op != "output":  # a value nothing reads is dropped as soon as it is computed
                self.free_after[last_use.get(node, i)].append(node)
        self.placeholders = [node for node in self.nodes if node.op == "placeholder"]
        sites = [i for i, node in enumerate(self.nodes) if _is_site(node)]
        self.end = sites[-1] + 1 if sites else 0  # what follows the last site is not needed
        self.exact_only = {self.nodes[i]: _exact_only(self.nodes[i]) for i in sites}
        self.exact_path = exact_path
        self.skip = frozenset().union(*(only.nodes for site, only in self.exact_only.items()
                                        if only is not None and site.args[5] in exact_path))

    def forward(self, sample: Any, configs: dict) -> Any:
        """One whole forward pass (see :meth:`Probe.forward`): a :class:`Cursor` that skips the
        nodes only an MTA site's original output needs, run to the end."""
        skip: set = set()
        for site, only in self.exact_only.items():
            if configs.get(site.args[5]) is not None and only is not None:
                skip |= only.nodes
        cursor = Cursor(self, sample, skip=frozenset(skip), lazy_exact=True)
        while (call := cursor.advance()) is not None:
            cursor.resume(call.output(configs.get(call.name)))
        return cursor.finish()

    def inputs(self, sample: Any) -> list:
        """The sample's tensors in the order of the graph's placeholders (as the module's forward
        flattens them)."""
        flat = list(tree_flatten_spec(as_call(sample), self.gm._in_spec))
        if len(flat) != len(self.placeholders):
            raise ValueError(f"the sample gives {len(flat)} inputs, the captured model takes {len(self.placeholders)}")
        return flat


def _is_site(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is site_hook


class _ExactOnly(NamedTuple):
    """The nodes a site's original output alone needs, and that output's dtype."""

    nodes: frozenset
    dtype: torch.dtype


def _exact_only(site: torch.fx.Node) -> _ExactOnly | None:
    """The nodes computed only for ``site``'s original output: its subgraph (scores, softmax,
    casts, the product with v) and the export's metadata assertions on those values; not q, k, v
    or the mask, which the MTA op reads too, nor anything another node uses. None if the original
    output's dtype is unknown (no export metadata): such a site is then always computed."""
    original = site.args[0]
    val = _meta_val(original)
    if val is None:
        return None
    ancestors, todo = set(), [original]
    while todo:
        node = todo.pop()
        if node not in ancestors:
            ancestors.add(node)
            todo.extend(node.all_input_nodes)
    only = {node for node in ancestors if node.op == "call_function"}
    asserts = {user for node in only for user in node.users if _is_assertion(user)}
    only |= asserts
    changed = True
    while changed:  # the largest set closed under "every user is in it" (an assertion: every input)
        changed = False
        for node in list(only):
            if node in asserts:
                needed = all(i in only for i in node.all_input_nodes)
            else:  # q, k, v and the mask fail here: the site reads them as operands
                needed = all((user is site and node is original) or user in only for user in node.users)
            if not needed:
                only.discard(node)
                changed = True
    return _ExactOnly(frozenset(only), val.dtype)


def _is_assertion(node: torch.fx.Node) -> bool:
    """An assertion torch.export adds about a value (its dtype, device, …): it returns nothing."""
    return node.op == "call_function" and not node.users and str(node.target).startswith("aten._assert")


_LAYOUT_TARGETS = (torch.ops.aten.unsqueeze.default, torch.ops.aten.unflatten.int, torch.ops.aten.permute.default)


def _meta_val(node: torch.fx.Node):
    """The example value torch.export recorded for ``node`` (through the unsqueeze or unflatten
    the lowering adds for a 3-D site, the permute for an einsum's output order), or None. Only its
    dtype is read."""
    val = node.meta.get("val")
    while val is None and node.op == "call_function" and node.target in _LAYOUT_TARGETS \
            and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
        val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


class Cursor:
    """One sample's forward pass through the probe graph, run node by node and stopped at each
    site. :meth:`advance` runs up to the next site and returns its :class:`SiteCall` (None after
    the last site: what follows it is not run); :meth:`resume` gives the site's output and moves
    past it; :meth:`fork` copies the pass where it stands, so two choices at a site share all that
    was computed before it; :meth:`finish` runs the rest and returns the model's output. Each
    value is freed after its last use, as the compiled forward does. ``skip``: nodes not to run
    (the original subgraphs of sites whose output will be MTA's, see :meth:`Probe.forward`), besides
    the program's own (exact-path sites). ``lazy_exact``: an exact-path site's exact output is
    computed when :meth:`SiteCall.output` asks for it, not when the cursor stops there."""

    def __init__(self, program: _Program, sample: Any = None, *, skip: frozenset = frozenset(),
                 lazy_exact: bool = False, _env: dict | None = None, _pos: int = 0):
        self.program = program
        self.skip = skip | program.skip
        self.lazy_exact = lazy_exact
        self.pos = _pos
        if _env is not None:
            self.env = _env
            return
        self.env = dict(zip(program.placeholders, program.inputs(sample)))  # the graph's inputs, where they stand

    def _step_past(self, count: int) -> None:
        for _ in range(count):
            for node in self.program.free_after[self.pos]:
                self.env.pop(node, None)
            self.pos += 1

    def _run(self, stop: int) -> SiteCall | None:
        """Runs the nodes before ``stop`` up to the next site: that site's call, or None."""
        program = self.program
        interpreter = program.interpreter
        interpreter.env = self.env
        try:
            with torch.no_grad():
                while self.pos < stop:
                    node = program.nodes[self.pos]
                    if _is_site(node):
                        return self._call(node)
                    if node.op != "placeholder" and node not in self.skip:
                        self.env[node] = interpreter.run_node(node)
                    self._step_past(1)
            return None
        finally:
            interpreter.env = {}

    def _call(self, site: torch.fx.Node) -> SiteCall:
        q, k, v, mask, name, causal, scale, segment_ids, sink_logits, softcap = (
            self.env[a] if isinstance(a, torch.fx.Node) else a for a in site.args[1:])
        if sink_logits is not None:  # (a parameter read as it is, which requires grad: not what was computed)
            sink_logits = sink_logits.detach()
        original = None if site.args[0] in self.skip else self.env[site.args[0]]
        only = self.program.exact_only[site]
        dtype = original.dtype if original is not None else None if only is None else only.dtype
        if name in self.program.exact_path and not (original is None and self.lazy_exact):
            original = exact_output(q, k, v, mask, causal, scale, dtype, sink_logits, softcap)
        return SiteCall(name, SiteRecord(q, k, v, mask, causal, scale, original, segment_ids, sink_logits, softcap),
                        dtype)

    def advance(self) -> SiteCall | None:
        return self._run(self.program.end)

    def resume(self, value: torch.Tensor) -> None:
        """The output of the site :meth:`advance` stopped at; moves past it."""
        if self.pos >= self.program.end or not _is_site(self.program.nodes[self.pos]):
            raise RuntimeError("resume() is only valid at a site where advance() stopped")
        self.env[self.program.nodes[self.pos]] = value
        self._step_past(1)

    def fork(self) -> "Cursor":
        return Cursor(self.program, skip=self.skip, lazy_exact=self.lazy_exact, _env=dict(self.env), _pos=self.pos)

    def finish(self) -> Any:
        """Runs what follows the last site (after :meth:`advance` returned None) and returns the
        model's output, as the captured module returns it."""
        program = self.program
        output = program.nodes[-1]  # an fx graph ends with its output node
        if self._run(len(program.nodes) - 1) is not None:
            raise RuntimeError("finish() is only valid past the last site")
        interpreter = program.interpreter
        interpreter.env = self.env
        try:
            out = interpreter.run_node(output)
        finally:
            interpreter.env = {}
        spec = getattr(program.gm, "_out_spec", None)
        return out if spec is None else pytree.tree_unflatten(list(out), spec)


def fit_in_layer_order(probe: "Probe", samples: list, configs: dict, fit, advance=None) -> tuple[dict, dict]:
    """Sites visited in layer order on ``samples`` (cursors: each site sees what flows into it
    with the upstream sites already fitted, as the rewritten model would give it). At a site
    whose configuration (``configs``; others exact) is not None, ``fit(name, config, records)``
    (``config`` without any earlier fit: a ``Learned`` or ``Clustered`` one is taken back to its
    configuration) returns (the site's choice, a record of the fit or None); the site's output
    under that choice goes downstream. Returns (site → choice, site → fit record).
    ``advance`` is called once per site."""
    cursors = [probe.cursor(s) for s in samples]
    chosen: dict = {}
    fits: dict = {}
    while True:
        calls = [c.advance() for c in cursors]
        if calls[0] is None:
            break
        name = calls[0].name
        choice = configs.get(name)
        if isinstance(choice, (Learned, Clustered)):
            choice = choice.config
        if choice is not None:
            choice, record = fit(name, choice, [call.record for call in calls])
            if record is not None:
                fits[name] = record
            chosen[name] = choice
        with torch.no_grad():
            for cursor, call in zip(cursors, calls):
                cursor.resume(call.output(choice))
        if advance is not None:
            advance()
    del cursors
    release_freed_memory()
    return chosen, fits


def release_freed_memory() -> None:
    """Hand the C heap's free memory back to the system (glibc's ``malloc_trim``; elsewhere
    nothing). PyTorch's CPU tensors live on malloc's heap; after forward passes with tensors of
    many sizes, glibc keeps what was freed, fragmented, and a search that runs hundreds of passes
    grew by gigabytes that no tensor held (real SmolLM2, 4 × 256 tokens: 3.4 GB resident after
    10 recording passes, 5.1 GB after 120, with 0.41 GB of live tensors throughout; 1.5 GB flat
    with a trim after each). A trim costs about a millisecond."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; musl has none
    except (OSError, AttributeError):
        return None


