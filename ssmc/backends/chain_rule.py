"""The host-side, backend-neutral part of a kernel's backward: the epilogue and the chain rule.

A program is  inputs -> prologue (decay, key, value, query) -> recurrence -> epilogue E(y, x).
A backend computes the recurrence's backward (operand gradients from dy) with its own kernels;
everything around it is the same for every backend and lives here, built on
the derive_backward pass (sympy.diff of the elementwise parts, `Program.backward`):

1. Epilogue (`ChainRule.epilogue`): dy = grad_out * dE/dy, on canonical (b, t, h, n, p)
   broadcast tensors in the compute type. Where dE/dy or dE/d input depends on y (the
   recurrence's output before the epilogue, summed over directions), the backend recomputes y
   first (`ChainRule.needs_y`).
2. The backend's recurrence backward turns dy (and grad_final) into canonical operand
   gradients per direction: "query"/"key" (b, t, h, n, 1), "value" (b, t, h, 1, p), "decay"
   broadcastable over the decay's axes (or "log_decay"), and dL/d initial_state per direction.
   `sum_directions` adds the directions up.
3. Chain rule (`ChainRule.input_grads`): d input = sum over operands of d operand *
   d operand/d input (+ grad_out * dE/d input), evaluated with vectorised torch ops, each term
   summed over the axes the input lacks (terms broadcast differently: a value term over p, a
   decay term over n), over the heads of a group for `g` inputs, and cast to the input's dtype.
   A backend may hand over query/key gradients already summed over each group's heads (where
   those operands read no head-axis input), with their derivatives evaluated per group.
   `initial_state_grad` stacks the per-direction state gradients as the contract wants them.

A cross2d program whose inputs have the order axis k (one slice per scan order) takes its
operand gradients per order instead of summed (`stack_orders`: a leading order axis; order d's
operands read slice d of those inputs), and its canonical inputs with k have that leading axis
too: (k, b, t, h, n, p). The chain rule runs once over all orders, broadcasting the inputs
without k over them; an input with k keeps each order's gradient in its slice, the others are
summed over the orders with the axes they lack.

Everything is linear in t in memory; nothing loops over t in Python.
"""
from __future__ import annotations

import functools

import sympy as sp
import torch

from ..errors import SpecError, UnsupportedError
from ..ir import Program, Y
from ..ir.backward import Underivable, cse
from ..ir.evaluate import CANON, evaluate, to_canonical
from ..ir.orders import ORDER_AXIS
from .base import RESET_BELOW


