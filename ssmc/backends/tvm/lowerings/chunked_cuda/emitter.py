"""The emitter every helper and pass of the lowering writes with: the specialisation's tiling,
the function header with the workspaces, small TVMScript pieces, and the chunk's log-decays
in shared memory (both parallel passes start with them)."""
from __future__ import annotations

import contextlib

from ...render import exp_call
from ..common import Emitter, KernelSpec, i64
from .support import unsupported
from .tiles import tiles
from .value_split import value_split


def L(x: str) -> str:
    return f'T.Cast("int64", {x})'


class ChunkedCudaEmitter(Emitter):
    """The common Emitter with this lowering's tiling (`t`, from the plan's tile pins) and the
    pieces that the copies (copies.py), the warp-level products (mma.py) and the passes share."""

    def __init__(self, spec: KernelSpec):
        super().__init__(spec)
        why = unsupported(spec.plan, spec.N, spec.P)
        if why is not None:
            raise ValueError(f"CUDA chunked lowering: {why}")
        self.t = tiles(spec.plan, spec.N, spec.P)
        self.has_decay = self.decay is not None
        self.zero = "T.float32(0.0)"
        # the value as a bare input times a row scale (evaluated once a step, into svs)
        self.vsplit = value_split(self.program)

    # ---- header: the common arguments, then the workspaces --------------------------------
    def header(self):
        super().header()
        w, s, t = self.w, self.spec, self.t
        extra = ", ws_h: T.handle, cd_h: T.handle" + (", cs_h: T.handle" if self.varlen else "")
        for k, line in enumerate(w.lines):
            if line.startswith("def "):
                w.lines[k] = line[:-2] + extra + "):"
                break
        w("NS = T.int64()")
        w(f'ws = T.match_buffer(ws_h, (NS, {i64(s.H)}, {i64(s.P)}, {i64(s.N)}), "{t.OT}")')
        w(f'cd = T.match_buffer(cd_h, (NS, {i64(s.H)}), "float32")')
        if self.varlen:
            w('cs = T.match_buffer(cs_h, (NS,), "int32")')

    # ---- small pieces -------------------------------------------------------------------
    @contextlib.contextmanager
    def fast_math(self):
        """Expressions rendered inside use approximate exp and division (plan.tile FM)."""
        before = self.renderer.fast
        self.renderer.fast = bool(self.t.FM)
        try:
            yield
        finally:
            self.renderer.fast = before

    def exp(self, x: str) -> str:
        """exp(x), approximate under plan.tile FM (values rounded to 16 bits afterwards)."""
        return exp_call(x, bool(self.t.FM))   # FM only with mma: fp32 math

    def shared(self, name, shape, dtype):
        dims = ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "")
        self.w(f'{name} = T.alloc_buffer(({dims}), "{dtype}", scope="shared")')

    def local(self, name, size, dtype):
        self.w(f'{name} = T.alloc_buffer(({size},), "{dtype}", scope="local")')

    def sync(self):
        self.w('T.tvm_storage_sync("shared")')

    def cast_ot(self, v: str) -> str:
        return v if self.t.OT == self.acc else f'T.Cast("{self.t.OT}", {v})'

    def lanes(self):
        self.w("wp_ = tx_ // 32", "ln_ = tx_ % 32", "g_ = ln_ // 4", "tg_ = ln_ % 4")

    def log_decays(self, direction, factors: bool = False):
        """slc[i] = running sum of log-decays over the chunk's first i + 1 steps (0 past cl_);
        with `factors`, also sfac[i] = exp(l_last - lc_i) (the sum of the log-decays after
        step i: exponent <= 0 for decays <= 1), the decay from step i to the chunk's end.
        Also svs[i] = the value's row scale at step i where it splits (value_split; 0 past
        cl_). Ends with a barrier (where it wrote anything)."""
        if not self.has_decay and self.vsplit is None:
            return
        w, Q = self.w, self.t.Q
        with w.block(f"if tx_ < {Q}:"):
            with w.block(f"if {L('tx_')} < cl_:"):
                w(f"t_ = {self.time_of(direction, 'c0_ + ' + L('tx_'))}")
                if self.vsplit is not None:
                    w(f"svs[tx_] = {self.value_of(self.vsplit[1], self.index('t_'))}")
                if self.has_decay:
                    ld = self.value_of(self.program.log_decay.expr, self.index("t_"))
                    w(f"sld[tx_] = {ld}")
            with w.block("else:"):
                if self.vsplit is not None:
                    w(f"svs[tx_] = {self.zero}")
                if self.has_decay:
                    w(f"sld[tx_] = {self.zero}")
        self.sync()
        if not self.has_decay:
            return
        with w.block(f"if tx_ < {Q}:"):
            w(f"run_[0] = {self.zero}")
            if factors:
                # one pass over all Q steps: the prefix up to i and the suffix after it
                w(f"run_[1] = {self.zero}")
                with w.block(f"for j_ in range({Q}):"):
                    w("ldj_ = sld[j_]",
                      f"run_[0] = run_[0] + T.if_then_else(j_ <= tx_, ldj_, {self.zero})",
                      f"run_[1] = run_[1] + T.if_then_else(j_ <= tx_, {self.zero}, ldj_)")
                w("sfac[tx_] = T.exp(run_[1])")
            else:
                # a fixed trip count (unrolled): the loads are independent of the sum and
                # issue together; the steps after tx_ add exact zeros
                with w.block(f"for j_ in T.unroll({Q}):"):
                    w(f"run_[0] = run_[0] + T.if_then_else(j_ <= tx_, sld[j_], {self.zero})")
            w("slc[tx_] = run_[0]")
        self.sync()

    def lc(self, i: str) -> str:
        return f"slc[{i}]" if self.has_decay else self.zero
