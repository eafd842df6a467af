"""ssmc/nn_vision.py: SS2D (VMamba's parameterisation, its four-order scan as one cross2d op)
against a plain torch SS2D written here: four permuted copies of the activations, a sequential
selective scan per copy in float64, the outputs un-permuted and added. Forward and the
gradients of the input and every parameter, on the CPU (the float64 reference runs cross2d)."""
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ssmc
import ssmc.nn
from ssmc.nn import SS2D

F64 = dict(dtype=torch.float64, backend="reference")
D_MODEL = 8     # d_inner 16, dt_rank ceil(8 / 16) = 1

# VMamba's SS2D (MzeroMiko/VMamba classification/models/vmamba.py, __initv2__ with
# forward_type "v2", channel_first=False, initialize "v0") for d_model=8, d_state=16,
# ssm_ratio=2, d_conv=3, bias=False, conv_bias=True: its own parameters in registration order
# (x_proj_weight, then dt_projs_weight, dt_projs_bias, A_logs, Ds), then its submodules in
# construction order (out_norm, in_proj, conv2d, out_proj).
VMAMBA_STATE_DICT = [
    ("x_proj_weight", (4, 33, 16)), ("dt_projs_weight", (4, 16, 1)), ("dt_projs_bias", (4, 16)),
    ("A_logs", (64, 16)), ("Ds", (64,)),
    ("out_norm.weight", (16,)), ("out_norm.bias", (16,)),
    ("in_proj.weight", (32, 8)),
    ("conv2d.weight", (16, 1, 3, 3)), ("conv2d.bias", (16,)),
    ("out_proj.weight", (8, 16)),
]


# ------------------------------------------------------------------ a plain torch SS2D

def selective_scan(u, delta, A, B, C, D):
    """One order's scan, step by step: u, delta (b, d, L); A (d, n); B, C (b, n, L); D (d,).
    h_l = exp(delta_l A) h_{l-1} + delta_l u_l B_l;  y_l = C_l . h_l + D u_l."""
    b, d, L = u.shape
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for step in range(L):
        dl = delta[:, :, step, None]
        h = torch.exp(dl * A) * h + dl * u[:, :, step, None] * B[:, None, :, step]
        ys.append((h * C[:, None, :, step]).sum(-1) + D * u[:, :, step])
    return torch.stack(ys, dim=-1)


def ss2d_naive(m: SS2D, image):
    """The layer's computation as VMamba writes it, with m's parameters."""
    b, H, W, _ = image.shape
    d, n, r, L = m.d_inner, m.d_state, m.dt_rank, H * W
    x, z = F.linear(image, m.in_proj.weight, m.in_proj.bias).chunk(2, dim=-1)
    x = x.permute(0, 3, 1, 2)                                         # (b, d, H, W)
    if m.d_conv > 1:
        x = F.conv2d(x, m.conv2d.weight, m.conv2d.bias, padding=(m.d_conv - 1) // 2, groups=d)
    x = F.silu(x)
    rows = x.reshape(b, d, L)                                         # row-major
    cols = x.transpose(2, 3).reshape(b, d, L)                         # column-major
    xs = torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)   # (b, 4, d, L)
    proj = torch.einsum("bkdl,kcd->bkcl", xs, m.x_proj_weight)
    dts, Bs, Cs = proj.split([r, n, n], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, m.dt_projs_weight)
    delta = F.softplus(dts + m.dt_projs_bias[None, :, :, None])
    A = -torch.exp(m.A_logs).view(4, d, n)
    Ds = m.Ds.view(4, d)
    ys = [selective_scan(xs[:, k], delta[:, k], A[k], Bs[:, k], Cs[:, k], Ds[k])
          for k in range(4)]
    # back to row-major: flip the reversed ones, transpose the column-major ones
    by_cols = (ys[1] + ys[3].flip(-1)).view(b, d, W, H).transpose(2, 3).reshape(b, d, L)
    y = ys[0] + ys[2].flip(-1) + by_cols
    y = F.layer_norm(y.transpose(1, 2), (d,), m.out_norm.weight, m.out_norm.bias,
                     m.out_norm.eps)
    y = y.view(b, H, W, d) * F.silu(z)
    return F.linear(y, m.out_proj.weight, m.out_proj.bias)


