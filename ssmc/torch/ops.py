"""`torch.library` custom ops for compiled definitions.

One pair of ops per definition *structure* (its name plus a prefix of the IR's structural hash):

    ssmc::<name>_<hash12>(Tensor[] inputs, Tensor? initial_state, Tensor? cu_seqlens,
                          int executor, bool return_final_state, bool check_cu_seqlens,
                          SymInt[] grid, bool return_output, bool keep)
        -> (Tensor out, Tensor final_state, Tensor residual)
    ssmc::<name>_<hash12>_bwd(Tensor[] inputs, Tensor? initial_state, Tensor? cu_seqlens,
                              Tensor grad_out, Tensor? grad_final, int executor,
                              SymInt[] grid, Tensor residual)
        -> (Tensor[] grad_inputs, Tensor grad_initial_state)

`inputs` are the definition's tensors in declaration order. `executor` names the `CompiledOp`
that runs the call (its backend, lowering policy and kernel cache): a small integer handed out
when the op is constructed, a constant in a traced graph. `final_state` is an empty tensor when
`return_final_state` is false, `out` when `return_output` is false (the final state alone:
backends with a `kernel.final_state` run only the passes it needs, e.g. the chunked lowering's
state pass), and `grad_initial_state` when there is no initial state: a custom op returns
tensors, never None.

`keep` is set where autograd will hold an eager call for a backward: a kernel with a
`forward_keep` (backends/base.py) then returns in `residual` (flat uint8, its size known only
at run time: an unbacked SymInt to the fake) what its backward would otherwise form again,
e.g. the per-key chunked lowering's decayed scores; else `residual` is empty. A traced call
keeps only where the trace takes an op whose output size is data-dependent
(`torch.compile(fullgraph=True)`, or `torch._dynamo.config.capture_dynamic_output_shape_ops`);
elsewhere dynamo would break the graph at it, so the backward forms the scores again.

Lifetimes: the registry holds a CompiledOp weakly, so an op nobody uses is freed, but whatever
will call it later keeps it alive. An eager autograd graph holds it strongly in the saved
context of its node, so `ssmc.compile(d)(*xs).sum().backward()` works with no reference left
to the op and frees it with the graph. A graph traced by torch.compile (or export) holds only
the integer, and lives in torch's caches, which say nothing when they drop it: tracing runs the
fake implementations, which pin the executor for the rest of the process (so does a call on
meta tensors, which also runs them).

The fake (meta) implementations compute shapes from the IR's axis annotations only, so
FakeTensors and SymInts flow through them: out (b, t, h, p) in the output dtype, final state
(b | sequences, h, n, p) in float32 (float64 for float64 inputs), with a leading 2 for
bidirectional definitions. The real implementation plans at run time with concrete sizes, so a
graph traced with dynamic `t`/`b` is not specialised on them: the lowering choice (which depends
on `t`) happens per call inside the op, not in the graph.

Validation happens in `CompiledOp.__call__` (`validate.bind`) before the op; it is traceable by
dynamo. The one data-dependent check, the values of `cu_seqlens`, needs the tensor's contents:
under tracing bind skips it and the op does it at run time (`check_cu_seqlens=True`).

Backward is the backend's `kernel.backward` (backends/base.py), wrapped in the `_bwd` op so that
AOTAutograd can trace it with fake tensors too. A backend without one raises UnsupportedError
naming the backend when gradients are requested.
"""
from __future__ import annotations

import itertools
import re
import threading
import weakref
from dataclasses import dataclass

import torch

from ..backends.base import backward_for, resolve_backend
from ..errors import UnsupportedError
from ..ir import Program
from ..validate import Bound, _output_dtype, check_cu_seqlens_values, complete_sizes

NAMESPACE = "ssmc"

FWD_SCHEMA = ("(Tensor[] inputs, Tensor? initial_state, Tensor? cu_seqlens, int executor, "
              "bool return_final_state, bool check_cu_seqlens, SymInt[] grid, "
              "bool return_output, bool keep) -> (Tensor, Tensor, Tensor)")
BWD_SCHEMA = ("(Tensor[] inputs, Tensor? initial_state, Tensor? cu_seqlens, Tensor grad_out, "
              "Tensor? grad_final, int executor, SymInt[] grid, Tensor residual) "
              "-> (Tensor[], Tensor)")


@dataclass(frozen=True)
class TorchOp:
    """The custom ops of one definition structure."""

    name: str                       # "ssd_0123456789ab"; the ops are ssmc::<name>[_bwd]
    program: Program
    fwd: torch._ops.OpOverload
    bwd: torch._ops.OpOverload


