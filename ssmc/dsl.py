"""The ssmc language: annotated inputs, elementwise expressions and one `recurrence`.

A definition is an ordinary Python function whose parameters are annotated `S.In["b t h p"]`.
`@ssmc.ssm` calls it once with symbolic stand-ins; every operation on them builds a sympy
expression, and `S.recurrence(...)` records the one recurrence. The result is an IR `Program`.
"""
from __future__ import annotations

import inspect
import numbers
import threading

import sympy as sp
from torch.overrides import resolve_name

from .errors import SpecError
from .ir import functions as F
from .ir.nodes import (AXES, DIRECTION_SETS, RESERVED_NAMES, Y, Y_AXES, Elementwise, Input,
                       Program, Recurrence, canonical_axes, symbol)
from .ir.verify import verify

__all__ = ["In", "Expr", "recurrence", "exp", "log", "softplus", "sigmoid", "silu", "tanh",
           "sqrt", "abs", "maximum", "minimum", "clamp", "trace"]


class _InSpec:
    __slots__ = ("spec",)

    def __init__(self, spec: str):
        self.spec = spec

    def __repr__(self):
        return f'In["{self.spec}"]'


class _InFactory:
    """`In["b t h p"]`: the annotation of one tensor input and its axes."""

    def __getitem__(self, spec) -> _InSpec:
        if not isinstance(spec, str):
            raise SpecError(f'In[...] takes a string of axis letters such as "b t h p", got {spec!r}')
        return _InSpec(spec)

    def __repr__(self):
        return "In"


In = _InFactory()

_state = threading.local()


class _Trace:
    def __init__(self, name: str, input_axes: dict[str, tuple[str, ...]]):
        self.name = name
        self.input_axes = input_axes
        self.recurrence: Recurrence | None = None


def _current() -> _Trace:
    tr = getattr(_state, "trace", None)
    if tr is None:
        raise SpecError("ssmc expressions can only be used inside a function decorated with @ssmc.ssm")
    return tr


def _axes_of(expr: sp.Expr) -> tuple[str, ...]:
    tr = _current()
    axes: set[str] = set()
    for s in expr.free_symbols:
        axes.update(Y_AXES if s == Y else tr.input_axes[s.name])
    return canonical_axes(axes)


def _lift(value, what: str = "operand") -> sp.Expr:
    if isinstance(value, Expr):
        return value.sym
    if isinstance(value, bool):
        raise SpecError(f"{_current().name}: a bool is not a valid {what}")
    if isinstance(value, numbers.Integral):
        return sp.Integer(int(value))
    if isinstance(value, numbers.Real):
        return sp.Float(float(value))
    raise SpecError(f"{_current().name}: {type(value).__name__} {value!r} is not a valid {what}; "
                    "expressions combine inputs, Python numbers and S.* functions")


#: torch functions (by their last name) -> the S.* function that computes the same elementwise
TORCH_EQUIVALENTS = {"exp": "exp", "log": "log", "sigmoid": "sigmoid", "expit": "sigmoid",
                     "tanh": "tanh", "sqrt": "sqrt", "abs": "abs", "absolute": "abs",
                     "maximum": "maximum", "minimum": "minimum", "clamp": "clamp",
                     "clip": "clamp", "softplus": "softplus", "silu": "silu"}


def _first_expr(values):
    """The first Expr among `values`, looking inside lists, tuples and dicts (as torch does)."""
    for v in values:
        if isinstance(v, Expr):
            return v
        if isinstance(v, (list, tuple)):
            found = _first_expr(v)
        elif isinstance(v, dict):
            found = _first_expr(v.values())
        else:
            continue
        if found is not None:
            return found
    return None


def _not_elementwise(what: str):
    def method(self, *args, **kwargs):
        raise SpecError(f"{_current().name}: {self._label()} is used with {what}, which is not "
                        "elementwise; ssmc definitions may only use + - * / ** and S.* functions "
                        "on inputs")
    return method


