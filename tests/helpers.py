"""Shared test helpers: random inputs for the built-ins and `check_against_reference`.

Every kernel test (reference, Triton, TVM) compares an op with the float64 sequential scan
through `check_against_reference`; the factories give inputs in the ranges the built-ins are
used with (negative A, moderate raw dt, decays in (0, 1)), at small, odd shapes.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import sympy as sp
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ssmc
import ssmc.ops
from ssmc import reference
from ssmc.backends.base import RESET_BELOW
from ssmc.ir import Y, Y_AXES, Elementwise, Input
from ssmc.ir.backward import BackwardExprs
from ssmc.ir.evaluate import evaluate
from ssmc.reference.evaluate import canonical_inputs
from ssmc.validate import bind

__all__ = [
    "SHAPES", "ssd_inputs", "selective_scan_inputs", "retention_inputs", "gla_inputs",
    "linear_attention_inputs", "INPUT_FACTORIES", "random_inputs", "random_state", "cu_seqlens",
    "DECAY_AXES", "DIRECTIONS", "make_definition", "Mismatch", "compare",
    "check_against_reference", "reference_of", "TorchOps", "HOST_VALUE",
]


class TorchOps(TorchDispatchMode):
    """The aten ops run inside the block, by name (conftest's torch.empty adds a fill_ to
    each)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


#: tensor methods that read a value on the host (on a GPU each waits for the stream)
HOST_VALUE = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")

#: small, odd shapes: t in (1, 7, 63, 100), groups g < h, state n != value dim p
SHAPES = (
    dict(b=2, t=1, h=4, g=2, n=5, p=3),
    dict(b=2, t=7, h=6, g=3, n=4, p=5),
    dict(b=1, t=63, h=4, g=1, n=6, p=3),
    dict(b=1, t=100, h=2, g=1, n=3, p=4),
)


def _gen(seed):
    return None if seed is None else torch.Generator().manual_seed(seed)


def _randn(*shape, gen=None, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def _rand(*shape, gen=None, lo=0.0, hi=1.0):
    return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)


def _finish(tensors: dict, dtype, device) -> dict:
    return {k: v.to(dtype=dtype, device=device) for k, v in tensors.items()}


def ssd_inputs(b=2, t=7, h=6, g=3, n=4, p=5, *, D=True, D_per_channel=False, z=True,
               dt_bias=True, dtype=torch.float32, device="cpu", seed=None) -> dict:
    """Keyword arguments of `ssmc.ops.ssd`: x, z (b, t, h, p); dt (b, t, h) (raw, to go
    through softplus); A (h,) negative; B, C (b, t, g, n); D (h,) or (h, p); dt_bias (h,)."""
    gen = _gen(seed)
    out = dict(x=_randn(b, t, h, p, gen=gen), dt=_randn(b, t, h, gen=gen, scale=0.5),
               A=-_rand(h, gen=gen, lo=0.5, hi=2.0), B=_randn(b, t, g, n, gen=gen),
               C=_randn(b, t, g, n, gen=gen))
    if D:
        out["D"] = _randn(*((h, p) if D_per_channel else (h,)), gen=gen)
    if z:
        out["z"] = _randn(b, t, h, p, gen=gen)
    if dt_bias:
        out["dt_bias"] = _randn(h, gen=gen, scale=0.5)
    return _finish(out, dtype, device)


def selective_scan_inputs(b=2, t=7, d=6, n=4, g=None, *, D=True, z=True, delta_bias=True,
                          dtype=torch.float32, device="cpu", seed=None) -> dict:
    """Keyword arguments of `ssmc.ops.selective_scan` (time-major Mamba-1): u, delta, z
    (b, t, d); A (d, n) negative; B, C (b, t, n), or (b, t, g, n) when `g` is given;
    D, delta_bias (d,)."""
    gen = _gen(seed)
    bc = (b, t, n) if g is None else (b, t, g, n)
    out = dict(u=_randn(b, t, d, gen=gen), delta=_randn(b, t, d, gen=gen, scale=0.5),
               A=-_rand(d, n, gen=gen, lo=0.5, hi=2.0), B=_randn(*bc, gen=gen),
               C=_randn(*bc, gen=gen))
    if D:
        out["D"] = _randn(d, gen=gen)
    if z:
        out["z"] = _randn(b, t, d, gen=gen)
    if delta_bias:
        out["delta_bias"] = _randn(d, gen=gen, scale=0.5)
    return _finish(out, dtype, device)


def retention_inputs(b=2, t=7, h=3, n=4, p=5, *, gamma=True, dtype=torch.float32,
                     device="cpu", seed=None) -> dict:
    """Keyword arguments of `ssmc.ops.retention`: q, k (b, t, h, n); v (b, t, h, p);
    gamma (h,) in (0.5, 1)."""
    gen = _gen(seed)
    out = dict(q=_randn(b, t, h, n, gen=gen), k=_randn(b, t, h, n, gen=gen),
               v=_randn(b, t, h, p, gen=gen))
    if gamma:
        out["gamma"] = _rand(h, gen=gen, lo=0.5, hi=0.99)
    return _finish(out, dtype, device)


