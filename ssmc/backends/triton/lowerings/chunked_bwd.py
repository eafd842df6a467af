"""The chunked lowering's backward: sequential state passes and parallel per-chunk passes.

Notation per head, in the direction's own time, for decays that do not vary over p: l_t the
log-decay (a vector over n, or one number), within a chunk lc_t the inclusive running sum of
l, l_last its total, S_in the state entering the chunk, G = dL/dS at the chunk's end. Then

    S_t = exp(lc_t) * S_in + sum_{s<=t} exp(lc_t - lc_s) * k_s v_s^T,     y_t = S_t^T q_t

With D[u, s] = exp(lc_u - lc_s) on the causal half (u >= s), A = (q k^T) * D the forward's
scores and dA = (dy v^T) * D:

    dq = dA k + exp(lc) * (dy S_in^T)
    dk = dA^T q + exp(l_last - lc) * (v G^T)
    dv = A^T dy + (exp(l_last - lc) * k) G

Kernels, per direction:

* `ssmc_chunked_state_fwd` (the forward's state pass, chunked.py; sequential over chunks, per
  (sequence, head, p-block)): S_in of every chunk and the final state, recomputed (the
  forward stores nothing for the backward), and each chunk's reset flag.
* `ssmc_chunked_bwd_dstates` (sequential, last chunk to first): G of every chunk, then
  G <- exp(l_last) * G + (q exp(lc))^T dy; after the first chunk G is dL/dS_0.
  Both store into `state_dtype`: the matmul operand type (bf16 for bf16 plans), which every
  consumer rounds them to anyway; they are the backward's largest buffers.
* Decays without n (ssd, retention, linear attention, custom scalar gates):
  - `ssmc_chunked_bwd_dqk` (per (chunk, block of heads, n-block)): dq and dk. Where query
    and key are the same for every head of a group (ssd's B and C), one program walks a
    block of the group's heads, loads query and key once and sums their dq and dk in
    registers: the chain rule only needs the group's sum, and per-head (b, t, h, n) buffers
    were most of the memory.
  - `ssmc_chunked_bwd_dv` (per (chunk, head, p-block)): dv; y for the epilogue's
    derivatives (written over dy where one direction allows); and the decay gradient,
    complete. The products over n (q k^T, q S_in, k G) run over n-blocks and the decay
    factors scale their rows afterwards. (Reading q k^T from `ssmc_chunk_qk` instead, as the
    forward's output pass does, compiled to 200 spilled bytes against 32: chunk_qk.py.)
  - Each per-chunk kernel (y, dv, dq/dk) comes in two variants (`chunk_variants`): the
    forward recompute flags the chunks that hold a reset (a log-decay below RESET_BELOW),
    one variant takes the others without any reset code, one counts resets in the flagged
    ones (16 chunks a program, skipped together where none is flagged).
* Per-key decays (selective_scan, gla): `ssmc_chunked_bwd_keys` (chunked_bwd_keys.py), one
  program per (chunk, head) over the chunk's 16-row blocks: tensor-core products between
  blocks, D elementwise within one (chunked_bwd_keys.py), and the decay gradient complete.

Operands that are bare inputs are loaded straight into the matmul type; a value that is an
input times a scale along t (Mamba-2's x * dt) scales products' rows or columns instead.

The decay gradient stays inside the chunk: with w_u = q_u . dq_u - k_u . dk_u, for r in
chunk c with end state S_c and G_c = dL/dS_c from the later chunks (dL/dS_T for the last),

    dL/dl_r = sum_{u >= r, u in c} w_u  +  sum (G_c * S_c)

(every factor exp(lc_u) of the chunk carries l_r for u >= r, and l_last scales all of S_c).
Summing w over the whole sequence instead is the same number in exact arithmetic but cancels
catastrophically at long t. Per-key decays form this per n in their kernel, the reverse sums
in float64.

For decays without n the dv kernel sums only the terms that carry l_r, with no dq and dk: with
M = (dy v^T) * A (M[u, s] = dy_u . v_s A[u, s], one term of y's gradient), yoff = q_in S_in and
kG = k_out G, the terms of sum_{u >= r} w_u that do not cancel out are

    dL/dl_r = sum_{u >= r, s < r} M[u, s] + sum_{u >= r} dy_u . yoff_u
              + sum_{s < r} v_s . kG_s + exp(l_last) sum (G * S_in)

(the pairs u, s >= r of q dq and k dk are the same terms twice, and S_c = exp(l_last) S_in +
k_out^T v turns sum (G_c * S_c) into the last two sums). The rectangle sum is a running sum of
M along s, X[u, r] = sum_{s < r} M[u, s], summed over the causal half. Forming sum w instead
(the same number) rounds every step's q dq and k dk, each of the size of the whole chunk's
terms, into a result that can be far smaller: a time-invariant decay's gradient is dl summed
over t, which cancels (up to 4e-5 relative error at t = 65 in fp32, 2e-6 now, as the scan's).
The running sums of the log-decays come from float64 (`_Ops._running_sums`) for the same
reason. Sums over p are per p-block partials.

The quadratic lowering has the same mathematics (M = the scores of all chunks at once) and
uses this backward too.

This module renders the kernels (chunked_bwd_keys.py the per-key ones); chunked_bwd_launch.py
sizes, launches and assembles them.
"""
from __future__ import annotations

