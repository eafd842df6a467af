"""`kernel.backward` of the Triton backend against the reference backend's backward (autograd
through the float64 sequential scan), and against finite differences in float64.

Every built-in (ssd with D, z, dt_bias, softplus, a clamp and groups g < h; selective_scan;
retention; gla; linear_attention) x lowering (scan; chunked; quadratic, which uses the chunked
backward) x direction (the built-ins' look-alikes for reverse and bidirectional), with initial
states and grad_final; packed sequences (empty ones inside and at the end); several chunks
(t = 100); per-key decays over several 16-row blocks per chunk and several value blocks; bf16;
definitions nobody wrote a gradient for (a sigmoid-gated decay with a tanh epilogue; a decay per (p, n) element, scan only); `torch.autograd.gradcheck` in float64 on tiny
shapes through a small autograd.Function calling the kernel's forward and backward.

Tolerances, relative L2 error of every gradient: fp32 1e-5 for the scan backward; 3e-5 for the
chunked one (a per-key decay's gradient is a reverse running sum of q dq - k dk, whose terms
cancel; parameters such as A sum it over t again); bf16 3e-2 (gradients are rounded to bf16).
A time-invariant decay without n is checked to 5e-6 (`test_backward_chunked_per_head_decay`).
"""
from __future__ import annotations


import pytest
import torch

import ssmc
from ssmc import dsl as S
from ssmc.backends import get_backend
from ssmc.backends.triton.tiles import ChunkedTile
from ssmc.lowerings import legal_lowerings
from ssmc.plan import Plan
from tests.backends.triton.conftest import gradient_problems
from tests.helpers import make_definition
from tests.backends.triton.test_scan import (BUILTINS, builtin, cu_seqlens, custom, definition,
                                             inputs_for, shape_for, state_for)

DIRECTIONS = ("forward", "reverse", "bidirectional")
LOWERINGS = ("scan", "chunked", "quadratic")
#: packed sequence lengths: empty ones inside and at the end, one longer than a 16-step chunk
LENGTHS = (3, 0, 20, 1, 0)
GRAD_TOL = {("scan", torch.float32): 1e-5, ("chunked", torch.float32): 3e-5,
            ("quadratic", torch.float32): 3e-5, torch.bfloat16: 3e-2, torch.float64: 1e-10}


pytestmark = pytest.mark.usefixtures("kernel_cache_per_module")


def definition_for(name: str, direction: str):
    return builtin(name, direction) if name in BUILTINS else custom(name, direction)


def _plan(defn, lowering, dtype, h0, gF, varlen, tile=None):
    return Plan(program=defn.program, lowering=lowering, dtype=str(dtype).split(".")[1],
                has_initial_state=h0, return_final_state=gF, varlen=varlen, tile=tile)


def _skip_unless_legal(defn, lowering):
    if lowering not in legal_lowerings(defn.program):
        pytest.skip(f"{lowering} is not legal for decay kind {defn.program.decay_kind.value}")


def check_backward(defn, lowering: str, sizes: dict, *, dtype=torch.float32, h0=True,
                   grad_final=True, lengths=None, seed=0, tol=None, device="cpu", inputs=None,
                   tile=None):
    """Compare the Triton kernel's backward with the reference backend's (float64 on the same
    rounded inputs). `inputs` (name -> tensor) replaces the random draw of `inputs_for`; `tile`
    is the plan's.
    Returns the relative L2 errors by gradient name."""
    _skip_unless_legal(defn, lowering)
    program = defn.program
    if inputs is None:
        inputs = inputs_for(defn, sizes, dtype=dtype, seed=seed)
    inputs = {k: v.to(dtype=dtype, device=device) for k, v in inputs.items()}
    S = sizes["b"] if lengths is None else len(lengths)
    state = state_for(defn, sizes, num_states=S, seed=seed + 1).to(device) if h0 else None
    cu = None if lengths is None else cu_seqlens(lengths).to(device)
    plan = _plan(defn, lowering, dtype, h0, grad_final, cu is not None, tile)
    kernel = get_backend("triton").compile(plan)
    ref = get_backend("reference").compile(_plan(defn, "scan", torch.float64, h0, grad_final,
                                                 cu is not None))
    gen = torch.Generator().manual_seed(seed + 2)
    B, T, H, N, P = (sizes[a] for a in "bthnp")
    grad_out = torch.randn(B, T, H, P, generator=gen).to(dtype=dtype, device=device)
    gF = None
    if grad_final:
        ndir = len(program.recurrence.directions)
        shape = ((ndir,) if ndir > 1 else ()) + (S, H, N, P)
        gF = torch.randn(shape, generator=gen).to(device)
    grads, g_h0 = kernel.backward(inputs, sizes, state, cu, grad_out, gF)
    r_inputs = {k: v.double() for k, v in inputs.items()}
    r_grads, r_h0 = ref.backward(r_inputs, sizes, None if state is None else state.double(), cu,
                                 grad_out.double(), None if gF is None else gF.double())
    if tol is None:
        tol = GRAD_TOL.get(dtype) or GRAD_TOL[(lowering, dtype)]
    problems, errors = gradient_problems(grads, g_h0, r_grads, r_h0, inputs,
                                         state if h0 else None, tol)
    if problems:
        raise AssertionError(
            f"triton-{lowering} backward of {program.name} ({dtype}, {sizes}, h0={h0}, "
            f"grad_final={grad_final}, lengths={lengths}) disagrees with the reference:\n  "
            + "\n  ".join(problems))
    return errors