def gla_inputs(b=2, t=7, h=3, n=4, p=5, *, dtype=torch.float32, device="cpu",
               seed=None) -> dict:
    """Keyword arguments of `ssmc.ops.gla`: q, k (b, t, h, n); v (b, t, h, p); g (b, t, h, n)
    the log decay, logsigmoid of a normal sample (so the decay is in (0, 1))."""
    gen = _gen(seed)
    out = dict(q=_randn(b, t, h, n, gen=gen), k=_randn(b, t, h, n, gen=gen),
               v=_randn(b, t, h, p, gen=gen),
               g=torch.nn.functional.logsigmoid(_randn(b, t, h, n, gen=gen) + 2.0))
    return _finish(out, dtype, device)


def linear_attention_inputs(b=2, t=7, h=3, n=4, p=5, *, dtype=torch.float32, device="cpu",
                            seed=None) -> dict:
    """Keyword arguments of `ssmc.ops.linear_attention`: q, k (b, t, h, n); v (b, t, h, p)."""
    gen = _gen(seed)
    out = dict(q=_randn(b, t, h, n, gen=gen), k=_randn(b, t, h, n, gen=gen),
               v=_randn(b, t, h, p, gen=gen))
    return _finish(out, dtype, device)


#: builtin name -> (op in ssmc.ops, factory taking b, t, h, g, n, p as keywords)
INPUT_FACTORIES: dict[str, tuple[Callable, Callable]] = {
    "ssd": (ssmc.ops.ssd, lambda b, t, h, g, n, p, **kw: ssd_inputs(b, t, h, g, n, p, **kw)),
    "selective_scan": (ssmc.ops.selective_scan,
                       lambda b, t, h, g, n, p, **kw: selective_scan_inputs(b, t, h, n, g, **kw)),
    "retention": (ssmc.ops.retention,
                  lambda b, t, h, g, n, p, **kw: retention_inputs(b, t, h, n, p, **kw)),
    "gla": (ssmc.ops.gla, lambda b, t, h, g, n, p, **kw: gla_inputs(b, t, h, n, p, **kw)),
    "linear_attention": (ssmc.ops.linear_attention,
                         lambda b, t, h, g, n, p, **kw: linear_attention_inputs(b, t, h, n, p,
                                                                                **kw)),
}


def random_inputs(definition, sizes: Mapping[str, int], *, dtype=torch.float32, device="cpu",
                  seed=None) -> dict:
    """Standard-normal tensors for every input of a definition (or compiled op / Program),
    shaped by its annotations and `sizes` (axis letter -> size). Suited to definitions whose
    decay maps any real number into (0, 1), e.g. `S.sigmoid(a)` or `S.exp(-S.softplus(a))`."""
    program = _program_of(definition)
    gen = _gen(seed)
    return {i.name: _randn(*(sizes[a] for a in i.axes), gen=gen).to(dtype=dtype, device=device)
            for i in program.inputs}


def random_state(b, h, n, p, *, directions=1, dtype=torch.float32, device="cpu", seed=None):
    """An initial state (b, h, n, p), or (directions, b, h, n, p) when directions > 1."""
    shape = (b, h, n, p) if directions == 1 else (directions, b, h, n, p)
    return _randn(*shape, gen=_gen(seed)).to(dtype=dtype, device=device)


def cu_seqlens(lengths: Sequence[int], dtype=torch.int32, device="cpu") -> torch.Tensor:
    """Cumulative sequence offsets [0, l0, l0 + l1, ...] for a packed batch."""
    return torch.tensor([0, *itertools.accumulate(int(x) for x in lengths)], dtype=dtype,
                        device=device)


# --------------------------------------------------------------------------- definitions

#: the decay annotation of `make_definition` per decay kind (DESIGN.md's table)
DECAY_AXES = {"none": None, "time_invariant": "h n", "scalar": "b t h", "diagonal": "b t h n",
              "full": "b t h n p"}
DIRECTIONS = ("forward", "reverse", "bidirectional")


def make_definition(decay: str = "scalar", direction: str = "forward", *,
                    epilogue: bool = False) -> "ssmc.Definition":
    """A small custom definition of a decay kind and direction, with groups:
    q, k: "b t g n"; v: "b t h p"; a (the raw decay, sigmoid(a + 2) in (0, 1)): DECAY_AXES.
    With `epilogue`, also z: "b t h p" and D: "h", returning (y + D v) * silu(z); else y."""
    import inspect

    from ssmc import dsl as S

    axes = {"q": "b t g n", "k": "b t g n", "v": "b t h p"}
    if DECAY_AXES[decay] is not None:
        axes["a"] = DECAY_AXES[decay]
    if epilogue:
        axes.update(z="b t h p", D="h")

    def body(*args):
        v = dict(zip(axes, args))
        dec = S.sigmoid(v["a"] + 2) if "a" in v else None
        y = S.recurrence(decay=dec, key=v["k"], value=v["v"], query=v["q"], direction=direction)
        if epilogue:
            y = (y + v["D"] * v["v"]) * S.silu(v["z"])
        return y

    body.__signature__ = inspect.Signature([
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=S.In[a])
        for n, a in axes.items()])
    return ssmc.ssm(body, name=f"{decay}_{direction}")


