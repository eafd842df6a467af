"""The sequential reference implements DESIGN.md's recurrence: checked against loops written
here from the formula, and for its semantics of directions, states and packed sequences."""
import pytest
import torch

from ssmc import reference
from ssmc.validate import bind
from tests.helpers import (DECAY_AXES, DIRECTIONS, compare, cu_seqlens, make_definition,
                           random_inputs, random_state)

TOL = 1e-12  # float64 against float64 computed in another order


def run(definition, tensors, **extra):
    bound = bind(definition.program, (), {**tensors, **extra})
    return reference.scan(definition.program, bound.tensors, bound.sizes, bound.initial_state,
                          bound.cu_seqlens, bound.return_final_state)


def close(name, actual, expected, tol=TOL):
    r = compare(name, actual, expected, tol)
    assert r.ok, str(r)


def naive(x, decay, h0=None, reverse=False):
    """DESIGN.md's recurrence over the inputs of `make_definition` (q, k: b t g n; v: b t h p;
    a over DECAY_AXES[decay]), written as a plain loop: per head hh, group hh // (h // g),
    state = decay * state + k (x) v;  y = q . state. Returns y (b, t, h, p) and the state."""
    q, k, v = x["q"], x["k"], x["v"]
    b, t, h, p = v.shape
    g, n = q.shape[2], q.shape[3]
    a = x.get("a")
    y = torch.zeros(b, t, h, p, dtype=torch.float64)
    state = torch.zeros(b, h, n, p, dtype=torch.float64) if h0 is None else h0.clone()
    steps = range(t - 1, -1, -1) if reverse else range(t)
    for i in steps:
        for hh in range(h):
            gg = hh // (h // g)
            if decay == "none":
                dec = torch.ones(b, 1, 1, dtype=torch.float64)
            elif decay == "time_invariant":   # a: (h, n)
                dec = torch.sigmoid(a[hh] + 2)[None, :, None].expand(b, n, 1)
            elif decay == "scalar":           # a: (b, t, h)
                dec = torch.sigmoid(a[:, i, hh] + 2)[:, None, None]
            elif decay == "diagonal":         # a: (b, t, h, n)
                dec = torch.sigmoid(a[:, i, hh] + 2)[:, :, None]
            else:                             # a: (b, t, h, n, p)
                dec = torch.sigmoid(a[:, i, hh] + 2)
            state[:, hh] = dec * state[:, hh] + k[:, i, gg, :, None] * v[:, i, hh, None, :]
            y[:, i, hh] = (q[:, i, gg, :, None] * state[:, hh]).sum(1)
    return y, state


SHAPE = dict(b=2, t=13, h=6, g=3, n=4, p=3)


@pytest.mark.parametrize("decay", list(DECAY_AXES))
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_scan_matches_naive_loop(decay, direction):
    torch.manual_seed(0)
    d = make_definition(decay, direction)
    x = random_inputs(d, SHAPE, dtype=torch.float64, seed=1)
    h0 = random_state(2, 6, 4, 3, dtype=torch.float64, seed=2)
    y, hT = run(d, x, initial_state=h0, return_final_state=True)
    y_ref, h_ref = naive(x, decay, h0, reverse=direction == "reverse")
    close("y", y, y_ref)
    close("final_state", hT, h_ref)


@pytest.mark.parametrize("decay", list(DECAY_AXES))
def test_scan_bidirectional_is_forward_plus_reverse(decay):
    torch.manual_seed(0)
    d = make_definition(decay, "bidirectional")
    x = random_inputs(d, SHAPE, dtype=torch.float64, seed=3)
    h0 = random_state(2, 6, 4, 3, directions=2, dtype=torch.float64, seed=4)
    y, hT = run(d, x, initial_state=h0, return_final_state=True)
    assert hT.shape == (2, 2, 6, 4, 3)
    yf, hf = naive(x, decay, h0[0])
    yr, hr = naive(x, decay, h0[1], reverse=True)
    close("y", y, yf + yr)
    close("final_state forward", hT[0], hf)
    close("final_state reverse", hT[1], hr)


@pytest.mark.parametrize("decay", list(DECAY_AXES))
def test_scan_reverse_is_forward_on_flipped_time(decay):
    torch.manual_seed(0)
    fwd, rev = make_definition(decay, "forward", epilogue=True), make_definition(
        decay, "reverse", epilogue=True)
    x = random_inputs(fwd, SHAPE, dtype=torch.float64, seed=5)
    axes = {i.name: i.axes for i in fwd.program.inputs}
    flipped = {k: v.flip(axes[k].index("t")) if "t" in axes[k] else v for k, v in x.items()}
    y_rev, h_rev = run(rev, x, return_final_state=True)
    y_fwd, h_fwd = run(fwd, flipped, return_final_state=True)
    close("y", y_rev, y_fwd.flip(1))
    close("final_state", h_rev, h_fwd)


