"""ssmc/torch/ops.py: every compiled-op call is a `torch.library` custom op in `ssmc::`, with a
fake implementation from the IR's shapes and autograd through the backend's `kernel.backward`;
it passes `opcheck` and compiles under `torch.compile(fullgraph=True)`, dynamic shapes included.

On this machine (CPU) most tests pin the reference backend, whose float64 scan keeps gradient
checks exact; the TVM default's own backward is tested in tests/backends/tvm."""
import gc
import weakref

import pytest
import torch

import ssmc
from ssmc import dsl as S
from ssmc.ops import mamba2
from ssmc.torch import torch_op_for
from tests.helpers import (check_against_reference, cu_seqlens, make_definition, random_inputs,
                           random_state, reference_of, ssd_inputs)

REF = dict(backend="reference")


def _ssd(b=2, t=7, h=4, g=2, n=3, p=5, dtype=torch.float64, seed=1):
    return ssd_inputs(b, t, h, g, n, p, dt_bias=False, dtype=dtype, seed=seed)


def _opcheck_args(op, inputs: dict, initial_state=None, cu=None, final=True, output=True):
    return ([inputs[n] for n in op.program.input_names], initial_state, cu, op._executor_id,
            final, cu is not None, [], output, False)


# --------------------------------------------------------------------------- op registration

def test_op_is_registered_in_ssmc_namespace_per_structure():
    op = ssmc.compile(mamba2, **REF)
    route = op._torch_op
    assert route.name.startswith("ssd_") and len(route.name) == len("ssd_") + 12
    assert route.fwd is getattr(torch.ops.ssmc, route.name).default
    assert route.bwd is getattr(torch.ops.ssmc, route.name + "_bwd").default
    # another compiled op of the same structure shares the custom op, not the executor
    other = ssmc.compile(mamba2, backend="reference", lowering="scan")
    assert other._torch_op is route and other._executor_id != op._executor_id
    assert torch_op_for(make_definition("diagonal").program).name != route.name


def test_call_goes_through_the_custom_op():
    op = ssmc.compile(mamba2, **REF)
    a = _ssd()
    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda *t: op(*t))(*a.values())
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert f"ssmc.{op._torch_op.name}.default" in targets


# --------------------------------------------------------------------------------- opcheck

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_opcheck_ssd(dtype):
    op = ssmc.compile(mamba2, **REF)
    a = _ssd(dtype=dtype)
    h0 = random_state(2, 4, 3, 5, dtype=dtype, seed=2)
    torch.library.opcheck(op._torch_op.fwd, _opcheck_args(op, a, h0))
    torch.library.opcheck(op._torch_op.fwd, _opcheck_args(op, a, final=False))
    # the final state alone (`CompiledOp.final_state`)
    torch.library.opcheck(op._torch_op.fwd, _opcheck_args(op, a, h0, output=False))


def test_opcheck_bidirectional_diagonal_with_state():
    d = make_definition("diagonal", "bidirectional", epilogue=True)
    op = ssmc.compile(d, **REF)
    x = random_inputs(d, dict(b=2, t=5, h=2, g=1, n=3, p=2), dtype=torch.float64, seed=3)
    h0 = random_state(2, 2, 3, 2, directions=2, dtype=torch.float64, seed=4)
    torch.library.opcheck(op._torch_op.fwd, _opcheck_args(op, x, h0))


