"""Decode steps: k tokens (k >= 1, usually 1) from a state that is read once and written once.

One program per (sequence, head, p-block) holds its n x BP tile of the state in registers: it
loads the tile once (in the state's own dtype, fp32/bf16/fp16, at any strides), runs the k steps
in fp32 with the prologue and epilogue fused, and stores the tile once, back in place or (for
speculative decoding) after every token into the slot `state_out_indices[b, t]` names. With
`state_batch_indices` sequence b reads and writes slot `state_batch_indices[b]` of a state cache;
a negative slot (padding) or one past the cache is skipped: its state is neither read nor
written and its outputs are zeros. Nothing here synchronises with the host or allocates more than
the output, so a step can be captured in a CUDA graph.

A decay of magnitude below exp(RESET_BELOW) (exactly 0 included) resets the state exactly, as
the forward's log-space kernels treat it; negative decays multiply as they are.
"""
from __future__ import annotations

import math

import torch

from ....plan import Plan
from ..common import HEADER, compute_type, next_pow2
from ..render import Context, Emitter, Tile, arg_names, tile_mask
from ..templates import RESET_BELOW

FIXED = {"b": "b_idx", "t": "t_idx", "h": "h_idx", "g": "g_idx"}
#: |decay| below this is an exact reset (the forward's log-decay threshold, RESET_BELOW)
RESET_MAGNITUDE = math.exp(RESET_BELOW)


#: bytes of state one program holds (n x BP in the state's dtype)
TILE_BYTES = 32768
#: state values per program from which it runs 8 warps (fewer: 4)
WIDE_TILE = 4096