# --------------------------------------------------------------------------- comparison

@dataclass(frozen=True)
class Mismatch:
    """The error of one tensor against its reference."""

    name: str
    max_abs: float       # max |actual - expected|
    rel_rms: float       # ||actual - expected||_2 / ||expected||_2
    rel_max: float       # max |actual - expected| / max |expected|
    tol: float
    problem: str = ""    # shape / dtype / non-finite problems, empty when comparable

    @property
    def ok(self) -> bool:
        return not self.problem and self.rel_rms <= self.tol and self.rel_max <= self.tol

    def __str__(self):
        status = "ok  " if self.ok else "FAIL"
        if self.problem:
            return f"{status} {self.name}: {self.problem}"
        return (f"{status} {self.name}: max abs err {self.max_abs:.3e}, rel RMS err "
                f"{self.rel_rms:.3e}, rel max err {self.rel_max:.3e} (tol {self.tol:.1e})")


#: absolute error that counts as none (`compare`): what a decay the kernels take as an exact
#: reset (below exp(RESET_BELOW), about fp32's smallest normal number) contributes through
#: cofactors up to 1e3: 1.6e-35
UNDERFLOW_FLOOR = math.exp(RESET_BELOW) * 1e3


def compare(name: str, actual, expected: torch.Tensor, tol: float,
            scale: torch.Tensor | None = None, slack: torch.Tensor | None = None) -> Mismatch:
    """Measure `actual` against `expected` (compared in float64). Both errors are relative to
    the reference's scale, or to `scale`'s where given (`term_magnitude`: the size of what a
    kernel rounds, where y's terms cancel or the epilogue magnifies y's rounding); an
    all-zero reference is compared by absolute error, and so is one
    whose every value lies below the smallest normal number of `actual`'s dtype: to that dtype
    it is zero (GPU arithmetic flushes such values, and the kernels take decays below it as
    exact resets), and relative to its own scale its rounding would be the whole value.
    `slack` (per element) is subtracted from the absolute error first (`epilogue_slack`), and so
    is `UNDERFLOW_FLOOR` (below float64): kernels compute in fp32, whose intermediates below its
    smallest normal number flush to 0 on a GPU, and take a decay below exp(RESET_BELOW) (about
    that number) as an exact reset, so what such a decay carries is zero to them (fuzz
    findings: reference gradients of 2.3e-38 and 1.9e-37 through a decay of 3.8e-39, against
    0 and 1.0e-37)."""
    if actual is None:
        return Mismatch(name, math.inf, math.inf, math.inf, tol, "is None (no value/gradient)")
    if tuple(actual.shape) != tuple(expected.shape):
        return Mismatch(name, math.inf, math.inf, math.inf, tol,
                        f"shape {tuple(actual.shape)} but the reference has "
                        f"{tuple(expected.shape)}")
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    e = expected.detach().to(device="cpu", dtype=torch.float64)
    bad = ~torch.isfinite(a) & torch.isfinite(e)
    if bad.any():
        return Mismatch(name, math.inf, math.inf, math.inf, tol,
                        f"{int(bad.sum())} non-finite value(s) where the reference is finite")
    if a.numel() == 0:
        return Mismatch(name, 0.0, 0.0, 0.0, tol)
    diff = (a - e).abs()
    max_abs = float(diff.max())
    if slack is not None:
        diff = (diff - slack.detach().to(device="cpu", dtype=torch.float64)).clamp(min=0)
    if actual.is_floating_point() and actual.dtype != torch.float64:
        diff = (diff - UNDERFLOW_FLOOR).clamp(min=0)
    ref = e if scale is None else scale.detach().to(device="cpu", dtype=torch.float64)
    ref_norm, ref_max = float(ref.norm()), float(ref.abs().max())
    if actual.is_floating_point() and ref_max < torch.finfo(actual.dtype).tiny:
        ref_norm = ref_max = 0.0
    rel_rms = float(diff.norm()) / ref_norm if ref_norm > 0 else float(diff.norm())
    rel_max = float(diff.max()) / ref_max if ref_max > 0 else float(diff.max())
    return Mismatch(name, max_abs, rel_rms, rel_max, tol)


