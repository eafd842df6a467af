"""The Triton quadratic lowering (masked decayed attention) against the float64 references.

Forward only: outputs and final states are compared with `ssmc.reference.scan`, the hidden
attention matrix with `ssmc.reference.attention_matrix`. Every built-in of `ssmc.ops`, custom
definitions of every legal decay kind in every direction, groups, initial/final states, packed
sequences (with an empty one), fp32 / bf16 (and fp16 / fp64 spot checks). Without CUDA the
kernels run under the Triton interpreter, so shapes are small and odd (t = 1, 7, 63, 100) and
the cases are few per shape; t = 100 covers several query/key blocks.

Tolerances (relative RMS and relative max error, both against the reference's scale): fp32
1e-5 (TF32 is off: the fp32 kernels use input_precision="ieee"), bf16 2e-2 (one rounding of the
output and of the matmul operands; the reference sees the same rounded inputs).
"""
from __future__ import annotations

import importlib

import pytest
import torch

import ssmc
import ssmc.ops
from ssmc import dsl as S
from ssmc import reference
from ssmc.backends import get_backend
from ssmc.errors import UnsupportedError
from ssmc.plan import Plan
from ssmc.validate import bind
from tests.helpers import (INPUT_FACTORIES, check_against_reference, compare,
                           compile_for_hopper, cu_seqlens, make_definition, random_inputs,
                           random_state)

TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 5e-3}
KW = dict(backend="triton", lowering="quadratic", grad=False)  # forward-only lowering


pytestmark = pytest.mark.usefixtures("kernel_cache_per_module")


def quadratic():
    from ssmc.backends.triton.lowerings import quadratic as q
    return q


def state(sizes, seed=1, directions=1, dtype=torch.float32, sequences=None):
    b = sizes["b"] if sequences is None else sequences
    return random_state(b, sizes["h"], sizes["n"], sizes["p"], directions=directions,
                        dtype=dtype, seed=seed)


# ------------------------------------------------------------------------------ built-ins

BUILTINS = [
    # (name, extra factory options, op options, shape)
    ("ssd", {}, dict(dt_softplus=True), dict(b=2, t=63, h=4, g=2, n=5, p=3)),
    ("selective_scan", {}, dict(delta_softplus=True), dict(b=2, t=7, h=6, g=1, n=4, p=1)),
    ("gla", {}, {}, dict(b=2, t=63, h=2, g=2, n=5, p=4)),
    ("linear_attention", {}, {}, dict(b=2, t=7, h=3, g=3, n=4, p=5)),
]


@pytest.mark.parametrize("name,factory_kw,op_kw,shape", BUILTINS, ids=[b[0] for b in BUILTINS])
def test_quadratic_builtin(name, factory_kw, op_kw, shape):
    """Each built-in with its options (ssd: D, z, dt_bias, softplus, groups), an initial state
    and the final state."""
    op, factory = INPUT_FACTORIES[name]
    inputs = factory(**shape, seed=0, **factory_kw)
    h0 = state(shape)
    if name == "selective_scan":  # Mamba-1 states are (b, d, n)
        h0 = h0.squeeze(-1)
    check_against_reference(op, inputs, tol=1e-5, initial_state=h0, return_final_state=True,
                            **op_kw, **KW)


def test_quadratic_builtin_ssd_bf16_varlen():
    shape = dict(b=1, t=100, h=4, g=2, n=6, p=5)
    inputs = INPUT_FACTORIES["ssd"][1](**shape, seed=3, dtype=torch.bfloat16)
    cu = cu_seqlens([37, 0, 63])
    check_against_reference(ssmc.ops.ssd, inputs, tol=2e-2, dt_softplus=True, cu_seqlens=cu,
                            initial_state=state(shape, sequences=3), return_final_state=True,
                            **KW)


def test_quadratic_builtin_gla_bf16():
    shape = dict(b=2, t=100, h=2, g=2, n=5, p=4)
    inputs = INPUT_FACTORIES["gla"][1](**shape, seed=4, dtype=torch.bfloat16)
    check_against_reference(ssmc.ops.gla, inputs, tol=2e-2, return_final_state=True, **KW)


# ------------------------------------------------------------------------------ custom definitions

DECAYS = ("none", "time_invariant", "scalar", "diagonal")


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("decay", DECAYS)
def test_quadratic_directions_states(decay, direction):
    """Every decay kind x direction, with groups, an epilogue, initial and final states."""
    d = make_definition(decay, direction, epilogue=True)
    sizes = dict(b=2, t=63, h=4, g=2, n=5, p=3)
    dirs = 2 if direction == "bidirectional" else 1
    check_against_reference(d, random_inputs(d, sizes, seed=0), tol=1e-5,
                            initial_state=state(sizes, directions=dirs),
                            return_final_state=True, **KW)


