"""The Triton chunked and quadratic lowerings with direction="cross2d", forward and gradients,
against the float64 reference (which gathers each order's steps by their grid positions).

The kernels read a column order's steps in place (`templates.rows`, `quadratic._positions`):
any slip in that mapping, in a launch that reads another order's slice of a per-order input
(axis `k`), or in the per-key decay gradient (`chunked_bwd_keys.py`, whose suffix sums run
over a column order's steps in its own order) shows up here. Covered: every decay kind these
lowerings take (none, time-invariant per head, scalar per (b, t, h) as Mamba-2, per key as
GLA), each with inputs shared by the four orders and with per-order inputs; grids H != W,
1 x W, H x 1 and one whose t spans several chunks and ends in a partial one; decays that are
exactly 0 at some steps (log-decays of -1e4 and -inf, a sigmoid gate that underflows, and a
gate times 0 or a negative number: the chunked forward's direct sums, the scan's backward,
the quadratic lowering's refusal); fp32 and bf16 (judged as the other Triton tests judge it:
relative L2 error, `conftest.TOL` forward and test_backward's 3e-2 for gradients). The tests
run on the GPU where there is one.
"""
from __future__ import annotations

import inspect

import pytest
import torch

import ssmc
from ssmc import dsl as S
from tests.backends.triton.conftest import TOL, gradient_problems, rel_l2
from tests.helpers import check_against_reference

pytestmark = pytest.mark.usefixtures("kernel_cache_per_module")

#: the GPU where there is one, the interpreter otherwise (conftest sets TRITON_INTERPRET)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

LOWERINGS = ("chunked", "quadratic")
DECAYS = ("none", "time_invariant", "scalar", "diagonal")
SIZES = dict(b=2, h=2, g=1, n=4, p=4)
#: fp32 bounds on every relative error (the chunked backward's, test_backward.GRAD_TOL)
FWD_TOL, GRAD_TOL = 2e-5, 3e-5
#: bf16: test_backward's bound on gradients (they are rounded to bf16)
BF16_GRAD_TOL = 3e-2

#: per decay kind: the annotation of each input (`K` marks those that may hold one slice per
#: order) and the recurrence over them (`v` the inputs by name)
SPECS = {
    "none": ({"q": "b t g n", "k": "b K t g n", "v": "b t h p"},
             lambda v: dict(key=v["k"], value=v["v"], query=v["q"])),
    # a positive decay per head: exp(w), w < 0 (one w per order where per-order)
    "time_invariant": ({"q": "b t g n", "k": "b t g n", "v": "b t h p", "w": "K h"},
                       lambda v: dict(decay=S.exp(v["w"]), key=v["k"], value=v["v"],
                                      query=v["q"])),
    # Mamba-2: softplus(dt) scales the value and the decay exp(softplus(dt) A)
    "scalar": ({"x": "b t h p", "dt": "b K t h", "A": "h", "B": "b K t g n", "C": "b K t g n"},
               lambda v: dict(decay=S.exp(S.softplus(v["dt"]) * v["A"]), key=v["B"],
                              value=v["x"] * S.softplus(v["dt"]), query=v["C"])),
    # GLA: a log-decay per key
    "diagonal": ({"q": "b t h n", "k": "b K t h n", "v": "b t h p", "g": "b K t h n"},
                 lambda v: dict(decay=S.exp(v["g"]), key=v["k"], value=v["v"], query=v["q"])),
}


def cross2d(name: str, axes: dict, recurrence, epilogue=None) -> ssmc.Definition:
    """A cross2d definition over inputs annotated `axes` (name -> axes): the recurrence
    `recurrence(v)` (v the inputs by name), then `epilogue(y, v)` if given."""
    def body(*args):
        v = dict(zip(axes, args))
        y = S.recurrence(**recurrence(v), direction="cross2d")
        return y if epilogue is None else epilogue(y, v)

    body.__signature__ = inspect.Signature([
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=S.In[a])
        for n, a in axes.items()])
    return ssmc.ssm(body, name=name)


