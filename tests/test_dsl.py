"""The language: what a definition may contain, and the SpecError for everything it may not."""
import re

import pytest
import sympy as sp
import torch

import ssmc
from ssmc import dsl as S
from ssmc.errors import SpecError
from ssmc.ir import Direction, Y, symbol


def spec_error(fn, match):
    with pytest.raises(SpecError, match=match) as info:
        ssmc.ssm(fn)
    return str(info.value)


# -- what a valid definition produces -------------------------------------------------------

def test_mamba2_program_structure():
    @ssmc.ssm
    def mamba2(x: S.In["b t h p"], dt: S.In["b t h"], A: S.In["h"],
               B: S.In["b t g n"], C: S.In["b t g n"], D: S.In["h"], z: S.In["b t h p"]):
        dt = S.softplus(dt)
        y = S.recurrence(decay=S.exp(dt * A), key=B, value=x * dt, query=C)
        return (y + D * x) * S.silu(z)

    p = mamba2.program
    x, dt, A, B, C, D, z = (symbol(n) for n in ("x", "dt", "A", "B", "C", "D", "z"))
    sdt = ssmc.ir.Softplus(dt)
    assert p.name == "mamba2"
    assert [(i.name, i.axes) for i in p.inputs] == [
        ("x", ("b", "t", "h", "p")), ("dt", ("b", "t", "h")), ("A", ("h",)),
        ("B", ("b", "t", "g", "n")), ("C", ("b", "t", "g", "n")), ("D", ("h",)),
        ("z", ("b", "t", "h", "p"))]
    r = p.recurrence
    assert r.decay.expr == sp.exp(sdt * A) and r.decay.axes == ("b", "t", "h")
    assert r.key.expr == B and r.key.axes == ("b", "t", "g", "n")
    assert r.value.expr == x * sdt and r.value.axes == ("b", "t", "h", "p")
    assert r.query.expr == C
    assert r.directions == (Direction.FORWARD,)
    assert p.output.expr == (Y + D * x) * ssmc.ir.Silu(z)
    assert p.output.axes == ("b", "t", "h", "p")


def test_numbers_and_all_functions_are_elementwise():
    @ssmc.ssm
    def f(x: S.In["b t h p"], k: S.In["b t h n"], q: S.In["b t h n"], a: S.In["h"]):
        v = S.sqrt(S.abs(x)) + S.tanh(x) - S.sigmoid(x) / 2 + 3 * S.log(1 + x ** 2)
        y = S.recurrence(decay=S.clamp(a, 0.1, 0.9), key=k, value=v, query=q,
                         direction="reverse")
        return S.maximum(y, 0) + S.minimum(y, 1.5) - (-y)

    p = f.program
    assert p.recurrence.directions == (Direction.REVERSE,)
    a = symbol("a")
    assert p.recurrence.decay.expr == sp.Min(sp.Max(a, sp.Float(0.1)), sp.Float(0.9))
    assert p.recurrence.decay.axes == ("h",)


def test_groups_absorbed_into_heads():
    @ssmc.ssm
    def f(x: S.In["b t h p"], k: S.In["b t g n"], q: S.In["b t g n"]):
        return S.recurrence(key=k * 2, value=x, query=q)

    r = f.program.recurrence
    assert r.key.axes == ("b", "t", "g", "n") and r.query.axes == ("b", "t", "g", "n")


def test_group_and_head_operands_combine_over_heads():
    @ssmc.ssm
    def f(x: S.In["b t h p"], k: S.In["b t g n"], a: S.In["h"]):
        return S.recurrence(key=k * a, value=x, query=k)

    assert f.program.recurrence.key.axes == ("b", "t", "h", "n")


def test_decorator_with_name():
    @ssmc.ssm(name="renamed")
    def f(x: S.In["b t h p"], k: S.In["b t h n"]):
        return S.recurrence(key=k, value=x, query=k)

    assert f.name == "renamed" and f.program.name == "renamed"


# -- annotations ---------------------------------------------------------------------------