def _absolute(program):
    """The recurrence over the absolute values of its terms (|decay|, |key|, |value|, |query|),
    its output y itself."""
    rec = program.recurrence

    def absolute(node):
        return None if node is None else Elementwise(sp.Abs(node.expr), node.axes)

    return program.replace(
        recurrence=dataclasses.replace(rec, key=absolute(rec.key), value=absolute(rec.value),
                                       query=absolute(rec.query), decay=absolute(rec.decay)),
        output=Elementwise(Y, Y_AXES))


def term_magnitude(program, tensors: dict, sizes: dict, initial_state=None,
                   cu_seqlens=None) -> torch.Tensor:
    """The scale of each output element's rounding error, (b, t, h, p) in float64:
    |E(y)| + |dE/dy| * y_abs, where y_abs is the recurrence over the absolute values of its
    terms (|decay|, |key|, |value|, |query|, |initial state|) and E the epilogue.

    A kernel that rounds its operands (tensor cores in 16 bits) is off by a few units of this,
    however much the terms cancel in y itself: a relative error against |y| alone would call
    that cancellation a wrong answer."""
    identity = Elementwise(Y, Y_AXES)
    t64 = {k: v.detach().cpu().double() for k, v in tensors.items()}
    h0 = None if initial_state is None else initial_state.detach().cpu().double()
    cu = None if cu_seqlens is None else cu_seqlens.cpu()
    y_abs, _ = reference.scan(_absolute(program), t64, sizes, None if h0 is None else h0.abs(),
                              cu)
    out, _ = reference.scan(program, t64, sizes, h0, cu)
    derivatives = program.backward
    if not isinstance(derivatives, BackwardExprs) or derivatives.epilogue_dy == 1:
        return out.abs() + y_abs
    y, _ = reference.scan(program.replace(output=identity), t64, sizes, h0, cu)
    env = canonical_inputs(program, t64, sizes)
    env[Y.name] = y.unsqueeze(3)
    dEdy = evaluate(derivatives.epilogue_dy, env, y).expand(*y.shape[:3], 1, y.shape[3])
    return out.abs() + dEdy.squeeze(3).abs() * y_abs


def _differentiated(leaves: dict, h0, among=None) -> tuple[list, list]:
    """(names, tensors) of the leaves (and `h0`, as "initial_state") that require grad, only
    those named in `among` where given."""
    names = [n for n, v in {**leaves, "initial_state": h0}.items()
             if isinstance(v, torch.Tensor) and v.requires_grad and (among is None or n in among)]
    return names, [leaves.get(n, h0) for n in names]


def epilogue_slack(program, leaves: dict, call_kwargs: dict, cot_y: torch.Tensor,
                   eps: float) -> dict:
    """Input name -> how far each gradient element may move when y is off by `eps` times its
    terms' size (`term_magnitude` of y), through an epilogue whose slope depends on y.

    A kernel evaluates the epilogue's derivatives at its own y, which is right to a rounding of
    y's terms; where they change fast (e0 / (|y| + 1) near y = 0) that rounding moves dy, and
    every gradient with it, and the epilogue's own inputs' gradients, by far more than their
    own rounding. The slack is the float64 gradient's change (the larger of y moved by +eps
    and by -eps of its terms) of sum(cot * E(y + d)). Empty for an epilogue whose slope does
    not depend on y. `leaves`: the float64 leaf inputs (and `initial_state` among
    `call_kwargs`, a leaf too where its gradient is compared)."""
    derivatives = program.backward
    if not isinstance(derivatives, BackwardExprs) or Y not in derivatives.epilogue_dy.free_symbols:
        return {}
    kwargs = {k: v for k, v in call_kwargs.items() if k not in ("backend", "lowering")}
    bound = bind(program, (), {**leaves, **kwargs})
    h0, cu = kwargs.get("initial_state"), kwargs.get("cu_seqlens")
    identity = program.replace(output=Elementwise(Y, Y_AXES))
    y, _ = reference.scan(identity, bound.tensors, bound.sizes, h0, cu)
    mag = term_magnitude(identity, {k: v.detach() for k, v in bound.tensors.items()},
                         bound.sizes, None if h0 is None else h0.detach(), cu)
    env = canonical_inputs(program, bound.tensors, bound.sizes)
    names, wrt = _differentiated(leaves, h0)

    def gradients(shift):
        yv = y + shift
        env[Y.name] = yv.unsqueeze(3)
        out = evaluate(program.output.expr, env, yv)
        out = out.expand(*yv.shape[:3], 1, yv.shape[3]).squeeze(3)
        return torch.autograd.grad((out * cot_y.to(out)).sum(), wrt, retain_graph=True,
                                   allow_unused=True)

    base = gradients(0.0)
    slack = {}
    # y moved up, down, and each element the way that moves its dy up: a sum over elements
    # (an input without some axes, the recurrence's carry) then adds their changes, as a
    # kernel's roundings of different signs may
    with torch.no_grad():
        env[Y.name] = (y + eps * mag).unsqueeze(3)
        up = evaluate(derivatives.epilogue_dy, env, y + eps * mag)
        env[Y.name] = y.unsqueeze(3)
        up = up - evaluate(derivatives.epilogue_dy, env, y)
        aligned = torch.sign(up.expand(*y.shape[:3], 1, y.shape[3]).squeeze(3) * cot_y.to(y))
    for shift in (eps * mag, -eps * mag, eps * mag * aligned):
        for n, g, g0 in zip(names, gradients(shift), base):
            if g is not None:
                moved = (g - (0 if g0 is None else g0)).abs()
                slack[n] = moved if n not in slack else torch.maximum(slack[n], moved)
    return slack