import textwrap

from ....ir import Elementwise
from ....plan import Plan
from ..common import compute_type, dot_type, input_params
from ..render import Context, Emitter, Tile, split_scale
from . import chunked_segments as seg
from .walk_rows import RowsAhead
from .chunk_qk import head_free
from . import chunked_prefix as prefix
from .chunked_prefix import RunningSums
from ..templates import (HAS_RESET_BELOW, chunk_setup, chunk_state_store, fold_resets, indent,
                         later_sum, rows, seq_setup, split_resets, with_resets)

# The backward keeps its own tiles and operand helpers (it shares only the kernel set-up
# snippets of ..templates with the forward, and does not call into the forward's kernels),
# so the forward lowering can change its tiling freely.
FIXED = {"b": "b_idx", "h": "h_idx", "g": "g_idx"}
T_AXIS = ("t", "t_row", "mask_t")
QK_TILE = Tile([T_AXIS, ("n", "offs_n", "mask_n")], FIXED)
V_TILE = Tile([T_AXIS, ("p", "offs_p", "mask_p")], FIXED)
T_TILE = Tile([T_AXIS], FIXED)

ROWS = rows()

# GH, COLUMN: a grid's height and whether the order reads it column by column (`rows`)
STATE_PARAMS = "ssmc_cu, ssmc_chunk_off,\n    T, HPG, N, P, GH,"
CHUNK_PARAMS = "ssmc_cu, ssmc_chunk_off, ssmc_chunk_seq,\n    B, T, HPG, N, P, GH,"
CONSTS = ("BT: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, REVERSE: tl.constexpr,\n"
          "    COLUMN: tl.constexpr, IS_VARLEN: tl.constexpr")


def per_key_decay(plan: Plan) -> bool:
    ld = plan.program.log_decay
    return ld is not None and "n" in ld.axes


def decay_mode(plan: Plan) -> str:
    if plan.program.log_decay is None:
        return "none"
    return "key" if per_key_decay(plan) else "row"


#: a chunk's reset flag, stored by the state pass (chunked.render_state_kernel)
RESET_FLAG = "tl.load(ssmc_resets + chunk * H + h_idx)"


def chunk_variants(plan: Plan) -> list[str]:
    """The `_Ops` resets of each variant of a per-chunk kernel (the kernel's name suffix and
    the flag test of the chunks it takes follow: `variant_suffix`, `FLAG_TEST`). Scalar
    decays: one without reset code for the chunks the
    forward recompute did not flag, one counting resets for those it did. Compiled into the
    same kernel behind a branch, the counting code cost the training step 4.1-4.9% on an H100
    (ssd, h=80 p=64 n=128, benchmarks/RESULTS.md) though no chunk took it, as the forward's
    output pass did (chunked.py, `reset_specialised`); apart, 0.9-2.4% (the sequential
    passes' branches)."""
    return ["plain", "count"] if decay_mode(plan) == "row" else ["branch"]


#: the flag test of the chunks a variant takes (none: the only variant takes every chunk)
FLAG_TEST = {"plain": "== 0", "count": "!= 0"}


def variant_suffix(resets: str) -> str:
    return "_resets" if resets == "count" else ""