def perturbed(seed: int, **kwargs) -> SS2D:
    """A float64 layer whose parameters are moved off their init: at init every order has the
    same A and D, which would hide an order reading another order's slice."""
    torch.manual_seed(seed)
    m = SS2D(d_model=D_MODEL, **F64, **kwargs)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


def check(m: SS2D, H: int, W: int, b: int = 2):
    image = torch.randn(b, H, W, D_MODEL, dtype=torch.float64, requires_grad=True)
    y = m(image)
    expected = ss2d_naive(m, image)
    assert y.shape == (b, H, W, D_MODEL)
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-10)
    params = dict(m.named_parameters())
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [image, *params.values()], g)
    want = torch.autograd.grad(expected, [image, *params.values()], g)
    for name, a, e in zip(["image", *params], got, want):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-10, msg=lambda s: f"{name}: {s}")


# ------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("d_state", [1, 16])
def test_ss2d_matches_plain_torch(d_state):
    check(perturbed(0, d_state=d_state), H=3, W=5)


@pytest.mark.parametrize("grid", [(1, 5), (4, 1), (1, 1)], ids=["1xW", "Hx1", "1x1"])
def test_ss2d_odd_grids(grid):
    check(perturbed(1, d_state=4), *grid)


@pytest.mark.parametrize("headdim", [1, 4])
def test_ss2d_headdim_does_not_change_the_result(headdim):
    """heads are only a layout for the kernels; bias, no conv: the other options"""
    check(perturbed(2, d_state=2, headdim=headdim, bias=True, d_conv=1), H=2, W=3)


def test_ss2d_is_one_cross2d_op_of_a_definition():
    m = SS2D(d_model=D_MODEL, d_state=1, **F64)
    program = m.scan_op.program
    assert program.recurrence.direction_name == "cross2d"
    assert {i.name for i in program.inputs if "k" in i.axes} == {"dt", "A", "B", "C", "dt_bias"}
    # the same op for every layer of one configuration (compiled once)
    assert SS2D(d_model=D_MODEL, d_state=16, **F64).scan_op is m.scan_op


def test_ss2d_state_dict_matches_vmamba():
    m = SS2D(d_model=D_MODEL, d_state=16, **F64)
    assert [(k, tuple(v.shape)) for k, v in m.state_dict().items()] == VMAMBA_STATE_DICT


def test_ss2d_init_is_vmamba_s():
    torch.manual_seed(0)
    m = SS2D(d_model=32, d_state=16, dt_min=0.002, dt_max=0.05)
    assert m.dt_rank == 2 and m.d_inner == 64
    assert torch.equal(m.A_logs, torch.log(torch.arange(1, 17.)).repeat(4 * 64, 1))
    assert torch.equal(m.Ds, torch.ones(4 * 64))
    assert m.A_logs.dtype == m.Ds.dtype == torch.float32
    dt = F.softplus(m.dt_projs_bias)
    assert dt.shape == (4, 64)
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    assert m.dt_projs_weight.abs().max() <= 2 ** -0.5
    assert m.x_proj_weight.abs().max() <= 64 ** -0.5


def test_ss2d_shape_errors_name_the_argument():
    m = SS2D(d_model=D_MODEL, d_state=1, **F64)
    with pytest.raises(ssmc.ShapeError, match=r"'x' has c=6 channels .* d_model=8"):
        m(torch.randn(2, 3, 5, 6, dtype=torch.float64))
    with pytest.raises(ssmc.ShapeError, match=r"'x' must be an image \(b, H, W, c\)"):
        m(torch.randn(2, 15, D_MODEL, dtype=torch.float64))
    with pytest.raises(ssmc.ConfigError, match="headdim"):
        SS2D(d_model=D_MODEL, headdim=3, **F64)


def test_readme_cross2d_example_runs():
    """The README's cross2d section: its code blocks run, in order, in one namespace."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = re.search(r"^### Images: cross2d\n(.*?)(?=^##)", text, re.S | re.M)
    assert section, "README.md has no section '### Images: cross2d'"
    blocks = re.findall(r"^```python\n(.*?)^```", section.group(1), re.S | re.M)
    assert len(blocks) >= 2
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README cross2d block {i}", "exec"), namespace)  # noqa: S102
    assert math.isfinite(float(namespace["out"].detach().sum()))
