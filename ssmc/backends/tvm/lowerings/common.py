"""What the three lowerings share: the kernel specialisation, the function header, loads of
inputs at given indices, and the emission of prologue/epilogue expressions.

Generated kernels follow one calling convention (destination passing):
    inputs (in program order), [cu_seqlens], [initial_state], out, [final_state], [y_work],
    [GH]
with shapes
    input        its own axes, sizes b -> B, t -> TT (symbolic), h g n p specialised, the
                 order axis k (cross2d) one slice per direction
    cu_seqlens   (S1,) int32/int64; S1 - 1 sequences          (varlen plans only)
    states       (D, S, H, N, P); D = number of directions, S = B or the number of sequences
    out          (B, TT, H, P) in the plan's dtype
    y_work       (B, TT, H, P) in the accumulation dtype: the directions' y summed before the
                 epilogue (plans with several directions only; the epilogue is nonlinear in
                 y, so it must see the sum)
    GH           int64 scalar: the grid's height (cross2d plans only, last: their column
                 orders read t as a row-major GH x TT / GH grid; a runtime argument, so that
                 one function serves every image size, as it serves every b and t)
Work is parallel over (sequence, head); each task runs its directions one after the other.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import sympy as sp

from ....ir import Direction, Program
from ....plan import Plan
from ..render import ExprRenderer

#: (lowering name, target kind) -> generator of TVMScript text for a KernelSpec
LOWERINGS: dict[tuple[str, str], callable] = {}


def register_lowering(name: str, target: str = "llvm"):
    def deco(fn):
        LOWERINGS[(name, target)] = fn
        return fn
    return deco


def func_name(plan: Plan) -> str:
    return f"ssmc_{plan.lowering}_fwd"


def grid_args(program: Program, sizes: dict) -> list[int]:
    """The last argument of every function of a cross2d program: the grid's height (the width
    is t / height); nothing for other programs."""
    return [int(sizes["grid_h"])] if program.on_grid else []


@dataclass(frozen=True)
class KernelSpec:
    """One compiled function: a plan specialised to head/group/state/value sizes and dtypes."""

    plan: Plan
    H: int
    G: int
    N: int
    P: int
    input_dtypes: tuple[str, ...]      # per program input, torch dtype names
    cu_dtype: str | None = None        # "int32" / "int64" when varlen
    h0_dtype: str | None = None        # dtype of the initial state when given
    target: str = "llvm"               # "llvm" (CPU) or "cuda"
    arch: str | None = None            # "sm_90" for cuda

    @property
    def acc(self) -> str:
        """Accumulation dtype: float64 for float64 plans (gradcheck), float32 otherwise."""
        return "float64" if self.plan.dtype == "float64" else "float32"

    @property
    def state_dtype(self) -> str:
        return self.acc

    def tag(self) -> str:
        short = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64",
                 "int32": "i32", "int64": "i64"}
        parts = [f"h{self.H}g{self.G}n{self.N}p{self.P}",
                 "-".join(short.get(d, d) for d in self.input_dtypes)]
        if self.cu_dtype:
            parts.append("cu" + short[self.cu_dtype])
        if self.h0_dtype:
            parts.append("s" + short[self.h0_dtype])
        if self.target != "llvm":
            parts.append(self.target + (f"_{self.arch}" if self.arch else ""))
        return "_".join(parts)


class Writer:
    def __init__(self):
        self.lines: list[str] = []
        self.depth = 0

    def __call__(self, *texts: str):
        for text in texts:
            self.lines.append("    " * self.depth + text)

    @contextlib.contextmanager
    def block(self, header: str):
        self(header)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def i64(v: int) -> str:
    return f"T.int64({int(v)})"


class Emitter:
    """Builds one prim_func. Lowerings call `header()`, then write the per-(sequence, head)
    body with the helpers below."""

    def __init__(self, spec: KernelSpec):
        self.spec = spec
        self.plan = spec.plan
        self.program: Program = spec.plan.program
        self.w = Writer()
        self.acc = spec.acc
        self._count = itertools.count()
        self.renderer = ExprRenderer(self.acc, self._count)
        rec = self.program.recurrence
        self.directions = rec.directions
        self.D = len(self.directions)
        self.bidirectional = self.D > 1    # several directions: y summed in y_work
        self.order = 0                     # the direction `orders()` is at (inputs' k index)
        self.decay = rec.decay
        dax = set(rec.decay.axes) if rec.decay is not None else set()
        self.Nd = spec.N if "n" in dax else 1   # decay's extent over n
        self.Pd = spec.P if "p" in dax else 1   # ... and over p (full elementwise decay)
        self.varlen = self.plan.varlen
        self.has_state = self.plan.has_initial_state or self.plan.return_final_state

    # ---- header -------------------------------------------------------------------------
    def shape_of(self, axes) -> str:
        s = self.spec
        size = {"b": "B", "k": i64(self.D), "t": "TT", "h": i64(s.H), "g": i64(s.G),
                "n": i64(s.N), "p": i64(s.P)}
        dims = [size[a] for a in axes]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

    def header(self):
        s, w = self.spec, self.w
        args = [f"{self.buf(i.name)}_h: T.handle" for i in self.program.inputs]
        if self.varlen:
            args.append("cu_h: T.handle")
        if self.plan.has_initial_state:
            args.append("h0_h: T.handle")
        args.append("out_h: T.handle")
        if self.plan.return_final_state:
            args.append("hT_h: T.handle")
        if self.bidirectional:
            args.append("yw_h: T.handle")
        args += self.grid_params()
        name = func_name(self.plan)
        w("# from tvm.script import tirx as T", "@T.prim_func")
        w(f"def {name}({', '.join(args)}):")
        w.depth += 1  # the function body runs to the end of the text
        w(f'T.func_attr({{"global_symbol": "{name}", "tirx.noalias": True}})')
        w("B = T.int64()", "TT = T.int64()")
        if self.varlen:
            w("S1 = T.int64()")
        if self.has_state:
            w("S = T.int64()")
        self.match_inputs()
        if self.varlen:
            w(f'cu = T.match_buffer(cu_h, (S1,), "{s.cu_dtype}")')
        state_shape = f"({i64(self.D)}, S, {i64(s.H)}, {i64(s.N)}, {i64(s.P)})"
        if self.plan.has_initial_state:
            w(f'h0 = T.match_buffer(h0_h, {state_shape}, "{s.h0_dtype}")')
        w(f'out = T.match_buffer(out_h, (B, TT, {i64(s.H)}, {i64(s.P)}), "{self.plan.dtype}")')
        if self.plan.return_final_state:
            w(f'hT = T.match_buffer(hT_h, {state_shape}, "{s.state_dtype}")')
        if self.bidirectional:
            w(f'yw = T.match_buffer(yw_h, (B, TT, {i64(s.H)}, {i64(s.P)}), "{self.acc}")')

    def match_inputs(self):
        for inp, dt in zip(self.program.inputs, self.spec.input_dtypes):
            buf = self.buf(inp.name)
            self.w(f'{buf} = T.match_buffer({buf}_h, {self.shape_of(inp.axes)}, "{dt}")')

    def grid_params(self) -> list[str]:
        """The grid height's scalar parameter, last in every function of a cross2d plan."""
        return ["GH: T.int64"] if self.program.on_grid else []

    @staticmethod
    def buf(name: str) -> str:
        return f"in_{name}"

    @contextlib.contextmanager
    def tasks(self, cuda_p: bool = False):
        """The parallel loop over (sequence, head); defines s_, h_, b_, t0_, t1_, L_.
        With `cuda_p`: one CUDA block per (sequence, head) and one thread per p_ in it."""
        w, H = self.w, self.spec.H
        nseq = "(S1 - T.int64(1))" if self.varlen else "B"
        opened = 1
        if cuda_p:
            w(f'for sh_ in T.thread_binding({nseq} * {i64(H)}, thread="blockIdx.x"):')
            w.depth += 1
            w(f'for p_ in T.thread_binding({i64(self.spec.P)}, thread="threadIdx.x"):')
            opened = 2
        else:
            w(f"for sh_ in T.parallel({nseq} * {i64(H)}):")
        w.depth += 1
        w(f"s_ = sh_ // {i64(H)}", f"h_ = sh_ % {i64(H)}")
        if self.varlen:
            w("b_ = T.int64(0)",
              'v_t0_ = T.Cast("int64", cu[s_])',
              'v_t1_ = T.Cast("int64", cu[s_ + T.int64(1)])')
            # clamp so that a malformed cu_seqlens cannot index outside the tensors
            w("t0_ = T.max(T.min(v_t0_, TT), T.int64(0))",
              "t1_ = T.max(T.min(v_t1_, TT), t0_)")
        else:
            w("b_ = s_", "t0_ = T.int64(0)", "t1_ = TT")
        w("L_ = t1_ - t0_")
        try:
            yield
        finally:
            w.depth -= opened

    def alloc(self, name: str, shape: tuple[int, ...], dtype: str | None = None):
        dims = ", ".join(i64(d) for d in shape) + ("," if len(shape) == 1 else "")
        self.w(f'{name} = T.alloc_buffer(({dims}), "{dtype or self.acc}", scope="local")')

    def orders(self):
        """(index, direction) of each direction in the order a task runs them; while one is
        being emitted, loads read its slice of an input with the order axis k."""
        for d_index, direction in enumerate(self.directions):
            self.order = d_index
            yield d_index, direction
        self.order = 0

    def time_of(self, direction: Direction, pos: str) -> str:
        """The time index of position `pos` (0-based in traversal order) in this sequence: a
        column order's step u is grid row u % H, column u // H (cross2d: one whole grid per
        sequence, t0_ = 0)."""
        u = f"t1_ - T.int64(1) - ({pos})" if direction.reversed else f"t0_ + ({pos})"
        if not direction.column:
            return u
        return f"(({u}) % GH) * (TT // GH) + ({u}) // GH"

    # ---- expressions --------------------------------------------------------------------
    def index(self, t: str, n: str = "T.int64(0)", p: str = "T.int64(0)") -> dict[str, str]:
        hg = self.spec.H // self.spec.G
        g = "h_" if hg == 1 else f"h_ // {i64(hg)}"
        return {"b": "b_", "k": i64(self.order), "t": t, "h": "h_", "g": g, "n": n, "p": p}

    def loads(self, idx: dict[str, str], y: str | None = None) -> dict[str, str]:
        out = {}
        for inp, dt in zip(self.program.inputs, self.spec.input_dtypes):
            ref = f"{self.buf(inp.name)}[{', '.join(idx[a] for a in inp.axes)}]"
            if not inp.axes:  # a 0-d input
                ref = f"{self.buf(inp.name)}[()]"
            out[inp.name] = ref if dt == self.acc else f'T.Cast("{self.acc}", {ref})'
        if y is not None:
            out["y"] = y
        return out

    def value_of(self, expr: sp.Expr, idx: dict[str, str], y: str | None = None) -> str:
        """Emit the statements computing `expr` at `idx`; return the expression to use."""
        lines, value = self.renderer.render(expr, self.loads(idx, y))
        self.w(*lines)
        return value

    def store_out(self, t: str, y: str):
        """Apply the epilogue to y at (b_, t, h_, p_) and store it into `out`."""
        v = self.value_of(self.program.output.expr, self.index(t, p="p_"), y=y)
        if self.plan.dtype != self.acc:
            v = f'T.Cast("{self.plan.dtype}", {v})'
        self.w(f"out[b_, {t}, h_, p_] = {v}")

    def emit_y(self, d_index: int, t: str, y: str):
        """Hand y (at p_) of direction `d_index` on: to the workspace (every direction but the
        last adds its own), or with the others' sum to the epilogue (the last)."""
        if self.bidirectional and d_index < self.D - 1:
            y = y if d_index == 0 else f"yw[b_, {t}, h_, p_] + {y}"
            self.w(f"yw[b_, {t}, h_, p_] = {y}")
            return
        if self.bidirectional:
            y = f"({y} + yw[b_, {t}, h_, p_])"
        self.store_out(t, y)

    def state_index(self, d_index: int, n: str = "n_", p: str = "p_") -> str:
        return f"{i64(d_index)}, s_, h_, {n}, {p}"

    def load_h0(self, d_index: int, n: str = "n_", p: str = "p_") -> str:
        ref = f"h0[{self.state_index(d_index, n, p)}]"
        return ref if self.spec.h0_dtype == self.acc else f'T.Cast("{self.acc}", {ref})'

    def init_state(self, st: str, d_index: int):
        s = self.spec
        with self.w.block(f"for n_ in range({i64(s.N)}):"):
            with self.w.block(f"for p_ in range({i64(s.P)}):"):
                v = self.load_h0(d_index) if self.plan.has_initial_state else \
                    self.renderer.const(0)
                self.w(f"{st}[n_, p_] = {v}")

    def store_state(self, st: str, d_index: int):
        if not self.plan.return_final_state:
            return
        s = self.spec
        with self.w.block(f"for n_ in range({i64(s.N)}):"):
            with self.w.block(f"for p_ in range({i64(s.P)}):"):
                self.w(f"hT[{self.state_index(d_index)}] = {st}[n_, p_]")

    def finish(self) -> str:
        return self.w.text()