class _Ops:
    """Emits one chunk's operands: query/key (t, n), value (t, p), dy (t, p), log-decays.

    After `decay()`: `lc` is the inclusive running sum of log-decays within the chunk ((t,) or
    (t, n)) without its resets (`templates.RESET_BELOW`), `zc` the running count of those;
    `lcf` the exponent from the chunk's start, `l_last` the chunk's total ((), or (n,)) and
    `lr` = l_last - lc (the later steps' sum), each with its resets (0 across one); nothing
    for decay-free programs. (Only positive decays reach these kernels: `backward.py`.)
    Scalar decays count resets apart only in a chunk that has one: `resets` "branch" tests
    each chunk (`reset_branch`; the sequential passes), "plain" has no reset in its chunks
    and "count" has (the two variants of a per-chunk kernel, `chunk_variants`)."""

    def __init__(self, plan: Plan, body: Emitter, resets: str = "branch"):
        self.plan, self.body, self.resets = plan, body, resets
        self.prog = plan.program
        self.ct = compute_type(plan)
        self.dt = dot_type(plan)
        # fp32 matmuls in plain fp32 even on a GPU: with tf32x3 (Triton 3.6, H200) the
        # decay-free backward's gradients were off by 1.2e-1 relative (bidirectional) and
        # 1.3e-4 (forward) against 1.7e-7 with "ieee", and one shape faulted reading shared
        # memory; slower, but only fp32 plans pay it (16-bit plans feed the tensor cores)
        self.prec = ', input_precision="ieee"' if plan.dtype == "float32" else ""
        self.ctx_qk = Context(self.prog, QK_TILE, body, "qk", self.ct)
        self.ctx_v = Context(self.prog, V_TILE, body, "v", self.ct)
        self.mode = decay_mode(plan)
        #: a walk's row inputs loaded a step ahead (walk_rows.py), read by the (t,) contexts
        self.ahead: RowsAhead | None = None

    @property
    def rows_extra(self) -> dict[str, str]:
        return self.ahead.extra if self.ahead else {}

    def dot(self, a: str, b: str) -> str:
        return f"tl.dot(({a}).to({self.dt}), ({b}).to({self.dt}){self.prec})"

    def operand(self, which: str, name: str):
        node = getattr(self.prog.recurrence, which)
        if which == "value":
            v = self.ctx_v.value(node, f"{name}_raw")
            self.body(f"{name} = tl.where(mask_t[:, None] & mask_p[None, :], {v}, 0.0)")
        else:
            v = self.ctx_qk.value(node, f"{name}_raw")
            self.body(f"{name} = tl.where(mask_t[:, None] & mask_n[None, :], {v}, 0.0)")

    def mm_operand(self, which: str, name: str) -> str | None:
        """Emit `name`, the operand in the matmul type: a bare input is loaded straight into
        it (no compute-type copy in registers). A value that splits as bare input * scale
        along t (Mamba-2's x * dt) loads the input alone and returns the scale's name
        (value = name * scale[:, None]: kernels scale a product's rows or columns instead);
        otherwise None."""
        node = getattr(self.prog.recurrence, which)
        if which == "value":
            split = split_scale(node, self.prog, "p")
            if split is not None and self.ctx_v.direct_load(
                    Elementwise(split[0], node.axes), name, self.dt) is not None:
                if split[1] == 1:
                    return None
                ctx = Context(self.prog, T_TILE, self.body, "vs", self.ct, self.rows_extra)
                v = ctx.value(split[1], f"{name}_scale_raw")
                self.body(f"{name}_scale = tl.where(mask_t, {v}, 0.0)")
                return f"{name}_scale"
        elif self.ctx_qk.direct_load(node, name, self.dt) is not None:
            return None
        self.operand(which, name)
        self.body(f"{name} = {name}.to({self.dt})")
        return None

    def dy(self):
        self.body("dy = tl.load(ssmc_dy + ((b_idx * T + t_row[:, None]) * H + h_idx) * P"
                  " + offs_p[None, :], mask=mask_t[:, None] & mask_p[None, :], other=0.0)")

    def decay(self):
        b = self.body
        if self.mode == "row":
            ctx = Context(self.prog, T_TILE, b, "l", self.ct, self.rows_extra)
            v = ctx.value(self.prog.log_decay, "ld_raw")
            b(f"ld = tl.where(mask_t, {fold_resets(v)}, 0.0)")
            b("l_last = tl.sum(ld, axis=0)")   # resets folded in: exponentiated whole only
            if self.resets == "count":
                self._split_decay()
            elif self.resets == "plain":
                self._plain_decay()
            else:
                b(f"if {self.reset_branch()}:")
                with b.block():
                    self._split_decay()
                b("else:")
                with b.block():
                    self._plain_decay()
        elif self.mode == "key":
            ctx = Context(self.prog, QK_TILE, b, "qk", self.ct)
            ctx.loaded = self.ctx_qk.loaded
            v = ctx.value(self.prog.log_decay, "ld_raw")
            b(f"ld = tl.where(mask_t[:, None] & mask_n[None, :], {v}, 0.0)")
            self._split_decay()
            b("l_last = " + with_resets("tl.sum(ld, axis=0)", "tl.sum(rz, axis=0)"))

    def stored_decay(self, size: str = "CS"):
        """lcf, lr and l_last of a whole chunk's rows (`size` of them) of per-key decays from
        the sums the prefix kernel stored (chunked_prefix.py), the state pass's own."""
        sums = RunningSums(self.plan, self.body, "", "offs_c", size)
        end = RunningSums(self.plan, self.body, "E", f"{size} - 1", size, counts_only=True)
        prefix.from_chunk_start(self.body, sums, self.ct, size)
        self.body(f"lcf = {with_resets('from_start', sums.resets_since())}")
        later = prefix.to_chunk_end("at")
        self.body(f"lr = {with_resets(later, end.resets_since(sums, '[None, :]'))}")
        self.body(f"l_last = {with_resets('l_last', end.resets_since())}")

    def _plain_decay(self):
        """lc, zc (zeros), lcf and lr of a chunk without a reset."""
        self._running_sums()
        self.body("zc = tl.zeros_like(lc)")
        self.body("lcf = lc")
        self.body(f"lr = {self._later('ld')}")

    def _split_decay(self):
        """lc, zc, lcf and lr with the resets of `ld` split out into `rz`."""
        for line in split_resets("ld", "rz"):
            self.body(line)
        self._running_sums()
        self.body("zc = tl.cumsum(rz, axis=0)")
        self.body(f"lcf = {with_resets('lc', 'zc')}")
        self.body(f"lr = {with_resets(self._later('ld'), later_sum('rz'))}")

    @property
    def precise(self) -> bool:
        """Whether the running sums of the log-decays are formed in float64 (`_running_sums`):
        decays without n in a compute type below float64."""
        return self.mode == "row" and self.ct != "tl.float64"

    def _running_sums(self):
        """`lc`, the running sum of `ld`; where `precise`, formed in float64 and split into
        its rounding to the compute type and `lo`, the rest (lc + lo is the sum to twice the
        compute type's precision). An fp32 running sum is off by up to a few ulps of its
        largest partial sum, and D = exp(lc_u - lc_s) carried that as a relative error (2e-6
        at lc = -45) into every entry near the diagonal late in a chunk, which the decay
        gradient of a time-invariant decay (its sum over t cancels) did not survive;
        lc_u - lc_s + (lo_u - lo_s) is off by a rounding of the difference itself."""
        if not self.precise:
            self.body("lc = tl.cumsum(ld, axis=0)")
            return
        self.body("ld64 = ld.to(tl.float64)")
        self.body("lc64 = tl.cumsum(ld64, axis=0)")
        self.body(f"lc = lc64.to({self.ct})")
        self.body(f"lo = (lc64 - lc.to(tl.float64)).to({self.ct})")

    def _later(self, v: str) -> str:
        """`later_sum` of the log-decays `v` (after `_running_sums`)."""
        if not self.precise:
            return later_sum(v)
        return f"({later_sum(v + '64')}).to({self.ct})"

    def gap(self) -> str:
        """lc_u - lc_s over (u, s) (to the compute type's precision where `precise`)."""
        if not self.precise:
            return "lc[:, None] - lc[None, :]"
        return "(lc[:, None] - lc[None, :]) + (lo[:, None] - lo[None, :])"

    @staticmethod
    def reset_branch() -> str:
        """The condition (scalar decays) under which a chunk has a reset to count apart."""
        return f"l_last < {HAS_RESET_BELOW}"

    def q_in(self) -> str:
        """query weighted by the decay from the chunk's start (applied to the entering state)."""
        return {"none": "query", "row": "query * tl.exp(lcf)[:, None]",
                "key": "query * tl.exp(lcf)"}[self.mode]

    def k_out(self) -> str:
        """key weighted by the decay to the chunk's end."""
        return {"none": "key", "row": "key * tl.exp(lr)[:, None]",
                "key": "key * tl.exp(lr)"}[self.mode]

    def decay_matrix(self) -> str:
        """Emits `Dm`, D[u, s] = exp(lc_u - lc_s) on the causal half (`causal`) without a
        reset between, 0 elsewhere (decays without n), and returns its name."""
        b = self.body
        counting = f"Dm = tl.exp(tl.where(causal, " \
                   f"{with_resets(self.gap(), 'zc[:, None] - zc[None, :]')}, float('-inf')))"
        plain = f"Dm = tl.exp(tl.where(causal, {self.gap()}, float('-inf')))"
        if self.resets != "branch":
            b(counting if self.resets == "count" else plain)
            return "Dm"
        b(f"if {self.reset_branch()}:")
        with b.block():
            b(counting)
        b("else:")
        with b.block():
            b(plain)
        return "Dm"

    def scores(self) -> str:
        """A[u, s] = q_u . (decay s+1..u) k_s on the causal half (emits it as `A`); decays
        without n (per-key ones form theirs in chunked_bwd_keys.py)."""
        self.body("causal = offs_c[:, None] >= offs_c[None, :]")
        if self.mode == "none":
            self.body("A = tl.where(causal, " + self.dot("query", "tl.trans(key)") + ", 0.0)")
        else:
            self.body("A = " + self.dot("query", "tl.trans(key)") + f" * {self.decay_matrix()}")
        return "A"

    def state_decay(self) -> str:
        """The factor the state carries across the whole chunk ((n, BP)-broadcastable)."""
        return {"none": "1.0", "row": "tl.exp(l_last)", "key": "tl.exp(l_last)[:, None]"}[
            self.mode]