#: fp32's unit roundoff, what one fp32 operation may be off by relative to its exact result; a
#: function (exp, log, softplus, ...) of a kernel's math library gets twice that
FP32_ROUNDOFF = 2.0 ** -24
#: random sign patterns drawn (`operand_rounding`), and the margin on the largest move seen
ROUNDING_DRAWS = 4
ROUNDING_FACTOR = 2.0


def _rounded(expr: sp.Expr, fresh: Callable) -> sp.Expr:
    """`expr` with each operation's result (and each constant fp32 cannot hold) times
    (1 + eps), eps a fresh symbol per node: `fresh(scale)` returns (symbol) for a node whose
    rounding is `scale` units."""
    if expr.is_Symbol:
        return expr
    if expr.is_Number:
        exact = float(expr) == float(torch.tensor(float(expr), dtype=torch.float32))
        return expr if exact else sp.Mul(expr, 1 + fresh(1.0), evaluate=False)
    args = [_rounded(a, fresh) for a in expr.args]
    arithmetic = isinstance(expr, (sp.Add, sp.Mul)) or (
        isinstance(expr, sp.Pow) and expr.exp == -1)
    node = expr.func(*args, evaluate=False)
    return sp.Mul(node, 1 + fresh(1.0 if arithmetic else 2.0), evaluate=False)


def operand_rounding(program, leaves: dict, call_kwargs: dict, cot: dict, refs: dict,
                     g_ref: dict, seed: int = 0) -> dict:
    """Output or "grad <input>" name -> how far rounding the operands (decay, key, value, query)
    as an fp32 evaluation does moves the float64 reference and its gradients: every operation
    of the prologue rounded by +-FP32_ROUNDOFF (random signs, ROUNDING_DRAWS draws), the largest
    move times ROUNDING_FACTOR.

    No fp32 kernel can do better than its operands: a key k log(softplus(e0) + 0.1) with
    softplus(e0) + 0.1 = 1.00025 is up to 7e-4 relative off in fp32 (a TVM campaign finding:
    softplus and the sum round by ~1e-7 before the log), and so is everything it feeds,
    however exact the recurrence. A bound per operation, not torch's own fp32 evaluation: the
    kernels' math library rounds differently (TVM's key was off where torch's was not).
    `leaves`: the float64 leaf inputs; `call_kwargs` the reference call's (`initial_state` a
    leaf where its gradient is compared); `cot`, `refs`, `g_ref` check_against_reference's
    cotangents, outputs and gradients (by input name)."""
    rec = program.recurrence
    axes_of, scales = {}, {}
    current = [None]

    def fresh(scale):
        name = f"ssmc_eps{len(scales)}"
        scales[name], axes_of[name] = scale, current[0]
        return sp.Symbol(name)

    parts = {}
    for field in ("decay", "key", "value", "query"):
        node = getattr(rec, field)
        if node is not None:
            current[0] = node.axes
            parts[field] = Elementwise(_rounded(node.expr, fresh), node.axes)
    rounded = program.replace(
        recurrence=dataclasses.replace(rec, **parts),
        inputs=program.inputs + tuple(Input(n, a) for n, a in axes_of.items()))
    kwargs = {k: v for k, v in call_kwargs.items() if k not in ("backend", "lowering")}
    bound = bind(program, (), {**leaves, **kwargs})
    h0 = kwargs.get("initial_state")
    wrt_names, wrt = _differentiated(leaves, h0, among=g_ref)
    gen = torch.Generator().manual_seed(seed)
    found = {}

    def widen(name, move):
        move = ROUNDING_FACTOR * move.detach().abs()
        found[name] = move if name not in found else torch.maximum(found[name], move)

    for _ in range(ROUNDING_DRAWS):
        eps = {n: (torch.randint(0, 2, [bound.sizes[a] for a in axes_of[n]], generator=gen,
                                 dtype=torch.float64) * 2 - 1) * FP32_ROUNDOFF * scales[n]
               for n in scales}
        out, final = reference.scan(rounded, {**bound.tensors, **eps}, bound.sizes,
                                    bound.initial_state, bound.cu_seqlens,
                                    bound.return_final_state)
        outs = _outputs((out, final) if bound.return_final_state else out)
        for n, r in refs.items():
            if n in outs:
                widen(n, outs[n] - r)
        if cot and wrt:
            loss = sum((outs[n] * w).sum() for n, w in cot.items())
            for n, g in zip(wrt_names, torch.autograd.grad(loss, wrt, allow_unused=True)):
                if g is not None and g_ref[n] is not None:
                    widen(f"grad {n}", g - g_ref[n])
    return found


