"""The IR verifier: each invariant, broken on purpose, raises a SpecError that names it."""
import dataclasses

import pytest

import ssmc
from ssmc import dsl as S
from ssmc.errors import SpecError
from ssmc.ir import Elementwise, Input, Y, symbol, verify


@ssmc.ssm
def gla(q: S.In["b t h n"], k: S.In["b t g n"], v: S.In["b t h p"], g: S.In["b t h n"]):
    return S.recurrence(decay=S.exp(g), key=k, value=v, query=q) * 2


GOOD = gla.program
k, v, q, g = (symbol(n) for n in "kvqg")


def with_recurrence(**changes):
    return GOOD.replace(recurrence=dataclasses.replace(GOOD.recurrence, **changes))


def test_valid_program_returned_unchanged():
    assert verify(GOOD) is GOOD


BROKEN = [
    (GOOD.replace(inputs=GOOD.inputs + (Input("q", ("b", "t", "h", "n")),)),
     "gla: input 'q' is declared twice"),
    (GOOD.replace(inputs=GOOD.inputs + (Input("cu_seqlens", ("b",)),)),
     "gla: input name 'cu_seqlens' is reserved"),
    (GOOD.replace(inputs=GOOD.inputs + (Input("w", ("b", "q")),)),
     "gla: 'w' has unknown axis 'q'"),
    (GOOD.replace(inputs=GOOD.inputs + (Input("w", ("b", "b")),)),
     "gla: 'w' repeats an axis in 'b b'"),
    (GOOD.replace(inputs=GOOD.inputs + (Input("w", ("h", "g")),)),
     "gla: 'w' has both 'h' and 'g' axes"),
    (with_recurrence(key=Elementwise(symbol("nope"), ("b", "t", "g", "n"))),
     "gla: key uses 'nope', which is not an input"),
    (with_recurrence(value=Elementwise(Y, ("b", "t", "h", "p"))),
     "gla: value uses the recurrence's own output"),
    (with_recurrence(key=Elementwise(k, ("b", "t", "h", "n"))),
     "gla: key is recorded over axes ('b', 't', 'h', 'n') but its operands range over "
     "('b', 't', 'g', 'n')"),
    (with_recurrence(key=Elementwise(k * v, ("b", "t", "h", "n", "p"))),
     "gla: key has axis 'p', which it cannot carry (allowed: b k t h g n)"),
    (with_recurrence(value=Elementwise(v * q, ("b", "t", "h", "n", "p"))),
     "gla: value has axis 'n', which it cannot carry (allowed: b k t h g p)"),
    (GOOD.replace(output=Elementwise(Y * q, ("b", "t", "h", "n", "p"))),
     "gla: output has axis 'n', which it cannot carry"),
    (with_recurrence(key=Elementwise(g * 0 + 1, ())),
     "gla: key has no 'n' axis (axes: none)"),
    (with_recurrence(query=Elementwise(symbol("g") * 0 + 1, ())),
     "gla: query has no 'n' axis (axes: none)"),
    (GOOD.replace(inputs=GOOD.inputs + (Input("a", ("b", "t", "h")),)).replace(
        recurrence=dataclasses.replace(GOOD.recurrence,
                                       value=Elementwise(symbol("a"), ("b", "t", "h")))),
     "gla: value has no 'p' axis (axes: b t h)"),
    (GOOD.replace(output=Elementwise(v * 2, ("b", "t", "h", "p"))),
     "gla: the output does not use the recurrence's result"),
    (with_recurrence(directions=()), "gla: the recurrence has no direction"),
    (GOOD.replace(log_decay=Elementwise(Y, ("b", "t", "h", "p"))),
     "gla: log_decay uses the recurrence's own output"),
]


@pytest.mark.parametrize("program, message", BROKEN, ids=[m.split(": ", 1)[1] for _, m in BROKEN])
def test_broken_invariant(program, message):
    with pytest.raises(SpecError) as info:
        verify(program)
    assert str(info.value).startswith(message)


def test_log_decay_axes_must_match_decay():
    def f(k: S.In["b t h n"], v: S.In["b t h p"], a: S.In["b t h"]):
        return S.recurrence(decay=S.exp(a), key=k, value=v, query=k)

    p = ssmc.ssm(f).program
    bad = p.replace(log_decay=Elementwise(symbol("k"), ("b", "t", "h", "n")))
    with pytest.raises(SpecError, match=r"f: log_decay axes \('b', 't', 'h', 'n'\) differ from "
                                        r"decay axes \('b', 't', 'h'\)"):
        verify(bad)


def test_verifier_runs_after_each_pass(monkeypatch):
    """A pass that breaks the IR is caught by the runner, naming the invariant."""
    from ssmc.passes import PassContext, register_pass, run_passes

    @register_pass("test_break_key")
    def break_key(program, ctx):
        return program.replace(recurrence=dataclasses.replace(
            program.recurrence, key=Elementwise(symbol("missing"), ("b", "t", "h", "n"))))

    with pytest.raises(SpecError, match="key uses 'missing', which is not an input"):
        run_passes(GOOD, ["test_break_key"], PassContext(verify=True))
    # with verification off the broken program comes back (the verifier is what catches it)
    broken = run_passes(GOOD, ["test_break_key"], PassContext(verify=False))
    assert broken.analyses[-1] == "test_break_key"
