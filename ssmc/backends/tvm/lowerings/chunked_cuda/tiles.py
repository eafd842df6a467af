"""Tile planning: the typed `plan.tile` pins of the lowering (`ChunkedCudaTile`), the tiling
resolved from them for given sizes (`tiles`), and the shared-memory budget that decides it."""
from __future__ import annotations

from dataclasses import dataclass, fields

from .....errors import ConfigError
from .....plan import Plan
from .....tiles import Tile
from .value_split import value_split

THREADS = 128
WARPS = THREADS // 32
SMEM = 48 * 1024
MMA_DTYPES = {"bfloat16": "bf16", "float16": "fp16"}
BATCH = 16  # tile elements a thread loads before storing them to shared memory
VBATCH = 4  # ... 16-byte vectors, in the vectorised copies
SEQ_E = 8   # state entries per thread in the sequential pass (scalar form, SV=0)
SEQ_V = 4   # 16-byte vectors of state entries per thread in the sequential pass

#: field -> (what a valid value is, its test); the other fields are 0/1 flags (_FLAG)
_DOMAINS = {
    "BP": ("a positive multiple of 8", lambda v: v > 0 and v % 8 == 0),
    "BPS": ("a positive multiple of 8", lambda v: v > 0 and v % 8 == 0),
    "KC": ("a positive multiple of 16", lambda v: v > 0 and v % 16 == 0),
    "NB": ("a positive multiple of 16", lambda v: v > 0 and v % 16 == 0),
    "MB": ("an integer in [0, 16]", lambda v: 0 <= v <= 16),
    "LB": (f"an integer in [1, {BATCH}]", lambda v: 1 <= v <= BATCH),
    "SV": ("an integer in [0, 8]", lambda v: 0 <= v <= 8),
}
_FLAG = ("0 or 1", lambda v: v in (0, 1))


@dataclass(frozen=True)
class ChunkedCudaTile(Tile):
    """What `plan.tile` may pin for this lowering (a tuned configuration), typed and checked.

    Block sizes (None: the largest that fits in shared memory; a pin must also divide the key
    dim padded to 16 for KC and NB, which `tiles` checks at the call's sizes):
        BP   value channels per output-pass block (multiple of 8)
        KC   key-dim slice per pass over shared memory in the output pass (multiple of 16)
        BPS  value channels per chunk-pass block (multiple of 8)
        NB   key-dim rows per chunk-pass block (multiple of 16)
    Variants (0/1 unless said; each applies only where its condition holds, else it is off):
        VL   16-byte copies of operands already in the operand type (the chunk states, plain
             query and key inputs), where the key dim splits into whole vectors (default 1)
        GF   output pass: G packed into operand-type fragments before the state product
             (registers; tensor cores only)
        EP   output pass: epilogue staged through shared memory, coalesced loads/stores over p
        VS   output pass: the value tile over sK, loaded after the state product (less shared
             memory; where it fits over the key tile)
        MB   __launch_bounds__ minimum blocks per SM of the output passes, 0..16 (caps their
             registers; 0: no cap)
        LB   tile elements a thread loads before storing them, 1..16 (16-byte copies: LB / 4)
        SV   sequential pass: 16-byte vectors of the chunk states a thread, 0..8 (0: SEQ_E
             scalar entries at a time, the older form; default SEQ_V)
        KV   chunk pass: the key tile copied in 16-byte vectors, two steps at a time,
             transposed in registers into 32-bit words (a plain key input in the operand type
             whose rows split into vectors; default 1; 0 pins the element copy)
        SP   output pass: the state tile's 16-byte loads issued into registers before the
             query-key product (stored to shared memory after it), so that they are in flight
             during it; where the state product takes the whole key dim at once
        FM   16-bit plans: approximate exp and division (`__expf`, `__fdividef`) wherever a
             value is rounded to the operand type or the output right after (the operand
             tiles' and the epilogue's expressions, the output pass's decay factors); the
             per-step log-decays, their sums and the chunk and sequential passes' decay factors
             stay exact (default 1; 0 pins exact math; fp32 plans are always exact)
        VT   both parallel passes, tensor cores only: the transposed value tile written a pair
             of steps at a time (one 32-bit word), a warp's 32 items 8 channels x 4 step
             pairs, so that its stores fall in 32 distinct banks (a row at a time, consecutive
             channels' 2-byte stores were 4-way conflicts); default 1 (bf16 bench shape on an
             H200: 2.92 vs 3.88 ms); 0 pins a row at a time
    """

    BP: int | None = None
    KC: int | None = None
    BPS: int | None = None
    NB: int | None = None
    VL: int = 1
    GF: int = 0
    EP: int = 0
    VS: int = 0
    MB: int = 0
    LB: int = BATCH
    SV: int = SEQ_V
    KV: int = 1
    SP: int = 0
    FM: int = 1
    VT: int = 1

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None and f.default is None:
                continue
            expected, ok = _DOMAINS.get(f.name, _FLAG)
            if not isinstance(v, int) or isinstance(v, bool) or not ok(v):
                raise ConfigError(f"CUDA chunked lowering: plan.tile {f.name}={v!r} is not "
                                  f"valid (expected {expected})")

    @classmethod
    def from_plan(cls, plan: Plan) -> ChunkedCudaTile:
        """The plan's pins: its tile, or all defaults where it has none (a tile of another
        lowering's type is a ConfigError)."""
        if plan.tile is None:
            return cls()
        if not isinstance(plan.tile, cls):
            raise ConfigError(f"CUDA chunked lowering: the plan's tile is a "
                              f"{type(plan.tile).__name__}, not a {cls.__name__}")
        return plan.tile

    def pairs(self) -> tuple[tuple[str, int], ...]:
        """The pins that differ from the defaults, sorted."""
        return tuple(sorted((f.name, getattr(self, f.name)) for f in fields(self)
                            if getattr(self, f.name) != f.default))

    def as_dict(self) -> dict[str, int]:
        """The pins that differ from the defaults (`Plan.tile_dict`)."""
        return dict(self.pairs())


