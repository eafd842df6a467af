"""ssmc.compat.mamba_ssm against naive float64 implementations of mamba_ssm's documented
semantics (written here from its docstrings and reference functions: ssd_combined.py,
selective_state_update.py's selective_state_update_ref, selective_scan_interface.py's
selective_scan_ref), outputs and gradients, on the reference backend."""
import pytest
import torch
import torch.nn.functional as F

import ssmc
from ssmc.compat.mamba_ssm import (_tied, mamba_chunk_scan_combined, selective_scan_fn,
                                   selective_state_update)

REF = dict(backend="reference")
F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=_gen(seed), dtype=F64) * scale


# ------------------------------------------------------------------- mamba_chunk_scan_combined

def naive_chunk_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None,
                     seq_idx=None, dt_softplus=False, dt_limit=(0.0, float("inf"))):
    """Returns (out, final_states (b, h, p, n), states at each sequence's end [(h, p, n)])."""
    b, L, h, p = x.shape
    g = B.shape[2]
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    B = B.repeat_interleave(h // g, dim=2)
    C = C.repeat_interleave(h // g, dim=2)
    state = x.new_zeros(b, h, p, B.shape[-1]) if initial_states is None else initial_states
    ys, ends = [], []
    for t in range(L):
        if seq_idx is not None and t > 0 and seq_idx[0, t] != seq_idx[0, t - 1]:
            ends.append(state[0])
            state = torch.zeros_like(state)
        dA = torch.exp(dt[:, t] * A)[..., None, None]
        state = state * dA + torch.einsum("bh,bhp,bhn->bhpn", dt[:, t], x[:, t], B[:, t])
        y = torch.einsum("bhpn,bhn->bhp", state, C[:, t])
        if D is not None:
            y = y + (D if D.dim() == 2 else D[:, None]) * x[:, t]
        ys.append(y)
    ends.append(state[0])
    out = torch.stack(ys, 1)
    if z is not None:
        out = out * F.silu(z)
    return out, state, ends


def ssd_inputs(b=2, L=9, h=4, g=2, n=3, p=5, seed=0):
    return dict(x=randn(b, L, h, p, seed=seed), dt=randn(b, L, h, seed=seed + 1, scale=0.5),
                A=-torch.linspace(0.5, 2.0, h, dtype=F64), B=randn(b, L, g, n, seed=seed + 2),
                C=randn(b, L, g, n, seed=seed + 3), D=randn(h, seed=seed + 4),
                z=randn(b, L, h, p, seed=seed + 5), dt_bias=randn(h, seed=seed + 6, scale=0.3))


def _leaves(d):
    return {k: v.clone().requires_grad_(True) for k, v in d.items()}


def _check_grads(ours, ref, inputs_ours, inputs_ref, seed=0, tol=1e-9):
    ours = ours if isinstance(ours, (tuple, list)) else [ours]
    ref = ref if isinstance(ref, (tuple, list)) else [ref]
    gen = _gen(seed)
    ws = [torch.randn(r.shape, generator=gen, dtype=F64) for r in ref]
    names = list(inputs_ours)
    g_o = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ours, ws)),
                              [inputs_ours[n] for n in names], allow_unused=True)
    g_r = torch.autograd.grad(sum((r * w).sum() for r, w in zip(ref, ws)),
                              [inputs_ref[n] for n in names], allow_unused=True)
    for n, a, r in zip(names, g_o, g_r):
        r = torch.zeros_like(inputs_ref[n]) if r is None else r
        a = torch.zeros_like(inputs_ours[n]) if a is None else a
        torch.testing.assert_close(a, r, rtol=tol, atol=tol, msg=f"grad {n}")


