"""Render IR expressions into Triton source: operand loads by axis letter, sympy -> tl.* code.

A kernel evaluates expressions on a *tile*: some axes are vectors held in registers (`tiled`,
each with an offsets vector and a mask, occupying one dimension of the tile), the others are
scalar indices (`fixed`). An input is loaded with exactly the dimensions its axes select, so
broadcasting between inputs falls out of Triton's own broadcasting.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from ...ir import Y, Elementwise, Input, Program
from ...ir.functions import Sigmoid, Silu, Softplus


@dataclass
class Tile:
    """Axis -> (offsets variable, mask variable) for tiled axes, in tile-dimension order;
    axis -> scalar index expression for the others. `g` is always fixed (the head's group)."""

    tiled: list[tuple[str, str, str]]
    fixed: dict[str, str]

    def slot(self, axis: str) -> int | None:
        for i, (a, _, _) in enumerate(self.tiled):
            if a == axis:
                return i
        return None

    def broadcast(self, var: str, axis: str) -> str:
        """`var` (a 1-d vector along `axis`) reshaped to broadcast over the tile."""
        k = len(self.tiled)
        if k == 1:
            return var
        i = self.slot(axis)
        return f"{var}[{', '.join(':' if j == i else 'None' for j in range(k))}]"

    @property
    def shape_rank(self) -> int:
        return len(self.tiled)


def arg_names(inp: Input) -> list[str]:
    """The kernel parameters for one input: its pointer and one stride per axis. Everything
    generated from a user's input name starts with `u_`, which no kernel's own names do: an
    input may be called `out`, `states` or `state_in`."""
    return [f"u_{inp.name}_ptr"] + [f"u_{inp.name}_s_{a}" for a in inp.axes]


def input_pointer_and_mask(inp: Input, tile: Tile) -> tuple[str, str | None]:
    terms, masks = [], []
    for a in inp.axes:
        stride = f"u_{inp.name}_s_{a}"
        lookup = "h" if a == "g" and tile.slot("h") is not None else a
        if tile.slot(lookup) is not None:
            _, offs, mask = tile.tiled[tile.slot(lookup)]
            if a == "g":  # a tiled head axis indexes its group
                terms.append(f"({tile.broadcast(offs, lookup)} // HPG) * {stride}")
            else:
                terms.append(f"{tile.broadcast(offs, a)} * {stride}")
            masks.append(tile.broadcast(mask, lookup))
        elif a == "k" and "k" not in tile.fixed:
            continue     # the launch passes each scan order its own slice (k size 1)
        else:
            terms.append(f"({tile.fixed[a]}) * {stride}")
    ptr = f"u_{inp.name}_ptr + " + " + ".join(terms)
    return ptr, (" & ".join(masks) if masks else None)


class Emitter:
    """Accumulates lines of a kernel body with indentation."""

    def __init__(self, indent: int = 1):
        self.lines: list[str] = []
        self.level = indent

    def __call__(self, line: str = "") -> None:
        self.lines.append("    " * self.level + line if line else "")

    def block(self):
        emitter = self

        class _Block:
            def __enter__(self):
                emitter.level += 1

            def __exit__(self, *exc):
                emitter.level -= 1
        return _Block()

    def text(self) -> str:
        return "\n".join(self.lines)


class TritonPrinter:
    """sympy -> Triton expression text. `names` maps symbols to variables already in scope."""

    def __init__(self, names: dict[str, str], compute: str = "tl.float32"):
        self.names = names
        self.compute = compute

    def __call__(self, e: sp.Expr) -> str:
        return self.pr(e)

    def num(self, v) -> str:
        return repr(float(v))

    def pr(self, e) -> str:
        if e.is_Symbol:
            return self.names[e.name]
        if e.is_Number or e.is_NumberSymbol:  # NumberSymbol: E from S.exp(1), pi
            return self.num(e)
        if isinstance(e, sp.Add):
            return "(" + " + ".join(self.pr(a) for a in e.args) + ")"
        if isinstance(e, sp.Mul):
            num, den = [], []
            for a in e.args:
                if isinstance(a, sp.Pow) and a.exp.is_Number and a.exp < 0:
                    den.append(self.pr(sp.Pow(a.base, -a.exp)))
                else:
                    num.append(self.pr(a))
            text = " * ".join(num) if num else "1.0"
            if den:
                text = f"{text} / ({' * '.join(den)})"
            return f"({text})"
        if isinstance(e, sp.Pow):
            return self.power(e)
        if isinstance(e, sp.exp):
            return f"tl.exp({self.pr(e.args[0])})"
        if isinstance(e, sp.log):
            return f"tl.log({self.pr(e.args[0])})"
        if isinstance(e, sp.tanh):
            x = self.pr(e.args[0])
            return f"(2.0 * tl.sigmoid(2.0 * {x}) - 1.0)"
        if isinstance(e, sp.Abs):
            return f"tl.abs({self.pr(e.args[0])})"
        if isinstance(e, (sp.Max, sp.Min)):
            fn = "tl.maximum" if isinstance(e, sp.Max) else "tl.minimum"
            args = [self.pr(a) for a in e.args]
            out = args[0]
            for a in args[1:]:
                out = f"{fn}({out}, {a})"
            return out
        if isinstance(e, Sigmoid):
            return f"tl.sigmoid({self.pr(e.args[0])})"
        if isinstance(e, Silu):
            x = self.pr(e.args[0])
            return f"({x} * tl.sigmoid({x}))"
        if isinstance(e, Softplus):
            x = self.pr(e.args[0])
            return f"(tl.maximum({x}, 0.0) + tl.log(1.0 + tl.exp(-tl.abs({x}))))"
        if isinstance(e, sp.sign):
            x = self.pr(e.args[0])
            return f"tl.where({x} > 0, 1.0, tl.where({x} < 0, -1.0, 0.0))"
        if isinstance(e, sp.Heaviside):
            x = self.pr(e.args[0])
            return f"tl.where({x} > 0, 1.0, 0.0)"
        raise NotImplementedError(f"no Triton rendering for {type(e).__name__}: {e}")

    def power(self, e: sp.Pow) -> str:
        base, ex = self.pr(e.base), e.exp
        if ex.is_Float and float(ex).is_integer():  # x ** 2.0 is x ** 2, for negative x too
            ex = sp.Integer(int(ex))
        if ex.is_Integer and 1 <= int(ex) <= 4:
            return "(" + " * ".join([base] * int(ex)) + ")"
        if ex.is_Integer and -4 <= int(ex) <= -1:
            return "(1.0 / (" + " * ".join([base] * -int(ex)) + "))"
        if ex.is_Integer:
            # exp(k log|x|), with the sign of x for odd k: exp(k log x) is NaN for x < 0
            k = int(ex)
            mag = f"tl.exp({float(k)!r} * tl.log(tl.abs({base})))"
            return f"tl.where({base} < 0, -{mag}, {mag})" if k % 2 else mag
        if ex == sp.Rational(1, 2):
            return f"tl.sqrt({base})"
        if ex == sp.Rational(-1, 2):
            return f"(1.0 / tl.sqrt({base}))"
        return f"tl.exp({self.pr(ex)} * tl.log({base}))"


class Context:
    """Evaluates Elementwise nodes on one tile, loading each input at most once."""

    def __init__(self, program: Program, tile: Tile, emit: Emitter, tag: str,
                 compute: str = "tl.float32", extra: dict[str, str] | None = None):
        self.program = program
        self.tile = tile
        self.emit = emit
        self.tag = tag
        self.compute = compute
        self.loaded: dict[str, str] = dict(extra or {})
        self.counter = 0

    def load(self, name: str) -> str:
        if name in self.loaded:
            return self.loaded[name]
        inp = self.program.input(name)
        ptr, mask = input_pointer_and_mask(inp, self.tile)
        var = f"u_{name}_{self.tag}"
        masked = f", mask={mask}, other=0.0" if mask else ""
        self.emit(f"{var} = tl.load({ptr}{masked}).to({self.compute})")
        self.loaded[name] = var
        return var

    def direct_load(self, node: Elementwise, name: str, dtype: str) -> str | None:
        """A bare input that spans the whole tile is loaded straight into `dtype` (masked
        lanes read 0), with no compute-type copy: that keeps matmul operands small in
        registers. Returns None where the operand needs computing or broadcasting."""
        expr = node.expr
        if not isinstance(expr, sp.Symbol) or expr == Y:
            return None
        inp = self.program.input(expr.name)
        covered = {"h" if a == "g" else a for a in inp.axes}
        if any(a not in covered for a, _, _ in self.tile.tiled):
            return None
        ptr, mask = input_pointer_and_mask(inp, self.tile)
        masked = f", mask={mask}, other=0.0" if mask else ""
        self.emit(f"{name} = tl.load({ptr}{masked}).to({dtype})")
        return name

    def value(self, node: Elementwise | sp.Expr, name: str) -> str:
        """Emit code computing `node` into a new variable and return its name."""
        expr = node.expr if isinstance(node, Elementwise) else node
        names = {}
        for s in sorted(expr.free_symbols, key=lambda s: s.name):
            names[s.name] = self.loaded[s.name] if s == Y else self.load(s.name)
        replacements, (reduced,) = sp.cse([expr], symbols=_tmp_symbols(f"{name}_cse"))
        printer = TritonPrinter(names, self.compute)
        for sym, sub in replacements:
            names[sym.name] = sym.name
            self.emit(f"{sym.name} = {printer(sub)}")
        var = name
        self.emit(f"{var} = {printer(reduced)}")
        return var


def _tmp_symbols(prefix: str):
    i = 0
    while True:
        yield sp.Symbol(f"{prefix}{i}", real=True)
        i += 1


def tile_mask(tile: Tile, axes) -> str | None:
    masks = [tile.broadcast(mask, a) for a, _, mask in tile.tiled if a in axes]
    return " & ".join(masks) if masks else None


def split_scale(node: Elementwise, program: Program, own_axis: str):
    """Write `node` as base * scale, with base a bare input that carries `own_axis` and scale
    an expression free of it (e.g. Mamba-2's value x * dt: base x, scale dt). Kernels load the
    base straight into matmul operands and apply the scale to a matmul's rows or columns, so
    the big operand is never rebuilt in registers. Returns (base symbol, scale) or None."""
    factors = sp.Mul.make_args(node.expr)
    carrying = [f for f in factors if any(own_axis in _axes_of(s, program)
                                          for s in f.free_symbols)]
    if len(carrying) != 1 or not isinstance(carrying[0], sp.Symbol) or carrying[0] == Y:
        return None
    rest = [f for f in factors if f is not carrying[0]]
    return carrying[0], sp.Mul(*rest)


def _axes_of(sym: sp.Symbol, program: Program) -> tuple[str, ...]:
    if sym == Y:
        return ("b", "t", "h", "p")
    return program.input(sym.name).axes
