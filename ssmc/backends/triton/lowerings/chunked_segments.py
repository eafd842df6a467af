"""Segmented state passes of the chunked lowering: what the segment programs emit, the kernels
that join them, and the launch policy.

A sequential pass over the chunks (the forward's state pass; the backward's state recompute and
its reverse pass over dL/dS) runs one program per (sequence, head, block). Where those are too
few to fill a GPU, each sequence is cut into segments of SEG chunks walked side by side, each
from a zero state except the one the walk starts in (the first segment from h0, or the last
from dL/dS_T in the reverse pass). Each segment program stores, per chunk, its state from the
segment's start and `prod`, the product of the chunk decays walked before it in the segment,
and at its end its final state and whole product. Then:

* `join`: per (sequence, head, block), over the segments in walk order: each segment's entering
  state `carry` (written over its final state), carry <- prod * carry + final; the last carry
  is the sequence's final state (h_T, or dL/dS_0).
* `fixup`: state of chunk c += prod(c) * entering state of its segment, in place (the
  backward's passes; the forward's output pass adds it as it loads a state instead).

Products of decays, not exponentials of sums: a reset gives exactly 0, a negative decay its
sign. The joined state is the same sum as the sequential walk's, reordered.
"""
from __future__ import annotations

import functools

import torch
import triton

from ....devices import DeviceLimits
from ..common import next_pow2
from .walk_rows import RowsAhead

#: the fewest chunks one segment walks
MIN_SEGMENT_CHUNKS = 4


