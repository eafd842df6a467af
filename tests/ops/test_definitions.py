"""Every built-in's plain definition (`ssmc.ops.<name>.definition`): compiled like a user's
definition and checked against the float64 reference, and equal to its keyword function."""
import sys

import pytest
import torch

import ssmc
import ssmc.ops
from tests.helpers import (check_against_reference, compare, gla_inputs, linear_attention_inputs,
                           random_state, retention_inputs, selective_scan_inputs, ssd_inputs)

TOL32 = 2e-5   # float32 kernels against the float64 reference (outputs and gradients)
TOL64 = 1e-12  # the definition against its keyword function, both on the reference
SIZES = dict(b=2, t=7, h=4, g=2, n=5, p=3)


def _mamba1_inputs(seed):
    """(definition inputs, keyword-function inputs): the definition's u and z carry p = 1."""
    s = SIZES
    raw = selective_scan_inputs(s["b"], s["t"], s["h"], s["n"], s["g"], delta_bias=False,
                                seed=seed)
    return {**raw, "u": raw["u"].unsqueeze(-1), "z": raw["z"].unsqueeze(-1)}, raw


def _linear_family(factory):
    def make(seed):
        x = factory(SIZES["b"], SIZES["t"], SIZES["h"], SIZES["n"], SIZES["p"], seed=seed)
        return x, x
    return make


#: name -> (inputs(seed) -> (definition inputs, function inputs), the function's options that
#: make it compute the definition, value dim p of the definition's state)
CASES = {
    "ssd": (lambda seed: (ssd_inputs(**SIZES, dt_bias=False, seed=seed),) * 2,
            dict(dt_softplus=True), SIZES["p"]),
    "selective_scan": (_mamba1_inputs, dict(delta_softplus=True), 1),
    "gla": (_linear_family(gla_inputs), dict(scale=1.0), SIZES["p"]),
    "retention": (_linear_family(retention_inputs), dict(scale=1.0), SIZES["p"]),
    "linear_attention": (_linear_family(linear_attention_inputs), dict(scale=1.0), SIZES["p"]),
}


def test_every_builtin_has_a_definition():
    for name in ssmc.ops.__all__:
        obj = getattr(ssmc.ops, name)
        if isinstance(obj, ssmc.Definition):
            continue
        assert isinstance(obj.definition, ssmc.Definition), name
        assert sys.modules[f"ssmc.ops.{name}"].definition is obj.definition
    assert set(CASES) == {n for n in ssmc.ops.__all__
                          if not isinstance(getattr(ssmc.ops, n), ssmc.Definition)}
    assert ssmc.ops.ssd.definition is ssmc.ops.mamba2
    assert ssmc.ops.selective_scan.definition is ssmc.ops.mamba1


@pytest.mark.parametrize("name", list(CASES))
def test_definition_compiles_and_matches_reference(name):
    make, _, p = CASES[name]
    inputs, _ = make(seed=1)
    op = ssmc.compile(getattr(ssmc.ops, name).definition)
    h0 = random_state(SIZES["b"], SIZES["h"], SIZES["n"], p, seed=2)
    report = check_against_reference(op, inputs, tol=TOL32, initial_state=h0,
                                     return_final_state=True)
    assert op.last_plan is not None and op.backend_name != "reference"
    assert {"y", "final_state", "grad initial_state"} <= {m.name for m in report}


@pytest.mark.parametrize("name", list(CASES))
def test_definition_equals_keyword_function(name):
    make, options, _ = CASES[name]
    function = getattr(ssmc.ops, name)
    def_inputs, fn_inputs = make(seed=3)
    def_inputs = {k: v.double() for k, v in def_inputs.items()}
    fn_inputs = {k: v.double() for k, v in fn_inputs.items()}
    y = ssmc.compile(function.definition, backend="reference")(**def_inputs)
    y_fn = function(**fn_inputs, **options, backend="reference")
    result = compare("y", y.reshape(y_fn.shape), y_fn, TOL64)
    assert result.ok, str(result)
    assert y.abs().max() > 0
