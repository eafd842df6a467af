"""Side streams: independent launches of one op run side by side on a GPU.

The orders of a bidirectional or cross2d op walk their sequences independently. Launched one
after another, each sequential pass has the programs of one order (cross2d at b=32, h=8: 256
walks, under two per SM of an H100, so the pass splits p and re-reads its keys to fill the GPU);
on streams of their own the GPU runs all orders' walks at once, as one launch over stacked
orders does. The chunked backward's forward walks (recomputing the chunk states) and its reverse
walks (their gradients) run side by side likewise, each set joined before its function returns.
Off the GPU everything runs on the current stream, in the same order.
"""
from __future__ import annotations

import contextlib

import torch

#: (device index, slot) -> its side stream, made once
_STREAMS: dict[tuple[int, int], torch.cuda.Stream] = {}
#: set by `one_stream()`: every piece on the current stream
_ONE = [False]


@contextlib.contextmanager
def one_stream():
    """Within it, every SideStreams runs its pieces on the current stream, in order: the
    reference the side streams are checked and timed against."""
    before, _ONE[0] = _ONE[0], True
    try:
        yield
    finally:
        _ONE[0] = before


def _side(device: torch.device, slot: int) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, slot)
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(device=index)
    return _STREAMS[key]


class SideStreams:
    """`count` independent pieces of work: `on(i)` runs piece i on its own stream (after
    everything already queued on the current one), `join()` makes the current stream wait
    for all of them. Tensors the pieces use must be made before (on the current stream) and
    stay referenced until `join()`: the caching allocator hands a freed block to the current
    stream's next tensor at once, whatever a side stream still does with it."""

    def __init__(self, device: torch.device, count: int):
        self.side = device.type == "cuda" and count > 0 and not _ONE[0]
        self.streams: list[torch.cuda.Stream] = []
        if self.side:
            self.main = torch.cuda.current_stream(device)
            self.streams = [_side(device, i) for i in range(count)]
            for s in self.streams:
                s.wait_stream(self.main)

    def on(self, i: int):
        return torch.cuda.stream(self.streams[i]) if self.side else contextlib.nullcontext()

    def join(self) -> None:
        for s in self.streams:
            self.main.wait_stream(s)
