"""The module ``rewrite`` returns, as an nn.Module a user keeps, copies and moves.

``rewrite`` unlifts a torch.export program into a GraphModule (``ExportedProgram.module()``). As
torch hands it over, that module

- refuses ``eval()`` and ``train()`` alike (torch: "Calling eval() is not supported yet."), though
  it computes what the model computed in eval mode when it was captured, and says ``training``
  is True;
- loses, when copied (``copy.deepcopy``, ``copy.copy``), the forward pre-hook that binds its calls by parameter name
  (:mod:`mta_rewrite.calls`) and the attributes ``rewrite`` sets (``copy.deepcopy(fast)(ids)``:
  "forward() missing 1 required positional argument: 'use_cache'");
- moves its parameters with ``.to("cuda")`` but not the devices its graph names (``arange``,
  ``zeros``, the metadata checks torch.export inserts), so the moved module fails at its first
  call ("Tensor device mismatch"); a dtype change fails the same way ("Tensor dtype mismatch!
  Expected: Float, Got: double").

:func:`finish` makes it behave: ``eval()`` / ``train(False)`` are what it is (``training`` False),
``train()`` is a one-line error saying why; a copy, deep or shallow, binds its calls and keeps the
attributes;
``to(device)`` / ``cuda()`` / ``cpu()`` move the graph's devices with the tensors (the rule of
``torch.export.passes.move_to_device_pass``, applied to the module); a dtype change is a one-line
error before anything moves (the graph casts to and checks the dtypes it was captured in, and its
constants were computed in them: rewrite the model in the dtype it is to run in).

The module shares its parameters with the model it was rewritten from (torch.export's unlifted
module holds the model's own tensors): training one trains the other, moving one moves the
other's parameters.
"""

from __future__ import annotations

import contextlib
import itertools
import types
from typing import Any

import torch
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY
from torch.utils import _pytree as pytree

from .calls import bind_calls

#: the attributes ``rewrite`` sets on its module (kept by a deep copy); ``config``: the model's
#: (transformers' and diffusers' models have one, which their pipelines read)
ATTRIBUTES = ("mta_call", "mta_sites", "mta_plan", "mta_boundaries", "config")


def finish(gm: torch.fx.GraphModule, example: tuple[tuple, dict], **attributes: Any) -> torch.fx.GraphModule:
    """``gm`` (unlifted by ``rewrite``) binding its calls as the model captured from ``example``
    does, with ``attributes`` (``mta_sites`` …) set, in eval mode, and copying and moving as an
    nn.Module does (module docstring)."""
    bind_calls(gm, example)
    for name, value in attributes.items():
        setattr(gm, name, value)
    kept = {name: getattr(gm, name) for name in ATTRIBUTES if name in vars(gm)}
    gm.meta[_USER_PRESERVED_ATTRIBUTES_KEY] = {**gm.meta.get(_USER_PRESERVED_ATTRIBUTES_KEY, {}), **kept}
    _install(gm)
    gm._register_deepcopy_hook(_finish_copy)  # (private in torch 2.11 and 2.13 alike)
    return gm


def _install(gm: torch.fx.GraphModule) -> None:
    vars(gm).pop("eval", None)  # (torch's, raising; nn.Module.eval calls train(False))
    gm.train = types.MethodType(_train, gm)
    gm._apply = types.MethodType(_apply, gm)
    # (copy.copy and pickle look ``__copy__`` and ``__reduce_ex__`` up on the class: GraphModule
    # makes one class per instance)
    type(gm).__copy__ = _shallow_copy
    type(gm).__reduce_ex__ = _refuse_pickling
    # what pipelines read of the model they call (diffusers': ``transformer.dtype``, ``.device``,
    # ``with transformer.cache_context("cond"):``), unless the graph has a submodule of that name
    for name, value in (("dtype", property(_dtype)), ("device", property(_device)), ("cache_context", _cache_context)):
        if name not in gm._modules:
            setattr(type(gm), name, value)
    torch.nn.Module.train(gm, False)


def _dtype(self: torch.nn.Module) -> torch.dtype:
    """The dtype of the module's first floating parameter or buffer (float32 if it has none), as
    transformers' and diffusers' models give theirs."""
    tensors = itertools.chain(self.parameters(), self.buffers())
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)