class Expr:
    """An elementwise expression over inputs; operators build sympy trees."""

    __slots__ = ("sym",)
    __array_priority__ = 1000  # so numpy scalars defer to our reflected operators

    def __init__(self, sym: sp.Expr):
        self.sym = sym

    def _label(self) -> str:
        if isinstance(self.sym, sp.Symbol):
            return f"input {self.sym.name!r}" if self.sym != Y else "the recurrence output"
        return f"expression {sp.sstr(self.sym)!r}"

    @property
    def axes(self) -> tuple[str, ...]:
        return _axes_of(self.sym)

    def __add__(self, o): return Expr(self.sym + _lift(o))
    def __radd__(self, o): return Expr(_lift(o) + self.sym)
    def __sub__(self, o): return Expr(self.sym - _lift(o))
    def __rsub__(self, o): return Expr(_lift(o) - self.sym)
    def __mul__(self, o): return Expr(self.sym * _lift(o))
    def __rmul__(self, o): return Expr(_lift(o) * self.sym)
    def __truediv__(self, o): return Expr(self.sym / _lift(o))
    def __rtruediv__(self, o): return Expr(_lift(o) / self.sym)
    def __neg__(self): return Expr(-self.sym)
    def __pos__(self): return self

    def __pow__(self, o):
        if isinstance(o, Expr) or not isinstance(o, numbers.Real):
            raise SpecError(f"{_current().name}: only a Python number may be an exponent")
        return Expr(self.sym ** _lift(o))

    __getitem__ = _not_elementwise("indexing")
    __matmul__ = _not_elementwise("a matrix product (@)")
    __rmatmul__ = __matmul__
    __iter__ = _not_elementwise("iteration")
    __len__ = _not_elementwise("len()")
    __bool__ = _not_elementwise("a truth test (if/and/or)")
    __lt__ = _not_elementwise("a comparison")
    __le__ = __gt__ = __ge__ = __lt__
    __floordiv__ = _not_elementwise("floor division")
    __mod__ = _not_elementwise("modulo")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """A torch function given a traced expression (`torch.exp(dt)`): a SpecError naming the
        S.* function to use."""
        qualname = resolve_name(func) or getattr(func, "__name__", repr(func))
        short = qualname.rsplit(".", 1)[-1]
        if qualname.startswith("torch.Tensor.") and args and not isinstance(args[0], Expr):
            _lift(args[0])  # `tensor * x`: the tensor is the operand a definition cannot take
        expr = _first_expr(list(args) + list((kwargs or {}).values()))
        on = "a traced expression" if expr is None else f"{expr._label()}, a traced expression"
        equivalent = TORCH_EQUIVALENTS.get(short)
        if equivalent is not None:
            hint = f"use ssmc.dsl.{equivalent} (S.{equivalent}) inside a definition"
        else:
            hint = ("torch functions do not apply inside a definition, which may only use "
                    "+ - * / ** and S.* functions (" +
                    ", ".join(f"S.{n}" for n in sorted(set(TORCH_EQUIVALENTS.values()))) +
                    ") on inputs")
        raise SpecError(f"{_current().name}: {qualname}() was called on {on}; {hint}")

    def __getattr__(self, name):
        if name in TORCH_EQUIVALENTS:  # a tensor method: x.exp(), x.clamp(0, 1)
            equivalent = TORCH_EQUIVALENTS[name]
            raise SpecError(f"{_current().name}: {self._label()} has no method {name!r}; use "
                            f"ssmc.dsl.{equivalent} (S.{equivalent}) inside a definition")
        raise SpecError(f"{_current().name}: {self._label()} has no attribute {name!r}; inputs are "
                        "symbolic inside a definition and only elementwise operations are allowed "
                        "(reductions, reshapes and indexing are not)")

    def __repr__(self):
        return f"Expr({sp.sstr(self.sym)})"


def _unary(fn, name):
    def f(x):
        return Expr(fn(_lift(x, f"argument of S.{name}")))
    f.__name__ = name
    f.__doc__ = f"Elementwise {name}."
    return f


exp = _unary(sp.exp, "exp")
log = _unary(sp.log, "log")
softplus = _unary(F.Softplus, "softplus")
sigmoid = _unary(F.Sigmoid, "sigmoid")
silu = _unary(F.Silu, "silu")
tanh = _unary(sp.tanh, "tanh")
sqrt = _unary(sp.sqrt, "sqrt")
abs = _unary(sp.Abs, "abs")  # noqa: A001 - the language's name


def maximum(a, b) -> Expr:
    return Expr(sp.Max(_lift(a), _lift(b)))


def minimum(a, b) -> Expr:
    return Expr(sp.Min(_lift(a), _lift(b)))


def clamp(x, lo=None, hi=None) -> Expr:
    e = _lift(x)
    if lo is not None:
        e = sp.Max(e, _lift(lo))
    if hi is not None:
        e = sp.Min(e, _lift(hi))
    return Expr(e)