# --------------------------------------------------------------------------- every built-in

@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("name", list(BUILTINS))
@pytest.mark.parametrize("lowering", LOWERINGS)
def test_backward_builtin(lowering, name, direction):
    if lowering == "quadratic" and direction == "reverse":
        pytest.skip("quadratic shares the chunked backward; reverse is covered there")
    check_backward(builtin(name, direction), lowering, shape_for(name, "t7"))


PER_KEY_TILES = {"cs64_bp16": dict(BT_bwd=64, BP_bwd=16), "cs32_bp16": dict(BT_bwd=32, BP_bwd=16),
                 "cs16": dict(BT_bwd=16), "cs128": dict(BT_bwd=128)}


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("tile", list(PER_KEY_TILES))
def test_per_key_backward_row_and_value_blocks(direction, tile):
    """Per-key decays: chunks of several 16-row blocks (the factored products between them),
    a partial last chunk and block, and value channels over several p-blocks (dA, dy S^T and
    v G^T summed over them, dv per block)."""
    check_backward(builtin("gla", direction), "chunked", dict(b=2, t=150, h=2, g=2, n=8, p=40),
                   tile=ChunkedTile(**PER_KEY_TILES[tile]))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_per_key_backward_key_blocks(direction):
    """dq, dk and the decay gradient per block of key channels (the last one partial), dv per
    value block over all of them: each block forms dA over all of p, and A sums every block."""
    check_backward(builtin("gla", direction), "chunked", dict(b=2, t=100, h=2, g=2, n=40, p=24),
                   tile=ChunkedTile(BT_bwd=32, BP_bwd=16, BK_bwd=16))


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("name", ["gla", "ssd", "linear_attention"])
def test_backward_segmented_passes(name, direction):
    """The backward's state recompute and its reverse pass over dL/dS in segments of 3 chunks
    walked side by side, then joined (the reverse one from the last segment): per-key, per-step
    and no decay."""
    check_backward(builtin(name, direction), "chunked", dict(b=2, t=150, h=2, g=2, n=8, p=4),
                   tile=ChunkedTile(BT_bwd=16, SEG_bwd=3))


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("name", ["gla", "ssd"])
@pytest.mark.parametrize("seg", [None, 3], ids=["walks", "segments"])
def test_backward_walks_in_their_own_value_blocks(name, direction, seg):
    """The two sequential walks split p as the forward's state pass does (`BP_state`), apart
    from the per-chunk kernels' blocks (`BP_bwd`): 16 against 32 channels of p = 40, walked
    whole or in segments, joined over the per-chunk kernels' blocks."""
    check_backward(builtin(name, direction), "chunked", dict(b=2, t=150, h=2, g=2, n=8, p=40),
                   tile=ChunkedTile(BT_bwd=16, BP_bwd=32, BP_state=16, SEG_bwd=seg))


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_per_key_backward_with_a_gated_epilogue(direction):
    """(y + D v) * silu(z) needs y in the backward: the per-key y kernel (the forward's row
    blocks, summed over directions) over several row blocks, chunks and value blocks."""
    check_backward(make_definition("diagonal", direction, epilogue=True), "chunked",
                   dict(b=1, t=100, h=2, g=1, n=8, p=40),
                   tile=ChunkedTile(BT_bwd=32, BP_bwd=16))


