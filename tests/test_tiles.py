"""Typed tiles: each backend lowering's tile is a frozen dataclass whose construction checks
its fields, so a bad tuned config or hand-written tile fails at plan time with the field's
name."""
import dataclasses

import pytest

import ssmc
import ssmc.ops
from ssmc.autotune.space import Config
from ssmc.backends.triton.tiles import ChunkedTile, QuadraticTile, ScanTile
from ssmc.plan import Plan
from ssmc.tiles import Tile, count, flag, pow2, tile_of

PLAN = Plan(program=ssmc.ops.mamba2.program, lowering="chunked", dtype="bfloat16")


@dataclasses.dataclass(frozen=True)
class ExampleTile(Tile):
    BT: int | None = pow2("rows")
    stages: int | None = count("stages")
    vec: int | None = flag("vector loads")


def test_fields_default_to_built_in_and_as_dict_lists_only_set_ones():
    assert ExampleTile().as_dict() == {}
    assert ExampleTile(BT=32, vec=0).as_dict() == {"BT": 32, "vec": 0}
    assert ExampleTile(BT=32) == ExampleTile.from_dict({"BT": 32})
    assert hash(ExampleTile(BT=32)) == hash(ExampleTile(BT=32))


@pytest.mark.parametrize("values, message", [
    ({"BT": 48}, r"ExampleTile\.BT must be a power of two, got 48"),
    ({"BT": 0}, r"ExampleTile\.BT must be positive, got 0"),
    ({"stages": -1}, r"ExampleTile\.stages must be positive, got -1"),
    ({"vec": 2}, r"ExampleTile\.vec must be one of \(0, 1\), got 2"),
    ({"BT": True}, r"ExampleTile\.BT must be an integer or None, got bool True"),
    ({"BT": 16.0}, r"ExampleTile\.BT must be an integer or None, got float 16\.0"),
    ({"BX": 16}, r"ExampleTile has no field 'BX'; its fields: BT, stages, vec"),
])
def test_bad_fields_are_config_errors_naming_the_field(values, message):
    with pytest.raises(ssmc.ConfigError, match=message):
        ExampleTile.from_dict(values)


def test_plan_reads_its_tile_by_type():
    assert tile_of(PLAN, ChunkedTile) == ChunkedTile()
    tuned = dataclasses.replace(PLAN, tile=ChunkedTile(BT=32, warps_out=8))
    assert tile_of(tuned, ChunkedTile).BT == 32
    assert tuned.tile_dict() == {"BT": 32, "warps_out": 8}
    with pytest.raises(ssmc.ConfigError, match=r"the plan's tile is a ChunkedTile; this "
                       r"lowering reads a QuadraticTile"):
        tile_of(tuned, QuadraticTile)


def test_config_apply_types_the_tile_by_backend_lowering():
    plan = Config.make("scan", {"BP": 16, "num_warps": 2}).apply(PLAN, "triton")
    assert plan.lowering == "scan" and plan.tile == ScanTile(BP=16, num_warps=2)
    with pytest.raises(ssmc.ConfigError, match=r"ScanTile has no field 'CS'"):
        Config.make("scan", {"CS": 16}).apply(PLAN, "triton")
    with pytest.raises(ssmc.ConfigError, match=r"backend 'tvm' reads no tile parameters for "
                       r"the 'scan' lowering"):
        Config.make("scan", {"BP": 16}).apply(PLAN, "tvm")
    # the TVM chunked lowering tunes its chunk size, which is a plan field, not a tile
    plan = Config.make("chunked", chunk_size=32).apply(PLAN, "tvm")
    assert plan.tile is None and plan.chunk_size == 32


def test_tile_changes_the_cache_key():
    tuned = dataclasses.replace(PLAN, tile=ChunkedTile(BT=32))
    assert tuned.cache_key("t") != PLAN.cache_key("t")
    assert tuned.cache_key("t") == dataclasses.replace(PLAN, tile=ChunkedTile(BT=32)).cache_key("t")