@pytest.mark.parametrize("shape", [dict(b=2, t=1, h=4, g=2, n=5, p=3),
                                   dict(b=2, t=7, h=6, g=3, n=4, p=5),
                                   dict(b=1, t=100, h=2, g=1, n=3, p=4)],
                         ids=["t1", "t7", "t100"])
@pytest.mark.parametrize("decay,direction", [("scalar", "forward"), ("diagonal", "reverse")])
def test_quadratic_shapes(shape, decay, direction):
    d = make_definition(decay, direction)
    check_against_reference(d, random_inputs(d, shape, seed=2), tol=1e-5,
                            return_final_state=True, **KW)


@pytest.mark.parametrize("decay,direction", [("none", "reverse"), ("scalar", "forward"),
                                             ("time_invariant", "bidirectional"),
                                             ("diagonal", "bidirectional")])
def test_quadratic_varlen(decay, direction):
    """Packed sequences never attend across boundaries; an empty sequence passes its initial
    state through; lengths straddle the block sizes."""
    d = make_definition(decay, direction, epilogue=True)
    lengths = [33, 0, 1, 66]
    sizes = dict(b=1, t=sum(lengths), h=4, g=2, n=6, p=3)
    dirs = 2 if direction == "bidirectional" else 1
    check_against_reference(d, random_inputs(d, sizes, seed=5), tol=1e-5,
                            cu_seqlens=cu_seqlens(lengths),
                            initial_state=state(sizes, directions=dirs, sequences=len(lengths)),
                            return_final_state=True, **KW)


@pytest.mark.parametrize("decay,direction", [("scalar", "bidirectional"), ("diagonal", "forward"),
                                             ("none", "reverse")])
def test_quadratic_bf16(decay, direction):
    d = make_definition(decay, direction, epilogue=True)
    sizes = dict(b=1, t=100, h=2, g=1, n=20, p=17)  # n, p past one 16-wide tile
    dirs = 2 if direction == "bidirectional" else 1
    check_against_reference(d, random_inputs(d, sizes, dtype=torch.bfloat16, seed=6), tol=2e-2,
                            initial_state=state(sizes, directions=dirs),
                            return_final_state=True, **KW)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
def test_quadratic_other_dtypes(dtype):
    d = make_definition("scalar", "forward", epilogue=True)
    sizes = dict(b=1, t=40, h=2, g=1, n=70, p=3)  # fp64: n in two chunks of 64
    out = check_against_reference(d, random_inputs(d, sizes, dtype=dtype, seed=7),
                                  tol=TOL[dtype], initial_state=state(sizes),
                                  return_final_state=True, **KW)
    assert out


