"""The chunked (SSD) lowering on CUDA: a parallel chunk pass, a sequential elementwise pass
and a parallel output pass, with the chunk-local matrix products on tensor cores (`mma.sync`
m16n8k16 through `T.ptx_legacy.mma`) for bf16/fp16 plans and as tiled fp32 FMAs from shared
memory for fp32.

Per direction, three kernels:

chunk pass, one block per (chunk, head, p-block, n-block), every chunk in parallel:
    dS_c = key^T @ (value * exp(l_last - lc))     (fp32 accumulators, stored into ws[slot])
    cd[slot, h] = l_last
    with lc the running sum of log-decays within the chunk and l_last its last entry. The
    factor exp(l_last - lc_j) is computed once per step j (beside the running sums) and
    applied to the value tile. The key tile comes from 16-byte loads of its rows, two steps
    at a time packed into 32-bit words of the transposed tile (plan.tile KV, default on;
    KV=0: element by element). The accumulators are staged through shared memory (over the
    key tile, free after the product) and written to ws along n, its contiguous axis, with
    consecutive threads on consecutive 16-byte vectors (single elements where N does not
    split into vectors): stored straight from the mma layout, consecutive lanes wrote
    2-byte entries N apart.

sequential pass, SV 16-byte vectors of the n x p state of a (sequence, head) a thread
(plan.tile SV, default SEQ_V; SV=0, or a state that does not split into vectors: SEQ_E
scalar entries a thread):
    per chunk in traversal order, in fp32 registers,
        dS = ws[slot];  ws[slot] = S (the state entering the chunk);  S = exp(l_last) * S + dS
    starting from the initial state (or zero); the final state is written in fp32. Pure
    bandwidth: no matrix product waits on the serial chain (the previous single state pass
    loaded and multiplied every chunk inside it: ~33 us a chunk step on an H100); a
    thread's loads of a chunk are issued together, consecutive threads on consecutive
    vectors. The decay factors exp(l_last - lc) and exp(l_last) have exponents <= 0 for
    decays <= 1.
    dS is stored in the operand type, like the entering states (bf16/fp16: one rounding per
    chunk contribution, ~2^-9 relative; the running sum S stays fp32).

output pass, one block per (chunk, head, p-block), every chunk in parallel:
    G = (query @ key^T) * exp(lc_i - lc_j) on the causal half (zero elsewhere)
    y = exp(lc_i) * (query @ state_in) + G @ value,  then the epilogue and the store.
    On tensor cores G never leaves registers: the accumulator layout of two m16n8 tiles is
    the A-operand layout of one m16k16 tile, so G is re-used as the next product's operand.
    The running sums lc come from a fixed-count (unrolled) loop over the chunk's log-decays.
    plan.tile SP (where the state product takes the whole key dim at once): the state
    tile's 16-byte loads go into registers before the query-key product and into shared
    memory after it, so that they are in flight during it (more registers a thread).

Both parallel passes: where the value is a bare input carrying p times a factor free of p
and n (`value_split`; Mamba-2's x * softplus(dt + dt_bias)), the factor is evaluated once a
step, beside the log-decays, into shared memory (svs), and the value tile's copies load the
input and multiply (the softplus's exp and log were evaluated once an element).

16-bit plans evaluate exp and divisions whose results are rounded to 16 bits right after (the
operand tiles' and the epilogue's expressions, the output pass's decay factors) with CUDA's
approximate `__expf` / `__fdividef` (plan.tile FM, default on; FM=0: exact; fp32 plans: exact).

Warp w of the 4 owns the m16 row tiles w, w + 4, ... of each product; in a tile, lane l holds
rows l // 4 and l // 4 + 8, columns 2 (l % 4) and 2 (l % 4) + 1 of every n8 column tile (the
mma accumulator layout; the fp32 path uses the same ownership). Shared tiles are stored with
the reduction axis contiguous (transposed on the way in where needed) and rows padded by 8
elements, so that fragment loads are 32-bit and free of bank conflicts.

Extra arguments (after the common ones, see common.py):
    ws   (NS, H, P, N) in the operand type: each chunk's dS (chunk pass), then the state
         entering every chunk (sequential pass) ("chunk slots"; NS = B * ceil(TT / Q), or
         TT // Q + S for packed sequences: sequence s's chunk c is slot TT0_s // Q + s + c,
         which never collides with the next sequence's)
    cd   (NS, H) float32: every chunk's total log-decay (chunk pass -> sequential pass)
    cs   (NS,) int32, packed sequences only: the sequence of every slot (-1: unused), written
         by two small kernels before the first direction, read by the chunk and output passes.
`workspace_shapes` gives their shapes. Limits (`unsupported`): decays that vary over the key
axis (their tensor-core form needs a factorisation that overflows), float64, chunk sizes that
are not a multiple of 16 up to 128, and tiles that do not fit in 48 KB of shared memory
(the chunk pass's count includes its staged dS tile, where that is larger than the key tile).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ....plan import Plan
from ..render import exp_call
from .common import Emitter, KernelSpec, i64, register_lowering

THREADS = 128
WARPS = THREADS // 32
SMEM = 48 * 1024
MMA_DTYPES = {"bfloat16": "bf16", "float16": "fp16"}
BATCH = 16  # tile elements a thread loads before storing them to shared memory
VBATCH = 4  # ... 16-byte vectors, in the vectorised copies
SEQ_E = 8   # state entries per thread in the sequential pass (scalar form, SV=0)
SEQ_V = 4   # 16-byte vectors of state entries per thread in the sequential pass


def operand_dtype(plan: Plan) -> str:
    return plan.dtype if plan.dtype in MMA_DTYPES else "float32"


def _up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@dataclass(frozen=True)
class Tiles:
    Q: int      # chunk size
    NP: int     # key dim padded to 16
    mma: bool   # tensor cores (bf16/fp16) or fp32 FMAs
    OT: str     # operand dtype of the products (and of the chunk states in ws)
    BP: int     # value channels per output-pass block
    KC: int     # key-dim slice per pass over shared memory in the output pass
    BPS: int    # value channels per chunk-pass block
    NB: int     # key-dim rows per chunk-pass block
    VL: int = 1  # elements per vectorised (16-byte) copy of plain operands to shared memory
    # output-pass variants (plan.tile pins, 0/1; see out_pass):
    GF: int = 0  # G packed into operand-type fragments before the state product (registers)
    EP: int = 0  # epilogue staged through shared memory: coalesced loads/stores over p
    VS: int = 0  # the value tile over sK (loaded after the state product): less shared memory
    MB: int = 0  # __launch_bounds__ minimum blocks per SM of every kernel (caps registers)
    LB: int = BATCH  # tile elements a thread loads before storing them (16-byte copies: LB / 4)
    # sequential-pass variant (plan.tile SV): 16-byte vectors of the chunk states a thread
    # (SV x 16 / esz entries; 0: one scalar entry at a time, SEQ_E of them, the older form)
    SV: int = SEQ_V
    # chunk-pass variant (plan.tile KV, 0/1): the key tile copied in 16-byte vectors (a plain
    # key input in the operand type whose rows split into vectors), two steps at a time,
    # transposed in registers into 32-bit words of sWt; else element by element (default on;
    # KV=0 pins the element copy)
    KV: int = 1
    # output-pass variant (plan.tile SP, 0/1): the state tile's 16-byte loads issued into
    # registers before the query-key product (stored to shared memory after it), so that
    # they are in flight during it; where the state product takes the whole key dim at once
    SP: int = 0
    # plan.tile FM (0/1; 16-bit plans only, default on): approximate exp and division
    # (`__expf`, `__fdividef`) wherever an element's value is rounded to the operand type or
    # the output right after: the operand tiles' and the epilogue's expressions, the output
    # pass's decay factors exp(lc_i - lc_j) and exp(lc_i). The per-step log-decays, their
    # sums and the chunk and sequential passes' decay factors stay exact. FM=0 pins exact math.
    FM: int = 0
    # both parallel passes (plan.tile VT, 0/1; tensor cores only): the transposed value tile
    # sVt written a pair of steps at a time (one 32-bit word), a warp's 32 items 8 channels x
    # 4 step pairs, so that its stores fall in 32 distinct banks (rows (Q + 8) / 2 = 4 mod 32
    # words apart: consecutive channels' 2-byte stores were 4-way conflicts); its global loads
    # then read 16 bytes of 4 rows (pairs of steps) each instead of a row's 64 bytes. Default
    # on (bf16 bench shape on an H200: 2.92 vs 3.88 ms); VT=0 pins a row at a time
    VT: int = 1

    @property
    def pad(self) -> int:
        return 8 if self.mma else 1

    @property
    def esz(self) -> int:
        return 2 if self.mma else 4


def value_split(program):
    """(input symbol, row scale) where the recurrence's value is a bare input carrying p times a
    factor free of p and n (Mamba-2's x * softplus(dt + dt_bias): x, softplus(dt + dt_bias)),
    else None. The kernels evaluate the factor once a step (a row of the value tile) instead of
    once an element."""
    import sympy as sp
    expr = program.recurrence.value.expr
    axes = {inp.name: inp.axes for inp in program.inputs}

    def carries(f, ax):
        return any(ax in axes.get(x.name, ("n", "p")) for x in f.free_symbols)
    factors = sp.Mul.make_args(expr)
    base = [f for f in factors if carries(f, "p")]
    if len(base) != 1 or not isinstance(base[0], sp.Symbol) or base[0].name not in axes:
        return None
    rest = [f for f in factors if f is not base[0]]
    scale = sp.Mul(*rest)
    if scale == 1 or carries(scale, "n") or carries(scale, "p"):
        return None
    return base[0], scale


def _out_smem(Q, KC, BP, mma, pad, esz, vs=False, scale=False) -> int:
    vt = 0 if vs and BP * (Q + pad) <= max(Q, BP) * (KC + pad) else BP * (Q + pad)
    b = (Q * (KC + pad) + max(Q, BP) * (KC + pad) + vt) * esz + (2 + scale) * Q * 4
    if not mma:
        b += Q * (Q + 1) * 4  # G goes through shared memory on the fp32 path
    return b


def _stage_cols(NB: int, esz: int) -> int:
    """Row length of the chunk pass's staged dS tile (BPS rows of NB key entries): padded by
    one 16-byte vector, so that rows stay 16-byte aligned and the accumulators' scattered
    stores are free of bank conflicts."""
    return NB + 16 // esz


def _state_smem(Q, NB, BPS, pad, esz, scale=False) -> int:
    # the key tile, or the staged dS tile over it (after the product), the value tile, and
    # the log-decays, their running sums and the decay factors of the chunk's rows (and the
    # value's row scales, where it splits: value_split)
    return (max(NB * (Q + pad), BPS * _stage_cols(NB, esz)) + BPS * (Q + pad)) * esz + \
        (3 + scale) * Q * 4


def tiles(plan: Plan, N: int, P: int) -> Tiles | str:
    """The tiling for this plan and sizes, or why there is none."""
    Q = plan.chunk_size
    if Q % 16 or not 16 <= Q <= 128:
        return f"chunk size {Q} is not a multiple of 16 in [16, 128]"
    OT = operand_dtype(plan)
    mma = OT in MMA_DTYPES
    pad, esz = (8, 2) if mma else (1, 4)
    NP = _up(N, 16)
    Pp = _up(P, 8)
    bps = [b for b in (64, 32, 16, 8) if b <= Pp] or [8]
    if Pp < 64 and Pp not in bps:
        bps.insert(0, Pp)
    kcs = [NP] + [k for k in (128, 64, 32, 16) if k < NP and NP % k == 0]
    nbs = [nb for nb in dict.fromkeys((min(NP, 128 if mma else 64), 64, 32, 16)) if nb <= NP]
    bpss = list(bps)  # the chunk pass (every chunk in parallel)
    # plan.tile may pin any of BP, KC, BPS, NB (a tuned configuration)
    pin = plan.tile_dict()
    bad = {k: v for k, v in pin.items() if k in ("BP", "BPS") and (v <= 0 or v % 8)
           or k in ("KC", "NB") and (v <= 0 or v % 16 or NP % v)}
    if bad:
        return f"tile {bad}: BP, BPS must be multiples of 8, KC, NB multiples of 16 dividing {NP}"
    for key, options in (("BP", bps), ("KC", kcs), ("BPS", bpss), ("NB", nbs)):
        if key in pin:
            options[:] = [pin[key]]
    sc = value_split(plan.program) is not None
    out = next(((bp, kc) for bp in bps for kc in kcs
                if _out_smem(Q, kc, bp, mma, pad, esz, bool(pin.get("VS")), sc) <= SMEM), None)
    state = next(((bp, nb) for bp in bpss for nb in nbs
                  if _state_smem(Q, nb, bp, pad, esz, sc) <= SMEM), None)
    if out is None or state is None:
        return f"no tiling of chunk {Q}, n={N}, p={P} fits in {SMEM // 1024} KB of shared memory"
    # 16-byte copies of operands already in the operand type (the chunk states, plain query
    # and key inputs) where the key dim splits into whole vectors; plan.tile VL=0 turns them off
    vl = 16 // esz
    if not mma or not pin.get("VL", 1) or N % vl:
        vl = 1
    flags = {k: int(bool(pin.get(k, 0))) for k in ("GF", "EP", "VS")}
    flags["GF"] &= int(mma)
    # the value tile fits over the key tile
    flags["VS"] &= int(out[0] * (Q + pad) <= max(Q, out[0]) * (out[1] + pad))
    flags["MB"] = max(0, min(16, int(pin.get("MB", 0))))
    flags["LB"] = max(1, min(BATCH, int(pin.get("LB", BATCH))))
    flags["SV"] = max(0, min(8, int(pin.get("SV", SEQ_V))))
    flags["KV"] = int(bool(pin.get("KV", 1)) and vl > 1)
    flags["SP"] = int(bool(pin.get("SP", 0)) and vl > 1 and out[1] == NP)
    flags["FM"] = int(bool(pin.get("FM", 1)) and mma)
    flags["VT"] = int(bool(pin.get("VT", 1)) and mma)
    return Tiles(Q=Q, NP=NP, mma=mma, OT=OT, BP=out[0], KC=out[1], BPS=state[0], NB=state[1],
                 VL=vl, **flags)


def unsupported(plan: Plan, N: int | None = None, P: int | None = None) -> str | None:
    """Why the CUDA chunked lowering cannot run this plan (at these sizes), or None."""
    if plan.dtype not in ("bfloat16", "float16", "float32"):
        return f"the CUDA chunked lowering takes bf16/fp16/fp32 inputs, not {plan.dtype}"
    prog = plan.program
    Q = plan.chunk_size
    if Q % 16 or not 16 <= Q <= 128:
        return f"chunk size {Q} is not a multiple of 16 in [16, 128]"
    if len(prog.recurrence.directions) > 2:
        return "more than two directions"
    ld = prog.log_decay
    if prog.recurrence.decay is not None and (ld is None or "n" in ld.axes or "p" in ld.axes):
        return ("the CUDA chunked lowering handles decays that are scalar per step (per key "
                "or per channel decays have no overflow-free tensor-core form)")
    if N is not None and P is not None:
        t = tiles(plan, N, P)
        if isinstance(t, str):
            return t
    return None


def num_slots(plan: Plan, B: int, T: int, S: int) -> int:
    Q = plan.chunk_size
    n = T // Q + S if plan.varlen else B * max(-(-T // Q), 1)
    return max(n, 1)


def workspace_shapes(plan: Plan, B: int, T: int, S: int, H: int, N: int, P: int):
    """[(name, shape, torch dtype name)] of the extra arguments, in argument order."""
    ns = num_slots(plan, B, T, S)
    out = [("chunk_states", (ns, H, P, N), operand_dtype(plan)),
           ("chunk_decay", (ns, H), "float32")]
    if plan.varlen:
        out.append(("chunk_seq", (ns,), "int32"))
    return out


def L(x: str) -> str:
    return f'T.Cast("int64", {x})'


class _ChunkedCuda(Emitter):
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

    def coop(self, rows: int, cols: int, prelude, cond: str, values, targets: list[str]):
        """targets[k] at every (r_, c_) of a rows x cols tile = values()[k] where `cond` holds,
        zero elsewhere; spread over the block's threads. Two phases per batch of BATCH
        elements a thread: all loads into registers (independent, so they are in flight
        together), then the stores to shared memory. (One load-store pair per iteration left
        each iteration waiting for its load: ~40 us per chunk in the state pass.)
        `prelude()` emits index bindings from r_, c_; `values()` emits the statements under
        `cond` and returns the expressions (in the accumulation type)."""
        w = self.w
        regs = [f"lv{k}_" for k in range(len(targets))]

        def load(in_range: str):
            prelude()
            with w.block(f"if {in_range}{cond}:"):
                for reg, v in zip(regs, values()):
                    w(f"{reg}[u_] = {v}")
            with w.block("else:"):
                for reg in regs:
                    w(f"{reg}[u_] = {self.zero}")

        def store():
            for reg, tgt in zip(regs, targets):
                w(f"{tgt} = {self.cast_ot(reg + '[u_]')}")

        self._two_phase(rows * cols, self.t.LB, (f"r_ = ix_ // {cols}", f"c_ = ix_ % {cols}"),
                        load, store)

    def _two_phase(self, total: int, cap: int, position: tuple, load, store):
        """The loop of the cooperative copies: `total` items spread over the block's threads,
        in batches of up to `cap` a thread (a divisor of the thread's item count); per batch
        all `load(in_range)` bodies first (independent, so they are in flight together; the
        item is at u_ of the batch, `position` binds r_, c_ from ix_, and `in_range` prefixes
        the load's condition where the last batch overhangs), then all `store()` bodies."""
        w = self.w
        nit = -(-total // THREADS)
        batch = max(b for b in range(1, min(nit, cap) + 1) if nit % b == 0)
        guard = total % THREADS != 0

        def index():
            w(f"ix_ = (bt_ * {batch} + u_) * {THREADS} + tx_", *position)

        with w.block(f"for bt_ in range({nit // batch}):"):
            with w.block(f"for u_ in T.unroll({batch}):"):
                index()
                load(f"ix_ < {total} and " if guard else "")
            with w.block(f"for u_ in T.unroll({batch}):"):
                index()
                if guard:
                    w.lines.append("    " * w.depth + f"if ix_ < {total}:")
                    w.depth += 1
                store()
                if guard:
                    w.depth -= 1

    def coop_regs(self):
        self.local("lv0_", self.t.LB, "float32")
        self.local("lv1_", self.t.LB, "float32")
        if self.t.VT:
            self.local("vp_", 2, self.t.OT)
        if self.t.VL > 1:
            self.local("vv0_", self.vbatch * 4, "uint32")
            self.local("vv1_", self.vbatch * 4, "uint32")

    @property
    def vbatch(self) -> int:
        return max(1, self.t.LB * VBATCH // BATCH)

    def words(self, name: str, buf: str, size: str, shared: bool = False):
        """`name`: buffer `buf` seen as flat 32-bit words (raw 16-byte copies: TVM's CUDA
        codegen has no vector stores of bf16 lanes)."""
        scope = ', scope="shared"' if shared else ""
        self.w(f'{name} = T.decl_buffer(({size},), "uint32", data={buf}.data{scope})')

    def coop_vec(self, rows: int, cols: int, prelude, cond: str, sources, targets):
        """Like `coop` for operands already in the operand type, 16 bytes (VL elements, 4 words)
        a copy: the VL elements from sources()[k] (an element reference at (r_, c_), c_ a
        multiple of VL, in a row contiguous over them) go to the word buffer targets[k][0] at
        word (targets[k][1]) // EW (a flat element offset); zero where `cond` fails (it must
        hold for all VL elements or none)."""
        w, VL = self.w, self.t.VL
        ew = 4 // self.t.esz
        cv = cols // VL
        regs = [f"vv{k}_" for k in range(len(targets))]

        def load(in_range: str):
            prelude()
            with w.block(f"if {in_range}{cond}:"):
                for k, (reg, ref) in enumerate(zip(regs, sources())):
                    # a 4-word view at the element (int64 offsets give no vector loads)
                    w(f"pv{k}_ = T.address_of({ref})",
                      f'pw{k}_ = T.decl_buffer((4,), "uint32", data=pv{k}_)')
                    with w.block("for v_ in T.vectorized(4):"):
                        w(f"{reg}[u_ * 4 + v_] = pw{k}_[v_]")
            with w.block("else:"):
                for reg in regs:
                    with w.block("for v_ in T.vectorized(4):"):
                        w(f"{reg}[u_ * 4 + v_] = T.uint32(0)")

        def store():
            for reg, (buf, off) in zip(regs, targets):
                with w.block("for v_ in T.vectorized(4):"):
                    w(f"{buf}[({off}) // {ew} + v_] = {reg}[u_ * 4 + v_]")

        self._two_phase(rows * cv, self.vbatch, (f"r_ = ix_ // {cv}", f"c_ = ix_ % {cv} * {VL}"),
                        load, store)

    def plain_operand(self, which: str) -> str | None:
        """The element reference (at t_, n_) of the input that the recurrence's `which`
        (key/query) reads as is, when it is stored in the operand type with n innermost (its
        rows are whole 16-byte vectors when VL divides N); else None."""
        import sympy as sp
        if self.t.VL == 1:
            return None
        expr = getattr(self.program.recurrence, which).expr
        if not isinstance(expr, sp.Symbol):
            return None
        for inp, dt in zip(self.program.inputs, self.spec.input_dtypes):
            if inp.name == expr.name and dt == self.t.OT and inp.axes and inp.axes[-1] == "n":
                idx = self.index("t_", n="n_")
                return f"{self.buf(inp.name)}[{', '.join(idx[a] for a in inp.axes)}]"
        return None

    def seq_bounds(self):
        """b_, t0_, t1_, L_ of sequence s_ (int64)."""
        w = self.w
        if self.varlen:
            w("b_ = T.int64(0)",
              'v_t0_ = T.Cast("int64", cu[s_])',
              'v_t1_ = T.Cast("int64", cu[s_ + T.int64(1)])',
              "t0_ = T.max(T.min(v_t0_, TT), T.int64(0))",
              "t1_ = T.max(T.min(v_t1_, TT), t0_)")
        else:
            w("b_ = s_", "t0_ = T.int64(0)", "t1_ = TT")
        w("L_ = t1_ - t0_")

    def slot_base(self) -> str:
        Q = self.t.Q
        if self.varlen:
            return f"t0_ // {i64(Q)} + s_"
        return f"s_ * T.max((TT + {i64(Q - 1)}) // {i64(Q)}, T.int64(1))"

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

    def load_value_t(self, direction, bp: int, pb: str, scale: str | None = None):
        """sVt[pp, j] = value at (step c0_ + j, channel pb * bp + pp), zero outside (times
        `scale`, an expression of the row r_ = j, where given)."""
        w, Q = self.w, self.t.Q

        def values():
            w(f"t_ = {self.time_of(direction, 'c0_ + ' + L('r_'))}")
            if self.vsplit is not None:
                # the bare input times the row's scale (svs, log_decays)
                base = self.value_of(self.vsplit[0], self.index("t_", p="p_"))
                v = f"{base} * svs[r_]"
            else:
                with self.fast_math():
                    v = self.value_of(self.program.recurrence.value.expr,
                                      self.index("t_", p="p_"))
            return [v if scale is None else f"{v} * {scale}"]
        if self.t.VT:
            self.value_pairs(bp, pb, values)
            return
        self.coop(Q, bp, lambda: w(f"p_ = {pb} * {i64(bp)} + {L('c_')}"),
                  f"{L('r_')} < cl_ and p_ < {i64(self.spec.P)}", values, ["sVt[c_, r_]"])

    def value_pairs(self, bp: int, pb: str, values):
        """plan.tile VT: sVt[c_, r_ + k] = values() at row r_ + k (k = 0, 1; zero outside), a
        pair of steps of one channel a thread, stored as one 32-bit word (2 lanes of the
        operand type). Item ix_ = lane l of group g (32 items): channel g % (bp / 8) * 8 +
        l % 8, steps 2 (g // (bp / 8) * 4 + l // 8) and the next, so that a warp's words
        (channel rows (Q + 8) / 2 words apart, 4 mod 32) are in 32 distinct banks."""
        w, Q = self.w, self.t.Q
        ncb = bp // 8
        total = Q // 2 * bp  # a multiple of 64 (Q: of 16, bp: of 8): whole warps
        cond = f"p_ < {i64(self.spec.P)}"
        ot = self.t.OT

        def load(in_range: str):
            w(f"p_ = {pb} * {i64(bp)} + {L('c_')}")
            for k in range(2):
                with w.block(f"if {in_range}{L(f'r2_ + {k}')} < cl_ and {cond}:"):
                    w(f"r_ = r2_ + {k}")  # values() reads the row r_
                    w(f"lv{k}_[u_] = {values()[0]}")
                with w.block("else:"):
                    w(f"lv{k}_[u_] = {self.zero}")

        def store():
            w(f'vp_[0] = T.Cast("{ot}", lv0_[u_])', f'vp_[1] = T.Cast("{ot}", lv1_[u_])')
            with w.block("for v_ in T.vectorized(2):"):
                w("sVt[c_, r2_ + v_] = vp_[v_]")

        self._two_phase(total, self.t.LB,
                        (f"c_ = ix_ // 32 % {ncb} * 8 + ix_ % 8",
                         f"r2_ = (ix_ // 32 // {ncb} * 4 + ix_ % 32 // 8) * 2"), load, store)

    # ---- warp-level products --------------------------------------------------------------
    def mtile(self, i: str) -> str:
        """Row offset of warp wp_'s i-th m16 tile (clamped into the tile: idle warps compute
        on valid rows and store nothing)."""
        return f"T.min(wp_ + {WARPS} * {i}, {self.mt_total - 1}) * 16"

    def mtile_valid(self, i: str) -> str:
        return f"wp_ + {WARPS} * {i} < {self.mt_total}"

    def b_frag(self, b, k0):
        """`bf`, the mma B fragment of column tile j_: lane (g, tg) holds B[j_ * 8 + g,
        k0(dk) + 2 tg + v] for dk = 0, 8 and v = 0, 1; b(row, col) gives the shared load."""
        for h, dk in enumerate((0, 8)):
            with self.w.block("for v_ in T.vectorized(2):"):
                self.w(f"bf[{2 * h} + v_] = {b('j_ * 8 + g_', f'{k0(dk)} + tg_ * 2 + v_')}")

    def mm(self, acc: str, mtw: int, nt: int, a, b, K: int, skip=None):
        """acc[(i * nt + j) * 4 + r * 2 + c] += sum_k A[m0_i + g + 8r, k] * B[j * 8 + 2 tg + c, k]
        for k in [0, K): a(row, k) and b(col, k) give shared-memory loads. `skip(m0, j)`: a
        condition under which tile (i, j) is known to stay zero."""
        w = self.w
        if self.t.mma:
            # one fragment buffer per m-tile, always passed at offset 0: TVM stores a buffer
            # read in vectorised pairs as bf16x2/half2 lanes, and the mma's operand offset is
            # then not scaled to those lanes
            with w.block(f"for ks_ in T.unroll({K // 16}):"):
                for i in range(mtw):
                    w(f"m0_ = {self.mtile(i)}")
                    for h, (dr, dk) in enumerate(((0, 0), (8, 0), (0, 8), (8, 8))):
                        with w.block("for v_ in T.vectorized(2):"):
                            w(f"af{i}[{2 * h} + v_] = "
                              f"{a(f'm0_ + g_ + {dr}', f'ks_ * 16 + {dk} + tg_ * 2 + v_')}")
                with w.block(f"for j_ in T.unroll({nt}):"):
                    self.b_frag(b, lambda dk: f"ks_ * 16 + {dk}")
                    for i in range(mtw):
                        call = self.mma_call(f"af{i}", acc, f"({i} * {nt} + j_) * 4")
                        if skip is not None:
                            w(f"m0_ = {self.mtile(i)}")
                            with w.block(f"if not ({skip('m0_', 'j_')}):"):
                                w(call)
                        else:
                            w(call)
        else:
            with w.block(f"for k_ in range({K}):"):
                with w.block(f"for i_ in T.unroll({mtw}):"):
                    with w.block("for r_ in T.unroll(2):"):
                        row = self.mtile("i_") + " + g_ + r_ * 8"
                        w(f"af[i_ * 2 + r_] = {a(row, 'k_')}")
                with w.block(f"for j_ in T.unroll({nt}):"):
                    with w.block("for c_ in T.unroll(2):"):
                        w(f"bf[c_] = {b('j_ * 8 + tg_ * 2 + c_', 'k_')}")
                    with w.block(f"for i_ in T.unroll({mtw}):"):
                        with w.block("for r_ in T.unroll(2):"):
                            with w.block("for c_ in T.unroll(2):"):
                                x = f"{acc}[(i_ * {nt} + j_) * 4 + r_ * 2 + c_]"
                                w(f"{x} = {x} + af[i_ * 2 + r_] * bf[c_]")

    @staticmethod
    def ep_cols(Q: int, BP: int, nbytes: int) -> int:
        """Channels a round of the staged epilogue: the largest multiple of 8 dividing BP whose
        Q x (EPC + 4) fp32 tile fits in `nbytes`."""
        return max(c for c in range(8, BP + 1, 8) if BP % c == 0 and Q * (c + 4) * 4 <= nbytes)

    def staged_epilogue(self, d_index: int, direction, mtw: int, nty: int, epc: int):
        """y through shared memory (sY over sC), EPC channels a round: the warps store their
        accumulators, then consecutive threads take consecutive channels of a row, so that the
        epilogue's loads (x, z, ...) and the output's stores are coalesced."""
        w, s, t = self.w, self.spec, self.t
        Q, BP = t.Q, t.BP
        total = Q * epc
        nit = -(-total // THREADS)
        unroll = max(b for b in range(1, min(nit, 8) + 1) if nit % b == 0)
        for rnd in range(BP // epc):
            if rnd:
                self.sync()  # the previous round's reads
            depth = self.each_acc(mtw, nty)
            with w.block(f"if {self.mtile_valid('i_')} and j_ // {epc // 8} == {rnd}:"):
                w(f"sY[row_, col_ - {rnd * epc}] = accY[k_acc_]")
            w.depth -= depth
            self.sync()
            with w.block(f"for it_ in range({nit // unroll}):"):
                with w.block(f"for u_ in T.unroll({unroll}):"):
                    w(f"ix_ = (it_ * {unroll} + u_) * {THREADS} + tx_",
                      f"row_ = ix_ // {epc}", f"col_ = ix_ % {epc}",
                      f"p_ = pb_ * {i64(BP)} + {i64(rnd * epc)} + {L('col_')}")
                    guard = f"ix_ < {total} and " if total % THREADS else ""
                    with w.block(f"if {guard}{L('row_')} < cl_ and p_ < {i64(s.P)}:"):
                        w(f"t_ = {self.time_of(direction, 'c0_ + ' + L('row_'))}")
                        with self.fast_math():
                            self.emit_y(d_index, "t_", "sY[row_, col_]")

    def mma_call(self, af: str, acc: str, offset: str) -> str:
        kind = MMA_DTYPES[self.t.OT]
        return (f'T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", "{kind}", "{kind}", '
                f'"fp32", {af}.data, 0, bf.data, 0, {acc}.data, {offset}, False, '
                'dtype="float32"))')

    def frag_locals(self, mtw: int):
        t = self.t
        if t.mma:
            for i in range(mtw):
                self.local(f"af{i}", 8, t.OT)
            self.local("bf", 4, t.OT)
        else:
            self.local("af", 2 * mtw, "float32")
            self.local("bf", 2, "float32")

    def each_acc(self, mtw: int, nt: int):
        """Open unrolled loops over a warp's accumulator entries; defines row_ (in the block's
        tile), col_ (in the column tile), k_acc_ (the entry's index). Returns the depth."""
        w = self.w
        w.lines.append("    " * w.depth + f"for i_ in T.unroll({mtw}):")
        w.depth += 1
        w.lines.append("    " * w.depth + f"for j_ in T.unroll({nt}):")
        w.depth += 1
        w.lines.append("    " * w.depth + "for r_ in T.unroll(2):")
        w.depth += 1
        w.lines.append("    " * w.depth + "for c_ in T.unroll(2):")
        w.depth += 1
        w(f"row_ = {self.mtile('i_')} + g_ + r_ * 8", "col_ = j_ * 8 + tg_ * 2 + c_",
          f"k_acc_ = (i_ * {nt} + j_) * 4 + r_ * 2 + c_")
        return 4

    # ---- kernels ------------------------------------------------------------------------
    def init_slots(self):
        """cs[:] = -1 (packed sequences): slots no chunk maps to are skipped."""
        w = self.w
        with w.block(f"for bid_ in T.thread_binding((NS + {i64(THREADS - 1)}) // "
                     f"{i64(THREADS)}, thread=\"blockIdx.x\"):"):
            with w.block(f'for tx_ in T.thread_binding({THREADS}, thread="threadIdx.x"):'):
                w(f"ix_ = bid_ * {i64(THREADS)} + {L('tx_')}")
                with w.block("if ix_ < NS:"):
                    w("cs[ix_] = -1")

    def map_slots(self):
        """cs[slot] = the sequence of every chunk slot (packed sequences; after init_slots)."""
        w, Q = self.w, self.t.Q
        with w.block('for s_ in T.thread_binding(S1 - T.int64(1), thread="blockIdx.x"):'):
            with w.block(f'for tx_ in T.thread_binding({THREADS}, thread="threadIdx.x"):'):
                self.seq_bounds()
                w(f"nch_ = (L_ + {i64(Q - 1)}) // {i64(Q)}", f"base_ = {self.slot_base()}")
                with w.block(f"for k_ in range((nch_ + {i64(THREADS - 1)}) // {i64(THREADS)}):"):
                    w(f"ch_ = k_ * {i64(THREADS)} + {L('tx_')}")
                    with w.block("if ch_ < nch_:"):
                        w('cs[base_ + ch_] = T.Cast("int32", s_)')

    def slot_task(self):
        """From slot_: the sequence s_ (its bounds, see seq_bounds) and the chunk ch_ in it, c0_
        and cl_. For packed sequences, opens `if s_ >= 0` (unused slots); returns the number of
        levels opened."""
        w, Q = self.w, self.t.Q
        opened = 0
        if self.varlen:
            w('s_ = T.Cast("int64", cs[slot_])')
            w.lines.append("    " * w.depth + "if s_ >= T.int64(0):")
            w.depth += 1
            opened = 1
            self.seq_bounds()
            w(f"ch_ = slot_ - ({self.slot_base()})")
        else:
            w(f"nc_ = T.max((TT + {i64(Q - 1)}) // {i64(Q)}, T.int64(1))",
              "s_ = slot_ // nc_", "ch_ = slot_ % nc_")
            self.seq_bounds()
        w(f"c0_ = ch_ * {i64(Q)}", f"cl_ = T.min({i64(Q)}, L_ - c0_)")
        return opened

    def chunk_pass(self, d_index: int, direction):
        """Every chunk in parallel, one block per (slot, head, p-block, n-block):
        ws[slot] = dS = key^T @ (value * exp(l_last - lc)) (the chunk's own contribution to
        the state leaving it) and cd[slot, h] = l_last (the chunk's total log-decay). The
        accumulators go through shared memory (over the key tile) so that ws is written
        along n, its contiguous axis, in 16-byte vectors."""
        w, s, t = self.w, self.spec, self.t
        Q, NB, BPS = t.Q, t.NB, t.BPS
        nnb, npb = -(-s.N // NB), -(-s.P // BPS)
        self.mt_total = NB // 16
        mtw = -(-self.mt_total // WARPS)
        nt = BPS // 8
        SW = _stage_cols(NB, t.esz)
        grid = f"NS * {i64(s.H * npb * nnb)}"
        with w.block(f'for bid_ in T.thread_binding({grid}, thread="blockIdx.x"):'):
            with w.block(f'for tx_ in T.thread_binding({THREADS}, thread="threadIdx.x"):'):
                # the key tile, then (after the product) the staged dS tile sO[pp, nn]
                self.shared("sW_", (max(NB * (Q + t.pad), BPS * SW),), t.OT)
                w(f'sWt = T.decl_buffer(({NB}, {Q + t.pad}), "{t.OT}", data=sW_.data, '
                  'scope="shared")',
                  f'sO = T.decl_buffer(({BPS}, {SW}), "{t.OT}", data=sW_.data, '
                  'scope="shared")')
                self.shared("sVt", (BPS, Q + t.pad), t.OT)
                if self.has_decay:
                    self.shared("sld", (Q,), "float32")
                    self.shared("slc", (Q,), "float32")
                    self.shared("sfac", (Q,), "float32")
                    self.local("run_", 2, "float32")
                if self.vsplit is not None:
                    self.shared("svs", (Q,), "float32")
                self.local("acc", mtw * nt * 4, "float32")
                self.frag_locals(mtw)
                self.coop_regs()
                w(f"nb_ = bid_ % {i64(nnb)}", f"pb_ = bid_ // {i64(nnb)} % {i64(npb)}",
                  f"h_ = bid_ // {i64(nnb * npb)} % {i64(s.H)}",
                  f"slot_ = bid_ // {i64(nnb * npb * s.H)}")
                opened = self.slot_task()
                with w.block("if cl_ > T.int64(0):"):
                    self.lanes()
                    self.log_decays(direction, factors=True)
                    if self.has_decay:
                        with w.block("if nb_ == T.int64(0) and pb_ == T.int64(0) and tx_ == 0:"):
                            w("cd[slot_, h_] = slc[cl_ - T.int64(1)]")

                    # sWt[nn, j] = key(c0_ + j, nb_ * NB + nn)
                    key_ref = self.plain_operand("key") if t.KV else None
                    if key_ref is not None:
                        self.key_pairs(direction, key_ref, SW)
                    else:
                        def key_values():
                            w(f"t_ = {self.time_of(direction, 'c0_ + ' + L('r_'))}")
                            with self.fast_math():
                                return [self.value_of(self.program.recurrence.key.expr,
                                                      self.index("t_", n="n_"))]
                        self.coop(Q, NB, lambda: w(f"n_ = nb_ * {i64(NB)} + {L('c_')}"),
                                  f"{L('r_')} < cl_ and n_ < {i64(s.N)}", key_values,
                                  ["sWt[c_, r_]"])
                    # sVt[pp, j] = value(c0_ + j, pb_ * BPS + pp) * exp(l_last - lc_j): the
                    # decay factor of a step on the smaller operand tile, computed once a step
                    self.load_value_t(direction, BPS, "pb_",
                                      "sfac[r_]" if self.has_decay else None)
                    self.sync()
                    with w.block(f"for u_ in T.unroll({mtw * nt * 4}):"):
                        w(f"acc[u_] = {self.zero}")
                    self.mm("acc", mtw, nt, lambda r, k: f"sWt[{r}, {k}]",
                            lambda c, k: f"sVt[{c}, {k}]", Q)
                    self.stage_store_ws(mtw, nt, SW)
                w.depth -= opened

    def key_pairs(self, direction, ref: str, SW: int):
        """sWt[nn, j] = key(c0_ + j, nb_ * NB + nn) (KV; zero outside), from 16-byte loads of
        the key rows: an item is a pair of steps (2 r_, 2 r_ + 1) and VL entries from n
        offset c_; consecutive threads take consecutive pairs. Entry k of the two rows makes
        the 32-bit word (low half: step 2 r_, as the fragment loads read it) at sWt[c_ + k,
        2 r_]. `ref`: the key element at (t_, n_)."""
        w, s, t = self.w, self.spec, self.t
        Q, NB, VL = t.Q, t.NB, t.VL
        half, cv = Q // 2, NB // VL
        self.words("wd_sWt", "sW_", f"{max(NB * (Q + t.pad), t.BPS * SW) // 2}", shared=True)

        def load(in_range: str):
            w(f"n_ = nb_ * {i64(NB)} + {L('c_')}")
            for k, row in enumerate(("r_ * 2", "r_ * 2 + 1")):
                with w.block(f"if {in_range}{L(row)} < cl_ and n_ < {i64(s.N)}:"):
                    w(f"t_ = {self.time_of(direction, 'c0_ + ' + L(row))}",
                      f"pv{k}_ = T.address_of({ref})",
                      f'pw{k}_ = T.decl_buffer((4,), "uint32", data=pv{k}_)')
                    with w.block("for v_ in T.vectorized(4):"):
                        w(f"vv{k}_[u_ * 4 + v_] = pw{k}_[v_]")
                with w.block("else:"):
                    with w.block("for v_ in T.vectorized(4):"):
                        w(f"vv{k}_[u_ * 4 + v_] = T.uint32(0)")

        def store():
            with w.block(f"for k_ in T.unroll({VL}):"):
                w("sh_ = T.Cast(\"uint32\", k_ % 2 * 16)",
                  "e0_ = T.bitwise_and(T.shift_right(vv0_[u_ * 4 + k_ // 2], sh_), "
                  "T.uint32(65535))",
                  "e1_ = T.bitwise_and(T.shift_right(vv1_[u_ * 4 + k_ // 2], sh_), "
                  "T.uint32(65535))",
                  f"wd_sWt[((c_ + k_) * {Q + t.pad} + r_ * 2) // 2] = "
                  "T.bitwise_or(e0_, T.shift_left(e1_, T.uint32(16)))")

        self._two_phase(half * cv, self.vbatch, (f"r_ = ix_ % {half}", f"c_ = ix_ // {half} * {VL}"),
                        load, store)

    def stage_store_ws(self, mtw: int, nt: int, SW: int):
        """The chunk pass's store: the accumulators (rows nn, columns pp of the block's tile)
        into sO[pp, nn] over the key tile, then ws[slot_, h_, p, n] from sO with consecutive
        threads on consecutive n: 16-byte vectors (16 / esz elements) where N splits into
        them, else single elements."""
        w, s, t = self.w, self.spec, self.t
        NB, BPS = t.NB, t.BPS
        self.sync()  # every warp's reads of the key tile
        depth = self.each_acc(mtw, nt)
        with w.block(f"if {self.mtile_valid('i_')}:"):
            w(f"sO[col_, row_] = {self.cast_ot('acc[k_acc_]')}")
        w.depth -= depth
        self.sync()
        ve = 16 // t.esz
        vec = s.N % ve == 0
        per = ve if vec else 1          # elements per store
        cols = NB // per                # stores per row of the tile
        total = BPS * cols
        nit = -(-total // THREADS)
        guard = f"ix_ < {total} and " if total % THREADS else ""
        loop = f"T.unroll({nit})" if nit <= 16 else f"range({nit})"
        if vec:
            ew = 4 // t.esz
            self.words("wd_sO", "sW_", f"{max(NB * (t.Q + t.pad), BPS * SW) // ew}",
                       shared=True)
        with w.block(f"for it_ in {loop}:"):
            w(f"ix_ = it_ * {THREADS} + tx_", f"r_ = ix_ // {cols}", f"c_ = ix_ % {cols} * {per}",
              f"n_ = nb_ * {i64(NB)} + {L('c_')}", f"p_ = pb_ * {i64(BPS)} + {L('r_')}")
            with w.block(f"if {guard}n_ < {i64(s.N)} and p_ < {i64(s.P)}:"):
                if vec:
                    # a 4-word view of ws at the element (the whole vector is inside: N and
                    # c_ are multiples of its length)
                    # (4-word views at both ends: TVM gathers a vector load from a buffer
                    # at an offset it cannot prove aligned)
                    w("pv_ = T.address_of(ws[slot_, h_, p_, n_])",
                      'pw_ = T.decl_buffer((4,), "uint32", data=pv_)',
                      f"qv_ = T.address_of(wd_sO[(r_ * {SW} + c_) // {ew}])",
                      'qw_ = T.decl_buffer((4,), "uint32", data=qv_, scope="shared")')
                    with w.block("for v_ in T.vectorized(4):"):
                        w("pw_[v_] = qw_[v_]")
                else:
                    w("ws[slot_, h_, p_, n_] = sO[r_, c_]")

    def seq_pass(self, d_index: int, direction):
        """The serial part, elementwise: every thread owns entries of the (p, n) state of a
        (sequence, head) in fp32 registers; per chunk, in traversal order,
            dS = ws[slot];  ws[slot] = state (entering the chunk);  state = exp(l_last) * state + dS
        (exp(l_last) <= 1 for decays <= 1: no overflow). Pure bandwidth: a thread's SV
        16-byte vectors of a chunk are loaded together (independent loads in flight), and
        consecutive threads take consecutive vectors (coalesced). With SV=0, or where the
        state does not split into whole vectors, one scalar entry at a time."""
        s, t = self.spec, self.t
        if not t.SV or (s.P * s.N) % (16 // t.esz):
            return self._seq_pass_scalar(d_index, direction)
        w = self.w
        Q, SV, VE = t.Q, t.SV, 16 // t.esz   # vectors a thread, entries a vector
        E = SV * VE
        PN = s.P * s.N
        nblk = -(-PN // (THREADS * E))
        guard = PN % (THREADS * E) != 0
        nseq = "(S1 - T.int64(1))" if self.varlen else "B"
        with w.block(f'for bid_ in T.thread_binding({nseq} * {i64(s.H * nblk)}, '
                     'thread="blockIdx.x"):'):
            with w.block(f'for tx_ in T.thread_binding({THREADS}, thread="threadIdx.x"):'):
                self.local("st_", E, "float32")
                # a chunk's entries in the operand type, seen as 4 words a vector
                self.local("dv_", E, t.OT)
                w(f'dw_ = T.decl_buffer(({SV * 4},), "uint32", data=dv_.data, scope="local")')
                w(f"eb_ = bid_ % {i64(nblk)}", f"h_ = bid_ // {i64(nblk)} % {i64(s.H)}",
                  f"s_ = bid_ // {i64(nblk * s.H)}")
                self.seq_bounds()
                w(f"base_ = {self.slot_base()}")

                def vector(body):
                    """Per vector v_ of the thread: e_ = its first entry (flat p * N + n),
                    under `if e_ < PN` where the last block overhangs."""
                    with w.block(f"for v_ in T.unroll({SV}):"):
                        w(f"e_ = ((eb_ * {i64(SV)} + {L('v_')}) * {i64(THREADS)} + "
                          f"{L('tx_')}) * {i64(VE)}")
                        if guard:
                            with w.block(f"if e_ < {i64(PN)}:"):
                                body()
                        else:
                            body()

                def init():
                    with w.block(f"for k_ in T.unroll({VE}):"):
                        if self.plan.has_initial_state:
                            w(f"p_ = (e_ + {L('k_')}) // {i64(s.N)}",
                              f"n_ = (e_ + {L('k_')}) % {i64(s.N)}")
                            w(f"st_[v_ * {VE} + k_] = {self.load_h0(d_index)}")
                        else:
                            w(f"st_[v_ * {VE} + k_] = {self.zero}")
                vector(init)
                # ws as one flat array (vectors never straddle a slot: PN splits into them)
                w(f'wsf = T.decl_buffer((NS * {i64(s.H * PN)},), "{t.OT}", data=ws.data)')

                def view():
                    w(f"pv_ = T.address_of(wsf[(slot_ * {i64(s.H)} + h_) * {i64(PN)} + e_])",
                      'pw_ = T.decl_buffer((4,), "uint32", data=pv_)')

                def load():
                    view()
                    with w.block("for q_ in T.vectorized(4):"):
                        w("dw_[v_ * 4 + q_] = pw_[q_]")

                def update():
                    view()
                    with w.block(f"for k_ in T.unroll({VE}):"):
                        w(f"i_ = v_ * {VE} + k_")
                        dv = "dv_[i_]" if t.OT == self.acc else f'T.Cast("{self.acc}", dv_[i_])'
                        w(f"d_ = {dv}", f"dv_[i_] = {self.cast_ot('st_[i_]')}")
                        upd = "f_ * st_[i_]" if self.has_decay else "st_[i_]"
                        w(f"st_[i_] = {upd} + d_")
                    with w.block("for q_ in T.vectorized(4):"):
                        w("pw_[q_] = dw_[v_ * 4 + q_]")

                with w.block(f"for ch_ in range((L_ + {i64(Q - 1)}) // {i64(Q)}):"):
                    w("slot_ = base_ + ch_")
                    if self.has_decay:
                        w("f_ = T.exp(cd[slot_, h_])")
                    vector(load)      # all of the chunk's loads first: in flight together
                    vector(update)
                if self.plan.return_final_state:
                    def final():
                        with w.block(f"for k_ in T.unroll({VE}):"):
                            w(f"p_ = (e_ + {L('k_')}) // {i64(s.N)}",
                              f"n_ = (e_ + {L('k_')}) % {i64(s.N)}")
                            w(f"hT[{self.state_index(d_index)}] = st_[v_ * {VE} + k_]")
                    vector(final)

    def _seq_pass_scalar(self, d_index: int, direction):
        """The serial part, elementwise: one thread per SEQ_E entries of the (p, n) state of a
        (sequence, head), in fp32 registers; per chunk, in traversal order,
            dS = ws[slot];  ws[slot] = state (entering the chunk);  state = exp(l_last) * state + dS
        (exp(l_last) <= 1 for decays <= 1: no overflow). Consecutive threads take consecutive
        entries (coalesced); the SEQ_E loads of a chunk are independent, issued together."""
        w, s, t = self.w, self.spec, self.t
        Q, E = t.Q, SEQ_E
        PN = s.P * s.N
        nblk = -(-PN // (THREADS * E))
        nseq = "(S1 - T.int64(1))" if self.varlen else "B"
        with w.block(f'for bid_ in T.thread_binding({nseq} * {i64(s.H * nblk)}, '
                     'thread="blockIdx.x"):'):
            with w.block(f'for tx_ in T.thread_binding({THREADS}, thread="threadIdx.x"):'):
                self.local("st_", E, "float32")
                self.local("dv_", E, "float32")
                w(f"eb_ = bid_ % {i64(nblk)}", f"h_ = bid_ // {i64(nblk)} % {i64(s.H)}",
                  f"s_ = bid_ // {i64(nblk * s.H)}")
                self.seq_bounds()
                w(f"base_ = {self.slot_base()}")

                def entry():
                    w(f"e_ = (eb_ * {i64(E)} + {L('u_')}) * {i64(THREADS)} + {L('tx_')}",
                      f"p_ = e_ // {i64(s.N)}", f"n_ = e_ % {i64(s.N)}")
                    return f"e_ < {i64(PN)}"

                with w.block(f"for u_ in T.unroll({E}):"):
                    ok = entry()
                    if self.plan.has_initial_state:
                        with w.block(f"if {ok}:"):
                            w(f"st_[u_] = {self.load_h0(d_index)}")
                        with w.block("else:"):
                            w(f"st_[u_] = {self.zero}")
                    else:
                        w(f"st_[u_] = {self.zero}")
                # ws as one flat array: the E entries of a thread are at one base address plus
                # constant offsets (few registers, more threads per SM to keep loads in flight)
                w(f'wsf = T.decl_buffer((NS * {i64(s.H * PN)},), "{t.OT}", data=ws.data)')
                guard = PN % (THREADS * E) != 0

                def flat():
                    w(f"e_ = (eb_ * {i64(E)} + {L('u_')}) * {i64(THREADS)} + {L('tx_')}",
                      f"o_ = (slot_ * {i64(s.H)} + h_) * {i64(PN)} + e_")
                    if guard:
                        w.lines.append("    " * w.depth + f"if e_ < {i64(PN)}:")
                        w.depth += 1
                    return int(guard)

                with w.block(f"for ch_ in range((L_ + {i64(Q - 1)}) // {i64(Q)}):"):
                    w("slot_ = base_ + ch_")
                    if self.has_decay:
                        w("f_ = T.exp(cd[slot_, h_])")
                    with w.block(f"for u_ in T.unroll({E}):"):
                        opened = flat()
                        v = "wsf[o_]"
                        if t.OT != self.acc:
                            v = f'T.Cast("{self.acc}", {v})'
                        w(f"dv_[u_] = {v}")
                        w.depth -= opened
                    with w.block(f"for u_ in T.unroll({E}):"):
                        opened = flat()
                        w(f"wsf[o_] = {self.cast_ot('st_[u_]')}")
                        upd = "f_ * st_[u_]" if self.has_decay else "st_[u_]"
                        w(f"st_[u_] = {upd} + dv_[u_]")
                        w.depth -= opened
                if self.plan.return_final_state:
                    with w.block(f"for u_ in T.unroll({E}):"):
                        with w.block(f"if {entry()}:"):
                            w(f"hT[{self.state_index(d_index)}] = st_[u_]")

    def sp_items(self) -> int:
        """16-byte vectors of the state tile (BP x KC) a thread (plan.tile SP)."""
        t = self.t
        return -(-(t.BP * (t.KC // t.VL)) // THREADS)

    def state_prefetch(self, load: bool):
        """plan.tile SP (KC = NP: the whole state tile at once): with `load`, the state tile's
        16-byte vectors into the registers spv_ (issued before the query-key product, so that
        they are in flight during it); else from spv_ into sK (after that product's last
        reads of sK). Item ix_ = u_ * THREADS + tx_ is row r_ (channel pb_ * BP + r_) and
        entries c_ .. c_ + VL - 1 of the key dim; consecutive threads on consecutive
        vectors of a row. Zero where the channel or the key entry is out of range."""
        w, s, t = self.w, self.spec, self.t
        BP, KC, VL = t.BP, t.KC, t.VL
        cv = KC // VL
        total = BP * cv
        ew = 4 // t.esz
        guard = total % THREADS != 0
        with w.block(f"for u_ in T.unroll({self.sp_items()}):"):
            w(f"ix_ = u_ * {THREADS} + tx_", f"r_ = ix_ // {cv}", f"c_ = ix_ % {cv} * {VL}")
            if load:
                w(f"n_ = {L('c_')}", f"p_ = pb_ * {i64(BP)} + {L('r_')}")
                cond = ("ix_ < " + str(total) + " and " if guard else "") + \
                    f"n_ < {i64(s.N)} and p_ < {i64(s.P)}"
                with w.block(f"if {cond}:"):
                    w("pv0_ = T.address_of(ws[slot_, h_, p_, n_])",
                      'pw0_ = T.decl_buffer((4,), "uint32", data=pv0_)')
                    with w.block("for v_ in T.vectorized(4):"):
                        w("spv_[u_ * 4 + v_] = pw0_[v_]")
                with w.block("else:"):
                    with w.block("for v_ in T.vectorized(4):"):
                        w("spv_[u_ * 4 + v_] = T.uint32(0)")
            else:
                if guard:
                    w.lines.append("    " * w.depth + f"if ix_ < {total}:")
                    w.depth += 1
                with w.block("for v_ in T.vectorized(4):"):
                    w(f"wd_sK[(r_ * {KC + t.pad} + c_) // {ew} + v_] = spv_[u_ * 4 + v_]")
                if guard:
                    w.depth -= 1

    def out_pass(self, d_index: int, direction):
        w, s, t = self.w, self.spec, self.t
        Q, BP, KC, NP = t.Q, t.BP, t.KC, t.NP
        npb = -(-s.P // BP)
        nkc = NP // KC
        self.mt_total = Q // 16
        mtw = -(-self.mt_total // WARPS)
        ntg, nty = Q // 8, BP // 8
        with w.block(f'for bid_ in T.thread_binding(NS * {i64(s.H * npb)}, '
                     'thread="blockIdx.x"):'):
            with w.block(f'for tx_ in T.thread_binding({THREADS}, thread="threadIdx.x"):'):
                self.shared("sC", (Q, KC + t.pad), t.OT)
                self.shared("sK", (max(Q, BP), KC + t.pad), t.OT)
                if t.VS:
                    w(f'sVt = T.decl_buffer(({BP}, {Q + t.pad}), "{t.OT}", data=sK.data, '
                      'scope="shared")')
                else:
                    self.shared("sVt", (BP, Q + t.pad), t.OT)
                if not t.mma:
                    self.shared("sG", (Q, Q + 1), "float32")
                if self.has_decay:
                    self.shared("sld", (Q,), "float32")
                    self.shared("slc", (Q,), "float32")
                    self.local("run_", 1, "float32")
                if self.vsplit is not None:
                    self.shared("svs", (Q,), "float32")
                if t.VL > 1:
                    ew = 4 // t.esz
                    self.words("wd_sC", "sC", f"{Q * (KC + t.pad) // ew}", shared=True)
                    self.words("wd_sK", "sK", f"{max(Q, BP) * (KC + t.pad) // ew}", shared=True)
                self.local("accG", mtw * ntg * 4, "float32")
                self.local("accY", mtw * nty * 4, "float32")
                self.frag_locals(mtw)
                if t.GF:
                    for i in range(mtw):
                        for ks in range(Q // 16):
                            self.local(f"gf{i}_{ks}", 8, t.OT)
                if t.EP:
                    # y staged in fp32 over sC (free after the state product), EPC channels
                    # a round, rows padded by 4 words
                    epc = self.ep_cols(Q, BP, Q * (KC + t.pad) * t.esz)
                    w(f'sY = T.decl_buffer(({Q}, {epc + 4}), "float32", data=sC.data, '
                      'scope="shared")')
                self.coop_regs()
                if t.SP:
                    self.local("spv_", self.sp_items() * 4, "uint32")
                w(f"pb_ = bid_ % {i64(npb)}", f"h_ = bid_ // {i64(npb)} % {i64(s.H)}",
                  f"slot_ = bid_ // {i64(npb * s.H)}")
                opened = self.slot_task()
                with w.block("if cl_ > T.int64(0):"):
                    self.lanes()
                    self.log_decays(direction)
                    if not t.VS:
                        self.load_value_t(direction, BP, "pb_")

                    def load_query(with_key: bool):
                        plain = [self.plain_operand("query")] + \
                            ([self.plain_operand("key")] if with_key else [])
                        if all(plain):
                            def sources():
                                w(f"t_ = {self.time_of(direction, 'c0_ + ' + L('r_'))}")
                                return plain
                            row = f"r_ * {KC + t.pad} + c_"
                            self.coop_vec(Q, KC, lambda: w(f"n_ = kc_ * {i64(KC)} + {L('c_')}"),
                                          f"{L('r_')} < cl_ and n_ < {i64(s.N)}", sources,
                                          [("wd_sC", row)] +
                                          ([("wd_sK", row)] if with_key else []))
                            return

                        def values():
                            w(f"t_ = {self.time_of(direction, 'c0_ + ' + L('r_'))}")
                            idx = self.index("t_", n="n_")
                            with self.fast_math():
                                out = [self.value_of(self.program.recurrence.query.expr, idx)]
                                if with_key:
                                    out.append(self.value_of(self.program.recurrence.key.expr,
                                                             idx))
                            return out
                        self.coop(Q, KC, lambda: w(f"n_ = kc_ * {i64(KC)} + {L('c_')}"),
                                  f"{L('r_')} < cl_ and n_ < {i64(s.N)}", values,
                                  ["sC[r_, c_]"] + (["sK[r_, c_]"] if with_key else []))

                    # G = query @ key^T over the key dim, KC at a time
                    with w.block(f"for u_ in T.unroll({mtw * ntg * 4}):"):
                        w(f"accG[u_] = {self.zero}")
                    with w.block(f"for kc_ in range({nkc}):"):
                        load_query(True)
                        if t.SP:
                            self.state_prefetch(load=True)
                        self.sync()
                        self.mm("accG", mtw, ntg, lambda r, k: f"sC[{r}, {k}]",
                                lambda c, k: f"sK[{c}, {k}]", KC,
                                skip=lambda m0, j: f"{j} * 8 > {m0} + 15")
                        self.sync()
                    # causal mask and decay
                    depth = self.each_acc(mtw, ntg)
                    g = "accG[k_acc_]"
                    if self.has_decay:
                        g = f"{g} * {self.exp('slc[row_] - slc[col_]')}"
                    w(f"accG[k_acc_] = T.if_then_else(col_ <= row_, {g}, {self.zero})")
                    if not t.mma:
                        w("sG[row_, col_] = accG[k_acc_]")
                    w.depth -= depth
                    if t.GF:
                        # G as the A operands of y += G @ value, in the operand type (half the
                        # registers of the fp32 accumulators, which die here)
                        for i in range(mtw):
                            for ks in range(Q // 16):
                                with w.block("for h2_ in T.unroll(2):"):
                                    with w.block("for e_ in T.unroll(4):"):
                                        w(f"gf{i}_{ks}[h2_ * 4 + e_] = " + self.cast_ot(
                                            f"accG[({i} * {ntg} + {ks * 2} + h2_) * 4 + e_]"))
                    # y = exp(lc) * (query @ state_in)
                    with w.block(f"for u_ in T.unroll({mtw * nty * 4}):"):
                        w(f"accY[u_] = {self.zero}")
                    with w.block(f"for kc_ in range({nkc}):"):
                        if nkc > 1:
                            load_query(False)

                        def ws_at():
                            w(f"n_ = kc_ * {i64(KC)} + {L('c_')}",
                              f"p_ = pb_ * {i64(BP)} + {L('r_')}")
                        if t.SP:
                            self.state_prefetch(load=False)
                        elif t.VL > 1:
                            self.coop_vec(BP, KC, ws_at, f"n_ < {i64(s.N)} and p_ < {i64(s.P)}",
                                          lambda: ["ws[slot_, h_, p_, n_]"],
                                          [("wd_sK", f"r_ * {KC + t.pad} + c_")])
                        else:
                            ws_v = "ws[slot_, h_, p_, n_]"
                            if t.OT != self.acc:
                                ws_v = f'T.Cast("{self.acc}", {ws_v})'
                            self.coop(BP, KC, ws_at, f"n_ < {i64(s.N)} and p_ < {i64(s.P)}",
                                      lambda: [ws_v], ["sK[r_, c_]"])
                        self.sync()
                        self.mm("accY", mtw, nty, lambda r, k: f"sC[{r}, {k}]",
                                lambda c, k: f"sK[{c}, {k}]", KC)
                        self.sync()
                    if self.has_decay:
                        depth = self.each_acc(mtw, nty)
                        w(f"accY[k_acc_] = accY[k_acc_] * {self.exp('slc[row_]')}")
                        w.depth -= depth
                    if t.VS:
                        # the value tile into sK's space (free after the state product)
                        self.load_value_t(direction, BP, "pb_")
                        self.sync()
                    # y += G @ value
                    if t.mma and t.GF:
                        for ks in range(Q // 16):
                            with w.block(f"for j_ in T.unroll({nty}):"):
                                self.b_frag(lambda r, c: f"sVt[{r}, {c}]",
                                            lambda dk, ks=ks: f"{ks * 16 + dk}")
                                for i in range(mtw):
                                    w(f"m0_ = {self.mtile(i)}")
                                    with w.block(f"if {ks * 16} <= m0_:"):
                                        w(self.mma_call(f"gf{i}_{ks}", "accY",
                                                        f"({i} * {nty} + j_) * 4"))
                    elif t.mma:
                        with w.block(f"for ks_ in T.unroll({Q // 16}):"):
                            for i in range(mtw):
                                with w.block("for h2_ in T.unroll(2):"):
                                    with w.block("for e_ in T.unroll(4):"):
                                        w(f"af{i}[h2_ * 4 + e_] = " + self.cast_ot(
                                            f"accG[({i} * {ntg} + ks_ * 2 + h2_) * 4 + e_]"))
                            with w.block(f"for j_ in T.unroll({nty}):"):
                                self.b_frag(lambda r, c: f"sVt[{r}, {c}]",
                                            lambda dk: f"ks_ * 16 + {dk}")
                                for i in range(mtw):
                                    w(f"m0_ = {self.mtile(i)}")
                                    with w.block("if ks_ * 16 <= m0_:"):
                                        w(self.mma_call(f"af{i}", "accY",
                                                        f"({i} * {nty} + j_) * 4"))
                    else:
                        self.sync()
                        self.mm("accY", mtw, nty, lambda r, k: f"sG[{r}, {k}]",
                                lambda c, k: f"sVt[{c}, {k}]", Q)
                    # epilogue and store
                    if t.EP:
                        self.staged_epilogue(d_index, direction, mtw, nty, epc)
                    else:
                        depth = self.each_acc(mtw, nty)
                        w(f"p_ = pb_ * {i64(BP)} + {L('col_')}")
                        with w.block(f"if {self.mtile_valid('i_')} and {L('row_')} < cl_ and "
                                     f"p_ < {i64(s.P)}:"):
                            w(f"t_ = {self.time_of(direction, 'c0_ + ' + L('row_'))}")
                            with self.fast_math():
                                self.emit_y(d_index, "t_", "accY[k_acc_]")
                        w.depth -= depth
                w.depth -= opened


#: a comment line of the TVMScript text that build.cuda_host_source turns into the second
#: argument of __launch_bounds__ of the kernels listed (by their order in the function; TIR
#: has no attribute for it): "# ssmc.cuda_min_blocks_per_sm = K @ i,j"
MIN_BLOCKS_MARK = "# ssmc.cuda_min_blocks_per_sm = "


@register_lowering("chunked", target="cuda")
def render_chunked_cuda(spec: KernelSpec) -> str:
    e = _ChunkedCuda(spec)
    e.header()
    mark = len(e.w.lines)
    kernels, out_kernels = 0, []
    if e.varlen:
        e.init_slots()
        e.map_slots()
        kernels += 2
    for d_index, direction in enumerate(e.directions):
        e.chunk_pass(d_index, direction)
        e.seq_pass(d_index, direction)
        e.out_pass(d_index, direction)
        out_kernels.append(kernels + 2)
        kernels += 3
    if e.t.MB:
        # the output passes only (the others' registers stay uncapped)
        e.w.lines.insert(mark, "    " + MIN_BLOCKS_MARK + f"{e.t.MB} @ " +
                         ",".join(map(str, out_kernels)))
    return e.finish()
