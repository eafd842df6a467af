"""The scan lowering: one program per (sequence, head, p-block, order), sequential over t in
blocks of BT steps.

The n x BP block of the state lives in registers for the whole sequence. Each block's operands
are loaded and computed for BT steps at once (a [BT, n, BP] tile: every load of the block in
flight together), and the BT steps of the recurrence S_t = a_t * S_{t-1} + k_t v_t^T are one
parallel prefix scan over (a, kv) pairs in registers: a step-at-a-time loop waits on its loads'
latency every step and leaves the GPU idle at the program counts a scan has. Operands that do
not vary in t are computed once before the loop. Every decay structure is legal here, including
a decay that varies over p (Mamba-1 with p > 1).

Every order of the op (both directions of a bidirectional op, the four of cross2d) runs in the
same launch, one program per order (its flags unpacked from the REV_BITS / COL_BITS masks), the
grid's column orders indexed in place (no permuted copies). The orders' outputs are summed in
an fp32 accumulator with atomic adds and a second small kernel applies the epilogue; under
`torch.use_deterministic_algorithms(True)` the orders run one launch each instead, each adding
the earlier ones' sum, so that the output's bits do not depend on the order of the adds.
"""
from __future__ import annotations

from ....plan import Plan
from ..common import HEADER, emit_output, compute_type, input_params
from ..render import Context, Emitter, Tile, tile_mask
from ..templates import indent, rows

#: a block of BT steps: t is tiled too; k, the order axis of cross2d's per-order inputs, is
#: the program's order
BLOCK_FIXED = {"b": "b_idx", "h": "h_idx", "g": "g_idx", "k": "order"}

#: the prefix scan's operator: composing S -> a1 S + b1 with S -> a2 S + b2
AFFINE = '''
@triton.jit
def _ssmc_affine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2
'''


def _operand(ctx: Context, node, name: str, mask_axes) -> str:
    var = ctx.value(node, f"{name}_raw")
    mask = tile_mask(ctx.tile, [a for a in node.axes if a in mask_axes])
    if mask is None:
        ctx.emit(f"{name} = {var}")
    else:
        ctx.emit(f"{name} = tl.where({mask}, {var}, 0.0)")
    return name


#: a program's sequence, head, order and p-block; its rows [start, end) (packed sequences read
#: theirs from cu_ptr); the n and p offsets of its state tile (state_off: one (S, H, N, P)
#: block per order of the launch). N is a constexpr and EVEN_P says P is a multiple of BP, so
#: that the masks of a tile without padding fold away (VMamba's n = 16 backward block, sm_90a:
#: 4280 -> 4080 instructions, 184 -> 96 bytes spilled)
SETUP = '''    seq = tl.program_id(0).to(tl.int64)
    h_idx = tl.program_id(1).to(tl.int64)
    H = tl.num_programs(1)
    order = tl.program_id(2) // NPB + FIRST_ORDER
    pid_p = tl.program_id(2) % NPB
    REVERSE = ((REV_BITS >> order) & 1) != 0
    COLUMN = ((COL_BITS >> order) & 1) != 0
    g_idx = h_idx // HPG
    if IS_VARLEN:
        b_idx = seq * 0
        start = tl.load(cu_ptr + seq).to(tl.int64)
        end = tl.load(cu_ptr + seq + 1).to(tl.int64)
    else:
        b_idx = seq
        start = seq * 0
        end = start + T
    length = end - start
    offs_c = tl.arange(0, BT)
    last_row = offs_c == BT - 1
    offs_n = tl.arange(0, BN)
    mask_n = offs_n < N
    offs_p = pid_p * BP + tl.arange(0, BP)
    if EVEN_P:
        mask_p = tl.full([BP], 1, tl.int1)
    else:
        mask_p = offs_p < P
    state_off = ((((order - FIRST_ORDER) * tl.num_programs(0) + seq) * H + h_idx) * N
                 + offs_n[:, None]) * P + offs_p[None, :]
    state_mask = mask_n[:, None] & mask_p[None, :]'''