def test_per_key_backward_packed_sequences():
    """Chunks of packed sequences: the state leaving a sequence's last chunk is its final
    state, not the next chunk's entering one (the first sequence fills its chunk exactly)."""
    lengths = (64, 0, 90, 5)
    check_backward(builtin("gla", "reverse"), "chunked",
                   dict(b=1, t=sum(lengths), h=2, g=1, n=8, p=20), lengths=lengths,
                   tile=ChunkedTile(BT_bwd=64, BP_bwd=16))


@pytest.mark.parametrize("name", list(BUILTINS))
@pytest.mark.parametrize("lowering", ["scan", "chunked"])
def test_backward_builtin_without_states(lowering, name):
    check_backward(builtin(name), lowering, shape_for(name, "t7"), h0=False, grad_final=False,
                   seed=3)


@pytest.mark.parametrize("name", list(BUILTINS))
def test_backward_chunked_several_chunks(name):
    check_backward(builtin(name, "bidirectional"), "chunked", shape_for(name, "t100"), seed=4)


@pytest.mark.parametrize("name", ["ssd", "gla"])
def test_backward_scan_several_checkpoints(name):
    """t = 63: several 16-step checkpoint segments, the last one partial."""
    check_backward(builtin(name, "reverse"), "scan", shape_for(name, "t63"), seed=5)


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("name", ["ssd", "gla", "retention", "linear_attention"])
@pytest.mark.parametrize("lowering", ["scan", "chunked"])
def test_backward_varlen(lowering, name, direction):
    if lowering == "scan" and name in ("retention", "linear_attention"):
        pytest.skip("covered by ssd and gla on the scan (interpreter time)")
    sizes = dict(shape_for(name, "t7"), b=1, t=sum(LENGTHS))
    check_backward(builtin(name, direction), lowering, sizes, lengths=LENGTHS, seed=6)


def test_backward_quadratic_varlen():
    sizes = dict(shape_for("ssd", "t7"), b=1, t=sum(LENGTHS))
    check_backward(builtin("ssd", "bidirectional"), "quadratic", sizes, lengths=LENGTHS, seed=7)


@pytest.mark.parametrize("name", ["ssd", "gla", "selective_scan"])
@pytest.mark.parametrize("lowering", ["scan", "chunked"])
def test_backward_bf16(lowering, name):
    check_backward(builtin(name), lowering, shape_for(name, "t63"), dtype=torch.bfloat16,
                   seed=8)


@pytest.mark.parametrize("lowering, name, p", [("scan", "per_channel", 40),
                                                ("chunked", "ssd", 80)])
def test_backward_several_p_blocks(lowering, name, p):
    """p wider than one block: sums over p (dq, dk, the decay) add per-block partials."""
    check_backward(definition_for(name, "forward"), lowering, dict(b=1, t=10, h=2, g=1, n=3,
                                                                   p=p), seed=16)


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_backward_chunked_dqk_key_blocks(direction):
    """The dq/dk kernel over n in blocks of 16 (BNQK_bwd): n = 40 is two whole blocks and a
    ragged one, each program forming its block's dq and dk."""
    check_backward(builtin("ssd", direction), "chunked", dict(b=2, t=40, h=2, g=1, n=40, p=8),
                   seed=18, tile=ChunkedTile(BT_bwd=16, BNQK_bwd=16))


@pytest.mark.parametrize("programs, heads", [(1, 4), (2, 2)])
def test_backward_chunked_head_blocks(monkeypatch, programs, heads):
    """Programs walking several heads of a group (query, key and q k^T made once, dq and dk
    summed in registers): the whole group, and half-group blocks the host adds up. On small
    problems the block is one head, so PROGRAMS is lowered to force it."""
    from ssmc.backends.triton.lowerings import chunked_bwd_launch
    monkeypatch.setattr(chunked_bwd_launch, "PROGRAMS", programs)
    sizes = dict(b=1, t=40, h=4, g=1, n=8, p=8)
    plan = _plan(builtin("ssd"), "chunked", torch.float32, True, True, False)
    assert chunked_bwd_launch.head_block(plan, sizes, 1) == heads
    check_backward(builtin("ssd", "bidirectional"), "chunked", sizes, seed=17)


