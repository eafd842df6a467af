"""A sequential walk's per-step rows, loaded one chunk ahead.

Each chunk of a walk (the forward's state pass, the backward's reverse pass over dL/dS) reads
a few (BT,) vectors of inputs on (b, t, h) — Mamba-2's dt — for its log-decays and scales.
Triton pipelines the walk's (t, n) and (t, p) loads through async copies, but not these:
their elements are a head apart, 2 bytes each, and cp.async moves 4 bytes or more. Loaded
where they are used, every chunk waited a memory latency before its decay sums could start
(Triton 3.6's TTGIR, sm_90a). So the walk loads the next chunk's rows at the top of each
chunk's step, and the step's contexts read the ones loaded a step before (`extra`).
"""
from __future__ import annotations

from ....ir import Program
from ..render import Tile, input_pointer_and_mask
from ..templates import rows
from .chunked_tiles import FIXED

#: the prefetched chunk's rows (`rows` with the pf_ names)
AHEAD_TILE = Tile([("t", "pf_t", "pf_mask")], FIXED)


class RowsAhead:
    """The row inputs of one walk: `extra` maps each to the variable its contexts read; after
    the body is rendered, `before` and `step` load those it `used`."""

    def __init__(self, program: Program, compute: str):
        self.program, self.compute = program, compute
        self.names = [i.name for i in program.inputs
                      if "t" in i.axes and not {"n", "p"} & set(i.axes)]

    @property
    def extra(self) -> dict[str, str]:
        """Context `extra`: input name -> its row of the current chunk."""
        return {name: f"u_{name}_row" for name in self.names}

    def used(self, body: str) -> list[str]:
        return [name for name in self.names if f"u_{name}_row" in body]

    def _loads(self, names: list[str], idx: str, level: int) -> str:
        """Rows of chunk `idx` of the segment [first, last) (zeros outside it) into pf_*."""
        pad = "    " * level
        out = [pad + line for line in
               rows(f"({idx}) * BT", "pf_i", "pf_mask", "pf_t").splitlines()]
        out.append(f"{pad}pf_ok = pf_mask & (offs_c * 0 + ({idx}) >= first) & "
                   f"(offs_c * 0 + ({idx}) < last)")
        for name in names:
            ptr, _ = input_pointer_and_mask(self.program.input(name), AHEAD_TILE)
            out.append(f"{pad}pf_u_{name} = tl.load({ptr}, mask=pf_ok, other=0.0)")
        return "\n".join(out)

    def before(self, names: list[str], idx: str) -> str:
        """Before the loop (indent 1): the rows of the walk's first chunk `idx`."""
        return self._loads(names, idx, 1)

    def step(self, names: list[str], idx: str) -> str:
        """At the top of a chunk's step (indent 2): this chunk's rows from the loads a step
        before, then the next chunk's (`idx`) loads."""
        now = [f"        u_{name}_row = pf_u_{name}.to({self.compute})" for name in names]
        return "\n".join(now) + "\n" + self._loads(names, idx, 2)
