"""sympy expression -> TVMScript (TIR) statements and an expression.

Every composite sub-expression is bound to a fresh local name (`_e12 = T.exp(_e11)`), so that
functions that use their argument several times (softplus, silu) evaluate it once and the
emitted text stays linear in the size of the expression.

Note for callers: the bindings are `let` statements. TVM 0.27 vectorises a `T.vectorized` loop
whose body holds a `let` wrongly (every lane gets the last lane's value), so rendered code must
only be placed in serial or parallel loops; the lowerings keep `T.vectorized` for plain
multiply-add loops.

`fast` (float32 on CUDA only, where the result is rounded to 16 bits afterwards): exp and
divisions as CUDA's approximate intrinsics `__expf` (ex2.approx; relative error ~2 + 1.2 |x|
ulp of fp32) and `__fdividef` (x * rcp.approx(y): 0 for |y| > 2^126, so 1 / (1 + exp(-x))
still goes to 0 where exp overflows). Logarithms stay exact (`__logf` has an absolute error
~2^-21 near 1, which softplus of very negative inputs would turn into a large relative one).
"""
from __future__ import annotations

import itertools

import sympy as sp

from ...ir import Y
from ...ir.functions import Sigmoid, Silu, Softplus

#: names that never clash with a rendered binding (lowerings use other prefixes)
_PREFIX = "_e"

_UNARY = {sp.log: "T.log", sp.tanh: "T.tanh", sp.Abs: "T.fabs"}   # exp: `exp_call`


def exp_call(x: str, fast: bool) -> str:
    """exp(x) in TVMScript: CUDA's `__expf` when `fast` (float32 math only; see above)."""
    return f'T.call_pure_extern("float32", "__expf", {x})' if fast else f"T.exp({x})"


