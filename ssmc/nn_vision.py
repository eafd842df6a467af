"""Vision layers on ssmc ops: `SS2D`, VMamba's 2-D selective scan, as one cross2d op.

VMamba (MzeroMiko/VMamba, `SS2D` with forward_type "v2") scans an image along four orders
(row-major, column-major, and both reversed), each order with its own dt, B, C projections
and its own A and D, and adds the four results. Its implementation copies the activations into
the four orderings, runs a 1-D selective scan over the copies and gathers the outputs back.
Here the scan is one op of a definition with `direction="cross2d"`: the per-order inputs carry
the order axis `k` and sit at their grid positions, and the kernels walk each order in place.

The per-order projections of VMamba read the permuted copies; a projection is position-wise,
so projecting first and reading the result in each order's sequence is the same computation:
dt, B and C are computed once per position (for all four orders), with no copies.

Channels are laid out as heads of `headdim` channels (d_inner = h * p): every channel has its
own dt and A (the decay varies over p), B and C are shared by all channels of an order.
"""
import inspect
import math

import torch
from torch import Tensor, nn

from . import api
from . import dsl as S
from .api import compiled_variant as compiled
from .errors import ConfigError, ShapeError

__all__ = ["SS2D", "build_ss2d_scan"]

#: scan orders of cross2d, in VMamba's order (the `k` index)
ORDERS = 4
#: the scan's inputs and their axes
SCAN_AXES = {"x": "b t h p", "dt": "b k t h p", "A": "k h p n", "B": "b k t n", "C": "b k t n",
             "D": "h p", "dt_bias": "k h p"}


def build_ss2d_scan():
    """VMamba's selective scan over the four orders of an H x W grid, in the language:
    x (b, t, h, p) with t = H * W row-major; per-order dt (b, k, t, h, p), A (k, h, p, n),
    B and C (b, k, t, n), dt_bias (k, h, p); D (h, p) is the sum of the per-order skips (the
    epilogue applies once, to the sum of the orders). Called with grid=(H, W)."""

    def ss2d_scan(x, dt, A, B, C, D, dt_bias):
        d = S.softplus(dt + dt_bias)
        y = S.recurrence(decay=S.exp(d * A), key=B, value=x * d, query=C, direction="cross2d")
        return y + D * x

    # annotations as objects (a string in the source reads as a forward reference to linters)
    ss2d_scan.__signature__ = inspect.Signature([
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=S.In[axes])
        for name, axes in SCAN_AXES.items()])
    return api.ssm(ss2d_scan)


def default_headdim(d_inner: int) -> int:
    """The largest power of two up to 32 that divides d_inner: the scan kernel holds a block of
    up to 32 value channels of one head per program, and a head of one channel (Mamba-1's
    layout) would leave most of that block empty."""
    p = 32
    while d_inner % p:
        p //= 2
    return p


