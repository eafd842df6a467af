"""The chain rule's row terms evaluated in the chunked backward's dv kernel.

The row terms (`ChainRule.row_terms`: d value times d value / d input, and grad_out times
d epilogue / d input, on (b, t, h, p) rows; Mamba-2's dx, dz, d dt, dD) read dv and y, which
the dv kernel (chunked_bwd.render_dv_kernel) holds in registers for its (chunk, head, p-block).
Evaluated there, dv and y need not be stored and read back by a separate row kernel
(chain_rows.py): at h=80 p=64, b*t = 32k that is two bf16 (b, t, h, p) tensors written and read
again, plus the row kernel's own loads of the value's input, which the dv kernel has loaded.
It also takes dv and y in fp32 rather than rounded to bf16.

Only for one direction (several directions' dv and y are summed before the chain rule) without
per-order inputs, where dy does not need y, and for decays without n (the only backward with a
dv kernel of whole chunk rows). Each term is stored as chain_rows' are, but partly summed per
chunk and per p-block instead of per block of t:

    input has t and p   (b, t, h, p) rows, in the input's dtype where the rows are its whole
                        gradient (`ChainRule.row_complete`)
    t, not p            (p-blocks, b, t, h) partials
    p, not t            (chunks, h, p) partials
    neither             (p-blocks, chunks, h) partials

`canonical` turns them into chain_rows' canonical (b, t or t-blocks, h, 1, p or 1) tensors: a
chunk of a sequence is one of its t-blocks (with packed sequences b is 1).
"""
from __future__ import annotations

import dataclasses

import sympy as sp
import torch

from ....ir import Y
from ....ir.orders import has_order_axis
from ....plan import Plan
from ...chain_rule import DV, GOUT, ChainRule
from ..chain_rows import reduced_term
from ..render import Context, Emitter
from .chunked_bwd import V_TILE, decay_mode


@dataclasses.dataclass(frozen=True)
class FusedRows:
    """What the dv kernel evaluates, and what it must still store for the rest of the chain
    rule: dv where an input outside the row terms reads the value, y where an epilogue term
    outside them reads y."""
    terms: dict[str, sp.Expr]
    axes_of: dict[str, frozenset]
    complete: frozenset
    store_dv: bool
    store_y: bool

    @property
    def uses_y(self) -> bool:
        return any(Y in e.free_symbols for e in self.terms.values())

    def params(self) -> str:
        """The dv kernel's extra parameters."""
        outs = "".join(f"ssmc_row{k}, " for k in range(len(self.terms)))
        return f"ssmc_gout, s_go_b, s_go_t, s_go_h, s_go_p, {outs}NCH,"

    def arguments(self, grad_out: torch.Tensor, outs: list, n_chunks: int) -> dict:
        """`params`' values: grad_out (any strides), the `buffers`, the chunk count."""
        args = dict(zip(("ssmc_gout", "s_go_b", "s_go_t", "s_go_h", "s_go_p"),
                        (grad_out, *grad_out.stride())))
        args.update({f"ssmc_row{k}": out for k, out in enumerate(outs)})
        return dict(args, NCH=max(n_chunks, 1))

    def emit(self, plan: Plan, body: Emitter, loaded: dict[str, str], ct: str):
        """Emit the terms into the dv kernel's `body`, after dv and (where a term reads it) y.
        `loaded` maps inputs the kernel holds (the value's bare input) to their variables.
        Uses the kernel's `row`, `pmask`, `t_row`, `mask_t`, `offs_p`, `mask_p`, `chunk` and
        `pid_p`."""
        terms = list(enumerate(self.terms.items()))
        tag = "rows"
        ctx = Context(plan.program, V_TILE, body, tag, ct)
        ctx.loaded.update({DV.name: "dv", Y.name: "y"})
        for name, var in loaded.items():
            body(f"{var}_{tag} = {var}.to({ct})")
            ctx.loaded[name] = f"{var}_{tag}"
        if any(GOUT in e.free_symbols for _, (_, e) in terms):
            body(f"go_{tag} = tl.load(ssmc_gout + b_idx * s_go_b + t_row[:, None] * s_go_t"
                 " + h_idx * s_go_h + offs_p[None, :] * s_go_p, mask=pmask, other=0.0)"
                 f".to({ct})")
            ctx.loaded[GOUT.name] = f"go_{tag}"
        for k, (name, expr) in terms:
            axes = self.axes_of[name]
            v = reduced_term(ctx, body, expr, f"row{k}", axes, "pmask")
            out = f"ssmc_row{k}"
            if "t" in axes and "p" in axes:
                body(f"tl.store({out} + row * P + offs_p[None, :], {v}, mask=pmask)")
            elif "t" in axes:
                body(f"tl.store({out} + pid_p.to(tl.int64) * B * T * H + (b_idx * T + t_row) * H"
                     f" + h_idx, {v}, mask=mask_t)")
            elif "p" in axes:
                body(f"tl.store({out} + (chunk * H + h_idx) * P + offs_p, {v}, mask=mask_p)")
            else:
                body(f"tl.store({out} + (pid_p.to(tl.int64) * NCH + chunk) * H + h_idx, {v})")


