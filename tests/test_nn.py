"""ssmc/nn.py: Mamba2 (mamba_ssm's parameter names and shapes, its semantics, decoding) and
SSMLayer. On CPU with the reference backend (exact, and differentiable); one decode check on the
TVM backend where it is installed."""
import pytest
import torch
import torch.nn.functional as F

import ssmc
from ssmc.nn import (InferenceParams, Mamba2, RMSNormGated, SSMLayer, causal_conv1d,
                     decode_state)
from ssmc.ops import retention
from tests.helpers import cu_seqlens

F64 = dict(dtype=torch.float64, backend="reference")
SMALL = dict(d_model=16, d_state=8, headdim=8)  # d_inner 32, nheads 4

# The state dict of mamba_ssm 2.3.2's Mamba2 (mamba_ssm/modules/mamba2.py, __init__) for
# d_model=16, d_state=8, d_conv=4, expand=2, headdim=8, ngroups=1 (so d_inner = d_ssm = 32,
# nheads = 4): parameters registered on the module first (dt_bias, A_log, D), then the
# submodules in construction order (in_proj, conv1d, norm = RMSNormGated, out_proj).
#   in_proj:  Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + nheads) = (84, 16)
#   conv1d:   Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim), conv_dim = d_ssm + 2 g n = 48
#   dt_bias, A_log: (nheads,); D: (nheads,) or (d_ssm,) with D_has_hdim
#   norm.weight: (d_ssm,) when rmsnorm (its bias is registered as None: not in the state dict)
#   out_proj: Linear(d_inner, d_model) = (16, 32); biases only with bias=True
MAMBA_SSM_STATE_DICT = [
    ("dt_bias", (4,)), ("A_log", (4,)), ("D", (4,)),
    ("in_proj.weight", (84, 16)),
    ("conv1d.weight", (48, 1, 4)), ("conv1d.bias", (48,)),
    ("norm.weight", (32,)),
    ("out_proj.weight", (16, 32)),
]
# the same with ngroups=2, D_has_hdim=True, rmsnorm=False, bias=True
MAMBA_SSM_STATE_DICT_VARIANT = [
    ("dt_bias", (4,)), ("A_log", (4,)), ("D", (32,)),
    ("in_proj.weight", (100, 16)), ("in_proj.bias", (100,)),
    ("conv1d.weight", (64, 1, 4)), ("conv1d.bias", (64,)),
    ("out_proj.weight", (16, 32)), ("out_proj.bias", (16,)),
]


def _shapes(module):
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def test_state_dict_names_and_shapes_match_mamba_ssm():
    assert _shapes(Mamba2(**SMALL, **F64)) == MAMBA_SSM_STATE_DICT
    variant = Mamba2(**SMALL, ngroups=2, D_has_hdim=True, rmsnorm=False, bias=True, **F64)
    assert _shapes(variant) == MAMBA_SSM_STATE_DICT_VARIANT


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a, b = Mamba2(**SMALL, **F64), Mamba2(**SMALL, **F64)
    b.load_state_dict(a.state_dict(), strict=True)
    u = torch.randn(2, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(a(u), b(u))


# ------------------------------------------------------- a naive Mamba2 from mamba_ssm's source

def naive_mamba2(m: Mamba2, u: torch.Tensor) -> torch.Tensor:
    """mamba_ssm's Mamba2.forward without fused kernels (its `use_mem_eff_path=False` branch and
    `step`'s einsum SSM), in float64: a sequential scan over a (b, h, p, n) state, mamba_ssm's
    layout; rms_norm_ref of ops/triton/layernorm_gated.py for the gated norm."""
    b, L, _ = u.shape
    h, p, n, g = m.nheads, m.headdim, m.d_state, m.ngroups
    zxbcdt = u @ m.in_proj.weight.T
    if m.in_proj.bias is not None:
        zxbcdt = zxbcdt + m.in_proj.bias
    d_mlp = (zxbcdt.shape[-1] - 2 * m.d_ssm - 2 * g * n - h) // 2
    z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, m.d_ssm, m.d_ssm + 2 * g * n, h], -1)
    conv = F.conv1d(xBC.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=m.d_conv - 1,
                    groups=xBC.shape[-1])
    xBC = F.silu(conv[..., :L].transpose(1, 2))
    x, B, C = torch.split(xBC, [m.d_ssm, g * n, g * n], -1)
    x = x.reshape(b, L, h, p)
    B = B.reshape(b, L, g, n).repeat_interleave(h // g, dim=2)
    C = C.reshape(b, L, g, n).repeat_interleave(h // g, dim=2)
    A = -torch.exp(m.A_log)
    dt = F.softplus(dt + m.dt_bias)
    lo, hi = m.dt_limit
    dt = dt.clamp(min=lo, max=hi)
    D = m.D.reshape(h, p) if m.D_has_hdim else m.D[:, None]
    state = u.new_zeros(b, h, p, n)
    ys = []
    for t in range(L):
        dA = torch.exp(dt[:, t] * A)                                       # (b, h)
        dBx = torch.einsum("bh,bhn,bhp->bhpn", dt[:, t], B[:, t], x[:, t])
        state = state * dA[..., None, None] + dBx
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]) + D * x[:, t])
    y = torch.stack(ys, 1)
    if not m.rmsnorm:
        y = y * F.silu(z.reshape(b, L, h, p))
    y = y.reshape(b, L, h * p)
    if m.rmsnorm:
        if not m.norm_before_gate:
            y = y * F.silu(z)
        gs = m.d_ssm // m.ngroups
        yg = y.reshape(b, L, -1, gs)
        y = (yg / torch.sqrt(yg.square().mean(-1, keepdim=True) + m.norm.eps)).reshape(b, L, -1)
        y = y * m.norm.weight
        if m.norm_before_gate:
            y = y * F.silu(z)
    if d_mlp > 0:
        y = torch.cat([F.silu(z0) * x0, y], -1)
    out = y @ m.out_proj.weight.T
    return out if m.out_proj.bias is None else out + m.out_proj.bias