#: a program per (sequence * NSEG + segment, head, p-block); `_walk` bounds its segment
SEGMENT_SETUP = seq_setup(True, "ssmc_cu", "ssmc_chunk_off",
                          "tl.program_id(0).to(tl.int64) // NSEG")


def _walk(o: "_Ops", var: str, init: tuple[str, str], store: str, body: Emitter, reverse: bool,
          end: str) -> str:
    return seg.render_walk(var, o.ct, init, chunk_state_store(store, var),
                           indent(ROWS, 2) + "\n" + body.text(), o.mode, "tl.exp(l_last)",
                           reverse, (end, None), o.ahead)


def store_y(body: Emitter) -> None:
    """y of the row block into the fp32 buffer, added to the earlier directions' (ACCUM_IN)."""
    body("y_off = ((b_idx * T + t_row[:, None]) * H + h_idx) * P + offs_p[None, :]")
    body("y_mask = mask_t[:, None] & mask_p[None, :]")
    body("if ACCUM_IN:")
    with body.block():
        body("y += tl.load(ssmc_y + y_off, mask=y_mask, other=0.0)")
    body("tl.store(ssmc_y + y_off, y, mask=y_mask)")


def render_y_kernel(plan: Plan, resets: str = "branch") -> str:
    """y (before the epilogue), accumulated over directions into an fp32 buffer; one variant
    of `chunk_variants`."""
    body = Emitter(indent=1 if resets == "branch" else 2)
    o = _Ops(plan, body, resets)
    o.operand("query", "query")
    o.operand("key", "key")
    o.operand("value", "value")
    o.decay()
    a = o.scores()
    body("S_in = tl.load(ssmc_states + ((chunk * H + h_idx) * N + offs_n[:, None]) * P"
         " + offs_p[None, :], mask=mask_n[:, None] & mask_p[None, :], other=0.0)")
    body("y = " + o.dot(a, "value") + " + " + o.dot(o.q_in(), "S_in"))
    store_y(body)
    return f"""
@triton.jit
def ssmc_chunked_bwd_y{variant_suffix(resets)}(
    {input_params(plan.program)},
    ssmc_y, ssmc_states, ssmc_resets, {CHUNK_PARAMS}
    {CONSTS}, ACCUM_IN: tl.constexpr, {VARIANT_PARAMS}
):
{_rows_program(body, resets)}
"""


