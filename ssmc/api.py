"""The user-facing entry points: `@ssm`, `compile` (the mixing matrix is in `matrix.py`)."""
from __future__ import annotations

import threading

import torch

from . import config
from .backends.base import compile_plan
from .dsl import trace
from .errors import ArgumentError, ConfigError, UnsupportedError
from .ir import Program
from .lowerings import legal_lowerings, lowering_names
from .passes import run_pipeline
from .plan import Plan
from .planner import make_plan
from .step import decode as decode_op
from .step import step as step_op
from .torch import ops as torch_ops
from .validate import Bound, bind


class Definition:
    """A traced, analysed definition. Calling it runs the default compiled op."""

    def __init__(self, fn, name: str | None = None):
        self.fn = fn
        self.name = name or fn.__name__
        self.program: Program = run_pipeline(trace(fn, self.name))
        self.__doc__ = fn.__doc__
        self.__name__ = self.name
        self._default = None
        self._lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self._lock:
            if self._default is None:
                self._default = compile(self)
        return self._default(*args, **kwargs)

    def __repr__(self):
        return f"<ssmc definition {self.name}>"


def ssm(fn=None, *, name: str | None = None):
    """Decorator: turn a function written in `ssmc.dsl` into a Definition."""
    if fn is None:
        return lambda f: Definition(f, name)
    return Definition(fn, name)


class CompiledOp:
    """A definition bound to a backend and a lowering policy; plans are made per call shape."""

    def __init__(self, definition: Definition, backend: str = "auto", lowering: str = "auto"):
        valid = ("auto",) + lowering_names()
        if lowering not in valid:
            raise ConfigError(f"lowering={lowering!r} is not valid; valid values: "
                              f"{', '.join(valid)}")
        if backend not in config.BACKENDS:
            raise ConfigError(f"backend={backend!r} is not valid; valid values: "
                              f"{', '.join(config.BACKENDS)}")
        self.definition = definition
        self.program = definition.program
        legal = legal_lowerings(self.program)
        if lowering != "auto" and lowering not in legal:
            raise UnsupportedError(
                f"{self.program.name}: lowering={lowering!r} is not legal for decay kind "
                f"{self.program.decay_kind.value!r}; legal lowerings: {', '.join(legal)}")
        self.backend_name = config.backend() if backend == "auto" else backend
        self.lowering = lowering
        self._kernels: dict = {}
        self._plans: dict = {}
        self.last_plan: Plan | None = None
        # every call runs as the torch.library custom op of this structure (ssmc/torch/ops.py);
        # made here, not at the first call, which may be under torch.compile's tracing
        self._torch_op = torch_ops.torch_op_for(self.program)
        self._executor_id = torch_ops.register_executor(self)

    def plan_for(self, bound: Bound) -> Plan:
        """The plan for this call signature, memoised: choosing evaluates the cost model."""
        key = (tuple(sorted(bound.sizes.items())), bound.dtype, bound.device.type,
               bound.initial_state is not None, bound.return_final_state,
               bound.cu_seqlens is not None)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = make_plan(self.program, self.backend_name,
                                                  self.lowering, bound)
        return plan

    def kernel_for(self, plan: Plan, device: torch.device):
        key = (plan, device.type)
        kernel = self._kernels.get(key)
        if kernel is None:
            try:
                kernel = self._kernels[key] = compile_plan(self.backend_name, device, plan)
            except UnsupportedError as e:
                raise UnsupportedError(f"{self.program.name}: {e}") from None
        return kernel

    def __call__(self, *args, **kwargs):
        bound = bind(self.program, args, kwargs)  # every check, before any launch
        # the custom op plans (memoised, sets last_plan), builds the kernel and launches it
        return torch_ops.call(self, bound)

    def final_state(self, *args, **kwargs) -> torch.Tensor:
        """The state after the call's sequence(s), without its output: the op's arguments
        (`return_final_state` is implied). Differentiable like the op. Backends that can run
        only the passes the state needs do (the Triton chunked lowering runs its state pass
        alone); others run the whole op and drop the output. Context parallelism's shards
        use it for the state they hand on."""
        kwargs = dict(kwargs, return_final_state=True)
        bound = bind(self.program, args, kwargs)
        return torch_ops.call(self, bound, return_output=False)

    def step(self, state: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """One decode step: the inputs without their `t` axis (x (b, h, p), dt (b, h), ...);
        `state` (b, h, n, p) (or a cache of slots with `state_batch_indices`), float32, bfloat16
        or float16, is updated in place; returns y_t (b, h, p). Forward definitions only; see
        `ssmc.step`."""
        return step_op(self, state, *args, **kwargs)

    def decode(self, state: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """k tokens in one call (speculative decoding): the inputs with their `t` axis of size
        k; `state` is updated in place, or the state after each token written to the slots
        `state_out_indices` (b, k) names; returns y (b, k, h, p). See `ssmc.step`."""
        return decode_op(self, state, *args, **kwargs)

    def __repr__(self):
        return (f"<ssmc op {self.program.name} backend={self.backend_name} "
                f"lowering={self.lowering}>")


def compile(definition: Definition, backend: str = "auto", lowering: str = "auto") -> CompiledOp:  # noqa: A001
    """Compile a definition: `backend` in auto|triton|tvm|reference, `lowering` in
    auto|scan|chunked|quadratic. Kernels are built lazily for each call signature.

    A call whose inputs need gradients keeps, until its backward, what the backward would
    otherwise form again: for per-key decays on the chunked lowering the chunks' decayed
    scores, 64 values (fp32) per token, head and direction. Eager calls keep them, and so do
    calls under `torch.compile(..., fullgraph=True)` (or with dynamo's
    `capture_dynamic_output_shape_ops`): elsewhere a graph may not take an output whose size
    is known only at run time, and the backward forms the scores again. Inductor leaves such
    an op out of the CUDA graphs of `mode="reduce-overhead"` (calls without gradients keep
    nothing, so decode graphs are unaffected)."""
    if not isinstance(definition, Definition):
        hint = ""
        if isinstance(getattr(definition, "definition", None), Definition):
            # a built-in's keyword function: its definition is an attribute of it
            name = getattr(definition, "__qualname__", type(definition).__name__)
            hint = f"; pass its definition, {name}.definition"
        raise ArgumentError(f"ssmc.compile expects a function decorated with @ssmc.ssm, got "
                            f"{type(definition).__name__}{hint}")
    return CompiledOp(definition, backend, lowering)


# compiled ops of builder variants (ssmc.nn, ssmc.compat), in a plain dict: torch.compile traces
# a hit as a lookup (an lru_cache-wrapped builder would be traced into, rebuilding the
# definition). The first call with new options builds the op, so it must not be under tracing.
_VARIANTS: dict = {}


def compiled_variant(builder, options: tuple, backend: str = "auto",
                     lowering: str = "auto") -> CompiledOp:
    """The CompiledOp of `builder(**dict(options))`, built once per (options, backend, lowering);
    `options` is a sorted tuple of (name, value) pairs."""
    key = (builder, options, backend, lowering)
    op = _VARIANTS.get(key)
    if op is None:
        op = _VARIANTS[key] = compile(builder(**dict(options)), backend=backend,
                                      lowering=lowering)
    return op