CONFIGS = {
    "default": dict(),
    "groups-Dhdim-gate-bias": dict(ngroups=2, D_has_hdim=True, rmsnorm=False, bias=True),
    "mlp-normfirst-limit": dict(d_ssm=16, norm_before_gate=True, ngroups=2,
                                dt_limit=(0.01, 0.5)),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_forward_and_grads_match_naive_mamba_ssm_semantics(config):
    torch.manual_seed(1)
    m = Mamba2(**SMALL, **CONFIGS[config], **F64)
    with torch.no_grad():
        for prm in (m.D, m.norm.weight if m.rmsnorm else m.D):
            prm.add_(torch.randn_like(prm) * 0.3)  # away from the all-ones init
    u = torch.randn(2, 13, 16, dtype=torch.float64, requires_grad=True)
    ours = m(u)
    ref = naive_mamba2(m, u)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(ref)
    params = [u] + list(m.parameters())
    g_ours = torch.autograd.grad((ours * w).sum(), params)
    g_ref = torch.autograd.grad((ref * w).sum(), params)
    names = ["u"] + [k for k, _ in m.named_parameters()]
    for name, a, r in zip(names, g_ours, g_ref):
        tol = 1e-9 if a.dtype == torch.float64 else 1e-5  # D is float32, as in mamba_ssm
        torch.testing.assert_close(a, r, rtol=tol, atol=tol, msg=f"grad {name}")


# ------------------------------------------------------------------------------- decoding

def _decode(m, u, prompt):
    ip = InferenceParams(max_seqlen=u.shape[1], max_batch_size=u.shape[0])
    outs = [m(u[:, :prompt], inference_params=ip)]
    ip.seqlen_offset = prompt
    for i in range(prompt, u.shape[1]):
        outs.append(m(u[:, i:i + 1], inference_params=ip))
        ip.seqlen_offset += 1
    return torch.cat(outs, 1), ip


@pytest.mark.parametrize("config,prompt", [("default", 0), ("groups-Dhdim-gate-bias", 2),
                                           ("mlp-normfirst-limit", 7)])
def test_decode_64_tokens_matches_full_forward(config, prompt):
    """A prompt (possibly empty, shorter or longer than d_conv) then one token at a time through
    `inference_params`: 64 outputs equal the full-sequence forward's."""
    torch.manual_seed(2)
    m = Mamba2(**SMALL, **CONFIGS[config], layer_idx=3, **F64)
    u = torch.randn(2, 64, 16, dtype=torch.float64)
    with torch.no_grad():
        full = m(u)
        if prompt == 0:  # no prompt: every token is a step on a fresh cache
            ip = InferenceParams(max_seqlen=64, max_batch_size=2, seqlen_offset=1)
            dec = torch.cat([m(u[:, i:i + 1], inference_params=ip) for i in range(64)], 1)
        else:
            dec, ip = _decode(m, u, prompt)
    torch.testing.assert_close(dec, full, rtol=1e-10, atol=1e-10)
    conv_state, ssm_state = ip.key_value_memory_dict[3]
    assert conv_state.shape == (2, m.d_ssm + 2 * m.ngroups * m.d_state, m.d_conv)
    assert ssm_state.shape == (2, m.nheads, m.d_state, m.headdim)
    assert ssm_state.stride(-2) == 1     # n contiguous: what the step kernel reads fastest


def test_decode_on_the_tvm_backend_float32():
    pytest.importorskip("tvm")
    torch.manual_seed(3)
    m = Mamba2(**SMALL, layer_idx=0, backend="tvm")
    u = torch.randn(1, 64, 16)
    with torch.no_grad():
        full = m(u)
        dec, _ = _decode(m, u, 5)
    torch.testing.assert_close(dec, full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config", ["groups-Dhdim-gate-bias", "mlp-normfirst-limit"])
def test_decode_on_the_triton_backend_float32(config):
    """The generated step kernel (and the conv state) in a generation loop: a prompt, then one
    token at a time, equals the full forward."""
    torch.manual_seed(5)
    m = Mamba2(**SMALL, **CONFIGS[config], layer_idx=0, backend="triton")
    u = torch.randn(2, 10, 16)
    with torch.no_grad():
        full = m(u)
        dec, _ = _decode(m, u, 3)
    torch.testing.assert_close(dec, full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_decode_several_tokens_per_step_matches_full_forward(backend):
    """Speculative-decoding shape: after a prompt, blocks of k = 3 (and a last of 1) tokens per
    call through inference_params (conv window and SSM state carried across) equal the full
    forward."""
    torch.manual_seed(6)
    kw = F64 if backend == "reference" else dict(backend=backend)
    m = Mamba2(**SMALL, **CONFIGS["groups-Dhdim-gate-bias"], layer_idx=1, **kw)
    u = torch.randn(2, 12, 16, dtype=torch.float64 if backend == "reference" else None)
    with torch.no_grad():
        full = m(u)
        ip = InferenceParams(max_seqlen=12, max_batch_size=2)
        outs = [m(u[:, :2], inference_params=ip)]
        for start, stop in ((2, 5), (5, 8), (8, 11), (11, 12)):
            ip.seqlen_offset = start
            outs.append(m(u[:, start:stop], inference_params=ip))
    tol = 1e-10 if backend == "reference" else 1e-5
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=tol, atol=tol)


def test_packed_sequences_match_separate_ones():
    """cu_seqlens: the conv and the scan restart at each boundary; decoding after a packed
    prompt starts from each sequence's own conv and SSM state."""
    torch.manual_seed(4)
    m = Mamba2(**SMALL, layer_idx=0, **F64)
    lengths = [5, 2, 9]
    seqs = [torch.randn(1, n, 16, dtype=torch.float64) for n in lengths]
    with torch.no_grad():
        packed = m(torch.cat(seqs, 1), cu_seqlens=cu_seqlens(lengths))
        separate = torch.cat([m(s) for s in seqs], 1)
        torch.testing.assert_close(packed, separate, rtol=1e-10, atol=1e-10)
        ip = InferenceParams(max_seqlen=16, max_batch_size=3)
        m(torch.cat(seqs, 1), cu_seqlens=cu_seqlens(lengths), inference_params=ip)
        ip.seqlen_offset = 1
        nxt = torch.randn(3, 1, 16, dtype=torch.float64)
        stepped = m(nxt, inference_params=ip)
        for i, s in enumerate(seqs):
            whole = m(torch.cat([s, nxt[i:i + 1]], 1))
            torch.testing.assert_close(stepped[i], whole[0, -1:], rtol=1e-10, atol=1e-10)


def test_flattened_input_with_seqlen():
    torch.manual_seed(5)
    m = Mamba2(**SMALL, **F64)
    u = torch.randn(2, 6, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(u.reshape(12, 16), seqlen=6), m(u).reshape(12, 16))


def test_compile_fullgraph_mamba2_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(6)
    m = Mamba2(**SMALL, **F64)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    u = torch.randn(2, 11, 16, dtype=torch.float64, requires_grad=True)
    y_e = m(u)
    g_e = torch.autograd.grad(y_e.square().sum(), [u, m.A_log])
    y_c = compiled(u)
    g_c = torch.autograd.grad(y_c.square().sum(), [u, m.A_log])
    torch.testing.assert_close(y_c, y_e)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- building blocks

def test_causal_conv1d_with_seq_idx_restarts_per_sequence():
    torch.manual_seed(7)
    x = torch.randn(1, 10, 3, dtype=torch.float64)
    w, bias = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2]], dtype=torch.int32)
    out = causal_conv1d(x, w, bias, seq_idx=seq_idx)
    parts = [causal_conv1d(x[:, a:b], w, bias) for a, b in ((0, 3), (3, 8), (8, 10))]
    torch.testing.assert_close(out, torch.cat(parts, 1))
    torch.testing.assert_close(causal_conv1d(x, w, bias, seq_idx=torch.zeros_like(seq_idx)),
                               causal_conv1d(x, w, bias))


