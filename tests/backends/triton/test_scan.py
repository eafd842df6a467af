"""The Triton scan lowering against the float64 sequential reference (`ssmc.reference.scan`).

Every built-in of `ssmc.ops` in every direction (the built-ins are causal; the reverse and
bidirectional cases are the same definitions written with `direction=`), with groups g < h,
initial and final states, packed sequences (one of them empty), fp32, bf16 and fp16, at small
odd shapes (t = 1, 7, 63, 100); two user-style definitions that are not built-ins; and, on a
GPU, real shapes for every lowering.

Tolerances (relative L2 error ||out - ref|| / ||ref||, conftest.TOL): fp32 1e-5, bf16 2e-2,
fp16 5e-3.
"""
from __future__ import annotations

import functools
import importlib
import inspect

import pytest
import torch

import ssmc
from ssmc import dsl as S
from ssmc.backends import get_backend
from ssmc.lowerings import legal_lowerings
from ssmc.plan import Plan
from tests.backends.triton.conftest import count_launches
from tests.helpers import check_against_reference

# the modules (ssmc.ops exports functions of the same names)
OPS = {name: importlib.import_module(f"ssmc.ops.{name}")
       for name in ("ssd", "selective_scan", "retention", "gla", "linear_attention")}

DIRECTIONS = ("forward", "reverse", "bidirectional")
SCALE = 0.5
SSD_OPTIONS = dict(has_D=True, has_z=True, has_dt_bias=True, dt_softplus=True, dt_min=1e-3,
                   dt_max=2.0)
S6_OPTIONS = dict(has_D=True, has_z=True, has_delta_bias=True, delta_softplus=True)
#: where the Triton backend runs: a GPU where there is one (no interpreter then), else the CPU;
#: the drawn inputs live there (drawn on the CPU, so the same values on both)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def definition(name: str, axes: dict[str, str], body):
    """A definition whose parameters are `axes` (name -> annotation); body(dict) -> output."""
    def fn(*args):
        return body(dict(zip(axes, args)))

    fn.__signature__ = inspect.Signature([
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=S.In[a])
        for n, a in axes.items()])
    return ssmc.ssm(fn, name=name)


# --------------------------------------------------------------------------- the built-ins,
# written again with a direction (forward: structurally equal to the built-in, tested below)

def _ssd_like(direction):
    def body(v):
        dt = S.clamp(S.softplus(v["dt"] + v["dt_bias"]), 1e-3, 2.0)
        y = S.recurrence(decay=S.exp(dt * v["A"]), key=v["B"], value=v["x"] * dt, query=v["C"],
                         direction=direction)
        return (y + v["D"] * v["x"]) * S.silu(v["z"])
    return definition(f"ssd_{direction}", dict(
        x="b t h p", dt="b t h", A="h", B="b t g n", C="b t g n", D="h", z="b t h p",
        dt_bias="h"), body)


def _selective_scan_like(direction):
    def body(v):
        dt = S.softplus(v["delta"] + v["delta_bias"])
        y = S.recurrence(decay=S.exp(dt * v["A"]), key=v["B"], value=v["u"] * dt, query=v["C"],
                         direction=direction)
        return (y + v["D"] * v["u"]) * S.silu(v["z"])
    return definition(f"selective_scan_{direction}", dict(
        u="b t h p", delta="b t h", A="h n", B="b t g n", C="b t g n", D="h", z="b t h p",
        delta_bias="h"), body)


def _retention_like(direction):
    return definition(f"retention_{direction}", dict(
        q="b t h n", k="b t h n", v="b t h p", gamma="h"),
        lambda v: S.recurrence(decay=v["gamma"], key=v["k"], value=v["v"], query=v["q"] * SCALE,
                               direction=direction))


def _gla_like(direction):
    return definition(f"gla_{direction}", dict(
        q="b t h n", k="b t h n", v="b t h p", g="b t h n"),
        lambda v: S.recurrence(decay=S.exp(v["g"]), key=v["k"], value=v["v"],
                               query=v["q"] * SCALE, direction=direction))


def _linear_attention_like(direction):
    return definition(f"linear_attention_{direction}", dict(
        q="b t h n", k="b t h n", v="b t h p"),
        lambda v: S.recurrence(key=v["k"], value=v["v"], query=v["q"] * SCALE,
                               direction=direction))