def recurrence(*, key, value, query, decay=None, direction: str = "forward") -> Expr:
    """Record the recurrence `state_t = decay_t * state_{t-1} + key_t (x) value_t`,
    `y_t = query_t . state_t`, and return `y` (axes b t h p).

    `direction="reverse"` runs from the last step to the first (the same recurrence on the
    time-reversed sequence); `"bidirectional"` is the sum of both. `"cross2d"` reads t as a
    row-major H x W grid (the call passes `grid=(H, W)`) and sums four orders: 0 row-major,
    1 column-major, 2 row-major reversed, 3 column-major reversed; an input with the axis `k`
    (size 4) gives each order its own slice.
    """
    tr = _current()
    if tr.recurrence is not None:
        raise SpecError(f"{tr.name}: S.recurrence is called twice; a definition holds exactly "
                        "one recurrence")
    if direction not in DIRECTION_SETS:
        raise SpecError(f"{tr.name}: direction={direction!r} is not valid; valid values: "
                        f"{', '.join(DIRECTION_SETS)}")

    def operand(role, v):
        if v is None:
            raise SpecError(f"{tr.name}: S.recurrence needs {role}=")
        e = _lift(v, role)
        if Y in e.free_symbols:
            raise SpecError(f"{tr.name}: {role} uses the recurrence's own output")
        axes = _axes_of(e)
        return Elementwise(e, axes)

    key_e, value_e, query_e = operand("key", key), operand("value", value), operand("query", query)
    decay_e = None if decay is None else operand("decay", decay)
    for role, e, need, forbid in (("key", key_e, "n", "p"), ("query", query_e, "n", "p"),
                                  ("value", value_e, "p", "n")):
        if need not in e.axes:
            raise SpecError(f"{tr.name}: {role} has axes '{' '.join(e.axes)}' without '{need}'; "
                            f"the {role} of a recurrence must range over '{need}'")
        if forbid in e.axes:
            raise SpecError(f"{tr.name}: {role} has axes '{' '.join(e.axes)}' including "
                            f"'{forbid}', which the {role} of a recurrence cannot carry")
    if direction != "cross2d":
        for role, e in (("key", key_e), ("value", value_e), ("query", query_e),
                        ("decay", decay_e)):
            if e is not None and "k" in e.axes:
                raise SpecError(f"{tr.name}: {role} has the order axis 'k', which only a "
                                f"recurrence with direction='cross2d' has (one slice per scan "
                                f"order); this one has direction={direction!r}")
    tr.recurrence = Recurrence(key=key_e, value=value_e, query=query_e, decay=decay_e,
                               directions=DIRECTION_SETS[direction])
    return Expr(Y)


def parse_axes(fn_name: str, arg: str, spec: str) -> tuple[str, ...]:
    letters = tuple(spec.split())
    if not letters:
        raise SpecError(f'{fn_name}: {arg!r} is annotated "{spec}"; it has no axes')
    for a in letters:
        if a not in AXES:
            raise SpecError(f'{fn_name}: {arg!r} is annotated "{spec}"; unknown axis {a!r} '
                            f"(expected one of {' '.join(AXES)})")
    if len(set(letters)) != len(letters):
        raise SpecError(f'{fn_name}: {arg!r} is annotated "{spec}"; an axis is repeated')
    if "h" in letters and "g" in letters:
        raise SpecError(f'{fn_name}: {arg!r} is annotated "{spec}"; an input has either heads '
                        "'h' or groups 'g', not both")
    return letters


def trace(fn, name: str | None = None) -> Program:
    """Run `fn` on symbolic inputs and return its verified IR Program."""
    name = name or fn.__name__
    sig = inspect.signature(fn)
    inputs = []
    for pname, param in sig.parameters.items():
        ann = param.annotation
        if isinstance(ann, str):  # from __future__ import annotations
            ann = eval(ann, fn.__globals__, {"In": In})  # noqa: S307 - the user's own annotation
        if not isinstance(ann, _InSpec):
            raise SpecError(f'{name}: parameter {pname!r} needs an annotation S.In["..."] '
                            "naming its axes")
        if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            raise SpecError(f"{name}: parameter {pname!r} must be a plain positional parameter")
        if pname in RESERVED_NAMES:
            raise SpecError(f"{name}: parameter name {pname!r} is reserved "
                            f"({', '.join(RESERVED_NAMES)})")
        inputs.append(Input(pname, parse_axes(name, pname, ann.spec)))
    if not inputs:
        raise SpecError(f"{name}: a definition needs at least one input")
    tr = _Trace(name, {i.name: i.axes for i in inputs})
    prev = getattr(_state, "trace", None)
    _state.trace = tr
    try:
        result = fn(*(Expr(symbol(i.name)) for i in inputs))
        if tr.recurrence is None:
            raise SpecError(f"{name}: the definition never calls S.recurrence")
        out = _lift(result, "return value")
        if Y not in out.free_symbols:
            raise SpecError(f"{name}: the return value does not use the result of S.recurrence")
        out_axes = _axes_of(out)
        if "n" in out_axes:
            raise SpecError(f"{name}: the return value has the state axis 'n' "
                            f"(axes '{' '.join(out_axes)}'); the output is over b t h p")
        if "k" in out_axes:
            raise SpecError(f"{name}: the return value reads an input with the order axis 'k' "
                            f"(axes '{' '.join(out_axes)}'); the epilogue applies once to the "
                            "sum over the orders, so it may only read inputs without 'k' (sum "
                            "a per-order term over k yourself, e.g. D.sum(0) * x)")
    finally:
        _state.trace = prev
    program = Program(name=name, inputs=tuple(inputs), recurrence=tr.recurrence,
                      output=Elementwise(out, out_axes))
    return verify(program)