def test_opcheck_keeping_call():
    """A call that keeps what its backward reads (per-key decays, Triton's chunked lowering):
    the residual is an output like the others, its size known only at run time to the fake,
    the same in eager and traced dispatch (zeroed where the scores kernel writes nothing)."""
    pytest.importorskip("triton")
    defn = make_definition("diagonal", "forward")
    op = ssmc.compile(defn, backend="triton", lowering="chunked")
    a = random_inputs(defn, dict(b=2, t=70, h=2, g=1, n=8, p=4), seed=6)
    args = ([a[n].requires_grad_(True) for n in op.program.input_names], None, None,
            op._executor_id, False, False, [], True, True)
    size = op._torch_op.fwd(*args)[2].numel()
    assert size > 0
    stale = torch.full((size // 4,), float("nan"))   # memory the next allocation may reuse
    del stale
    assert not op._torch_op.fwd(*args)[2].view(torch.float32).isnan().any()
    torch.library.opcheck(op._torch_op.fwd, args)


@pytest.mark.parametrize("fullgraph", [True, False])
def test_compiled_training_step_keeps_the_scores_where_the_trace_may(monkeypatch, fullgraph):
    """Under torch.compile (inductor, dynamic t) a per-key training step keeps its forward's
    scores where the trace takes an op of data-dependent output size (fullgraph): its backward
    forms none again; without fullgraph it does, and nothing breaks the graph. Gradients as
    eager's, at every length."""
    pytest.importorskip("triton")
    from tests.backends.triton.test_backward import _count_scores
    torch._dynamo.reset()
    defn = make_definition("diagonal", "bidirectional")
    op = ssmc.compile(defn, backend="triton", lowering="chunked")

    def step(xs):
        return (op(**xs) ** 2).sum()

    # inductor where it keeps (its code takes the unbacked size); aot_eager enough elsewhere
    compiled = torch.compile(step, fullgraph=fullgraph, dynamic=True,
                             backend="inductor" if fullgraph else "aot_eager")
    for t in (40, 23):
        inputs = random_inputs(defn, dict(b=1, t=t, h=2, g=1, n=8, p=4), seed=t)
        grads, launches = [], []
        for fn in (step, compiled):
            xs = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
            calls = _count_scores(monkeypatch)
            fn(xs).backward()
            launches.append(len(calls))
            grads.append({k: x.grad for k, x in xs.items()})
        assert launches == [0, 0 if fullgraph else 2]    # one per direction when formed again
        for name in inputs:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-5,
                                       msg=name)
    if not fullgraph:
        xs = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        explanation = torch._dynamo.explain(step)(xs)
        assert explanation.graph_break_count == 0, explanation.break_reasons


def test_opcheck_varlen():
    op = ssmc.compile(mamba2, **REF)
    a = _ssd(b=1, t=9)
    cu = cu_seqlens([4, 0, 5])
    h0 = random_state(3, 4, 3, 5, dtype=torch.float64, seed=5)
    torch.library.opcheck(op._torch_op.fwd, _opcheck_args(op, a, h0, cu))


def test_fake_shapes_from_the_ir():
    from torch._subclasses.fake_tensor import FakeTensorMode
    d = make_definition("scalar", "bidirectional")
    op = ssmc.compile(d, **REF)
    with FakeTensorMode():
        x = random_inputs(d, dict(b=1, t=10, h=4, g=2, n=3, p=6), dtype=torch.bfloat16)
        y, hT = op(**x, cu_seqlens=torch.tensor([0, 3, 10]), return_final_state=True)
    assert y.shape == (1, 10, 4, 6) and y.dtype == torch.bfloat16
    assert hT.shape == (2, 2, 4, 3, 6) and hT.dtype == torch.float32


# -------------------------------------------------------------------------------- autograd

def test_autograd_through_default_op_on_cpu_reference_backend(monkeypatch):
    """The default op (SSMC_BACKEND=reference here) differentiates through the custom op's
    registered backward (kernel.backward) for every input and the initial state."""
    monkeypatch.setenv("SSMC_BACKEND", "reference")
    op = ssmc.compile(mamba2)
    assert op.backend_name == "reference"
    report = check_against_reference(op, _ssd(dtype=torch.float32, seed=6), tol=1e-5,
                                     initial_state=random_state(2, 4, 3, 5, seed=7),
                                     return_final_state=True)
    assert {"grad x", "grad dt", "grad A", "grad B", "grad C", "grad D", "grad z",
            "grad initial_state"} <= {m.name for m in report}


def test_gradcheck_varlen_float64():
    op = ssmc.compile(mamba2, **REF)
    a = _ssd(b=1, t=6, h=2, g=1, n=2, p=2, seed=8)
    cu = cu_seqlens([2, 4])
    h0 = random_state(2, 2, 2, 2, dtype=torch.float64, seed=9)
    names = list(a)

    def f(*tensors):
        *inputs, state = tensors
        return op(**dict(zip(names, inputs)), initial_state=state, cu_seqlens=cu,
                  return_final_state=True)

    leaves = tuple(t.clone().requires_grad_(True) for t in (*a.values(), h0))
    assert torch.autograd.gradcheck(f, leaves)


def test_backward_without_kernel_backward_names_the_backend(monkeypatch):
    op = ssmc.compile(mamba2, **REF)
    real = op.kernel_for

    def no_backward(plan, device):
        kernel = real(plan, device)
        return lambda *args: kernel(*args)  # a forward-only kernel

    monkeypatch.setattr(op, "kernel_for", no_backward)
    a = {k: v.requires_grad_() for k, v in _ssd().items()}
    y = op(**a)  # forward works
    with pytest.raises(ssmc.UnsupportedError, match=r"ssd\(\): backend 'reference' has no "
                                                     r"backward for scan_fp64"):
        y.sum().backward()


# -------------------------------------------------------------------------------- lifetimes

def _small():
    """A small definition, float64 leaves that require grad, and the reference gradients."""
    d = make_definition("scalar", epilogue=True)
    x = random_inputs(d, dict(b=2, t=5, h=2, g=1, n=3, p=2), dtype=torch.float64, seed=11)
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    ref_leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    reference_of(d)(**ref_leaves).sin().sum().backward()
    return d, leaves, {k: v.grad for k, v in ref_leaves.items()}


def _assert_grads(leaves, expected):
    for name, leaf in leaves.items():
        torch.testing.assert_close(leaf.grad, expected[name], rtol=1e-9, atol=1e-9,
                                   msg=f"grad {name}")


def test_backward_after_the_inline_op_is_dropped():
    """`ssmc.compile(d)(*xs)` keeps no reference to the op, yet the autograd graph calls it in
    backward: the graph holds it, and frees it with itself."""
    d, leaves, expected = _small()
    y = ssmc.compile(d, **REF)(**leaves)
    gc.collect()
    y.sin().sum().backward()
    _assert_grads(leaves, expected)

    op = ssmc.compile(d, **REF)
    freed = weakref.ref(op)
    y = op(**{k: v.detach().requires_grad_() for k, v in leaves.items()})
    del op
    gc.collect()
    assert freed() is not None  # y's graph needs it
    del y
    gc.collect()
    assert freed() is None  # and nothing else holds it


def test_compiled_graph_keeps_a_dropped_op_alive():
    """A torch.compile'd function that calls an op created and dropped elsewhere: the traced
    forward and backward graphs call it by id after every Python reference to it is gone."""
    torch._dynamo.reset()
    d, leaves, expected = _small()
    holder = {"op": ssmc.compile(d, **REF)}

    def f(q, k, v, a, z, D):
        return holder["op"](q, k, v, a, z, D).sin().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(**leaves)
    holder.clear()
    gc.collect()
    loss.backward()
    _assert_grads(leaves, expected)


# --------------------------------------------------------------------------- torch.compile

class Mixer(torch.nn.Module):
    """A small model around an ssmc op: projections in torch, the recurrence in ssmc."""

    def __init__(self, op, h=4, p=5):
        super().__init__()
        self.op = op
        self.proj = torch.nn.Linear(p, p, dtype=torch.float64)
        self.out = torch.nn.Linear(p, 3, dtype=torch.float64)

    def forward(self, x, dt, A, B, C, D, z, h0):
        y, hT = self.op(self.proj(x), dt, A, B, C, D, z, initial_state=h0,
                        return_final_state=True)
        return self.out(torch.nn.functional.gelu(y)), hT


def _run(model, t, b=2, seed=0):
    a = _ssd(b=b, t=t, seed=seed)
    h0 = random_state(b, 4, 3, 5, dtype=torch.float64, seed=seed + 1)
    leaves = [v.requires_grad_() for v in (*a.values(), h0)]
    model.zero_grad()
    y, hT = model(*leaves)
    (y.square().sum() + hT.sin().sum()).backward()
    grads = [x.grad for x in leaves] + [p.grad.clone() for p in model.parameters()]
    return [y.detach(), hT.detach()] + grads


def _assert_same(eager, compiled):
    assert len(eager) == len(compiled)
    for i, (e, c) in enumerate(zip(eager, compiled)):
        torch.testing.assert_close(c, e, rtol=1e-9, atol=1e-9, msg=f"tensor {i}")


def test_explain_reports_no_graph_break():
    model = Mixer(ssmc.compile(mamba2, **REF))
    a = _ssd(t=9)
    h0 = random_state(2, 4, 3, 5, dtype=torch.float64, seed=1)
    explanation = torch._dynamo.explain(model)(*a.values(), h0)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compile_fullgraph_matches_eager_values_and_grads():
    """The default torch.compile backend (inductor), fullgraph: outputs and gradients equal
    eager ones."""
    torch._dynamo.reset()
    model = Mixer(ssmc.compile(mamba2, **REF))
    compiled = torch.compile(model, fullgraph=True)
    _assert_same(_run(model, 9), _run(compiled, 9))


def test_compile_dynamic_t_and_b_does_not_recompile_per_length():
    """dynamic=True: one graph serves every t and b (the lowering is chosen inside the op at run
    time). Sizes avoid each other (duck sizing would tie equal sizes together) and 0/1 (which
    torch always specialises)."""
    torch._dynamo.reset()
    frames = []

    def counting_backend(gm, example_inputs):
        frames.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    model = Mixer(ssmc.compile(mamba2, **REF))
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counting_backend)
    for b, t in ((6, 11), (6, 17), (7, 23), (9, 40)):
        _assert_same(_run(model, t, b=b, seed=t), _run(compiled, t, b=b, seed=t))
    assert len(frames) == 1