class SS2D(nn.Module):
    """VMamba's SS2D mixer on an image `(b, H, W, d_model)` (channels last), its four-order
    selective scan run by one ssmc op (`direction="cross2d"`).

    Parameters, with VMamba's names and shapes (forward_type "v2", channel_first=False,
    initialize "v0"): `in_proj` (d_model -> 2 * d_inner: x and the gate z), `conv2d` (depthwise,
    `d_conv` x `d_conv`, none when d_conv < 2), `x_proj_weight` (4, dt_rank + 2 * d_state,
    d_inner), `dt_projs_weight` (4, d_inner, dt_rank), `dt_projs_bias` (4, d_inner), `A_logs`
    (4 * d_inner, d_state), `Ds` (4 * d_inner), `out_norm` (LayerNorm over d_inner), `out_proj`
    (d_inner -> d_model). Forward: x, z = in_proj(u); x = silu(conv2d(x)); per order k:
    dt_k, B_k, C_k from x_proj_weight[k] (dt_k through dt_projs_weight[k], plus
    dt_projs_bias[k], softplus), A_k = -exp(A_logs[k]); y = sum over the orders of the
    selective scan + (sum_k Ds[k]) * x; out_proj(out_norm(y) * silu(z)).

    `headdim` splits d_inner into heads for the kernels (no effect on the result); `backend` and
    `lowering` choose the ssmc op. A, D and dt_bias enter the op in float32 at least (VMamba
    keeps them in fp32).
    """

    def __init__(self, d_model=96, d_state=16, ssm_ratio=2.0, dt_rank="auto", d_conv=3,
                 conv_bias=True, dropout=0.0, bias=False, dt_min=0.001, dt_max=0.1,
                 dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, headdim=None,
                 device=None, dtype=None, backend="auto", lowering="auto"):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = d_inner = int(ssm_ratio * d_model)
        self.dt_rank = dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        if d_inner < 1 or d_state < 1 or dt_rank < 1:
            raise ConfigError(f"SS2D: d_inner={d_inner} (ssm_ratio * d_model), "
                              f"d_state={d_state} and dt_rank={dt_rank} must be positive")
        self.headdim = default_headdim(d_inner) if headdim is None else headdim
        if d_inner % self.headdim:
            raise ConfigError(f"SS2D: d_inner={d_inner} is not a multiple of "
                              f"headdim={self.headdim}")
        self.nheads = d_inner // self.headdim
        if dt_init not in ("random", "constant"):
            raise ConfigError(f"SS2D: dt_init={dt_init!r} is not valid; valid values: "
                              "random, constant")
        if not 0 < dt_min <= dt_max:
            raise ConfigError(f"SS2D: dt_min={dt_min}, dt_max={dt_max} must be 0 < min <= max")

        # registered in VMamba's order, so the state dicts list the same keys in the same order:
        # the module's own parameters, then out_norm, in_proj, conv2d, out_proj
        self.out_norm = nn.LayerNorm(d_inner, **factory)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias, **factory)
        self.act = nn.SiLU()
        if d_conv > 1:
            self.conv2d = nn.Conv2d(d_inner, d_inner, kernel_size=d_conv, groups=d_inner,
                                    padding=(d_conv - 1) // 2, bias=conv_bias, **factory)
        # per order, nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)'s default init
        x_proj = torch.empty(ORDERS, dt_rank + 2 * d_state, d_inner, **factory)
        bound = 1 / math.sqrt(d_inner)
        self.x_proj_weight = nn.Parameter(nn.init.uniform_(x_proj, -bound, bound))
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        # dt: a weight that keeps the variance at init, a bias with softplus(bias) log-uniform
        # in [dt_min, dt_max] (floored at dt_init_floor)
        std = dt_rank ** -0.5 * dt_scale
        w = torch.empty(ORDERS, d_inner, dt_rank, **factory)
        w = nn.init.constant_(w, std) if dt_init == "constant" else nn.init.uniform_(w, -std, std)
        self.dt_projs_weight = nn.Parameter(w)
        dt = torch.exp(torch.rand(ORDERS, d_inner, **factory)
                       * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        # S4D-real: A = -(1, 2, ..., d_state) for every channel of every order; A and D in fp32
        # (fp64 for a fp64 model), as VMamba keeps them
        pdtype = torch.float64 if dtype == torch.float64 else torch.float32
        A = torch.arange(1, d_state + 1, dtype=pdtype, device=device)
        self.A_logs = nn.Parameter(torch.log(A).repeat(ORDERS * d_inner, 1))
        self.Ds = nn.Parameter(torch.ones(ORDERS * d_inner, dtype=pdtype, device=device))
        for p in (self.A_logs, self.Ds):
            p._no_weight_decay = True

        self._scan_key = (build_ss2d_scan, (), backend, lowering)
        compiled(*self._scan_key)  # built now: a first call may be under torch.compile

    @property
    def scan_op(self) -> api.CompiledOp:
        return compiled(*self._scan_key)

    def _check(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ShapeError(f"SS2D: 'x' must be an image (b, H, W, c) with c=d_model="
                             f"{self.d_model} channels last, got shape {shape}")
        if x.shape[-1] != self.d_model:
            raise ShapeError(f"SS2D: 'x' has c={x.shape[-1]} channels but the layer has "
                             f"d_model={self.d_model} (x: {tuple(x.shape)}, (b, H, W, c), "
                             "channels last)")

    def scan_inputs(self, x: Tensor) -> tuple:
        """The cross2d op's inputs (x dt A B C D dt_bias) from the activations after the conv,
        x (b, H, W, d_inner)."""
        b, gh, gw, d = x.shape
        t, h, p, n, r = gh * gw, self.nheads, self.headdim, self.d_state, self.dt_rank
        x = x.reshape(b, t, d)                                   # t row-major over the grid
        proj = torch.einsum("btd,kcd->bktc", x, self.x_proj_weight)
        dt, B, C = proj.split([r, n, n], dim=-1)
        dt = torch.einsum("bktr,kdr->bktd", dt, self.dt_projs_weight)
        wide = torch.promote_types(self.A_logs.dtype, torch.float32)
        A = -torch.exp(self.A_logs.to(wide)).view(ORDERS, h, p, n)
        D = self.Ds.to(wide).view(ORDERS, h, p).sum(0)           # one skip for the sum
        dt_bias = self.dt_projs_bias.to(wide).view(ORDERS, h, p)
        return (x.view(b, t, h, p), dt.reshape(b, ORDERS, t, h, p), A, B, C, D, dt_bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (b, H, W, d_model) -> (b, H, W, d_model)."""
        self._check(x)
        b, gh, gw, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)
        if self.d_conv > 1:
            x = self.conv2d(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = self.act(x)
        y = self.scan_op(*self.scan_inputs(x), grid=(gh, gw))
        y = self.out_norm(y.reshape(b, gh, gw, self.d_inner))
        return self.dropout(self.out_proj(y * self.act(z)))