class ExprRenderer:
    """Render sympy expressions into TVMScript lines, evaluated in `dtype` (float32/float64).

    `loads` maps an input name (or "y") to the TVMScript expression that reads it at the
    current indices, already cast to `dtype`.
    """

    def __init__(self, dtype: str, counter=None, fast: bool = False):
        self.dtype = dtype
        self._counter = counter if counter is not None else itertools.count()
        self.fast = fast  # see the module's docstring; only for float32 on CUDA

    @property
    def _fast(self) -> bool:
        return self.fast and self.dtype == "float32"

    def exp(self, x: str) -> str:
        """exp(x) in TVMScript (`__expf` when fast)."""
        return exp_call(x, self._fast)

    def div(self, num: str, den: str) -> str:
        """num / den in TVMScript (`__fdividef` when fast)."""
        if self._fast:
            return f'T.call_pure_extern("float32", "__fdividef", {num}, {den})'
        return f"{num} / {den}"

    def const(self, value) -> str:
        return f"T.{self.dtype}({float(value)!r})"

    def render(self, expr: sp.Expr, loads: dict[str, str]) -> tuple[list[str], str]:
        """(statements to emit first, the expression giving the value)."""
        lines: list[str] = []
        memo: dict = {}

        def bind(text: str) -> str:
            name = f"{_PREFIX}{next(self._counter)}"
            lines.append(f"{name} = {text}")
            return name

        def ev(e) -> str:
            if e in memo:
                return memo[e]
            out = visit(e)
            memo[e] = out
            return out

        def visit(e) -> str:
            if e.is_Symbol:
                key = "y" if e == Y else e.name
                if key not in loads:
                    raise KeyError(f"no load for symbol {key!r}")
                return loads[key]
            if e.is_Number:
                if e in (sp.nan, sp.zoo, sp.oo, -sp.oo):
                    raise NotImplementedError(f"cannot render the constant {e}")
                return self.const(e)
            if isinstance(e, sp.Add):
                terms = [ev(a) for a in e.args]
                return bind(" + ".join(terms))
            if isinstance(e, sp.Mul):
                num, den = [], []
                for a in e.args:
                    if isinstance(a, sp.Pow) and a.exp.is_Integer and a.exp < 0:
                        den.append(ev(a.base) if a.exp == -1 else ev(sp.Pow(a.base, -a.exp)))
                    else:
                        num.append(ev(a))
                text = " * ".join(num) if num else self.const(1)
                if den:
                    text = self.div(f"({text})", f"({' * '.join(den)})")
                return bind(text)
            if isinstance(e, sp.Pow):
                return pow_(e.base, e.exp)
            if isinstance(e, (sp.Max, sp.Min)):
                fn = "T.max" if isinstance(e, sp.Max) else "T.min"
                args = [ev(a) for a in e.args]
                acc = args[0]
                for a in args[1:]:
                    acc = bind(f"{fn}({acc}, {a})")
                return acc
            if isinstance(e, Softplus):
                # stable: max(x, 0) + log(1 + exp(-|x|)); never overflows for large |x|
                x = ev(e.args[0])
                zero, one = self.const(0), self.const(1)
                e_ = self.exp(f"{zero} - T.fabs({x})")
                return bind(f"T.max({x}, {zero}) + T.log({one} + {e_})")
            if isinstance(e, Sigmoid):
                return bind(sigmoid(ev(e.args[0])))
            if isinstance(e, Silu):
                x = ev(e.args[0])
                return bind(f"{x} * {sigmoid(x)}")
            if isinstance(e, sp.sign):
                x = ev(e.args[0])
                zero = self.const(0)
                return bind(f"T.if_then_else({x} > {zero}, {self.const(1)}, "
                            f"T.if_then_else({x} < {zero}, {self.const(-1)}, {zero}))")
            if isinstance(e, sp.Heaviside):
                x = ev(e.args[0])
                return bind(f"T.if_then_else({x} > {self.const(0)}, {self.const(1)}, "
                            f"{self.const(0)})")
            if isinstance(e, sp.exp):
                return bind(self.exp(ev(e.args[0])))
            fn = _UNARY.get(type(e))
            if fn is not None:
                return bind(f"{fn}({ev(e.args[0])})")
            raise NotImplementedError(f"the TVM backend cannot render {type(e).__name__} "
                                      f"(in {e})")

        def sigmoid(x: str) -> str:
            # 1 / (1 + exp(-x)): exp overflows to inf for very negative x, giving exactly 0
            one = self.const(1)
            return self.div(one, f"({one} + {self.exp(f'{self.const(0)} - {x}')})")

        def pow_(base, ex) -> str:
            b = ev(base)
            if ex == -1:
                return bind(self.div(self.const(1), b))
            if ex == sp.Rational(1, 2):
                return bind(f"T.sqrt({b})")
            if ex == sp.Rational(-1, 2):
                return bind(f"T.rsqrt({b})")
            if ex.is_Integer and 0 < ex <= 4:
                return bind(" * ".join([b] * int(ex)))
            if ex.is_Integer and -4 <= ex < 0:
                return bind(self.div(self.const(1), f"({' * '.join([b] * int(-ex))})"))
            if ex.is_Number:
                return bind(f"T.pow({b}, {self.const(ex)})")
            return bind(f"T.pow({b}, {ev(ex)})")

        value = ev(expr)
        return lines, value


def unsupported_in(expr: sp.Expr) -> str | None:
    """The first sub-expression the renderer cannot handle, described; None when all can."""
    known = (sp.Add, sp.Mul, sp.Pow, sp.Max, sp.Min, sp.exp, Softplus, Sigmoid, Silu, sp.sign,
             sp.Heaviside) + tuple(_UNARY)
    for node in sp.preorder_traversal(expr):
        if node.is_Symbol or node.is_Number:
            if node in (sp.nan, sp.zoo, sp.oo, -sp.oo):
                return f"the constant {node}"
            continue
        if not isinstance(node, known):
            return f"{type(node).__name__} (in {expr})"
    return None