def test_quadratic_strong_decay_is_stable():
    """Decays near 0 over a long sequence: the exponents are sums over disjoint ranges, never
    differences of long running sums, so nothing overflows or cancels."""
    @ssmc.ssm(name="strong_decay")
    def f(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"], a: S.In["b t h n"]):
        return S.recurrence(decay=S.exp(-S.softplus(a) * 8), key=k, value=v, query=q)

    sizes = dict(b=1, t=100, h=2, n=4, p=3)
    x = random_inputs(f, sizes, seed=8)
    x["a"] = x["a"] + 4.0  # log-decays around -30 per step: exp(L_t) underflows by t ~ 3
    check_against_reference(f, x, tol=1e-5, initial_state=state(dict(sizes, g=2)),
                            return_final_state=True, **KW)


# ------------------------------------------------------------------------------ attention matrix

@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("decay", DECAYS)
def test_quadratic_attention_matrix(decay, direction):
    d = make_definition(decay, direction, epilogue=True)
    t = 70 if decay in ("scalar", "diagonal") else 9
    x = random_inputs(d, dict(b=2, t=t, h=4, g=2, n=5, p=3), seed=9)
    bound = bind(d.program, (), x)
    plan = Plan(program=d.program, lowering="quadratic", dtype="float32")
    M = get_backend("triton").attention_matrix(plan, bound.tensors, bound.sizes)
    assert M.shape == (2, 4, t, t) and M.dtype == torch.float32
    ref_bound = bind(d.program, (), {k: v.double() for k, v in x.items()})
    expected = reference.attention_matrix(d.program, ref_bound.tensors, ref_bound.sizes)
    r = compare("M", M, expected, 1e-5)
    assert r.ok, str(r)


def test_quadratic_attention_matrix_times_value_is_y():
    """y = epilogue(M value): the matrix and the fused forward kernel agree (ssd, groups)."""
    shape = dict(b=1, t=40, h=4, g=2, n=5, p=3)
    inputs = INPUT_FACTORIES["ssd"][1](**shape, seed=10, D=False, z=False)
    definition = importlib.import_module("ssmc.ops.ssd").build(has_dt_bias=True, dt_softplus=True)
    bound = bind(definition.program, (), inputs)
    plan = Plan(program=definition.program, lowering="quadratic", dtype="float32")
    M = get_backend("triton").attention_matrix(plan, bound.tensors, bound.sizes)
    dt = torch.nn.functional.softplus(inputs["dt"] + inputs["dt_bias"])
    value = inputs["x"] * dt[..., None]
    y = ssmc.compile(definition, backend="triton", lowering="quadratic")(**inputs)
    r = compare("y", torch.einsum("bhts,bshp->bthp", M, value), y, 1e-5)
    assert r.ok, str(r)


# ------------------------------------------------------------------------------ plan checks

def test_quadratic_rejects_decay_over_p():
    d = make_definition("full", "forward")
    plan = Plan(program=d.program, lowering="quadratic", dtype="float32")
    assert "'p'" in quadratic().supports(plan)
    with pytest.raises(UnsupportedError):
        ssmc.compile(d, backend="triton", lowering="quadratic")


def test_quadratic_fp32_source_has_no_tf32():
    d = make_definition("scalar", "forward")
    q = quadratic()
    src32 = q.render(Plan(program=d.program, lowering="quadratic", dtype="float32"))
    assert "def ssmc_quadratic_fwd(" in src32
    dots = [line for line in src32.splitlines() if "tl.dot(" in line]
    assert dots and all('input_precision="ieee"' in line for line in dots)
    src16 = q.render(Plan(program=d.program, lowering="quadratic", dtype="bfloat16"))
    assert "tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))" in src16


# ------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("name", ["ssd", "gla"])
def test_quadratic_gpu_real_shape(name):
    """bf16 at a real shape on the GPU (tensor-core scores for ssd, the exact diagonal path for
    gla), with states, against the float64 reference."""
    shape = dict(b=2, t=512, h=8, g=1 if name == "ssd" else 8, n=64, p=64)
    op, factory = INPUT_FACTORIES[name]
    inputs = factory(**shape, seed=11, dtype=torch.bfloat16, device="cuda")
    extra = dict(dt_softplus=True) if name == "ssd" else {}
    h0 = state(shape).cuda()
    check_against_reference(op, inputs, tol=2e-2, initial_state=h0, return_final_state=True,
                            **extra, **KW)
    d = make_definition("scalar", "bidirectional", epilogue=True)
    sizes = dict(b=2, t=512, h=8, g=2, n=64, p=64)
    x = {k: v.cuda() for k, v in random_inputs(d, sizes, dtype=torch.bfloat16, seed=12).items()}
    check_against_reference(d, x, tol=2e-2, return_final_state=True, **KW)


# ------------------------------------------------------------------------------ sm90 compile

_AOT = r'''
import importlib.util, os, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ssmc.plan import Plan
from ssmc.backends.triton.lowerings import quadratic as q, quadratic_launch
from tests.helpers import make_definition

for decay, dtype in (("scalar", "bfloat16"), ("diagonal", "bfloat16"), ("none", "float32")):
    plan = Plan(program=make_definition(decay, "bidirectional", epilogue=True).program,
                lowering="quadratic", dtype=dtype)
    path = os.path.join(tempfile.mkdtemp(), "k.py")
    open(path, "w").write(q.render(plan))
    spec = importlib.util.spec_from_file_location(f"k_{decay}_{dtype}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    bs = quadratic_launch.block_sizes(plan, 64, 64)
    flags = dict(REVERSE=True, COLUMN=True, HAS_H0=True, IS_VARLEN=True, LOWP=True)
    for name, consts in (
            ("ssmc_quadratic_fwd", dict(BT=bs["BT"], BNC=bs["BNC"], BP=bs["BP"], ACCUM_IN=True,
                                        WRITE_OUT=True, **flags)),
            ("ssmc_quadratic_state", dict(BT=bs["BT"], BNC=bs["BNS"], BP=bs["BP"], **flags)),
            ("ssmc_quadratic_matrix", dict(BT=bs["BT"], BNC=bs["BNC"], REVERSE=True,
                                           COLUMN=True, IS_VARLEN=False, LOWP=True))):
        fn = getattr(mod, name)
        state = {"yacc_ptr", "h0_ptr", "hT_ptr", "m_ptr"}
        sig = {a: "constexpr" if a in consts else "*i32" if a == "cu_ptr" else
               "*fp32" if a in state else
               ("*bf16" if dtype == "bfloat16" else "*fp32") if a.endswith("_ptr") else "i32"
               for a in fn.arg_names}
        k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=bs["num_warps"]))
        assert k.asm.get("cubin"), name
print("compiled")
'''


def test_quadratic_kernels_compile_for_sm90(tmp_path):
    """The generated kernels go through Triton's real compiler (to sm90 cubin) without a GPU,
    so GPU-only front-end errors (dot shapes, dtypes, control flow) show up on the CPU too."""
    compile_for_hopper(_AOT, tmp_path, timeout=300)