def _rows_program(body: Emitter, resets: str) -> str:
    """`_per_chunk` of a kernel whose chunk is one program's rows: the rows, the variant's
    flag test, `body` (indented 2 under a test, else 1)."""
    return _per_chunk(indent(ROWS, 1) + "\n" + _flag_test(resets) + body.text(), resets)


def _flag_test(resets: str) -> str:
    """The line opening a variant's body (indented 1), nothing for the only variant."""
    return f"    if {RESET_FLAG} {FLAG_TEST[resets]}:\n" if resets in FLAG_TEST else ""


#: chunks one program of a counting variant walks: a run without resets then costs one small
#: launch (a flag load per chunk and head) instead of a program per chunk
CHUNKS_PER_PROGRAM = 16
#: the counting variants' extra parameters (every variant takes them)
VARIANT_PARAMS = "NCHUNKS, CPP: tl.constexpr, HP2: tl.constexpr,"


def _per_chunk(inner: str, resets: str, heads: bool = False) -> str:
    """A per-chunk kernel's program: the set-up of its chunk and `inner` (indented 1, written
    as for a program per chunk). The counting variant (`resets` "count") walks CPP chunks per
    program instead, each only where a head of the program (HP2 >= HEADS with `heads`, else its
    one) has the flag: most runs have no reset, and most of its programs then only load flags."""
    setup = chunk_setup(heads, "ssmc_cu", "ssmc_chunk_off", "ssmc_chunk_seq", "{chunk}", "BT",
                        "c0", heads=heads)
    if resets != "count":
        return setup.format(chunk="tl.program_id(0).to(tl.int64)") + "\n" + inner
    first = ("tl.program_id(1).to(tl.int64) * HEADS" if heads else
             "tl.program_id(1).to(tl.int64)")
    hs = "tl.arange(0, HP2)" if heads else "tl.arange(0, 1)"
    width = "HEADS" if heads else "1"
    chunk_part = indent(textwrap.dedent(setup.format(chunk="chunk0 + i")), 4)
    return f"""    chunk0 = tl.program_id(0).to(tl.int64) * CPP
    cs = chunk0 + tl.arange(0, CPP)
    hs = {hs}
    flags = tl.load(ssmc_resets + cs[:, None] * {"H" if heads else "tl.num_programs(1)"}
                    + {first} + hs[None, :], mask=(cs < NCHUNKS)[:, None] & (hs < {width})[None, :],
                    other=0)
    if tl.max(tl.max(flags, axis=1), axis=0) != 0:
        for i in range(0, CPP):
            if chunk0 + i < NCHUNKS:
{chunk_part}
{indent(textwrap.dedent(inner), 4)}"""


