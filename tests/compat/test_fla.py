"""ssmc.compat.fla against a naive float64 implementation of FLA's documented semantics
(fla/ops/simple_gla and fla/ops/gla docstrings: h_t = exp(g_t) h_{t-1} + k_t v_t^T,
o_t = scale q_t h_t, scale defaulting to K ** -0.5, states [N, H, K, V], reverse runs from the
last step), outputs and gradients, on the reference backend."""
import pytest
import torch
import torch.nn.functional as F

import ssmc
from ssmc.compat.fla import chunk_gla, chunk_simple_gla, fused_recurrent_simple_gla

REF = dict(backend="reference")
F64 = torch.float64


def randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def naive_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, reverse=False,
              cu_seqlens=None):
    """g: (B, T, H) or (B, T, H, K) log gates; g_gamma: (H,). Returns (o, final (N, H, K, V))."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    bounds = [(0, T)] if cu_seqlens is None else list(zip(cu_seqlens[:-1].tolist(),
                                                          cu_seqlens[1:].tolist()))
    o = torch.zeros(B, T, H, V, dtype=F64)
    finals = []
    for i, (s, e) in enumerate(bounds):
        if initial_state is None:
            h = torch.zeros(B if cu_seqlens is None else 1, H, K, V, dtype=F64)
        else:
            h = initial_state if cu_seqlens is None else initial_state[i:i + 1]
        order = range(e - 1, s - 1, -1) if reverse else range(s, e)
        for t in order:
            if g is not None:
                decay = torch.exp(g[:, t])
                h = h * (decay[..., None, None] if g.dim() == 3 else decay[..., None])
            if g_gamma is not None:
                h = h * torch.exp(g_gamma)[:, None, None]
            h = h + k[:, t, :, :, None] * v[:, t, :, None, :]
            o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, h)
        finals.append(h)
    return o, torch.cat(finals, 0)


def inputs(B=2, T=9, H=3, K=4, V=5, seed=0, gk=False):
    return dict(q=randn(B, T, H, K, seed=seed), k=randn(B, T, H, K, seed=seed + 1),
                v=randn(B, T, H, V, seed=seed + 2),
                g=F.logsigmoid(randn(B, T, H, *((K,) if gk else ()), seed=seed + 3) + 2))


def _leaves(d):
    return {k: (v.clone().requires_grad_(True) if isinstance(v, torch.Tensor)
                and v.is_floating_point() else v) for k, v in d.items()}


def _compare(ours, ref, ours_in, ref_in, tol=1e-10):
    o, ht = ours
    e_o, e_ht = ref
    torch.testing.assert_close(o, e_o, rtol=tol, atol=tol)
    outs, exps = [o], [e_o]
    if ht is not None:
        torch.testing.assert_close(ht.double(), e_ht, rtol=tol, atol=tol)
        outs.append(ht)
        exps.append(e_ht)
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(e.shape, generator=gen, dtype=F64) for e in exps]
    names = [n for n, v in ours_in.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    g_o = torch.autograd.grad(sum((a.double() * w).sum() for a, w in zip(outs, ws)),
                              [ours_in[n] for n in names], allow_unused=True)
    g_r = torch.autograd.grad(sum((a * w).sum() for a, w in zip(exps, ws)),
                              [ref_in[n] for n in names], allow_unused=True)
    for n, a, r in zip(names, g_o, g_r):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9, msg=f"grad {n}")


@pytest.mark.parametrize("fn", [chunk_simple_gla, fused_recurrent_simple_gla],
                         ids=["chunk", "fused_recurrent"])
@pytest.mark.parametrize("case", ["g", "g_gamma", "no_gate", "state_scale", "varlen"])
def test_simple_gla(fn, case):
    a = inputs(seed=1)
    kw = {}
    if case == "g_gamma":
        a["g_gamma"] = -torch.linspace(0.1, 1.0, 3, dtype=F64)
        del a["g"]
    elif case == "no_gate":
        del a["g"]
    elif case == "state_scale":
        a["initial_state"] = randn(2, 3, 4, 5, seed=7)
        kw = dict(scale=0.3)
    elif case == "varlen":
        a = {k: v[:1] for k, v in a.items()}
        a["initial_state"] = randn(3, 3, 4, 5, seed=8)
        kw = dict(cu_seqlens=torch.tensor([0, 2, 2, 9]))
    ours_in, ref_in = _leaves(a), _leaves(a)
    ours = fn(**ours_in, output_final_state=True, **kw, **REF)
    _compare(ours, naive_gla(**ref_in, **kw), ours_in, ref_in)
    o, ht = fn(**{k: v.detach() for k, v in a.items()}, **kw, **REF)
    assert ht is None and o.shape == a["v"].shape


def test_fused_recurrent_simple_gla_reverse():
    a = inputs(seed=2)
    a["initial_state"] = randn(2, 3, 4, 5, seed=3)
    ours_in, ref_in = _leaves(a), _leaves(a)
    ours = fused_recurrent_simple_gla(**ours_in, output_final_state=True, reverse=True, **REF)
    _compare(ours, naive_gla(**ref_in, reverse=True), ours_in, ref_in)


@pytest.mark.parametrize("case", ["plain", "state", "varlen", "state_v_first"])
def test_chunk_gla(case):
    a = inputs(seed=4, gk=True)
    kw = {}
    if case in ("state", "state_v_first"):
        a["initial_state"] = randn(2, 3, 4, 5, seed=5)
    if case == "varlen":
        a = {k: v[:1] for k, v in a.items()}
        kw = dict(cu_seqlens=torch.tensor([0, 4, 9]))
    ours_in, ref_in = _leaves(a), _leaves(a)
    if case == "state_v_first":  # initial and final states are [N, H, V, K]
        ours_in["initial_state"] = ours_in["initial_state"].detach().transpose(-1, -2) \
            .contiguous().requires_grad_(True)
        o, ht = chunk_gla(**ours_in, output_final_state=True, state_v_first=True, **REF)
        e_o, e_ht = naive_gla(**{k: v.detach() for k, v in ref_in.items()})
        torch.testing.assert_close(o, e_o)
        torch.testing.assert_close(ht.double(), e_ht.transpose(-1, -2))
        return
    ours = chunk_gla(**ours_in, output_final_state=True, **kw, **REF)
    _compare(ours, naive_gla(**ref_in, **kw), ours_in, ref_in)


def test_float32_on_the_default_backend_forward():
    """The default (CPU: TVM where installed) backend, float32, forward only."""
    a = {k: v.float() for k, v in inputs(seed=6).items()}
    o, ht = chunk_simple_gla(**a, output_final_state=True)
    e_o, e_ht = naive_gla(**{k: v.double() for k, v in a.items()})
    assert o.dtype == torch.float32 and ht.dtype == torch.float32
    torch.testing.assert_close(o.double(), e_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ht.double(), e_ht, rtol=1e-4, atol=1e-4)


def test_unsupported_arguments_are_named():
    a = inputs(seed=0)
    with pytest.raises(ssmc.UnsupportedError, match="'head_first'"):
        chunk_simple_gla(**a, head_first=True, **REF)
    with pytest.raises(ssmc.UnsupportedError, match="'chunk_indices'"):
        chunk_gla(**inputs(seed=0, gk=True), chunk_indices=torch.zeros(2), **REF)
    with pytest.raises(ssmc.UnsupportedError, match="'g' and 'g_gamma'"):
        chunk_simple_gla(**a, g_gamma=torch.zeros(3, dtype=F64), **REF)
    o, _ = chunk_simple_gla(**a, chunk_size=32, **REF)  # a tiling hint: accepted, ignored
    assert o.shape == a["v"].shape


def test_compat_shim_under_torch_compile_fullgraph():
    """A shim called inside a compiled function (after one eager call has built its op)."""
    torch._dynamo.reset()
    a = inputs(seed=9)
    chunk_simple_gla(**a, **REF)

    def f(q, k, v, g):
        o, ht = chunk_simple_gla(q, k, v, g, output_final_state=True, **REF)
        return o.sum(-1), ht

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for e, c in zip(f(**a), compiled(**a)):
        torch.testing.assert_close(c, e)