#: the kernels' parameters that SETUP reads
SETUP_PARAMS = "NPB, FIRST_ORDER, REV_BITS, COL_BITS"

BLOCK = Tile([("t", "t_row", "mask_t"), ("n", "offs_n", "mask_n"), ("p", "offs_p", "mask_p")],
             BLOCK_FIXED)
OUT_TILE = Tile([("t", "t_row", "mask_t"), ("p", "offs_p", "mask_p")], BLOCK_FIXED)


def emit_operands(prog, ct: str, pre: Emitter, body: Emitter, names,
                  tag: str = "", tile: Tile = BLOCK, suffix: str = "") -> tuple[Context, Context]:
    """The recurrence operands `names` (decay, key, value, query) on `tile`, zero outside its
    n and p masks: time-invariant ones into `pre` (before the loop), the others into `body`
    (per block). `tag` tells apart two kernels' loads in one module, `suffix` two sets of
    operands in one kernel (`{name}{suffix}`). Returns the two contexts (what each has
    loaded)."""
    rec = prog.recurrence
    outer = Context(prog, tile, pre, f"c{tag}", ct)
    inner = Context(prog, tile, body, f"s{tag}", ct)
    for name in names:
        node = getattr(rec, name)
        if node is not None:
            _operand(inner if "t" in node.axes else outer, node, name + suffix, ("n", "p"))
    return outer, inner


def emit_block_states(rec, ct: str, body: Emitter, suffix: str = "",
                      mask: str = "mask_t") -> None:
    """`states` [BT, n, BP]: the state after each row of the block, from `state` (the state
    entering it) and the operands (`decay{suffix}`...); `a{suffix}` the rows' decays. Rows
    past the sequence's end (`mask` false) are the identity step (a = 1, kv = 0), so the
    block's last row holds the state after its last valid step."""
    a, kv = f"a{suffix}", f"kv{suffix}"
    emit_row_decays(rec, ct, body, suffix, mask)
    body(f"{kv} = tl.where({mask}[:, None, None], tl.broadcast_to(key{suffix} * value{suffix}, "
         "(BT, BN, BP)), 0.0)")
    body(f"a_cum, kv_cum = tl.associative_scan(({a}, {kv}), 0, _ssmc_affine)")
    body("states = a_cum * state[None, :, :] + kv_cum")


def emit_row_decays(rec, ct: str, body: Emitter, suffix: str = "", mask: str = "mask_t") -> None:
    """`a{suffix}` [BT, n, BP]: each row's decay (`decay{suffix}`), 1 on rows past the
    sequence's end (`mask` false) and without a decay: the identity step."""
    full = "(BT, BN, BP)"
    if rec.decay is not None:
        body(f"a{suffix} = tl.where({mask}[:, None, None], tl.broadcast_to(decay{suffix}, "
             f"{full}), 1.0)")
    else:
        body(f"a{suffix} = tl.full({full}, 1.0, {ct})")


def last_state() -> str:
    return "state = tl.sum(tl.where(last_row[:, None, None], states, 0.0), axis=0)"


#: steps per block of the step-at-a-time form (`emit_steps`): each block's loads are
#: issued a block ahead, so one memory latency is paid per block, not per step (4 and 8 timed
#: the same on an H100: benchmarks/RESULTS.md)
STEPS = 8


def step_state_init(ptr: str, ct: str) -> str:
    """The step kernels' [1, n, BP] state: from `ptr` when HAS_H0, else zeros (indent 1)."""
    return f"""    if HAS_H0:
        state = tl.load({ptr} + state_off, mask=state_mask, other=0.0).to({ct})[None, :, :]
    else:
        state = tl.zeros([1, BN, BP], dtype={ct})"""


def _raw_inputs(prog) -> tuple[list[str], list[str]]:
    """(time-varying, time-invariant) names of the inputs the recurrence operands read."""
    rec = prog.recurrence
    names = sorted({s.name for op in ("decay", "key", "value", "query")
                    if getattr(rec, op) is not None
                    for s in getattr(rec, op).expr.free_symbols})
    varying = [n for n in names if "t" in prog.input(n).axes]
    return varying, [n for n in names if n not in varying]