def test_compile_varlen_checks_cu_seqlens_values_inside_the_op():
    """cu_seqlens' values are data: bind skips them under tracing (no .tolist() graph break)
    and the op checks them when it runs."""
    torch._dynamo.reset()
    op = ssmc.compile(mamba2, **REF)

    def f(x, dt, A, B, C, D, z, cu):
        return op(x, dt, A, B, C, D, z, cu_seqlens=cu, return_final_state=True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = _ssd(b=1, t=9)
    good = cu_seqlens([3, 6])
    for e, c in zip(f(*a.values(), good), compiled(*a.values(), good)):
        torch.testing.assert_close(c, e)
    bad = torch.tensor([0, 5, 4, 9], dtype=torch.int32)
    with pytest.raises(ssmc.ShapeError, match="'cu_seqlens' must be non-decreasing"):
        compiled(*a.values(), bad)


def test_compile_reports_shape_errors_at_trace_time():
    """bind runs while dynamo traces: a bad call fails before any launch, with bind's message
    (fullgraph=True wraps it in dynamo's "observed exception"; without it, it is the
    ShapeError itself)."""
    torch._dynamo.reset()
    op = ssmc.compile(mamba2, **REF)
    a = _ssd()
    a["C"] = a["C"][..., :2]
    message = "'C' has n=2 but 'B' has n=3"
    with pytest.raises(ssmc.ShapeError, match=message):
        torch.compile(lambda kw: op(**kw), backend="eager")(a)
    with pytest.raises(Exception, match=message):
        torch.compile(lambda kw: op(**kw), fullgraph=True, backend="eager")(a)


def test_builtin_op_wrapper_compiles_fullgraph():
    """ssmc.ops.* look their compiled op up in a plain dict, which dynamo traces as a lookup
    (an lru_cache would be traced into); the variant is built by one eager call first."""
    import ssmc.ops
    torch.manual_seed(0)
    q, k = torch.randn(1, 16, 2, 8), torch.randn(1, 16, 2, 8)
    v = torch.randn(1, 16, 2, 4)
    eager = ssmc.ops.linear_attention(q, k, v, backend="reference")
    fn = torch.compile(lambda q, k, v: ssmc.ops.linear_attention(q, k, v, backend="reference"),
                       fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), eager)