#: name -> (the built-in definition, its look-alike with a direction)
BUILTINS = {
    "ssd": (lambda: OPS["ssd"].build(**SSD_OPTIONS), _ssd_like),
    "selective_scan": (lambda: OPS["selective_scan"].build(**S6_OPTIONS), _selective_scan_like),
    "retention": (lambda: OPS["retention"].build(scale=SCALE), _retention_like),
    "gla": (lambda: OPS["gla"].build(scale=SCALE), _gla_like),
    "linear_attention": (lambda: OPS["linear_attention"].build(scale=SCALE),
                         _linear_attention_like),
}


@functools.lru_cache(maxsize=None)
def builtin(name: str, direction: str = "forward"):
    """The built-in itself for forward, its look-alike otherwise."""
    make, like = BUILTINS[name]
    return make() if direction == "forward" else like(direction)


# --------------------------------------------------------------------------- user-style
# definitions that no built-in covers

def _gated(direction):
    """A sigmoid-gated scalar decay that also gates the input, with a tanh epilogue."""
    def body(v):
        gate = S.sigmoid(v["a"] + 1.0)
        y = S.recurrence(decay=gate, key=v["k"], value=v["x"] * (1 - gate), query=v["q"],
                         direction=direction)
        return S.tanh(y) * v["w"] + v["x"] * S.sigmoid(v["z"])
    return definition(f"gated_{direction}", dict(
        x="b t h p", a="b t h", k="b t g n", q="b t g n", w="h p", z="b t h p"), body)


def _per_channel(direction):
    """A decay per (p, n) element from a per-head matrix A (Mamba-1 with p > 1), with a
    maximum/clamp epilogue."""
    def body(v):
        dt = S.softplus(v["dt"])
        y = S.recurrence(decay=S.exp(-dt * S.abs(v["A"])), key=v["B"], value=v["x"] * dt,
                         query=v["C"], direction=direction)
        return S.clamp(S.maximum(y, -2.0 * S.abs(v["D"])) + v["D"] * v["x"], -3.0, 3.0)
    return definition(f"per_channel_{direction}", dict(
        x="b t h p", dt="b t h", A="h p n", B="b t g n", C="b t g n", D="h"), body)


CUSTOM = {"gated": _gated, "per_channel": _per_channel}


@functools.lru_cache(maxsize=None)
def custom(name: str, direction: str):
    return CUSTOM[name](direction)


# --------------------------------------------------------------------------- inputs

#: input name -> how to draw it (a float64 tensor from a generator and a shape); others are
#: standard normal. Decays stay in (0, 1): A < 0, gamma in (0.5, 0.99), g = logsigmoid(.)
DRAW = {
    "A": lambda gen, shape: -(0.5 + 1.5 * torch.rand(shape, generator=gen, dtype=torch.float64)),
    "gamma": lambda gen, shape: 0.5 + 0.49 * torch.rand(shape, generator=gen,
                                                        dtype=torch.float64),
    "g": lambda gen, shape: torch.nn.functional.logsigmoid(
        torch.randn(shape, generator=gen, dtype=torch.float64) + 2.0),
}
for _name in ("dt", "delta", "dt_bias", "delta_bias"):
    DRAW[_name] = lambda gen, shape: 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)


