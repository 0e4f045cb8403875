"""The Python API: find_attention and rewrite, each an ordered list of named passes.

    capture    model → torch.export program (non-strict, dynamic sequence length)
    unlift     program → GraphModule called exactly like the model
    match      every softmax / SDPA anchor → canonical AttentionMatch (or the reason it is not)
    describe   matches → named AttentionSites
    plan       site name → MTAConfig or exact (one config for all, or a Plan)
    segments   with boundaries: segment ids from the model's token ids, read by every site
    lower      rewritable planned sites → torch.ops.mta.attention
    clean      dead code of the replaced subgraphs removed
    finish     the module: calls bound by parameter name, eval mode, deep copies, device moves (rewritten.py)
"""

from __future__ import annotations

from typing import Any

import torch

from .calls import example_call
from .capture import _first_line, capture
from .config import Boundaries, Clustered, HeadGroups, Learned, MTAConfig, Plan, atomic_write
from .passes.lower import (EXACT, EXACT_CHUNK, add_segment_ids, eliminate_dead_code, lower_match, sites_apart,
                           takes_exact_path)
from .passes.match import find_matches
from .passes.sites import AttentionSite, describe, listed
from .rewritten import finish


def _capture_and_match(model, args, kwargs, dynamic):
    ep = capture(model, args, kwargs, dynamic=dynamic)
    gm = ep.module()
    matches = find_matches(gm.graph)
    return gm, matches, describe(matches)


def find_attention(model: torch.nn.Module, args: Any = (), kwargs: dict | None = None) -> list[AttentionSite]:
    """Every attention subgraph of ``model(*args, **kwargs)``, in graph order.

    Softmaxes that are not attention are reported too (kind "softmax", with the reason), so a
    user can see why something was not rewritten; ``[s for s in sites if s.is_attention]``
    keeps the attention."""
    return _capture_and_match(model, args, kwargs, dynamic=False)[2]


def resolve_plan(sites: list[AttentionSite], config: MTAConfig | None, plan: Plan | None) -> dict[str, MTAConfig | HeadGroups | Learned]:
    """Site name → MTAConfig for the sites to rewrite (rewritable ones only)."""
    if (config is None) == (plan is None):
        raise ValueError("give exactly one of config= (one MTAConfig for every site) or plan= (a Plan)")
    if config is not None:
        if not isinstance(config, (MTAConfig, HeadGroups, Learned, Clustered)):
            raise TypeError(f"config must be an MTAConfig, got {type(config).__name__}")
        return {s.name: config for s in sites if s.rewritable}
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a Plan, got {type(plan).__name__}")
    names = {s.name for s in sites}
    unknown = [name for name in plan if name not in names]
    if unknown:
        attention = [s.name for s in sites if s.is_attention]
        raise ValueError(f"the plan names {len(unknown)} site(s) this model does not have: {listed(unknown)} (a plan "
                         f"made for another model? this one's attention sites: {listed(attention) or 'none'})")
    return {s.name: plan.config_for(s.name) for s in sites if s.rewritable and plan.config_for(s.name) is not None}