def _device(self: torch.nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (the CPU if it has none)."""
    return next((t.device for t in itertools.chain(self.parameters(), self.buffers())), torch.device("cpu"))


@contextlib.contextmanager
def _cache_context(self: torch.nn.Module, name: str, **kwargs: Any):
    """The context diffusers' pipelines enter around each call of their denoiser
    (``CacheMixin.cache_context``, naming the call "cond" or "uncond" for its caching hooks). It
    does nothing here: those hooks sit on the model's own modules, which the rewritten module does
    not run."""
    yield


def _refuse_pickling(self: torch.fx.GraphModule, protocol: int):
    """``torch.save(fast)``, ``pickle.dumps(fast)``: a one-line error that says how to save it.
    torch.export's module does not pickle (it raised "Can't pickle local object
    '_create_stateful_graph_module.<locals>.<lambda>'", a hook torch puts on it)."""
    raise TypeError("a rewritten module does not pickle (torch.save(module), pickle, multiprocessing): save it with "
                    "mta_rewrite.save_program(module, path, args, kwargs) and load it with mta_rewrite.load_module(path) "
                    "(its weights alone: torch.save(module.state_dict(), path))")


def _shallow_copy(self: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``copy.copy``: torch's shallow copy of a GraphModule (the same graph, parameters and
    submodules; no hooks, so it lost the call binding), with ``rewrite``'s attributes, binding its
    calls and behaving as the original."""
    twin = torch.fx.GraphModule.__copy__(self)
    for name in ATTRIBUTES:
        if name in vars(self):
            setattr(twin, name, vars(self)[name])
    _finish_copy(twin)
    twin._register_deepcopy_hook(_finish_copy)
    return twin


def _finish_copy(copy: torch.fx.GraphModule) -> None:
    """A deep copy (``GraphModule.__deepcopy__`` calls this on it; the attributes are back from
    the meta's preserved attributes): bind its calls again and behave as the original."""
    signature = getattr(copy, "mta_call", None)
    if signature is not None:
        bind_calls(copy, signature=signature)
    _install(copy)


def _train(self: torch.fx.GraphModule, mode: bool = True) -> torch.fx.GraphModule:
    if not isinstance(mode, bool):
        raise ValueError("training mode is expected to be boolean")
    if mode:
        raise RuntimeError("train(): a rewritten model computes what the model computed in eval mode when it was "
                           "captured (no dropout) and cannot switch to training mode; gradients flow through it as "
                           "it is: fine-tune it without train()")
    return torch.nn.Module.train(self, False)


def _apply(self: torch.fx.GraphModule, fn, recurse: bool = True):
    """nn.Module's ``_apply`` (what ``to`` / ``cuda`` / ``cpu`` / ``half`` … call) for the rewritten
    module: a floating dtype change is refused before anything changes; the tensors move, the
    constants the graph reads (plain tensor attributes, which nn.Module does not move) too, and
    every device the graph names follows the tensors on that device."""
    tensors = _tensors(self)
    devices = {t.device for t in tensors} | _graph_devices(self)
    for dtype in {t.dtype for t in tensors if t.is_floating_point() or t.is_complex()}:
        probe = fn(torch.empty(0, dtype=dtype, device=next(t.device for t in tensors if t.dtype == dtype)))
        if isinstance(probe, torch.Tensor) and probe.dtype != dtype:
            raise TypeError(f"a rewritten model computes in the dtypes it was captured in ({_name(dtype)}; its graph "
                            f"casts to and checks them): rewrite the model in {_name(probe.dtype)} instead "
                            f"(model.to({probe.dtype}), then rewrite)")
    moved = {}
    for device in devices:
        probe = fn(torch.empty(0, device=device))
        moved[device] = probe.device if isinstance(probe, torch.Tensor) else device
    torch.nn.Module._apply(self, fn, recurse)
    for module in self.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.device in moved and moved[value.device] != value.device:
                setattr(module, name, value.to(moved[value.device]))
    if any(old != new for old, new in moved.items()):
        _move_graph_devices(self, moved)
    return self


def _tensors(gm: torch.nn.Module) -> list[torch.Tensor]:
    """The module's parameters, buffers and plain tensor attributes (lifted constants)."""
    found = [*gm.parameters(), *gm.buffers()]
    for module in gm.modules():
        found += [value for value in vars(module).values() if isinstance(value, torch.Tensor)]
    return found


def _graph_modules(gm: torch.nn.Module):
    """The module's graphs: its own and those of GraphModules nested in it."""
    return [module for module in gm.modules() if isinstance(module, torch.fx.GraphModule)]


def _named_devices(node: torch.fx.Node) -> dict:
    """Where ``node`` names a device, by slot: ``"device"`` for a ``device=`` keyword, 1 for
    ``aten.to.device``'s argument (torch.export.passes.move_to_device_pass's rule)."""
    named = {"device": node.kwargs["device"]} if "device" in node.kwargs else {}
    if node.op == "call_function" and node.target is torch.ops.aten.to.device:
        named[1] = node.args[1]
    return named


def _graph_devices(gm: torch.nn.Module) -> set[torch.device]:
    """The devices the graph names (:func:`_named_devices`)."""
    return {torch.device(d) for module in _graph_modules(gm) for node in module.graph.nodes
            for d in _named_devices(node).values() if isinstance(d, (str, torch.device))}


def _move_graph_devices(gm: torch.nn.Module, moved: dict[torch.device, torch.device]) -> None:
    """Every device a node names (:func:`_named_devices`) and the metadata of its value, moved as
    ``moved`` says."""
    def new(device):
        return moved.get(torch.device(device), device) if isinstance(device, (str, torch.device)) else device

    for module in _graph_modules(gm):
        for node in module.graph.nodes:
            for slot, device in _named_devices(node).items():
                if slot == "device":
                    node.kwargs = {**node.kwargs, "device": new(device)}
                else:
                    node.args = (*node.args[:slot], new(device), *node.args[slot + 1:])
            if "val" in node.meta:
                node.meta["val"] = pytree.tree_map_only(torch.Tensor, lambda t: t.to(new(t.device)), node.meta["val"])
        module.recompile()


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