def step_blocks(N: int, P: int, state_bytes: int, tile: dict | None = None) -> dict:
    """BN (all of n: y sums over it), BP and num_warps of the step kernel: a p-block of
    TILE_BYTES of state, 8 warps from WIDE_TILE values. Measured on an H100 (h=80 p=64 n=128,
    b=64 and 256, benchmarks/RESULTS.md): 4 warps ran an fp32 state at 0.91-0.93x mamba_ssm's
    step, 8 warps at 0.97-1.03x; a bf16 state in p-blocks of 64 with 8 warps at 1.37-1.71x
    (p-blocks of 32, 4 warps: 0.87-1.05x). Narrower p-blocks (8, 16) were 1.5-3x slower: the
    state's p axis is its contiguous one. An fp32 state in p-blocks of 64 (32 KB) ran 2% faster
    than in blocks of 32 (b=64: 126.4 against 129.2 us; b=256: 488.7 against 498.6); 16 warps
    were 10% slower. A small tile (Mamba-1's n = 16 or 32 with p = 1) gets no more warps than
    it has 32-value rows for: more only hold copies of other warps' values, and on an H100
    (Triton 3.6) the [32, 2] tile over 4 warps, whose sum over n crosses warps, changed its
    output between calls on the same inputs about once in 100-200 calls, wrong ones among them
    (mamba_ssm's batch-index step tests; on 2 warps none in 2160 calls, RESULTS.md). `tile`
    (plan.tile) may set BP and num_warps."""
    tile = tile or {}
    BN = max(next_pow2(N), 2)
    BP = tile.get("BP") or max(min(next_pow2(P), max(TILE_BYTES // (BN * state_bytes), 2)), 2)
    warps = tile.get("num_warps") or min(8 if BN * BP >= WIDE_TILE else 4,
                                         max(BN * BP // 32, 1))
    return dict(BN=BN, BP=BP, num_warps=warps)


def _operand(ctx: Context, node, name: str) -> None:
    var = ctx.value(node, f"{name}_raw")
    mask = tile_mask(ctx.tile, [a for a in node.axes if a in ("n", "p")])
    ctx.emit(f"{name} = {var}" if mask is None else f"{name} = tl.where({mask}, {var}, 0.0)")


def render(plan: Plan) -> str:
    prog = plan.program
    rec = prog.recurrence
    ct = compute_type(plan)
    state_tile = Tile([("n", "offs_n", "mask_n"), ("p", "offs_p", "mask_p")], FIXED)
    out_tile = Tile([("p", "offs_p", "mask_p")], FIXED)

    pre = Emitter(indent=2)     # once per program: operands without a time axis
    body = Emitter(indent=3)    # per token
    outer = Context(prog, state_tile, pre, "c", ct)
    inner = Context(prog, state_tile, body, "s", ct)
    for name in ("decay", "key", "value", "query"):
        node = getattr(rec, name)
        if node is not None:
            _operand(inner if "t" in node.axes else outer, node, name)
    if rec.decay is not None:
        ctx = inner if "t" in rec.decay.axes else outer
        ctx.emit(f"decay = tl.where(tl.abs(decay) < {RESET_MAGNITUDE!r}, 0.0, decay)")
        body("state = decay * state + key * value")
    else:
        body("state = state + key * value")
    # the state is stored as soon as it is updated: held through y's layout change and the
    # epilogue's loads, its tile cost the bf16 kernel a block per SM (ptxas, RESULTS.md)
    body("if HAS_OUT_SLOTS:")
    body("    dst = tl.load(oslot_ptr + b_idx * s_oslot_b + t_idx * s_oslot_t).to(tl.int64)")
    body("    if (dst >= 0) & (dst < SLOTS):")
    body("        tl.store(state_ptr + (dst * s_state_b + head_off) + tile_off, "
         "state.to(state_ptr.dtype.element_ty), mask=state_mask)")
    body("elif t_idx == T - 1:")
    body("    tl.store(state_base + tile_off, state.to(state_ptr.dtype.element_ty), "
         "mask=state_mask)")
    body("y = tl.sum(query * state, axis=0)")
    epi = Context(prog, out_tile, body, "e", ct, extra={"y": "y"})
    out = epi.value(prog.output, "out")
    body(f"tl.store(out_ptr + b_idx * s_out_b + t_idx * s_out_t + h_idx * s_out_h + "
         f"offs_p * s_out_p, {out}.to(out_ptr.dtype.element_ty), mask=mask_p)")

    # the pointers first, then the integers: a bound launch (make_launch) passes the tensors
    # of a call followed by integers fixed once, with no list to fill per call
    names = [arg_names(i) for i in prog.inputs]
    pointers = ", ".join(n[0] for n in names)
    strides = ", ".join(s for n in names for s in n[1:])
    return HEADER + f'''
@triton.jit
def ssmc_step_fwd(
    {pointers}, out_ptr, state_ptr, slot_ptr, oslot_ptr,
    {strides},
    s_out_b, s_out_t, s_out_h, s_out_p,
    s_state_b, s_state_h, s_state_n, s_state_p, s_oslot_b, s_oslot_t,
    T, SLOTS, H, HPG, N, P, NPB,
    BN: tl.constexpr, BP: tl.constexpr, HAS_SLOTS: tl.constexpr,
    HAS_OUT_SLOTS: tl.constexpr,
):
    # programs in the state's memory order, (b, h, p-block) with the p-block fastest: those
    # running at once read neighbouring tiles
    pid = tl.program_id(0)
    pid_p = pid % NPB
    pid_bh = (pid // NPB).to(tl.int64)
    h_idx = pid_bh % H
    b_idx = pid_bh // H
    g_idx = h_idx // HPG
    offs_n = tl.arange(0, BN)
    mask_n = offs_n < N
    offs_p = pid_p * BP + tl.arange(0, BP)
    mask_p = offs_p < P
    if HAS_SLOTS:
        slot = tl.load(slot_ptr + b_idx).to(tl.int64)
    else:
        slot = b_idx
    # the head's offset a scalar added to the base once: folded into every element's offset
    # it held 14 registers (ptxas, RESULTS.md)
    head_off = h_idx * s_state_h
    tile_off = (offs_n[:, None].to(tl.int64) * s_state_n
                + offs_p[None, :].to(tl.int64) * s_state_p)
    state_mask = mask_n[:, None] & mask_p[None, :]
    if (slot >= 0) & (slot < SLOTS):
        state_base = state_ptr + (slot * s_state_b + head_off)
        state = tl.load(state_base + tile_off, mask=state_mask, other=0.0).to({ct})
{pre.text()}
        for t_idx in range(0, T):
{body.text()}
    else:
        for t_idx in range(0, T):
            tl.store(out_ptr + b_idx * s_out_b + t_idx * s_out_t + h_idx * s_out_h
                     + offs_p * s_out_p, tl.zeros([BP], dtype=out_ptr.dtype.element_ty),
                     mask=mask_p)
'''


def make_launch(module, plan: Plan):
    """launch(tensors, sizes, state, slots, out_slots) -> y (b, t, h, p): the kernel with the
    block sizes and the constant arguments fixed once, so a call does the launch alone. With
    t = 1, an input may come without its `t` axis and `out_slots` as (b,) (no views made).

    `launch.bind(tensors, sizes, state, slots, out_slots)` goes further for a decode loop: it
    returns `fixed(inputs, state, slots, out_slots, out=None)`, the launch for tensors with the
    same shapes, strides, dtypes and device as these (`inputs` in the program's input order),
    every integer argument (strides, sizes, grid, block sizes) computed once, so that a call
    passes the tensors alone. Triton reads nothing of a tensor argument but its address and
    dtype, so `fixed` may be given any tensor with the same address and dtype in place of an
    input (the tensor a view of offset 0 was made from, say). `out`, where given, is a
    contiguous tensor of y's dtype and numel in any shape (y (b, h, p) for one step), written as
    a contiguous (b, t, h, p); it is returned."""
    prog = plan.program
    kernel = module.ssmc_step_fwd
    out_dtype = getattr(torch, plan.dtype)
    tile = plan.tile_dict()
    names = prog.input_names
    layout = [(i.name, i.axes.index("t") if "t" in i.axes else None, len(i.axes))
              for i in prog.inputs]

    def bind(tensors, sizes, state, slots=None, out_slots=None):
        B, T, H, G, N, P = (sizes[a] for a in "bthgnp")
        blocks = step_blocks(N, P, state.element_size(), tile)
        BP = blocks["BP"]
        device = state.device
        shape = (B, T, H, P)
        numel = B * T * H * P
        ints = []                                       # every integer argument, in order
        for name, t_pos, rank in layout:
            x = tensors[name]
            strides = x.stride()
            if t_pos is not None and x.dim() < rank:    # one step: the t axis left out
                strides = strides[:t_pos] + (0,) + strides[t_pos:]
            ints.extend(strides)
        ints += [T * H * P, H * P, P, 1]                # out: a contiguous (b, t, h, p)
        ints += state.stride()
        if out_slots is None:
            ints += [0, 0]
        else:
            ints += out_slots.stride() if out_slots.dim() == 2 else [out_slots.stride(0), 0]
        npb = -(-P // BP)
        ints += [T, state.shape[0], H, H // G, N, P, npb]
        ints = tuple(ints)
        consts = dict(BN=blocks["BN"], BP=BP, HAS_SLOTS=slots is not None,
                      HAS_OUT_SLOTS=out_slots is not None)
        if device.type == "cuda":
            consts["num_warps"] = blocks["num_warps"]
        grid = (B * H * npb,)
        # the kernel reads slot b at slot_ptr + b: a strided index tensor is made contiguous
        gather_slots = slots is not None and B > 1 and slots.stride(0) != 1

        def fixed(inputs, state, slots=None, out_slots=None, out=None):
            if out is None:
                out = torch.empty(shape, dtype=out_dtype, device=device)
            if numel == 0:
                return out
            if gather_slots:
                slots = slots.contiguous()
            # kernel[grid] at the call, as torch.compile recognises a Triton launch
            # an absent index is None (a constexpr to Triton: nothing to specialise or pass)
            kernel[grid](*inputs, out, state, slots, out_slots, *ints, **consts)
            return out

        return fixed

    def launch(tensors, sizes, state, slots=None, out_slots=None):
        fixed = bind(tensors, sizes, state, slots, out_slots)
        return fixed([tensors[n] for n in names], state, slots, out_slots)

    launch.bind = bind
    return launch