def _program_of(op):
    if isinstance(op, ssmc.CompiledOp):
        return op.program
    if isinstance(op, ssmc.Definition):
        return op.program
    if hasattr(op, "recurrence") and hasattr(op, "inputs"):
        return op
    return None


def reference_of(op) -> Callable:
    """A float64 reference callable with the same calling convention as `op`.

    For a Definition or CompiledOp: `ssmc.reference.scan` on the bound arguments. For any other
    callable (the built-ins of `ssmc.ops`, which take `backend=` and `lowering=`): the same
    callable with `backend="reference", lowering="scan"`, which runs `ssmc.reference.scan`.
    """
    program = _program_of(op)
    if program is not None:
        def ref(*args, **kwargs):
            b = bind(program, args, kwargs)
            out, final = reference.scan(program, b.tensors, b.sizes, b.initial_state,
                                        b.cu_seqlens, b.return_final_state)
            return (out, final) if b.return_final_state else out
        return ref

    def ref(*args, **kwargs):
        kwargs = {**kwargs, "backend": "reference", "lowering": "scan"}
        return op(*args, **kwargs)
    return ref


def _leaves(inputs, call_kwargs, dtype_for, requires_grad, names=()):
    """Copies of `inputs` (dict or sequence) and tensor keyword arguments; floating tensors are
    cast with `dtype_for(tensor)` and made leaves. Returns (args, kwargs, {name: leaf});
    positional inputs are named by `names`, else input[i]."""
    leaves = {}

    def prep(name, x):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            y = x.detach().to(dtype_for(x)).clone().requires_grad_(requires_grad)
            leaves[name] = y
            return y
        return x

    if isinstance(inputs, Mapping):
        args, kw = (), {k: prep(k, v) for k, v in inputs.items()}
    else:
        args = tuple(prep(names[i] if i < len(names) else f"input[{i}]", v)
                     for i, v in enumerate(inputs))
        kw = {}
    for k, v in call_kwargs.items():
        kw[k] = prep(k, v)
    return args, kw, leaves


