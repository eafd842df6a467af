"""One generated kernel for the chain rule's (b, t, h, p) terms.

The chain rule (ssmc/backends/chain_rule.py) multiplies operand gradients by symbolic
derivatives and sums them down to each input's shape. Its terms on (b, t, h, p) rows - the
value operand's gradient times d value / d input, the output gradient times d epilogue / d
input (`ChainRule.row_terms`) - are most of its memory traffic: in eager torch every product,
activation and sum is a pass over a (b, t, h, p) fp32 tensor. Here one program per (b, block of
t, h) loads each operand once, evaluates every input's row terms in registers, sums over p and
over its block of t where the input lacks them, and stores one small or (b, t, h, p) canonical
tensor per input; the host finishes the sums over b, the t-blocks and the heads.
"""
from __future__ import annotations

import sympy as sp
import torch
import triton

from ...ir import Y
from ...ir.orders import ORDER_AXIS
from ...plan import Plan
from ..chain_rule import DV, GOUT, ChainRule
from .common import HEADER, compute_dtype, compute_type, input_args, input_params, next_pow2
from .render import Context, Emitter, Tile

TILE = Tile([("t", "offs_t", "mask_t"), ("p", "offs_p", "mask_p")],
            {"b": "b_idx", "h": "h_idx", "g": "g_idx"})
#: the per-order kernel's tile: an input with the order axis k read at order `o_idx`
ORDER_TILE = Tile(TILE.tiled, dict(TILE.fixed, k="o_idx"))
BT = 32
ROW = "((b_idx * T + offs_t[:, None]) * H + h_idx) * P + offs_p[None, :]"


def _load_rows(body: Emitter, ctx: Context, used: set, ct: str) -> None:
    """y, d value and grad_out, where `used`, loaded once into `ctx`."""
    for sym, ptr, var in ((Y, "ssmc_y", "y_r"), (DV, "ssmc_dv", "dv_r")):
        if sym in used:
            body(f"{var} = tl.load({ptr} + {ROW}, mask=rmask, other=0.0).to({ct})")
            ctx.loaded[sym.name] = var
    if GOUT in used:
        body("go_r = tl.load(ssmc_gout + b_idx * s_go_b + offs_t[:, None] * s_go_t + "
             f"h_idx * s_go_h + offs_p[None, :] * s_go_p, mask=rmask, other=0.0).to({ct})")
        ctx.loaded[GOUT.name] = "go_r"


def _store(body: Emitter, k: int, v: str, axes: set, offset: str = "") -> None:
    """Output k <- term `v` summed over the axes among t and p its input lacks: (b, t, h, p)
    rows, (b, t, h), or a (b, t-block, h, p) / (b, t-block, h) partial the host sums.
    `offset`: where the output's slice starts (an order's, for an input with k)."""
    block = "b_idx * NTB + tb"
    body(f"{v} = tl.where(rmask, {v}, 0.0)")
    if "p" not in axes:
        body(f"{v} = tl.sum({v}, axis=1)")
    if "t" not in axes:
        body(f"{v} = tl.sum({v}, axis=0)")
    if "t" in axes and "p" in axes:
        where, mask = ROW, "rmask"
    elif "t" in axes:
        where, mask = "(b_idx * T + offs_t) * H + h_idx", "mask_t"
    elif "p" in axes:
        where, mask = f"(({block}) * H + h_idx) * P + offs_p", "mask_p"
    else:
        where, mask = f"({block}) * H + h_idx", None
    masked = "" if mask is None else f", mask={mask}"
    body(f"tl.store(ssmc_out{k}{offset} + {where}, {v}{masked})")


def _kernel(plan: Plan, body: Emitter, values: str, n_out: int, extra: str = "") -> str:
    """The kernel around `body`: one program per (b, block of t, h); `values`, the row
    tensors' parameters after the inputs'."""
    outs = ", ".join(f"ssmc_out{k}" for k in range(n_out))
    return HEADER + f"""
@triton.jit
def ssmc_chain_rows(
    {input_params(plan.program)},
    {values}, ssmc_gout, s_go_b, s_go_t, s_go_h, s_go_p, {outs},{extra}
    T, H, P, HPG, NTB, BT: tl.constexpr, BP: tl.constexpr,
):
    b_idx = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1).to(tl.int64)
    h_idx = tl.program_id(2).to(tl.int64)
    g_idx = h_idx // HPG
    offs_t = tb * BT + tl.arange(0, BT)
    mask_t = offs_t < T
    offs_p = tl.arange(0, BP)
    mask_p = offs_p < P
    rmask = mask_t[:, None] & mask_p[None, :]
{body.text()}
"""


