"""The generated step kernel's source (ssmc/backends/triton/lowerings/step.py): one kernel with
the prologue and epilogue fused, which loads the state once and stores it once per program
(its numbers against the forward are in tests/test_step.py)."""
from __future__ import annotations

import importlib

import pytest

from ssmc.ops.selective_scan import build as s6_build
from ssmc.ops.ssd import build as ssd_build
from ssmc.plan import Plan
from tests.helpers import compile_for_hopper

step = importlib.import_module("ssmc.backends.triton.lowerings.step")

DEFINITIONS = {
    "ssd": ssd_build(has_D=True, has_z=True, has_dt_bias=True, dt_softplus=True),
    "selective_scan": s6_build(has_D=True, has_z=True, delta_softplus=True),
}


@pytest.mark.parametrize("name", list(DEFINITIONS))
def test_step_kernel_reads_and_writes_the_state_once(name):
    program = DEFINITIONS[name].program
    source = step.render(Plan(program=program, lowering="scan", dtype="bfloat16",
                              has_initial_state=True, return_final_state=True))
    assert source.count("@triton.jit") == 1
    before, loop = source.split("for t_idx in range(0, T):", 1)
    assert before.count("state = tl.load(state_base") == 1      # before the loop over tokens
    assert "tl.load(state" not in loop
    # stored into each token's slot with per-token slots, else once after the last token;
    # either as soon as it is updated, before y and the epilogue (registers: RESULTS.md)
    loop = loop.split("else:\n        for t_idx", 1)[0]
    slots, rest = loop.split("if HAS_OUT_SLOTS:", 1)[1].split("elif t_idx == T - 1:")
    assert slots.count("tl.store(state_ptr") == 1
    last, after = rest.split("y = tl.sum(", 1)
    assert last.count("tl.store(state_base") == 1
    assert "tl.store(state" not in after
    # the state is converted to fp32 once and back to its own dtype on store
    assert ".to(tl.float32)" in source and "state.to(state_ptr.dtype.element_ty)" in source
    # the prologue (softplus of dt) and epilogue (silu gate) are in the kernel
    assert "tl.log(1.0 + tl.exp(" in source and "tl.sigmoid(" in source


def test_step_blocks_hold_a_fixed_number_of_state_bytes():
    """32 KB of state per program, 8 warps from 4096 values (H100 measurements in the
    function's docstring); the plan's tile overrides either."""
    assert step.step_blocks(128, 64, 4) == dict(BN=128, BP=64, num_warps=8)     # fp32 state
    assert step.step_blocks(256, 64, 4) == dict(BN=256, BP=32, num_warps=8)
    assert step.step_blocks(128, 64, 2) == dict(BN=128, BP=64, num_warps=8)     # bf16 state
    assert step.step_blocks(16, 64, 4) == dict(BN=16, BP=64, num_warps=4)       # Mamba-1 n
    assert step.step_blocks(5, 3, 4) == dict(BN=8, BP=4, num_warps=1)
    assert step.step_blocks(128, 64, 4, dict(BP=16, num_warps=2)) == dict(BN=128, BP=16,
                                                                           num_warps=2)


@pytest.mark.parametrize("n", [1, 2, 5, 16, 32, 64, 128, 256])
@pytest.mark.parametrize("p", [1, 2, 3, 64, 128])
@pytest.mark.parametrize("state_bytes", [2, 4])
def test_step_blocks_leave_no_warp_a_copy_of_another(n, p, state_bytes):
    """No more warps than the tile has 32-value rows (one where it has fewer): Mamba-1's steps
    (p = 1) at n = 32 ran a [32, 2] tile over 4 warps, two of them copies of the other two, and
    its sum over n gave a different output on the same inputs now and then on an H100, wrong
    ones among them (mamba_ssm's own batch-index step tests)."""
    blocks = step.step_blocks(n, p, state_bytes)
    assert blocks["num_warps"] <= max(blocks["BN"] * blocks["BP"] // 32, 1)


_SM90_STEPS = r'''
import importlib.util, os, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ssmc.ops.selective_scan import build as s6_build
from ssmc.ops.ssd import build as ssd_build
from ssmc.plan import Plan
from ssmc.backends.triton.lowerings import step
from tests.helpers import reductions_over_copied_warps

found = []
for definition, shapes in ((s6_build(has_D=True, has_z=True, delta_softplus=True),
                            ((5, 1), (16, 1), (32, 1), (64, 1))),
                           (ssd_build(has_D=True, has_z=True, has_dt_bias=True, dt_softplus=True),
                            ((16, 64), (128, 64), (5, 3)))):
    path = os.path.join(tempfile.mkdtemp(), "step_kernel.py")
    open(path, "w").write(step.render(Plan(program=definition.program, lowering="scan",
                                           dtype="float32")))
    spec = importlib.util.spec_from_file_location("step_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = module.ssmc_step_fwd
    for n, p in shapes:
        blocks = step.step_blocks(n, p, 4)
        consts = dict(BN=blocks["BN"], BP=blocks["BP"], HAS_SLOTS=True, HAS_OUT_SLOTS=False)
        sig = {a: "constexpr" if a in consts else "*i32" if a in ("slot_ptr", "oslot_ptr")
               else "*fp32" if a.endswith("_ptr") else "i32" for a in fn.arg_names}
        kernel = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=blocks["num_warps"]))
        found += [(n, p, blocks, r) for r in reductions_over_copied_warps(kernel.asm["ttgir"])]
if found:
    raise SystemExit(f"sums over warps that hold copies: {found}")
print("compiled")
'''


def test_step_kernels_sum_over_no_copied_warps(tmp_path):
    """The step kernel compiled for sm_90 with step_blocks' tiles (Mamba-1's p = 1 at small n,
    Mamba-2's, odd sizes) reduces over no axis whose warps hold copies of one another: the
    [32, 2] tile on 4 warps that did gave a different output for the same inputs now and then
    on an H100."""
    compile_for_hopper(_SM90_STEPS, tmp_path, timeout=600)