_OPS: dict[str, TorchOp] = {}
_EXECUTORS: dict[int, weakref.ref] = {}
_PINNED: dict[int, object] = {}  # executors of traced graphs, held strongly
_TOKENS = itertools.count(1)
_LOCK = threading.Lock()


def op_name(program: Program) -> str:
    stem = re.sub(r"[^0-9a-zA-Z_]", "_", program.name).strip("_").lower() or "ssm"
    if stem[0].isdigit():
        stem = "ssm_" + stem
    return f"{stem}_{program.structural_hash()[:12]}"


def register_executor(compiled_op) -> int:
    """A token by which the custom op finds `compiled_op` (held weakly)."""
    with _LOCK:
        token = next(_TOKENS)
        _EXECUTORS[token] = weakref.ref(compiled_op, lambda _, t=token: _EXECUTORS.pop(t, None))
    return token


def _executor(token: int):
    ref = _EXECUTORS.get(token)
    op = ref() if ref is not None else None
    if op is None:
        raise RuntimeError(f"ssmc: no compiled op has executor id {token} in this process (the "
                           "graphs ssmc builds keep theirs alive; an id from another process, "
                           "e.g. in a saved exported program, does not name one here)")
    return op


def _pin(token: int) -> None:
    """Keep the executor `token` alive for the rest of the process: a graph being traced will
    call it by its id, and nothing tells us when that graph is dropped."""
    if token not in _PINNED:
        op = _executor(token)
        with _LOCK:
            _PINNED.setdefault(token, op)


# ---------------------------------------------------------------------------------- shapes

def sizes_of(program: Program, inputs, grid=()) -> dict:
    """The size of every axis, read off the inputs' shapes (ints or SymInts), and a cross2d
    call's grid (grid_h, grid_w); no checks: the inputs were checked by `validate.bind` before
    the op was called."""
    sizes: dict = {}
    if grid:
        sizes["grid_h"], sizes["grid_w"] = grid
    for inp, x in zip(program.inputs, inputs):
        for axis, size in zip(inp.axes, x.shape):
            sizes.setdefault(axis, size)
    return complete_sizes(sizes)


