"""The orders' passes side by side (streams.py, chunked_launch.orders_side_by_side): on the CPU
the same launch order on one stream; on a GPU each order's passes on a stream of its own, which
must wait for the work queued before the call and finish before the output passes read them."""
from __future__ import annotations

import pytest
import torch

import ssmc
from ssmc.backends.triton import streams
from ssmc.backends.triton.lowerings import chunked_launch
from ssmc.plan import Plan
from tests.backends.triton.test_chunked import HOPPER
from tests.backends.triton.test_cross2d_chunked import definition, inputs_for
from tests.backends.triton.test_scan import builtin

pytestmark = pytest.mark.usefixtures("kernel_cache_per_module")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_which_orders_run_side_by_side():
    def plan(defn):
        return Plan(program=defn.program, lowering="chunked", dtype="bfloat16")
    assert chunked_launch.orders_side_by_side(plan(definition("scalar", True))) == 4
    assert chunked_launch.orders_side_by_side(plan(builtin("ssd", "bidirectional"))) == 2
    assert chunked_launch.orders_side_by_side(plan(builtin("ssd"))) == 1
    # per-key decays: one running-sums buffer, refilled order by order
    assert chunked_launch.orders_side_by_side(plan(definition("diagonal", True))) == 1


def test_side_by_side_walks_count_together_for_the_state_pass_tiles():
    """The Mamba-2-style cross2d shape on an H100: one order's 256 walks would split p to fill
    the GPU (BP_state 32); the four orders' 1024 together keep whole 64-channel blocks."""
    p = Plan(program=definition("scalar", True).program, lowering="chunked", dtype="bfloat16")
    sizes = dict(b=32, t=4096, h=8, g=1, n=64, p=64)
    assert chunked_launch.tiles(p, sizes, 32 * 8, HOPPER)["BP_state"] == 32
    assert chunked_launch.tiles(p, sizes, 32 * 8 * 4, HOPPER)["BP_state"] == 64


def test_one_stream_turns_the_side_streams_off_within_it():
    with streams.one_stream():
        assert not streams.SideStreams(torch.device("cuda", 0), 2).side
        with streams.one_stream():
            pass
        assert streams._ONE[0]
    assert not streams._ONE[0]


def test_off_the_gpu_everything_runs_on_the_current_stream():
    s = streams.SideStreams(torch.device("cpu"), 4)
    assert not s.side
    with s.on(2):
        pass
    s.join()