def canonical(x: torch.Tensor, axes: tuple[str, ...], sizes: dict) -> torch.Tensor:
    """`to_canonical`, and for an input with the order axis k a 6-d (k, b, t, h, n, p) view
    (k leading, so that it broadcasts against the canonical tensors without it)."""
    if ORDER_AXIS not in axes:
        return to_canonical(x, axes, sizes)
    slot = {a: 0 if a == ORDER_AXIS else 1 + CANON.index("h" if a == "g" else a) for a in axes}
    order = sorted(range(len(axes)), key=lambda i: slot[axes[i]])
    shape = [1] * 6
    for i in order:
        shape[slot[axes[i]]] = x.shape[i]
    y = (x.permute(order) if order != sorted(order) else x).reshape(shape)
    if "g" in axes and sizes["h"] != sizes["g"]:
        y = y.repeat_interleave(sizes["h"] // sizes["g"], dim=3)
    return y


class CanonicalInputs(dict):
    """The inputs as canonical (b, t, h, n, p) tensors in the compute type, made on first use:
    most derivatives read few inputs, and a canonical group input (key or query shared by
    the heads of a group) is h/g times the input's size. An input with the order axis k is
    (k, b, t, h, n, p) (`canonical`)."""

    def __init__(self, program: Program, tensors: dict, sizes: dict, cdt: torch.dtype):
        super().__init__()
        self._program = program
        self._axes = {i.name: i.axes for i in program.inputs}
        self._tensors, self._sizes, self._cdt = tensors, sizes, cdt
        self._groups = None

    def groups(self) -> "CanonicalInputs":
        """The same inputs with one entry per group on the h axis (for derivatives of an
        operand that reads no head-axis input: they are the same for every head of a group)."""
        if self._groups is None:
            self._groups = CanonicalInputs(self._program, self._tensors,
                                           dict(self._sizes, h=self._sizes["g"]), self._cdt)
        return self._groups

    def __missing__(self, name: str) -> torch.Tensor:
        if name not in self._axes:
            raise KeyError(name)
        x = self._tensors[name]
        x = x if x.dtype == self._cdt else x.to(self._cdt)   # no op to dispatch: host time
        value = canonical(x, self._axes[name], self._sizes)
        self[name] = value
        return value


class _LazyGradOut:
    """grad_out as a canonical (b, t, h, 1, p) tensor in the compute type, converted only if
    a host-side term needs it."""

    def __init__(self, grad_out: torch.Tensor, cdt: torch.dtype):
        self.grad_out, self.cdt = grad_out, cdt
        self.like = torch.zeros((), dtype=cdt, device=grad_out.device)

    def tensor(self) -> torch.Tensor:
        return self.grad_out.to(self.cdt).unsqueeze(3)


class _Scope(dict):
    """Local names (common subexpressions) over a shared environment."""

    def __init__(self, outer: dict):
        super().__init__()
        self._outer = outer

    def __missing__(self, name: str):
        return self._outer[name]


def evaluate_all(exprs: list, env: dict, like: torch.Tensor) -> list:
    """Evaluate expressions sharing common subexpressions once."""
    if not exprs:
        return []
    replacements, reduced = cse(exprs)
    scope = _Scope(env)
    for sym, sub in replacements:
        scope[sym.name] = evaluate(sub, scope, like)
    return [evaluate(e, scope, like) for e in reduced]


def canonical_target(inp, sizes: dict) -> list[int]:
    """The canonical (b, t, h, n, p) shape of an input (g counted as h; absent axes 1), with
    the order axis in front for an input that has it: (k, b, t, h, n, p)."""
    target = [1] * 5
    for a in inp.axes:
        if a != ORDER_AXIS:
            slot = CANON.index("h" if a == "g" else a)
            target[slot] = sizes["h"] if a == "g" else sizes[a]
    return [sizes[ORDER_AXIS]] + target if ORDER_AXIS in inp.axes else target


def reduce_to(grad: torch.Tensor, target: list[int]) -> torch.Tensor:
    """Sum a canonical gradient over the axes where the target has size 1, and over a leading
    order axis the target lacks (a term of a cross2d input without k: the orders' sum); each
    term of the chain rule is reduced on its own (terms broadcast differently: a value term
    over p, a decay term over n)."""
    lead = grad.dim() - len(target)
    dims = list(range(lead)) + [
        i for i in range(-min(len(target), grad.dim()), 0)
        if target[i] == 1 and grad.shape[i] != 1]
    if dims:
        grad = grad.sum(dim=dims, keepdim=True)
        if lead > 0:
            grad = grad.reshape(grad.shape[lead:])
    return grad.expand(target) if list(grad.shape) != list(target) else grad


def sum_groups(grad: torch.Tensor, sizes: dict) -> torch.Tensor:
    """A canonical gradient with h heads -> one with g entries (each group's heads summed)."""
    s = list(grad.shape)
    return grad.reshape(*s[:-3], sizes["g"], sizes["h"] // sizes["g"], s[-2], s[-1]).sum(-3)


def to_input(grad: torch.Tensor, inp, sizes: dict) -> torch.Tensor:
    """A canonical (b, t, h, n, p) gradient of the input's canonical shape (h axis g long for
    `g` inputs: heads of a group summed; the order axis in front for an input with k), in the
    input's own axes and layout."""
    lead = grad.dim() - 5

    def slot(a):
        return 0 if a == ORDER_AXIS else lead + CANON.index("h" if a == "g" else a)
    # canonical order -> the input's axis order
    canon_axes = sorted(inp.axes, key=slot)
    keep = [slot(a) for a in canon_axes]
    grad = grad.reshape([grad.shape[i] for i in keep]) if keep else grad.reshape(())
    perm = [canon_axes.index(a) for a in inp.axes]
    return grad.permute(perm) if perm != sorted(perm) else grad


def sum_directions(per_dir) -> dict[str, torch.Tensor]:
    """[(operand grads, dh0) per direction] -> operand grads summed over the directions."""
    op_grads: dict[str, torch.Tensor] = {}
    for grads, _ in per_dir:
        for k, v in grads.items():
            op_grads[k] = v if k not in op_grads else op_grads[k] + v
    return op_grads


class OrderBuffers:
    """Each order's operand gradient as slice d of one (orders, ...) buffer per operand, so
    that `stack_orders` takes the buffer as it is: stacking copies every order's part (three
    (b, t, n) fp32 gradients of a cross2d Mamba-2 training step: 0.2 ms on an H100)."""

    def __init__(self, orders: int, device):
        self.orders, self.device, self.buffers = orders, device, {}

    def __call__(self, key: str, order: int, shape, dtype) -> torch.Tensor:
        buf = self.buffers.get(key)
        if buf is None or buf.shape[1:] != tuple(shape) or buf.dtype != dtype:
            buf = self.buffers[key] = torch.empty(self.orders, *shape, dtype=dtype,
                                                  device=self.device)
        return buf[order]


def _stacked(parts: list) -> torch.Tensor | None:
    """The (orders, ...) view of the buffer whose consecutive slices `parts` are, or None."""
    first = parts[0]
    base = first._base
    if base is None or first.numel() == 0 or not base.is_contiguous():
        return None
    if any(p._base is not base or p.shape != first.shape or not p.is_contiguous()
           for p in parts):
        return None
    step = first.numel() * first.element_size()
    if base.data_ptr() != first.data_ptr() or base.numel() != first.numel() * len(parts):
        return None
    if any(p.data_ptr() != first.data_ptr() + d * step for d, p in enumerate(parts)):
        return None
    return base.view(len(parts), *first.shape)


def stack_orders(per_dir, skip=()) -> dict[str, torch.Tensor]:
    """[(operand grads, dh0) per order] -> operand grads with a leading order axis, for a
    cross2d program with inputs on the order axis k: order d's operands read slice d of those
    inputs, so its terms are not summed with the other orders' before the chain rule. The
    operands in `skip` (whose terms the backend formed per order) are left out. Parts that are
    already the slices of one buffer (`OrderBuffers`) are taken without a copy."""
    out = {}
    for key in per_dir[0][0]:
        if key in skip:
            continue
        parts = [grads[key] for grads, _ in per_dir]
        if any(p.shape != parts[0].shape for p in parts):
            parts = torch.broadcast_tensors(*parts)
        stacked = _stacked(parts)
        out[key] = torch.stack(parts) if stacked is None else stacked
    return out


def initial_state_grad(dh0s: list, initial_state):
    """dL/d initial_state in the contract's layout ((2, ...) for two directions) and dtype;
    None without an initial state."""
    if initial_state is None:
        return None
    grad_h0 = dh0s[0] if len(dh0s) == 1 else torch.stack(dh0s, 0)
    return grad_h0.to(initial_state.dtype)


#: Stand-ins for the value operand's gradient and the output's gradient in `row_terms`.
DV = sp.Symbol("ssmc_dv", real=True)
GOUT = sp.Symbol("ssmc_gout", real=True)
#: the axes of a row: a cross2d input's order axis k is one more index of its rows (each
#: order's terms are evaluated on that order's slice)
ROW_AXES = frozenset("bthp") | {ORDER_AXIS}
FULL_ROW = frozenset("bthp")


class ChainRule:
    """The symbolic derivatives of one program, evaluated on torch tensors."""

    def __init__(self, program: Program):
        self.program = program
        if program.backward is None:
            raise SpecError(f"{program.name}: the program carries no derivatives; it must come "
                            "from ssmc.passes.run_pipeline (as every definition's does)")
        if isinstance(program.backward, Underivable):
            raise UnsupportedError(f"{program.name}: no gradient: {program.backward.reason}")
        self.exprs = program.backward

    def _reads_rows_only(self, expr: sp.Expr) -> bool:
        """Whether every input `expr` reads lives on (b, t, h, p) rows (no n, no groups)."""
        axes = self._input_axes
        return all(axes[s.name] <= ROW_AXES for s in expr.free_symbols if s.name in axes)

    @functools.cached_property
    def _input_axes(self) -> dict[str, set]:
        return {i.name: set(i.axes) for i in self.program.inputs}

    @functools.cached_property
    def row_terms(self) -> dict[str, sp.Expr]:
        """input name -> the sum of its terms that live on (b, t, h, p) rows, as one expression
        in DV (d value), GOUT (d output), y and inputs: the value operand's and the epilogue's.
        Only inputs whose axes and whose terms' inputs are all among b t h p (no n, no groups):
        a backend may evaluate these in one fused kernel and pass them to `input_grads`.
        Derived once per program (it is asked on every backward call)."""
        out = {}
        for name, ax in self._input_axes.items():
            expr = sp.Integer(0)
            if name in self.exprs.operands.get("value", {}):
                expr += DV * self.exprs.operands["value"][name]
            if name in self.exprs.epilogue:
                expr += GOUT * self.exprs.epilogue[name]
            if expr != 0 and ax <= ROW_AXES and self._reads_rows_only(expr):
                out[name] = expr
        return out

    @functools.cached_property
    def row_complete(self) -> frozenset:
        """Inputs on full (b, t, h, p) rows whose `row_terms` are their whole gradient (no
        operand but value reads them): a backend may store those terms in the input's dtype."""
        others = set().union(*(d for op, d in self.exprs.operands.items() if op != "value"))
        return frozenset(name for name in self.row_terms
                         if self._input_axes[name] - {ORDER_AXIS} == FULL_ROW
                         and name not in others)

    @functools.cached_property
    def row_value_terms(self) -> dict[str, sp.Expr]:
        """The value operand's part of `row_terms` alone: a cross2d program with per-order
        inputs has one per order (on that order's d value and input slices), where the
        epilogue's part comes once, after the orders are summed."""
        value = self.exprs.operands.get("value", {})
        return {name: DV * value[name] for name in self.row_terms if name in value}

    @functools.cached_property
    def row_epilogue_terms(self) -> dict[str, sp.Expr]:
        """The epilogue's part of `row_terms` alone (see `row_value_terms`)."""
        return {name: GOUT * self.exprs.epilogue[name] for name in self.row_terms
                if name in self.exprs.epilogue}

    @functools.cached_property
    def rows_per_order(self) -> bool:
        """Whether `row_terms` split into per-order value parts and one epilogue part: the
        epilogue's derivatives read no per-order input and are of none (the epilogue runs
        once, on the orders' sum)."""
        axes = self._input_axes
        read = {s.name for e in self.row_epilogue_terms.values() for s in e.free_symbols}
        return not any(ORDER_AXIS in axes.get(name, ())
                       for name in read | set(self.row_epilogue_terms))

    @property
    def needs_y(self) -> bool:
        """Whether the epilogue's derivatives need y (recomputed by the backend)."""
        return self.exprs.needs_y

    @property
    def dy_needs_y(self) -> bool:
        """Whether dy = grad_out * dE/dy needs y (else y may come after the recurrence's
        backward, for the other terms)."""
        return Y in self.exprs.epilogue_dy.free_symbols

    @functools.cached_property
    def row_dy(self) -> sp.Expr | None:
        """dy = GOUT * dE/dy as a row expression (see `row_terms`), or None where dE/dy reads
        an input off the (b, t, h, p) rows."""
        expr = GOUT * self.exprs.epilogue_dy
        return expr if self._reads_rows_only(expr) else None

    def epilogue(self, tensors: dict, sizes: dict, y, grad_out: torch.Tensor,
                 cdt: torch.dtype, want_dy: bool = True):
        """(env, g_out, dy): the canonical inputs (and y) in the compute type `cdt`, grad_out
        as (b, t, h, 1, p), and dy = grad_out * dE/dy as a contiguous (b, t, h, p) tensor
        (None without `want_dy`: the backend computed it). `y` is (b, t, h, p) summed over
        directions, or None when not `needs_y`."""
        B, T, H, P = (sizes[a] for a in "bthp")
        env = CanonicalInputs(self.program, tensors, sizes, cdt)
        if y is not None:
            env[Y.name] = y.unsqueeze(3)
        if not want_dy:    # g_out made on first use: the backend may have taken all its terms
            return env, _LazyGradOut(grad_out, cdt), None
        g_out = grad_out.to(cdt).unsqueeze(3)                     # (b, t, h, 1, p)
        (dEdy,) = evaluate_all([self.exprs.epilogue_dy], env, g_out)
        dy = (g_out * dEdy).expand(B, T, H, 1, P).squeeze(3).contiguous()
        return env, g_out, dy

    def _without_reset_steps(self, op_grads: dict, env, per_group: bool) -> dict:
        """d log_decay is exactly 0 at a reset (a step whose log-decay is below RESET_BELOW,
        which every kernel takes as a decay of exactly 0): dL/dl = a dL/da. Kernels that form it
        by the chunk identity (q dq - k dk) leave a rounding residue of the other steps' terms
        there instead."""
        dl = op_grads.get("log_decay")
        if dl is None or self.program.log_decay is None:
            return op_grads
        scope = env.groups() if per_group else env
        ld = evaluate(self.program.log_decay.expr, scope, dl)
        return dict(op_grads, log_decay=torch.where(ld < RESET_BELOW, 0.0, dl))

    def input_grads(self, env: dict, g_out: torch.Tensor, op_grads: dict, tensors: dict,
                    sizes: dict, row_parts: dict | None = None,
                    grouped: frozenset = frozenset(),
                    epilogue: bool = True,
                    resets_zeroed: bool = False) -> dict[str, torch.Tensor]:
        """Gradients of every input (its shape and dtype) from the operand gradients
        `op_grads` (summed over directions; for a program with inputs on the order axis k,
        per order on a leading order axis: `stack_orders`) and the epilogue's direct terms
        (none without `epilogue`: a loss on the hidden attention matrix, which comes before the
        epilogue). `row_parts`: input name -> its `row_terms` already evaluated by the backend
        (a canonical tensor, summed or partly summed over the axes the input lacks); those
        terms are not redone.
        `grouped`: operands whose gradient the backend summed over each group's heads (h axis
        g long; only for operands that read no head-axis input). An entry (operand, input) of
        `op_grads` is that operand's whole term of the input's gradient, formed by the backend
        (canonical, partly summed): it replaces d operand * d operand / d input.
        `resets_zeroed`: the backend's log-decay gradient is already 0 at reset steps
        (`_without_reset_steps`: two passes over it saved)."""
        exprs = self.exprs
        row_parts = row_parts or {}
        H, G = sizes["h"], sizes["g"]
        if not resets_zeroed:
            op_grads = self._without_reset_steps(op_grads, env,
                                                 "log_decay" in grouped and H != G)
        result = {}
        for inp in self.program.inputs:
            terms = []      # (canonical gradient, factor, whether it is per group)
            done = inp.name in row_parts
            for op, d in exprs.operands.items():
                if (op, inp.name) in op_grads:   # the backend formed this term itself
                    terms.append((op_grads[op, inp.name], sp.Integer(1), False))
                elif inp.name in d and op in op_grads and not (done and op == "value"):
                    terms.append((op_grads[op], d[inp.name], op in grouped and H != G))
            if epilogue and inp.name in exprs.epilogue and not done:
                if isinstance(g_out, _LazyGradOut):
                    g_out = g_out.tensor()
                terms.append((g_out, exprs.epilogue[inp.name], False))
            if done:
                terms.append((row_parts[inp.name], sp.Integer(1), False))
            x = tensors[inp.name]
            if not terms:
                result[inp.name] = torch.zeros_like(x)
                continue
            target = canonical_target(inp, sizes)
            per_group = "g" in inp.axes and H != G
            target_g = target[:-3] + [G] + target[-2:]
            like = g_out.like if isinstance(g_out, _LazyGradOut) else g_out
            values = {}
            for level in (False, True):
                # a factor of exactly 1 (key = B, say) passes its term on without a product
                scaled = [i for i, (_, f, grp) in enumerate(terms) if f != 1 and grp == level]
                scope = env.groups() if level else env
                values.update(zip(scaled, evaluate_all([terms[i][1] for i in scaled], scope,
                                                       like)))
            # a lone term's constant factor (a query scale, say) goes into the final copy to
            # the input's dtype and layout: one pass over the gradient, not two (GLA, H100:
            # the product alone was 0.11 ms of a 5.5 ms training step)
            scale = values.pop(0) if len(terms) == 1 and 0 in values and \
                values[0].dim() == 0 else None
            total = None
            for i, (g, _, grp) in enumerate(terms):
                g = g * values[i] if i in values else g
                if grp:      # h axis g long: the input has g, or no head axis at all
                    part = reduce_to(g, target_g if per_group else target)
                else:
                    part = reduce_to(g, target)
                    if per_group:
                        part = sum_groups(part, sizes)
                total = part if total is None else total + part
            grad = to_input(total, inp, sizes)
            if scale is not None:   # the factor, the cast and the layout in one pass
                grad = torch.mul(grad, scale, out=torch.empty(x.shape, dtype=x.dtype,
                                                              device=grad.device))
            elif grad.dtype != x.dtype:   # the cast and the layout in one copy, not two
                grad = grad.to(x.dtype, memory_format=torch.contiguous_format)
            result[inp.name] = grad.contiguous()
        return result