def summed_gradient_scale(program, leaves: dict, call_kwargs: dict, cot: dict) -> dict:
    """Input name -> the scale (float64, the input's shape) of its gradient's rounding, for the
    inputs without a t axis: the sum over the steps (and sequences) the input is broadcast to
    of the absolute value of each step's part of the gradient. Any per-step computation rounds
    those parts, however much they cancel in the sum (fuzz finding
    at seed 20261211: a per-head decay's parts up to 182 summed to -0.27 over 256 steps, where a
    plain fp32 sequential scan was 9.3e-3 off, as the kernels were). `leaves`: the float64
    leaf inputs; `cot`: the cotangents of the outputs ("y", "final_state")."""
    from unittest import mock

    from ssmc.reference import driver
    # (inputs with an order axis k, read per order, keep the reference's own scale)
    summed = [i for i in program.inputs if "t" not in i.axes and "k" not in i.axes
              and getattr(leaves.get(i.name), "requires_grad", False)]
    if not summed:
        return {}
    kwargs = {k: v for k, v in call_kwargs.items()
              if k in ("initial_state", "cu_seqlens", "return_final_state", "grid")}
    # the reference's own device (its keyword arguments are CPU copies; the leaves may be on
    # the GPU)
    bound = bind(program, (), {**{k: v.detach().cpu() for k, v in leaves.items()}, **kwargs})
    sizes = bound.sizes
    parts: dict[str, list] = {}
    real = driver.canonical_inputs

    def spread(prog, xs, sz):   # each step of a summed input its own leaf
        env = real(prog, xs, sz)
        for inp in summed:
            c = env[inp.name].detach()
            leaf = c.expand(sizes["b"], sizes["t"], *c.shape[2:]).clone().requires_grad_(True)
            parts.setdefault(inp.name, []).append(leaf)
            env[inp.name] = leaf
        return env

    h0, cu = kwargs.get("initial_state"), kwargs.get("cu_seqlens")
    h0 = None if h0 is None else h0.detach().double()
    with torch.enable_grad(), mock.patch.object(driver, "canonical_inputs", spread):
        y, final = reference.scan(program, bound.tensors, sizes, h0, cu,
                                  return_final_state="final_state" in cot)
    loss = sum((out * cot[name].to(out.device)).sum()
               for name, out in (("y", y), ("final_state", final)) if name in cot)
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        return {}   # no cotangent (no steps), or no output reads these inputs
    flat = [leaf for name in parts for leaf in parts[name]]
    grads = dict(zip(map(id, flat), torch.autograd.grad(loss, flat, allow_unused=True)))
    scales = {}
    for inp in summed:
        g = sum(grads[id(leaf)].abs() for leaf in parts[inp.name]
                if grads[id(leaf)] is not None)
        if not isinstance(g, torch.Tensor):
            continue
        slot = {a: "bthnp".index("h" if a == "g" else a) for a in inp.axes}
        for dim in range(2):   # over the steps and sequences
            if dim not in slot.values():
                g = g.sum(dim, keepdim=True)
        if "g" in inp.axes and sizes["h"] != sizes["g"]:   # heads back to their groups
            shape = list(g.shape)
            g = g.reshape(shape[:2] + [sizes["g"], sizes["h"] // sizes["g"]] + shape[3:]).sum(3)
        order = sorted(range(len(inp.axes)), key=lambda i: slot[inp.axes[i]])
        g = g.reshape([g.shape[slot[inp.axes[i]]] for i in order])
        scales[inp.name] = g.permute([order.index(i) for i in range(len(order))])
    return scales


def _outputs(result) -> dict[str, torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return {"y": result}
    if isinstance(result, (tuple, list)):
        names = ["y", "final_state"] + [f"output[{i}]" for i in range(2, len(result))]
        return {names[i]: r for i, r in enumerate(result) if r is not None}
    raise TypeError(f"an op returned {type(result).__name__}; expected a tensor or a tuple")


def check_against_reference(op, inputs, *, tol: float, grad: bool = True,
                            grad_tol: float | None = None, backend: str | None = None,
                            lowering: str | None = None, seed: int = 0,
                            output_scale: dict | None = None,
                            epilogue_eps: float | None = None,
                            **call_kwargs) -> list[Mismatch]:
    """Compare `op` on `inputs` with the float64 sequential reference, outputs and gradients.

    op:        an `ssmc.Definition` (compiled here with `backend`/`lowering`, default "auto"),
               an `ssmc.CompiledOp` (used as is; `backend`/`lowering` must then be omitted), or
               any callable taking `backend=` and `lowering=` keywords, such as the built-ins
               in `ssmc.ops` (its reference is the same callable with `backend="reference",
               lowering="scan"`).
    inputs:    a dict of keyword arguments (name -> tensor) or a sequence of positional ones.
    tol:       bound on the relative RMS error ||a - r|| / ||r|| and on the relative max error
               max|a - r| / max|r| of every output.
    grad:      also compare gradients w.r.t. every floating tensor in `inputs` and
               `call_kwargs` (e.g. `initial_state`), for a random cotangent on every output.
    grad_tol:  the bound for gradients (default: `tol`).
    output_scale: output name -> the scale its errors are relative to (`compare`), e.g.
               {"y": term_magnitude(...)}; default the reference output's own.
    epilogue_eps: where given, gradients may also be off by `epilogue_slack` for y off by
               this fraction of its terms (the kernel's own y feeds the epilogue's slope).
    seed:      seeds the cotangents.
    call_kwargs: passed to both calls (`initial_state=`, `cu_seqlens=`, `return_final_state=`,
               op options such as `dt_softplus=`).

    The op runs on the inputs as given (their dtype and device); the reference on float64 CPU
    copies. Returns one `Mismatch` per compared tensor (output "y", "final_state", and
    "grad <name>") and raises AssertionError listing all of them, with the tensor name, max
    abs error and relative RMS error, when any exceeds its tolerance or is missing, misshapen or
    non-finite where the reference is finite.
    """
    grad_tol = tol if grad_tol is None else grad_tol
    if isinstance(op, ssmc.Definition):
        op = ssmc.compile(op, backend=backend or "auto", lowering=lowering or "auto")
    elif isinstance(op, ssmc.CompiledOp):
        if backend is not None or lowering is not None:
            raise TypeError("check_against_reference: backend=/lowering= are fixed when a "
                            "CompiledOp is compiled; pass the Definition instead")
    elif callable(op):
        if backend is not None:
            call_kwargs["backend"] = backend
        if lowering is not None:
            call_kwargs["lowering"] = lowering
    else:
        raise TypeError(f"check_against_reference: {type(op).__name__} is not an op")
    ref_op = reference_of(op)
    ref_kwargs = {k: v for k, v in call_kwargs.items() if k not in ("backend", "lowering")}

    program = _program_of(op)
    names = program.input_names if program is not None else ()
    args, kwargs, leaves = _leaves(inputs, call_kwargs, lambda x: x.dtype, grad, names)
    r_args, r_kwargs, r_leaves = _leaves(inputs, ref_kwargs, lambda x: torch.float64, grad,
                                         names)
    r_args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in r_args)
    r_kwargs = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in r_kwargs.items()}

    outs = _outputs(op(*args, **kwargs))
    refs = _outputs(ref_op(*r_args, **r_kwargs))
    scales = output_scale or {}
    gen = torch.Generator().manual_seed(seed)
    cot = {name: torch.randn(ref.shape, generator=gen, dtype=torch.float64)
           for name, ref in refs.items() if ref.requires_grad}
    names = list(r_leaves)
    g_ref = []
    if grad and cot:
        loss_r = sum((refs[n] * w).sum() for n, w in cot.items())
        g_ref = torch.autograd.grad(loss_r, [r_leaves[n] for n in names], allow_unused=True)
    # what evaluating the operands in the kernels' fp32 moves the reference: computed only
    # when something fails without it (it costs a second reference run)
    rounding = {}
    rounds = program is not None and any(
        isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float64
        for v in (*args, *kwargs.values()))

    def with_rounding(judge):
        nonlocal rounding
        found = judge()
        if rounds and not rounding and not all(m.ok for m in found):
            rounding = operand_rounding(program, {k: v for k, v in r_leaves.items()
                                                  if k != "initial_state"}, r_kwargs, cot,
                                        refs, dict(zip(names, g_ref)), seed)
            found = judge()
        return found

    report = with_rounding(lambda: [
        compare(name, outs.get(name), ref, tol, scales.get(name), slack=rounding.get(name))
        for name, ref in refs.items()])

    if grad and all(m.ok for m in report):
        loss = sum((outs[n].double() * w.to(outs[n].device)).sum() for n, w in cot.items())
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            g_op = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
        else:  # the op's outputs are not connected to its inputs
            g_op = [None] * len(names)
        slack = {}
        if epilogue_eps and program is not None and "y" in cot:
            slack = epilogue_slack(program, {k: v for k, v in r_leaves.items()
                                             if k != "initial_state"},
                                   r_kwargs, cot["y"], epilogue_eps)
        summed = (summed_gradient_scale(program, {k: v for k, v in r_leaves.items()
                                                  if k != "initial_state"}, r_kwargs, cot)
                  if program is not None else {})

        def gradients():
            found = []
            for n, ga, gr in zip(names, g_op, g_ref):
                if gr is None:
                    gr = torch.zeros_like(r_leaves[n])
                if ga is None and not gr.any():
                    continue
                extra = [s for s in (slack.get(n), rounding.get(f"grad {n}")) if s is not None]
                found.append(compare(f"grad {n}", ga, gr, grad_tol, scale=summed.get(n),
                                     slack=sum(extra) if extra else None))
            return found
        report += with_rounding(gradients)

    if not all(m.ok for m in report):
        label = getattr(op, "__name__", None) or repr(op)
        raise AssertionError(f"{label} disagrees with the float64 reference:\n  " +
                             "\n  ".join(str(m) for m in report))
    return report


def compile_for_hopper(script: str, tmp_path, timeout: int) -> None:
    """Run `script` (Python that compiles Triton kernels for sm_90 and prints "compiled") in a
    fresh interpreter without TRITON_INTERPRET, through Triton's real compiler and its bundled
    ptxas: no GPU needed, and it sees the GPU-only front-end errors the interpreter misses.
    Skips where this Triton install has no ptxas."""
    import os
    import pathlib
    import subprocess
    import sys

    import pytest
    import triton
    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this triton install has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = pathlib.Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]


