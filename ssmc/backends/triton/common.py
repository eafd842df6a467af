"""What every Triton lowering shares: kernel signatures, host-side buffers, launch checks."""
from __future__ import annotations

import os

import torch

from ...ir import Program
from ...plan import Plan
from ..base import compute_dtype
from .render import Context, Emitter, Tile, arg_names

HEADER = "import triton\nimport triton.language as tl\n\n"


def compute_type(plan: Plan) -> str:
    """fp32 math for every input dtype (fp64 inputs keep fp64, so gradcheck can run)."""
    return "tl.float64" if plan.dtype == "float64" else "tl.float32"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fp32_precision() -> str:
    """`input_precision` of fp32 matmuls: three TF32 passes (tf32x3, fp32-level accuracy) on
    the tensor cores of a GPU; plain fp32 under the interpreter. "ieee" on a GPU runs the
    matmuls on the CUDA cores and was 75x slower than bf16 for the chunked SSD forward on the
    H100 (161 ms at b=8 t=4096 h=80 n=128 p=64)."""
    return "ieee" if interpreting() else "tf32x3"


def precision_arg(plan: Plan) -> str:
    """The `input_precision` argument the forward's matmuls pass to tl.dot (`fp32_precision`
    for fp32 plans; nothing for others)."""
    return f', input_precision="{fp32_precision()}"' if plan.dtype == "float32" else ""


def dot_type(plan: Plan) -> str:
    """Matmul operand type: the input's 16-bit type feeds the tensor cores; fp32 stays fp32.

    Under the interpreter, 16-bit operands of tl.dot come out as garbage (it holds them as raw
    integers), so interpreted kernels keep fp32 operands; the cache tag tells the two apart.
    """
    if interpreting() and plan.dtype in ("bfloat16", "float16"):
        return "tl.float32"
    return {"bfloat16": "tl.bfloat16", "float16": "tl.float16", "float32": "tl.float32",
            "float64": "tl.float64"}[plan.dtype]



def input_params(program: Program) -> str:
    return ", ".join(n for inp in program.inputs for n in arg_names(inp))


def input_args(program: Program, tensors: dict, order: int | None = 0) -> list:
    """Each input's tensor and strides; an input with the order axis `k` (cross2d) as its
    slice `order`, a view of size 1 along k (kernels read k index 0), or whole where `order`
    is None (kernels that index k themselves: a tile with `k` fixed)."""
    args = []
    for inp in program.inputs:
        x = tensors[inp.name]
        if "k" in inp.axes and order is not None:
            x = x.narrow(inp.axes.index("k"), order, 1)
        args.append(x)
        args.extend(x.stride())
    return args


def next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def num_sequences(sizes: dict, cu_seqlens) -> int:
    return sizes["b"] if cu_seqlens is None else cu_seqlens.numel() - 1


def direction_slices(plan: Plan, state: torch.Tensor | None):
    """Per-direction views of a state tensor ((2, ...) when bidirectional)."""
    dirs = plan.program.recurrence.directions
    if state is None:
        return [None] * len(dirs)
    if len(dirs) == 1:
        return [state]
    return [state[i] for i in range(len(dirs))]


class Outputs:
    """The buffers every forward launch fills: the output (b, t, h, p), the final states of all
    directions (directions, sequences, h, n, p) or None, the fp32 accumulator that sums the
    directions of a bidirectional op before its epilogue, and the initial state per direction."""

    def __init__(self, plan: Plan, tensors: dict, sizes: dict, initial_state, cu_seqlens,
                 final_out: torch.Tensor | None = None, output: bool = True):
        prog = plan.program
        B, T, H, N, P = (sizes[a] for a in "bthnp")
        self.device = tensors[prog.inputs[0].name].device
        self.S = num_sequences(sizes, cu_seqlens)
        self.dirs = prog.recurrence.directions
        self.cdt = compute_dtype(plan)
        nd = len(self.dirs)
        # without `output` (the final state alone) an empty stand-in: launches pass it for
        # pointers they do not read
        self.out = torch.empty((B, T, H, P) if output else (0,), dtype=getattr(torch, plan.dtype),
                               device=self.device)
        self.final_out = final_out
        self.final = None
        if final_out is not None:
            want = (self.S, H, N, P) if nd == 1 else (nd, self.S, H, N, P)
            if (tuple(final_out.shape) != want or final_out.dtype != self.cdt
                    or final_out.device != self.device or not final_out.is_contiguous()):
                raise ValueError(f"launch: final_out must be a contiguous {self.cdt} tensor of "
                                 f"shape {want} on {self.device}, got {final_out.dtype} "
                                 f"{tuple(final_out.shape)} on {final_out.device}")
            self.final = final_out.view(nd, self.S, H, N, P)
        elif plan.return_final_state:
            self.final = torch.empty((nd, self.S, H, N, P), dtype=self.cdt, device=self.device)
        self.empty = self.out.numel() == 0 and self.final is None
        # not zeroed: the first direction stores its part (an atomic sum zeroes it first)
        self.yacc = (torch.empty(B, T, H, P, dtype=self.cdt, device=self.device)
                     if nd > 1 and output else self.out)
        self.h0s = direction_slices(plan, initial_state)

    def result(self):
        """(out, final state in the op's layout: (S, h, n, p), or (2, S, h, n, p) if bidirectional)."""
        if self.final_out is not None:
            return self.out, self.final_out
        if self.final is not None and len(self.dirs) == 1:
            return self.out, self.final[0]
        return self.out, self.final


def emit_output(emit: Emitter, program: Program, tile: Tile, compute: str, t: str, p: str,
                mask: str) -> None:
    """Store `y` (the recurrence's result on `tile`): into the fp32 accumulator while more
    directions follow (ACCUM_IN adds the earlier ones), else through the fused epilogue into the
    output. `t` and `p` index expressions shaped like `y`; `mask` covers both."""
    emit(f"y_off = ((b_idx * T + {t}) * H + h_idx) * P + {p}")
    emit("if ACCUM_IN:")
    with emit.block():
        emit(f"y += tl.load(yacc_ptr + y_off, mask={mask}, other=0.0)")
    emit("if WRITE_OUT:")
    with emit.block():
        epi = Context(program, tile, emit, "e", compute, extra={"y": "y"})
        out = epi.value(program.output, "out")
        emit(f"tl.store(out_ptr + b_idx * s_out_b + {t} * s_out_t + h_idx * s_out_h + "
             f"{p} * s_out_p, {out}.to(out_ptr.dtype.element_ty), mask={mask})")
    emit("else:")
    with emit.block():
        emit(f"tl.store(yacc_ptr + y_off, y, mask={mask})")


def chunk_layout(sizes, cu_seqlens, BT, device):
    """Number of chunks overall; for packed batches, each sequence's first chunk and the
    sequence of every chunk."""
    if cu_seqlens is None:
        return sizes["b"] * ((sizes["t"] + BT - 1) // BT), None, None
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).cpu().to(torch.int64)
    counts = (lengths + BT - 1) // BT
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    seq_of = torch.repeat_interleave(torch.arange(len(counts)), counts)
    return int(offsets[-1]), offsets.to(device), seq_of.to(device)
