"""The printer's text form, and the parser: parse_program(print_program(p)) == p."""
import itertools
import math
import sys

import pytest

import ssmc
import ssmc.ops
from ssmc import dsl as S
from ssmc.api import Definition
from ssmc.dsl import trace
from ssmc.ir import parse_program, print_program

# build options of every built-in module; a new module in ssmc.ops must be added here
_BOOLS = (False, True)
BUILTIN_VARIANTS = {
    "ssmc.ops.ssd": [
        dict(has_D=d, D_per_channel=dp, has_z=z, has_dt_bias=bias, dt_softplus=sp)
        for d, dp, z, bias, sp in itertools.product(_BOOLS, repeat=5) if d or not dp
    ] + [dict(dt_softplus=True, dt_min=0.001, dt_max=0.1), dict(dt_min=1e-4),
         dict(has_dt_bias=True, dt_max=3.0)],
    "ssmc.ops.selective_scan": [
        dict(has_D=d, has_z=z, has_delta_bias=bias, delta_softplus=sp)
        for d, z, bias, sp in itertools.product(_BOOLS, repeat=4)],
    "ssmc.ops.retention": [dict(scale=s) for s in (1.0, 3 ** -0.5, 64 ** -0.5, 1e-7)],
    "ssmc.ops.gla": [dict(scale=s) for s in (1.0, 3 ** -0.5, 96 ** -0.5)],
    "ssmc.ops.linear_attention": [dict(scale=s) for s in (1.0, 7 ** -0.5, 2.5e10)],
}


def _builtin_modules():
    mods = set()
    for name in ssmc.ops.__all__:
        obj = getattr(ssmc.ops, name)
        mods.add(obj.fn.__module__ if isinstance(obj, Definition) else obj.__module__)
    return mods


def test_every_builtin_module_has_variants():
    assert _builtin_modules() == set(BUILTIN_VARIANTS)


def _builtin_cases():
    for mod, variants in BUILTIN_VARIANTS.items():
        for options in variants:
            label = ",".join(f"{k}={v}" for k, v in options.items() if v is not False)
            yield pytest.param(mod, options, id=f"{mod.rsplit('.', 1)[1]}[{label}]")


def assert_round_trip(program):
    text = print_program(program)
    back = parse_program(text)
    assert back == program, f"round trip changed the program:\n{text}\n---\n{print_program(back)}"
    assert print_program(back) == text
    assert back.structural_hash() == program.structural_hash()


@pytest.mark.parametrize("mod, options", list(_builtin_cases()))
def test_round_trip_builtins(mod, options):
    definition = sys.modules[mod].build(**options)
    assert_round_trip(definition.program)              # analysed (decay kind, log decay)
    assert_round_trip(trace(definition.fn, definition.name))  # straight from the DSL


@pytest.mark.parametrize("name", [n for n in ssmc.ops.__all__
                                  if isinstance(getattr(ssmc.ops, n), Definition)])
def test_round_trip_builtin_definitions(name):
    assert_round_trip(getattr(ssmc.ops, name).program)


# -- custom definitions ---------------------------------------------------------------------

def bidirectional_gla(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"],
                      g: S.In["b t h n"]):
    return S.recurrence(decay=S.sigmoid(g) ** 0.5, key=k, value=v, query=q,
                        direction="bidirectional")


def reverse_constants(x: S.In["b t h p"], k: S.In["b t g n"], a: S.In["h n"]):
    y = S.recurrence(decay=S.exp(-S.abs(a) * 1e-3), key=k * (1 / 3), value=-x * 2.5e-8,
                     query=S.tanh(k), direction="reverse")
    return S.clamp(y, -1.5, 6) + S.maximum(x, 0) * S.minimum(x, 1e12) - S.sqrt(S.abs(x)) ** 3


def s6_full(u: S.In["b t h p"], d: S.In["b t h"], A: S.In["h p n"], B: S.In["b t n"]):
    return S.recurrence(decay=S.exp(S.softplus(d) * A), key=B, value=u * S.log(1 + d ** 2),
                        query=B) / 7


def no_decay_epilogue(x: S.In["b t h p"], k: S.In["b t h n"], z: S.In["b t h p"]):
    return S.silu(S.recurrence(key=k, value=x, query=k)) * S.sigmoid(z) - 1


@pytest.mark.parametrize("fn", [bidirectional_gla, reverse_constants, s6_full, no_decay_epilogue],
                         ids=lambda f: f.__name__)
def test_round_trip_custom(fn):
    assert_round_trip(ssmc.ssm(fn).program)
    assert_round_trip(trace(fn))


def test_round_trip_keeps_full_float_precision():
    def f(x: S.In["b t h p"], k: S.In["b t h n"]):
        return S.recurrence(key=k, value=x, query=k * (1 / math.sqrt(3)))

    p = ssmc.ssm(f).program
    text = print_program(p)
    assert "0.5773502691896258*k" in text
    q = parse_program(text)
    assert q.recurrence.query.expr == p.recurrence.query.expr
    assert float(q.recurrence.query.expr.args[0]) == 1 / math.sqrt(3)


# -- the text form (Before/Expected) --------------------------------------------------------

MAMBA2_TEXT = """\
program mamba2(x: [b t h p], dt: [b t h], A: [h], B: [b t g n], C: [b t g n], D: [h], z: [b t h p])
  decay[b t h] = exp(A*Softplus(dt))
  key[b t g n] = B
  value[b t h p] = x*Softplus(dt)
  query[b t g n] = C
  y[b t h p] = recurrence(decay, key, value, query, direction=forward, transition=diagonal)
  out[b t h p] = (D*x + y)*Silu(z)
  # decay_kind = scalar
  # log_decay[b t h] = A*Softplus(dt)
  # analyses = classify_decay, log_space_decay, derive_backward"""


def test_print_mamba2():
    @ssmc.ssm
    def mamba2(x: S.In["b t h p"], dt: S.In["b t h"], A: S.In["h"],
               B: S.In["b t g n"], C: S.In["b t g n"], D: S.In["h"], z: S.In["b t h p"]):
        dt = S.softplus(dt)
        y = S.recurrence(decay=S.exp(dt * A), key=B, value=x * dt, query=C)
        return (y + D * x) * S.silu(z)

    assert print_program(mamba2.program) == MAMBA2_TEXT
    assert parse_program(MAMBA2_TEXT) == mamba2.program


def test_print_without_decay_or_analyses():
    def la(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"]):
        return S.recurrence(key=k, value=v, query=q, direction="reverse")

    assert print_program(trace(la)) == (
        "program la(q: [b t h n], k: [b t h n], v: [b t h p])\n"
        "  key[b t h n] = k\n"
        "  value[b t h p] = v\n"
        "  query[b t h n] = q\n"
        "  y[b t h p] = recurrence(key, value, query, direction=reverse, transition=diagonal)\n"
        "  out[b t h p] = y")


@pytest.mark.parametrize("text, match", [
    ("prog x()", "not a program header"),
    ("program f(k: [b t h n])\n  key[b t h n] = k\n  what is this", "cannot parse line"),
])
def test_parse_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_program(text)