def test_unknown_axis_letter():
    def mamba2(x: S.In["b t h p"], B: S.In["b t g q"]):
        return S.recurrence(key=B, value=x, query=B)

    msg = spec_error(mamba2, "unknown axis")
    assert msg == ("mamba2: 'B' is annotated \"b t g q\"; unknown axis 'q' "
                   "(expected one of b k t h g n p)")


def test_repeated_axis():
    def f(x: S.In["b t t p"]):
        return x
    assert spec_error(f, "repeated") == "f: 'x' is annotated \"b t t p\"; an axis is repeated"


def test_heads_and_groups_together():
    def f(x: S.In["b t h g"]):
        return x
    assert "either heads 'h' or groups 'g', not both" in spec_error(f, "'x'")


def test_empty_annotation():
    def f(x: S.In[""]):
        return x
    assert spec_error(f, "no axes") == "f: 'x' is annotated \"\"; it has no axes"


def test_annotation_not_a_string():
    with pytest.raises(SpecError, match=r"In\[\.\.\.\] takes a string of axis letters.*got 3"):
        S.In[3]


def test_missing_annotation():
    def f(x, k: S.In["b t h n"]):
        return S.recurrence(key=k, value=x, query=k)
    assert spec_error(f, "annotation") == ("f: parameter 'x' needs an annotation S.In[\"...\"] "
                                           "naming its axes")


def test_wrong_annotation_type():
    def f(x: int, k: S.In["b t h n"]):
        return S.recurrence(key=k, value=x, query=k)
    spec_error(f, r"f: parameter 'x' needs an annotation S\.In")


@pytest.mark.parametrize("reserved", ["y", "initial_state", "return_final_state", "cu_seqlens"])
def test_reserved_names(reserved):
    ns = {"S": S}
    exec(f"def f({reserved}: S.In['b t h p'], k: S.In['b t h n']):\n"
         f"    return S.recurrence(key=k, value={reserved}, query=k)", ns)
    msg = spec_error(ns["f"], "reserved")
    assert msg.startswith(f"f: parameter name {reserved!r} is reserved (")


def test_var_positional_rejected():
    def f(*xs: S.In["b t h p"]):
        return xs
    spec_error(f, "parameter 'xs' must be a plain positional parameter")


def test_no_inputs():
    def f():
        return 1
    spec_error(f, "f: a definition needs at least one input")


# -- the recurrence's operands --------------------------------------------------------------

def test_key_without_n():
    def f(x: S.In["b t h p"], k: S.In["b t h"], q: S.In["b t h n"]):
        return S.recurrence(key=k, value=x, query=q)
    assert spec_error(f, "key") == ("f: key has axes 'b t h' without 'n'; the key of a "
                                    "recurrence must range over 'n'")


def test_query_without_n():
    def f(x: S.In["b t h p"], k: S.In["b t h n"], q: S.In["b t h"]):
        return S.recurrence(key=k, value=x, query=q)
    assert spec_error(f, "query") == ("f: query has axes 'b t h' without 'n'; the query of a "
                                      "recurrence must range over 'n'")


def test_value_without_p():
    def f(x: S.In["b t h"], k: S.In["b t h n"]):
        return S.recurrence(key=k, value=x, query=k)
    assert spec_error(f, "value") == ("f: value has axes 'b t h' without 'p'; the value of a "
                                      "recurrence must range over 'p'")


def test_key_with_p():
    def f(x: S.In["b t h p"], k: S.In["b t h n"]):
        return S.recurrence(key=k * x, value=x, query=k)
    assert spec_error(f, "key") == ("f: key has axes 'b t h n p' including 'p', which the key "
                                    "of a recurrence cannot carry")


def test_value_with_n():
    def f(x: S.In["b t h p"], k: S.In["b t h n"]):
        return S.recurrence(key=k, value=x * k, query=k)
    spec_error(f, "f: value has axes 'b t h n p' including 'n'")


def test_two_recurrences():
    def f(x: S.In["b t h p"], k: S.In["b t h n"]):
        S.recurrence(key=k, value=x, query=k)
        return S.recurrence(key=k, value=x, query=k)
    assert spec_error(f, "twice") == ("f: S.recurrence is called twice; a definition holds "
                                      "exactly one recurrence")