@dataclass(frozen=True)
class Tiles:
    """The tiling of one specialisation (`tiles`): sizes, and the variants of ChunkedCudaTile
    as they apply here (0 where their condition does not hold)."""

    Q: int      # chunk size
    NP: int     # key dim padded to 16
    mma: bool   # tensor cores (bf16/fp16) or fp32 FMAs
    OT: str     # operand dtype of the products (and of the chunk states in ws)
    BP: int     # value channels per output-pass block
    KC: int     # key-dim slice per pass over shared memory in the output pass
    BPS: int    # value channels per chunk-pass block
    NB: int     # key-dim rows per chunk-pass block
    VL: int = 1  # elements per vectorised (16-byte) copy of plain operands to shared memory
    GF: int = 0
    EP: int = 0
    VS: int = 0
    MB: int = 0
    LB: int = BATCH
    SV: int = SEQ_V
    KV: int = 1
    SP: int = 0
    FM: int = 0
    VT: int = 1

    @property
    def pad(self) -> int:
        return 8 if self.mma else 1

    @property
    def esz(self) -> int:
        return 2 if self.mma else 4


def operand_dtype(plan: Plan) -> str:
    return plan.dtype if plan.dtype in MMA_DTYPES else "float32"


def chunk_size_problem(Q: int) -> str | None:
    if Q % 16 or not 16 <= Q <= 128:
        return f"chunk size {Q} is not a multiple of 16 in [16, 128]"
    return None


def _up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def out_smem(Q, KC, BP, mma, pad, esz, vs=False, scale=False) -> int:
    """Shared memory of the output pass (bytes)."""
    vt = 0 if vs and BP * (Q + pad) <= max(Q, BP) * (KC + pad) else BP * (Q + pad)
    b = (Q * (KC + pad) + max(Q, BP) * (KC + pad) + vt) * esz + (2 + scale) * Q * 4
    if not mma:
        b += Q * (Q + 1) * 4  # G goes through shared memory on the fp32 path
    return b


def stage_cols(NB: int, esz: int) -> int:
    """Row length of the chunk pass's staged dS tile (BPS rows of NB key entries): padded by
    one 16-byte vector, so that rows stay 16-byte aligned and the accumulators' scattered
    stores are free of bank conflicts."""
    return NB + 16 // esz


def state_smem(Q, NB, BPS, pad, esz, scale=False) -> int:
    """Shared memory of the chunk pass (bytes)."""
    # the key tile, or the staged dS tile over it (after the product), the value tile, and
    # the log-decays, their running sums and the decay factors of the chunk's rows (and the
    # value's row scales, where it splits: value_split)
    return (max(NB * (Q + pad), BPS * stage_cols(NB, esz)) + BPS * (Q + pad)) * esz + \
        (3 + scale) * Q * 4


def tiles(plan: Plan, N: int, P: int) -> Tiles | str:
    """The tiling for this plan and sizes, or why there is none. Raises ConfigError for pins
    that are not valid at any size (ChunkedCudaTile)."""
    Q = plan.chunk_size
    why = chunk_size_problem(Q)
    if why:
        return why
    pin = ChunkedCudaTile.from_plan(plan)
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
    for key, options in (("BP", bps), ("KC", kcs), ("BPS", bpss), ("NB", nbs)):
        v = getattr(pin, key)
        if v is None:
            continue
        if key in ("KC", "NB") and NP % v:
            return f"plan.tile {key}={v} does not divide the key dim padded to 16 ({NP})"
        options[:] = [v]
    sc = value_split(plan.program) is not None
    out = next(((bp, kc) for bp in bps for kc in kcs
                if out_smem(Q, kc, bp, mma, pad, esz, bool(pin.VS), sc) <= SMEM), None)
    state = next(((bp, nb) for bp in bpss for nb in nbs
                  if state_smem(Q, nb, bp, pad, esz, sc) <= SMEM), None)
    if out is None or state is None:
        return f"no tiling of chunk {Q}, n={N}, p={P} fits in {SMEM // 1024} KB of shared memory"
    # 16-byte copies of operands already in the operand type (the chunk states, plain query
    # and key inputs) where the key dim splits into whole vectors; plan.tile VL=0 turns them off
    vl = 16 // esz
    if not mma or not pin.VL or N % vl:
        vl = 1
    return Tiles(
        Q=Q, NP=NP, mma=mma, OT=OT, BP=out[0], KC=out[1], BPS=state[0], NB=state[1], VL=vl,
        GF=pin.GF & int(mma), EP=pin.EP,
        # the value tile fits over the key tile
        VS=pin.VS & int(out[0] * (Q + pad) <= max(Q, out[0]) * (out[1] + pad)),
        MB=pin.MB, LB=pin.LB, SV=pin.SV, KV=int(bool(pin.KV) and vl > 1),
        SP=int(bool(pin.SP) and vl > 1 and out[1] == NP), FM=int(bool(pin.FM) and mma),
        VT=int(bool(pin.VT) and mma))
