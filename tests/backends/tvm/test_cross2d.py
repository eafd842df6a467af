"""direction="cross2d" on the TVM backend's LLVM lowerings against the float64 reference:
every lowering legal for each decay kind, with and without per-order inputs (axis k), odd
grids (a single row, a single column), outputs and the gradients of every input; zero and
negative decays; chunk and checkpoint boundaries inside the column orders; and that
`backend="auto"` on the CPU runs TVM (it ran the reference before).

The grid's height is a runtime argument of the kernels, so the grids of one definition and
lowering share one compiled function: definitions are made once per module.
"""
from __future__ import annotations

import inspect
import shutil

import pytest
import torch

pytest.importorskip("tvm")

import ssmc  # noqa: E402
from ssmc import dsl as S  # noqa: E402
from ssmc.backends.tvm import TVMKernel, cuda_lowering  # noqa: E402
from ssmc.backends.tvm.backward import backward_kind  # noqa: E402
from ssmc.backends.tvm.build import cuda_host_source, nvcc_compile  # noqa: E402
from ssmc.backends.tvm.export import export  # noqa: E402
from ssmc.backends.tvm.lowerings import LOWERINGS as TIR, KernelSpec, func_name  # noqa: E402
from ssmc.backends.tvm.lowerings.chunked_cuda import unsupported  # noqa: E402
from ssmc.lowerings import legal_lowerings  # noqa: E402
from ssmc.plan import Plan  # noqa: E402
from tests.helpers import check_against_reference, random_inputs  # noqa: E402

pytestmark = pytest.mark.usefixtures("kernel_cache_per_module")

LOWERINGS = ("scan", "chunked", "quadratic")
GRIDS = ((3, 5), (1, 7), (6, 1))
TOL = {torch.float32: 2e-5, torch.float64: 1e-10}
#: the raw decay's axes per decay kind (sigmoid(a + 2) in (0, 1)), without the order axis
DECAY_AXES = {"none": None, "time_invariant": "h n", "scalar": "b t h", "diagonal": "b t h n",
              "full": "b t h n p"}


def _with_k(axes: str) -> str:
    """The annotation with the order axis k after b (first where there is no b)."""
    a = axes.split()
    a.insert(1 if a[0] == "b" else 0, "k")
    return " ".join(a)


def _definition(name: str, axes: dict, body):
    body.__signature__ = inspect.Signature([
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=S.In[a])
        for n, a in axes.items()])
    return ssmc.ssm(body, name=name)


def grid_definition(decay: str, per_order: bool):
    """q, k over groups, v, a decay of the kind. Per order: the query, the decay and a value
    scale s carry k, and the epilogue (y + D v) * silu(z) (whose derivatives need y) reads
    inputs without k; otherwise y itself."""
    axes = {"q": "b t g n", "k": "b t g n", "v": "b t h p"}
    if DECAY_AXES[decay] is not None:
        axes["a"] = DECAY_AXES[decay]
    if per_order:
        axes.update(q=_with_k(axes["q"]), s="k h", z="b t h p", D="h")
        if "a" in axes:
            axes["a"] = _with_k(axes["a"])

    def body(*args):
        x = dict(zip(axes, args))
        dec = S.sigmoid(x["a"] + 2) if "a" in x else None
        value = x["v"] * x["s"] if per_order else x["v"]
        y = S.recurrence(decay=dec, key=x["k"], value=value, query=x["q"], direction="cross2d")
        return (y + x["D"] * x["v"]) * S.silu(x["z"]) if per_order else y
    return _definition(f"{decay}_cross2d" + ("_k" if per_order else ""), axes, body)


@ssmc.ssm
def vmamba(x: S.In["b t h p"], dt: S.In["b k t h p"], A: S.In["k h p n"], B: S.In["b k t n"],
           C: S.In["b k t n"], D: S.In["h p"]):
    """VMamba's cross scan: Mamba-1's per-(p, n) decay, every order with its own dt, A, B, C."""
    d = S.softplus(dt)
    y = S.recurrence(decay=S.exp(d * A), key=B, value=x * d, query=C, direction="cross2d")
    return y + D * x


DEFS = {(kind, per_order): grid_definition(kind, per_order)
        for kind in DECAY_AXES for per_order in (False, True)}
DEFS["full", True] = vmamba


@ssmc.ssm
def signed(x: S.In["b t h p"], a: S.In["b t h"], B: S.In["b t n"], C: S.In["b t n"]):
    return S.recurrence(decay=a, key=B, value=x, query=C, direction="cross2d")


@ssmc.ssm
def signed_k(x: S.In["b t h p"], a: S.In["b k t h n"], B: S.In["b k t n"], C: S.In["b t n"]):
    return S.recurrence(decay=a, key=B, value=x, query=C, direction="cross2d")