def rows_tile(t: str, mask: str) -> Tile:
    """The block tile on rows `t` with mask `mask`."""
    return Tile([("t", t, mask), ("n", "offs_n", "mask_n"), ("p", "offs_p", "mask_p")],
                BLOCK_FIXED)


def walk_rows(emit: Emitter, first: str, j: int, tag: str, i: str, mask: str,
              t: str) -> None:
    """Step `first` + j of a block (j a constant): `i` and `mask` as `templates.rows` has
    them, and `t` the time step it reads, walked from step j - 1's without dividing: a
    column order's grid row r and column q move by one with a wrap; only j = 0 divides. The
    template divides twice per row and branches on the order: per step, in int64, that cost
    more than the step's own work. Rows past the end are masked, whatever `t` they get."""
    u, r, q = f"u_{tag}", f"r_{tag}", f"q_{tag}"
    if j == 0:
        emit(f"{u} = tl.where(REVERSE, end - 1 - ({first}), start + ({first}))")
        emit(f"{r} = {u} % GH")
        emit(f"{q} = {u} // GH")
    else:
        emit(f"{u} += step_dir")
        emit(f"{r} += step_dir")
        emit(f"{q} += tl.where({r} >= GH, 1, 0) - tl.where({r} < 0, 1, 0)")
        emit(f"{r} = tl.where({r} >= GH, 0, tl.where({r} < 0, GH - 1, {r}))")
    emit(f"{i} = {first} + {j} + offs_c")
    emit(f"{mask} = {i} < length")
    emit(f"{t} = tl.where(COLUMN, {r} * W_grid + {q}, {u}) + offs_c * 0")


def emit_prefetch(prog, ct: str, emit: Emitter, first: str, j: int, varying,
                  rows_tag: str) -> None:
    """Loads of the raw time-varying inputs of step `first` + j into `u_<name>_n<j>` (rows past
    the end read 0); its row variables tagged `rows_tag` (the loop's must not be the
    prologue's, or Triton carries them through the loop)."""
    t, mask = f"t_{rows_tag}{j}", f"mask_{rows_tag}{j}"
    walk_rows(emit, first, j, rows_tag, f"i_{rows_tag}{j}", mask, t)
    loader = Context(prog, rows_tile(t, mask), emit, f"n{j}", ct)
    for name in varying:
        loader.load(name)


def emit_steps(prog, ct: str, step_out) -> tuple[Emitter, Emitter]:
    """The step-at-a-time form: (`pre`, before the loop over blocks of STEPS steps starting at
    c0; `body`, one block). `state` is a [1, n, BP] tile. Step j's raw inputs were loaded a
    block ahead into `u_<name>_n<j>` (loop-carried), which takes the next block's step j as
    soon as this one has read it: STEPS steps of loads in flight, no second copy held.
    `step_out(body)` emits what a step does with `query`, `state`, `t_row` and `mask_t` after
    its update."""
    rec = prog.recurrence
    varying, invariant = _raw_inputs(prog)
    pre = Emitter(indent=1)
    pre("step_dir = tl.where(REVERSE, -1, 1)")
    pre("W_grid = T // GH")
    keep = Context(prog, BLOCK, pre, "c", ct)
    for name in invariant:
        keep.load(name)
    for j in range(STEPS):
        emit_prefetch(prog, ct, pre, "start * 0", j, varying, "first")
    body = Emitter(indent=2)
    for j in range(STEPS):
        walk_rows(body, "c0", j, "cur", "i_row", "mask_t", "t_row")
        step = Context(prog, BLOCK, body, f"s{j}", ct,
                       extra={**keep.loaded, **{n: f"u_{n}_n{j}" for n in varying}})
        for name in ("decay", "key", "value", "query"):
            if getattr(rec, name) is not None:
                _operand(step, getattr(rec, name), name, ("n", "p"))
        emit_prefetch(prog, ct, body, f"c0 + {STEPS}", j, varying, "next")
        update = "state + key * value" if rec.decay is None else "decay * state + key * value"
        body(f"state = tl.where(mask_t[:, None, None], {update}, state)")
        step_out(body)
    return pre, body