def render_dstate_kernel(plan: Plan) -> str:
    """Reverse state pass: G (dL/dS at every chunk's end), then dL/dS_0; in segments where
    the walks are few, each walked from its last chunk to its first."""
    body = Emitter(indent=2)
    o = _Ops(plan, body)
    o.ahead = RowsAhead(plan.program, o.ct)
    if o.mode == "key":   # the decay from the chunk's start is per (t, n): on the query
        o.operand("query", "query")
        o.dy()
        o.stored_decay("BT")
        body(f"G = G * {o.state_decay()} + " + o.dot(f"tl.trans({o.q_in()})", "dy"))
    else:
        # a decay per step weighs dy's rows (t, BP), not the query's (t, n): the query goes
        # to the product as loaded, and the walk holds less in registers (ssd h=80 n=128,
        # BP 32, Triton 3.6 sm_90a: 219 -> 127 registers)
        o.mm_operand("query", "query")
        o.dy()
        o.decay()
        rows = "dy * tl.exp(lcf)[:, None]" if o.mode == "row" else "dy"
        body(f"G = G * {o.state_decay()} + " + o.dot("tl.trans(query)", rows))
    return f"""
@triton.jit
def ssmc_chunked_bwd_dstates(
    {input_params(plan.program)}, {prefix.PARAMS if o.mode == "key" else ""}
    ssmc_dy, ssmc_dstates, ssmc_gT, ssmc_dh0, {seg.PARAMS} {STATE_PARAMS} NSEG, SEG,
    {CONSTS}, NPB: tl.constexpr, HAS_GT: tl.constexpr, SEGMENTED: tl.constexpr,
):
{SEGMENT_SETUP}
{_walk(o, "G", ("ssmc_gT", "HAS_GT"), "ssmc_dstates", body, True, "ssmc_dh0")}
"""


def _scale(scale: str | None, expr: str, rows: bool = False, cols: bool = False) -> str:
    """`expr` with its rows or columns (or a vector) multiplied by `scale` (no-op for None)."""
    if scale is None:
        return expr
    index = "[:, None]" if rows else "[None, :]" if cols else ""
    return f"({expr}) * {scale}{index}"


def _state_tiles(emit: Emitter, transposed: bool) -> None:
    """Load one block of the state entering the chunk and of G = dL/dS at its end: `S_in`,
    `G` (n, p), or `S_inT`, `GT` (p, n) when `transposed`."""
    n, p = ("[None, :]", "[:, None]") if transposed else ("[:, None]", "[None, :]")
    suffix = "T" if transposed else ""
    emit(f"st_off = ((chunk * H + h_idx) * N + offs_n{n}) * P + offs_p{p}")
    emit(f"st_mask = mask_n{n} & mask_p{p}")
    for name, ptr in ((f"S_in{suffix}", "ssmc_states"), (f"G{suffix}", "ssmc_dstates")):
        emit(f"{name} = tl.load({ptr} + st_off, mask=st_mask, other=0.0)")