def definition(decay: str, per_order: bool, epilogue: bool = False) -> ssmc.Definition:
    """A cross2d definition of a decay kind; with `per_order` the inputs marked K carry the
    order axis k; with `epilogue`, (y + D v) * silu(z) (inputs without k, as an epilogue's
    must be)."""
    axes, recurrence = SPECS[decay]
    axes = {name: " ".join(a for a in spec.replace("K", "k" if per_order else "").split())
            for name, spec in axes.items()}
    value = "x" if "x" in axes else "v"
    if epilogue:
        axes.update(z="b t h p", D="h")

    def post(y, v):
        return (y + v["D"] * v[value]) * S.silu(v["z"])

    tag = "k" if per_order else "shared"
    return cross2d(f"cross2d_{decay}_{tag}{'_epi' if epilogue else ''}", axes, recurrence,
                   post if epilogue else None)


def inputs_for(defn: ssmc.Definition, grid: tuple[int, int], seed: int = 0, b: int = 2) -> dict:
    """Inputs in the built-ins' ranges: negative w and A, raw dt around 0, log-decays g of
    logsigmoid(normal + 2); k = 4 slices where an input has the order axis."""
    gen = torch.Generator().manual_seed(seed)
    sizes = dict(SIZES, b=b, t=grid[0] * grid[1], k=4)
    out = {}
    for inp in defn.program.inputs:
        shape = [sizes[a] for a in inp.axes]
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        if inp.name == "w":
            x = -(0.05 + torch.rand(shape, generator=gen, dtype=torch.float64))
        elif inp.name == "A":
            x = -(0.5 + 1.5 * torch.rand(shape, generator=gen, dtype=torch.float64))
        elif inp.name == "dt":
            x = 0.5 * x
        elif inp.name == "g":
            x = torch.nn.functional.logsigmoid(x + 2.0)
        out[inp.name] = x.float()
    return out


def check(defn, inputs: dict, grid, lowering: str):
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    check_against_reference(defn, inputs, tol=FWD_TOL, grad_tol=GRAD_TOL, backend="triton",
                            lowering=lowering, grid=grid)


# --------------------------------------------------------------------------- decay kinds

@pytest.mark.parametrize("per_order", [False, True], ids=["shared", "per_order"])
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("lowering", LOWERINGS)
def test_cross2d_decay_kinds(lowering, decay, per_order):
    """A 3 x 5 grid (H != W): forward and the gradient of every input (per-key decays on one
    batch entry: their chunk work is elementwise, slow under the interpreter)."""
    defn = definition(decay, per_order)
    check(defn, inputs_for(defn, (3, 5), b=1 if decay == "diagonal" else 2), (3, 5), lowering)


def test_cross2d_epilogue():
    """An epilogue (y + D x) * silu(z) over the four orders' sum, per-order scan inputs."""
    defn = definition("scalar", True, epilogue=True)
    check(defn, inputs_for(defn, (4, 3), seed=1), (4, 3), "chunked")


def test_cross2d_row_terms_run_per_order_in_the_kernel(monkeypatch):
    """Per-order inputs: each order's row terms (x, dt through the value x * softplus(dt); z
    and D through the epilogue) run in the generated row kernel, and d value is never stacked
    over the orders for torch ops (at b=32 64x64 h=8 p=64 n=64 those ops took 13 of a 23.6 ms
    training step on an H100)."""
    from ssmc.backends.triton import backward, chain_rows
    formed, stacked = [], []
    per_order, stack = chain_rows.row_parts_per_order, backward.stack_orders

    def record_rows(*args):
        formed.append(per_order(*args))
        return formed[-1]

    def record_stack(per_dir, skip=()):
        stacked.append(stack(per_dir, skip))
        return stacked[-1]
    monkeypatch.setattr(chain_rows, "row_parts_per_order", record_rows)
    monkeypatch.setattr(backward, "stack_orders", record_stack)
    defn = definition("scalar", True, epilogue=True)
    check(defn, inputs_for(defn, (4, 3), seed=3), (4, 3), "chunked")
    assert [set(rows) for rows in formed] == [{"x", "dt", "z", "D"}]
    assert formed[0]["dt"].shape[0] == 4       # one slice per order
    assert stacked and all("value" not in grads for grads in stacked)