def test_backward_op_gradients_are_contiguous_as_its_fake_says():
    """Strided inputs (a transposed view): the real backward returns contiguous gradients, so
    the fake must promise contiguous ones, not the inputs' strides (inductor asserts the
    strides of what the fake promised). TVM: the reference backward runs autograd itself."""
    pytest.importorskip("tvm")
    op = ssmc.compile(mamba2, backend="tvm")
    a = _ssd(dtype=torch.float32)
    a["x"] = a["x"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not a["x"].is_contiguous()
    out = op(**a)
    args = ([a[n] for n in op.program.input_names], None, None, torch.ones_like(out), None,
            op._executor_id, [], out.new_empty((0,), dtype=torch.uint8))
    torch.library.opcheck(op._torch_op.bwd, args, test_utils=("test_faketensor",))


@ssmc.ssm
def grid_gate(x: S.In["b t h p"], dt: S.In["b k t h"], A: S.In["h"], B: S.In["b t n"],
              C: S.In["b k t n"]):
    return S.recurrence(decay=S.exp(dt * A), key=B, value=x, query=C, direction="cross2d")


def test_compile_fullgraph_passes_a_grid():
    """grid=(H, W) travels through the custom ops (forward and backward) as ints."""
    op = ssmc.compile(grid_gate, **REF)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 6, 2, 3, generator=g), torch.rand(2, 4, 6, 2, generator=g),
          -torch.rand(2, generator=g), torch.randn(2, 6, 4, generator=g),
          torch.randn(2, 4, 6, 4, generator=g)]
    xs = [x.requires_grad_(True) for x in xs]

    def loss(*a):
        return op(*a, grid=(2, 3)).square().sum()
    eager = loss(*xs)
    traced = torch.compile(loss, fullgraph=True, backend="aot_eager")(*xs)
    torch.testing.assert_close(traced, eager)
    for a, b in zip(torch.autograd.grad(traced, xs), torch.autograd.grad(eager, xs)):
        torch.testing.assert_close(a, b)


