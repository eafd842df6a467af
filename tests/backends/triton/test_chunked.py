"""The Triton chunked lowering against the float64 sequential reference (`ssmc.reference.scan`).

The lowering runs a state pass over chunks of CS steps (the state entering every chunk, and the
final state) and an output pass over row blocks of BT inside each chunk; per-key decays use
row blocks of 16 in chunks of 64. Covered: every built-in where chunked is legal (ssd with D,
z, dt_bias, softplus and groups g < h; selective_scan, a per-key decay with p = 1; retention; gla, per-key;
linear_attention), the built-ins' look-alikes and custom definitions of every legal decay kind
in the reverse and bidirectional directions, initial and final states, packed sequences (an
empty one, ones shorter and longer than a chunk), t = 1, 7, 63, 100, 200, 300 (several chunks of
CS steps, partial chunks and row blocks), fp32 / bf16 / fp16, explicit tile overrides (through a
patched `tiles` and through `Plan.tile`), the state pass in segments, the refusal of a decay that varies over p, and, on a
GPU, real shapes.

Tolerances (relative L2 error ||out - ref|| / ||ref||, conftest.TOL): fp32 1e-5 (the fp32 dots
use input_precision="ieee"), bf16 2e-2, fp16 5e-3. Without CUDA the kernels run under the
Triton interpreter, so n and p are small and there are few cases per shape.
"""
from __future__ import annotations

import pytest
import torch

import ssmc
from ssmc import dsl as S
from ssmc import reference
from ssmc.backends import get_backend
from ssmc.backends.triton.tiles import ChunkedTile
from ssmc.devices import DeviceLimits
from ssmc.errors import ConfigError, UnsupportedError
from ssmc.plan import Plan
from ssmc.validate import bind
from tests.backends.triton.conftest import TOL, rel_l2
from tests.backends.triton.test_scan import (BUILTINS, builtin, cu_seqlens, custom, inputs_for,
                                             state_for)
from tests.helpers import compile_for_hopper, make_definition

LOWERING = "chunked"
DIRECTIONS = ("forward", "reverse", "bidirectional")


pytestmark = pytest.mark.usefixtures("kernel_cache_per_module")


def chunked():
    """The chunked lowering's launch module (its `tiles` sizes every launch)."""
    from ssmc.backends.triton.lowerings import chunked_launch
    return chunked_launch


#: small odd shapes, g < h wherever a definition has groups. t = 200 and 300 cross chunk
#: boundaries (CS = 64 or 128; per key, many 16-step chunks); t = 63 and 100 leave partial row
#: blocks and a partial chunk.
SHAPES = {
    "t1": dict(b=2, t=1, h=4, g=2, n=5, p=3),
    "t7": dict(b=2, t=7, h=4, g=2, n=4, p=5),
    "t63": dict(b=1, t=63, h=2, g=1, n=6, p=3),
    "t100": dict(b=1, t=100, h=2, g=1, n=3, p=4),
    "t200": dict(b=2, t=200, h=2, g=1, n=5, p=3),
    "t300": dict(b=1, t=300, h=4, g=2, n=4, p=3),
}

#: packed sequences: empty (inside and at the end), shorter than a row block, exactly one
#: per-key chunk (16) and one CS chunk (128), longer than a chunk (129, 260)
LENGTHS = (3, 0, 129, 16, 1, 260, 0)


def shape_for(name: str, shape: str | dict) -> dict:
    sizes = dict(SHAPES[shape] if isinstance(shape, str) else shape)
    if name == "selective_scan":
        sizes["p"] = 1  # Mamba-1: one channel per head
    return sizes



# --------------------------------------------------------------------------- built-ins

@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", list(BUILTINS))
def test_chunked_builtin(name, shape, triton_check):
    """Each built-in (ssd: D, z, dt_bias, softplus, groups) with an initial and a final state."""
    defn = builtin(name)
    sizes = shape_for(name, shape)
    triton_check(defn, inputs_for(defn, sizes), lowering=LOWERING,
                 initial_state=state_for(defn, sizes), return_final_state=True)


@pytest.mark.parametrize("shape", ["t7", "t100", "t300"])
@pytest.mark.parametrize("direction", ["reverse", "bidirectional"])
@pytest.mark.parametrize("name", list(BUILTINS))
def test_chunked_builtin_directions(name, direction, shape, triton_check, request):
    """The built-ins' expressions written with direction= (test_scan's look-alikes)."""
    defn = builtin(name, direction)
    sizes = shape_for(name, shape)
    triton_check(defn, inputs_for(defn, sizes, seed=1), lowering=LOWERING,
                 initial_state=state_for(defn, sizes), return_final_state=True)


