"""The TVM backend: TIR (as TVMScript) per lowering, compiled for LLVM (CPU) and for CUDA
(through nvcc; the library links only tvm_ffi). On CUDA, chunked plans run the chunked
lowering of lowerings/chunked_cuda/ (tensor cores for bf16/fp16) where it applies, and every
other plan runs the CUDA scan (`cuda_lowering`).

`compile(plan)` returns a kernel that specialises on first use to the call's head, group,
state and value sizes and the inputs' dtypes (b and t stay symbolic: one compiled function
serves every batch size and length, and a cross2d call's grid height is a scalar argument),
builds or loads that function through the on-disk cache, and calls it with the torch tensors
themselves (zero-copy through DLPack). Cross2d runs its four orders inside one kernel on the
LLVM lowerings and the CUDA scan (the CUDA chunked lowering takes at most two directions).

Every kernel also has `kernel.backward` (backward.py): the recurrence's gradient by TIR
functions compiled for the LLVM target, chosen by the decay and shared by every forward
lowering (they compute the same function): chunked (lowerings/chunked_bwd.py) for positive
decays with an exact log, the checkpointed scan (lowerings/scan_bwd.py) otherwise; the
elementwise parts by the chain rule shared with the Triton backend
(ssmc/backends/chain_rule.py). The backward has no CUDA target: for CUDA
tensors it runs that CPU code on host copies and copies the gradients back (correct, slow; on
a GPU `backend="auto"` picks Triton, whose backward runs on the device).
"""
from __future__ import annotations

import threading

import torch

from ...errors import DTypeError, UnsupportedError
from ...lowerings import legal_lowerings
from ...plan import Plan
from .. import matrix_rows
from ..base import SIGNED_DECAY_REASON, compute_dtype, register_backend
from .backward import make_backward
from .build import cached_function, host_cpu, tvm_version
from .lowerings import LOWERINGS, KernelSpec, func_name, grid_args
from .lowerings.chunked_cuda import unsupported, workspace_shapes
from .lowerings.matrix import FUNC_NAME as MATRIX_FUNC, render_matrix
from .render import unsupported_in
from .tiles import TVM_LOWERINGS

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _tvm_import_error() -> str | None:
    try:
        import tvm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means unavailable
        return f"{type(exc).__name__}: {exc}"
    return None


class TVMBackend:
    name = "tvm"

    def __init__(self):
        self._available: bool | None = None
        self._reason = ""
        self._matrix_kernels: dict[str, TVMKernel] = {}

    def is_available(self) -> bool:
        if self._available is None:
            err = _tvm_import_error()
            self._available = err is None
            self._reason = err or ""
        return self._available

    def unavailable_reason(self) -> str:
        self.is_available()
        return self._reason or "tvm is installed"

    def lowering(self, name: str):
        """The lowering's tile type and tuning space (`tiles.TVMLowering`), or None."""
        return TVM_LOWERINGS.get(name)

    def supports(self, plan: Plan) -> str | None:
        prog = plan.program
        if (plan.lowering, "llvm") not in LOWERINGS:
            return f"no TVM lowering named {plan.lowering!r}"
        if plan.lowering not in legal_lowerings(prog):
            return (f"lowering {plan.lowering!r} is not legal for decay kind "
                    f"{prog.decay_kind.value!r}")
        if prog.recurrence.transition.kind != "diagonal":
            return f"transition {prog.recurrence.transition.kind!r} is not implemented"
        if plan.dtype not in SUPPORTED_DTYPES:
            return f"dtype {plan.dtype} is not supported (supported: {', '.join(SUPPORTED_DTYPES)})"
        r = prog.recurrence
        parts = {"key": r.key, "value": r.value, "query": r.query, "decay": r.decay,
                 "output": prog.output}
        if plan.lowering == "chunked":
            if not prog.decay_log_safe:
                return SIGNED_DECAY_REASON
            parts["log_decay"] = prog.log_decay
        for role, node in parts.items():
            if node is None:
                continue
            bad = unsupported_in(node.expr)
            if bad is not None:
                return f"the {role} uses {bad}, which the TVM renderer does not know"
        return None

    def cache_tag(self) -> str:
        try:
            version, cpu = tvm_version(), host_cpu()
        except Exception:  # noqa: BLE001
            version, cpu = "unavailable", "generic"
        return f"tvm-{version}-llvm-{cpu}"

    def compile(self, plan: Plan, config: dict | None = None):
        why = self.supports(plan)
        if why is not None:
            raise UnsupportedError(f"{plan.program.name}: backend 'tvm' cannot run "
                                   f"{plan.describe()}: {why}")
        return TVMKernel(plan, plan.cache_key(self.cache_tag()), self.cache_tag())

    def source(self, plan: Plan, sizes: dict | None = None) -> str:
        """The TVMScript of `plan` for the LLVM target at head, group, key and value sizes
        `sizes` (TVM kernels specialise them), every input in the plan's dtype."""
        if sizes is None:
            raise UnsupportedError("TVM kernels specialise h, g, n and p: pass their sizes")
        spec = KernelSpec(target="llvm", arch=None, plan=plan, H=sizes["h"], G=sizes["g"],
                          N=sizes["n"], P=sizes["p"],
                          input_dtypes=tuple(plan.dtype for _ in plan.program.inputs),
                          cu_dtype="int32" if plan.varlen else None,
                          h0_dtype="float32" if plan.has_initial_state else None)
        return self.compile(plan).source(spec)

    # the hidden attention matrix (`ssmc.attention_matrix`): built by TIR on the CPU, its
    # gradient a block of rows at a time in torch (matrix_rows.py), as Triton's where its
    # kernels do not apply

    def attention_matrix(self, plan: Plan, tensors, sizes, reduce: str = "none"):
        """(b, h, t, t) in the compute dtype, summed or averaged over heads with `reduce`
        (a block of rows at a time where the per-head matrices would be large). CUDA tensors
        take the block-row torch path: the TVM matrix kernel is built for the LLVM target."""
        why = self.supports(plan)
        if why is not None or plan.lowering != "quadratic":
            raise UnsupportedError(f"{plan.program.name}: attention_matrix: "
                                   f"{why or 'it is built by the quadratic lowering'}")
        cdt = compute_dtype(plan)
        device = next(iter(tensors.values())).device
        per_head = sizes["b"] * sizes["h"] * sizes["t"] ** 2 * cdt.itemsize
        if device.type != "cpu" or (reduce != "none" and
                                    per_head > matrix_rows.REDUCE_IN_ROWS_BYTES):
            return matrix_rows.matrix(plan.program, tensors, sizes, cdt, reduce)
        key = plan.cache_key(self.cache_tag())
        kernel = self._matrix_kernels.get(key)
        if kernel is None:
            kernel = self._matrix_kernels.setdefault(key, TVMKernel(plan, key, self.cache_tag()))
        M = kernel.matrix(tensors, sizes)
        return matrix_rows.reduce_heads(M.unsqueeze(2), reduce, channels=False)

    def attention_matrix_backward(self, plan: Plan, tensors, sizes, grad, reduce: str = "none"):
        cdt = compute_dtype(plan)
        return matrix_rows.matrix_backward(plan.program, tensors, sizes, cdt, grad, reduce)


