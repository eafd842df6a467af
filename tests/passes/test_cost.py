"""The symbolic cost model: each lowering's work as formulas in b t h g n p, Q and E."""
import pytest
import sympy as sp

import ssmc
import ssmc.ops
from ssmc import dsl as S
from ssmc.ir import AXIS_SIZES, CHUNK
from ssmc.lowerings import lowering_costs
from ssmc.passes.cost import E, io_bytes

b, t, h, g, n, p = (AXIS_SIZES[a] for a in "bthgnp")
Q = CHUNK


def define(decay_axes, direction="forward"):
    ns = {"S": S}
    decay = f", a: S.In['{decay_axes}']" if decay_axes else ""
    decay_kw = "decay=S.sigmoid(a), " if decay_axes else ""
    exec(f"def f(x: S.In['b t h p'], k: S.In['b t g n'], q: S.In['b t g n']{decay}):\n"
         f"    return S.recurrence({decay_kw}key=k, value=x, query=q, direction={direction!r})",
         ns)
    return ssmc.ssm(ns["f"]).program


def test_lowerings_and_fields():
    costs = lowering_costs(ssmc.ops.mamba2.program)
    assert list(costs) == ["scan", "chunked", "quadratic"]
    for cost in costs.values():
        for field in ("tensor_flops", "vector_flops", "bytes", "serial_steps"):
            expr = sp.sympify(getattr(cost, field))
            assert expr.free_symbols <= {b, t, h, g, n, p, Q, E}, field
        assert isinstance(cost.launches, int) and cost.launches >= 1


def test_io_bytes_counts_every_input_once_and_the_output():
    prog = ssmc.ops.mamba2.program  # x dt A B C D z
    elems = (b * t * h * p) + (b * t * h) + h + 2 * (b * t * g * n) + h + (b * t * h * p)
    assert sp.expand(io_bytes(prog) - (elems + b * t * h * p) * E) == 0


def test_growth_in_t():
    costs = lowering_costs(ssmc.ops.mamba2.program)
    assert sp.degree(sp.expand(costs["quadratic"].tensor_flops), t) == 2
    assert sp.degree(sp.expand(costs["chunked"].tensor_flops), t) == 1
    assert sp.degree(sp.expand(costs["scan"].vector_flops), t) == 1
    assert costs["scan"].tensor_flops == 0  # the scan has no matmul
    assert costs["scan"].serial_steps == t
    assert sp.simplify(costs["chunked"].serial_steps - t / Q) == 0
    assert costs["quadratic"].serial_steps == 1


def test_scan_does_n_times_p_work_per_step():
    scan = lowering_costs(ssmc.ops.mamba2.program)["scan"]
    per_step = sp.simplify(scan.vector_flops / (b * t * h))
    assert sp.degree(per_step, n) == 1 and sp.degree(per_step, p) == 1


def test_chunked_costs_depend_on_chunk_size():
    chunked = lowering_costs(ssmc.ops.mamba2.program)["chunked"]
    assert Q in chunked.tensor_flops.free_symbols        # intra-chunk Q x Q blocks
    assert Q in chunked.bytes.free_symbols               # chunk states written per chunk


@pytest.mark.parametrize("lowering", ["scan", "chunked", "quadratic"])
def test_bidirectional_doubles_compute(lowering):
    fwd = lowering_costs(define("b t h"))[lowering]
    both = lowering_costs(define("b t h", "bidirectional"))[lowering]
    assert sp.simplify(both.tensor_flops - 2 * fwd.tensor_flops) == 0
    assert sp.simplify(both.vector_flops - 2 * fwd.vector_flops) == 0
    rev = lowering_costs(define("b t h", "reverse"))[lowering]
    assert sp.simplify(rev.vector_flops - fwd.vector_flops) == 0


@pytest.mark.parametrize("lowering", ["chunked", "quadratic"])
def test_per_key_decay_costs_more_vector_work(lowering):
    scalar = lowering_costs(define("b t h"))[lowering]
    diagonal = lowering_costs(define("b t h n"))[lowering]
    extra = sp.simplify(diagonal.vector_flops - scalar.vector_flops)
    assert n in extra.free_symbols
    assert extra.subs({b: 1, t: 64, h: 2, n: 16, p: 8, Q: 16}) > 0


def test_subs_gives_numbers():
    cost = lowering_costs(ssmc.ops.mamba2.program)["chunked"]
    sizes = {b: 2, t: 128, h: 4, g: 1, n: 16, p: 8, Q: 32, E: 2}
    values = cost.subs(sizes)
    assert set(values) == {"tensor_flops", "vector_flops", "bytes", "launches", "serial_steps"}
    assert values["serial_steps"] == 128 / 32
    assert values["tensor_flops"] == 32 * 2 * 4 * 128 * (16 + 8) + 4 * 2 * 4 * 16 * 8 * 128
    assert all(isinstance(v, (int, float)) for v in values.values())


@pytest.mark.parametrize("sizes", [dict(b=8, t=2048, h=16, n=128, p=128, g=16),
                                   dict(b=2, t=8192, h=16, n=128, p=128, g=16),
                                   dict(b=8, t=4096, h=32, n=64, p=64, g=32)])
def test_auto_takes_the_faster_lowering_of_per_key_decays(sizes):
    """As measured on an H100 (benchmarks/RESULTS.md): GLA at these shapes is faster chunked
    (2.3-4.4 ms forward against 5.4 for the scan at the first), Mamba-1's selective scan
    (p = 1) faster as a scan (4.2 ms against 37.6)."""
    from ssmc.lowerings import choose_lowering
    assert choose_lowering(ssmc.ops.gla.definition.program, sizes).lowering == "chunked"
    s6 = dict(b=8, t=2048, h=2048, n=16, p=1, g=1)
    assert choose_lowering(ssmc.ops.selective_scan.definition.program, s6).lowering == "scan"
