"""The CUDA chunked lowering's tiles (lowerings/chunked_cuda/tiles.py): the typed pins of
plan.tile (ChunkedCudaTile: defaults, validation, the tuple form) and the tiling resolved from
them for given sizes (`tiles`)."""
from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("tvm")

from ssmc.backends.tvm.lowerings.chunked_cuda import unsupported  # noqa: E402
from ssmc.backends.tvm.lowerings.chunked_cuda.tiles import (  # noqa: E402
    BATCH,
    SEQ_V,
    ChunkedCudaTile,
    tiles,
)
from ssmc.backends.triton.tiles import ChunkedTile  # noqa: E402
from ssmc.errors import ConfigError  # noqa: E402
from ssmc.ops.ssd import build as ssd_build  # noqa: E402
from ssmc.plan import Plan  # noqa: E402

MAMBA2 = ssd_build(has_D=True, has_z=True, has_dt_bias=True, dt_softplus=True)


def _plan(dtype="bfloat16", tile=(), **kw):
    """A chunked plan pinning `tile`'s (name, value) pairs."""
    return Plan(program=MAMBA2.program, lowering="chunked", dtype=dtype,
                tile=ChunkedCudaTile(**dict(tile)) if tile else None, **kw)


def test_chunked_cuda_tile_defaults():
    """No pins: block sizes chosen by the budget, the variants that measured faster on."""
    t = ChunkedCudaTile.from_plan(_plan())
    assert t == ChunkedCudaTile()
    assert (t.BP, t.KC, t.BPS, t.NB) == (None,) * 4
    assert (t.VL, t.KV, t.FM, t.VT) == (1, 1, 1, 1)
    assert (t.GF, t.EP, t.VS, t.SP, t.MB) == (0, 0, 0, 0, 0)
    assert (t.LB, t.SV) == (BATCH, SEQ_V)
    assert t.pairs() == ()


def test_chunked_cuda_tile_from_plan_pairs():
    """A plan's tile is read as it is; `pairs` / `as_dict` give back the non-default pins,
    sorted; names and values are checked on construction; another lowering's tile is an
    error."""
    pins = (("EP", 1), ("GF", 1), ("KC", 64), ("LB", 8), ("MB", 7))
    t = ChunkedCudaTile.from_plan(_plan(tile=pins))
    assert (t.EP, t.GF, t.KC, t.LB, t.MB) == (1, 1, 64, 8, 7)
    assert t.pairs() == pins and _plan(tile=pins).tile_dict() == dict(pins)
    assert ChunkedCudaTile(VT=1, SV=2).pairs() == (("SV", 2),)
    assert ChunkedCudaTile.from_dict(dict(pins)) == t
    assert ChunkedCudaTile.from_plan(_plan()) == ChunkedCudaTile()
    with pytest.raises(ConfigError, match=r"ChunkedCudaTile has no field 'BT'"):
        ChunkedCudaTile.from_dict({"BT": 32})
    triton_tile = dataclasses.replace(_plan(), tile=ChunkedTile(BT=32))
    with pytest.raises(ConfigError, match=r"the plan's tile is a ChunkedTile"):
        ChunkedCudaTile.from_plan(triton_tile)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.BP = 8