@pytest.mark.parametrize("name", list(BUILTINS))
def test_chunked_builtin_without_states(name, triton_check):
    defn = builtin(name)
    triton_check(defn, inputs_for(defn, shape_for(name, "t200"), seed=5), lowering=LOWERING)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("name", list(BUILTINS))
def test_chunked_builtin_varlen(name, direction, triton_check):
    """Packed sequences: no state crosses a boundary, an empty sequence passes its initial
    state through to its final state, lengths straddle the chunk and row-block sizes."""
    defn = builtin(name, direction)
    sizes = dict(shape_for(name, "t7"), b=1, t=sum(LENGTHS))
    triton_check(defn, inputs_for(defn, sizes, seed=2), lowering=LOWERING,
                 initial_state=state_for(defn, sizes, num_states=len(LENGTHS)),
                 return_final_state=True, cu_seqlens=cu_seqlens(LENGTHS))


def test_chunked_varlen_without_initial_state(triton_check):
    defn = builtin("ssd")
    sizes = dict(shape_for("ssd", "t7"), b=1, t=sum(LENGTHS))
    triton_check(defn, inputs_for(defn, sizes, seed=3), lowering=LOWERING,
                 return_final_state=True, cu_seqlens=cu_seqlens(LENGTHS))


@pytest.mark.parametrize("name", ["ssd", "gla"])
def test_chunked_varlen_all_sequences_empty(name, triton_check):
    """No chunk at all (the output pass is skipped): the final states are the initial ones."""
    defn = builtin(name)
    sizes = dict(shape_for(name, "t7"), b=1, t=0)
    h0 = state_for(defn, sizes, num_states=2)
    triton_check(defn, inputs_for(defn, sizes, seed=4), lowering=LOWERING, initial_state=h0,
                 return_final_state=True, cu_seqlens=cu_seqlens([0, 0]))


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
@pytest.mark.parametrize("name", list(BUILTINS))
def test_chunked_builtin_bf16(name, direction, triton_check):
    defn = builtin(name, direction)
    sizes = shape_for(name, "t200")
    triton_check(defn, inputs_for(defn, sizes, dtype=torch.bfloat16, seed=4), lowering=LOWERING,
                 initial_state=state_for(defn, sizes), return_final_state=True)


def test_chunked_bf16_varlen(triton_check):
    defn = builtin("ssd", "reverse")
    sizes = dict(shape_for("ssd", "t7"), b=1, t=sum(LENGTHS))
    triton_check(defn, inputs_for(defn, sizes, dtype=torch.bfloat16, seed=6), lowering=LOWERING,
                 initial_state=state_for(defn, sizes, num_states=len(LENGTHS)),
                 return_final_state=True, cu_seqlens=cu_seqlens(LENGTHS))


def test_chunked_fp16(triton_check):
    defn = builtin("ssd")
    sizes = shape_for("ssd", "t300")
    triton_check(defn, inputs_for(defn, sizes, dtype=torch.float16, seed=6), lowering=LOWERING,
                 initial_state=state_for(defn, sizes), return_final_state=True)


def test_chunked_non_contiguous_inputs(triton_check):
    """Inputs are read through their strides: a transposed x and a broadcast (stride 0) B."""
    defn = builtin("ssd")
    sizes = shape_for("ssd", "t300")  # g = 2, so the broadcast B has a stride-0 group axis
    inputs = inputs_for(defn, sizes, seed=8)
    b, t, h, g, n, p = (sizes[a] for a in "bthgnp")
    inputs["x"] = inputs["x"].transpose(1, 2).contiguous().transpose(1, 2)
    inputs["B"] = torch.randn(b, t, 1, n, device=inputs["x"].device).expand(b, t, g, n)
    assert not inputs["x"].is_contiguous() and inputs["B"].stride(2) == 0
    triton_check(defn, inputs, lowering=LOWERING, initial_state=state_for(defn, sizes),
                 return_final_state=True)


# --------------------------------------------------------------------------- custom definitions

DECAYS = ("none", "time_invariant", "scalar", "diagonal")


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("decay", DECAYS)
def test_chunked_custom(decay, direction, triton_check):
    """tests.helpers' definitions of every legal decay kind (groups, an epilogue) in every
    direction, across two CS chunks."""
    defn = make_definition(decay, direction, epilogue=True)
    sizes = SHAPES["t200"]
    triton_check(defn, inputs_for(defn, sizes, seed=10), lowering=LOWERING,
                 initial_state=state_for(defn, sizes), return_final_state=True)