def test_final_state_compiles_fullgraph():
    """`op.final_state` (the custom op without its output) traces in one graph, and its values
    and gradients equal eager ones."""
    torch._dynamo.reset()
    d, leaves, _ = _small()
    op = ssmc.compile(d, **REF)

    def f(**xs):
        return op.final_state(**xs).sin().sum()

    eager_leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    f(**eager_leaves).backward()
    explanation = torch._dynamo.explain(f)(**{k: v.detach() for k, v in leaves.items()})
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(**leaves)
    torch.testing.assert_close(loss, f(**eager_leaves), rtol=1e-12, atol=1e-12)
    loss.backward()
    _assert_grads(leaves, {k: v.grad for k, v in eager_leaves.items()})


@pytest.mark.parametrize("used", ["final", "y"])
@pytest.mark.parametrize("backend", ["triton", "tvm"])
def test_backward_when_one_of_the_outputs_is_unused(used, backend):
    """y and the final state returned, one of them left out of the loss: the op's backward
    gets None for it (no zero-filled gradient is made for an unused output, nor for the
    residual) and gives the reference's gradients. GLA per key: the Triton forward keeps its
    scores in the residual."""
    from ssmc.ops.gla import gla
    gen = torch.Generator().manual_seed(3)
    ins = dict(q=torch.randn(1, 20, 2, 8, generator=gen), k=torch.randn(1, 20, 2, 8, generator=gen),
               v=torch.randn(1, 20, 2, 4, generator=gen), g=-torch.rand(1, 20, 2, 8, generator=gen))

    def grads(kind, dtype):
        leaves = {n: t.to(dtype).clone().requires_grad_(True) for n, t in ins.items()}
        y, final = gla(**leaves, return_final_state=True, backend=kind,
                       **({"lowering": "chunked"} if kind == "triton" else {}))
        (final.sum() if used == "final" else y.sum()).backward()
        return {n: leaf.grad for n, leaf in leaves.items()}
    got, want = grads(backend, torch.float32), grads("reference", torch.float64)
    for name, x in ins.items():   # the reference leaves q out of the final state's graph
        ref = want[name] if want[name] is not None else torch.zeros_like(x, dtype=torch.float64)
        assert torch.allclose(got[name].double(), ref, rtol=1e-4, atol=1e-5), name