def reductions_over_copied_warps(ttgir: str) -> list[tuple]:
    """The `tt.reduce` ops of a kernel's TTGIR whose operand layout spreads the reduced axis over
    warps while some warps hold copies of others' values (the layout covers more of an axis
    than the tensor has): (shape, axis, sizePerThread, threadsPerWarp, warpsPerCTA) each. On an
    H100 (Triton 3.6) a step kernel's sum over n of a [32, 2] tile on 4 warps, two of them
    copies, gave a different output for the same inputs about once in 100-200 calls."""
    import re
    layouts = {}
    for m in re.finditer(r"^(#\w+) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\], "
                         r"threadsPerWarp = \[([\d, ]+)\], warpsPerCTA = \[([\d, ]+)\]",
                         ttgir, re.M):
        layouts[m.group(1)] = tuple([int(x) for x in m.group(i).split(",")] for i in (2, 3, 4))
    found = []
    lines = ttgir.splitlines()
    for i, line in enumerate(lines):
        op = re.search(r'"tt\.reduce"\(.*?\) <\{axis = (\d+) : i32\}>', line)
        if not op:
            continue
        axis = int(op.group(1))
        for later in lines[i:]:          # the operand's type closes the op's region
            typed = re.search(r"\}\) : \(tensor<([\dx]+)x\w+, (#\w+)>", later)
            if typed:
                break
        else:
            continue
        shape = [int(x) for x in typed.group(1).split("x")]
        if typed.group(2) not in layouts:
            continue
        spt, tpw, wpc = layouts[typed.group(2)]
        copied = any(wpc[d] > 1 and shape[d] < spt[d] * tpw[d] * wpc[d]
                     for d in range(len(shape)))
        if wpc[axis] > 1 and copied:
            found.append((shape, axis, spt, tpw, wpc))
    return found