@pytest.mark.parametrize("decay", list(DECAY_AXES))
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_scan_state_carries_across_a_split(decay, direction):
    """Running [0, s) then [s, t) from its final state equals one run (reverse: [s, t) first)."""
    torch.manual_seed(0)
    d = make_definition(decay, direction, epilogue=True)
    x = random_inputs(d, SHAPE, dtype=torch.float64, seed=6)
    axes = {i.name: i.axes for i in d.program.inputs}
    s = 5

    def part(lo, hi):
        return {k: v.narrow(axes[k].index("t"), lo, hi - lo) if "t" in axes[k] else v
                for k, v in x.items()}

    y, hT = run(d, x, return_final_state=True)
    first, second = (part(0, s), part(s, 13)) if direction == "forward" else (part(s, 13),
                                                                               part(0, s))
    y1, h1 = run(d, first, return_final_state=True)
    y2, h2 = run(d, second, initial_state=h1, return_final_state=True)
    y_split = torch.cat([y1, y2] if direction == "forward" else [y2, y1], 1)
    close("y", y_split, y)
    close("final_state", h2, hT)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("decay", list(DECAY_AXES))
def test_scan_packed_equals_separate_sequences(decay, direction):
    """cu_seqlens: the packed run equals each sequence run alone, concatenated; states reset
    at every boundary, a zero-length sequence passes its initial state through."""
    torch.manual_seed(0)
    d = make_definition(decay, direction, epilogue=True)
    lengths = [4, 0, 1, 8]
    shape = dict(b=1, t=sum(lengths), h=4, g=2, n=3, p=2)
    x = random_inputs(d, shape, dtype=torch.float64, seed=7)
    dirs = 2 if direction == "bidirectional" else 1
    h0 = random_state(len(lengths), 4, 3, 2, directions=dirs, dtype=torch.float64, seed=8)
    cu = cu_seqlens(lengths)
    axes = {i.name: i.axes for i in d.program.inputs}
    for with_state in (False, True):
        extra = dict(initial_state=h0) if with_state else {}
        y, hT = run(d, x, cu_seqlens=cu, return_final_state=True, **extra)
        ys, finals = [], []
        for i, (lo, hi) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
            xi = {k: v.narrow(axes[k].index("t"), lo, hi - lo) if "t" in axes[k] else v
                  for k, v in x.items()}
            hi0 = None
            if with_state:
                hi0 = h0[:, i:i + 1] if dirs == 2 else h0[i:i + 1]
            if hi == lo:  # nothing to run: the state passes through
                ys.append(torch.zeros(1, 0, 4, 2, dtype=torch.float64))
                zero = torch.zeros((dirs, 1, 4, 3, 2) if dirs == 2 else (1, 4, 3, 2),
                                   dtype=torch.float64)
                finals.append(hi0 if with_state else zero)
                continue
            yi, fi = run(d, xi, return_final_state=True,
                         **(dict(initial_state=hi0) if with_state else {}))
            ys.append(yi)
            finals.append(fi)
        close("y", y, torch.cat(ys, 1))
        close("final_state", hT, torch.cat(finals, 1 if dirs == 2 else 0))


def test_scan_packed_differs_from_unpacked():
    """The reset at boundaries is real: the packed result is not the unpacked one."""
    torch.manual_seed(0)
    d = make_definition("scalar")
    x = random_inputs(d, dict(b=1, t=10, h=2, g=1, n=3, p=2), dtype=torch.float64, seed=9)
    y_packed, _ = run(d, x, cu_seqlens=cu_seqlens([4, 6]))
    y_whole, _ = run(d, x)
    close("first sequence", y_packed[:, :4], y_whole[:, :4])
    assert not compare("second sequence", y_packed[:, 4:], y_whole[:, 4:], 1e-3).ok


def test_scan_linear_attention_closed_form():
    """Without decay, y_t = sum_{s <= t} (q_t . k_s) v_s (causal masked attention)."""
    torch.manual_seed(0)
    d = make_definition("none")
    x = random_inputs(d, dict(b=2, t=11, h=2, g=2, n=3, p=4), dtype=torch.float64, seed=10)
    y, _ = run(d, x)
    scores = torch.einsum("btgn,bsgn->bgts", x["q"], x["k"]).tril()
    close("y", y, torch.einsum("bhts,bshp->bthp", scores, x["v"]))


def test_scan_output_dtype_and_no_state_by_default():
    torch.manual_seed(0)
    d = make_definition("scalar", epilogue=True)
    x = random_inputs(d, dict(b=1, t=3, h=2, g=1, n=2, p=2), dtype=torch.float32, seed=11)
    y, hT = run(d, x)
    assert y.dtype == torch.float64 and y.shape == (1, 3, 2, 2) and hT is None