@pytest.mark.parametrize("variant", ["plain", "full", "D_per_channel_limit", "states"])
def test_mamba_chunk_scan_combined(variant):
    a = ssd_inputs(seed=10)
    kw = {}
    if variant == "plain":
        a = {k: a[k] for k in "x dt A B C".split()}
    elif variant == "full":
        kw = dict(dt_softplus=True)
    elif variant == "D_per_channel_limit":
        a["D"] = randn(4, 5, seed=3)
        kw = dict(dt_softplus=True, dt_limit=(0.05, 0.6))
        del a["z"]
    elif variant == "states":
        a["initial_states"] = randn(2, 4, 5, 3, seed=4)  # mamba_ssm's (b, h, p, n)
        kw = dict(dt_softplus=True, return_final_states=True)
    ours_in, ref_in = _leaves(a), _leaves(a)
    ours = mamba_chunk_scan_combined(chunk_size=64, **ours_in, **kw, **REF)
    ref_kw = {k: v for k, v in kw.items() if k != "return_final_states"}
    out, final, _ = naive_chunk_scan(**ref_in, **ref_kw)
    if variant == "states":
        assert isinstance(ours, tuple) and len(ours) == 2
        assert ours[1].shape == (2, 4, 5, 3)
        ref = (out, final)
        for o, r in zip(ours, ref):
            torch.testing.assert_close(o.double(), r, rtol=1e-10, atol=1e-10)
    else:
        assert isinstance(ours, torch.Tensor)
        ref = out
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    _check_grads(ours, ref, ours_in, ref_in)