def _qk_loads(plan: Plan, body: Emitter):
    """query and key of one chunk in the matmul type, and the causal mask."""
    o = _Ops(plan, body)
    o.mm_operand("query", "query")
    o.mm_operand("key", "key")
    body("causal = offs_c[:, None] >= offs_c[None, :]")


def render_dv_kernel(plan: Plan, resets: str = "branch") -> str:
    """Decays without n, per (chunk, head, p-block) in parallel: dv; for a decay, its gradient
    (complete: the terms that carry each step's log-decay, as in the module docstring, per
    p-block partial); y when WANT_Y (summed over directions: ACCUM_Y adds to what is there).

    The products over n (q k^T, q S_in, k G and sum G * S_in) run first, in a loop over
    BN-blocks of n; the decay factors of q_in = q exp(lc) and
    k_out = k exp(l_last - lc) scale their rows afterwards. Every later tile is (BT, BT) or
    (BT, BP): the whole n never sits in registers. One variant of `chunk_variants`."""
    body = Emitter(indent=1 if resets == "branch" else 2)
    o = _Ops(plan, body, resets)
    dot = o.dot
    vs = o.mm_operand("value", "value")
    o.dy()
    o.decay()
    body(f"QK = tl.zeros([BT, BT], dtype={o.ct})")
    body(f"qS = tl.zeros([BT, BP], dtype={o.ct})")
    body(f"kG = tl.zeros([BT, BP], dtype={o.ct})")
    body(f"GS = tl.zeros([BP], dtype={o.ct})")
    loop = Emitter(indent=body.level + 1)
    o_n = _Ops(plan, loop)
    loop("offs_n = n0 + tl.arange(0, BN)")
    loop("mask_n = offs_n < N")
    o_n.mm_operand("query", "query")
    o_n.mm_operand("key", "key")
    _state_tiles(loop, transposed=False)
    loop("QK += " + dot("query", "tl.trans(key)"))
    loop("qS += " + dot("query", "S_in"))
    loop("kG += " + dot("key", "G"))
    if o.mode == "row":
        loop(f"GS += tl.sum(G.to({o.ct}) * S_in.to({o.ct}), axis=0)")
    # num_stages=2 measured no faster on the H100 (Triton did not pipeline this loop)
    body("for n0 in tl.range(0, N, BN, num_stages=1):")
    body.lines.append(loop.text())
    body("causal = offs_c[:, None] >= offs_c[None, :]")
    if o.mode == "row":
        body(f"A = QK * {o.decay_matrix()}")
        body("kG = kG * tl.exp(lr)[:, None]")                                # k_out @ G
        body("yoff = qS * tl.exp(lcf)[:, None]")                               # q_in @ S_in
    else:
        body("A = tl.where(causal, QK, 0.0)")
        body("yoff = qS")
    body("dv = " + dot("tl.trans(A)", "dy") + " + kG")
    body("row = (b_idx * T + t_row[:, None]) * H + h_idx")
    body("pmask = mask_t[:, None] & mask_p[None, :]")
    body("tl.store(ssmc_dv + row * P + offs_p[None, :], dv, mask=pmask)")
    body("if WANT_Y:")
    with body.block():
        body("y = " + dot(_scale(vs, "A", cols=True), "value") + " + yoff")
        body("if ACCUM_Y:")
        with body.block():
            body("y += tl.load(ssmc_y + row * P + offs_p[None, :], mask=pmask, other=0.0)")
        body("tl.store(ssmc_y + row * P + offs_p[None, :], y, mask=pmask)")
    if o.mode == "row":
        # dL/dl_r, only the terms that carry l_r (module docstring): M over rows u >= r and
        # columns s < r, dy . yoff over u >= r, v . kG over s < r, exp(l_last) sum (G * S_in)
        body("M = " + _scale(vs, dot("dy", "tl.trans(value)"), cols=True) + " * A")
        body("vkG = " + _scale(vs, "tl.sum(value * kG, axis=1)"))
        body("X = tl.cumsum(M, axis=1) - M")                        # X[u, r] = sum_{s<r} M[u, s]
        body("dl = (tl.sum(tl.where(causal, X, 0.0), axis=0)"
             " + tl.cumsum(tl.sum(dy * yoff, axis=1), axis=0, reverse=True)"
             " + (tl.cumsum(vkG, axis=0) - vkG) + tl.exp(l_last) * tl.sum(GS, axis=0))")
        body("tl.store(ssmc_dl + pid_p.to(tl.int64) * B * T * H + (b_idx * T + t_row) * H"
             " + h_idx, dl, mask=mask_t)")
    return f"""
@triton.jit
def ssmc_chunked_bwd_dv{variant_suffix(resets)}(
    {input_params(plan.program)},
    ssmc_dy, ssmc_states, ssmc_dstates, ssmc_dv, ssmc_dl, ssmc_y, ssmc_resets, {CHUNK_PARAMS}
    {CONSTS}, WANT_Y: tl.constexpr, ACCUM_Y: tl.constexpr, {VARIANT_PARAMS}
):
{_rows_program(body, resets)}
"""