@ssmc.ssm
def shared_computed_qk(q: S.In["b t g n"], k: S.In["b t g n"], v: S.In["b t h p"],
                       w: S.In["b t g"], a: S.In["b t h"]):
    return S.recurrence(decay=S.sigmoid(a + 2), key=k * w, value=v, query=2.0 * q + 0.5,
                        direction="reverse")


@pytest.mark.parametrize("shape", ["t200", "varlen"])
def test_chunked_shared_qk_computed(shape, triton_check):
    """Query and key the same for every head of a group but computed from inputs: the output
    pass and the dv kernel read q k^T formed once per (chunk, group) (chunk_qk.py), which must
    evaluate them, not load a bare input."""
    sizes = dict(b=2, t=200, h=8, g=2, n=5, p=3)   # four heads a group: read (`reads_qk`)
    kwargs = {}
    if shape == "varlen":
        sizes = dict(sizes, b=1, t=sum(LENGTHS))
        kwargs = dict(cu_seqlens=cu_seqlens(LENGTHS))
    triton_check(shared_computed_qk, inputs_for(shared_computed_qk, sizes, seed=12),
                 lowering=LOWERING, return_final_state=True, **kwargs)


@pytest.mark.parametrize("shape", ["t1", "t63", "varlen"])
@pytest.mark.parametrize("direction", ["reverse", "bidirectional"])
def test_chunked_custom_gated(direction, shape, triton_check):
    """test_scan's sigmoid-gated definition (the gate also scales the value; tanh epilogue)."""
    defn = custom("gated", direction)
    if shape == "varlen":
        sizes = dict(SHAPES["t7"], b=1, t=sum(LENGTHS))
        triton_check(defn, inputs_for(defn, sizes, seed=9), lowering=LOWERING,
                     initial_state=state_for(defn, sizes, num_states=len(LENGTHS)),
                     return_final_state=True, cu_seqlens=cu_seqlens(LENGTHS))
    else:
        sizes = SHAPES[shape]
        triton_check(defn, inputs_for(defn, sizes, seed=10), lowering=LOWERING,
                     initial_state=state_for(defn, sizes), return_final_state=True)


@pytest.mark.parametrize("decay,direction", [("scalar", "bidirectional"),
                                             ("diagonal", "reverse")])
def test_chunked_custom_bf16(decay, direction, triton_check):
    defn = make_definition(decay, direction, epilogue=True)
    sizes = dict(b=1, t=300, h=2, g=1, n=20, p=17)  # n, p past one 16-wide tile
    triton_check(defn, inputs_for(defn, sizes, dtype=torch.bfloat16, seed=11), lowering=LOWERING,
                 initial_state=state_for(defn, sizes), return_final_state=True)


# --------------------------------------------------------------------------- tile sizes

def test_chunked_default_tiles():
    """CS is a multiple of BT; per-key decays use BT = 16 and CS = 64; the state pass's blocks
    cover n and p."""
    c = chunked()
    sizes = dict(b=1, t=300, h=2, g=1, n=40, p=40)
    for name in BUILTINS:
        plan = Plan(program=builtin(name).program, lowering=LOWERING, dtype="float32")
        m = c.tiles(plan, sizes, 2)
        assert m["CS"] % m["BT"] == 0, (name, m)
        if name in ("selective_scan", "gla"):
            assert (m["BT"], m["CS"]) == (16, 64), (name, m)
        assert m["BN"] >= sizes["n"]
        for key in ("BN_state", "BP_state", "BP_out"):
            assert m[key] >= 16 and m[key] & (m[key] - 1) == 0, (name, key, m)


