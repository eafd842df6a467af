"""ssmc/matrix.py `attention_matrix`: the hidden attention matrix as a differentiable custom op,
checked (values and gradients of every input) against the float64 materialised reference
`ssmc.reference.attention_matrix`, differentiated by torch. Every decay structure and sign,
groups, every direction, `reduce=`, `window=`, the Triton forward (interpreted on the CPU)."""
import importlib

import pytest
import torch

import ssmc
import ssmc.ops
from ssmc import dsl as S
from ssmc import reference
from ssmc.backends import matrix_rows
from ssmc.plan import Plan
from ssmc.torch.matrix_ops import attention_matrix_op, route_for
from ssmc.validate import bind
from tests.helpers import compare, make_definition, random_inputs

SIZES = dict(b=2, t=9, h=4, g=2, n=3, p=2)
TOL = 1e-10          # float64 against float64
TOL32 = 2e-5         # float32 against float64


@pytest.fixture(autouse=True)
def _small_row_blocks(monkeypatch):
    """Several row blocks even at t = 9, so the joins between blocks are checked."""
    monkeypatch.setattr(matrix_rows, "BLOCK_ELEMENTS", 2 * 9 * 4 * 3 * 3)


def close(name, actual, expected, tol):
    r = compare(name, actual, expected, tol)
    assert r.ok, str(r)


def leaves(x: dict, dtype=None) -> dict:
    return {k: v.detach().to(dtype or v.dtype).clone().requires_grad_(True) for k, v in x.items()}


def reference_matrix(defn, x: dict, reduce=None):
    """The float64 reference on float64 copies of `x`, with torch's gradients to them."""
    xs = leaves(x, torch.float64)
    b = bind(defn.program, (), xs)
    M = reference.attention_matrix(defn.program, b.tensors, b.sizes)
    if reduce is not None:
        M = M.sum(1) if reduce == "sum" else M.mean(1)
    return M, xs