def render_dqk_kernel(plan: Plan, resets: str = "branch") -> str:
    """Decays without n, per (chunk, block of HEADS heads, n-block) in parallel: dq and dk
    summed over the block's heads (HEADS > 1 only where query and key are the same for every
    head of a group; the host adds up a group's blocks), the p axis walked in NPBK blocks of
    BP. One variant of `chunk_variants`: the first stores every program's sums (the heads it
    does not take add zeros); the counting one adds its heads' to them where it takes one."""
    pre = Emitter(indent=1)
    body = Emitter(indent=2)
    shared = head_free(plan)
    o = _Ops(plan, body, resets)
    dot = o.dot
    pre(f"dq = tl.zeros([BT, BN], dtype={o.ct})")
    pre(f"dk = tl.zeros([BT, BN], dtype={o.ct})")
    body("h_idx = h_first + j")
    # the first variant takes every head and zeroes dy and G of the flagged ones (the counting
    # variant's): no branch in the walk over heads, whose loads the compiler can then pipeline
    keep = resets == "plain"
    if keep:
        body(f"keep = {RESET_FLAG} == 0")
    elif resets in FLAG_TEST:   # the counting variant: `taken` says whether it took a head
        pre("taken = 0")
        body(f"if {RESET_FLAG} {FLAG_TEST[resets]}:")
        body.level += 1
        body("taken = 1")
    _qk_loads(plan, pre if shared else body)
    o.decay()
    body(f"dyv = tl.zeros([BT, BT], dtype={o.ct})")
    body(f"dyS = tl.zeros([BT, BN], dtype={o.ct})")
    body(f"vG = tl.zeros([BT, BN], dtype={o.ct})")
    body("for p0 in tl.static_range(0, NPBK * BP, BP):")
    with body.block():
        body("offs_p = p0 + tl.arange(0, BP)")
        body("mask_p = offs_p < P")
        o.dy()
        o.operand("value", "value")
        _state_tiles(body, transposed=True)
        if keep:
            body("dy = tl.where(keep, dy, 0.0)")
            body("GT = tl.where(keep, GT, 0.0)")
        body("dyv += " + dot("dy", "tl.trans(value)"))
        body("dyS += " + dot("dy", "S_inT"))
        body("vG += " + dot("value", "GT"))
    if o.mode == "row":
        body(f"dA = dyv * {o.decay_matrix()}")
        body("dq += " + dot("dA", "key") + " + tl.exp(lcf)[:, None] * dyS")
        body("dk += " + dot("tl.trans(dA)", "query") + " + tl.exp(lr)[:, None] * vG")
    else:
        body("dA = tl.where(causal, dyv, 0.0)")
        body("dq += " + dot("dA", "key") + " + dyS")
        body("dk += " + dot("tl.trans(dA)", "query") + " + vG")
    stores = ("tl.store(ssmc_dq + part, dq, mask=nmask)\n"
              "tl.store(ssmc_dk + part, dk, mask=nmask)")
    if resets == "count":   # onto the first variant's sums, where this one took a head
        stores = ("if taken != 0:\n" + indent(
            "dq += tl.load(ssmc_dq + part, mask=nmask, other=0.0)\n"
            "dk += tl.load(ssmc_dk + part, mask=nmask, other=0.0)\n" + stores, 1))
    inner = "\n".join([
        indent(ROWS, 1), pre.text(), "    for j in range(HEADS):", body.text(),
        "    part = ((b_idx * T + t_row[:, None]) * (H // HEADS) + tl.program_id(1)) * N"
        " + offs_n[None, :]", "    nmask = mask_t[:, None] & mask_n[None, :]", indent(stores, 1)])
    return f"""
@triton.jit
def ssmc_chunked_bwd_dqk{variant_suffix(resets)}(
    {input_params(plan.program)},
    ssmc_dy, ssmc_states, ssmc_dstates, ssmc_dq, ssmc_dk, ssmc_resets, {CHUNK_PARAMS}
    {CONSTS}, H, HEADS: tl.constexpr, NPBK: tl.constexpr, NPB: tl.constexpr, {VARIANT_PARAMS}
):
{_per_chunk(inner, resets, heads=True)}
"""
