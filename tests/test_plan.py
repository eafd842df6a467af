"""The Plan: a frozen description of one kernel specialisation, and its cache key."""
import dataclasses
import re

import pytest

import ssmc
import ssmc.ops
from ssmc import dsl as S
import ssmc.plan as plan_module
from ssmc.backends.triton.tiles import ChunkedTile
from ssmc.plan import Plan, sources_digest


def define(value_name="v", scale=1.0, name="la"):
    ns = {"S": S, "scale": scale}
    exec(f"def {name}(q: S.In['b t h n'], k: S.In['b t h n'], {value_name}: S.In['b t h p']):\n"
         f"    return S.recurrence(key=k, value={value_name}, query=q * scale)", ns)
    return ssmc.ssm(ns[name]).program


BASE = Plan(program=ssmc.ops.mamba2.program, lowering="chunked", dtype="bfloat16")


def test_frozen_and_hashable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        BASE.lowering = "scan"
    assert hash(BASE) == hash(dataclasses.replace(BASE))
    assert {BASE, dataclasses.replace(BASE)} == {BASE}


def test_defaults():
    assert (BASE.has_initial_state, BASE.return_final_state, BASE.varlen) == (False,) * 3
    assert BASE.chunk_size == 64 and BASE.tile is None and BASE.tile_dict() == {}


def test_tile_dict():
    plan = dataclasses.replace(BASE, tile=ChunkedTile(BT=64, BN_state=32))
    assert plan.tile_dict() == {"BT": 64, "BN_state": 32}


@pytest.mark.parametrize("changes, expected", [
    ({}, "chunked_bf16"),
    (dict(lowering="scan", dtype="float32"), "scan_fp32"),
    (dict(dtype="float16", has_initial_state=True), "chunked_fp16_h0"),
    (dict(dtype="float64", return_final_state=True, varlen=True), "chunked_fp64_hT_varlen"),
    (dict(lowering="quadratic", has_initial_state=True, return_final_state=True),
     "quadratic_bf16_h0_hT"),
])
def test_describe(changes, expected):
    assert dataclasses.replace(BASE, **changes).describe() == expected


def test_cache_key_readable_prefix_and_hash():
    key = BASE.cache_key("triton-3.9")
    assert re.fullmatch(r"ssd_chunked_bf16_[0-9a-f]{8}", key), key
    assert key == BASE.cache_key("triton-3.9")


@pytest.mark.parametrize("changes", [
    dict(lowering="scan"), dict(dtype="float16"), dict(has_initial_state=True),
    dict(return_final_state=True), dict(varlen=True), dict(chunk_size=128),
    dict(tile=ChunkedTile(BT=32)),
])
def test_cache_key_covers_every_plan_field(changes):
    other = dataclasses.replace(BASE, **changes)
    assert other.cache_key("tag")[-8:] != BASE.cache_key("tag")[-8:]


def test_cache_key_covers_backend_tag_and_program():
    assert BASE.cache_key("a")[-8:] != BASE.cache_key("b")[-8:]
    p1 = Plan(program=define(scale=1.0), lowering="scan", dtype="float32")
    p2 = Plan(program=define(scale=0.5), lowering="scan", dtype="float32")
    assert p1.cache_key() != p2.cache_key()


def test_cache_key_covers_ssmc_code(monkeypatch):
    key = BASE.cache_key("tag")
    monkeypatch.setattr(plan_module, "code_fingerprint", lambda: "other code")
    assert BASE.cache_key("tag")[-8:] != key[-8:]


def test_sources_digest_follows_names_and_contents(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "render.py").write_text("X = 1\n")
    (tmp_path / "notes.txt").write_text("not code")
    first = sources_digest(tmp_path)
    (tmp_path / "notes.txt").write_text("still not code")
    assert sources_digest(tmp_path) == first
    (tmp_path / "sub" / "render.py").write_text("X = 2\n")
    second = sources_digest(tmp_path)
    assert second != first
    (tmp_path / "sub" / "render.py").rename(tmp_path / "sub" / "lower.py")
    assert sources_digest(tmp_path) != second


def test_cache_key_invariant_to_input_names():
    p1 = Plan(program=define(value_name="v"), lowering="scan", dtype="float32")
    p2 = Plan(program=define(value_name="values"), lowering="scan", dtype="float32")
    assert p1.cache_key() == p2.cache_key()


def test_cache_key_includes_version(monkeypatch):
    import ssmc.plan
    before = BASE.cache_key()
    monkeypatch.setattr(ssmc.plan, "__version__", "999.0")
    assert BASE.cache_key() != before


def test_compiled_op_records_last_plan():
    import torch
    op = ssmc.compile(ssmc.ssm(linear_attention_def), backend="reference", lowering="scan")
    assert op.last_plan is None
    q = torch.randn(1, 5, 2, 3)
    v = torch.randn(1, 5, 2, 4, dtype=torch.float64)
    y, state = op(q, q, v, return_final_state=True)
    plan = op.last_plan
    assert (plan.lowering, plan.dtype, plan.return_final_state) == ("scan", "float64", True)
    assert plan.program is op.program
    assert y.dtype == torch.float64 and state.shape == (1, 2, 3, 4)


def linear_attention_def(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"]):
    return S.recurrence(key=k, value=v, query=q)