def test_rmsnorm_gated_groups_and_gate_order():
    torch.manual_seed(8)
    x, z = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    norm = RMSNormGated(8, eps=1e-5, group_size=4, norm_before_gate=True, dtype=torch.float64)
    xg = x.reshape(2, 5, 2, 4)
    expected = (xg / torch.sqrt(xg.square().mean(-1, keepdim=True) + 1e-5)).reshape(2, 5, 8)
    torch.testing.assert_close(norm(x, z), expected * F.silu(z))
    norm.norm_before_gate = False
    gated = x * F.silu(z)
    gg = gated.reshape(2, 5, 2, 4)
    torch.testing.assert_close(norm(x, z), (gg / torch.sqrt(gg.square().mean(-1, keepdim=True)
                                                            + 1e-5)).reshape(2, 5, 8))


# -------------------------------------------------------------------------------- SSMLayer

def test_ssm_layer_parameters_forward_and_step():
    torch.manual_seed(9)
    from ssmc.ops.ssd import build
    d = build(has_D=True, dt_softplus=True)
    layer = SSMLayer(d, sizes=dict(h=4), backend="reference", dtype=torch.float64,
                     init={"A": -torch.linspace(0.5, 2.0, 4, dtype=torch.float64)})
    assert layer.param_names == ("A", "D")
    assert [k for k, _ in layer.named_parameters()] == ["A", "D"]
    assert layer.input_names == ("x", "dt", "B", "C")
    b, t, h, g, n, p = 2, 12, 4, 2, 3, 5
    x = torch.randn(b, t, h, p, dtype=torch.float64)
    dt = torch.randn(b, t, h, dtype=torch.float64)
    B, C = (torch.randn(b, t, g, n, dtype=torch.float64) for _ in range(2))
    y, hT = layer(x, dt, B, C=C, return_final_state=True)
    direct = ssmc.compile(d, backend="reference")(x, dt, layer.A, B, C, layer.D)
    torch.testing.assert_close(y, direct)
    y.sum().backward()
    assert layer.A.grad is not None and layer.D.grad is not None

    state = decode_state(b, h, n, p, dtype=torch.float64)    # n contiguous, stepped in place
    assert state.shape == (b, h, n, p) and state.stride(-2) == 1 and not state.any()
    with torch.no_grad():
        steps = torch.stack([layer.step(state, x[:, i], dt[:, i], B[:, i], C[:, i])
                             for i in range(t)], 1)
    torch.testing.assert_close(steps, y.detach())
    torch.testing.assert_close(state, hT.detach())


def test_ssm_layer_errors():
    from ssmc.ops.retention import build
    with pytest.raises(ssmc.ShapeError, match=r"parameter 'gamma' \(\"h\"\) needs sizes for h"):
        SSMLayer(build(0.5))
    with pytest.raises(ssmc.ArgumentError, match="not parameters") as info:
        SSMLayer(build(0.5), init={"q": torch.ones(2)})
    assert isinstance(info.value, TypeError)
    assert retention is not None
