"""Complex arithmetic as pairs of real numbers, so that torch.onnx can export it.

ONNX has no complex type. torch.onnx represents a complex tensor as a real one with a trailing
axis of 2 (real, imaginary) and translates some operators for it, not all: Llama-4 computes its
rotary positions in complex numbers (``torch.polar``, ``view_as_complex``, an ``unsqueeze`` and a
product per layer, ``view_as_real``) and failed at the ``unsqueeze`` ("No decompositions
registered for the complex-valued input"), and its product by the rotary scaling factor, a
complex tensor times a Python float, has no working translation either (torchlib's complex
``Mul`` slices both operands as pairs).

:func:`complex_as_pairs` rewrites the program's graph, while torch.onnx exports it, into that
same representation in real operators: every complex value becomes its pair tensor
(``[..., 2]``), ``view_as_complex`` / ``view_as_real`` become nothing, products, quotients,
sums, ``polar``, ``abs``, conjugates, casts and the shape operators are written out on the pairs
(a dimension counted from the end moves one further: the pair axis is last). Complex inputs and
buffers enter through ``view_as_real``, complex outputs leave through ``view_as_complex``, the two
complex translations torch.onnx has (both identities on the pairs). An operator on complex values
that is not in the table is a one-line error that names it.
"""

from __future__ import annotations

import contextlib
import operator

import torch
import torch.fx as fx

aten = torch.ops.aten

# a complex dtype → the real dtype of its parts
PART_DTYPE = {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}


def _val(x):
    return x.meta.get("val") if isinstance(x, fx.Node) else x


def is_complex(x) -> bool:
    """A node (or a constant) whose value is a complex tensor."""
    v = _val(x)
    return isinstance(v, torch.Tensor) and v.is_complex()


def _holds_complex(node: fx.Node) -> bool:
    v = node.meta.get("val")
    values = v if isinstance(v, (tuple, list)) else [v]
    return any(isinstance(x, torch.Tensor) and x.is_complex() for x in values) or any(
        is_complex(a) for a in node.all_input_nodes)


def _dim(d: int) -> int:
    """A dimension of a complex tensor, in its pair tensor: counted from the end, one further."""
    return d - 1 if d < 0 else d