def test_backward_key_and_query_without_a_group_axis():
    """B and C without a group or head axis ("b t n", Mamba-2 with one group as a user may
    write it): a call sizes them as one group of every head, so the chunked backward sums dB
    and dC over the heads in its kernel (they came per head and torch summed them: at b=32,
    t=4096, h=8, n=64 and four cross2d orders, 1 GB in fp32 per operand); gradients against
    the reference."""
    from ssmc import ssm
    from ssmc.backends.triton.lowerings import chunked_bwd_launch
    from ssmc.validate import bind

    @ssm
    def mamba2_one_group(x: S.In["b t h p"], dt: S.In["b t h"], A: S.In["h"],
                         B: S.In["b t n"], C: S.In["b t n"]):
        d = S.softplus(dt)
        return S.recurrence(decay=S.exp(d * A), key=B, value=x * d, query=C)
    sizes = dict(b=2, t=40, h=3, n=5, p=4)
    inputs = inputs_for(mamba2_one_group, dict(sizes, g=1), seed=19)
    bound = bind(mamba2_one_group.program, (), inputs)
    assert bound.sizes["g"] == 1
    plan = _plan(mamba2_one_group, "chunked", torch.float32, True, True, False)
    assert chunked_bwd_launch.grouped_operands(plan, bound.sizes) == {"query", "key"}
    check_backward(mamba2_one_group, "chunked", bound.sizes, inputs=inputs, seed=19)


# --------------------------------------------------------------------------- custom definitions

@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("lowering", LOWERINGS)
def test_backward_custom_gated(lowering, direction):
    """A sigmoid-gated decay that also gates the value, a tanh epilogue: nobody wrote this
    gradient; sympy derived it."""
    check_backward(custom("gated", direction), lowering, shape_for("gated", "t7"), seed=9)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_backward_custom_per_channel(direction):
    """A decay per (p, n) element (scan only): the decay gradient needs S_{t-1} and dS_t."""
    check_backward(custom("per_channel", direction), "scan", shape_for("per_channel", "t7"),
                   seed=10)


def test_backward_custom_per_channel_varlen():
    sizes = dict(shape_for("per_channel", "t7"), b=1, t=sum(LENGTHS))
    check_backward(custom("per_channel", "bidirectional"), "scan", sizes, lengths=LENGTHS,
                   seed=11)


def _per_head_decay(direction):
    """Mamba-2 with a time-invariant decay exp(-softplus(a)), a: "h"."""
    def body(v):
        return S.recurrence(decay=S.exp(-S.softplus(v["a"])), key=v["B"], value=v["x"],
                            query=v["C"], direction=direction)
    return definition(f"per_head_decay_{direction}", dict(
        x="b t h p", a="h", B="b t h n", C="b t h n"), body)


@pytest.mark.parametrize("direction, seed", [("forward", 3), ("reverse", 0)])
def test_backward_chunked_per_head_decay(direction, seed):
    """A time-invariant decay's gradient is d log-decay summed over t, a sum that cancels (its
    terms are ten times its size and more). The chunked backward formed each step's d log-decay
    as a reverse sum of q dq - k dk (each of them of the size of the whole chunk's terms) and
    its decay factors from an fp32 running sum of the log-decays; the gradient of `a` was off
    by 4.1e-5 (forward, seed 3) and 3.7e-5 (reverse, seed 0) relative, against 3.5e-7 and
    1.1e-6 now."""
    sizes = dict(b=2, t=65, h=2, g=2, n=8, p=4)
    check_backward(_per_head_decay(direction), "chunked", sizes, seed=seed, tol=5e-6)


def _per_key_decay(direction):
    """A time-invariant decay per key, sigmoid(a + 1.5), a: "h n"."""
    def body(v):
        return S.recurrence(decay=S.sigmoid(v["a"] + 1.5), key=v["k"], value=v["v"],
                            query=v["q"], direction=direction)
    return definition(f"per_key_decay_{direction}", dict(
        q="b t h n", k="b t h n", v="b t h p", a="h n"), body)


@pytest.mark.parametrize("direction, n, p", [("forward", 1, 1), ("reverse", 1, 1),
                                             ("forward", 8, 4)])
def test_backward_chunked_per_key_decay(direction, n, p):
    """The per-key form of the case above (a fuzz finding at n = p = 1, t = 65): its d
    log-decay was the reverse sum of q dq - k dk over 64-step chunks, and the gradient of `a`
    was 2.8e-5 off relative there, and up to 5.6e-6 on these inputs (seed 1), the scan's 1.4e-6.
    The pairs s < r <= u are summed directly now (those inside a 16-step row block as its
    q dq - k dk): at most 2.9e-6 over these seeds (CPU)."""
    sizes = dict(b=2, t=65, h=2, g=2, n=n, p=p)
    for seed in range(4):
        check_backward(_per_key_decay(direction), "chunked", sizes, seed=seed, tol=4e-6)


