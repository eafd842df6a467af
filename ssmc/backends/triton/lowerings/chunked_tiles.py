"""The chunked lowering's tiles: the row block's (t, n), (n, t), (t, p) and (t,) views, and the
same for another block j of the chunk (rows `KEY_ROWS`), and the loads of a block's operands,
shared by the forward's scalar- and per-key-decay bodies and the per-key backward."""
from __future__ import annotations

from ..render import Context, Emitter, Tile, tile_mask
from ..templates import rows, split_resets

FIXED = {"b": "b_idx", "h": "h_idx", "g": "g_idx"}
T_AXIS = ("t", "t_row", "mask_t")
QK_TILE = Tile([T_AXIS, ("n", "offs_n", "mask_n")], FIXED)
# key is evaluated directly in (n, t) layout, so no matmul operand comes from tl.trans
KT_TILE = Tile([("n", "offs_n", "mask_n"), T_AXIS], FIXED)
V_TILE = Tile([T_AXIS, ("p", "offs_p", "mask_p")], FIXED)
T_TILE = Tile([T_AXIS], FIXED)

KEY_AXIS = ("t", "t_key", "mask_key")
KEY_QK_TILE = Tile([KEY_AXIS, ("n", "offs_n", "mask_n")], FIXED)
KEY_KT_TILE = Tile([("n", "offs_n", "mask_n"), KEY_AXIS], FIXED)
KEY_V_TILE = Tile([KEY_AXIS, ("p", "offs_p", "mask_p")], FIXED)
KEY_T_TILE = Tile([KEY_AXIS], FIXED)

#: the rows of key block j of the chunk starting at cs0 (unindented)
KEY_ROWS = rows("cs0 + j * BT", "j_row", "mask_key", "t_key")

class BlockOperands:
    """Loads one block's operands and per-key log-decays on `tile` (masked lanes 0): `ld{s}`
    with its resets split into `rz{s}` (`templates.split_resets`) and, for a decay that may be
    negative, `ng{s}` (1 where it is)."""

    def __init__(self, prog, ct: str, emit: Emitter, tile: Tile, tag: str, suffix: str = ""):
        self.prog, self.emit, self.suffix = prog, emit, suffix
        self.ctx = Context(prog, tile, emit, tag, ct)
        self.mask = tile_mask(tile, [a for a, _, _ in tile.tiled])

    def log_decays(self) -> tuple[str, str, str | None]:
        s, prog = self.suffix, self.prog
        v = self.ctx.value(prog.log_decay, f"ld{s}_raw")
        self.emit(f"ld{s} = tl.where({self.mask}, {v}, 0.0)")
        for line in split_resets(f"ld{s}", f"rz{s}"):
            self.emit(line)
        ng = None
        if prog.decay_signed:
            v = self.ctx.value(prog.recurrence.decay, f"dsg{s}_raw")
            ng = f"ng{s}"
            self.emit(f"{ng} = tl.where({self.mask}, tl.where({v} < 0, 1, 0), 0)")
        return f"ld{s}", f"rz{s}", ng

    def operand(self, which: str, name: str, dtype: str | None = None) -> str:
        """The recurrence's `which` operand as `name`: in `dtype` if given (a bare input is
        loaded straight into it), else in the compute type."""
        node = getattr(self.prog.recurrence, which)
        if dtype is not None and self.ctx.direct_load(node, name, dtype) is not None:
            return name
        v = self.ctx.value(node, f"{name}_raw")
        cast = f".to({dtype})" if dtype else ""
        self.emit(f"{name} = tl.where({self.mask}, {v}, 0.0){cast}")
        return name