def test_chunked_segments_only_where_the_state_pass_leaves_the_gpu_idle():
    """Segments for few long walks (b=1 t=64k h=16: 16 walks of 1024 chunks on a GPU wanting
    264 programs), none for enough walks, short sequences, packed ones or no GPU."""
    from ssmc.backends.triton.lowerings.chunked_segments import segment_chunks
    seg = segment_chunks(None, 1024, 16, False, 264)   # t=64k in chunks of 64
    assert seg and 16 * -(-1024 // seg) >= 264 and seg >= 4, seg
    assert segment_chunks(None, 1024, 300, False, 264) == 0
    assert segment_chunks(None, 4, 16, False, 264) == 0     # 4 chunks: one segment
    assert segment_chunks(None, 8, 16, False, 264) == 4     # 8 chunks: two of 4
    assert segment_chunks(None, 1024, 16, True, 264) == 0
    assert segment_chunks(None, 1024, 16, False, None) == 0
    assert segment_chunks(8, 1024, 16, False, None) == 8
    assert segment_chunks(None, 1024, 0, False, 264) == 0   # an empty batch
    assert segment_chunks(None, 0, 16, False, 264) == 0     # empty sequences


def test_state_passes_split_value_channels_before_segments():
    """A sequential pass takes 32 value channels a program where 64 would leave fewer walks
    than the GPU wants (ssd b=2 h=80 p=64: 160 walks of 64 against 264), else up to 64; never
    below 16, never more than p needs, and 64 with no GPU."""
    from ssmc.backends.triton.lowerings.chunked_segments import state_block
    assert state_block(64, 160, 264) == 32
    assert state_block(64, 640, 264) == 64
    assert state_block(64, 160, None) == 64
    assert state_block(128, 160, 264) == 64        # two blocks of 64 make 320 walks
    assert state_block(32, 16, 264) == 32
    assert state_block(5, 16, 264) == 16
    assert state_block(0, 16, 264) == 16


def _with_tiles(monkeypatch, **override):
    """Patch `chunked.tiles` to apply `override` on top of the defaults; returns the list of
    the tile dicts the launches used."""
    c = chunked()
    real = c.tiles
    used = []

    def tiles(*args):
        m = dict(real(*args), **override)
        used.append(m)
        return m

    monkeypatch.setattr(c, "tiles", tiles)
    return used


TILE_CASES = [
    # (id, override, definition, sizes)
    ("cs64_bt64", dict(CS=64, BT=64), ("ssd", "forward"), dict(b=2, t=200, h=4, g=2, n=5, p=3)),
    ("cs128_bt32", dict(CS=128, BT=32), ("ssd", "bidirectional"),
     dict(b=1, t=300, h=2, g=1, n=4, p=3)),
    # four heads a group: the output pass reads q k^T's blocks of each chunk (chunk_qk.py)
    ("cs128_bt32_qk_read", dict(CS=128, BT=32), ("ssd", "reverse"),
     dict(b=1, t=300, h=4, g=1, n=4, p=3)),
    ("cs256_bt16", dict(CS=256, BT=16), ("retention", "reverse"),
     dict(b=1, t=300, h=2, g=2, n=4, p=5)),
    ("cs32_bt16_none", dict(CS=32, BT=16), ("linear_attention", "forward"),
     dict(b=1, t=100, h=2, g=2, n=4, p=3)),
    ("bn_state16_n32", dict(BN_state=16), ("ssd", "forward"), dict(b=1, t=200, h=2, g=1, n=32,
                                                                  p=3)),
    ("bp16_p40", dict(BP_state=16, BP_out=16), ("retention", "forward"),
     dict(b=1, t=200, h=2, g=2, n=4, p=40)),
    ("per_key_bt32", dict(CS=32, BT=32), ("gla", "reverse"), dict(b=1, t=100, h=2, g=2, n=5,
                                                                 p=3)),
    # the state pass in segments walked side by side, then joined (`segment_chunks`)
    ("seg2_cs32", dict(CS=32, BT=16, SEG_state=2), ("ssd", "forward"),
     dict(b=2, t=300, h=4, g=2, n=5, p=3)),
    ("seg3_per_key", dict(SEG_state=3), ("gla", "reverse"), dict(b=1, t=400, h=2, g=2, n=5,
                                                                 p=3)),
    ("seg1_none_bidirectional", dict(CS=16, BT=16, SEG_state=1),
     ("linear_attention", "bidirectional"), dict(b=2, t=100, h=2, g=2, n=4, p=3)),
    ("seg2_blocks", dict(CS=16, BT=16, SEG_state=2, BN_state=16, BP_state=16),
     ("retention", "reverse"), dict(b=1, t=150, h=2, g=2, n=32, p=40)),
    ("per_key_cs128_bt16", dict(CS=128, BT=16), ("gla", "forward"),
     dict(b=1, t=300, h=2, g=2, n=5, p=3)),
    ("per_key_cs64_bt32", dict(CS=64, BT=32), ("gla", "bidirectional"),
     dict(b=1, t=150, h=2, g=2, n=5, p=3)),
    ("per_key_bn_state16_n32", dict(BN_state=16), ("gla", "forward"),
     dict(b=1, t=63, h=2, g=2, n=32, p=3)),
]


@pytest.mark.parametrize("case,override,which,sizes", TILE_CASES, ids=[c[0] for c in TILE_CASES])
def test_chunked_tile_overrides(case, override, which, sizes, triton_check, monkeypatch):
    """Chunks of 64, 128, 256 and 32 steps with row blocks of 64, 32 and 16 (one to sixteen
    row blocks per chunk), a state pass that splits n (BN_state = 16 < n = 32) and passes that
    split p (BP = 16 < p = 40)."""
    used = _with_tiles(monkeypatch, **override)
    defn = builtin(*which)
    triton_check(defn, inputs_for(defn, sizes, seed=12), lowering=LOWERING,
                 initial_state=state_for(defn, sizes), return_final_state=True, label=case)
    assert used and all(m[k] == v for m in used for k, v in override.items())


def test_chunked_tile_override_varlen(triton_check, monkeypatch):
    """Packed sequences with chunks of 64 and row blocks of 32: sequence starts fall inside
    row blocks of the unpacked layout."""
    _with_tiles(monkeypatch, CS=64, BT=32, BN_state=16)
    defn = builtin("ssd", "bidirectional")
    sizes = dict(b=1, t=sum(LENGTHS), h=2, g=1, n=20, p=3)
    triton_check(defn, inputs_for(defn, sizes, seed=13), lowering=LOWERING,
                 initial_state=state_for(defn, sizes, num_states=len(LENGTHS)),
                 return_final_state=True, cu_seqlens=cu_seqlens(LENGTHS))


def test_chunked_default_state_tiles(triton_check):
    """n = p = 40 with few programs: the state pass keeps all of n (padded to 64) and a
    p-block in one program by default (splitting n measured slower on the H100), so it runs
    masked, partial blocks."""
    defn = builtin("ssd")
    sizes = dict(b=1, t=150, h=2, g=1, n=40, p=40)
    plan = Plan(program=defn.program, lowering=LOWERING, dtype="float32")
    m = chunked().tiles(plan, sizes, 2)
    assert m["BN_state"] == m["BN"] == 64 and m["BP_state"] == 64, m
    triton_check(defn, inputs_for(defn, sizes, seed=14), lowering=LOWERING,
                 initial_state=state_for(defn, sizes), return_final_state=True)


#: an H100's limits as torch reports them (232448 bytes of shared memory per block, opt-in)
HOPPER = DeviceLimits(name="NVIDIA H100 80GB HBM3", capability=(9, 0), sm_count=132,
                      smem_per_block=232448)


#: an sm_89 card's (99 KiB of shared memory per block)
ADA = DeviceLimits(name="NVIDIA L4", capability=(8, 9), sm_count=58, smem_per_block=101376)


def _ssd_tiles(dtype="bfloat16", **pinned):
    plan = Plan(program=builtin("ssd").program, lowering=LOWERING, dtype=dtype,
                tile=ChunkedTile(**pinned))
    return plan, dict(b=2, t=2048, h=8, g=2, n=128, p=64)


@pytest.mark.parametrize("dtype, limits, stages", [("bfloat16", ADA, 3), ("float32", ADA, 2),
                                                   ("float32", HOPPER, 3)])
def test_walk_stages_by_operand_size_and_device(dtype, limits, stages):
    """The default 64-step chunks: fp32 operands (48 KiB a stage at n = 128, p = 64) take two
    stages on a 99 KiB card and three on an H100; bf16 three on both."""
    plan, sizes = _ssd_tiles(dtype)
    assert chunked().tiles(plan, sizes, 16, limits)["stages_state"] == stages


@pytest.mark.parametrize("chunk, stages", [(64, 3), (128, 3), (256, 2)])
def test_walk_stages_fit_shared_memory(chunk, stages):
    """The state pass over 256-step chunks holds (256, 128) keys and (256, 64) values per
    stage (96 KiB in bf16): three stages (288 KiB) failed to launch on an H100, two fit. The
    backward's walks over BT_bwd-step chunks take the same tiles."""
    from ssmc.backends.triton.lowerings import chunked_bwd_launch
    plan, sizes = _ssd_tiles(CS=chunk, BT_bwd=chunk)
    assert chunked().tiles(plan, sizes, 16, HOPPER)["stages_state"] == stages
    assert chunked_bwd_launch.tiles(plan, sizes, 16, HOPPER)["WALK"]["num_stages"] == stages
    # without a GPU's limits (the CPU, the interpreter) the defaults stand
    assert chunked().tiles(plan, sizes, 16)["stages_state"] == 3


@pytest.mark.parametrize("pinned", [dict(CS=256, stages_state=3), dict(CS=2048)],
                         ids=["pinned_stages", "chunk_too_long"])
def test_walk_that_cannot_fit_is_a_config_error(pinned):
    """Pinned tiles whose walk cannot fit the device's shared memory fail with a ConfigError
    naming the tiles and the sizes, before any launch."""
    plan, sizes = _ssd_tiles(**pinned)
    with pytest.raises(ConfigError, match=r"KiB of shared memory; NVIDIA H100 80GB HBM3 has "
                                          r"227 KiB per block"):
        chunked().tiles(plan, sizes, 16, HOPPER)


@pytest.mark.parametrize("name", ["retention", "ssd"])
def test_chunked_final_state_of_a_long_chunk(name, triton_check, monkeypatch):
    """One 100-step chunk (CS = 128) of a scalar decay summing to L ~ -46 (retention) or
    ~ -90 (ssd). Weighting keys by l_last - lc (two differently rounded sums) once gave
    final-state errors of 2.3e-5 here; suffix sums are exact on the chunk's last key."""
    _with_tiles(monkeypatch, CS=128, BT=64)
    defn = builtin(name)
    sizes = dict(b=1, t=100, h=2, g=1, n=3, p=4)
    triton_check(defn, inputs_for(defn, sizes), lowering=LOWERING,
                 initial_state=state_for(defn, sizes), return_final_state=True)


def _run_plan(plan: Plan, inputs: dict, initial_state=None, cu=None):
    """Run `plan` through the Triton backend's compile directly; (out, final) and the float64
    reference's."""
    program = plan.program
    extra = dict(return_final_state=plan.return_final_state)
    if initial_state is not None:
        extra["initial_state"] = initial_state
    if cu is not None:
        extra["cu_seqlens"] = cu
    bound = bind(program, (), {**inputs, **extra})
    backend = get_backend("triton")
    assert backend.supports(plan) is None
    kernel = backend.compile(plan)
    out, final = kernel(bound.tensors, bound.sizes, bound.initial_state, bound.cu_seqlens)
    ref_bound = bind(program, (), {**{k: v.double() for k, v in inputs.items()}, **extra,
                                   **({"initial_state": initial_state.double()}
                                      if initial_state is not None else {})})
    ref = reference.scan(program, ref_bound.tensors, ref_bound.sizes, ref_bound.initial_state,
                         ref_bound.cu_seqlens, plan.return_final_state)
    return (out, final), ref


@pytest.mark.parametrize("tile,which,varlen", [
    ((("BT", 32), ("CS", 64)), ("ssd", "forward"), False),
    ((("BT", 16), ("CS", 64), ("BN_state", 16), ("BP_state", 16)), ("retention", "reverse"),
     True),
    ((("BT", 32),), ("gla", "bidirectional"), False),
], ids=["ssd_cs64_bt32", "retention_varlen_bn16", "gla_bt32"])
def test_chunked_plan_tile(tile, which, varlen):
    """Tile sizes given as `Plan.tile`, compiled by the backend directly."""
    defn = builtin(*which)
    if varlen:
        sizes = dict(b=1, t=sum(LENGTHS), h=2, g=2, n=20, p=20)
        cu, num = cu_seqlens(LENGTHS), len(LENGTHS)
    else:
        sizes = dict(b=2, t=150, h=2, g=2, n=5, p=3)
        cu, num = None, None
    plan = Plan(program=defn.program, lowering=LOWERING, dtype="float32",
                has_initial_state=True, return_final_state=True, varlen=varlen,
                tile=ChunkedTile(**dict(tile)))
    m = chunked().tiles(plan, sizes, 2)
    assert all(m[k] == v for k, v in tile), m
    inputs = inputs_for(defn, sizes, seed=15)
    h0 = state_for(defn, sizes, num_states=num)
    (out, final), (ref_out, ref_final) = _run_plan(plan, inputs, h0, cu)
    for name, a, e in (("y", out, ref_out), ("final_state", final, ref_final)):
        assert a.shape == e.shape, (name, a.shape, e.shape)
        err, max_abs = rel_l2(a, e)
        assert err <= TOL[torch.float32], f"{name}: rel L2 {err:.3e} (max abs {max_abs:.3e})"


# --------------------------------------------------------------------------- plan checks

def test_chunked_rejects_decay_over_p():
    """A decay that varies over p (Mamba-1's per-channel A with p > 1) has no chunked form:
    `supports()` refuses it with a reason, and compiling for chunked raises."""
    for defn in (custom("per_channel", "forward"), make_definition("full", "forward")):
        plan = Plan(program=defn.program, lowering=LOWERING, dtype="float32")
        why = chunked().supports(plan)
        assert isinstance(why, str) and "p" in why, why
        assert get_backend("triton").supports(plan) == why
        with pytest.raises(UnsupportedError):
            ssmc.compile(defn, backend="triton", lowering=LOWERING)


def test_chunked_supports_every_builtin():
    for name in BUILTINS:
        for direction in DIRECTIONS:
            plan = Plan(program=builtin(name, direction).program, lowering=LOWERING,
                        dtype="bfloat16", has_initial_state=True, return_final_state=True,
                        varlen=True)
            assert get_backend("triton").supports(plan) is None, (name, direction)


def test_chunked_op_uses_the_chunked_lowering():
    defn = builtin("retention")
    op = ssmc.compile(defn, backend="triton", lowering=LOWERING)
    op(**inputs_for(defn, shape_for("retention", "t7")))
    assert op.last_plan.lowering == LOWERING


def test_chunked_checker_detects_a_mismatch(triton_check):
    defn = builtin("gla")
    inputs = inputs_for(defn, shape_for("gla", "t63"))
    with pytest.raises(AssertionError, match=r"y: relative L2 error .* > tol 1\.0e-12"):
        triton_check(defn, inputs, lowering=LOWERING, tol=1e-12)


# --------------------------------------------------------------------------- GPU, real shapes

GPU_SIZES = dict(b=2, t=2048, h=8, g=2, n=128, p=64)


@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
@pytest.mark.parametrize("name", list(BUILTINS))
def test_chunked_gpu_real_shapes(name, direction, triton_check):
    defn = builtin(name, direction)
    sizes = shape_for(name, GPU_SIZES)
    inputs = {k: v.cuda() for k, v in
              inputs_for(defn, sizes, dtype=torch.bfloat16, seed=16).items()}
    triton_check(defn, inputs, lowering=LOWERING, initial_state=state_for(defn, sizes).cuda(),
                 return_final_state=True)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["ssd", "gla"])
