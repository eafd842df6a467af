"""The chunked forward's tiles: the row block's (t, n), (n, t), (t, p) and (t,) views, and the
same for a key block j of the chunk (rows `KEY_ROWS`), shared by its scalar- and per-key-decay
kernel bodies."""
from __future__ import annotations

from ..render import Tile
from ..templates import rows

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
