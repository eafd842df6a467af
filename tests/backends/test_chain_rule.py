"""ChainRule: which inputs' terms a backend may evaluate on (b, t, h, p) rows (`row_terms`), and
the chain rule of a cross2d program with per-order inputs, run once over all its orders."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ssmc.ops
from ssmc import dsl as S
from ssmc.backends import chain_rule
from ssmc.backends.chain_rule import (DV, GOUT, CanonicalInputs, ChainRule, OrderBuffers,
                                     stack_orders)
from ssmc.ir import Y
from ssmc.ir.orders import order_program, order_tensors, stack_order_grads
from ssmc.nn_vision import build_ss2d_scan
from ssmc.ops.gla import build as build_gla
from tests.helpers import TorchOps, random_inputs


def test_ssd_row_terms_cover_the_row_inputs_only():
    terms = ChainRule(ssmc.ops.mamba2.program).row_terms
    # B and C (groups, n) and A (only in the decay) stay with the general chain rule
    assert set(terms) == {"x", "dt", "z", "D"}
    assert GOUT in terms["z"].free_symbols and DV not in terms["z"].free_symbols
    assert DV in terms["dt"].free_symbols and GOUT not in terms["dt"].free_symbols
    assert {DV, GOUT} <= terms["x"].free_symbols


def test_inputs_with_n_have_no_row_terms():
    # gla's q, k and g carry n; only v lives on rows
    assert set(ChainRule(build_gla(0.5).program).row_terms) == {"v"}


# ------------------------------------------------------------ cross2d: one chain rule, all orders

ORDERS = 4
SIZES = dict(b=2, k=ORDERS, t=6, h=4, g=2, n=3, p=2, grid_h=2, grid_w=3)


@ssmc.ssm
def gated_groups(x: S.In["b t h p"], dt: S.In["b k t h"], A: S.In["k h"],
                 B: S.In["b k t g n"], C: S.In["b t g n"], z: S.In["b t h p"]):
    """Per-order dt, A and B (B on groups), a shared C, a gate after the orders' sum."""
    d = S.softplus(dt)
    y = S.recurrence(decay=S.exp(d * A), key=B, value=x * d, query=C, direction="cross2d")
    return y * S.silu(z)


def _operand_grads(program, sizes, grouped, seed: int) -> dict:
    """Random operand gradients of every order on a leading order axis, canonical and
    broadcast like a backend's: query/key (h axis g long where `grouped`), value, and the
    decay's (its own axes) or the log-decay's; for a "full" decay also a term a kernel formed
    itself, (decay, A) summed over b and t."""
    gen = torch.Generator().manual_seed(seed)
    B, T, H, G, N, P = (sizes[a] for a in "bthgnp")

    def rand(*shape):
        return torch.randn(ORDERS, *shape, generator=gen, dtype=torch.float64)
    hq = G if "query" in grouped else H
    grads = {"query": rand(B, T, hq, N, 1), "key": rand(B, T, hq, N, 1),
             "value": rand(B, T, H, 1, P)}
    decay_axes = program.recurrence.decay.axes
    if "p" in decay_axes:
        grads["decay"] = rand(B, T, H, N, P)
        grads["decay", "A"] = rand(1, 1, H, N, P)
    else:
        grads["log_decay"] = rand(B, T, H, 1, 1)
    return grads


def _each_order_on_its_own(program, tensors, sizes, y, g_out, op_grads, grouped):
    """What every order's own chain rule gives (the order's slices, its operand gradients, the
    epilogue's terms once), stacked (inputs with k) or summed over the orders."""
    oprog = order_program(program)
    rule = ChainRule(oprog)
    per_order = []
    for d in range(ORDERS):
        xs = order_tensors(program, tensors, d)
        env = CanonicalInputs(oprog, xs, sizes, torch.float64)
        env[Y.name] = y
        grads = {key: v[d] for key, v in op_grads.items()}
        per_order.append(rule.input_grads(env, g_out, grads, xs, sizes, None, grouped,
                                          epilogue=d == 0))
    return stack_order_grads(program, per_order)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


CASES = {"vmamba": (build_ss2d_scan(), frozenset(), dict(SIZES, h=2, g=2, n=1, p=4)),
         "groups": (gated_groups, frozenset({"query", "key"}), SIZES)}


@pytest.mark.parametrize("case", CASES)
def test_cross2d_chain_rule_runs_once_over_all_orders(case, monkeypatch):
    """The chain rule of a cross2d program with per-order inputs evaluates each derivative
    once over a leading order axis, not once per order: as many expression evaluations and
    about as many torch ops as one order's chain rule, and the same gradients as each order's
    chain rule on its own slices."""
    defn, grouped, sizes = CASES[case]
    program = defn.program
    tensors = random_inputs(program, sizes, dtype=torch.float64, seed=0)
    if "A" in tensors:
        tensors["A"] = -tensors["A"].abs() - 0.5
    B, T, H, P = (sizes[a] for a in "bthp")
    gen = torch.Generator().manual_seed(1)
    g_out = torch.randn(B, T, H, 1, P, dtype=torch.float64, generator=gen)
    # y (the orders' sum before the epilogue), where the epilogue's derivatives read it
    y = torch.randn(B, T, H, 1, P, dtype=torch.float64, generator=gen)
    op_grads = _operand_grads(program, sizes, grouped, seed=2)

    calls = []
    evaluate = chain_rule.evaluate
    monkeypatch.setattr(chain_rule, "evaluate", lambda *a: calls.append(1) or evaluate(*a))
    rule = ChainRule(program)
    env = CanonicalInputs(program, tensors, sizes, torch.float64)
    env[Y.name] = y
    with _CountOps() as count:
        got = rule.input_grads(env, g_out, op_grads, tensors, sizes, None, grouped)
    all_orders, all_ops = len(calls), count.ops

    # one order's chain rule, with the epilogue's terms: what each order used to cost
    calls.clear()
    oprog = order_program(program)
    xs = order_tensors(program, tensors, 0)
    env0 = CanonicalInputs(oprog, xs, sizes, torch.float64)
    env0[Y.name] = y
    with _CountOps() as count:
        ChainRule(oprog).input_grads(env0, g_out, {k: v[0] for k, v in op_grads.items()},
                                     xs, sizes, None, grouped)
    assert all_orders == len(calls) > 0
    # the orders' sum may cost a reshape per input without k
    assert all_ops <= count.ops + len(program.inputs), (all_ops, count.ops)
    monkeypatch.undo()

    want = _each_order_on_its_own(program, tensors, sizes, y, g_out, op_grads, grouped)
    assert set(got) == {i.name for i in program.inputs}
    for inp in program.inputs:
        assert got[inp.name].shape == tensors[inp.name].shape, inp.name
        torch.testing.assert_close(got[inp.name], want[inp.name], rtol=1e-12, atol=1e-12,
                                   msg=lambda m, n=inp.name: f"{n}: {m}")