def test_chunked_gpu_real_shapes_varlen(name, triton_check):
    defn = builtin(name)
    lengths = (1000, 0, 24, 1, 999, 2048)
    sizes = shape_for(name, dict(GPU_SIZES, b=1, t=sum(lengths)))
    inputs = {k: v.cuda() for k, v in
              inputs_for(defn, sizes, dtype=torch.bfloat16, seed=17).items()}
    triton_check(defn, inputs, lowering=LOWERING,
                 initial_state=state_for(defn, sizes, num_states=len(lengths)).cuda(),
                 return_final_state=True, cu_seqlens=cu_seqlens(lengths).cuda())


@pytest.mark.gpu
@pytest.mark.parametrize("override", [dict(CS=64, BT=64), dict(CS=256, BT=64),
                                      dict(CS=128, BT=32), dict(BN_state=32, BP_state=32)],
                         ids=["cs64_bt64", "cs256_bt64", "cs128_bt32", "state32x32"])
def test_chunked_gpu_tile_overrides(override, triton_check, monkeypatch):
    """Tiles pinned as a user pins them (the plan's tile), so the launch sizes the rest (the
    walks' pipeline stages) around them."""
    tile_dict = Plan.tile_dict
    monkeypatch.setattr(Plan, "tile_dict", lambda plan: {**tile_dict(plan), **override})
    defn = make_definition("scalar", "bidirectional", epilogue=True)
    sizes = GPU_SIZES
    inputs = {k: v.cuda() for k, v in
              inputs_for(defn, sizes, dtype=torch.bfloat16, seed=18).items()}
    triton_check(defn, inputs, lowering=LOWERING, initial_state=state_for(defn, sizes).cuda(),
                 return_final_state=True)