# --------------------------------------------------------------------------- finite differences

class _Op(torch.autograd.Function):
    """y, final = kernel(...) with kernel.backward as its backward (float64 gradcheck)."""

    @staticmethod
    def forward(ctx, kernel, names, sizes, cu, h0, *tensors):
        inputs = dict(zip(names, tensors))
        out, final = kernel(inputs, sizes, h0, cu)
        ctx.save_for_backward(h0, *tensors)
        ctx.kernel, ctx.names, ctx.sizes, ctx.cu = kernel, names, sizes, cu
        return out, final

    @staticmethod
    def backward(ctx, grad_out, grad_final):
        h0, *tensors = ctx.saved_tensors
        inputs = dict(zip(ctx.names, tensors))
        grads, g_h0 = ctx.kernel.backward(inputs, ctx.sizes, h0, ctx.cu, grad_out.contiguous(),
                                          grad_final)
        return (None, None, None, None, g_h0) + tuple(grads[n] for n in ctx.names)


@pytest.mark.parametrize("case", [
    ("ssd", "scan", "forward", None), ("gated", "scan", "bidirectional", None),
    ("per_channel", "scan", "reverse", (2, 0, 3)), ("ssd", "chunked", "bidirectional", None),
    ("gla", "chunked", "forward", (2, 0, 3)), ("gated", "quadratic", "reverse", None),
], ids=lambda c: "-".join(str(x) for x in c if x is not None and not isinstance(x, tuple))
    + ("-varlen" if c[3] else ""))
def test_backward_gradcheck(case):
    name, lowering, direction, lengths = case
    defn = definition_for(name, direction)
    _skip_unless_legal(defn, lowering)
    sizes = dict(b=2, t=5, h=2, g=1, n=2, p=1 if name == "selective_scan" else 2)
    if lengths is not None:
        sizes.update(b=1, t=sum(lengths))
    S = sizes["b"] if lengths is None else len(lengths)
    inputs = inputs_for(defn, sizes, dtype=torch.float64, seed=12)
    h0 = state_for(defn, sizes, num_states=S, seed=13).double().requires_grad_(True)
    cu = None if lengths is None else cu_seqlens(lengths)
    plan = _plan(defn, lowering, torch.float64, True, True, cu is not None)
    kernel = get_backend("triton").compile(plan)
    names = list(inputs)
    leaves = [inputs[n].requires_grad_(True) for n in names]

    def fn(h0, *tensors):
        return _Op.apply(kernel, names, sizes, cu, h0, *tensors)

    assert torch.autograd.gradcheck(fn, (h0, *leaves), eps=1e-6, atol=1e-6, rtol=1e-5,
                                    fast_mode=True)


# --------------------------------------------------------------------------- GPU, real shapes

GPU_SIZES = dict(b=2, t=1024, h=8, g=2, n=64, p=64)


