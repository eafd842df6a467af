"""`kernel.backward` for the Triton backend (the contract is in ssmc/backends/base.py).

Three steps, after `ssmc.passes.derive_backward` (sympy.diff of the elementwise parts):

1. Epilogue: dy = grad_out * dE/dy. Where dE/dy or dE/d input depends on y, y (before the
   epilogue, summed over directions) is recomputed by the lowering's forward kernels first.
2. Recurrence: the lowering's backward kernels turn dy (and grad_final) into the gradients of
   the recurrence operands, per direction, and dL/d initial_state:
   scan -> lowerings/scan_bwd.py (every decay kind: d decay from checkpointed states);
   chunked -> lowerings/chunked_bwd.py (d log_decay by the q dq - k dk identity);
   quadratic -> the chunked backward (the same mathematics).
3. Chain rule: d input = sum over operands of d operand * d operand/d input (+ grad_out *
   dE/d input), evaluated with vectorised torch ops on canonical (b, t, h, n, p) broadcast
   tensors in the compute type (fp32; fp64 for fp64 inputs), summed over the axes the input
   lacks and over the heads of a group for `g` inputs, and cast to the input's dtype.

Everything is linear in t in memory; nothing loops over t in Python.
"""
from __future__ import annotations

import dataclasses

import torch

from ...ir import Y, Program
from ...passes.derive_backward import cse, derive_backward
from ...plan import Plan
from ...reference.evaluate import CANON, evaluate, to_canonical
from ..cache import cache_root, get_or_build_text
from .common import compute_dtype
from .lowerings import chunked_bwd, scan_bwd


def backward_lowering(plan: Plan) -> str:
    """Which backward implements a plan: its own for scan and chunked; quadratic uses chunked."""
    return "scan" if plan.lowering == "scan" else "chunked"


def load_backward_module(backend, plan: Plan):
    """The generated backward kernels of `plan`, cached on disk beside the forward's."""
    import importlib.util
    import sys

    render = scan_bwd.render if plan.lowering == "scan" else chunked_bwd.render
    key = plan.cache_key(backend.cache_tag()) + "_bwd"
    path = cache_root("triton") / f"{key}.py"
    get_or_build_text(path, lambda: render(plan))
    name = f"ssmc_triton_{key}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def _evaluate_all(exprs: list, env: dict, like: torch.Tensor) -> list:
    """Evaluate expressions sharing common subexpressions once."""
    replacements, reduced = cse(list(exprs))
    env = dict(env)
    for sym, sub in replacements:
        env[sym.name] = evaluate(sub, env, like)
    return [evaluate(e, env, like) for e in reduced]


def _canonical_target(inp, sizes: dict) -> list[int]:
    target = [1] * 5
    for a in inp.axes:
        slot = CANON.index("h" if a == "g" else a)
        target[slot] = sizes["h"] if a == "g" else sizes[a]
    return target


def _reduce(grad: torch.Tensor, target: list[int]) -> torch.Tensor:
    """Sum a canonical gradient over the axes where the target has size 1; each term of the
    chain rule is reduced on its own (terms broadcast differently: a value term over p, a
    decay term over n)."""
    dims = [i for i in range(5) if target[i] == 1 and grad.shape[i] != 1]
    if dims:
        grad = grad.sum(dim=dims, keepdim=True)
    return grad.expand(target) if list(grad.shape) != list(target) else grad


def _to_input(grad: torch.Tensor, inp, sizes: dict) -> torch.Tensor:
    """A canonical (b, t, h, n, p) gradient of the input's canonical shape, in the input's own
    axes and layout (heads of a group summed for `g` inputs)."""
    if "g" in inp.axes and sizes["h"] != sizes["g"]:
        s = list(grad.shape)
        grad = grad.reshape(s[0], s[1], sizes["g"], sizes["h"] // sizes["g"], s[3], s[4]).sum(3)
    # canonical order -> the input's axis order
    order = sorted(range(len(inp.axes)), key=lambda i: CANON.index(
        "h" if inp.axes[i] == "g" else inp.axes[i]))
    canon_axes = [inp.axes[i] for i in order]
    keep = [CANON.index("h" if a == "g" else a) for a in canon_axes]
    grad = grad.reshape([grad.shape[i] for i in keep]) if keep else grad.reshape(())
    perm = [canon_axes.index(a) for a in inp.axes]
    return grad.permute(perm) if perm else grad


def make_backward(backend, plan: Plan):
    """The `backward(tensors, sizes, initial_state, cu_seqlens, grad_out, grad_final)` of one
    compiled Triton kernel."""
    prog: Program = plan.program
    exprs = derive_backward(prog)
    bplan = plan if plan.lowering != "quadratic" else dataclasses.replace(plan,
                                                                          lowering="chunked")
    use_scan = bplan.lowering == "scan"
    state = {}

    def modules():
        if "bwd" not in state:
            state["bwd"] = load_backward_module(backend, bplan)
        return state["bwd"]

    def backward(tensors, sizes, initial_state, cu_seqlens, grad_out, grad_final):
        module = modules()
        cdt = compute_dtype(plan)
        B, T, H, N, P = (sizes[a] for a in "bthnp")
        device = grad_out.device
        want_y = exprs.needs_y
        if use_scan:
            saved, y = scan_bwd.forward_pass(module, bplan, tensors, sizes, initial_state,
                                             cu_seqlens, want_y)
        else:
            saved, y = chunked_bwd.forward_pass(module, bplan, tensors, sizes,
                                                initial_state, cu_seqlens, want_y)
        env = {i.name: to_canonical(tensors[i.name].to(cdt), i.axes, sizes)
               for i in prog.inputs}
        if y is not None:
            env[Y.name] = y.unsqueeze(3)
        g_out = grad_out.to(cdt).unsqueeze(3)                     # (b, t, h, 1, p)
        (dEdy,) = _evaluate_all([exprs.epilogue_dy], env, g_out)
        dy = (g_out * dEdy).expand(B, T, H, 1, P).squeeze(3).contiguous()

        if use_scan:
            per_dir = scan_bwd.backward_pass(module, bplan, tensors, sizes, saved, dy,
                                             grad_final, cu_seqlens)
        else:
            per_dir = chunked_bwd.backward_pass(module, bplan, tensors, sizes, saved, dy,
                                                grad_final, cu_seqlens)
        op_grads: dict[str, torch.Tensor] = {}
        for grads, _ in per_dir:
            for k, v in grads.items():
                op_grads[k] = v if k not in op_grads else op_grads[k] + v

        result = {}
        for inp in prog.inputs:
            terms, factors = [], []
            for op, d in exprs.operands.items():
                if inp.name in d and op in op_grads:
                    terms.append(op_grads[op])
                    factors.append(d[inp.name])
            if inp.name in exprs.epilogue:
                terms.append(g_out)
                factors.append(exprs.epilogue[inp.name])
            x = tensors[inp.name]
            if not terms:
                result[inp.name] = torch.zeros_like(x)
                continue
            target = _canonical_target(inp, sizes)
            total = None
            for g, f in zip(terms, _evaluate_all(factors, env, g_out)):
                part = _reduce(g * f, target)
                total = part if total is None else total + part
            result[inp.name] = _to_input(total, inp, sizes).to(x.dtype).contiguous()

        grad_h0 = None
        if initial_state is not None:
            dh0s = [dh0 for _, dh0 in per_dir]
            grad_h0 = (dh0s[0] if len(dh0s) == 1 else torch.stack(dh0s, 0))
            grad_h0 = grad_h0.to(initial_state.dtype)
        return result, grad_h0

    return backward