def rewrite(
    model: torch.nn.Module,
    args: Any = (),
    kwargs: dict | None = None,
    *,
    config: MTAConfig | None = None,
    plan: Plan | None = None,
    boundaries: Boundaries | None = None,
    dynamic: bool = True,
    lower_exact: bool = True,
) -> torch.fx.GraphModule:
    """A module called exactly like ``model`` in which every planned, rewritable attention site
    calls ``torch.ops.mta.attention``. Sites that are not rewritable stay exact. ``boundaries``
    (or the plan's): boundary chunks, segments ending after separator tokens of the model's
    token ids.

    ``lower_exact``: a rewritable site the plan leaves exact runs the op's exact path (one chunk:
    ``scaled_dot_product_attention`` after the mask is recognised by value, as at MTA sites),
    unless it already is an SDPA call without a mask. Measured on the CPU: hand-written
    softmax(QKᵀ)V, which materialises the n × n scores, is 8–9× slower than SDPA at 2048–4096
    tokens; and transformers' decoders hand every layer a materialised [B, 1, n, n] mask, with which
    SDPA is 1.8× slower than the ``is_causal`` path their eager forward takes (SmolLM2's layer,
    2048 tokens). A query with nothing to attend to outputs zeros there (the op's rule; the
    hand-written form gives NaN). Calibration's costs are relative to this path. False keeps those
    sites as captured.

    The result runs at sequence lengths other than the example's (``dynamic=True``) and can be
    exported again (``torch.export.export``) and saved with ``torch.export.save``. It binds its
    calls as ``model``'s forward does (:mod:`mta_rewrite.calls`): ``fast(ids)`` for a model
    captured as ``model(input_ids=ids, use_cache=False)``; a flag left out takes its captured
    value, one given with another value, or an input the capture did not have, is a ValueError.
    """
    if isinstance(model, torch.export.ExportedProgram) and not args and not kwargs:
        args, kwargs = example_inputs(model)
    args, kwargs = example_call(model, args, kwargs)
    gm, matches, sites = _capture_and_match(model, args, kwargs, dynamic)
    check_not_rewritten(gm, sites, model)
    chosen = resolve_plan(sites, config, plan)
    _warn_left_exact(sites, chosen, plan)
    boundaries = resolve_boundaries(boundaries, plan)
    segments = add_segment_ids(gm, boundaries) if boundaries is not None and chosen else None
    apart = set() if segments is None else sites_apart(segments, [(m, s) for m, s in zip(matches, sites)
                                                                  if s.name in chosen])
    for m, site in zip(matches, sites):
        if site.name in chosen:
            lower_match(gm, m, chosen[site.name], None if site.name in apart else segments)
        elif lower_exact and takes_exact_path(m):
            lower_match(gm, m, EXACT)
    eliminate_dead_code(gm)
    # (mta_sites: what was found, for reports; config: the model's, which pipelines read)
    kept = {"config": model.config} if isinstance(model, torch.nn.Module) and hasattr(model, "config") \
        and "config" not in gm._modules else {}
    return finish(gm, (args, kwargs), mta_sites=sites, mta_plan=chosen, mta_boundaries=boundaries, **kept)


def _warn_left_exact(sites: list[AttentionSite], chosen: dict, plan: Plan | None) -> None:
    """Warn when what was asked for is not done: a site the plan gives a configuration that is not
    rewritable, or (one configuration for every site) attention found but none of it rewritable,
    each with the reason (a model left in training mode, cross-attention, …). Other sites that
    stay exact are the documented rule, reported by ``find_attention``."""
    import warnings

    if plan is not None:
        left = [s for s in sites if plan.config_for(s.name) is not None and not s.rewritable]
    else:
        attention = [s for s in sites if s.is_attention]
        left = attention if attention and not chosen else []
    if left:
        shown = "; ".join(f"{s.name}: {s.reason}" for s in left[:3]) + ("; …" if len(left) > 3 else "")
        warnings.warn(f"{len(left)} attention site(s) asked for MTA left exact ({shown})", stacklevel=3)


def check_not_rewritten(module: torch.nn.Module, sites: list[AttentionSite], model=None) -> None:
    """A model whose attention already calls the op, with none left to rewrite, is an error: its
    op calls are not sites (their configuration cannot change), so rewriting it again would change
    nothing and say it did. (``model``: the one captured; after ``use_mta`` the error says so.)"""
    if any(s.rewritable for s in sites):
        return
    done = len(_op_nodes(module))
    if done:
        from .interface import NAMES

        if getattr(getattr(model, "config", None), "_attn_implementation", None) in NAMES.values():
            raise ValueError(f"the model runs MTA through use_mta: {done} site(s) call mta.attention and no attention "
                             "is left to rewrite (model.set_attn_implementation(\"sdpa\") or \"eager\" undoes "
                             "use_mta)")
        raise ValueError(f"the model is already rewritten: {done} site(s) call mta.attention and no attention is "
                         "left to rewrite (to change their configuration, rewrite the original model)")


