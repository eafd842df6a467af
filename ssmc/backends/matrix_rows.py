"""The hidden attention matrix and the matrix-matching loss in torch, a block of rows at a time:
the backend-neutral path of `ssmc.attention_matrix` and `ssmc.mixing_loss` (every decay
structure, sign and direction), and their backward.

For one forward direction, on the recurrence operands (prologue evaluated, heads expanded):

    M[t, s] = sum_n q[t, n] k[s, n] W[t, s, n(, p)],   W[t, s] = decay_{s+1} ... decay_t, s <= t

A decay that is positive with an exact log (`Program.decay_log_safe`) enters as log-decays,
W = exp(sum of log-decays); each exponent is a sum over one range of steps (inside the row
block, or between a column and the block's start), never a difference of two long running
sums, so log-decays of -1e4 or -inf give exact zeros and no NaN. Any other decay (zero or
negative values) enters as itself, W = a product of decays (torch's cumprod differentiates
through zeros). A reverse direction is the forward one on time-flipped operands.

Memory is a row block (R rows x t columns x the decay's n and p) at a time, never the whole
per-head matrix unless it is the result. Gradients: autograd through one row block at a time
onto the operands, then the backends' chain rule (`chain_rule.ChainRule`) onto the inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UnsupportedError
from ..ir import DecayKind, Direction, Program
from ..ir.evaluate import evaluate
from .chain_rule import CanonicalInputs, ChainRule

#: elements of the largest temporary of one row block (W: rows x t x n' x p' per head), by
#: device: a GPU takes larger blocks (fewer launches), a CPU's stay in cache
BLOCK_ELEMENTS = 1 << 22
BLOCK_ELEMENTS_CUDA = 1 << 26
#: the largest per-head matrices a backend's `attention_matrix(reduce=...)` materialises
#: before reducing (beyond it: a block of rows at a time)
REDUCE_IN_ROWS_BYTES = 1 << 30


@dataclass
class Operands:
    """The recurrence operands as canonical (b, t, h, n, p) tensors (size-1 axes where an
    operand does not vary); `decay` is log|decay| when `log` else the decay itself; None
    without a decay."""

    query: torch.Tensor
    key: torch.Tensor
    decay: torch.Tensor | None
    log: bool

    def leaves(self) -> "Operands":
        """Detached copies that require grad (the block-wise backward's leaves)."""
        d = None if self.decay is None else self.decay.detach().requires_grad_(True)
        return Operands(self.query.detach().requires_grad_(True),
                        self.key.detach().requires_grad_(True), d, self.log)

    def grads_name(self) -> str:
        return "log_decay" if self.log else "decay"


def operands(program: Program, env: CanonicalInputs) -> Operands:
    """The operands of `program` from its canonical inputs (the IR's evaluator)."""
    rec = program.recurrence
    like = env[program.inputs[0].name]
    q = evaluate(rec.query.expr, env, like)
    k = evaluate(rec.key.expr, env, like)
    if rec.decay is None:
        return Operands(q, k, None, True)
    if program.decay_log_safe:
        return Operands(q, k, evaluate(program.log_decay.expr, env, like), True)
    return Operands(q, k, evaluate(rec.decay.expr, env, like), False)


def per_channel(program: Program, sizes: dict) -> bool:
    """Whether M differs per value channel p (a decay over p, with p > 1)."""
    return program.decay_kind is DecayKind.FULL and sizes["p"] > 1


# --------------------------------------------------------------------------- the matrix

def _heads_major(x: torch.Tensor, sizes: dict, n: int | None) -> torch.Tensor:
    """canonical (b, t, h, n', p') -> (b, h, t, n', p') with b, t, h (and n) expanded."""
    shape = [sizes["b"], sizes["t"], sizes["h"], x.shape[3] if n is None else n, x.shape[4]]
    return x.expand(shape).permute(0, 2, 1, 3, 4)


def _weights(w: torch.Tensor, log: bool, t0: int, t1: int) -> torch.Tensor:
    """W (b, h, R, t1, n', p') for the rows t0 <= t < t1 and columns s < t1 (0 where s > t),
    from the decays w (b, h, T, n', p') of one forward direction."""
    blk = w[:, :, t0:t1]
    R = t1 - t0
    i = torch.arange(R, device=w.device)
    later = (i[:, None] > i[None, :])[:, :, None, None]     # step u of the block after s
    causal = (i[:, None] >= i[None, :])[:, :, None, None]
    prev = w[:, :, :t0]
    if log:
        # inside the block: sum_{s < u <= t} ld_u, a cumulative sum down the columns
        inside = torch.where(later, blk[:, :, :, None], 0.0).cumsum(2)
        inside = torch.where(causal, inside, float("-inf"))
        # before it: (sum over t0..t) + (sum over s+1..t0-1), two disjoint ranges
        after = prev
        if t0:
            after = torch.cat([prev.flip(2).cumsum(2).flip(2)[:, :, 1:],
                               torch.zeros_like(blk[:, :, :1])], 2)
        before = blk.cumsum(2)[:, :, :, None] + after[:, :, None, :]
        return torch.cat([before, inside], 3).exp()
    inside = torch.where(later, blk[:, :, :, None], 1.0).cumprod(2)
    inside = torch.where(causal, inside, 0.0)
    after = prev
    if t0:
        after = torch.cat([prev.flip(2).cumprod(2).flip(2)[:, :, 1:],
                           torch.ones_like(blk[:, :, :1])], 2)
    before = blk.cumprod(2)[:, :, :, None] * after[:, :, None, :]
    return torch.cat([before, inside], 3)


def _forward_rows(q, k, w, log: bool, t0: int, t1: int) -> torch.Tensor:
    """M (b, h, p', R, t1) of one forward direction; q, k (b, h, T, n); w (b, h, T, n', p')
    or None."""
    qb, kb = q[:, :, t0:t1], k[:, :, :t1]
    if w is None:
        i = torch.arange(t0, t1, device=q.device)
        causal = i[:, None] >= torch.arange(t1, device=q.device)[None, :]
        return torch.where(causal, qb @ kb.transpose(-1, -2), 0.0).unsqueeze(2)
    W = _weights(w, log, t0, t1)                              # (b, h, R, S, n', p')
    if W.shape[4] == 1:
        return ((qb @ kb.transpose(-1, -2))[..., None] * W[:, :, :, :, 0]).permute(0, 1, 4, 2, 3)
    return torch.einsum("bhrn,bhsn,bhrsnp->bhprs", qb, kb, W)


def rows(program: Program, ops: Operands, sizes: dict, t0: int, t1: int) -> torch.Tensor:
    """M (b, h, p', t1 - t0, t) for the rows t0 <= t < t1, summed over the directions."""
    T = sizes["t"]
    q = _heads_major(ops.query, sizes, sizes["n"])[..., 0]
    k = _heads_major(ops.key, sizes, sizes["n"])[..., 0]
    w = None if ops.decay is None else _heads_major(ops.decay, sizes, None)
    total = 0
    for direction in program.recurrence.directions:
        if direction.column:    # ssmc.matrix refuses grids before this; kept from silence
            raise UnsupportedError(f"{program.name}: no attention matrix over grid orders")
        if direction is Direction.REVERSE:
            fq, fk = q.flip(2), k.flip(2)
            fw = None if w is None else w.flip(2)
            part = _forward_rows(fq, fk, fw, ops.log, T - t1, T - t0).flip(-1).flip(-2)
            part = torch.nn.functional.pad(part, (T - part.shape[-1], 0))
        else:
            part = _forward_rows(q, k, w, ops.log, t0, t1)
            part = torch.nn.functional.pad(part, (0, T - part.shape[-1]))
        total = total + part
    return total


def reduce_heads(M: torch.Tensor, reduce: str, channels: bool) -> torch.Tensor:
    """(b, h, p', R, t) -> the result's layout: (b, h, R, t), (b, h, p, R, t) per channel, or
    (b, R, t) summed or averaged over heads (and channels)."""
    if reduce == "none":
        return M if channels else M[:, :, 0]
    out = M.sum((1, 2))
    return out / (M.shape[1] * M.shape[2]) if reduce == "mean" else out


def row_blocks(program: Program, sizes: dict, device: torch.device):
    """(t0, t1) row blocks whose largest temporary stays near the device's block size."""
    T = sizes["t"]
    ld = program.log_decay if program.decay_log_safe else program.recurrence.decay
    wide = sizes["n"] if ld is not None and "n" in ld.axes else 1
    if per_channel(program, sizes):
        wide *= sizes["p"]
    per_row = max(1, sizes["b"] * sizes["h"] * max(T, 1) * max(wide, 1))
    limit = BLOCK_ELEMENTS_CUDA if device.type == "cuda" else BLOCK_ELEMENTS
    R = max(1, min(T, limit // per_row))
    return [(t0, min(T, t0 + R)) for t0 in range(0, T, R)]


def _env(program: Program, tensors: dict, sizes: dict, cdt) -> CanonicalInputs:
    return CanonicalInputs(program, tensors, sizes, cdt)


def matrix(program: Program, tensors: dict, sizes: dict, cdt: torch.dtype,
           reduce: str = "none") -> torch.Tensor:
    """The hidden attention matrix in `cdt`: (b, h, t, t), (b, h, p, t, t) for a decay over
    p, or (b, t, t) with reduce "sum" / "mean" over heads (and channels)."""
    ops = operands(program, _env(program, tensors, sizes, cdt))
    channels = per_channel(program, sizes)
    with torch.no_grad():
        parts = [reduce_heads(rows(program, ops, sizes, t0, t1), reduce, channels)
                 for t0, t1 in row_blocks(program, sizes, ops.query.device)]
    if parts:
        return torch.cat(parts, -2)
    shape = ((sizes["b"],) if reduce != "none" else
             (sizes["b"], sizes["h"]) + ((sizes["p"],) if channels else ()))
    return torch.zeros(*shape, 0, 0, dtype=cdt, device=next(iter(tensors.values())).device)


def _to_inputs(program: Program, env, leaves: Operands, tensors: dict,
               sizes: dict) -> dict[str, torch.Tensor]:
    """Operand gradients (accumulated on the leaves) -> input gradients by the chain rule."""
    op_grads = {}
    for name, leaf in (("query", leaves.query), ("key", leaves.key),
                       (leaves.grads_name(), leaves.decay)):
        if leaf is not None and leaf.grad is not None:
            op_grads[name] = leaf.grad
    like = leaves.query.new_zeros((1, 1, 1, 1, 1))
    return ChainRule(program).input_grads(env, like, op_grads, tensors, sizes, epilogue=False)


def _accumulate(outputs: torch.Tensor, leaves: list, grad=None) -> None:
    wanted = [x for x in leaves if x is not None]
    grads = torch.autograd.grad(outputs, wanted, grad, allow_unused=True)
    for x, g in zip(wanted, grads):
        if g is not None:
            x.grad = g if x.grad is None else x.grad + g


def matrix_backward(program: Program, tensors: dict, sizes: dict, cdt: torch.dtype,
                    grad: torch.Tensor, reduce: str = "none") -> dict[str, torch.Tensor]:
    """The gradients of every input given the gradient of `matrix(...)` (same layout)."""
    env = _env(program, tensors, sizes, cdt)
    leaves = operands(program, env).leaves()
    grad = grad.to(cdt)
    channels = per_channel(program, sizes)
    with torch.enable_grad():
        for t0, t1 in row_blocks(program, sizes, grad.device):
            M = reduce_heads(rows(program, leaves, sizes, t0, t1), reduce, channels)
            _accumulate(M, [leaves.query, leaves.key, leaves.decay], grad[..., t0:t1, :])
    return _to_inputs(program, env, leaves, tensors, sizes)


# --------------------------------------------------------------------------- the loss

def _teacher_rows(q: torch.Tensor, k: torch.Tensor, scale: float, heads: int, t0: int,
                  t1: int) -> torch.Tensor:
    """Causal softmax(q k^T scale) rows (b, h, R, t); q (b, t, h, d), k (b, t, hk, d)."""
    T = q.shape[1]
    qh = q[:, t0:t1].transpose(1, 2)                                  # (b, h, R, d)
    kh = k.transpose(1, 2).repeat_interleave(heads // k.shape[2], 1)  # (b, h, t, d)
    i = torch.arange(t0, t1, device=q.device)
    causal = i[:, None] >= torch.arange(T, device=q.device)[None, :]
    s = torch.where(causal, (qh @ kh.transpose(-1, -2)) * scale, float("-inf"))
    return torch.softmax(s, -1)


def _loss_rows(program, ops, q, k, scale, sizes, t0, t1) -> torch.Tensor:
    """sum over the rows t0 <= t < t1 of ||M - P||^2, per (b, h)."""
    M = rows(program, ops, sizes, t0, t1)                    # (b, h, p', R, t)
    P = _teacher_rows(q, k, scale, sizes["h"], t0, t1)       # (b, h, R, t)
    return (M - P[:, :, None]).square().sum((2, 3, 4))


def mixing_loss(program: Program, tensors: dict, sizes: dict, q: torch.Tensor,
                k: torch.Tensor, scale: float, cdt: torch.dtype) -> torch.Tensor:
    """(b, h): sum_{t, s} (M - causal softmax(q k^T scale))^2 per head (and summed over the
    value channels where M is per channel), in `cdt`."""
    ops = operands(program, _env(program, tensors, sizes, cdt))
    q, k = q.to(cdt), k.to(cdt)
    total = torch.zeros(sizes["b"], sizes["h"], dtype=cdt, device=q.device)
    with torch.no_grad():
        for t0, t1 in row_blocks(program, sizes, q.device):
            total += _loss_rows(program, ops, q, k, scale, sizes, t0, t1)
    return total


def mixing_loss_backward(program: Program, tensors: dict, sizes: dict, q: torch.Tensor,
                         k: torch.Tensor, scale: float, cdt: torch.dtype, grad: torch.Tensor):
    """(input gradients, dq, dk) of `mixing_loss` given its gradient `grad` (b, h)."""
    env = _env(program, tensors, sizes, cdt)
    leaves = operands(program, env).leaves()
    ql = q.detach().to(cdt).requires_grad_(True)
    kl = k.detach().to(cdt).requires_grad_(True)
    grad = grad.to(cdt)
    with torch.enable_grad():
        for t0, t1 in row_blocks(program, sizes, q.device):
            loss = (_loss_rows(program, leaves, ql, kl, scale, sizes, t0, t1) * grad).sum()
            _accumulate(loss, [leaves.query, leaves.key, leaves.decay, ql, kl])
    dq = torch.zeros_like(q) if ql.grad is None else ql.grad.to(q.dtype)
    dk = torch.zeros_like(k) if kl.grad is None else kl.grad.to(k.dtype)
    return _to_inputs(program, env, leaves, tensors, sizes), dq, dk