def segment_chunks(seg: int | None, chunks_per_seq: int, programs: int, varlen: bool,
                   target: int | None) -> int:
    """Chunks per segment, 0 for one walk per sequence. A walk per (sequence, head, block)
    leaves most of a GPU idle where those are few (one long sequence, few heads: b=1 t=64k
    h=16 is 16 walks of 1024 chunks). Segments are sized for `target` programs (about two per
    SM; None: no GPU, one walk); packed sequences keep one walk each. `seg` (a tile's) sets
    it."""
    if varlen:
        return 0
    if seg is None:
        if target is None or not 0 < programs < target:
            return 0
        seg = triton.cdiv(chunks_per_seq, min(triton.cdiv(target, programs),
                                              chunks_per_seq // MIN_SEGMENT_CHUNKS) or 1)
    return seg if seg < chunks_per_seq else 0


def state_block(P: int, walks: int, target: int | None) -> int:
    """Value channels per program of a sequential pass: up to 64, or 32 where `walks` programs
    per 64 channels would leave fewer than `target` (few sequences and heads). Splitting p
    re-reads only the key, and beat segments there: ssd b=2 t=16384 h=80 p=64 (160 walks) on
    an H100, forward 1.82 ms against 2.04 ms with two segments per walk."""
    bp = max(min(next_pow2(P), 64), 16)
    if target and bp > 32 and walks * triton.cdiv(P, bp) < target:
        bp = 32
    return bp


def program_target(device) -> int | None:
    """About two programs per SM on a GPU; None elsewhere."""
    limits = device_limits(device)
    return None if limits is None else target_for(limits.sm_count)


def device_limits(device) -> DeviceLimits | None:
    """The GPU's limits (read once per device), or None off the GPU, where a launch has none."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_limits(index)


@functools.lru_cache(maxsize=None)
def _cuda_limits(index: int) -> DeviceLimits:
    return DeviceLimits.from_device(torch.device("cuda", index))


def target_for(sm_count: int) -> int:
    """`program_target` of a GPU with `sm_count` SMs."""
    return 2 * sm_count


class Segments:
    """The buffers of one segmented pass: `seg_state` (S * NSEG, H, N, P) fp32, `seg_prod`
    and `chunk_prod` ((.., H) or (.., H, N) for per-key decays), or placeholders (`dummy`)
    where the pass is not segmented (seg = 0)."""

    def __init__(self, seg: int, S: int, chunks_per_seq: int, n_chunks: int, sizes: dict,
                 per_key: bool, device, dummy):
        H, N, P = sizes["h"], sizes["n"], sizes["p"]
        self.seg = seg
        self.n_seg = triton.cdiv(chunks_per_seq, seg) if seg else 1
        self.seg_state = self.seg_prod = self.chunk_prod = dummy
        if seg:
            key = (N,) if per_key else ()
            f32 = dict(dtype=torch.float32, device=device)
            self.seg_state = torch.empty(S * self.n_seg, H, N, P, **f32)
            self.seg_prod = torch.empty(S * self.n_seg, H, *key, **f32)
            self.chunk_prod = torch.empty(max(n_chunks, 1), H, *key, **f32)

    @property
    def buffers(self) -> tuple:
        return self.seg_state, self.seg_prod, self.chunk_prod


#: kernel parameters of a segment program (after its other pointers)
PARAMS = "seg_state_ptr, seg_prod_ptr, chunk_prod_ptr,"


def render_walk(var: str, ct: str, init: tuple[str, str], store: str, body: str, decay: str,
                total: str, reverse: bool, end: tuple[str, str | None],
                ahead: RowsAhead | None = None) -> str:
    """A sequential pass's walk (indented 1, after the program's set-up with `seq` and
    `state_off`): `var` (BN, BP) from `init` = (pointer, constexpr flag) where the flag holds
    and the walk starts in this segment, else zeros; per chunk (`cidx`, `c0`, `chunk`), `store`
    (indented 2) before `body` (the rows and the chunk's update, indented 2; `total` its
    decay, (BN,) or a scalar, for the segment's product); at the end the
    segment's final state and product, or, unsegmented, `var` into `end` = (pointer, flag or
    None for always). `ahead`: the walk's row inputs, those `body` reads loaded a chunk
    ahead."""
    order = ("    for cc in range(first, last):\n        cidx = first + last - 1 - cc"
             if reverse else "    for cidx in range(first, last):")
    names = ahead.used(body) if ahead else []
    before = ahead.before(names, "last - 1" if reverse else "first") if names else ""
    step = ahead.step(names, "cidx - 1" if reverse else "cidx + 1") if names else ""
    end_ptr, end_flag = end
    tail = f"tl.store({end_ptr} + state_off, {var}, mask=state_mask)"
    tail = (f"    elif {end_flag}:\n        {tail}" if end_flag else f"    else:\n        {tail}")
    return f"""{walk_bounds(reverse)}
    {var} = tl.zeros([BN, BP], dtype={ct})
    if {init[1]}:
        if starts:
            {var} = tl.load({init[0]} + state_off, mask=state_mask, other=0.0).to({ct})
{prod_init(decay)}
{before}
{order}
        c0 = cidx * BT
        chunk = c_base + cidx
{step}
{store}
{prod_store(decay)}
{body}
{prod_step(decay, total)}
    if SEGMENTED:
{segment_end(decay, var)}
{tail}"""


def walk_bounds(reverse: bool) -> str:
    """`seg`, and the segment's chunks [first, last) within the sequence (`n_chunks` long), for
    a program of axis 0 = sequence * NSEG + segment (indented 1)."""
    return f"""    seg = tl.program_id(0).to(tl.int64) % NSEG
    n_chunks = tl.cdiv(length, BT)
    first = seg * SEG
    last = n_chunks
    if SEGMENTED:
        last = tl.minimum(n_chunks, first + SEG)
    starts = seg == {"NSEG - 1" if reverse else "0"}   # the walk's first segment"""


def prod_init(decay: str) -> str:
    """Before the loop; `decay` "none", "row" (one per step) or "key" (per key): a pass without
    decay joins by plain sums and keeps no products."""
    if decay == "none":
        return ""
    return ("    prod = tl.full([BN], 1.0, tl.float32)" if decay == "key" else
            "    prod = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0) + 1.0")


def prod_store(decay: str) -> str:
    """In the chunk loop, before the chunk's update (indented 2)."""
    if decay == "none":
        return ""
    where = ("(chunk * H + h_idx) * N + offs_n, prod, mask=mask_n)" if decay == "key"
             else "chunk * H + h_idx, prod)")
    return f"        if SEGMENTED:\n            tl.store(chunk_prod_ptr + {where}"


def prod_step(decay: str, total: str) -> str:
    """In the chunk loop, after the update; `total` the chunk's decay ((BN,) or a scalar)."""
    if decay == "none":
        return ""
    return f"        if SEGMENTED:\n            prod = prod * {total}"


def segment_end(decay: str, var: str) -> str:
    """After the loop, under SEGMENTED (indented 2): the segment's final state and product."""
    lines = (f"        tl.store(seg_state_ptr + (((seq * NSEG + seg) * H + h_idx) * N"
             f" + offs_n[:, None]) * P + offs_p[None, :], {var}, mask=state_mask)")
    if decay == "none":
        return lines
    where = ("((seq * NSEG + seg) * H + h_idx) * N + offs_n, prod, mask=mask_n)"
             if decay == "key" else "(seq * NSEG + seg) * H + h_idx, prod)")
    return lines + f"\n        tl.store(seg_prod_ptr + {where}"


def _prod_load(decay: str) -> str:
    if decay == "key":
        return ("prod = tl.load(seg_prod_ptr + ((seq * NSEG + sg) * H + h_idx) * N + offs_n, "
                "mask=mask_n, other=0.0)[:, None]")
    if decay == "row":
        return "prod = tl.load(seg_prod_ptr + (seq * NSEG + sg) * H + h_idx)"
    return "prod = 1.0"


TILE = """    h_idx = tl.program_id(1).to(tl.int64)
    H = tl.num_programs(1)
    offs_n = (tl.program_id(2) // NPB) * BN + tl.arange(0, BN)
    offs_p = (tl.program_id(2) % NPB) * BP + tl.arange(0, BP)
    mask_n = offs_n < N
    mask_p = offs_p < P
    state_mask = mask_n[:, None] & mask_p[None, :]
    tile = (h_idx * N + offs_n[:, None]) * P + offs_p[None, :]"""


def render_join(name: str, decay: str) -> str:
    """`decay`: "none", "row" (one per step) or "key" (per key). Per (sequence, head, block);
    REVERSE walks the segments last to first."""
    return f'''

@triton.jit
def {name}(
    seg_state_ptr, seg_prod_ptr, out_ptr, NSEG, N, P,
    BN: tl.constexpr, BP: tl.constexpr, NPB: tl.constexpr, STORE_OUT: tl.constexpr,
    REVERSE: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
{TILE}
    if REVERSE:
        s0 = NSEG - 1
    else:
        s0 = 0
    carry = tl.load(seg_state_ptr + (seq * NSEG + s0) * H * N * P + tile, mask=state_mask,
                    other=0.0)
    for i in range(1, NSEG):
        if REVERSE:
            sg = NSEG - 1 - i
        else:
            sg = i
        at = seg_state_ptr + (seq * NSEG + sg) * H * N * P + tile
        local = tl.load(at, mask=state_mask, other=0.0)
        {_prod_load(decay)}
        tl.store(at, carry, mask=state_mask)
        carry = prod * carry + local
    if STORE_OUT:
        tl.store(out_ptr + seq * H * N * P + tile, carry, mask=state_mask)
'''


def fixup_line(decay: str, var: str, chunk: str = "chunk") -> str:
    """`var` (a chunk's state, fp32) plus its segment's entering state `seg_in` times the
    chunk's product."""
    if decay == "none":
        return f"{var} = {var} + seg_in"
    if decay == "key":
        return (f"{var} = {var} + tl.load(chunk_prod_ptr + ({chunk} * H + h_idx) * N + offs_n,"
                f" mask=mask_n, other=0.0)[:, None] * seg_in")
    return f"{var} = {var} + tl.load(chunk_prod_ptr + {chunk} * H + h_idx) * seg_in"


def render_fixup(name: str, decay: str) -> str:
    """Per (chunk, head, block) of unpacked sequences: the state stored for the chunk plus
    its segment's entering state times its product, in place (not for the walk's first
    segment, whose states are whole)."""
    return f'''

@triton.jit
def {name}(
    states_ptr, seg_state_ptr, chunk_prod_ptr, CHUNKS, NSEG, SEG, N, P,
    BN: tl.constexpr, BP: tl.constexpr, NPB: tl.constexpr, REVERSE: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
{TILE}
    seq = chunk // CHUNKS
    sg = (chunk % CHUNKS) // SEG
    if REVERSE:
        s0 = NSEG - 1
    else:
        s0 = 0
    if sg != s0:
        at = states_ptr + chunk * H * N * P + tile
        seg_in = tl.load(seg_state_ptr + (seq * NSEG + sg) * H * N * P + tile, mask=state_mask,
                         other=0.0)
        state = tl.load(at, mask=state_mask, other=0.0).to(tl.float32)
        {fixup_line(decay, "state")}
        tl.store(at, state.to(states_ptr.dtype.element_ty), mask=state_mask)
'''