def fwd_params(prog) -> str:
    """The forward kernel's parameters."""
    return f"""    {input_params(prog)},
    out_ptr, s_out_b, s_out_t, s_out_h, s_out_p,
    yacc_ptr, h0_ptr, hT_ptr, cu_ptr,
    T, HPG, N: tl.constexpr, P, GH, {SETUP_PARAMS},
    BN: tl.constexpr, BP: tl.constexpr, BT: tl.constexpr, STAGES: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr, ACCUM_IN: tl.constexpr,
    WRITE_OUT: tl.constexpr, ATOMIC: tl.constexpr, EVEN_P: tl.constexpr,"""


def emit_y_store(body: Emitter, prog, ct: str) -> None:
    """Store `y` (rows t_row, mask_t): added atomically to the orders' fp32 sum where they
    share a launch, else through `emit_output`."""
    body("y_mask = mask_t[:, None] & mask_p[None, :]")
    body("if ATOMIC:")
    with body.block():
        body("tl.atomic_add(yacc_ptr + ((b_idx * T + t_row[:, None]) * H + h_idx) * P "
             "+ offs_p[None, :], y, mask=y_mask, sem=\"relaxed\")")
    body("else:")
    with body.block():
        emit_output(body, prog, OUT_TILE, ct, "t_row[:, None]", "offs_p[None, :]", "y_mask")


def render(plan: Plan) -> str:
    prog = plan.program
    ct = compute_type(plan)
    pre = Emitter(indent=1)     # before the loop: time-invariant operands
    body = Emitter(indent=2)    # per block of BT steps
    emit_operands(prog, ct, pre, body, ("decay", "key", "value", "query"))
    emit_block_states(prog.recurrence, ct, body)
    body("y = tl.sum(query * states, axis=1)")
    body(last_state())
    emit_y_store(body, prog, ct)

    # the epilogue of an atomically summed output: one program per (sequence, block of rows,
    # head)
    epi = Emitter(indent=1)
    emit_output(epi, prog, OUT_TILE, ct, "t_row[:, None]", "offs_p[None, :]", "y_mask")

    return HEADER + AFFINE + f'''
@triton.jit
def ssmc_scan_fwd(
{fwd_params(prog)}
):
{SETUP}
    if HAS_H0:
        state = tl.load(h0_ptr + state_off, mask=state_mask, other=0.0).to({ct})
    else:
        state = tl.zeros([BN, BP], dtype={ct})
{pre.text()}
    for c0 in tl.range(0, length, BT, num_stages=STAGES):
{indent(rows(), 2)}
{body.text()}
    if STORE_HT:
        tl.store(hT_ptr + state_off, state, mask=state_mask)


@triton.jit
def ssmc_scan_epilogue(
    {input_params(prog)},
    out_ptr, s_out_b, s_out_t, s_out_h, s_out_p,
    yacc_ptr, T, HPG, P,
    BT: tl.constexpr, BP: tl.constexpr,
):
    b_idx = tl.program_id(0).to(tl.int64)
    t_row = tl.program_id(1).to(tl.int64) * BT + tl.arange(0, BT)
    h_idx = tl.program_id(2).to(tl.int64)
    H = tl.num_programs(2)
    g_idx = h_idx // HPG
    order = 0
    mask_t = t_row < T
    offs_p = tl.arange(0, BP)
    mask_p = offs_p < P
    y_mask = mask_t[:, None] & mask_p[None, :]
    y = tl.zeros([BT, BP], dtype={ct})
    ACCUM_IN: tl.constexpr = True
    WRITE_OUT: tl.constexpr = True
{epi.text()}
'''