def resolve_boundaries(boundaries: Boundaries | None, plan: Plan | None) -> Boundaries | None:
    """The boundaries given, or the plan's; both, when they differ, is an error."""
    if boundaries is not None and not isinstance(boundaries, Boundaries):
        raise TypeError(f"boundaries must be a Boundaries, got {type(boundaries).__name__}")
    planned = plan.boundaries if plan is not None else None
    if boundaries is not None and planned is not None and boundaries != planned:
        raise ValueError(f"the plan says {planned} but boundaries= says {boundaries}: give one")
    return boundaries if boundaries is not None else planned


# files saved in the program's archive: the modules that define the custom operators it calls;
# a rewritten module's plan (what ``rewrite`` set as ``mta_plan`` and ``mta_boundaries``) and the
# sites it found (``mta_sites``: AttentionSite.to_dict each)
OP_MODULES_FILE = "mta_rewrite/custom_op_modules.json"
PLAN_FILE = "mta_rewrite/plan.json"
SITES_FILE = "mta_rewrite/sites.json"


def save_program(module: torch.nn.Module, path, args: Any = (), kwargs: dict | None = None, *, dynamic: bool = True):
    """Export ``module`` (e.g. a rewritten model) and save it with ``torch.export.save``,
    atomically: a temporary file in the same folder, renamed into place when complete. The archive
    also names the modules that define the custom operators the program calls (``torch.library``
    ops outside torch, e.g. transformers' ``grouped_mm_fallback`` in mixture-of-experts layers),
    which :func:`load_program` imports first, and holds a rewritten module's plan and report (its
    ``mta_plan``, ``mta_boundaries`` and ``mta_sites``), which :func:`load_module` gives back."""
    import json

    ep = capture(module, args, kwargs, dynamic=dynamic)
    extra = {OP_MODULES_FILE: json.dumps(custom_op_modules(ep))}
    chosen = getattr(module, "mta_plan", None)
    if isinstance(chosen, dict):
        extra[PLAN_FILE] = json.dumps(Plan(chosen, boundaries=getattr(module, "mta_boundaries", None)).to_dict())
    sites = getattr(module, "mta_sites", None)
    if isinstance(sites, list) and all(isinstance(site, AttentionSite) for site in sites):
        extra[SITES_FILE] = json.dumps([site.to_dict() for site in sites])
    atomic_write(path, lambda tmp: torch.export.save(ep, tmp, extra_files=extra))
    return ep


def custom_op_modules(ep: torch.export.ExportedProgram) -> list[str]:
    """The modules that define the custom operators (``torch.library.custom_op``, outside torch)
    that the program's graphs call: a process must import them before it can load the program
    (torch.export.load fails on an operator no module has registered)."""
    from torch._library.custom_ops import OPDEFS

    modules = set()
    for gm in ep.graph_module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
                opdef = OPDEFS.get(node.target._schema.name)
                module = getattr(getattr(opdef, "_init_fn", None), "__module__", None)
                if module and module.split(".")[0] != "torch":
                    modules.add(module)
    return sorted(modules)


def _saved_extra(path, *files: str) -> list[Any]:
    """What :func:`save_program` wrote as each of ``files`` in the archive at ``path`` (JSON), each
    None where it is not there; all None for a file that is not such an archive (torch.export.load
    says what it is). A file that is not readable JSON: None. The archive is opened once."""
    import json
    import zipfile

    found: list[Any] = [None] * len(files)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            for i, file in enumerate(files):
                name = next((n for n in names if n.endswith("/extra/" + file)), None)
                try:
                    found[i] = json.loads(archive.read(name)) if name is not None else None
                except ValueError:
                    pass
    except (zipfile.BadZipFile, OSError):
        pass
    return found