# ------------------------------------------------------------------------------ sm90 compile

_AOT = r'''
import importlib.util, os, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ssmc.plan import Plan
from ssmc.backends.triton.lowerings import chunked, chunked_bwd_launch
from tests.helpers import make_definition

INT_PTRS = {"cu_ptr": "*i32", "chunk_off_ptr": "*i64", "chunk_seq_ptr": "*i64",
            "resets_ptr": "*i8", "ssmc_cu": "*i32", "ssmc_chunk_off": "*i64",
            "ssmc_chunk_seq": "*i64", "ssmc_resets": "*i8", "ssmc_zcum": "*i8",
            "ssmc_ngp": "*i8"}
LOW = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}


def load(source, name):
    path = os.path.join(tempfile.mkdtemp(), name + ".py")
    open(path, "w").write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(mod, name, consts, dtype):
    fn = getattr(mod, name)
    if "ssmc_rb" in fn.arg_names:   # the prefix sums' row block
        consts = dict(consts, ssmc_rb=16)
    def kind(a):   # a pair's second order's parameters (chunked_pairs.py) end in _b
        base = a[:-2] if a.endswith("_b") else a
        return INT_PTRS.get(base) or (
            (LOW[dtype] if base.startswith("u_") or base in ("out_ptr", "states_ptr") else "*fp32")
            if base.endswith("_ptr") or base.startswith("ssmc_") else "i32")

    sig = {a: "constexpr" if a in consts else kind(a) for a in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=8 if "keys" in name else 4))
    assert k.asm.get("cubin"), name


order = dict(REVERSE=True, COLUMN=True, IS_VARLEN=False)
for decay, dtype in (("diagonal", "bfloat16"), ("diagonal", "float16"), ("diagonal", "float32"),
                     ("scalar", "bfloat16")):
    plan = Plan(program=make_definition(decay, "forward", epilogue=True).program,
                lowering="chunked", dtype=dtype)
    per_key = decay == "diagonal"
    fwd = load(chunked.render(plan), f"f_{decay}_{dtype}")
    seg = dict(BN=64, BP=64, NPB=1, STORE_OUT=True, REVERSE=True)
    build(fwd, "ssmc_chunked_state_fwd", dict(BT=64, BN=64, BP=64, NPB=1, HAS_H0=True,
                                              STORE_HT=True, SEGMENTED=True, **order), dtype)
    build(fwd, "ssmc_chunked_segments", seg, dtype)
    for qk_read in (False, True) if not per_key else (False,):
        build(fwd, "ssmc_chunked_out_fwd", dict(BT=64, CS=64, BN=64, BP=64, NPB=1, ACCUM_IN=True,
                                                WRITE_OUT=True, SEGMENTED=True, **order,
                                                QK_READ=qk_read), dtype)
    if not per_key:   # two opposite orders in one program (chunked_pairs.py)
        for name in ("ssmc_chunked_out_pair_fwd", "ssmc_chunked_out_pair_resets_fwd"):
            if hasattr(fwd, name):
                pair = dict(BT=64, CS=64, BN=64, BP=64, NPB=1, ACCUM_IN=True, WRITE_OUT=True,
                            SEGMENTED=True, QK_READ=True, **order, REVERSE_b=False,
                            COLUMN_b=True)
                build(fwd, name, dict(pair, ROWS=16) if "resets" in name else pair, dtype)
    if not per_key:   # q k^T once per (chunk, group): chunk_qk.py
        build(fwd, "ssmc_chunk_qk", dict(BT=64, BN=64, BP=16, **order), dtype)
    if per_key:
        for suffix in (False, True):
            build(fwd, "ssmc_chunked_prefix", dict(BT=16, CS=64, BN=64, BP=16, NPB=1, **order,
                                                   BLOCK_SUFFIX=suffix), dtype)
        for diag in (True, False):
            build(fwd, "ssmc_chunked_scores",
                  dict(BT=16, CS=64, BN=64, BP=16, BND=32, DIAG=diag, **order), dtype)
    bwd = load(chunked_bwd_launch.render(plan), f"b_{decay}_{dtype}")
    walk = dict(BT=64, BN=64, BP=64, SEGMENTED=True, **order)
    build(bwd, "ssmc_chunked_bwd_dstates", dict(walk, HAS_GT=True), dtype)
    build(bwd, "ssmc_chunked_bwd_join", seg, dtype)
    build(bwd, "ssmc_chunked_bwd_fixup", dict(BN=64, BP=64, NPB=1, REVERSE=True), dtype)
    if per_key:
        blocks = dict(BT=16, CS=64, BN=64, BP=64, **order)
        chunks = dict(blocks, BT=64)
        for diag in (True, False):
            build(bwd, "ssmc_chunked_scores", dict(blocks, BP=16, BND=32, DIAG=diag), dtype)
        build(bwd, "ssmc_chunked_bwd_keys_prep", dict(chunks, NPB=1), dtype)
        build(bwd, "ssmc_chunked_bwd_keys", dict(blocks, NPB=1), dtype)
        build(bwd, "ssmc_chunked_bwd_keys_dv", dict(chunks, BN=128), dtype)
        build(bwd, "ssmc_chunked_bwd_y", dict(chunks, ACCUM_IN=True), dtype)
    else:   # both variants of the per-chunk kernels (chunked_bwd.chunk_variants)
        chunks = dict(BT=64, BN=64, BP=64, CPP=16, HP2=1, **order)
        for suffix in ("", "_resets"):
            build(bwd, "ssmc_chunked_bwd_y" + suffix, dict(chunks, ACCUM_IN=True), dtype)
            build(bwd, "ssmc_chunked_bwd_dv" + suffix, dict(chunks, WANT_Y=True, ACCUM_Y=True),
                  dtype)
            build(bwd, "ssmc_chunked_bwd_dqk" + suffix,
                  dict(chunks, HEADS=2, HP2=2, NPBK=1, NPB=1), dtype)
print("compiled")
'''


def test_chunked_kernels_compile_for_sm90(tmp_path):
    """The chunked forward and backward kernels (per-key scores and chunks, segmented walks,
    fp16's fp32 factored products) through Triton's real compiler to sm90 cubin, without a GPU: GPU-only
    front-end errors (dot shapes and types, loop-carried types, float64 scans) show here."""
    compile_for_hopper(_AOT, tmp_path, timeout=900)
