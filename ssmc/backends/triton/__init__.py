"""The Triton backend: generated source per Plan, cached on disk, imported and launched.

triton is an optional dependency (Linux only): this module imports without it, and the
modules that generate and launch kernels (`lowerings`, `backward`) are imported on first use.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from ... import config
from ...errors import BackendUnavailableError, UnsupportedError
from ...plan import Plan
from ..base import register_backend
from .. import matrix_rows
from ..cache import cache_root, get_or_build_text
from .common import compute_dtype, interpreting



def _lowerings() -> dict:
    """The registered Triton lowerings (imports triton on first use)."""
    return importlib.import_module(f"{__name__}.lowerings").LOWERINGS


@functools.lru_cache(maxsize=None)
def _generator_digest() -> str:
    """A hash of the code generator itself, so a changed generator never reuses old kernels."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


class TritonBackend:
    name = "triton"

    def __init__(self):
        #: (cache directory, key) -> the generated module loaded from it (`load_generated`)
        self._loaded: dict[tuple[str, str], object] = {}

    def is_available(self) -> bool:
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True

    def unavailable_reason(self) -> str:
        return "the triton package is not installed"

    def lowering(self, name: str):
        """The registered lowering object (`lowerings.registry.TritonLowering`), or None."""
        return _lowerings().get(name)

    def supports(self, plan: Plan) -> str | None:
        lowering = self.lowering(plan.lowering)
        if lowering is None:
            return f"the {plan.lowering!r} lowering is not implemented in the Triton backend"
        if plan.program.on_grid and not lowering.grid_orders:
            return (f"the {plan.lowering!r} lowering does not implement scan orders over a grid "
                    "(direction='cross2d')")
        return lowering.supports(plan)

    def cache_tag(self) -> str:
        triton = importlib.import_module("triton")
        return f"triton-{triton.__version__}-interp{int(interpreting())}-gen{_generator_digest()}"

    def source(self, plan: Plan, sizes: dict | None = None) -> str:
        """The generated module of `plan` (Triton kernels take every size at run time)."""
        return self.lowering(plan.lowering).render(plan)

    def load_module(self, plan: Plan):
        return self.load_generated(plan.cache_key(self.cache_tag()), lambda: self.source(plan))

    def load_generated(self, key: str, render):
        """Import the generated module cached under `key`, rendering it with `render()` on a
        miss (Triton needs the source in a file to jit it). The file is read and its hash
        checked on the first load per cache directory in a process; later loads are a dict
        lookup (the key hashes everything the source depends on)."""
        memo = (str(config.cache_dir()), key)
        module = self._loaded.get(memo)
        if module is not None:
            return module
        path = cache_root("triton") / f"{key}.py"
        get_or_build_text(path, render)
        name = f"ssmc_triton_{key}"
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[name] = module
        self._loaded[memo] = module
        return module

    def compile(self, plan: Plan, config=None):
        lowering = self.lowering(plan.lowering)
        module = self.load_module(plan)

        def on_device(run):
            """`run(tensors, sizes, initial_state, cu_seqlens)` launched on the tensors'
            device, once it is checked to be one Triton runs on."""
            def launch(tensors, sizes, initial_state=None, cu_seqlens=None):
                device = next(iter(tensors.values())).device
                _check_device(device)
                with _on(device):
                    return run(tensors, sizes, initial_state, cu_seqlens)
            return launch

        kernel = on_device(lambda *call: lowering.launch(module, plan, *call))
        if lowering.final_state is not None:
            # the final state alone (the lowering's state pass)
            kernel.final_state = on_device(
                lambda *call: lowering.final_state(module, plan, *call))

        backward_module = importlib.import_module(f"{__name__}.backward")
        backward_impl = backward_module.make_backward(self, plan)

        def backward(tensors, sizes, initial_state, cu_seqlens, grad_out, grad_final,
                     residual=None):
            """Gradients by generated Triton kernels (see backward.py)."""
            device = grad_out.device
            with _on(device):
                return backward_impl(tensors, sizes, initial_state, cu_seqlens, grad_out,
                                     grad_final, residual)

        if lowering.keeps and backward_module.reads_kept(plan):
            def keeping(*call):
                """The forward, and what it formed that the backward would form again."""
                keep = []
                out, final = lowering.launch(module, plan, *call, keep=keep)
                return out, final, backward_module.residual_of(keep, out.device)
            kernel.forward_keep = on_device(keeping)

        kernel.backward = backward
        return kernel

    def compile_step(self, plan: Plan):
        """Decode steps, `step(tensors, sizes, state, slots=None, out_slots=None) -> y (b, t,
        h, p)`: the generated step kernel (lowerings/step.py), which reads each state element
        once and writes it once, in place or into the `out_slots` of the state cache. With
        t = 1 the inputs may leave out their `t` axis and `out_slots` may be (b,)."""
        step_lowering = importlib.import_module(f"{__name__}.lowerings.step")
        module = self.load_generated(f"step_{plan.cache_key(self.cache_tag())}",
                                     lambda: step_lowering.render(plan))
        launch = step_lowering.make_launch(module, plan)

        def check(device):
            if device.type != "cuda" and not interpreting():
                raise BackendUnavailableError(
                    f"{plan.program.name}.step(): the Triton backend runs on CUDA tensors (got "
                    f"{device}); use backend='tvm' or 'reference' on the CPU")

        def step(tensors, sizes, state, slots=None, out_slots=None):
            device = state.device
            check(device)
            if device.type != "cuda" or device.index == torch.cuda.current_device():
                return launch(tensors, sizes, state, slots, out_slots)
            with torch.cuda.device(device):
                return launch(tensors, sizes, state, slots, out_slots)

        def bind(tensors, sizes, state, slots=None, out_slots=None):
            """`launch.bind` (lowerings/step.py) on the tensors' device: the launch for tensors
            with these metadata, every argument but the tensors computed once."""
            device = state.device
            check(device)
            fixed = launch.bind(tensors, sizes, state, slots, out_slots)
            if device.type != "cuda":
                return fixed
            index = device.index
            current = torch.cuda.current_device

            def on_device(inputs, state, slots=None, out_slots=None, out=None):
                if current() == index:
                    return fixed(inputs, state, slots, out_slots, out)
                with torch.cuda.device(index):
                    return fixed(inputs, state, slots, out_slots, out)

            return on_device

        step.bind = bind
        return step

    def attention_matrix(self, plan: Plan, tensors, sizes, reduce: str = "none"):
        """The hidden attention matrix (b, h, t, t) by the quadratic lowering's matrix kernel
        (`ssmc.attention_matrix`); summed or averaged over heads after it with `reduce`, unless
        the per-head matrices would take more than matrix_rows.REDUCE_IN_ROWS_BYTES: then a block of rows
        at a time in torch, reduced per block."""
        if plan.lowering != "quadratic":
            raise UnsupportedError(f"{plan.program.name}: attention_matrix is built by the "
                                   f"quadratic lowering, not {plan.lowering!r}")
        per_head = sizes["b"] * sizes["h"] * sizes["t"] ** 2 * compute_dtype(plan).itemsize
        if reduce != "none" and per_head > matrix_rows.REDUCE_IN_ROWS_BYTES:
            return matrix_rows.matrix(plan.program, tensors, sizes, compute_dtype(plan), reduce)
        quadratic = importlib.import_module(f"{__name__}.lowerings.quadratic_launch")
        M = quadratic.attention_matrix(self.load_module(plan), plan, tensors, sizes)
        return matrix_rows.reduce_heads(M.unsqueeze(2), reduce, channels=False)

    def attention_matrix_backward(self, plan: Plan, tensors, sizes, grad, reduce: str = "none"):
        """Input gradients of `attention_matrix`: the kernels of mixing_loss.py that read dM
        tile by tile where they apply, else autograd a block of rows at a time in torch onto
        the operands (`matrix_rows.py`); then the chain rule."""
        fused = importlib.import_module(f"{__name__}.mixing_loss")
        if fused.fused(plan) is not None:
            return matrix_rows.matrix_backward(plan.program, tensors, sizes,
                                               compute_dtype(plan), grad, reduce)
        _check_device(grad.device)
        with _on(grad.device):
            return fused.matrix_backward(plan, tensors, sizes, grad, reduce)

    def mixing_loss(self, plan: Plan, tensors, sizes, q, k, scale: float,
                    keep: list | None = None) -> torch.Tensor:
        """(b, h) matrix-matching losses: the fused kernels (mixing_loss.py) where they apply,
        else block rows in torch. `keep`: a list the fused kernels' host-side operands are
        appended to for the backward (`mixing_loss.Prepared`), where they are small."""
        fused = importlib.import_module(f"{__name__}.mixing_loss")
        if fused.fused(plan) is not None:
            return matrix_rows.mixing_loss(plan.program, tensors, sizes, q, k, scale,
                                           compute_dtype(plan))
        _check_device(q.device)
        with _on(q.device):
            return fused.loss(plan, tensors, sizes, q, k, scale, keep)

    def mixing_loss_backward(self, plan: Plan, tensors, sizes, q, k, scale: float, grad,
                             prepared=None):
        """(input gradients, dq, dk); `prepared`: what the forward kept (`keep`), if any."""
        fused = importlib.import_module(f"{__name__}.mixing_loss")
        if fused.fused(plan) is not None:
            return matrix_rows.mixing_loss_backward(plan.program, tensors, sizes, q, k, scale,
                                                    compute_dtype(plan), grad)
        _check_device(q.device)
        with _on(q.device):
            return fused.loss_backward(plan, tensors, sizes, q, k, scale, grad, prepared)


def _check_device(device: torch.device) -> None:
    if device.type != "cuda" and not interpreting():
        raise BackendUnavailableError(
            f"the Triton backend runs on CUDA tensors (got {device}); set "
            "TRITON_INTERPRET=1 before importing triton to run it on the CPU, or use "
            "backend='tvm' / 'reference'")


def _on(device: torch.device):
    """The device's context for launches (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


register_backend(TritonBackend())