def test_mamba_chunk_scan_combined_packed_sequences():
    """seq_idx (and cu_seqlens for the per-sequence states): the state restarts per sequence;
    final_states is the state at the end of the packed batch."""
    a = ssd_inputs(b=1, L=10, seed=20)
    lengths = [3, 5, 2]
    seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths)).unsqueeze(0)
    cu = torch.tensor([0, 3, 8, 10])
    out, final, ends = naive_chunk_scan(**a, seq_idx=seq_idx, dt_softplus=True)
    y = mamba_chunk_scan_combined(**a, chunk_size=4, seq_idx=seq_idx, dt_softplus=True, **REF)
    torch.testing.assert_close(y, out, rtol=1e-10, atol=1e-10)
    y, fin, varlen = mamba_chunk_scan_combined(**a, chunk_size=4, seq_idx=seq_idx,
                                               cu_seqlens=cu, dt_softplus=True,
                                               return_final_states=True,
                                               return_varlen_states=True, **REF)
    torch.testing.assert_close(y, out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fin.double(), final, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(varlen.double(), torch.stack(ends), rtol=1e-10, atol=1e-10)
    y2, varlen2 = mamba_chunk_scan_combined(**a, chunk_size=4, seq_idx=seq_idx, cu_seqlens=cu,
                                            dt_softplus=True, return_varlen_states=True, **REF)
    torch.testing.assert_close(varlen2, varlen)


def test_mamba_chunk_scan_combined_unsupported():
    a = ssd_inputs(b=2, L=4, seed=1)
    with pytest.raises(ssmc.UnsupportedError, match="'seq_idx'"):
        mamba_chunk_scan_combined(**a, chunk_size=4, seq_idx=torch.zeros(2, 4, dtype=torch.long),
                                  **REF)
    a1 = ssd_inputs(b=1, L=4, seed=1)
    with pytest.raises(ssmc.UnsupportedError, match="'initial_states'"):
        mamba_chunk_scan_combined(**a1, chunk_size=4, seq_idx=torch.zeros(1, 4, dtype=torch.long),
                                  initial_states=randn(1, 4, 5, 3, seed=2), **REF)
    with pytest.raises(ssmc.ConfigError, match="cu_seqlens"):
        mamba_chunk_scan_combined(**a1, chunk_size=4, return_varlen_states=True, **REF)


# ---------------------------------------------------------------------- selective_state_update

def naive_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """selective_state_update_ref's semantics on (b, h, dim, n) inputs (heads present)."""
    h, g = state.shape[1], B.shape[1]
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    dA = torch.exp(dt[..., None] * A)
    B = B.repeat_interleave(h // g, dim=1)
    C = C.repeat_interleave(h // g, dim=1)
    new = state * dA + dt[..., None] * B[:, :, None, :] * x[..., None]
    out = torch.einsum("bhdn,bhn->bhd", new, C)
    if D is not None:
        out = out + x * D
    if z is not None:
        out = out * F.silu(z)
    return out, new


@pytest.mark.parametrize("case", ["heads", "mamba2-tied", "no-heads", "fp32-indices"])
def test_selective_state_update(case):
    b, h, dim, n, g = 3, 4, 5, 6, 2
    state = randn(b, h, dim, n, seed=1)
    args = dict(x=randn(b, h, dim, seed=2), dt=randn(b, h, dim, seed=3, scale=0.5),
                A=-torch.rand(h, dim, n, generator=_gen(4), dtype=F64) - 0.5,
                B=randn(b, g, n, seed=5), C=randn(b, g, n, seed=6), D=randn(h, dim, seed=7),
                z=randn(b, h, dim, seed=8), dt_bias=randn(h, dim, seed=9, scale=0.3))
    if case == "mamba2-tied":  # what Mamba2.step passes: values repeated over dim and n
        A1, dt1, bias1 = -torch.linspace(0.5, 2, h, dtype=F64), randn(b, h, seed=10), \
            randn(h, seed=11)
        args.update(A=A1[:, None, None].expand(h, dim, n), dt=dt1[..., None].expand(b, h, dim),
                    dt_bias=bias1[:, None].expand(h, dim), z=None)
    exp_out, exp_state = naive_state_update(state, dt_softplus=True, **args)
    if case == "no-heads":
        s1 = state[:, 0].clone()
        a1 = dict(x=args["x"][:, 0], dt=args["dt"][:, 0], A=args["A"][0], B=args["B"][:, 0],
                  C=args["C"][:, 0], D=args["D"][0], z=args["z"][:, 0],
                  dt_bias=args["dt_bias"][0])
        e_out, e_state = naive_state_update(state[:, :1], dt_softplus=True, **{
            k: (v.unsqueeze(1) if k in ("x", "dt", "z", "B", "C") else v.unsqueeze(0))
            for k, v in a1.items()})
        out = selective_state_update(s1, dt_softplus=True, **a1, **REF)
        assert out.shape == (b, dim)
        torch.testing.assert_close(out, e_out[:, 0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s1, e_state[:, 0], rtol=1e-10, atol=1e-10)
        return
    if case == "fp32-indices":
        big = torch.zeros(6, h, dim, n, dtype=torch.float32)
        idx = torch.tensor([4, 0, 2])
        big[idx] = state.float()
        a32 = {k: (v.float() if v is not None else None) for k, v in args.items()}
        out = selective_state_update(big, dt_softplus=True, state_batch_indices=idx, **a32,
                                     **REF)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), exp_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(big[idx].double(), exp_state, rtol=1e-5, atol=1e-5)
        assert big[[1, 3, 5]].abs().sum() == 0
        return
    s = state.clone()
    out = selective_state_update(s, dt_softplus=True, **args, **REF)
    torch.testing.assert_close(out, exp_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, exp_state, rtol=1e-10, atol=1e-10)


def test_selective_state_update_decode_matches_chunk_scan():
    """Mamba-2 decode with selective_state_update reproduces mamba_chunk_scan_combined."""
    a = ssd_inputs(b=2, L=6, h=4, g=2, n=3, p=5, seed=30)
    y, final = mamba_chunk_scan_combined(**a, chunk_size=8, dt_softplus=True,
                                         return_final_states=True, **REF)
    state = torch.zeros(2, 4, 5, 3, dtype=F64)
    h, p, n = 4, 5, 3
    steps = []
    for t in range(6):
        steps.append(selective_state_update(
            state, a["x"][:, t], a["dt"][:, t, :, None].expand(2, h, p),
            a["A"][:, None, None].expand(h, p, n), a["B"][:, t], a["C"][:, t],
            D=a["D"][:, None].expand(h, p), z=a["z"][:, t],
            dt_bias=a["dt_bias"][:, None].expand(h, p), dt_softplus=True, **REF))
    torch.testing.assert_close(torch.stack(steps, 1), y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, final.double(), rtol=1e-10, atol=1e-10)


def _state_update_args(b, h, dim, n, g, seed, tied, dtype=torch.float32):
    """Inputs of selective_state_update in `dtype`; with `tied`, Mamba2.step's call: per-head
    dt, A, D and dt_bias repeated over dim (and n) by expand (stride 0)."""
    def r(*shape, k, scale=1.0):
        return randn(*shape, seed=seed + k, scale=scale).to(dtype)
    args = dict(x=r(b, h, dim, k=0), B=r(b, g, n, k=1), C=r(b, g, n, k=2),
                D=r(h, k=3)[:, None].expand(h, dim), z=r(b, h, dim, k=4))
    if tied:
        A = (-torch.linspace(0.5, 2, h, dtype=F64)).to(dtype)
        args.update(dt=r(b, h, k=5, scale=0.5)[..., None].expand(b, h, dim),
                    A=A[:, None, None].expand(h, dim, n),
                    dt_bias=r(h, k=6, scale=0.3)[:, None].expand(h, dim))
    else:
        args.update(dt=r(b, h, dim, k=5, scale=0.5),
                    A=(-torch.rand(h, dim, n, generator=_gen(seed + 6), dtype=F64) - 0.5)
                    .to(dtype), dt_bias=r(h, dim, k=7, scale=0.3))
    return args


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("tied", [True, False], ids=["mamba2-tied", "per-channel"])
def test_selective_state_update_slots_with_padding_vs_a_loop(tied, backend):
    """state_batch_indices into a cache of slots, with padding (-1): each sequence's slot is
    what a step on that sequence alone gives; padded rows output zeros and write nothing."""
    b, h, dim, n, g = 4, 4, 3, 5, 2
    args = _state_update_args(b, h, dim, n, g, 40, tied)
    assert _tied(args["dt"], args["A"], args["dt_bias"]) == tied
    cache = randn(7, h, dim, n, seed=50).float()
    before = cache.clone()
    idx = torch.tensor([5, -1, 1, 3], dtype=torch.int32)
    out = selective_state_update(cache, dt_softplus=True, state_batch_indices=idx, **args,
                                 backend=backend)
    for i, slot in enumerate(idx.tolist()):
        if slot < 0:
            assert (out[i] == 0).all()
            continue
        one = {k: (v[i:i + 1] if k in ("x", "dt", "z", "B", "C") else v) for k, v in args.items()}
        s = before[slot:slot + 1].double()
        e_out, e_state = naive_state_update(s, dt_softplus=True,
                                            **{k: v.double() for k, v in one.items()})
        torch.testing.assert_close(out[i:i + 1].double(), e_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache[slot:slot + 1].double(), e_state, rtol=1e-5,
                                   atol=1e-5)
    assert torch.equal(cache[[0, 2, 4, 6]], before[[0, 2, 4, 6]])


@pytest.mark.gpu
@pytest.mark.parametrize("n", [16, 32, 64])
def test_selective_state_update_per_channel_slots_every_call_exact(n):
    """The per-channel (Mamba-1) step into a cache of slots, as mamba_ssm's batch-index tests
    call it (dim 4096: 4096 heads of p = 1), 1000 calls at n = 32 and 100 at the others, on
    fresh draws, each against a float64 step: at n = 32 the step's [32, 2] tile over 4 warps
    (two copies of the other two) gave a different output on the same inputs in about 1 call of
    100-200 on an H100 (Triton 3.6), misses among them; the tile's warps are checked on the CPU
    too (tests/backends/triton/test_step.py)."""
    b, dim, slots = 16, 4096, 160
    gen = torch.Generator(device="cuda").manual_seed(17)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=F64, device="cuda") * scale
    worst = 0.0
    for _ in range(1000 if n == 32 else 100):
        A = -torch.rand(dim, n, generator=gen, dtype=F64, device="cuda") - 1
        args = dict(x=r(b, dim), dt=r(b, dim), A=A, B=r(b, n), C=r(b, n), D=r(dim), z=r(b, dim),
                    dt_bias=r(dim, scale=0.1) - 4)
        cache = r(slots, dim, n).float()
        index = torch.randperm(slots, generator=gen, device="cuda")[:b].to(torch.int32)
        before = cache[index.long()].double()
        out = selective_state_update(cache, dt_softplus=True, state_batch_indices=index,
                                     backend="triton", **{k: v.float() for k, v in args.items()})
        heads = {k: v.unsqueeze(0 if k in ("A", "D", "dt_bias") else 1) for k, v in args.items()}
        want, state = naive_state_update(before.unsqueeze(1), dt_softplus=True, **heads)
        worst = max(worst, ((out.double() - want[:, 0]).abs() / (want[:, 0].abs() + 1)).max()
                    .item())
        torch.testing.assert_close(cache[index.long()].double(), state[:, 0], rtol=1e-5,
                                   atol=1e-5)
    assert worst < 1e-5, worst


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selective_state_update_low_precision_state(dtype):
    """A bf16/fp16 state is updated in place with fp32 math: one rounding of the exact step."""
    b, h, dim, n, g = 2, 2, 4, 3, 1
    args = _state_update_args(b, h, dim, n, g, 60, True)
    state = randn(b, h, dim, n, seed=61).to(dtype)
    e_out, e_state = naive_state_update(state.double(), dt_softplus=True,
                                        **{k: v.double() for k, v in args.items()})
    ptr = state.data_ptr()
    out = selective_state_update(state, dt_softplus=True, **args, backend="triton")
    assert state.dtype == dtype and state.data_ptr() == ptr
    torch.testing.assert_close(out.double(), e_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, e_state.to(dtype), rtol=1e-2, atol=1e-2)


def _shim_call(layout, seed, dtype=torch.float32):
    """(state, kwargs) of a selective_state_update call: `layout` is mamba2-tied (Mamba2.step's
    expanded per-head values), per-channel (Mamba-1's values per channel, D (h, dim)
    contiguous), per-channel-expanded-D (D a per-head value expanded over dim), no-heads
    (b, dim, n) or slots (a cache with padding)."""
    b, h, dim, n, g = 3, 4, 5, 6, 2
    args = _state_update_args(b, h, dim, n, g, seed, not layout.startswith("per-channel"),
                              dtype)
    if layout == "per-channel":
        args["D"] = args["D"].contiguous()
    state = randn(b, h, dim, n, seed=seed + 20).to(dtype)
    if layout == "no-heads":
        state = state[:, 0].contiguous()
        args = {k: v.select(0 if k in ("A", "D", "dt_bias") else 1, 0)
                for k, v in args.items()}
    if layout == "slots":
        state = randn(6, h, dim, n, seed=seed + 20).to(dtype)
        args["state_batch_indices"] = torch.tensor([4, -1, 0])
    return state, args


LAYOUTS = ["mamba2-tied", "per-channel", "per-channel-expanded-D", "no-heads", "slots"]


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_selective_state_update_repeated_calls_bit_identical(monkeypatch, layout, state_dtype):
    """Later calls with the same metadata (the launch bound on the first) give the bits of
    calls checked in full (the cache of launches emptied before each), outputs and state."""
    import ssmc.compat.mamba_ssm as shim
    state, _ = _shim_call(layout, 70, state_dtype)
    s1, s2 = state.clone(), state.clone()
    for step in range(3):
        _, args = _shim_call(layout, 71 + step)
        y1 = selective_state_update(s1, dt_softplus=True, **args, backend="triton")
        monkeypatch.setattr(shim, "_FAST_UPDATES", {})
        y2 = selective_state_update(s2, dt_softplus=True, **args, backend="triton")
        assert torch.equal(y1, y2) and y1.shape == y2.shape and y1.is_contiguous()
        assert torch.equal(s1, s2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_selective_state_update_repeated_call_launches_on_the_callers_tensors(monkeypatch,
                                                                               layout):
    """The second call with tensors of the same metadata is the step kernel's launch alone,
    on the caller's tensors themselves: mamba_ssm's (b, h, p, n) state is neither transposed
    nor copied, the expanded per-head values are not indexed, nothing is checked again, and
    no torch op runs but the output's allocation. (A D expanded over the channels of a
    per-channel call is the exception: the op's D (h * dim,) is a copy of it, made each
    call.)"""
    import ssmc.api
    import ssmc.compat.mamba_ssm as shim
    from tests.test_step import ALLOCATION, TorchOps, recording_step_kernel
    kernel = recording_step_kernel(monkeypatch)
    monkeypatch.setattr(ssmc.api, "_VARIANTS", {})       # ops built with the recording kernel
    monkeypatch.setattr(shim, "_FAST_UPDATES", {})
    state, _ = _shim_call(layout, 80)
    for step in range(2):
        _, args = _shim_call(layout, 81 + step)
        if step:
            monkeypatch.setattr(shim, "_checked_update", None)
        with TorchOps() as mode:
            y = selective_state_update(state, dt_softplus=True, **args, backend="triton")
    launched = kernel.launches[-1]
    names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    copied = {"D"} if layout == "per-channel-expanded-D" else set()
    assert all((a is args[n]) != (n in copied) for a, n in zip(launched, names))
    k = len(names)
    assert launched[k] is y and launched[k + 1] is state
    if layout == "slots":
        assert launched[k + 2] is args["state_batch_indices"]
    if copied:
        assert torch.equal(launched[names.index("D")], args["D"].reshape(-1))
    else:
        assert set(mode.ops) <= ALLOCATION and mode.ops.count("aten.empty.memory_format") == 1


def test_selective_state_update_bad_call_after_cached_calls_is_still_checked():
    """Arguments whose metadata differ from a cached call's are checked in full, before any
    launch: the error names the argument, the expected and the actual shape."""
    state, args = _shim_call("mamba2-tied", 90)
    for _ in range(2):
        selective_state_update(state, dt_softplus=True, **args, backend="triton")
    before = state.clone()
    with pytest.raises(ssmc.ShapeError, match=r"selective_state_update\(\): 'z' has shape "
                       r"\(3, 4, 4\).*expected \(3, 4, 5\)"):
        selective_state_update(state, dt_softplus=True, **dict(args, z=args["z"][..., :4]),
                               backend="triton")
    with pytest.raises(ssmc.ConfigError, match="'state' requires grad"):
        selective_state_update(state.clone().requires_grad_(), dt_softplus=True, **args,
                               backend="triton")
    assert torch.equal(state, before)


# --------------------------------------------------------------------------- selective_scan_fn

def naive_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False):
    """selective_scan_ref's semantics, (b, d, l) layout; returns (out, last_state (b, d, n))."""
    b, d, L = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    def at(M, t):
        if M.dim() == 2:
            return M.unsqueeze(0).expand(b, d, M.shape[-1])
        if M.dim() == 3:
            return M[:, :, t].unsqueeze(1).expand(b, d, M.shape[1])
        return M[..., t].repeat_interleave(d // M.shape[1], dim=1)

    x = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(L):
        x = torch.exp(delta[:, :, t, None] * A) * x + delta[:, :, t, None] * at(B, t) * \
            u[:, :, t, None]
        ys.append((x * at(C, t)).sum(-1))
    out = torch.stack(ys, -1)
    if D is not None:
        out = out + D[:, None] * u
    if z is not None:
        out = out * F.silu(z)
    return out, x


@pytest.mark.parametrize("bc", ["bnl", "bgnl", "time_invariant_B"])
def test_selective_scan_fn(bc):
    b, d, L, n = 2, 6, 7, 4
    a = dict(u=randn(b, d, L, seed=1), delta=randn(b, d, L, seed=2, scale=0.5),
             A=-torch.rand(d, n, generator=_gen(3), dtype=F64) - 0.5,
             B=randn(b, n, L, seed=4), C=randn(b, n, L, seed=5), D=randn(d, seed=6),
             z=randn(b, d, L, seed=7), delta_bias=randn(d, seed=8, scale=0.3))
    if bc == "bgnl":
        a.update(B=randn(b, 3, n, L, seed=9), C=randn(b, 3, n, L, seed=10))
    elif bc == "time_invariant_B":
        a["B"] = randn(d, n, seed=11)
    ours_in, ref_in = _leaves(a), _leaves(a)
    out, last = selective_scan_fn(**ours_in, delta_softplus=True, return_last_state=True, **REF)
    e_out, e_last = naive_selective_scan(**ref_in, delta_softplus=True)
    assert out.shape == (b, d, L) and last.shape == (b, d, n)
    torch.testing.assert_close(out, e_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last.double(), e_last, rtol=1e-10, atol=1e-10)
    # mamba_ssm does not differentiate last_state; the output's gradients
    _check_grads(out, e_out, ours_in, ref_in)
    only = selective_scan_fn(**{k: v.detach() for k, v in a.items()}, delta_softplus=True,
                             **REF)
    torch.testing.assert_close(only, out.detach())


def test_selective_scan_fn_complex_A_is_unsupported():
    A = torch.complex(-torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(ssmc.UnsupportedError, match="complex 'A'"):
        selective_scan_fn(torch.ones(1, 2, 4), torch.ones(1, 2, 4), A, torch.ones(1, 3, 4),
                          torch.ones(1, 3, 4), **REF)