def fused_rows(plan: Plan, rule: ChainRule | None = None) -> FusedRows | None:
    """The row terms the dv kernel of `plan` (a chunked backward plan) evaluates, or None where
    they stay with the row kernel."""
    prog = plan.program
    if (decay_mode(plan) == "key" or len(prog.recurrence.directions) != 1
            or has_order_axis(prog)):
        return None
    rule = rule or ChainRule(prog)
    terms = rule.row_terms
    if not terms or rule.dy_needs_y:
        return None
    exprs = rule.exprs
    value_inputs = set(exprs.operands.get("value", {}))
    y_outside = any(Y in e.free_symbols for name, e in exprs.epilogue.items()
                    if name not in terms)
    axes_of = {name: frozenset(prog.input(name).axes) for name in terms}
    return FusedRows(dict(terms), axes_of, frozenset(rule.row_complete),
                     store_dv=not value_inputs <= set(terms),
                     store_y=rule.needs_y and y_outside)


def buffers(rows: FusedRows, tensors: dict, sizes: dict, n_chunks: int, npb: int,
            cdt: torch.dtype, device) -> list[torch.Tensor]:
    """The kernel's outputs, one per term (every element is written by exactly one program)."""
    B, T, H, P = (sizes[a] for a in "bthp")
    out = []
    for name in rows.terms:
        axes = rows.axes_of[name]
        if "t" in axes and "p" in axes:
            dtype = tensors[name].dtype if name in rows.complete else cdt
            out.append(torch.empty(B, T, H, P, dtype=dtype, device=device))
        elif "t" in axes:
            out.append(torch.empty(npb, B, T, H, dtype=cdt, device=device))
        elif "p" in axes:
            out.append(torch.empty(max(n_chunks, 1), H, P, dtype=cdt, device=device))
        else:
            out.append(torch.empty(npb, max(n_chunks, 1), H, dtype=cdt, device=device))
    return out


def canonical(rows: FusedRows, outs: list[torch.Tensor], sizes: dict,
              n_chunks: int) -> dict[str, torch.Tensor]:
    """input name -> its terms as a canonical (b, t or chunks, h, 1, p or 1) tensor."""
    B, T, H, P = (sizes[a] for a in "bthp")
    result = {}
    for (name, axes), out in zip(rows.axes_of.items(), outs):
        if n_chunks == 0:      # nothing ran: no rows, or no steps
            shape = (B, T if "t" in axes else 1, H, 1, P if "p" in axes else 1)
            result[name] = torch.zeros(shape, dtype=out.dtype, device=out.device)
        elif "t" in axes and "p" in axes:
            result[name] = out.unsqueeze(3)
        elif "t" in axes:
            result[name] = (out[0] if out.shape[0] == 1 else out.sum(0))[..., None, None]
        elif "p" in axes:
            result[name] = out.view(B, n_chunks // B, H, 1, P)
        else:
            part = out[0] if out.shape[0] == 1 else out.sum(0)
            result[name] = part.view(B, n_chunks // B, H, 1, 1)
    return result
