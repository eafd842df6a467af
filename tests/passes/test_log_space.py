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
    (a, sp.log(a)),                                                 # other decays: log(decay)
    (Sigmoid(a), sp.log(Sigmoid(a))),
    (a * b, sp.log(a * b)),
    (b * sp.exp(a), sp.log(b * sp.exp(a))),                         # not all factors exps
    (-sp.exp(a), sp.log(-sp.exp(a))),                               # negative constant
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

    assert run_log_space(before).log_decay == Elementwise(sp.log(symbol("gamma")), ("h",))


def test_sigmoid_decay_gets_log():
    def before(x: S.In["b t h p"], k: S.In["b t h n"], g: S.In["b t h n"]):
        return S.recurrence(decay=S.sigmoid(g), key=k, value=x, query=k)

    after = run_log_space(before)
    assert after.log_decay == Elementwise(sp.log(Sigmoid(symbol("g"))), ("b", "t", "h", "n"))


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
             sp.Float(0.5) * sp.exp(a), Sigmoid(a)]
    point = {a: -0.7, b: 0.3, u: 1.2}
    impl = {"Softplus": lambda x: sp.log(1 + sp.exp(x)), "Sigmoid": lambda x: 1 / (1 + sp.exp(-x))}
    for decay in cases:
        lhs = sp.lambdify(list(point), log_of(decay), modules=[impl, "math"])(*point.values())
        rhs = sp.lambdify(list(point), sp.log(decay), modules=[impl, "math"])(*point.values())
        assert lhs == pytest.approx(rhs, rel=1e-12)