@pytest.mark.gpu
@pytest.mark.parametrize("user_stream", [False, True])
@pytest.mark.parametrize("which", ["cross2d", "ssd"])
def test_side_streams_wait_for_the_inputs_and_finish_before_their_readers(which, user_stream):
    """Inputs made by a long kernel queued just before the call (on the default stream, or on
    a stream of the caller's): the orders' walks must start after it, forward and backward
    (where the backward's forward and reverse walks run side by side: cross2d's four orders,
    and one direction). Ten forward + backward calls each match the same op on one stream bit
    for bit."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from tests.backends.triton.test_scan import inputs_for as line_inputs
    if which == "cross2d":
        defn, kw = definition("scalar", True, epilogue=True), dict(grid=(64, 64))
        base = inputs_for(defn, kw["grid"], seed=3, b=8)
    else:
        defn, kw = builtin("ssd"), {}
        base = line_inputs(defn, dict(b=2, t=4096, h=8, g=1, n=64, p=64), seed=3)
    base = {k: v.cuda() for k, v in base.items()}
    op = ssmc.compile(defn, backend="triton", lowering="chunked")
    with torch.no_grad():
        cot = torch.randn_like(op(**base, **kw))

    def step(inputs):
        leaves = {k: v.detach().requires_grad_(True) for k, v in inputs.items()}
        y = op(**leaves, **kw)
        y.backward(cot)
        return [y.detach()] + [leaves[k].grad for k in sorted(leaves)]

    with streams.one_stream():
        want = step(base)
    stream = torch.cuda.Stream() if user_stream else torch.cuda.current_stream()
    big = torch.randn(4096, 4096, device="cuda")
    with torch.cuda.stream(stream):
        for _ in range(10):
            slow = big
            for _ in range(8):      # several ms of work queued ahead of the inputs
                slow = slow @ big / 64.0
            x = base["x"] + slow[0, :1].sum() * 0.0    # x written after the matmuls
            got = step(dict(base, x=x))
            for a, b in zip(got, want):
                assert torch.equal(a, b)
    torch.cuda.synchronize()


def test_pairs_one_order_at_a_time(monkeypatch):
    """With the orders' passes one at a time, a pair's two orders still keep their own
    buffers (the output pass reads both)."""
    defn = definition("scalar", True, epilogue=True)
    grid = (8, 16)
    inputs = {k: v.to(DEVICE) for k, v in inputs_for(defn, grid, seed=9).items()}
    op = ssmc.compile(defn, backend="triton", lowering="chunked")
    want = op(**inputs, grid=grid)
    monkeypatch.setattr(chunked_launch, "orders_side_by_side", lambda plan: 1)
    got = op(**inputs, grid=grid)
    assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())


def _ssd_training_step(seed: int) -> None:
    """One forward + backward of a small ssd on the chunked lowering (its backward's walks
    run on side streams)."""
    from tests.backends.triton.test_scan import inputs_for as line_inputs
    defn = builtin("ssd")
    inputs = {k: v.requires_grad_(True) for k, v in
              line_inputs(defn, dict(b=1, t=20, h=2, g=1, n=4, p=3), seed=seed).items()}
    op = ssmc.compile(defn, backend="triton", lowering="chunked")
    op(**inputs).sum().backward()


def test_forward_walks_are_joined_before_the_backward_goes_on(monkeypatch):
    """The chunked backward's forward walks are joined before `forward_pass` returns. Left
    running past it (beside dy and the reverse walks) they gained about 1% of a training
    step, and the tensors only they used were freed under them: NaN gradients on an H100."""
    from ssmc.backends.triton import backward as triton_backward
    from ssmc.backends.triton.lowerings import chunked_bwd_launch
    made, joined = [], []

    class Recording(streams.SideStreams):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

        def join(self):
            joined.append(self)
            super().join()

    real_dy = triton_backward.chain_rows.epilogue_dy

    def checking_dy(*args, **kwargs):
        assert made and all(s in joined for s in made)
        return real_dy(*args, **kwargs)

    monkeypatch.setattr(chunked_bwd_launch, "SideStreams", Recording)
    monkeypatch.setattr(triton_backward.chain_rows, "epilogue_dy", checking_dy)
    _ssd_training_step(seed=4)
    assert len(made) == 2 and len(joined) == 2    # the forward walks, the reverse walks


def test_what_the_forward_walks_use_lives_until_they_are_joined(monkeypatch):
    """Every tensor the chunked backward's forward walks were launched with is alive when they
    are joined: freed before, its memory goes to the next tensor made on the current stream
    (dy) while a walk still writes it (an H100 gave NaN gradients so)."""
    import weakref

    from ssmc.backends.triton.lowerings import chunked_bwd_launch
    used, dead_at_join, checked = [], [], []
    real = chunked_bwd_launch.state_pass

    def recording_state_pass(module, args, *rest, **kwargs):
        seen = [a for a in (*args, *rest) if isinstance(a, torch.Tensor)]
        seen += [t for a in rest if hasattr(a, "buffers") for t in a.buffers]
        used.extend(weakref.ref(t) for t in seen)
        return real(module, args, *rest, **kwargs)

    class Recording(streams.SideStreams):
        def join(self):    # the tensors of the walks since the last join
            dead_at_join.extend(r for r in used if r() is None)
            checked.extend(used)
            used.clear()
            super().join()

    monkeypatch.setattr(chunked_bwd_launch, "state_pass", recording_state_pass)
    monkeypatch.setattr(chunked_bwd_launch, "SideStreams", Recording)
    _ssd_training_step(seed=5)
    assert checked and not dead_at_join