class _Pairs:
    """Builds the real graph: ``env`` maps each node of the program to its node in the new graph,
    the pair tensor for a complex one."""

    def __init__(self, graph: fx.Graph):
        self.old, self.new, self.env = graph, fx.Graph(), {}

    def call(self, target, *args, **kwargs) -> fx.Node:
        """A new node, its value (``meta["val"]``) computed from its inputs' fake values."""
        name = f"pairs_{target.__name__.split('.')[0]}"
        node = self.new.create_node("call_function", target, args, kwargs, name=name)
        node.meta["val"] = target(*fx.node.map_arg(args, _val), **fx.node.map_arg(kwargs, _val))
        return node

    # the parts of a pair tensor, each of the complex tensor's shape
    def re(self, p):
        return self.call(aten.select.int, p, -1, 0)

    def im(self, p):
        return self.call(aten.select.int, p, -1, 1)

    def pair(self, re, im):
        return self.call(aten.stack.default, [re, im], -1)

    def last_axis(self, x):
        """A real tensor operand of a pair tensor gets an axis for the pair's (a number none)."""
        return self.call(aten.unsqueeze.default, x, -1) if isinstance(x, fx.Node) else x

    def arg(self, x):
        return fx.node.map_arg(x, lambda n: self.env[n])

    # ---- products, quotients, sums ----------------------------------------------------------
    def times(self, a, b, a_complex: bool, b_complex: bool):
        """a·b, each a pair tensor (``*_complex``), a real tensor or a number (real or complex)."""
        if b_complex and not a_complex:
            a, b, a_complex, b_complex = b, a, True, False
        if not a_complex:  # a real tensor times a complex number
            a, b = (self.as_pair(a), b) if isinstance(a, fx.Node) else (self.as_pair(b), a)
        if b_complex:
            ar, ai, br, bi = self.re(a), self.im(a), self.re(b), self.im(b)
        elif isinstance(b, complex):
            ar, ai, br, bi = self.re(a), self.im(a), b.real, b.imag
        else:  # a real factor scales both parts
            return self.call(aten.mul.Tensor, a, self.last_axis(b))
        mul = aten.mul.Tensor
        return self.pair(self.call(aten.sub.Tensor, self.call(mul, ar, br), self.call(mul, ai, bi)),
                         self.call(aten.add.Tensor, self.call(mul, ar, bi), self.call(mul, ai, br)))

    def conj(self, p):
        return self.pair(self.re(p), self.call(aten.neg.default, self.im(p)))

    def squared_norm(self, p):  # |z|², of the complex tensor's shape
        return self.call(aten.sum.dim_IntList, self.call(aten.mul.Tensor, p, p), [-1])

    def divide(self, a, b, a_complex: bool, b_complex: bool):
        """a / b: a over a real divisor part by part; over a complex one, a·conj(b) / |b|²."""
        if b_complex:
            top = self.times(a, self.conj(b), a_complex, True)
            return self.call(aten.div.Tensor, top, self.call(aten.unsqueeze.default, self.squared_norm(b), -1))
        if isinstance(b, complex):
            return self.times(a, 1 / b, a_complex, False)
        return self.call(aten.div.Tensor, a, self.last_axis(b))

    def as_pair(self, x):
        """A real tensor or number as a complex one: its imaginary part zero."""
        if isinstance(x, complex):
            return x
        if isinstance(x, fx.Node):
            return self.pair(x, self.call(aten.zeros_like.default, x))
        return complex(x)

    def add(self, a, b, a_complex, b_complex, alpha=1, sign=1):
        """a ± alpha·b, a a tensor, b a tensor or a number, either complex (a real one gets a zero
        imaginary part)."""
        a = a if a_complex else self.as_pair(a)
        b = b if b_complex else self.as_pair(b)
        if isinstance(b, complex):
            shift = b * alpha * sign
            return self.pair(self.call(aten.add.Tensor, self.re(a), shift.real),
                             self.call(aten.add.Tensor, self.im(a), shift.imag))
        return self.call(aten.add.Tensor if sign > 0 else aten.sub.Tensor, a, b, alpha=alpha)

    # ---- one node of the program ------------------------------------------------------------
    def translate(self, node: fx.Node):
        """The new graph's node for ``node`` (the pair tensor if its value is complex)."""
        t, args, kwargs = node.target, node.args, node.kwargs
        cx = [is_complex(a) for a in args]
        a = self.arg(args)
        kw = self.arg(kwargs)
        first = cx[0] if cx else False
        if t in (aten.view_as_complex.default, aten.view_as_real.default):
            return a[0]
        if t is aten.polar.default:
            return self.pair(self.call(aten.mul.Tensor, a[0], self.call(aten.cos.default, a[1])),
                             self.call(aten.mul.Tensor, a[0], self.call(aten.sin.default, a[1])))
        if t is aten.complex.default:
            both = self.call(aten.broadcast_tensors.default, [a[0], a[1]])
            return self.pair(self.call(operator.getitem, both, 0), self.call(operator.getitem, both, 1))
        if t in (aten.mul.Tensor, aten.mul.Scalar):
            return self.times(a[0], a[1], cx[0], cx[1])
        if t in (aten.div.Tensor, aten.div.Scalar) and not kw.get("rounding_mode"):
            return self.divide(a[0], a[1], cx[0], cx[1])
        if t in (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar):
            sign = 1 if t in (aten.add.Tensor, aten.add.Scalar) else -1
            return self.add(a[0], a[1], cx[0], cx[1], kw.get("alpha", 1), sign)
        if t is aten.neg.default:
            return self.call(aten.neg.default, a[0])
        if t in (aten._conj.default, aten.conj_physical.default, aten.conj.default, aten.resolve_conj.default):
            return a[0] if t is aten.resolve_conj.default else self.conj(a[0])
        if t is aten.exp.default:  # e^(a + bi) = e^a·(cos b + i sin b)
            scale = self.call(aten.exp.default, self.re(a[0]))
            im = self.im(a[0])
            return self.pair(self.call(aten.mul.Tensor, scale, self.call(aten.cos.default, im)),
                             self.call(aten.mul.Tensor, scale, self.call(aten.sin.default, im)))
        if t is aten.reciprocal.default:
            return self.divide(1.0, a[0], False, True)
        if t is aten.abs.default:
            return self.call(aten.sqrt.default, self.squared_norm(a[0]))
        if t is aten.real.default:
            return self.re(a[0])
        if t is aten.imag.default:
            return self.im(a[0])
        if t is aten._assert_tensor_metadata.default:
            return None  # an assertion about the complex tensor, which the graph no longer holds
        if t in (aten._to_copy.default, aten.to.dtype_layout, aten.to.dtype):
            return self.cast(node, a, kw, first)
        if t in (aten.clone.default, aten.alias.default, aten.detach.default, aten.contiguous.default,
                 aten.lift_fresh_copy.default):
            return self.call(t, *a, **kw)
        if t in (aten.unsqueeze.default, aten.select.int, aten.squeeze.dim, aten.slice.Tensor, aten.sym_size.int,
                 aten.transpose.int, aten.flip.default, aten.squeeze.dims, aten.sum.dim_IntList, aten.mean.dim,
                 aten.narrow.default, aten.unbind.int, aten.split.Tensor, aten.split_with_sizes.default):
            rest = list(a[1:])
            at = (0, 1) if t is aten.transpose.int else (1,) if t in (aten.split.Tensor, aten.split_with_sizes.default) \
                else (0,)
            for i in at:
                if i < len(rest):
                    rest[i] = [_dim(d) for d in rest[i]] if isinstance(rest[i], (list, tuple)) else _dim(rest[i])
            if "dim" in kw:
                d = kw["dim"]
                kw = {**kw, "dim": [_dim(i) for i in d] if isinstance(d, (list, tuple)) else _dim(d)}
            if t is aten.slice.Tensor and not rest and "dim" not in kw:
                rest = [0]
            return self.call(t, a[0], *rest, **kw)
        if t is operator.getitem and isinstance(_val(args[0]), (list, tuple)):
            return self.call(t, *a)  # one piece of a split or unbind: its pair tensor
        if t is aten.permute.default:
            n = _val(args[0]).dim()
            return self.call(t, a[0], [d % n for d in a[1]] + [n])
        if t in (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default):
            return self.call(t, a[0], list(a[1]) + [2], **kw)
        if t in (aten.cat.default, aten.stack.default) and all(is_complex(x) for x in args[0]):
            return self.call(t, a[0], _dim(a[1] if len(a) > 1 else kw.get("dim", 0)))
        if t is aten.index.Tensor and first and not any(is_complex(i) for i in args[1] if i is not None):
            return self.call(t, *a)  # indices on the leading axes: the pair axis is not indexed
        if t in (aten.where.self,) and not cx[0]:
            x, y = (p if c else self.as_pair(p) for p, c in zip(a[1:], cx[1:]))
            return self.call(t, self.call(aten.unsqueeze.default, a[0], -1), x, y)
        raise ValueError(f"the model computes with complex numbers through {t}, which the ONNX export cannot write "
                         "as real arithmetic (docs/onnx.md lists the operators it writes)")

    def cast(self, node, a, kw, first):
        """``_to_copy`` / ``to``: complex to complex casts the pairs;
        to a real type takes the real part (as torch does, with a warning); a real tensor cast to
        a complex type gets a zero imaginary part."""
        dtype = kw.get("dtype", a[1] if node.target is aten.to.dtype else None)
        src = a[0]
        if first and dtype is not None and not dtype.is_complex:
            src = self.re(src)
        elif not first and dtype is not None and dtype.is_complex:
            src = self.as_pair(src)
        if dtype is not None and dtype.is_complex:
            dtype = PART_DTYPE[dtype]
        if node.target is aten.to.dtype:
            return self.call(aten.to.dtype, src, dtype, *a[2:], **kw)
        return self.call(node.target, src, *a[1:], **{**kw, **({"dtype": dtype} if "dtype" in kw else {})})

    def run(self) -> fx.Graph:
        for node in self.old.nodes:
            if node.op == "output":
                self.output(node)
            elif node.op == "call_function" and _holds_complex(node):
                got = self.translate(node)
                if got is not None:
                    self.env[node] = got
            elif node.op in ("placeholder", "get_attr") and is_complex(node):  # complex inputs, buffers
                copy = self.new.node_copy(node, lambda n: self.env[n])
                self.env[node] = self.call(aten.view_as_real.default, copy)
            elif node.op in ("call_function", "placeholder", "get_attr"):
                self.env[node] = self.new.node_copy(node, lambda n: self.env[n])
            else:
                raise ValueError(f"the model computes with complex numbers in a {node.op} ({node.target}), which the "
                                 "ONNX export cannot write as real arithmetic")
        return self.new

    def output(self, node: fx.Node):
        """Outputs keep their names (the program's signature names them): a complex one leaves
        through ``view_as_complex``, a real one that is now another node's value through a copy."""
        def named(x):
            got = self.env[x]
            if is_complex(x):
                got = self.call(aten.view_as_complex.default, got)
            elif got.name == x.name:
                return got
            elif got.op != "placeholder":
                got = self.call(aten.clone.default, got)
            else:
                return got
            got.name = self.new._graph_namespace.create_name(x.name, None)
            return got

        self.new.output(fx.node.map_arg(node.args[0], named), type_expr=node.type)



@contextlib.contextmanager
def complex_as_pairs(program: torch.export.ExportedProgram):
    """The program's graph with its complex arithmetic as pairs of reals (the module's
    docstring) while the ``with`` block runs, then the graph it had. A program without complex
    values is left as it is."""
    gm = program.graph_module
    saved = gm.graph
    if not any(_holds_complex(n) for n in saved.nodes if n.op != "output"):
        yield
        return
    gm.graph = _Pairs(saved).run()
    gm.recompile()
    try:
        yield
    finally:
        gm.graph = saved
        gm.recompile()