def test_stack_orders_puts_the_orders_in_front():
    per_dir = [({"value": torch.full((1, 2, 1, 1, 3), float(d)),
                 ("decay", "A"): torch.full((1, 1, 1, 1, 1), float(d))}, None)
               for d in range(ORDERS)]
    out = stack_orders(per_dir)
    assert out["value"].shape == (ORDERS, 1, 2, 1, 1, 3)
    assert out["decay", "A"][:, 0, 0, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]



def test_stack_orders_takes_an_order_buffer_without_a_copy():
    """Parts carved from one OrderBuffers buffer come back as that buffer (a view: no
    stacking copy); parts that are not its consecutive slices are still stacked."""
    bufs = OrderBuffers(ORDERS, "cpu")
    per_dir = []
    for d in range(ORDERS):
        part = bufs("dq", d, (1, 2, 1, 3), torch.float32).fill_(float(d))
        per_dir.append(({"query": part.unsqueeze(-1), "key": torch.full((1, 2, 1, 3, 1), 1.0)},
                        None))
    out = stack_orders(per_dir)
    assert out["query"].data_ptr() == bufs.buffers["dq"].data_ptr()
    assert out["query"].shape == (ORDERS, 1, 2, 1, 3, 1)
    assert out["query"][:, 0, 0, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    reordered = [per_dir[1], per_dir[0], *per_dir[2:]]
    swapped = stack_orders(reordered)["query"]
    assert swapped.data_ptr() != bufs.buffers["dq"].data_ptr()
    assert swapped[:, 0, 0, 0, 0, 0].tolist() == [1.0, 0.0, 2.0, 3.0]


@pytest.mark.usefixtures("kernel_cache_per_module")
@pytest.mark.parametrize("backend", ["tvm", "triton"])
def test_cross2d_backward_runs_the_chain_rule_once(backend, monkeypatch):
    """A cross2d op's backward calls the chain rule once for its four orders."""
    if backend == "tvm":
        pytest.importorskip("tvm")
    op = ssmc.compile(gated_groups, backend=backend, lowering="scan")
    sizes = dict(SIZES, b=1, h=2, g=1, n=2)
    # the Triton backend takes CUDA tensors where a GPU is present (the interpreter's: CPU)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    xs = {k: v.to(device).requires_grad_() for k, v in random_inputs(op, sizes, seed=3).items()}
    calls = []
    input_grads = ChainRule.input_grads
    monkeypatch.setattr(ChainRule, "input_grads",
                        lambda self, *a, **kw: calls.append(1) or input_grads(self, *a, **kw))
    op(**xs, grid=(2, 3)).sum().backward()
    assert len(calls) == 1
    assert all(torch.isfinite(x.grad).all() for x in xs.values())


# ------------------------------------------------------------------ a lone term's scalar factor

def test_a_lone_scaled_term_is_scaled_in_the_copy_to_the_input_dtype():
    """GLA's query = q * scale: dq is the query gradient times the scale, rounded once to q's
    bf16, written contiguous by one product into the input's dtype (no fp32 product first)."""
    program = build_gla(0.5).program
    sizes = dict(b=2, t=5, h=3, g=3, n=4, p=2)
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(2, 5, 3, 4 if name != "v" else 2, generator=gen)
               .to(torch.bfloat16) for name in ("q", "k", "v", "g")}
    tensors["g"] = tensors["g"].float()
    env = CanonicalInputs(program, tensors, sizes, torch.float32)
    g_out = torch.randn(2, 5, 3, 1, 2, generator=gen)
    op_grads = {"query": torch.randn(2, 5, 3, 4, 1, generator=gen),
                "key": torch.randn(2, 5, 3, 4, 1, generator=gen),
                "value": torch.randn(2, 5, 3, 1, 2, generator=gen),
                "log_decay": torch.randn(2, 5, 3, 4, 1, generator=gen)}
    with TorchOps() as rec:
        got = ChainRule(program).input_grads(env, g_out, op_grads, tensors, sizes)
    dq = got["q"]
    assert dq.dtype == torch.bfloat16 and dq.is_contiguous()
    assert torch.equal(dq, (op_grads["query"].squeeze(-1) * 0.5).to(torch.bfloat16))
    assert "aten.mul.out" in rec.ops
    assert "aten.mul.Tensor" not in rec.ops