class TVMKernel:
    """kernel(tensors, sizes, initial_state, cu_seqlens) -> (out, final state or None), and
    kernel.backward(tensors, sizes, initial_state, cu_seqlens, grad_out, grad_final) ->
    (grads by input name, grad_initial_state): the recurrence's gradient by TIR functions
    compiled for the LLVM target (backward.py: chunked or scan by the decay, for every forward
    lowering), the elementwise parts by the shared chain rule (ssmc/backends/chain_rule.py).
    CUDA tensors are differentiated on host copies by the same CPU code."""

    def __init__(self, plan: Plan, key: str, backend_tag: str = ""):
        self.plan = plan
        self.key = key
        self.backend_tag = backend_tag
        self._functions: dict = {}
        self._bwd_functions: dict = {}
        self._lock = threading.Lock()
        self.out_dtype = getattr(torch, plan.dtype)
        self.state_dtype = compute_dtype(plan)
        self.backward = make_backward(self)

    def spec_for(self, tensors, sizes, initial_state, cu_seqlens, device=None):
        prog = self.plan.program
        target, arch = "llvm", None
        if device is not None and device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            target, arch = "cuda", f"sm_{major}{minor}"
        return KernelSpec(
            target=target, arch=arch,
            plan=self.plan, H=int(sizes["h"]), G=int(sizes["g"]), N=int(sizes["n"]),
            P=int(sizes["p"]),
            input_dtypes=tuple(str(tensors[i.name].dtype).split(".")[1] for i in prog.inputs),
            cu_dtype=None if cu_seqlens is None else str(cu_seqlens.dtype).split(".")[1],
            h0_dtype=None if initial_state is None else str(initial_state.dtype).split(".")[1])

    def lowering_for(self, spec) -> str:
        """The lowering that runs this specialisation: the plan's on the CPU; on CUDA the
        chunked one where `chunked_cuda.unsupported` allows it, otherwise the scan (every
        lowering computes the same function, and the scan runs every plan)."""
        if spec.target != "cuda":
            return self.plan.lowering
        return cuda_lowering(self.plan, spec.N, spec.P)

    def source(self, spec) -> str:
        return LOWERINGS[(self.lowering_for(spec), spec.target)](spec)

    def function(self, spec, name: str | None = None):
        """The compiled function of `spec`: the forward's, or the matrix kernel's
        (name=MATRIX_FUNC), built or loaded once per spec."""
        key = spec if name is None else (name, spec)
        fn = self._functions.get(key)
        if fn is None:
            with self._lock:
                fn = self._functions.get(key)
                if fn is None:
                    tag, source, fname = ((spec.tag(), self.source(spec), func_name(self.plan))
                                          if name is None else
                                          (spec.tag() + "_matrix", render_matrix(spec), name))
                    fn = self._functions[key] = cached_function(self.key, tag, source, fname,
                                                                spec.arch)
        return fn

    def matrix(self, tensors, sizes) -> torch.Tensor:
        """The hidden attention matrix (b, h, t, t) of one unpacked CPU batch
        (lowerings/matrix.py), in the accumulation dtype."""
        prog = self.plan.program
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        fn = self.function(self.spec_for(tensors, sizes, None, None), MATRIX_FUNC)
        B, T, H = (int(sizes[a]) for a in "bth")
        M = torch.zeros(B, H, T, T, dtype=self.state_dtype)
        if M.numel():
            fn(*(tensors[i.name] for i in prog.inputs), M)
        return M

    def __call__(self, tensors, sizes, initial_state=None, cu_seqlens=None):
        plan, prog = self.plan, self.plan.program
        if (initial_state is not None) != plan.has_initial_state or \
                (cu_seqlens is not None) != plan.varlen:
            raise UnsupportedError(f"{prog.name}: this kernel was compiled for "
                                   f"{plan.describe()}; the call's state/cu_seqlens differ")
        device = next(iter(tensors.values())).device
        lowering = plan.lowering
        if device.type == "cuda":
            # the CUDA target (nvcc, a library that needs only tvm_ffi): the chunked lowering
            # where it applies, the scan for everything else
            lowering = cuda_lowering(plan, int(sizes["n"]), int(sizes["p"]))
            if lowering == "scan" and sizes["p"] > 1024:
                raise UnsupportedError(f"{prog.name}: the TVM CUDA scan runs one thread per "
                                       f"value channel; p={sizes['p']} > 1024")
        elif device.type != "cpu":
            raise DTypeError(f"{prog.name}(): the TVM backend runs on the CPU (LLVM) and on "
                             f"CUDA; tensors are on {device}")
        # TVM's DLPack import rejects strided views ("Mismatched strides"), so a
        # non-contiguous argument is copied here; contiguous ones go in as they are.
        tensors = {k: v if v.is_contiguous() else v.contiguous() for k, v in tensors.items()}
        if initial_state is not None and not initial_state.is_contiguous():
            initial_state = initial_state.contiguous()
        if cu_seqlens is not None and not cu_seqlens.is_contiguous():
            cu_seqlens = cu_seqlens.contiguous()
        fn = self.function(self.spec_for(tensors, sizes, initial_state, cu_seqlens, device))
        B, T, H, N, P = (int(sizes[a]) for a in "bthnp")
        D = len(prog.recurrence.directions)
        S = B if cu_seqlens is None else cu_seqlens.numel() - 1
        args = [tensors[i.name] for i in prog.inputs]
        if cu_seqlens is not None:
            args.append(cu_seqlens)
        if initial_state is not None:
            # kernels see states as (directions, S, H, N, P): a view, not a copy
            args.append(initial_state if D > 1 else initial_state.unsqueeze(0))
        out = torch.empty(B, T, H, P, dtype=self.out_dtype, device=device)
        args.append(out)
        final = None
        if plan.return_final_state:
            final = torch.empty(D, S, H, N, P, dtype=self.state_dtype, device=device)
            args.append(final)
        if D > 1:
            acc = compute_dtype(plan)
            args.append(torch.empty(B, T, H, P, dtype=acc, device=device))
        if device.type == "cuda" and lowering == "chunked":
            for _, shape, dt in workspace_shapes(plan, B, T, S, H, N, P):
                args.append(torch.empty(shape, dtype=getattr(torch, dt), device=device))
        args += grid_args(prog, sizes)
        if B * T > 0:
            fn(*args)
        elif final is not None:   # no step to run: each direction's state passes through
            # (and TVM's DLPack import refuses zero-size views whose strides are not compact)
            if initial_state is None:
                final.zero_()
            else:
                final.copy_(initial_state if D > 1 else initial_state.unsqueeze(0))
        if final is not None and D == 1:
            final = final[0]
        return out, final


def cuda_lowering(plan: Plan, N: int, P: int) -> str:
    """The lowering the CUDA target runs for `plan` at key/value sizes N, P: "chunked" for
    chunked plans that lowerings/chunked_cuda.py implements (tensor cores for bf16/fp16),
    "scan" otherwise (quadratic plans, per-key decays, float64, ...)."""
    if plan.lowering == "chunked":
        if unsupported(plan, N, P) is None:
            return "chunked"
    return "scan"


register_backend(TVMBackend())