def grid_inputs(defn, H: int, W: int, dtype=torch.float32, seed=0, **sizes) -> dict:
    sizes = dict(dict(b=2, h=4, g=2, n=3, p=5), **sizes, t=H * W, k=4)
    xs = random_inputs(defn, sizes, dtype=dtype, seed=seed)
    if "A" in xs:   # Mamba-1's A is negative
        xs["A"] = -xs["A"].abs()
    return xs


def check(defn, lowering, grid, dtype=torch.float32, inputs=None):
    if lowering not in legal_lowerings(defn.program):
        pytest.skip(f"{lowering} is not legal for decay kind {defn.program.decay_kind.value}")
    xs = grid_inputs(defn, *grid, dtype=dtype) if inputs is None else inputs
    return check_against_reference(defn, xs, tol=TOL[dtype], backend="tvm", lowering=lowering,
                                   grid=grid)


@pytest.mark.parametrize("per_order", (False, True), ids=("shared", "per_order"))
@pytest.mark.parametrize("kind", list(DECAY_AXES))
@pytest.mark.parametrize("lowering", LOWERINGS)
def test_cross2d_matches_reference(lowering, kind, per_order):
    for grid in GRIDS:   # one test, so that one worker builds the kernels the grids share
        check(DEFS[kind, per_order], lowering, grid)


@pytest.mark.parametrize("kind, lowering", [("scalar", "chunked"), ("full", "scan")])
def test_cross2d_float64(kind, lowering):
    """float64 through the chunked forward and backward, and the scan's (VMamba)."""
    check(DEFS[kind, True], lowering, (3, 5), torch.float64)


@pytest.mark.parametrize("kind", ["scalar", "diagonal"])
def test_cross2d_crosses_chunks_and_checkpoints(kind):
    """A 9 x 8 grid: 72 steps, more than the forward's chunk of 64, the chunked backward's of
    32 and the scan backward's segment of 16, so the column orders cross each boundary."""
    defn = DEFS[kind, True]
    assert backward_kind(Plan(program=defn.program, lowering="scan", dtype="float32")) == \
        ("chunked" if kind == "scalar" else "scan")
    xs = grid_inputs(defn, 9, 8, b=1)   # h, g, n, p as above: the same compiled functions
    for lowering in LOWERINGS:
        check(defn, lowering, (9, 8), inputs=xs)


def _signed_inputs(defn, H, W, seed=1):
    """Decays in [-1, 1], a fifth of them exactly 0 (resets)."""
    xs = grid_inputs(defn, H, W, seed=seed, h=2, g=2)
    a = xs["a"].clamp(-1, 1)
    zero = torch.rand(a.shape, generator=torch.Generator().manual_seed(seed)) < 0.2
    xs["a"] = torch.where(zero, 0.0, a)
    return xs


@pytest.mark.parametrize("defn", [signed, signed_k], ids=("shared", "per_order"))
@pytest.mark.parametrize("lowering", ("scan", "quadratic"))
def test_cross2d_zero_and_negative_decays(lowering, defn):
    for grid in GRIDS + ((4, 5),):
        xs = _signed_inputs(defn, *grid)
        assert (xs["a"] == 0).any() and (xs["a"] < 0).any()
        check(defn, lowering, grid, inputs=xs)


def test_auto_picks_tvm_on_the_cpu():
    """backend="auto" on the CPU compiles cross2d with TVM (it fell back to the reference)."""
    op = ssmc.compile(vmamba)
    xs = grid_inputs(vmamba, 3, 5)
    check_against_reference(op, xs, tol=TOL[torch.float32], grid=(3, 5))
    assert op.last_plan is not None and op.last_plan.program.on_grid
    assert isinstance(op.kernel_for(op.last_plan, torch.device("cpu")), TVMKernel)


def test_cuda_scan_builds_for_a_grid(tmp_path):
    """On CUDA a cross2d plan runs the CUDA scan (the chunked CUDA lowering takes at most two
    directions); it has the grid's height as its last argument and nvcc compiles it (built
    here only: no GPU runs it in these tests)."""
    program = DEFS["scalar", True].program
    plan = Plan(program=program, lowering="chunked", dtype="bfloat16")
    assert "two directions" in unsupported(plan) and cuda_lowering(plan, 16, 64) == "scan"
    spec = KernelSpec(plan=plan, H=4, G=2, N=16, P=64,
                      input_dtypes=("bfloat16",) * len(program.inputs), target="cuda",
                      arch="sm_90")
    source = TIR["scan", "cuda"](spec)
    assert "GH: T.int64):" in source
    cu = cuda_host_source(source, func_name(plan), "sm_90")
    if shutil.which("nvcc"):
        (tmp_path / "k.cu").write_text(cu)
        nvcc_compile(tmp_path / "k.cu", tmp_path / "k.so", "sm_90")


def test_export_refuses_cross2d(tmp_path):
    with pytest.raises(ssmc.UnsupportedError, match="cross2d"):
        export(vmamba, target="llvm", shapes=dict(h=2, n=3, p=4), out_dir=tmp_path / "x")