def state_dtype(out_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if out_dtype == torch.float64 else torch.float32


def _num_directions(program: Program) -> int:
    return len(program.recurrence.directions)


def _out_shape(sizes: dict) -> tuple:
    return (sizes["b"], sizes["t"], sizes["h"], sizes["p"])


def _state_shape(program: Program, sizes: dict, cu_seqlens) -> tuple:
    states = sizes["b"] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    shape = (states, sizes["h"], sizes["n"], sizes["p"])
    if _num_directions(program) > 1:
        shape = (_num_directions(program),) + shape
    return shape


# ------------------------------------------------------------------------ implementations

def _bound(op, inputs, initial_state, cu_seqlens, return_final_state, grid) -> Bound:
    program = op.program
    tensors = dict(zip(program.input_names, inputs))
    return Bound(tensors=tensors, sizes=sizes_of(program, inputs, grid), device=inputs[0].device,
                 dtype=_output_dtype(program, tensors), initial_state=initial_state,
                 cu_seqlens=cu_seqlens, return_final_state=return_final_state)


def _storages(tensors) -> set:
    """The storages (by address) of the nonempty tensors among `tensors` (None skipped)."""
    return {t.untyped_storage().data_ptr() for t in tensors if t is not None and t.numel()}


def _fresh(x: torch.Tensor, taken: set) -> torch.Tensor:
    """`x`, contiguous and sharing no storage with `taken` (`_storages`; a custom op's outputs
    must not alias its inputs or each other; a kernel may hand back a view, e.g. a final state
    for t=0); its own storage is added to `taken`."""
    x = x.contiguous()
    if x.numel():
        if x.untyped_storage().data_ptr() in taken:
            x = x.clone()
        taken.add(x.untyped_storage().data_ptr())
    return x


def _no_grad_like(grid):
    """The gradient slot of the `grid` argument in the structure torch's autograd wrapper
    flattens it to: an empty plain list stays a list (of no tensors), anything else is a leaf."""
    return [] if type(grid) is list and not grid else None


def _make_ops(program: Program) -> TorchOp:
    name = op_name(program)
    qual = f"{NAMESPACE}::{name}"
    fn = f"{program.name}()"

    def fwd_impl(inputs, initial_state, cu_seqlens, executor, return_final_state,
                 check_cu_seqlens, grid, return_output, keep):
        op = _executor(executor)
        bound = _bound(op, inputs, initial_state, cu_seqlens, return_final_state, grid)
        if check_cu_seqlens and cu_seqlens is not None:
            check_cu_seqlens_values(fn, cu_seqlens, bound.sizes["t"])
        plan = op.plan_for(bound)
        op.last_plan = plan
        kernel = op.kernel_for(plan, bound.device)
        final_only = getattr(kernel, "final_state", None)
        forward_keep = getattr(kernel, "forward_keep", None)
        residual = None
        if keep and return_output and forward_keep is not None:
            out, final, residual = forward_keep(bound.tensors, bound.sizes, initial_state,
                                                cu_seqlens)
        elif return_output or final_only is None:
            out, final = kernel(bound.tensors, bound.sizes, initial_state, cu_seqlens)
        else:
            final = final_only(bound.tensors, bound.sizes, initial_state, cu_seqlens)
        if not return_output:
            out = inputs[0].new_empty((0,), dtype=bound.dtype)
        if final is None or not return_final_state:
            final = inputs[0].new_empty((0,), dtype=state_dtype(bound.dtype))
        if residual is None:
            residual = inputs[0].new_empty((0,), dtype=torch.uint8)
        taken = _storages([*inputs, initial_state, cu_seqlens])
        return _fresh(out, taken), _fresh(final, taken), residual

    def fwd_fake(inputs, initial_state, cu_seqlens, executor, return_final_state,
                 check_cu_seqlens, grid, return_output, keep):
        _pin(executor)  # the traced graph will call it by id, for as long as torch keeps it
        sizes = sizes_of(program, inputs)
        dtype = _output_dtype(program, dict(zip(program.input_names, inputs)))
        out = inputs[0].new_empty(_out_shape(sizes) if return_output else (0,), dtype=dtype)
        shape = _state_shape(program, sizes, cu_seqlens) if return_final_state else (0,)
        # what is kept depends on the plan, chosen at run time
        kept = torch.library.get_ctx().new_dynamic_size() if keep and return_output else 0
        return (out, inputs[0].new_empty(shape, dtype=state_dtype(dtype)),
                inputs[0].new_empty((kept,), dtype=torch.uint8))

    def bwd_impl(inputs, initial_state, cu_seqlens, grad_out, grad_final, executor, grid,
                 residual):
        op = _executor(executor)
        bound = _bound(op, inputs, initial_state, cu_seqlens, grad_final is not None, grid)
        plan = op.plan_for(bound)
        kernel = op.kernel_for(plan, bound.device)
        backward = backward_for(op.backend_name, bound.device, plan, kernel)
        if backward is None:
            backend = resolve_backend(op.backend_name, bound.device, plan).name
            raise UnsupportedError(
                f"{fn}: backend {backend!r} has no backward for {plan.describe()} "
                f"(its kernel defines no kernel.backward); compile with backend='reference' "
                f"(or another backend with a backward) to differentiate, or call the op under "
                f"torch.no_grad()")
        grad_final = None if grad_final is None else grad_final.contiguous()
        kept = {} if residual.numel() == 0 else dict(residual=residual)
        grads, grad_h0 = backward(bound.tensors, bound.sizes, initial_state, cu_seqlens,
                                  grad_out.contiguous(), grad_final, **kept)
        taken = _storages([*inputs, initial_state, cu_seqlens, grad_out, grad_final])
        result = []
        for n, x in zip(op.program.input_names, inputs):
            g = grads.get(n)
            result.append(_fresh(g, taken) if g is not None else x.new_zeros(x.shape))
        if initial_state is None:
            grad_h0 = inputs[0].new_empty((0,))
        elif grad_h0 is None:
            grad_h0 = initial_state.new_zeros(initial_state.shape)
        return result, _fresh(grad_h0, taken)

    def bwd_fake(inputs, initial_state, cu_seqlens, grad_out, grad_final, executor, grid,
                 residual):
        _pin(executor)
        # contiguous, as the real gradients are (`_fresh`), whatever the inputs' strides
        grads = [x.new_empty(x.shape) for x in inputs]
        grad_h0 = (inputs[0].new_empty((0,)) if initial_state is None
                   else initial_state.new_empty(initial_state.shape))
        return grads, grad_h0

    lib = _library()
    lib.define(f"{name}{FWD_SCHEMA}")
    lib.define(f"{name}_bwd{BWD_SCHEMA}")
    for suffix, impl, fake in (("", fwd_impl, fwd_fake), ("_bwd", bwd_impl, bwd_fake)):
        # one implementation for every device: the kernel cache picks the backend per device
        lib.impl(f"{name}{suffix}", impl, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{qual}{suffix}", fake, lib=lib)

    bwd_op = getattr(getattr(torch.ops, NAMESPACE), f"{name}_bwd").default

    def setup_context(ctx, inputs, output):
        (tensors, initial_state, cu_seqlens, executor, return_final_state, _, grid, with_out,
         _keep) = inputs
        ctx.return_output = with_out
        ctx.num_inputs = len(tensors)
        ctx.executor = executor
        ctx.grid = grid
        # the backward calls the executor by id: the graph keeps it alive, not the user
        ctx.executor_op = _executor(executor)
        ctx.return_final_state = return_final_state
        # an output nobody used (the residual, always) gets None, not a zero-filled gradient
        # of its size (the residual's: 0.02 ms of a GLA training step on an H100)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors, initial_state, cu_seqlens, output[2])
        ctx.mark_non_differentiable(output[2])

    def backward(ctx, grad_out, grad_final, _grad_residual):
        saved = ctx.saved_tensors
        k = ctx.num_inputs
        tensors, initial_state, cu_seqlens = list(saved[:k]), saved[k], saved[k + 1]
        residual = saved[k + 2]
        if not ctx.return_final_state:
            grad_final = None
        if not ctx.return_output or grad_out is None:   # nothing flows in through y
            out = _out_shape(sizes_of(program, tensors, ctx.grid))
            dtype = _output_dtype(program, dict(zip(program.input_names, tensors)))
            grad_out = tensors[0].new_zeros(out, dtype=dtype)
        grads, grad_h0 = bwd_op(tensors, initial_state, cu_seqlens, grad_out, grad_final,
                                ctx.executor, ctx.grid, residual)
        return (list(grads), grad_h0 if initial_state is not None else None,
                None, None, None, None, _no_grad_like(ctx.grid), None, None)

    torch.library.register_autograd(qual, backward, setup_context=setup_context, lib=lib)
    fwd_op = getattr(getattr(torch.ops, NAMESPACE), name).default
    return TorchOp(name=name, program=program, fwd=fwd_op, bwd=bwd_op)


_LIBRARY = None


def _library() -> torch.library.Library:
    global _LIBRARY
    if _LIBRARY is None:
        _LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")
    return _LIBRARY


def torch_op_for(program: Program) -> TorchOp:
    """The custom ops for `program`'s structure, defined on first use (not thread-hostile:
    definitions happen under a lock)."""
    name = op_name(program)
    op = _OPS.get(name)
    if op is None:
        with _LOCK:
            op = _OPS.get(name)
            if op is None:
                op = _OPS[name] = _make_ops(program)
    return op


@torch.compiler.assume_constant_result
def _traces_dynamic_output_sizes() -> bool:
    """Whether the graph being traced takes ops whose output size is data-dependent:
    `torch.compile(..., fullgraph=True)`, or dynamo's `capture_dynamic_output_shape_ops`. A
    constant of the trace (read once, while tracing)."""
    context = torch._guards.TracingContext.try_get()
    shape_env = getattr(getattr(context, "fake_mode", None), "shape_env", None)
    return bool(shape_env is not None and shape_env.allow_dynamic_output_shape_ops)


def call(compiled_op, bound: Bound, return_output: bool = True):
    """Run a bound call through the custom op. Traceable by dynamo: plain attribute access and
    one op call. Without `return_output`, only the final state (`bound.return_final_state`
    must be set)."""
    route = compiled_op._torch_op
    sizes = bound.sizes
    grid = [sizes["grid_h"], sizes["grid_w"]] if "grid_h" in sizes else []
    tensors = list(bound.tensors.values())
    # autograd holds the call for a backward: keep what the backward would form again. A
    # residual's size is known only at run time: a trace keeps only where it may hold an op
    # whose output size is data-dependent (elsewhere dynamo breaks the graph there)
    compiling = torch.compiler.is_compiling()
    keep = (return_output and (not compiling or _traces_dynamic_output_sizes())
            and torch.is_grad_enabled()
            and any(t.requires_grad for t in (*tensors, bound.initial_state) if t is not None))
    out, final, _ = route.fwd(tensors, bound.initial_state, bound.cu_seqlens,
                              compiled_op._executor_id, bound.return_final_state,
                              compiling, grid, return_output, keep)
    if not return_output:
        return final
    if bound.return_final_state:
        return out, final
    return out
