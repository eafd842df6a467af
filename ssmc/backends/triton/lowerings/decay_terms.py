"""The decay's chain-rule terms, formed inside the scan backward's kernel.

Every input X the decay reads gets dL/dX = sum da_t * d decay_t / dX over the axes X lacks,
where da_t = dS_t * S_{t-1} (an (n, p) tile per step). Storing da itself, for a decay that
varies over n and p (Mamba-1, VMamba), is a (b, t, h, n, p) fp32 tensor that the host then
multiplies by the derivative and sums again; instead the kernel evaluates d decay / dX on its
block tile (`Program.backward`, sympy) and sums over what X lacks before anything leaves
registers: over n and p in the block (p in p-block partials, added on the host), over t across
the program's blocks (one accumulator per program with a row per block row, summed once after
the loop, for inputs without t: A, a bias). The host only adds partials and hands each term to
the chain rule as done (`("decay", X)` in the operand gradients).
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp
import torch

from ....ir import Program
from ....ir.backward import BackwardExprs
from ..render import Context, Emitter


@dataclass(frozen=True)
class DecayTerm:
    name: str          # the input
    expr: sp.Expr      # d decay / d input
    has_b: bool
    has_t: bool
    has_n: bool
    has_p: bool

    @property
    def param(self) -> str:
        return f"ssmc_dterm_{self.name}"

    def shape(self, nd: int, npb: int, sizes: dict, S: int) -> tuple:
        """Its buffer: (orders, p-block partials, b, t, h, n, p) for inputs with t, (orders,
        p-block partials, sequences, h, n, p) for the others; n, p of size 1 where it lacks
        them, one partial where it has p."""
        n = sizes["n"] if self.has_n else 1
        p = sizes["p"] if self.has_p else 1
        parts = 1 if self.has_p else npb
        rows = (sizes["b"], sizes["t"]) if self.has_t else (S,)
        return (nd, parts) + rows + (sizes["h"], n, p)


def decay_terms(program: Program) -> list[DecayTerm]:
    exprs = program.backward
    if program.recurrence.decay is None or not isinstance(exprs, BackwardExprs):
        return []
    axes = {i.name: set(i.axes) for i in program.inputs}
    return [DecayTerm(name, expr, "b" in axes[name], "t" in axes[name],
                      "n" in axes[name], "p" in axes[name])
            for name, expr in sorted(exprs.operands.get("decay", {}).items())]


def emit(terms: list[DecayTerm], ctx: Context, pre: Emitter, body: Emitter,
         post: Emitter, ct: str) -> None:
    """Code for each term: accumulators in `pre` (before the block loop), the block's part in
    `body` (which has `da`, `row`, `rows_n` and the masks), the accumulators' store in
    `post`. `ctx` evaluates on the block tile with the operands' inputs already loaded."""
    for term in terms:
        d = ctx.value(term.expr, f"dd_{term.name}")
        var = f"dterm_{term.name}"
        body(f"{var} = tl.where(rows_n[:, :, None] & mask_p[None, None, :], da * {d}, 0.0)")
        if not term.has_p:
            body(f"{var} = tl.sum({var}, axis=2, keep_dims=True)")
        if not term.has_n:
            body(f"{var} = tl.sum({var}, axis=1, keep_dims=True)")
        parts, part = ("1", "0") if term.has_p else ("NPB", "pid_p")
        width = f"({'N' if term.has_n else '1'} * {'P' if term.has_p else '1'})"
        # the lane offsets within one row (a [1, 1, 1] block where the term has neither)
        inner = " + ".join(["tl.zeros([1, 1, 1], dtype=tl.int64)"]
                           + (["offs_n[None, :, None] * " + ("P" if term.has_p else "1")]
                              if term.has_n else [])
                           + (["offs_p[None, None, :]"] if term.has_p else []))
        lanes = " & ".join(m for m, has in (("mask_n[None, :, None]", term.has_n),
                                            ("mask_p[None, None, :]", term.has_p)) if has)
        if term.has_t:
            mask = "mask_t[:, None, None]" + (f" & {lanes}" if lanes else "")
            body(f"tl.store({term.param} + ((order * {parts} + {part}) * B * T * H + row)"
                 f"[:, None, None] * {width} + {inner}, {var}, mask={mask})")
        else:
            # summed over the block's rows once, after the loop: a sum over t in the loop is
            # a shuffle tree every block (VMamba's n = 16 block: 3472 -> 3232 instructions,
            # 754 -> 652 shuffles an iteration, sm_90a)
            acc = f"acc_{term.name}"
            pre(f"{acc} = tl.zeros([BT, {'BN' if term.has_n else 1}, "
                f"{'BP' if term.has_p else 1}], dtype={ct})")
            body(f"{acc} += {var}")
            post(f"{acc} = tl.sum({acc}, axis=0, keep_dims=True)")
            store = (f"tl.store({term.param} + (((order * {parts} + {part}) * "
                     f"tl.num_programs(0) + seq) * H + h_idx) * {width} + {inner}, {acc}")
            post(store + (f", mask={lanes})" if lanes else ")"))


def buffers(terms: list[DecayTerm], nd: int, npb: int, sizes: dict, S: int,
            dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Unfilled: every entry is stored (each order and p-block walks every row of every
    sequence, and each program stores its sums), as d query and d key are; a zero fill of
    VMamba's (b, t, h, p) term was 308 MB a step at 56x56, b=32."""
    return {t.name: torch.empty(t.shape(nd, npb, sizes, S), dtype=dtype, device=device)
            for t in terms}


def summed_partials(buf: torch.Tensor, groups: int | None = None) -> torch.Tensor:
    """(orders, partials, ...) -> (orders, ...): the p-blocks' partials summed for every order
    in one launch (the only one taken as it is), the orders' sums consecutive slices of one
    buffer, which a cross2d chain rule takes without stacking them. With `groups`, a
    (orders, partials, b, t, h, n) buffer is summed over each group's heads in the same launch:
    (orders, b, t, groups, n)."""
    if groups is not None:
        return buf.unflatten(4, (groups, -1)).sum((1, 5))
    return buf[:, 0] if buf.shape[1] == 1 else buf.sum(1)


def canonical(term: DecayTerm, buf: torch.Tensor, varlen: bool) -> torch.Tensor:
    """Every order's term as a canonical (b, t, h, n, p) tensor (size 1 where summed) on a
    leading order axis (`summed_partials`)."""
    g = summed_partials(buf)
    if term.has_t:
        return g
    g = g.unsqueeze(2)                       # (orders, sequences, 1, h, n, p)
    if varlen or not term.has_b:
        g = g.sum(1, keepdim=True)
    return g