def test_cross2d_per_order_keys_without_a_group_axis():
    """B and C per order with no group axis ("b k t n"), four heads: one group of them all,
    so the forward forms each order's q k^T once for the heads and the backward sums dB and
    dC over the heads in its kernel (the benchmark's Mamba-2-style case)."""
    axes = {"x": "b t h p", "dt": "b k t h", "A": "h", "B": "b k t n", "C": "b k t n"}
    defn = cross2d("cross2d_one_group", axes, SPECS["scalar"][1])
    grid = (4, 5)
    gen = torch.Generator().manual_seed(7)
    sizes = dict(b=1, t=grid[0] * grid[1], h=4, n=4, p=4, k=4)
    inputs = {name: torch.randn([sizes[a] for a in spec.split()], generator=gen)
              for name, spec in axes.items()}
    inputs["A"] = -(0.5 + inputs["A"].abs())
    check(defn, inputs, grid, "chunked")


def test_cross2d_per_order_value_scale_without_t():
    """A per-order value scale s (k h) with no t or p: each order's d s is a partial summed
    over its t-blocks and channels, stored in that order's slice of the row kernel's output."""
    defn = cross2d("cross2d_order_scale",
                   {"x": "b t h p", "s": "k h", "B": "b t g n", "C": "b t g n", "w": "h"},
                   lambda v: dict(decay=S.exp(v["w"]), key=v["B"], value=v["x"] * v["s"],
                                  query=v["C"]))
    check(defn, inputs_for(defn, (5, 7), seed=4), (5, 7), "chunked")


# --------------------------------------------------------------------------- grids

#: one row, one column; 6 x 11 = 66 steps: two 64-step chunks (the second of 2 steps) and
#: three 32-step query blocks of the quadratic lowering (the last partial); 4 x 5 = 20 steps:
#: two 16-step per-key chunks (the second partial), whose work is elementwise (interpreter time)
GRIDS = {"scalar": [(1, 7), (6, 1), (6, 11)], "diagonal": [(1, 5), (5, 1), (4, 5)]}
CASES = [(lowering, decay, grid) for decay, grids in GRIDS.items() for grid in grids
         for lowering in LOWERINGS]


@pytest.mark.parametrize("lowering, decay, grid", CASES,
                         ids=[f"{lw}-{d}-{h}x{w}" for lw, d, (h, w) in CASES])
def test_cross2d_grids(lowering, decay, grid):
    defn = definition(decay, True)
    check(defn, inputs_for(defn, grid, seed=2, b=1), grid, lowering)


# --------------------------------------------------------------------------- resets

def _gated(decay, name: str, gate: str) -> ssmc.Definition:
    """x, B, C shared by the orders, the decay `decay` of the gate input u or a (`gate` its
    axes)."""
    axes = {"x": "b t h p", name: gate, "B": "b t g n", "C": "b t g n"}
    return cross2d(f"cross2d_{decay.__name__}_{gate.replace(' ', '')}", axes,
                   lambda v: dict(decay=decay(v[name]), key=v["B"], value=v["x"], query=v["C"]))


exp_decay = _gated(S.exp, "u", "b k t h")
exp_decay_keys = _gated(S.exp, "u", "b k t h n")
sigmoid_gate = _gated(S.sigmoid, "a", "b t h")
#: a decay that may be 0 or negative: sigmoid(a) * w, w (one per order) holding 0 and < 0
signed_gate = cross2d("cross2d_signed", {"x": "b t h p", "a": "b t h", "w": "k h",
                                         "B": "b t g n", "C": "b t g n"},
                      lambda v: dict(decay=S.sigmoid(v["a"]) * v["w"], key=v["B"],
                                     value=v["x"], query=v["C"]))


