"""The Triton backend: generated source per Plan, cached on disk, imported and launched."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import sys
from pathlib import Path

import torch

from ...errors import BackendUnavailableError
from ...plan import Plan
from ..base import register_backend
from ..cache import cache_root, get_or_build_text


from .common import interpreting as _interpreting


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

    def is_available(self) -> bool:
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True

    def unavailable_reason(self) -> str:
        return "the triton package is not installed"

    def supports(self, plan: Plan) -> str | None:
        from .lowerings import LOWERINGS
        if plan.lowering not in LOWERINGS:
            return f"the {plan.lowering!r} lowering is not implemented in the Triton backend"
        return LOWERINGS[plan.lowering].supports(plan)

    def cache_tag(self) -> str:
        import triton
        return f"triton-{triton.__version__}-interp{int(_interpreting())}-gen{_generator_digest()}"

    def source(self, plan: Plan) -> str:
        from .lowerings import LOWERINGS
        return LOWERINGS[plan.lowering].render(plan)

    def load_module(self, plan: Plan):
        return self.load_generated(plan.cache_key(self.cache_tag()), lambda: self.source(plan))

    def load_generated(self, key: str, render):
        """Import the generated module cached under `key`, rendering it with `render()` on a
        miss (Triton needs the source in a file to jit it)."""
        path = cache_root("triton") / f"{key}.py"
        get_or_build_text(path, render)
        name = f"ssmc_triton_{key}"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
        return module

    def compile(self, plan: Plan, config=None):
        from .lowerings import LOWERINGS
        lowering = LOWERINGS[plan.lowering]
        module = self.load_module(plan)

        def kernel(tensors, sizes, initial_state=None, cu_seqlens=None):
            device = next(iter(tensors.values())).device
            if device.type != "cuda" and not _interpreting():
                raise BackendUnavailableError(
                    f"the Triton backend runs on CUDA tensors (got {device}); set "
                    "TRITON_INTERPRET=1 before importing triton to run it on the CPU, or use "
                    "backend='tvm' / 'reference'")
            with torch.cuda.device(device) if device.type == "cuda" else _nullcontext():
                return lowering.launch(module, plan, tensors, sizes, initial_state, cu_seqlens)

        from .backward import make_backward
        backward_impl = make_backward(self, plan)

        def backward(tensors, sizes, initial_state, cu_seqlens, grad_out, grad_final):
            """Gradients by generated Triton kernels (see backward.py)."""
            device = grad_out.device
            with torch.cuda.device(device) if device.type == "cuda" else _nullcontext():
                return backward_impl(tensors, sizes, initial_state, cu_seqlens, grad_out,
                                     grad_final)

        kernel.backward = backward
        return kernel


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


register_backend(TritonBackend())