def _import_op_modules(path) -> None:
    """Import the modules a program saved by :func:`save_program` names for its custom operators
    (nothing for another archive); a one-line error for one that does not import here."""
    import importlib

    (modules,) = _saved_extra(path, OP_MODULES_FILE)
    for module in modules if isinstance(modules, list) else []:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001  (whatever the module raises on import)
            raise ValueError(f"{path} calls custom operators defined in {module}, which does not import here "
                             f"({type(exc).__name__}: {_first_line(exc)[:200]}): install what it needs") from None


def load_program(path, device: torch.device | str | None = None) -> torch.export.ExportedProgram:
    """``torch.export.load`` with a one-line error for a missing or foreign file; ``device``: the
    program moved there (parameters, buffers, constants and the devices its graph names;
    ``torch.export.passes.move_to_device_pass``).

    A program's inputs and outputs may be classes that their own module registers with torch's
    pytree when it is imported (transformers' ``ModelOutput`` classes, e.g. a language model's
    ``CausalLMOutputWithPast``): torch.export.load cannot rebuild them in a process that has not
    imported that module, so the module the saved type name points to is imported and the load
    tried again."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    _import_op_modules(path)
    imported: set[str] = set()
    while True:
        ep, failure = _try_load(path)
        if ep is not None:
            break
        exc, logged = failure
        if "cuda" in str(exc).lower() and not torch.cuda.is_available():
            # torch.export.load puts every tensor back on the device it was saved from
            raise ValueError(f"{path} holds tensors saved on a CUDA device and this machine has none: load it on a "
                             "GPU machine, or move it to the CPU there (torch.export.passes.move_to_device_pass) "
                             "and save it again") from None
        op = _unresolved_operator(logged)
        if op is not None:
            raise ValueError(f"{path} calls {op}, a custom operator that no module has registered in this process: "
                             "import the module that defines it before loading (programs saved by mta-rewrite name "
                             "it and have it imported)") from None
        type_name = _unregistered_pytree_type(logged)
        if type_name is None:
            raise ValueError(f"{path} is not a program saved with torch.export.save ({type(exc).__name__})") from None
        module = _import_for_type(type_name)
        if module is None or module in imported:
            raise ValueError(f"{path}: its inputs or outputs include a {type_name}, which no importable module "
                             "registers with torch's pytree here: import the module that defines it (and registers "
                             "it, e.g. torch.export.register_dataclass) before loading") from None
        imported.add(module)
    if device is None:
        return ep
    from torch.export.passes import move_to_device_pass

    try:
        return move_to_device_pass(ep, torch.device(device))
    except Exception as exc:  # noqa: BLE001
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(f"could not move {path} to {device}: {type(exc).__name__}: {reason}") from None


def load_module(path, device: torch.device | str | None = None) -> torch.fx.GraphModule:
    """The module of a program saved with :func:`save_program` (or the CLI's ``capture`` and
    ``rewrite``), as :func:`rewrite` returns one: calls bound by parameter name (``fast(ids)`` for
    a program captured as ``model(input_ids=ids, use_cache=False)``; ``ep.module()`` takes exactly
    the captured call's structure), in eval mode, deep-copying and moving with ``.to(device)``
    (:mod:`mta_rewrite.rewritten`); with ``mta_plan``, ``mta_boundaries`` and ``mta_sites`` where
    the program was saved from a rewritten module. ``device``: as for :func:`load_program`."""
    ep = load_program(path, device)
    attributes = {}
    saved, sites = _saved_extra(path, PLAN_FILE, SITES_FILE)
    if isinstance(saved, dict):
        try:
            plan = Plan.from_dict(saved)
        except (TypeError, ValueError):  # (written by another version: the module runs without it)
            plan = None
        if plan is not None:
            attributes = dict(mta_plan={name: plan.config_for(name) for name in plan}, mta_boundaries=plan.boundaries)
    if isinstance(sites, list):
        try:
            attributes["mta_sites"] = [AttentionSite(**site) for site in sites]
        except TypeError:  # (written by another version: the module runs without its report)
            pass
    return finish(ep.module(), getattr(ep, "example_inputs", None), **attributes)


def _try_load(path):
    """(program, None), or (None, (the exception, the exceptions torch logged on the way)):
    torch.export.load logs why deserialising failed and then raises a generic RuntimeError; the
    log is kept (the reason is in it) and not printed (our error is one line)."""
    import logging

    logged: list[BaseException] = []

    class _Keep(logging.Handler):
        def emit(self, record):
            if record.exc_info and record.exc_info[1] is not None:
                logged.append(record.exc_info[1])

    export_log = logging.getLogger("torch.export")
    level, propagate, handlers = export_log.level, export_log.propagate, export_log.handlers
    disabled = logging.root.manager.disable  # a script's logging.disable(WARNING) would hide the reason
    # only our handler (torch's logging puts handlers of its own on this logger), no propagation
    export_log.setLevel(logging.WARNING)
    export_log.propagate = False
    export_log.handlers = [_Keep()]
    logging.disable(logging.NOTSET)
    try:
        return torch.export.load(str(path)), None
    except Exception as exc:  # noqa: BLE001  (zip, pickle and schema errors all mean "not a program")
        return None, (exc, logged)
    finally:
        logging.disable(disabled)
        export_log.handlers, export_log.propagate = handlers, propagate
        export_log.setLevel(level)


def _found_in(errors: list[BaseException], pattern: str) -> str | None:
    """The first group of ``pattern`` in the messages of the exceptions (or their causes), if any."""
    import re

    for exc in errors:
        while exc is not None:
            found = re.search(pattern, str(exc))
            if found:
                return found.group(1)
            exc = exc.__cause__ or exc.__context__
    return None


def _unregistered_pytree_type(errors: list[BaseException]) -> str | None:
    """The serialized type name of "Deserializing NAME in pytree is not registered", if any."""
    return _found_in(errors, r"Deserializing (\S+) in pytree is not registered")


def _unresolved_operator(errors: list[BaseException]) -> str | None:
    """The operator of "We failed to resolve torch.ops.NS.OP.OVERLOAD to an operator", if any."""
    return _found_in(errors, r"failed to resolve (torch\.ops\.[\w.]+?)(?:\.default)? to an operator")


def _import_for_type(type_name: str) -> str | None:
    """Import the longest module prefix of a dotted type name (``a.b.C`` → ``a.b``, else ``a``);
    the module imported, or None."""
    import importlib

    parts = type_name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:end])
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001  (not a module, or one that fails to import: try a shorter one)
            continue
        return module
    return None


def example_inputs(program: torch.export.ExportedProgram) -> tuple[tuple, dict]:
    """The example inputs a saved program carries, needed to capture it again after a rewrite."""
    inputs = getattr(program, "example_inputs", None)
    if inputs is None:
        raise ValueError("the saved program carries no example inputs; save it with torch.export.save from torch ≥ 2.5")
    return inputs


def count_mta_nodes(module: torch.nn.Module) -> int:
    """How many sites of a rewritten module (or exported program) run MTA: mta.attention calls,
    plus per-head-group sites of a module not yet exported again (one call each); not the exact
    sites that call the op with one chunk (``rewrite(lower_exact=True)``, see
    :func:`count_exact_nodes`)."""
    return sum(1 for n in _op_nodes(module) if n.kwargs.get("chunk_size", 0) < EXACT_CHUNK)


def count_exact_nodes(module: torch.nn.Module) -> int:
    """How many sites of a rewritten module call the op with one chunk (exact attention)."""
    return sum(1 for n in _op_nodes(module) if n.kwargs.get("chunk_size", 0) >= EXACT_CHUNK)


def _op_nodes(module: torch.nn.Module) -> list:
    from .passes.lower import grouped_attention

    graph = module.graph_module.graph if hasattr(module, "graph_module") else module.graph
    targets = (torch.ops.mta.attention.default, grouped_attention)
    return [n for n in graph.nodes if n.op == "call_function" and n.target in targets]