@pytest.mark.parametrize("name,value,expected", [
    ("BP", 12, "a positive multiple of 8"),
    ("BPS", 0, "a positive multiple of 8"),
    ("KC", 24, "a positive multiple of 16"),
    ("NB", -16, "a positive multiple of 16"),
    ("MB", 17, "an integer in [0, 16]"),
    ("LB", 0, "an integer in [1, 16]"),
    ("SV", 9, "an integer in [0, 8]"),
    ("VL", 2, "0 or 1"), ("GF", -1, "0 or 1"), ("EP", 2, "0 or 1"), ("VS", 3, "0 or 1"),
    ("KV", 2, "0 or 1"), ("SP", 2, "0 or 1"), ("FM", 5, "0 or 1"), ("VT", 2, "0 or 1"),
    ("BP", 16.0, "a positive multiple of 8"),
    ("VT", True, "0 or 1"),
    ("FM", None, "0 or 1"),
])
def test_chunked_cuda_tile_validation(name, value, expected):
    """A pin outside its domain is a ConfigError naming the field, the value and what it must
    be, raised when the plan's tiles are read (and when the lowering is asked about the plan
    at given sizes), not a clamped value or a kernel fault."""
    msg = f"plan.tile {name}={value!r} is not valid (expected {expected})"
    with pytest.raises(ConfigError) as err:
        ChunkedCudaTile(**{name: value})
    assert msg in str(err.value) and isinstance(err.value, ValueError)
    with pytest.raises(ConfigError, match=r"plan\.tile " + name):
        _plan(tile=((name, value),))   # a plan cannot hold a bad pin


def test_chunked_cuda_tile_pins_resolve():
    """Block pins replace the search; pins that do not divide the padded key dim are a reason
    (the CUDA target then runs the scan), as is a tiling that does not fit."""
    t = tiles(_plan(tile=(("BP", 32), ("BPS", 16), ("NB", 32))), 128, 64)
    assert (t.BP, t.BPS, t.NB, t.KC) == (32, 16, 32, 128)
    why = tiles(_plan(tile=(("KC", 64),)), 40, 20)
    assert why == "plan.tile KC=64 does not divide the key dim padded to 16 (48)"
    assert unsupported(_plan(tile=(("NB", 32),)), 40, 20) == \
        "plan.tile NB=32 does not divide the key dim padded to 16 (48)"
    assert "shared memory" in tiles(_plan("float32", chunk_size=128), 1024, 64)
    assert "chunk size 40" in tiles(_plan(chunk_size=40), 128, 64)


def test_chunked_cuda_tile_variants_apply_where_they_can():
    """Variants are off where their condition fails: tensor-core ones (GF, FM, VT) on fp32,
    16-byte ones (VL, KV, SP) where the key dim does not split into vectors, SP where the
    state product slices the key dim, VS where the value tile does not fit over the key
    tile; MB, LB, SV, EP as pinned."""
    on = (("EP", 1), ("GF", 1), ("LB", 4), ("MB", 6), ("SP", 1), ("SV", 2), ("VS", 1))
    t = tiles(_plan(tile=on), 128, 64)
    assert (t.EP, t.GF, t.LB, t.MB, t.SP, t.SV, t.VS) == (1, 1, 4, 6, 1, 2, 1)
    assert (t.VL, t.KV, t.FM, t.VT) == (8, 1, 1, 1)
    f32 = tiles(_plan("float32", tile=on), 128, 64)
    assert (f32.GF, f32.FM, f32.VT, f32.VL, f32.KV, f32.SP) == (0, 0, 0, 1, 0, 0)
    assert (f32.EP, f32.LB, f32.MB, f32.SV) == (1, 4, 6, 2)
    odd = tiles(_plan(tile=on), 36, 64)
    assert (odd.VL, odd.KV, odd.SP) == (1, 0, 0)
    assert tiles(_plan(tile=on + (("KC", 64),)), 128, 64).SP == 0
    off = tiles(_plan(tile=(("FM", 0), ("KV", 0), ("VT", 0))), 128, 64)
    assert (off.FM, off.KV, off.VT) == (0, 0, 0)


def test_scalar_copies_pin():
    """plan.tile VL=0 keeps the scalar operand copies (7.45 ms vs 6.68 ms on an H100)."""
    plan = Plan(program=MAMBA2.program, lowering="chunked", dtype="bfloat16",
                tile=ChunkedCudaTile(VL=0))
    assert tiles(plan, 128, 64).VL == 1
    plan = Plan(program=MAMBA2.program, lowering="chunked", dtype="bfloat16")
    assert tiles(plan, 128, 64).VL == 8 and tiles(plan, 36, 64).VL == 1