def render(plan: Plan, terms: dict[str, sp.Expr], axes_of: dict[str, set] | None = None) -> str:
    """One kernel evaluating `terms` (name -> row expression); each is stored summed over the
    axes among t and p that `axes_of[name]` (default: the input's own axes) lacks."""
    prog = plan.program
    axes_of = axes_of or {name: set(prog.input(name).axes) for name in terms}
    ct = compute_type(plan)
    body = Emitter(indent=1)
    ctx = Context(prog, TILE, body, "r", ct)
    _load_rows(body, ctx, set().union(*(e.free_symbols for e in terms.values())), ct)
    for k, (name, expr) in enumerate(terms.items()):
        _store(body, k, ctx.value(expr, f"g{k}"), axes_of[name])
    return _kernel(plan, body, "ssmc_y, ssmc_dv", len(terms))


def render_orders(plan: Plan, rule: ChainRule, orders: int) -> str:
    """The row terms of a cross2d program with per-order inputs in one kernel: the epilogue's
    terms once, then each order's value terms on its d value (`ssmc_dv{o}`) and its slice of
    the inputs with k, the inputs without k loaded once for all orders. An input without k
    gets the sum over the orders, one with k each order's term in its slice (which starts
    `ssmc_so{k}` elements after the previous)."""
    prog = plan.program
    terms, value_terms = rule.row_terms, rule.row_value_terms
    axes_of = {name: set(prog.input(name).axes) for name in terms}
    shared_axes = {i.name for i in prog.inputs if ORDER_AXIS not in i.axes}
    ct = compute_type(plan)
    body = Emitter(indent=1)
    base = Context(prog, ORDER_TILE, body, "r", ct)
    _load_rows(body, base, set().union(*(e.free_symbols for e in terms.values())) - {DV}, ct)
    sums = {}       # term index -> the variable holding its running sum over the orders
    for k, (name, expr) in enumerate(rule.row_epilogue_terms.items()):
        sums[list(terms).index(name)] = base.value(expr, f"e{k}")
    shared = {n: v for n, v in base.loaded.items() if n in shared_axes or n in (Y.name,
                                                                               GOUT.name)}
    for o in range(orders):
        body(f"o_idx = {o}")
        body(f"dv_r{o} = tl.load(ssmc_dv{o} + {ROW}, mask=rmask, other=0.0).to({ct})")
        ctx = Context(prog, ORDER_TILE, body, f"r{o}", ct, extra={**shared, DV.name: f"dv_r{o}"})
        for k, name in enumerate(terms):
            if name not in value_terms:
                continue
            v = ctx.value(value_terms[name], f"g{k}_{o}")
            if ORDER_AXIS in axes_of[name]:
                _store(body, k, v, axes_of[name], f" + {o} * ssmc_so{k}")
            elif k in sums:
                body(f"{sums[k]} = {sums[k]} + {v}")
            else:
                sums[k] = v
        shared.update((n, v) for n, v in ctx.loaded.items() if n in shared_axes)
    for k, v in sums.items():
        _store(body, k, v, axes_of[list(terms)[k]])
    dvs = ", ".join(f"ssmc_dv{o}" for o in range(orders))
    slices = " ".join(f"ssmc_so{k}," for k in range(len(terms)))
    return _kernel(plan, body, f"ssmc_y, {dvs}", len(terms), f"\n    {slices}")


def _module(backend, plan: Plan, key: str, source):
    """The kernel `source()` renders, rendered once and cached under `key`."""
    return backend.load_generated(plan.cache_key(backend.cache_tag()) + key, source)


def _outputs(terms: dict, axes_of: dict, sizes: dict, device, cdt,
             dtypes: dict | None = None) -> dict[str, torch.Tensor]:
    """Each term's canonical output (b, t or t-blocks, h, 1, p or 1), with a leading order
    axis for an input that has one, in `dtypes[name]` (default the compute type `cdt`)."""
    B, T, H, P = (sizes[a] for a in "bthp")
    ntb = triton.cdiv(T, BT)
    out = {}
    for name in terms:
        axes = axes_of[name]
        shape = (B, T if "t" in axes else ntb, H, 1, P if "p" in axes else 1)
        if ORDER_AXIS in axes:
            shape = (sizes[ORDER_AXIS],) + shape
        out[name] = torch.empty(shape, dtype=(dtypes or {}).get(name, cdt), device=device)
    return out