def reset_inputs(defn, grid, seed: int = 3) -> dict:
    """As test_decay_domain.strong_inputs: log-decays u in [-0.05, 0), -1e4 on about 5% of the
    steps and one -inf (decays of exactly 0), on every order's slice."""
    inputs = inputs_for(defn, grid, seed=seed, b=1)
    gen = torch.Generator().manual_seed(seed)
    u = -0.05 * torch.rand(inputs["u"].shape, generator=gen)
    u[torch.rand(u.shape, generator=gen) < 0.05] = -1e4
    u.view(-1)[7] = float("-inf")
    return dict(inputs, u=u)


@pytest.mark.parametrize("per_key", [False, True], ids=["scalar", "per_key"])
@pytest.mark.parametrize("lowering", LOWERINGS)
def test_cross2d_zero_decays(lowering, per_key):
    """Exact resets in chunks of several (6 x 11: two 64-step chunks; per key 4 x 5: two
    16-step chunks): zeros across them, no NaN, full accuracy elsewhere, in every order."""
    defn = exp_decay_keys if per_key else exp_decay
    grid = (4, 5) if per_key else (6, 11)
    check(defn, reset_inputs(defn, grid), grid, lowering)


def test_cross2d_underflowing_gate():
    """sigmoid(-200) is 0 in fp32: a reset (its log-decay -200 is below RESET_BELOW)."""
    inputs = inputs_for(sigmoid_gate, (6, 11), seed=4, b=1)
    a = inputs["a"] + 3.0
    a[:, ::9] = -200.0
    check(sigmoid_gate, dict(inputs, a=a), (6, 11), "chunked")


def test_cross2d_zero_and_negative_decays():
    """The chunked forward's direct sums for a decay that may be 0 or negative (its gradient
    comes from the scan's backward), an exact 0 and negative decays in some orders; the
    quadratic lowering refuses such a decay before launching."""
    inputs = inputs_for(signed_gate, (6, 11), seed=6, b=1)
    w = torch.tensor([[0.9, 0.0], [-0.8, 0.7], [0.5, -0.95], [0.0, 0.6]])
    check(signed_gate, dict(inputs, w=w), (6, 11), "chunked")
    with pytest.raises(ssmc.UnsupportedError, match="may be zero or negative"):
        check(signed_gate, dict(inputs, w=w), (6, 11), "quadratic")


# --------------------------------------------------------------------------- 16 bits

@pytest.mark.parametrize("decay", ["scalar", "diagonal"])
@pytest.mark.parametrize("lowering", LOWERINGS)
def test_cross2d_bf16(lowering, decay):
    """bf16 inputs: y within TOL[bf16] relative L2 error of the float64 reference on the same
    rounded inputs, every gradient within BF16_GRAD_TOL and in the input's dtype."""
    grid = (5, 4)
    defn = definition(decay, True)
    inputs = {k: v.to(DEVICE, torch.bfloat16)
              for k, v in inputs_for(defn, grid, seed=5, b=1).items()}
    xs = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    rs = {k: v.cpu().double().requires_grad_() for k, v in inputs.items()}
    out = ssmc.compile(defn, backend="triton", lowering=lowering)(**xs, grid=grid)
    want = ssmc.compile(defn, backend="reference")(**rs, grid=grid)
    assert out.dtype == torch.bfloat16
    err, max_abs = rel_l2(out, want)
    assert err <= TOL[torch.bfloat16], f"y: relative L2 error {err:.3e} (max abs {max_abs:.3e})"
    cot = torch.randn(want.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * cot.to(DEVICE)).sum(), list(xs.values()))
    ref = torch.autograd.grad((want * cot).sum(), list(rs.values()))
    problems, _ = gradient_problems(dict(zip(xs, grads)), None, dict(zip(rs, ref)), None,
                                    inputs, None, BF16_GRAD_TOL)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("decay, grid", [("scalar", (8, 16)), ("diagonal", (8, 8))])
def test_cross2d_whole_chunks_per_order_inputs(decay, grid):
    """A grid of whole chunks (no partial last chunk) with per-order inputs: forward and every
    gradient against the reference."""
    defn = definition(decay, True)
    check(defn, inputs_for(defn, grid, seed=5, b=1), grid, "chunked")