def inputs_for(defn, sizes: dict, dtype=torch.float32, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for inp in defn.program.inputs:
        shape = tuple(sizes[a] for a in inp.axes)
        draw = DRAW.get(inp.name)
        x = draw(gen, shape) if draw else torch.randn(shape, generator=gen, dtype=torch.float64)
        out[inp.name] = x.to(dtype).to(DEVICE)
    return out


def state_for(defn, sizes: dict, num_states: int | None = None, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    shape = (num_states or sizes["b"], sizes["h"], sizes["n"], sizes["p"])
    if len(defn.program.recurrence.directions) > 1:
        shape = (2,) + shape
    return torch.randn(shape, generator=gen).to(DEVICE)


def cu_seqlens(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                        device=DEVICE)


#: small odd shapes; g < h wherever the definition has groups
SHAPES = {
    "t1": dict(b=2, t=1, h=4, g=2, n=5, p=3),
    "t7": dict(b=2, t=7, h=4, g=2, n=4, p=5),
    "t63": dict(b=1, t=63, h=2, g=1, n=6, p=3),
    "t100": dict(b=1, t=100, h=2, g=1, n=3, p=4),
}
#: packed sequences, with empty ones inside and at the end
LENGTHS = (3, 0, 5, 1, 0)


def shape_for(name: str, shape: str) -> dict:
    sizes = dict(SHAPES[shape])
    if name == "selective_scan":
        sizes["p"] = 1  # Mamba-1: one channel per head
    return sizes


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("name", list(BUILTINS))
def test_scan_builtin_lookalikes_are_the_builtins(name):
    """The forward look-alike is structurally the built-in, so the reverse and bidirectional
    look-alikes test the built-ins' expressions in those directions."""
    assert (BUILTINS[name][1]("forward").program.structural_key()
            == builtin(name).program.structural_key())


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("name", list(BUILTINS))
def test_scan_builtin(name, direction, shape, triton_check):
    defn = builtin(name, direction)
    sizes = shape_for(name, shape)
    triton_check(defn, inputs_for(defn, sizes), initial_state=state_for(defn, sizes),
                 return_final_state=True)


@pytest.mark.parametrize("name", list(BUILTINS))
def test_scan_builtin_without_states(name, triton_check):
    defn = builtin(name)
    triton_check(defn, inputs_for(defn, shape_for(name, "t7"), seed=5))


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("name", list(BUILTINS))
def test_scan_builtin_varlen(name, direction, triton_check):
    defn = builtin(name, direction)
    sizes = dict(shape_for(name, "t7"), b=1, t=sum(LENGTHS))
    triton_check(defn, inputs_for(defn, sizes, seed=2),
                 initial_state=state_for(defn, sizes, num_states=len(LENGTHS)),
                 return_final_state=True, cu_seqlens=cu_seqlens(LENGTHS))


def test_scan_varlen_without_initial_state(triton_check):
    defn = builtin("ssd")
    sizes = dict(shape_for("ssd", "t7"), b=1, t=sum(LENGTHS))
    triton_check(defn, inputs_for(defn, sizes, seed=3), return_final_state=True,
                 cu_seqlens=cu_seqlens(LENGTHS))


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
@pytest.mark.parametrize("name", list(BUILTINS))
def test_scan_builtin_bf16(name, direction, triton_check):
    defn = builtin(name, direction)
    sizes = shape_for(name, "t63")
    errors = triton_check(defn, inputs_for(defn, sizes, dtype=torch.bfloat16, seed=4),
                          initial_state=state_for(defn, sizes), return_final_state=True)
    # the state is fp32 whatever the inputs; only the output carries a bf16 rounding
    assert errors["final_state"] <= 1e-5


def test_scan_fp16(triton_check):
    defn = builtin("ssd")
    sizes = shape_for("ssd", "t63")
    triton_check(defn, inputs_for(defn, sizes, dtype=torch.float16, seed=6),
                 initial_state=state_for(defn, sizes), return_final_state=True)


def test_scan_mixed_dtypes(triton_check):
    """Per-head parameters in fp32 next to bf16 activations (how Mamba keeps A and D)."""
    defn = builtin("ssd")
    sizes = shape_for("ssd", "t7")
    inputs = inputs_for(defn, sizes, seed=7)
    inputs = {k: v if k in ("A", "D", "dt_bias") else v.to(torch.bfloat16)
              for k, v in inputs.items()}
    triton_check(defn, inputs, return_final_state=True)


def test_scan_non_contiguous_inputs(triton_check):
    """Inputs are read through their strides: a transposed x and a broadcast (stride 0) B."""
    defn = builtin("ssd")
    sizes = shape_for("ssd", "t7")
    inputs = inputs_for(defn, sizes, seed=8)
    b, t, h, g, n, p = (sizes[a] for a in "bthgnp")
    inputs["x"] = inputs["x"].transpose(1, 2).contiguous().transpose(1, 2)
    inputs["B"] = torch.randn(b, t, 1, n, device=DEVICE).expand(b, t, g, n)
    assert not inputs["x"].is_contiguous() and inputs["B"].stride(2) == 0
    triton_check(defn, inputs, initial_state=state_for(defn, sizes), return_final_state=True)


@pytest.mark.parametrize("shape", ["t7", "t63", "varlen"])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("name", list(CUSTOM))
def test_scan_custom(name, direction, shape, triton_check):
    defn = custom(name, direction)
    if shape == "varlen":
        sizes = dict(SHAPES["t7"], b=1, t=sum(LENGTHS))
        triton_check(defn, inputs_for(defn, sizes, seed=9),
                     initial_state=state_for(defn, sizes, num_states=len(LENGTHS)),
                     return_final_state=True, cu_seqlens=cu_seqlens(LENGTHS))
    else:
        sizes = SHAPES[shape]
        triton_check(defn, inputs_for(defn, sizes, seed=10),
                     initial_state=state_for(defn, sizes), return_final_state=True)


@pytest.mark.parametrize("name", list(CUSTOM))
def test_scan_custom_bf16(name, triton_check):
    defn = custom(name, "forward")
    sizes = SHAPES["t7"]
    triton_check(defn, inputs_for(defn, sizes, dtype=torch.bfloat16, seed=11),
                 initial_state=state_for(defn, sizes), return_final_state=True)


def test_scan_integer_powers_of_negative_values(triton_check):
    """x ** k for integer k > 4 (also as a float, y ** 2.0) is defined for negative x; it was
    rendered as exp(k log x), which is NaN there."""
    def body(v):
        y = S.recurrence(key=v["k"], value=v["v"], query=v["q"])
        return y ** 5 + y ** 2.0 + v["x"] ** 7 / (1 + v["x"] ** 6) + S.tanh(y) ** -5 * 1e-3
    defn = definition("powers", dict(q="b t h n", k="b t h n", v="b t h p", x="b t h p"), body)
    sizes = SHAPES["t7"]
    inputs = inputs_for(defn, sizes, seed=15)
    assert (inputs["x"] < 0).any()
    triton_check(defn, inputs, tol=1e-4)  # y ** 5 and tanh(y) ** -5 amplify fp32 rounding


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def test_scan_through_the_op_wrappers():
    """`ssmc.ops.ssd` / `selective_scan` with backend="triton" (the wrappers reshape
    Mamba-1's (b, t, d) tensors and pick a definition variant per option)."""
    gen = torch.Generator().manual_seed(12)
    b, t, h, g, n, p = 2, 7, 4, 2, 4, 3

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)
    x, z = randn(b, t, h, p), randn(b, t, h, p)
    dt, A = randn(b, t, h), -torch.rand(h, generator=gen).to(DEVICE) - 0.5
    B, C = randn(b, t, g, n), randn(b, t, g, n)
    D = randn(h, p)  # per-channel skip
    args = (x, dt, A, B, C)
    kw = dict(D=D, z=z, dt_softplus=True, return_final_state=True)
    y, hT = OPS["ssd"].ssd(*args, **kw, backend="triton", lowering="scan")
    y_r, hT_r = OPS["ssd"].ssd(*(a.double() for a in args), **{**kw, "D": D.double(),
                                                               "z": z.double()},
                               backend="reference", lowering="scan")
    assert _rel(y, y_r) <= 1e-5 and _rel(hT, hT_r) <= 1e-5

    d = 5
    u, delta = randn(b, t, d), randn(b, t, d)
    A6 = -torch.rand(d, n, generator=gen).to(DEVICE) - 0.5
    B6, C6 = randn(b, t, n), randn(b, t, n)
    h0 = randn(b, d, n)
    y, hT = OPS["selective_scan"].selective_scan(u, delta, A6, B6, C6, delta_softplus=True,
                                                 initial_state=h0, return_final_state=True,
                                                 backend="triton", lowering="scan")
    y_r, hT_r = OPS["selective_scan"].selective_scan(
        u.double(), delta.double(), A6.double(), B6.double(), C6.double(), delta_softplus=True,
        initial_state=h0.double(), return_final_state=True, backend="reference",
        lowering="scan")
    assert y.shape == (b, t, d) and hT.shape == (b, d, n)
    assert _rel(y, y_r) <= 1e-5 and _rel(hT, hT_r) <= 1e-5


def test_scan_checker_detects_a_mismatch(triton_check):
    """The checker fails when the kernel is off by more than its tolerance."""
    defn = builtin("gla")
    inputs = inputs_for(defn, shape_for("gla", "t7"))
    with pytest.raises(AssertionError, match=r"y: relative L2 error .* > tol 1\.0e-12"):
        triton_check(defn, inputs, tol=1e-12)


# --------------------------------------------------------------------------- GPU, real shapes

GPU_SIZES = dict(b=2, t=1024, h=8, g=2, n=64, p=64)


def _skip_unless_runnable(defn, lowering):
    program = defn.program
    if lowering not in legal_lowerings(program):
        pytest.skip(f"{lowering} is not legal for decay kind {program.decay_kind.value}")
    plan = Plan(program=program, lowering=lowering, dtype="bfloat16", has_initial_state=True,
                return_final_state=True)
    why = get_backend("triton").supports(plan)
    if why is not None:
        pytest.skip(f"triton-{lowering}: {why}")


@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
@pytest.mark.parametrize("name", list(BUILTINS) + list(CUSTOM))
@pytest.mark.parametrize("lowering", ["scan", "chunked", "quadratic"])
def test_scan_gpu_real_shapes(lowering, name, direction, triton_check):
    defn = builtin(name, direction) if name in BUILTINS else custom(name, direction)
    _skip_unless_runnable(defn, lowering)
    sizes = GPU_SIZES
    inputs = inputs_for(defn, sizes, dtype=torch.bfloat16, seed=13)
    inputs = {k: v.cuda() for k, v in inputs.items()}
    triton_check(defn, inputs, lowering=lowering,
                 initial_state=state_for(defn, sizes).cuda(), return_final_state=True)


@pytest.mark.gpu
@pytest.mark.parametrize("lowering", ["scan", "chunked", "quadratic"])
def test_scan_gpu_real_shapes_varlen(lowering, triton_check):
    defn = builtin("ssd")
    _skip_unless_runnable(defn, lowering)
    lengths = (1000, 0, 24, 1, 999)
    sizes = dict(GPU_SIZES, b=1, t=sum(lengths))
    inputs = {k: v.cuda() for k, v in
              inputs_for(defn, sizes, dtype=torch.bfloat16, seed=14).items()}
    triton_check(defn, inputs, lowering=lowering,
                 initial_state=state_for(defn, sizes, num_states=len(lengths)).cuda(),
                 return_final_state=True, cu_seqlens=cu_seqlens(lengths).cuda())


@pytest.mark.parametrize("direction", ("bidirectional", "cross2d"))
def test_scan_orders_summed_atomically_or_one_launch_each(direction, monkeypatch):
    """Several orders run in one launch and add into an fp32 accumulator atomically; with
    torch's deterministic algorithms on, one launch per order instead. Both equal the float64
    reference; the deterministic path gives the same bits on every call."""
    defn = _ssd_like(direction)
    sizes = dict(b=2, t=12, h=2, g=1, n=3, p=5)
    grid = (3, 4) if direction == "cross2d" else None
    orders = 4 if grid else 2
    inputs = inputs_for(defn, sizes, seed=9)
    kw = {"grid": grid} if grid else dict(initial_state=state_for(defn, sizes),
                                          return_final_state=True)
    op = ssmc.compile(defn, backend="triton", lowering="scan")
    ref = ssmc.compile(defn, backend="reference", lowering="scan")
    want = ref(**{k: v.double() for k, v in inputs.items()},
               **{k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()})
    launches = count_launches(monkeypatch, "scan", "ssmc_scan_fwd")
    results = {}
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            launches.clear()
            results[deterministic] = [op(**inputs, **kw) for _ in range(2)]
            assert len(launches) == (2 * orders if deterministic else 2), launches
    finally:
        torch.use_deterministic_algorithms(previous)
    y = (lambda r: r) if grid else (lambda r: r[0])
    for got in results[False] + results[True]:
        assert _rel(y(got), y(want)) <= 1e-5
        if not grid:
            assert _rel(got[1], want[1]) <= 1e-5
    assert torch.equal(y(results[True][0]), y(results[True][1]))


@pytest.mark.parametrize("direction", ("bidirectional", "cross2d"))
@pytest.mark.parametrize("n, p, deterministic", [(3, 5, False), (3, 5, True), (16, 16, False),
                                                 (16, 8, False)])
def test_scan_backward_of_several_orders(n, p, deterministic, direction):
    """The backward's kernels run every order in one launch (y for the epilogue summed
    atomically, or one launch per order under deterministic algorithms): gradients of every
    input and of the initial state against float64 autograd through the reference. At n=16
    the checkpointing forward runs a step at a time between its checkpoints; at n=16, p=8 the
    forward's own blocks (16 steps) are longer than the backward's (8), its checkpoint
    interval."""
    defn = _ssd_like(direction)
    sizes = dict(b=2, t=20, h=2, g=1, n=n, p=p)
    grid = (4, 5) if direction == "cross2d" else None
    inputs = inputs_for(defn, sizes, seed=4)
    h0 = None if grid else state_for(defn, sizes)
    kw = {"grid": grid} if grid else {}
    gen = torch.Generator().manual_seed(5)
    grad_y = torch.randn(sizes["b"], sizes["t"], sizes["h"], sizes["p"],
                         generator=gen).to(DEVICE)

    def grads(backend, dtype):
        op = ssmc.compile(defn, backend=backend, lowering="scan")
        xs = {k: v.to(dtype).requires_grad_(True) for k, v in inputs.items()}
        state = None if h0 is None else h0.to(dtype).requires_grad_(True)
        y = op(**xs, **kw) if state is None else op(**xs, **kw, initial_state=state)
        y.backward(grad_y.to(dtype))
        out = {k: x.grad for k, x in xs.items()}
        if state is not None:
            out["initial_state"] = state.grad
        return out

    want = grads("reference", torch.float64)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        got = grads("triton", torch.float32)
    finally:
        torch.use_deterministic_algorithms(previous)
    for name, g in want.items():
        assert _rel(got[name], g) <= 1e-5, name


@pytest.mark.parametrize("varlen", (False, True))
def test_scan_backward_decay_terms_of_every_input_shape(varlen):
    """The decay's chain-rule terms are formed in the backward kernel, summed over what each
    input lacks: a group input with t (u), one without h or t (w), one with b but no t (c),
    under packed sequences too (where b's sum runs over the sequences), both directions."""
    defn = definition("decay_terms", dict(u="b t g n", w="n", c="b h", k="b t g n",
                                          v="b t h p", q="b t g n"),
                      lambda v: S.recurrence(decay=S.sigmoid(v["u"] + v["w"] + v["c"]),
                                             key=v["k"], value=v["v"], query=v["q"],
                                             direction="bidirectional"))
    _gradients_match_reference(defn, dict(b=2, t=11, h=4, g=2, n=3, p=5), varlen, seed=6)


def _gradients_match_reference(defn, sizes: dict, varlen: bool, seed: int) -> None:
    """Gradients of every input through the Triton scan (fp32) against float64 autograd
    through the reference, for a random output cotangent; packed LENGTHS when `varlen`."""
    kw = {}
    if varlen:
        sizes = dict(sizes, b=1, t=sum(LENGTHS))
        kw["cu_seqlens"] = cu_seqlens(LENGTHS)
    inputs = inputs_for(defn, sizes, seed=seed)
    grad_y = torch.randn(sizes["b"], sizes["t"], sizes["h"], sizes["p"],
                         generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)

    def grads(backend, dtype):
        op = ssmc.compile(defn, backend=backend, lowering="scan")
        xs = {k: x.to(dtype).requires_grad_(True) for k, x in inputs.items()}
        op(**xs, **kw).backward(grad_y.to(dtype))
        return {k: x.grad for k, x in xs.items()}

    want, got = grads("reference", torch.float64), grads("triton", torch.float32)
    for name, g in want.items():
        assert _rel(got[name], g) <= 1e-5, name


def test_scan_forward_small_step_tiles_run_in_one_warp():
    """A step-at-a-time tile of small n narrows to one warp's 128 values (the sum over n stays
    in the warp); large n keeps its 32-wide p-block and four warps; a tile's own choice wins."""
    from ssmc.backends.triton.lowerings.scan_launch import scan_blocks, scan_warps

    assert scan_blocks(16, 192) == (16, 8, 1) and scan_warps(16, 8, 1) == 1
    assert scan_blocks(64, 64) == (64, 32, 1) and scan_warps(64, 32, 1) == 4
    assert scan_blocks(16, 192, {"BP": 32}) == (16, 32, 1) and scan_warps(16, 32, 1) == 4
    assert scan_warps(16, 8, 1, {"num_warps": 2}) == 2
    assert scan_blocks(16, 4)[2] > 1    # too small a tile to run a step at a time


@pytest.mark.parametrize("direction", ("forward", "bidirectional", "cross2d"))
@pytest.mark.parametrize("n", (3, 16))
def test_scan_forward_step_at_a_time_and_in_blocks(n, direction):
    """A large state tile runs a step at a time (BT = 1), a small one in blocks of steps:
    both against the float64 reference, with odd lengths and every order in one launch."""
    from ssmc.backends.triton.lowerings.scan_launch import scan_blocks

    sizes = dict(b=2, t=35, h=2, g=1, n=n, p=16)
    assert (scan_blocks(n, 16)[2] == 1) == (n == 16)
    defn = _ssd_like(direction)
    inputs = inputs_for(defn, sizes, seed=n)
    kw = {"grid": (5, 7)} if direction == "cross2d" else dict(
        initial_state=state_for(defn, sizes), return_final_state=True)
    got = ssmc.compile(defn, backend="triton", lowering="scan")(**inputs, **kw)
    want = ssmc.compile(defn, backend="reference", lowering="scan")(
        **{k: v.double() for k, v in inputs.items()},
        **{k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()})
    if direction == "cross2d":
        got, want = (got,), (want,)
    for g, w in zip(got, want):
        assert _rel(g, w) <= 1e-5


def _raw_decay(direction):
    """A user's recurrence whose decay is an input as given: zero, negative, underflowing."""
    return definition(f"raw_decay_{direction}",
                      dict(a="b t h p n", k="b t g n", v="b t h p", q="b t g n"),
                      lambda v: S.recurrence(decay=v["a"], key=v["k"], value=v["v"],
                                             query=v["q"], direction=direction))


@pytest.mark.parametrize("direction", ("forward", "bidirectional", "cross2d"))
@pytest.mark.parametrize("t", (0, 1, 9, 35))
def test_scan_step_at_a_time_over_the_decay_domain(direction, t):
    """The step-at-a-time kernel of the backward's checkpointing forward (blocks of
    `scan.STEPS` steps unrolled, each block's inputs loaded a block ahead) on decays of 0,
    negative, underflowing (1e-30) and above 1, at lengths around and below a block (and
    empty), forward and gradients of every input against float64 autograd."""
    from ssmc.backends.triton.lowerings.scan import STEPS
    from ssmc.backends.triton.lowerings.scan_launch import scan_blocks

    assert scan_blocks(16, 16)[2] == 1 and STEPS >= 2
    grid = {0: (0, 3), 1: (1, 1), 9: (3, 3), 35: (5, 7)}[t] \
        if direction == "cross2d" else None
    sizes = dict(b=2, t=t, h=2, g=1, n=16, p=16)
    defn = _raw_decay(direction)
    gen = torch.Generator().manual_seed(t)
    inputs = inputs_for(defn, sizes, seed=t)
    a = torch.rand((2, t, 2, 16, 16), generator=gen, dtype=torch.float64) * 1.2 - 0.1
    special = torch.tensor([0.0, -0.7, 1e-30, 1.05], dtype=torch.float64)
    a.view(-1)[: 4 * (a.numel() // 4)].view(-1, 4)[::3] = special
    inputs["a"] = a.float().to(DEVICE)
    kw = {"grid": grid} if grid else {}
    grad_y = torch.randn(2, t, 2, 16, generator=gen).to(DEVICE)

    def run(backend, dtype):
        op = ssmc.compile(defn, backend=backend, lowering="scan")
        xs = {k: v.to(dtype).requires_grad_(True) for k, v in inputs.items()}
        y = op(**xs, **kw)
        y.backward(grad_y.to(dtype))
        return y, {k: x.grad for k, x in xs.items()}

    def off(a, b):   # relative L2; a zero reference (empty, or a zero gradient) wants zero
        a, b = a.double().cpu(), b.double().cpu()
        return float((a - b).norm() / b.norm()) if b.norm() > 0 else float(a.norm())

    if grid is not None and 0 in grid:     # an empty grid is refused before any kernel
        with pytest.raises(ssmc.SSMCError, match="'grid' must be positive"):
            run("triton", torch.float32)
        return
    want_y, want = run("reference", torch.float64)
    got_y, got = run("triton", torch.float32)
    assert torch.isfinite(got_y).all()
    assert off(got_y, want_y) <= 1e-5
    for name, g in want.items():
        assert torch.isfinite(got[name]).all(), name
        assert off(got[name], g) <= 1e-5, name


@pytest.mark.parametrize("varlen", (False, True))
def test_scan_backward_writes_every_gradient_entry(varlen, monkeypatch):
    """The backward's dq / dk partials and dv are allocated without a fill: every entry must
    be written. Allocated NaN-filled here, the gradients still match the float64 reference
    (packed sequences with empty ones among them too)."""
    from ssmc.backends.triton.lowerings import scan_bwd_launch

    real_empty = torch.empty

    def nan_empty(*shape, **kw):
        out = real_empty(*shape, **kw)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(scan_bwd_launch.torch, "empty", nan_empty)
    _gradients_match_reference(_ssd_like("bidirectional"), dict(b=2, t=13, h=2, g=1, n=16, p=16),
                               varlen, seed=3)


@pytest.mark.parametrize("case", ["varlen", "bidirectional", "t1"])
@pytest.mark.parametrize("name", ["ssd", "selective_scan"])
def test_scan_decay_term_buffers_are_written_everywhere(name, case, monkeypatch):
    """The backward's decay-term buffers are not zero-filled (every entry is stored): filled
    with NaN instead, every gradient still matches the reference, with packed sequences
    (empty ones among them), both directions and one step."""
    from ssmc.backends.triton.lowerings import decay_terms, scan_bwd_launch
    real = decay_terms.buffers
    filled = []

    def poisoned(*args, **kwargs):
        bufs = {k: v.fill_(float("nan")) for k, v in real(*args, **kwargs).items()}
        filled.extend(bufs)
        return bufs

    monkeypatch.setattr(scan_bwd_launch, "term_buffers", poisoned)
    defn = builtin(name, "bidirectional" if case == "bidirectional" else "forward")
    sizes = shape_for(name, "t1" if case == "t1" else "t7")
    kw = {}
    if case == "varlen":
        sizes = dict(sizes, b=1, t=sum(LENGTHS))
        kw = dict(cu_seqlens=cu_seqlens(LENGTHS),
                  initial_state=state_for(defn, sizes, num_states=len(LENGTHS)))
    inputs = {k: v.to(DEVICE) for k, v in inputs_for(defn, sizes, seed=6).items()}
    check_against_reference(defn, inputs, tol=1e-5, grad_tol=3e-5, backend="triton",
                            lowering="scan", return_final_state=True, **kw)
    assert filled    # the definition has decay terms


@pytest.mark.parametrize("name", ["ssd", "selective_scan"])
def test_scan_backward_runs_its_scans_forward(name):
    """The backward's adjoint (reverse in time) is a prefix scan over the block's rows taken
    last row first, not a reverse scan: Triton 3.6 compiles a reverse scan to about four times
    a prefix scan's shuffles (VMamba's n = 16 block: 1396 shuffles against 756, sm_90a), and
    shuffles were the block's bound. Two prefix scans, none reversed."""
    from ssmc.backends.triton.lowerings import scan_bwd
    src = scan_bwd.render(Plan(program=builtin(name, "forward").program, lowering="scan",
                               dtype="bfloat16"))
    bwd = src[src.index("def ssmc_scan_bwd("):]
    assert bwd.count("tl.associative_scan(") == 2
    assert "reverse=True" not in bwd


def test_scan_blocks_are_not_padded_to_two():
    """n = 1 (VMamba's n = 1) and p = 1 (Mamba-1's channels) take blocks of one: a block padded
    to two does twice the work for the same states. The tuner's space offers only p-blocks of
    one where p = 1. A one-warp backward block holds about ONE_WARP_BLOCK values (VMamba's
    16 x 8 state: 8 steps, as measured; Mamba-1's 16 x 1: 16)."""
    from types import SimpleNamespace

    from ssmc.backends.triton.lowerings.scan_bwd_launch import backward_blocks
    from ssmc.backends.triton.lowerings.scan_launch import block_tile, scan_blocks
    from ssmc.backends.triton.tiles import scan_space
    assert block_tile(1, 32)[:2] == (1, 32) and scan_blocks(1, 32)[:2] == (1, 32)
    assert block_tile(16, 1)[:2] == (16, 1) and scan_blocks(16, 1)[:2] == (16, 1)
    assert backward_blocks(16, 1) == (16, 1, 16, 1)
    assert backward_blocks(16, 192) == (16, 8, 8, 1)
    assert backward_blocks(1, 32)[:2] == (1, 32)
    assert backward_blocks(128, 64)[:2] == (128, 2)     # p > 1 keeps its blocks of two
    _, axes, _ = scan_space(SimpleNamespace(sizes=dict(n=16, p=1)), *scan_blocks(16, 1), 4)
    assert axes["BP"] == (1,)
