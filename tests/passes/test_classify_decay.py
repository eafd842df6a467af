"""classify_decay: the decay's axes decide its kind (DESIGN.md's table) and the legal lowerings."""
import importlib

import pytest

import ssmc
import ssmc.ops
from ssmc import dsl as S
from ssmc.dsl import trace
from ssmc.ir import DecayKind
from ssmc.lowerings import legal_lowerings
from ssmc.passes import PassContext, decay_kind_of, run_passes


def run_classify(fn):
    return run_passes(trace(fn), ["classify_decay"], PassContext(verify=True))


def expected(fn, kind):
    return trace(fn).replace(decay_kind=kind, analyses=("classify_decay",))


# Before: definitions whose decay has the axes in the name. Expected: the same program with
# decay_kind set.

def no_decay(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"]):
    return S.recurrence(key=k, value=v, query=q)


def per_head(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"], gamma: S.In["h"]):
    return S.recurrence(decay=gamma, key=k, value=v, query=q)


def per_head_key(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"], a: S.In["h n"]):
    return S.recurrence(decay=S.exp(-S.exp(a)), key=k, value=v, query=q)


def constant(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"]):
    return S.recurrence(decay=0.9, key=k, value=v, query=q)


def scalar(x: S.In["b t h p"], dt: S.In["b t h"], A: S.In["h"], B: S.In["b t g n"],
           C: S.In["b t g n"]):
    return S.recurrence(decay=S.exp(S.softplus(dt) * A), key=B, value=x, query=C)


def scalar_group(x: S.In["b t h p"], a: S.In["b t g"], B: S.In["b t g n"]):
    return S.recurrence(decay=S.sigmoid(a), key=B, value=x, query=B)


def scalar_no_batch(x: S.In["b t h p"], a: S.In["t h"], B: S.In["b t h n"]):
    return S.recurrence(decay=S.sigmoid(a), key=B, value=x, query=B)


def diagonal(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"], g: S.In["b t h n"]):
    return S.recurrence(decay=S.exp(g), key=k, value=v, query=q)


def diagonal_from_product(x: S.In["b t h p"], dt: S.In["b t h"], A: S.In["h n"],
                          B: S.In["b t n"]):
    return S.recurrence(decay=S.exp(dt * A), key=B, value=x, query=B)


def full(u: S.In["b t h p"], dt: S.In["b t h"], A: S.In["h p n"], B: S.In["b t n"]):
    return S.recurrence(decay=S.exp(dt * A), key=B, value=u, query=B)


def full_without_n(x: S.In["b t h p"], k: S.In["b t h n"]):
    return S.recurrence(decay=S.sigmoid(x), key=k, value=x, query=k)


def full_time_invariant(x: S.In["b t h p"], k: S.In["b t h n"], a: S.In["h p"]):
    return S.recurrence(decay=a, key=k, value=x, query=k)


CASES = [
    (no_decay, DecayKind.NONE),
    (per_head, DecayKind.TIME_INVARIANT),
    (per_head_key, DecayKind.TIME_INVARIANT),
    (constant, DecayKind.TIME_INVARIANT),
    (scalar, DecayKind.SCALAR),
    (scalar_group, DecayKind.SCALAR),
    (scalar_no_batch, DecayKind.SCALAR),
    (diagonal, DecayKind.DIAGONAL),
    (diagonal_from_product, DecayKind.DIAGONAL),
    (full, DecayKind.FULL),
    (full_without_n, DecayKind.FULL),
    (full_time_invariant, DecayKind.FULL),
]


@pytest.mark.parametrize("before, kind", CASES, ids=[f.__name__ for f, _ in CASES])
def test_classify_decay(before, kind):
    after = run_classify(before)
    assert after == expected(before, kind)
    assert decay_kind_of(trace(before)) is kind


def test_all_five_kinds_covered():
    assert {kind for _, kind in CASES} == set(DecayKind)


@pytest.mark.parametrize("kind, lowerings", [
    (DecayKind.NONE, ("scan", "chunked", "quadratic")),
    (DecayKind.TIME_INVARIANT, ("scan", "chunked", "quadratic")),
    (DecayKind.SCALAR, ("scan", "chunked", "quadratic")),
    (DecayKind.DIAGONAL, ("scan", "chunked", "quadratic")),
    (DecayKind.FULL, ("scan",)),
])
def test_legal_lowerings(kind, lowerings):
    fn = next(f for f, k in CASES if k is kind)
    assert legal_lowerings(run_classify(fn)) == lowerings
    assert legal_lowerings(trace(fn)) == lowerings  # computed on demand before the pass


def test_mamba2_is_scalar():
    assert ssmc.ops.mamba2.program.decay_kind is DecayKind.SCALAR


@pytest.mark.parametrize("module, kind", [
    ("ssd", DecayKind.SCALAR),
    ("selective_scan", DecayKind.DIAGONAL),  # A is (h, n) and p == 1 in the definition
    ("retention", DecayKind.TIME_INVARIANT),
    ("gla", DecayKind.DIAGONAL),
    ("linear_attention", DecayKind.NONE),
])
def test_builtin_kinds(module, kind):
    build = importlib.import_module(f"ssmc.ops.{module}").build
    definition = build() if module in ("ssd", "selective_scan") else build(scale=1.0)
    assert definition.program.decay_kind is kind


def test_definition_runs_pipeline():
    assert ssmc.ssm(full).program.decay_kind is DecayKind.FULL
    assert ssmc.ssm(full).program.analyses[0] == "classify_decay"