def test_operand_uses_own_output():
    def f(x: S.In["b t h p"], k: S.In["b t h n"]):
        y = S.recurrence(key=k, value=x, query=k)
        return S.recurrence(key=k, value=y, query=k)
    spec_error(f, "twice")  # caught as a second recurrence before anything else


def test_bad_direction():
    def f(x: S.In["b t h p"], k: S.In["b t h n"]):
        return S.recurrence(key=k, value=x, query=k, direction="both")
    assert spec_error(f, "direction") == ("f: direction='both' is not valid; valid values: "
                                          "forward, reverse, bidirectional, cross2d")


def test_missing_operand():
    def f(x: S.In["b t h p"], k: S.In["b t h n"]):
        return S.recurrence(key=k, value=x, query=None)
    spec_error(f, "f: S.recurrence needs query=")


# -- non-elementwise use of an input --------------------------------------------------------

def _with_value(transform):
    def f(x: S.In["b t h p"], k: S.In["b t h n"]):
        return S.recurrence(key=k, value=transform(x), query=k)
    return f


@pytest.mark.parametrize("what, transform, phrase", [
    ("indexing", lambda x: x[0], "is used with indexing, which is not elementwise"),
    ("slicing", lambda x: x[:, 1:], "is used with indexing, which is not elementwise"),
    ("matmul", lambda x: x @ x, "is used with a matrix product (@), which is not elementwise"),
    ("len", lambda x: x * len(x), "is used with len(), which is not elementwise"),
    ("bool", lambda x: x if x else -x, "is used with a truth test (if/and/or)"),
    ("compare", lambda x: x < 0, "is used with a comparison"),
    ("iterate", lambda x: sum(x), "is used with iteration"),
    ("floordiv", lambda x: x // 2, "is used with floor division"),
    ("modulo", lambda x: x % 2, "is used with modulo"),
], ids=lambda v: v if isinstance(v, str) and " " not in v else None)
def test_non_elementwise_use(what, transform, phrase):
    msg = spec_error(_with_value(transform), re.escape(phrase))
    assert msg.startswith("f: input 'x' ")
    assert "only use + - * / ** and S.* functions" in msg


def test_reduction_method():
    msg = spec_error(_with_value(lambda x: x.sum()), "no attribute 'sum'")
    assert msg.startswith("f: input 'x' has no attribute 'sum'; ")
    assert "reductions, reshapes and indexing are not" in msg


def test_non_elementwise_on_expression_names_it():
    msg = spec_error(_with_value(lambda x: (x * 2).mean(-1)), "no attribute 'mean'")
    assert msg.startswith("f: expression '2*x' has no attribute 'mean'")


@pytest.mark.parametrize("call, torch_name, s_name", [
    (lambda x: torch.exp(x), "torch.exp", "exp"),
    (lambda x: torch.log(x), "torch.log", "log"),
    (lambda x: torch.sigmoid(x), "torch.sigmoid", "sigmoid"),
    (lambda x: torch.special.expit(x), "torch.special.expit", "sigmoid"),
    (lambda x: torch.tanh(x), "torch.tanh", "tanh"),
    (lambda x: torch.sqrt(x), "torch.sqrt", "sqrt"),
    (lambda x: torch.abs(x), "torch.abs", "abs"),
    (lambda x: torch.maximum(x, x), "torch.maximum", "maximum"),
    (lambda x: torch.minimum(x, x), "torch.minimum", "minimum"),
    (lambda x: torch.clamp(x, min=0.0), "torch.clamp", "clamp"),
    (lambda x: torch.nn.functional.softplus(x), "torch.nn.functional.softplus", "softplus"),
    (lambda x: torch.nn.functional.silu(x), "torch.nn.functional.silu", "silu"),
], ids=lambda v: v if isinstance(v, str) and "." in v else None)
def test_torch_function_names_the_s_function(call, torch_name, s_name):
    """A torch function on a traced input is a SpecError naming the definition, the input and
    the S.* function that does the same, not a TypeError from inside torch."""
    msg = spec_error(_with_value(call), "was called on")
    assert msg == (f"f: {torch_name}() was called on input 'x', a traced expression; use "
                   f"ssmc.dsl.{s_name} (S.{s_name}) inside a definition")


def test_torch_function_on_an_expression_names_it():
    msg = spec_error(_with_value(lambda x: torch.exp(x * 2)), "was called on")
    assert msg.startswith("f: torch.exp() was called on expression '2*x', a traced expression; ")


def test_torch_function_without_an_s_equivalent():
    msg = spec_error(_with_value(lambda x: torch.cumsum(x, 1)), "was called on")
    assert msg.startswith("f: torch.cumsum() was called on input 'x', a traced expression; "
                          "torch functions do not apply inside a definition, which may only use "
                          "+ - * / ** and S.* functions (S.abs, S.clamp, S.exp, ")


def test_tensor_method_names_the_s_function():
    msg = spec_error(_with_value(lambda x: x.exp()), "no method 'exp'")
    assert msg == "f: input 'x' has no method 'exp'; use ssmc.dsl.exp (S.exp) inside a definition"


@pytest.mark.parametrize("combine", [lambda x, c: c * x, lambda x, c: x * c,
                                     lambda x, c: c + x], ids=["tensor*x", "x*tensor", "tensor+x"])
def test_tensor_operand(combine):
    """A tensor mixed into an expression, on either side, is reported as the bad operand."""
    spec_error(_with_value(lambda x: combine(x, torch.tensor(2.0))),
               r"^f: Tensor tensor\(2\.\) is not a valid operand; expressions combine inputs, "
               r"Python numbers and S\.\* functions$")


def test_expression_exponent():
    spec_error(_with_value(lambda x: x ** x), "only a Python number may be an exponent")


def test_foreign_operand():
    spec_error(_with_value(lambda x: x + "a"), "f: str 'a' is not a valid operand")


def test_bool_operand():
    spec_error(_with_value(lambda x: x + True), "f: a bool is not a valid operand")


def test_expression_outside_definition():
    with pytest.raises(SpecError, match="only be used inside a function decorated with "
                                        r"@ssmc\.ssm"):
        S.recurrence(key=1, value=1, query=1)


# -- the return value -----------------------------------------------------------------------

def test_no_recurrence():
    def f(x: S.In["b t h p"]):
        return x * 2
    assert spec_error(f, "never") == "f: the definition never calls S.recurrence"


def test_return_value_without_y():
    def f(x: S.In["b t h p"], k: S.In["b t h n"]):
        S.recurrence(key=k, value=x, query=k)
        return x
    assert spec_error(f, "return value") == ("f: the return value does not use the result of "
                                             "S.recurrence")


def test_return_none():
    def f(x: S.In["b t h p"], k: S.In["b t h n"]):
        S.recurrence(key=k, value=x, query=k)
    spec_error(f, "f: NoneType None is not a valid return value")


def test_output_with_n():
    def f(x: S.In["b t h p"], k: S.In["b t h n"]):
        return S.recurrence(key=k, value=x, query=k) * k
    assert spec_error(f, "state axis") == ("f: the return value has the state axis 'n' (axes "
                                           "'b t h n p'); the output is over b t h p")


def test_trace_state_restored_after_error():
    def bad(x: S.In["b t h p"], k: S.In["b t h n"]):
        return S.recurrence(key=k, value=x[0], query=k)

    with pytest.raises(SpecError):
        ssmc.ssm(bad)
    with pytest.raises(SpecError, match="only be used inside"):
        S.recurrence(key=1, value=1, query=1)


def test_order_axis_needs_a_grid_recurrence():
    def f(x: S.In["b t h p"], B: S.In["b k t n"], C: S.In["b t n"]):
        return S.recurrence(key=B, value=x, query=C, direction="bidirectional")
    with pytest.raises(ssmc.SpecError, match="key has the order axis 'k', which only a "
                       "recurrence with direction='cross2d' has"):
        ssmc.ssm(f)


def test_epilogue_may_not_read_a_per_order_input():
    def f(x: S.In["b t h p"], B: S.In["b t n"], C: S.In["b t n"], D: S.In["k h"]):
        return S.recurrence(key=B, value=x, query=C, direction="cross2d") + D * x
    with pytest.raises(ssmc.SpecError, match="the return value reads an input with the order "
                       "axis 'k'"):
        ssmc.ssm(f)