def check(defn, x: dict, tol: float, op=None, reduce=None, window=None):
    """M and the gradients of every input of sum(M * G) against the reference."""
    xs = leaves(x)
    M = ssmc.attention_matrix(op or defn, **xs, reduce=reduce, window=window)
    R, rs = reference_matrix(defn, x, reduce)
    if window is not None:
        R = R[..., slice(*window[0]), slice(*window[1])]
    close("M", M, R, tol)
    G = torch.randn(R.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (M * G.to(M.dtype)).sum().backward()
    (R * G).sum().backward()
    for name in x:
        expected = rs[name].grad
        if expected is None:      # an input the matrix does not read (value, epilogue)
            expected = torch.zeros_like(rs[name])
        close(f"d{name}", xs[name].grad, expected, tol)


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("decay", ["none", "time_invariant", "scalar", "diagonal"])
def test_attention_matrix_grads_every_decay_and_direction(decay, direction):
    f = make_definition(decay, direction, epilogue=True)   # the epilogue plays no part
    check(f, random_inputs(f, SIZES, dtype=torch.float64, seed=1), TOL)


@ssmc.ssm
def signed(v: S.In["b t h p"], a: S.In["b t h n"], k: S.In["b t g n"], q: S.In["b t g n"]):
    return S.recurrence(decay=a * 1.5, key=k, value=v, query=q)


@ssmc.ssm
def signed_reverse(v: S.In["b t h p"], a: S.In["b t h"], k: S.In["b t g n"],
                   q: S.In["b t g n"]):
    return S.recurrence(decay=a, key=k, value=v, query=q, direction="bidirectional")


@pytest.mark.parametrize("defn", [signed, signed_reverse], ids=["diagonal", "scalar-bidir"])
def test_attention_matrix_zero_and_negative_decays(defn):
    """A decay that is zero (an exact reset) or negative: products of decays, not logs; its
    gradient at a zero is the product of the other decays."""
    x = random_inputs(defn, SIZES, dtype=torch.float64, seed=2)
    x["a"] = x["a"].clamp(-1.2, 1.2)
    x["a"].view(-1)[::5] = 0.0
    check(defn, x, TOL)


@ssmc.ssm
def exp_decay(x: S.In["b t h p"], u: S.In["b t h"], B: S.In["b t g n"], C: S.In["b t g n"]):
    return S.recurrence(decay=S.exp(u), key=B, value=x, query=C)


def strong_inputs(seed: int) -> dict:
    """exp(u): u in [-0.05, 0) with -1e4 on about a tenth of the steps and one -inf."""
    gen = torch.Generator().manual_seed(seed)
    x = random_inputs(exp_decay, SIZES, seed=seed)
    u = -0.05 * torch.rand(x["u"].shape, generator=gen)
    u[torch.rand(u.shape, generator=gen) < 0.1] = -1e4
    u.view(-1)[7] = float("-inf")
    return dict(x, u=u)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_attention_matrix_strong_and_infinite_log_decays(backend):
    """fp32 inputs: the CPU path and the Triton kernel (interpreted) give exact zeros across
    a reset, no NaN, and full accuracy elsewhere; gradients included."""
    check(exp_decay, strong_inputs(3), TOL32, op=ssmc.compile(exp_decay, backend=backend))


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_attention_matrix_reduce_over_heads(reduce):
    f = make_definition("diagonal", "forward")
    check(f, random_inputs(f, SIZES, dtype=torch.float64, seed=4), TOL, reduce=reduce)


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_attention_matrix_window(direction):
    """A (rows, columns) window is the same block of the whole matrix, gradients too."""
    f = make_definition("scalar", direction)
    x = random_inputs(f, SIZES, dtype=torch.float64, seed=5)
    check(f, x, TOL, window=((5, 9), (1, 4)))
    check(f, x, TOL, window=((2, 6), (3, 8)), reduce="mean")
    M = ssmc.attention_matrix(f, **x, window=(slice(6, None), slice(0, 9)))
    close("slice window", M, ssmc.attention_matrix(f, **x)[..., 6:, :], TOL)


def test_attention_matrix_per_channel_decay():
    """A decay over p: one matrix per value channel, M[:, :, c] v[..., c] = y[..., c]; reduce
    averages heads and channels without materialising them; gradients by finite differences."""
    f = make_definition("full", "reverse")
    x = random_inputs(f, dict(SIZES, t=5), dtype=torch.float64, seed=6)
    M = ssmc.attention_matrix(f, **x)
    assert M.shape == (2, 4, 2, 5, 5)
    y = ssmc.compile(f, backend="reference")(**x)
    close("y", torch.einsum("bhpts,bshp->bthp", M, x["v"]), y, TOL)
    close("mean", ssmc.attention_matrix(f, **x, reduce="mean"), M.mean((1, 2)), TOL)
    small = random_inputs(f, dict(b=1, t=4, h=2, g=1, n=2, p=2), dtype=torch.float64, seed=7)
    inputs = [v.requires_grad_(True) for v in small.values()]
    route = route_for(f.program, "auto")
    assert torch.autograd.gradcheck(lambda *a: attention_matrix_op(list(a), route, "sum"),
                                    inputs)


def test_attention_matrix_triton_forward_and_groups():
    """The Triton matrix kernel (forward) with the torch backward, fp32, g < h."""
    f = make_definition("diagonal", "bidirectional")
    check(f, random_inputs(f, SIZES, seed=8), TOL32, op=ssmc.compile(f, backend="triton"),
          reduce="sum")


def test_attention_matrix_opcheck_and_compile():
    f = make_definition("scalar", "forward")
    x = random_inputs(f, dict(SIZES, t=5), seed=9)
    inputs = [v.requires_grad_(True) for v in x.values()]
    torch.library.opcheck(attention_matrix_op, (inputs, route_for(f.program, "auto"), "mean"))
    fn = torch.compile(lambda *a: ssmc.attention_matrix(f, *a, window=((1, 5), (0, 3))),
                       fullgraph=True)
    close("compiled", fn(*inputs), ssmc.attention_matrix(f, **x)[..., 1:5, 0:3], 1e-6)


def test_attention_matrix_rejects_bad_reduce_and_window():
    f = make_definition("scalar")
    x = random_inputs(f, SIZES, seed=10)
    with pytest.raises(ssmc.ArgumentError, match=r"reduce='max' is not valid"):
        ssmc.attention_matrix(f, **x, reduce="max")
    with pytest.raises(ssmc.ArgumentError, match=r"window rows \(3, 12\) must satisfy"):
        ssmc.attention_matrix(f, **x, window=((3, 12), (0, 2)))
    with pytest.raises(ssmc.ArgumentError, match="window rows must be a .start, stop. pair"):
        ssmc.attention_matrix(f, **x, window=(0, 3))


@pytest.mark.parametrize("name", ["ssd", "selective_scan", "retention", "gla",
                                  "linear_attention"])
def test_attention_matrix_builtins_mean_over_heads(name):
    """The built-ins' definitions (Mamba-1's matrices per channel: h = d, p = 1), averaged over
    heads, with gradients through their prologues (softplus, exp, biases)."""
    f = getattr(ssmc.ops, name).definition
    check(f, random_inputs(f, dict(SIZES, t=6), dtype=torch.float64, seed=11), TOL,
          reduce="mean")


@pytest.mark.parametrize("decay, reduce", [("none", "sum"), ("scalar", None),
                                           ("diagonal", "mean")])
def test_attention_matrix_triton_backward_kernels(decay, reduce):
    """Forward definitions with a log-safe decay: the Triton kernels read dM tile by tile
    (several row blocks, g < h; a decay over n in chunks of n), fp32."""
    f = make_definition(decay, "forward")
    fused = importlib.import_module("ssmc.backends.triton.mixing_loss").fused
    assert fused(Plan(program=f.program, lowering="quadratic", dtype="float32")) is None
    x = random_inputs(f, dict(SIZES, t=37, n=18), seed=12)
    check(f, x, TOL32, op=ssmc.compile(f, backend="triton"), reduce=reduce)


def test_grid_orders_have_no_attention_matrix():
    """A cross2d op is refused before anything runs, and the backend-neutral paths refuse it
    too rather than return a matrix of the row orders alone."""
    from ssmc.backends.chain_rule import CanonicalInputs
    from ssmc.reference.matrix import attention_matrix as reference_matrix

    @ssmc.ssm
    def grid(x: S.In["b t h p"], B: S.In["b t h n"], C: S.In["b t h n"]):
        return S.recurrence(key=B, value=x, query=C, direction="cross2d")

    xs = (torch.randn(1, 6, 1, 2), torch.randn(1, 6, 1, 3), torch.randn(1, 6, 1, 3))
    with pytest.raises(ssmc.UnsupportedError, match="cross2d"):
        ssmc.attention_matrix(grid, *xs, grid=(2, 3))
    tensors = dict(zip(("x", "B", "C"), xs))
    sizes = dict(b=1, t=6, h=1, g=1, n=3, p=2, grid_h=2, grid_w=3)
    with pytest.raises(ssmc.UnsupportedError, match="grid orders"):
        reference_matrix(grid.program, tensors, sizes)
    env = CanonicalInputs(grid.program, tensors, sizes, torch.float64)
    with pytest.raises(ssmc.UnsupportedError, match="grid orders"):
        matrix_rows.rows(grid.program, matrix_rows.operands(grid.program, env), sizes, 0, 6)