@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
@pytest.mark.parametrize("name", list(BUILTINS) + ["gated", "per_channel"])
@pytest.mark.parametrize("lowering", LOWERINGS)
def test_backward_gpu_real_shapes(lowering, name, direction):
    defn = definition_for(name, direction)
    sizes = dict(GPU_SIZES, p=1) if name == "selective_scan" else GPU_SIZES
    # Mamba-1's A gradient is a signed sum over b*t of per-step terms that the chunked forms
    # take from bf16 tensor-core operands; with p=1 nothing averages the rounding out
    # (H100: 3.07e-2 relative L2 for chunked and quadratic, scan well inside 3e-2)
    tol = 5e-2 if name == "selective_scan" and lowering != "scan" else None
    check_backward(defn, lowering, sizes, dtype=torch.bfloat16, seed=14, device="cuda", tol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
@pytest.mark.parametrize("lowering", ["chunked", "quadratic"])
def test_backward_gpu_fp32_without_decay(lowering, direction):
    """fp32 matmuls of the chunked backward in plain fp32: with tf32x3 (Triton 3.6, H200) the
    decay-free gradients were off by 1.2e-1 relative when bidirectional, 1.3e-4 forward."""
    check_backward(definition_for("linear_attention", direction), lowering,
                   dict(b=2, t=100, h=2, g=2, n=16, p=8), dtype=torch.float32, seed=0,
                   device="cuda", tol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("lowering", LOWERINGS)
def test_backward_gpu_real_shapes_varlen(lowering):
    lengths = (1000, 0, 24, 1, 999)
    sizes = dict(GPU_SIZES, b=1, t=sum(lengths))
    check_backward(builtin("ssd"), lowering, sizes, dtype=torch.bfloat16, lengths=lengths,
                   seed=15, device="cuda")


def test_backward_checker_detects_a_mismatch():
    with pytest.raises(AssertionError, match="relative L2 error"):
        check_backward(builtin("gla"), "chunked", shape_for("gla", "t7"), tol=1e-12)


# --------------------------------------------------------------------------- kept scores

def _count_scores(monkeypatch) -> list:
    """Launches of the per-key scores kernel by the backward's forward pass."""
    from ssmc.backends.triton.lowerings import chunked_bwd_launch
    calls = []
    real = chunked_bwd_launch.launch_scores

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(chunked_bwd_launch, "launch_scores", counted)
    return calls


@pytest.mark.parametrize("direction, lengths, tile", [
    ("forward", None, None), ("bidirectional", None, None), ("reverse", (64, 0, 90, 5), None),
    # the forward's chunks of 32 are not the backward's 64: it forms its own
    ("forward", None, ChunkedTile(CS=32))], ids=["forward", "bidirectional", "varlen", "cs32"])
def test_per_key_backward_reads_the_scores_its_forward_kept(monkeypatch, direction, lengths,
                                                            tile):
    """`kernel.forward_keep` returns the chunks' scores with the forward's output, and the
    backward given them forms none again (a scores launch fewer per direction), with the same
    gradients as forming them; a residual of another chunk size is not read."""
    defn = make_definition("diagonal", direction, epilogue=True)
    sizes = dict(b=1 if lengths else 2, t=sum(lengths) if lengths else 100, h=2, g=1, n=8,
                 p=20)
    inputs = inputs_for(defn, sizes, dtype=torch.float32, seed=3)
    S = len(lengths) if lengths else sizes["b"]
    h0 = state_for(defn, sizes, num_states=S, seed=4)
    cu = None if lengths is None else cu_seqlens(lengths)
    kernel = get_backend("triton").compile(
        _plan(defn, "chunked", torch.float32, True, True, cu is not None, tile))
    out, final = kernel(inputs, sizes, h0, cu)
    out_k, final_k, residual = kernel.forward_keep(inputs, sizes, h0, cu)
    torch.testing.assert_close(out_k, out, rtol=0, atol=0)
    torch.testing.assert_close(final_k, final, rtol=0, atol=0)
    assert residual.dtype == torch.uint8 and residual.numel() > 0
    gen = torch.Generator().manual_seed(5)
    grad_out = torch.randn(out.shape, generator=gen)
    gF = torch.randn(final.shape, generator=gen)
    calls = _count_scores(monkeypatch)
    formed = kernel.backward(inputs, sizes, h0, cu, grad_out, gF)
    assert len(calls) == len(defn.program.recurrence.directions)
    calls.clear()
    read = kernel.backward(inputs, sizes, h0, cu, grad_out, gF, residual=residual)
    assert len(calls) == (len(defn.program.recurrence.directions) if tile else 0)
    for name, g in formed[0].items():
        torch.testing.assert_close(read[0][name], g, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(read[1], formed[1], rtol=0, atol=0)


def test_training_call_keeps_the_scores_for_its_backward(monkeypatch):
    """Through the custom op: an eager call whose inputs need gradients keeps the scores, and
    its backward launches no scores kernel; gradients as the reference backend's."""
    import ssmc
    defn = make_definition("diagonal", "forward")
    sizes = dict(b=2, t=70, h=2, g=1, n=8, p=4)
    inputs = inputs_for(defn, sizes, dtype=torch.float32, seed=6)
    grads = {}
    for backend in ("triton", "reference"):
        op = ssmc.compile(defn, backend=backend, lowering="chunked" if backend == "triton"
                          else "scan")
        xs = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        calls = _count_scores(monkeypatch)
        (op(**xs) ** 2).sum().backward()
        if backend == "triton":
            assert calls == []
        grads[backend] = {k: x.grad for k, x in xs.items()}
    # the module's measure: relative L2 error (an elementwise bound failed on one small
    # element of a gradient whose scale is 300)
    problems, _ = gradient_problems(grads["triton"], None, grads["reference"], None, inputs,
                                    None, GRAD_TOL[("chunked", torch.float32)])
    assert not problems, problems


def _per_key_exp(direction: str = "forward"):
    """A decay over n given by its log as it is (-1e4 and -inf pass through unchanged)."""
    return definition(f"per_key_exp_{direction}",
                      {"q": "b t h n", "k": "b t h n", "v": "b t h p", "u": "b t h n"},
                      lambda v: S.recurrence(decay=S.exp(v["u"]), key=v["k"], value=v["v"],
                                             query=v["q"], direction=direction))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_per_key_kernel_zeroes_the_log_decay_gradient_at_resets(monkeypatch, direction):
    """Log-decays of -1e4 and -inf are resets (decays of exactly 0): their gradient is exactly
    0, formed so by the dq/dk kernel itself (the chain rule's host-side zeroing is skipped
    for it), every other gradient as the float64 reference's; 24 steps: a row block of 16 and
    a partial one."""
    from ssmc.backends.chain_rule import ChainRule
    monkeypatch.setattr(ChainRule, "_without_reset_steps", lambda self, g, env, grp: g)
    defn = _per_key_exp(direction)
    gen = torch.Generator().manual_seed(7)
    b, t, h, n, p = 1, 24, 2, 8, 3
    x = {"q": torch.randn(b, t, h, n, generator=gen), "k": torch.randn(b, t, h, n, generator=gen),
         "v": torch.randn(b, t, h, p, generator=gen),
         "u": -0.1 * torch.rand(b, t, h, n, generator=gen)}
    x["u"][0, 5, 0, :3] = -1e4
    x["u"][0, 17, 1, 2:6] = -float("inf")
    x["u"][0, 16, :, 7] = -1e4        # the first row of a row block
    resets = x["u"] < -87
    op = ssmc.compile(defn, backend="triton", lowering="chunked")
    leaves = {k_: v_.clone().requires_grad_(True) for k_, v_ in x.items()}
    y = op(**leaves)
    cot = torch.randn(y.shape, generator=gen)
    y.backward(cot)
    ref_leaves = {k_: v_.double().requires_grad_(True) for k_, v_ in x.items()}
    ssmc.compile(defn, backend="reference")(**ref_leaves).backward(cot.double())
    du = leaves["u"].grad
    assert torch.all(du[resets] == 0)
    for name in x:
        got, want = leaves[name].grad.double(), ref_leaves[name].grad
        want = torch.where(torch.isfinite(want), want, 0.0)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), name


def test_kept_scores_are_written_everywhere(monkeypatch):
    """The per-key forward keeps each chunk's scores for the backward without zero-filling the
    buffer first: the scores kernel writes every entry, zeros above the diagonal and in row
    blocks past the sequence's end (t = 40: a chunk of 64 with one partial and one empty row
    block). torch.empty gives NaNs in tests (conftest), so an entry left unwritten shows."""
    from ssmc.backends.triton import backward as backward_module
    real_residual = backward_module.residual_of
    kept = []

    def recording(keep, device):
        kept.extend(k.clone() for k in keep)
        return real_residual(keep, device)
    monkeypatch.setattr(backward_module, "residual_of", recording)
    gen = torch.Generator().manual_seed(8)
    b, t, h, n, p = 1, 40, 2, 8, 3
    x = {"q": torch.randn(b, t, h, n, generator=gen), "k": torch.randn(b, t, h, n, generator=gen),
         "v": torch.randn(b, t, h, p, generator=gen),
         "u": -0.1 * torch.rand(b, t, h, n, generator=gen)}
    leaves = {k_: v_.requires_grad_(True) for k_, v_ in x.items()}
    y = ssmc.compile(_per_key_exp(), backend="triton", lowering="chunked")(**leaves)
    (scores,) = kept
    assert not torch.isnan(scores).any()
    cs = scores.shape[-1]
    rows, cols = torch.arange(cs)[:, None], torch.arange(cs)[None, :]
    assert torch.all(scores[..., rows < cols] == 0)          # above the diagonal
    assert torch.all(scores[..., t:, :] == 0)                # rows past the sequence
    y.sum().backward()
    assert all(torch.isfinite(leaf.grad).all() for leaf in leaves.values())