def _launch(module, plan: Plan, args: list, terms: dict, axes_of: dict, sizes: dict, y,
            dvs: list, grad_out, dtypes=None) -> dict[str, torch.Tensor]:
    """Allocate each term's canonical output (`_outputs`) and launch `module`'s kernel on
    `args` (the inputs' tensors and strides) with the d values `dvs` (one, or one per order:
    then each output with k gets its slices' stride)."""
    out = _outputs(terms, axes_of, sizes, grad_out.device, compute_dtype(plan), dtypes)
    B, T, H, G, P = (sizes[a] for a in "bthgp")
    if B * T * H == 0:
        return {k: v.zero_() for k, v in out.items()}
    slices = () if len(dvs) == 1 else tuple(
        o[0].numel() if ORDER_AXIS in axes_of[n] else 0 for n, o in out.items())
    ntb = triton.cdiv(T, BT)
    dummy = grad_out.new_zeros(1, dtype=compute_dtype(plan))
    module.ssmc_chain_rows[(B, ntb, H)](
        *args, dummy if y is None else y.contiguous(),
        *(dummy if dv is None else dv for dv in dvs), grad_out, *grad_out.stride(),
        *out.values(), *slices, T, H, P, H // G, ntb, BT=BT, BP=max(next_pow2(P), 16))
    return out


def _row_values(rule: ChainRule, sizes: dict, dvs: list) -> list | None:
    """The d values as contiguous (b, t, h, p) tensors (None where absent), or None where a
    row term needs one that is absent."""
    if any(dv is None for dv in dvs) and any(DV in e.free_symbols
                                             for e in rule.row_terms.values()):
        return None
    B, T, H, P = (sizes[a] for a in "bthp")
    return [None if dv is None else dv.reshape(B, T, H, P).contiguous() for dv in dvs]


def epilogue_dy(backend, plan: Plan, rule: ChainRule, tensors: dict, sizes: dict, y,
                grad_out, dtype=None) -> torch.Tensor | None:
    """dy = grad_out * dE/dy as a contiguous (b, t, h, p) tensor in `dtype` (default the
    compute type), or None where dE/dy reads inputs off the rows (the host computes it then)."""
    expr = rule.row_dy
    if expr is None:
        return None
    terms, axes_of = {"dy": expr}, {"dy": set("bthp")}
    module = _module(backend, plan, "_dy", lambda: render(plan, terms, axes_of))
    out = _launch(module, plan, input_args(plan.program, tensors), terms, axes_of, sizes, y,
                  [None], grad_out, {"dy": dtype} if dtype else None)
    B, T, H, P = (sizes[a] for a in "bthp")
    return out["dy"].view(B, T, H, P)


def row_parts(backend, plan: Plan, rule: ChainRule, tensors: dict, sizes: dict, y, grad_out,
              op_grads: dict) -> dict[str, torch.Tensor]:
    """input name -> its row terms as a canonical (b, t or t-blocks, h, 1, p or 1) tensor."""
    terms = rule.row_terms
    dvs = _row_values(rule, sizes, [op_grads.get("value")]) if terms else None
    if dvs is None:
        return {}
    axes_of = {name: set(plan.program.input(name).axes) for name in terms}
    module = _module(backend, plan, "_rows", lambda: render(plan, terms, axes_of))
    # an input's whole gradient is stored in its own dtype (no fp32 copy to convert)
    return _launch(module, plan, input_args(plan.program, tensors), terms, axes_of, sizes, y,
                   dvs, grad_out, {name: tensors[name].dtype for name in rule.row_complete})


def row_parts_per_order(backend, plan: Plan, rule: ChainRule, tensors: dict, sizes: dict, y,
                        grad_out, per_dir: list) -> dict[str, torch.Tensor]:
    """`row_parts` of a cross2d program with per-order inputs (the order axis k), from each
    order's own d value (`per_dir`: [(operand grads, dh0) per order]), in one launch
    (`render_orders`): an input without k gets the orders' sum, one with k a slice per order.
    Empty where the terms do not split so (`ChainRule.rows_per_order`)."""
    terms = rule.row_terms
    dvs = (_row_values(rule, sizes, [grads.get("value") for grads, _ in per_dir])
           if terms and rule.rows_per_order else None)
    if dvs is None:
        return {}
    prog = plan.program
    axes_of = {name: set(prog.input(name).axes) for name in terms}
    module = _module(backend, plan, f"_rows{len(dvs)}",
                     lambda: render_orders(plan, rule, len(dvs)))
    return _launch(module, plan, input_args(prog, tensors, None), terms, axes_of, sizes, y,
                   dvs, grad_out, {name: tensors[name].dtype for name in rule.row_complete})
