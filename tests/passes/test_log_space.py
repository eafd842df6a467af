"""log_space_decay: kernels get log(decay); exp(u) becomes u symbolically."""
import pytest
import sympy as sp

from ssmc import dsl as S
from ssmc.dsl import trace
from ssmc.ir import Elementwise, Silu, Sigmoid, Softplus, symbol
from ssmc.passes import PassContext, log_of, run_passes

a, b, u = symbol("a"), symbol("b"), symbol("u")


@pytest.mark.parametrize("decay, expected", [
    (sp.exp(u), u),
    (sp.exp(-u * a), -u * a),
    (sp.exp(Softplus(u) * a), Softplus(u) * a),
    (sp.Mul(sp.exp(a), sp.exp(b), evaluate=False), a + b),          # product of exps
    (sp.exp(a) * sp.exp(Silu(b)), a + Silu(b)),
    (sp.Float(0.5) * sp.exp(a), a + sp.log(sp.Float(0.5))),         # positive constant factor
    (sp.Pow(sp.exp(a), b, evaluate=False), a * b),                  # exp(a) ** b
    (sp.Pow(sp.exp(a), 3, evaluate=False), 3 * a),
    (Sigmoid(a), -Softplus(-a)),                                    # exact: no underflow
    (Sigmoid(a) * sp.exp(b), b - Softplus(-a)),
    (a, sp.log(sp.Abs(a))),                                         # other decays: log|decay|
    (a * b, sp.log(sp.Abs(a * b))),
    (b * sp.exp(a), a + sp.log(sp.Abs(b))),                         # exact factors kept apart
    (b * Sigmoid(a), sp.log(sp.Abs(b)) - Softplus(-a)),
    (-sp.exp(a), a),                                                # |-1| = 1: sign apart
    (Softplus(a), sp.log(Softplus(a))),                             # positive, may underflow
    (sp.Float(0.9), sp.log(sp.Float(0.9))),
], ids=lambda v: sp.sstr(v))
def test_log_of(decay, expected):
    assert log_of(decay) == expected


# Before/Expected through the pass runner

def run_log_space(fn):
    return run_passes(trace(fn), ["classify_decay", "log_space_decay"], PassContext(verify=True))


def test_mamba2_exp_removed():
    def before(x: S.In["b t h p"], dt: S.In["b t h"], A: S.In["h"], B: S.In["b t g n"]):
        return S.recurrence(decay=S.exp(S.softplus(dt) * A), key=B, value=x, query=B)

    after = run_log_space(before)
    dt, A = symbol("dt"), symbol("A")
    expected_log = Elementwise(Softplus(dt) * A, ("b", "t", "h"))
    assert after.log_decay == expected_log
    assert after == run_passes(trace(before), ["classify_decay"]).replace(
        log_decay=expected_log, analyses=("classify_decay", "log_space_decay"))
    assert not after.log_decay.expr.has(sp.exp, sp.log)
    # the decay itself is kept: the references and the scan use it as written
    assert after.recurrence.decay == trace(before).recurrence.decay


def test_product_of_exps_becomes_sum():
    def before(x: S.In["b t h p"], g: S.In["b t h n"], k: S.In["b t h n"], c: S.In["h"]):
        return S.recurrence(decay=S.exp(g) * S.exp(-c), key=k, value=x, query=k)

    after = run_log_space(before)
    assert after.log_decay == Elementwise(symbol("g") - symbol("c"), ("b", "t", "h", "n"))


def test_other_decay_gets_log():
    def before(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"], gamma: S.In["h"]):
        return S.recurrence(decay=gamma, key=k, value=v, query=q)

    after = run_log_space(before)
    assert after.log_decay == Elementwise(sp.log(sp.Abs(symbol("gamma"))), ("h",))
    assert after.decay_signed and not after.log_decay_exact and not after.decay_log_safe


def test_sigmoid_decay_gets_log():
    def before(x: S.In["b t h p"], k: S.In["b t h n"], g: S.In["b t h n"]):
        return S.recurrence(decay=S.sigmoid(g), key=k, value=x, query=k)

    after = run_log_space(before)
    assert after.log_decay == Elementwise(-Softplus(-symbol("g")), ("b", "t", "h", "n"))
    assert not after.decay_signed and after.log_decay_exact and after.decay_log_safe


@pytest.mark.parametrize("decay, signed, exact", [
    (lambda a, w: S.exp(a), False, True),
    (lambda a, w: S.sigmoid(a) * 0.5, False, True),
    (lambda a, w: -S.exp(a), True, True),                 # negative: sign carried apart
    (lambda a, w: S.sigmoid(a) * w, True, False),         # w may be 0 or negative
    (lambda a, w: S.softplus(a), False, False),           # positive, but log may be -inf
    (lambda a, w: a, True, False),
], ids=["exp", "sigmoid_const", "neg_exp", "sigmoid_w", "softplus", "input"])
def test_decay_domain_flags(decay, signed, exact):
    def before(x: S.In["b t h p"], k: S.In["b t h n"], a: S.In["b t h"], w: S.In["h"]):
        return S.recurrence(decay=decay(a, w), key=k, value=x + 0 * w, query=k)

    after = run_log_space(before)
    assert (after.decay_signed, after.log_decay_exact) == (signed, exact)
    assert after.decay_log_safe == (not signed and exact)


def test_no_decay_no_log_decay():
    def before(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"]):
        return S.recurrence(key=k, value=v, query=q)

    after = run_log_space(before)
    assert after.log_decay is None
    assert after.analyses == ("classify_decay", "log_space_decay")


def test_requires_classify_decay():
    def before(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"]):
        return S.recurrence(key=k, value=v, query=q)

    with pytest.raises(RuntimeError, match="pass 'log_space_decay' requires "
                                           r"\['classify_decay'\] to run first"):
        run_passes(trace(before), ["log_space_decay"])


def test_log_decay_is_equivalent_numerically():
    """log_of(decay) evaluates to log(decay) at a sample point."""
    cases = [sp.exp(Softplus(u) * a), sp.Mul(sp.exp(a), sp.exp(b), evaluate=False),
             sp.Float(0.5) * sp.exp(a), Sigmoid(a), b * Sigmoid(a), -sp.exp(a) * b]
    point = {a: -0.7, b: 0.3, u: 1.2}
    impl = {"Softplus": lambda x: sp.log(1 + sp.exp(x)), "Sigmoid": lambda x: 1 / (1 + sp.exp(-x))}
    for decay in cases:
        lhs = sp.lambdify(list(point), log_of(decay), modules=[impl, "math"])(*point.values())
        rhs = sp.lambdify(list(point), sp.log(abs(decay)),
                          modules=[impl, "math"])(*point.values())
        assert lhs == pytest.approx(rhs, rel=1e-12)
