"""IR nodes: frozen and comparable, the structural key/hash, axis helpers."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sympy as sp

import ssmc
from ssmc import dsl as S
from ssmc.ir import (AXES, AXIS_SIZES, Direction, Elementwise, Input, Program, Recurrence,
                     canonical_axes, symbol)

REPO = Path(__file__).resolve().parents[2]


def mamba2_like(names=("x", "dt", "A", "B", "C"), name="m"):
    """The same SSM with its inputs called `names`."""
    x, dt, A, B, C = names
    ns = {"S": S}
    exec(f"def {name}({x}: S.In['b t h p'], {dt}: S.In['b t h'], {A}: S.In['h'],\n"
         f"        {B}: S.In['b t g n'], {C}: S.In['b t g n']):\n"
         f"    d = S.softplus({dt})\n"
         f"    return S.recurrence(decay=S.exp(d * {A}), key={B}, value={x} * d, query={C})\n",
         ns)
    return ssmc.ssm(ns[name]).program


def test_nodes_are_frozen_and_hashable():
    p = mamba2_like()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.name = "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.recurrence.key = None
    assert hash(p) == hash(mamba2_like())
    assert p == mamba2_like()
    assert {p, mamba2_like()} == {p}


def test_replace_returns_new_program():
    p = mamba2_like()
    q = p.replace(name="other")
    assert q.name == "other" and p.name == "m" and q != p
    assert q.recurrence is p.recurrence


def test_input_lookup_and_shapes():
    p = mamba2_like()
    assert p.input_names == ("x", "dt", "A", "B", "C")
    assert p.input("B").axes == ("b", "t", "g", "n")
    assert p.input("B").shape == tuple(AXIS_SIZES[a] for a in "btgn")
    assert p.input("dt").symbol == symbol("dt")
    with pytest.raises(KeyError):
        p.input("nope")
    assert p.axes_present() == set(AXES) - {"k"}


@pytest.mark.parametrize("axes, expected", [
    ("pnhtb", ("b", "t", "h", "n", "p")),
    ("gn", ("g", "n")),
    ("gh", ("h",)),          # g is absorbed into h when both occur
    ("bgthp", ("b", "t", "h", "p")),
    ("", ()),
])
def test_canonical_axes(axes, expected):
    assert canonical_axes(axes) == expected


def test_direction_names():
    base = mamba2_like().recurrence
    assert base.direction_name == "forward"
    both = dataclasses.replace(base, directions=(Direction.FORWARD, Direction.REVERSE))
    assert both.direction_name == "bidirectional"
    odd = dataclasses.replace(base, directions=(Direction.REVERSE, Direction.FORWARD))
    assert odd.direction_name == "reverse+forward"


# -- structural key and hash ----------------------------------------------------------------

def test_structural_hash_invariant_to_renaming_inputs_and_definition():
    a = mamba2_like(("x", "dt", "A", "B", "C"), name="m")
    b = mamba2_like(("u", "delta", "a_log", "kk", "qq"), name="other_name")
    assert a != b  # the programs differ (names), the computation does not
    assert a.structural_key() == b.structural_key()
    assert a.structural_hash() == b.structural_hash()
    assert len(a.structural_hash()) == 64


def test_structural_hash_renaming_that_reorders_sympy_args():
    def plain(x, dt, A):
        ns = {"S": S}
        exec(f"def f({x}: S.In['b t h p'], {dt}: S.In['b t h'], {A}: S.In['h'],\n"
             f"      k: S.In['b t h n']):\n"
             f"    return S.recurrence(decay=S.exp({dt} * {A}), key=k, value={x}, query=k)\n",
             ns)
        return ssmc.ssm(ns["f"]).program

    a, b = plain("x", "dt", "A"), plain("x", "a", "z")
    # the product's factors are stored in opposite orders before renaming
    assert [s.name for s in a.recurrence.decay.expr.args[0].args] == ["A", "dt"]
    assert [s.name for s in b.recurrence.decay.expr.args[0].args] == ["a", "z"]
    assert a.structural_hash() == b.structural_hash()


def _variants():
    def linear(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"]):
        return S.recurrence(key=k, value=v, query=q)

    def linear_rev(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"]):
        return S.recurrence(key=k, value=v, query=q, direction="reverse")

    def linear_bi(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"]):
        return S.recurrence(key=k, value=v, query=q, direction="bidirectional")

    def swapped(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"]):
        return S.recurrence(key=q, value=v, query=k)

    def scaled(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"]):
        return S.recurrence(key=k, value=v, query=q * 0.5)

    def gated(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"]):
        return S.recurrence(key=k, value=v, query=q) * 2

    def grouped(q: S.In["b t g n"], k: S.In["b t g n"], v: S.In["b t h p"]):
        return S.recurrence(key=k, value=v, query=q)

    def decayed(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"]):
        return S.recurrence(decay=S.exp(-S.abs(k)), key=k, value=v, query=q)

    return [ssmc.ssm(f).program for f in (linear, linear_rev, linear_bi, swapped, scaled,
                                          gated, grouped, decayed)]


def test_structural_hash_differs_between_programs():
    programs = _variants() + [mamba2_like()]
    hashes = [p.structural_hash() for p in programs]
    assert len(set(hashes)) == len(hashes)


def test_structural_key_ignores_pass_results():
    p = mamba2_like()
    bare = p.replace(decay_kind=None, log_decay=None, analyses=())
    assert bare.structural_key() == p.structural_key()


_HASH_SCRIPT = """
import ssmc.ops, sys
sys.path.insert(0, {tests!r})
from ir.test_nodes import mamba2_like, _variants
progs = [mamba2_like(), ssmc.ops.mamba2.program] + _variants()
print(",".join(p.structural_hash() for p in progs))
"""


def _hashes_in_subprocess(seed: str) -> list[str]:
    env = dict(os.environ, PYTHONHASHSEED=seed,
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _HASH_SCRIPT.format(tests=str(REPO / "tests"))],
                         env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(",")


def test_structural_hash_stable_across_processes():
    import ssmc.ops
    here = [p.structural_hash() for p in [mamba2_like(), ssmc.ops.mamba2.program] + _variants()]
    first, second = _hashes_in_subprocess("1"), _hashes_in_subprocess("987654")
    assert first == second == here


def test_elementwise_inputs():
    e = Elementwise(symbol("b_") * symbol("a_") + 1, ("h",))
    assert e.inputs() == ("a_", "b_")


def test_manual_program_equals_traced():
    def f(k: S.In["b t h n"], v: S.In["b t h p"]):
        return S.recurrence(key=k, value=v, query=k)

    k, v = symbol("k"), symbol("v")
    kk = Elementwise(k, ("b", "t", "h", "n"))
    manual = Program("f", (Input("k", ("b", "t", "h", "n")), Input("v", ("b", "t", "h", "p"))),
                     Recurrence(key=kk, value=Elementwise(v, ("b", "t", "h", "p")), query=kk,
                                decay=None),
                     Elementwise(ssmc.ir.Y, ("b", "t", "h", "p")))
    traced = ssmc.ssm(f).program
    assert traced.replace(decay_kind=None, log_decay=None, analyses=()) == manual
    assert traced.structural_hash() == manual.structural_hash()
    assert isinstance(manual.output.expr, sp.Symbol)
