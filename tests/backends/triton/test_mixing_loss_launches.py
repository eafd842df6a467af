"""ssmc/backends/triton/mixing_loss.py, the host side of a call: a fixed number of launches
whatever t is, with the same compile-time constants (no kernel specialised on t), grids of
one program per (b * h, block), and no host synchronisation (at short t the host's
time is the step's time). The kernels are replaced by recorders here: what runs on the device
is tested in test_mixing_loss.py, and that every kernel compiles for sm_90 at the end here."""
import importlib

import pytest

from tests.helpers import compile_for_hopper
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ssmc
from tests.backends.triton.test_mixing_loss import inputs, mamba2_like, teacher

ML = importlib.import_module("ssmc.backends.triton.mixing_loss")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BT = 64 if DEVICE == "cuda" else 16       # row blocks of a decay not over n
KERNELS = ("mixing_loss_fwd", "mixing_loss_bwd_rows", "mixing_loss_bwd_cols", "matrix_bwd_rows",
           "matrix_bwd_cols")

# aten ops that wait for the device to hand a value to the host
SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "_unique", "unique_",
           "unique_dim", "unique_consecutive", "is_nonzero", "equal", "allclose")
# tensor methods that read a value on the host
HOST_VALUE = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture
def launches(monkeypatch):
    """[(kernel, grid, constexprs)] of every launch; nothing runs."""
    seen = []
    for name in KERNELS:
        kernel = getattr(ML, name)

        def run(*args, grid, warmup=False, _name=name, **kwargs):
            assert not callable(grid)
            seen.append((_name, tuple(grid), kwargs))

        monkeypatch.setattr(kernel, "run", run)
    return seen


def _step(t: int, b: int = 2, h: int = 3, hk: int = 3, d: int = 8):
    x = inputs(mamba2_like, b, t, h, 1, 8, 4, seed=t)
    q, k = (v.to(DEVICE).requires_grad_(True)
            for v in teacher(b, t, h, hk, d, seed=t, dtype=torch.float32))
    leaves = {n: v.to(DEVICE).requires_grad_(True) for n, v in x.items()}
    op = ssmc.compile(mamba2_like, backend="triton")
    loss = ssmc.mixing_loss(op, *leaves.values(), q=q, k=k)
    loss.backward()
    return loss


def test_mixing_loss_launches_fixed_in_t(launches):
    """Forward + backward is four launches at any t (none per block from the host), each
    grid (b * h, NB), and the constexprs do not change with t: a longer sequence reuses
    the compiled kernels (Triton specialises the integer sizes only on divisibility by 16)."""
    per_t = {}
    for t in (40, 200, 1000):
        launches.clear()
        _step(t)
        nb = -(-t // BT)
        assert [(name, grid) for name, grid, _ in launches] == [
            ("mixing_loss_fwd", (2 * 3, nb)), ("mixing_loss_fwd", (2 * 3, nb)),
            ("mixing_loss_bwd_rows", (2 * 3, nb)), ("mixing_loss_bwd_cols", (2 * 3, nb))]
        per_t[t] = [(name, consts) for name, _, consts in launches]
    assert per_t[40] == per_t[200] == per_t[1000]
    assert [c["STATS_ONLY"] for _, c in per_t[40][:2]] == [False, True]


def test_attention_matrix_backward_launches_fixed_in_t(launches):
    op = ssmc.compile(mamba2_like, backend="triton")
    per_t = {}
    for t in (40, 200):
        launches.clear()
        x = {n: v.to(DEVICE).requires_grad_(True)
             for n, v in inputs(mamba2_like, 1, t, 2, 1, 8, 4, seed=t).items()}
        ssmc.attention_matrix(op, *x.values()).sum().backward()
        nb = -(-t // BT)
        assert [(name, grid) for name, grid, _ in launches] == [
            ("matrix_bwd_rows", (2, nb)), ("matrix_bwd_cols", (2, nb))]
        per_t[t] = [consts for _, _, consts in launches]
    assert per_t[40] == per_t[200]


class _NoSync(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        assert not any(name.startswith(s) for s in SYNCING), f"host sync: {func}"
        self.ops += 1
        return func(*args, **(kwargs or {}))


def test_mixing_loss_host_side_never_syncs(launches, monkeypatch):
    """Nothing between the launches waits for the device: no aten op that hands a value to
    the host, no tensor turned into a Python value (on a GPU either would stall the host
    until the kernels before it finish, putting the host's time on top of the device's)."""
    modes = []

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor became a host value")

    for name in ("loss", "loss_backward"):
        real = getattr(ML, name)

        def watched(*args, _real=real, **kwargs):
            mode = _NoSync()
            modes.append(mode)
            with monkeypatch.context() as m, mode:
                for method in HOST_VALUE:
                    m.setattr(torch.Tensor, method, refuse)
                return _real(*args, **kwargs)

        monkeypatch.setattr(ML, name, watched)
    _step(100)
    assert len(modes) == 2 and all(m.ops for m in modes)
    assert len(launches) == 4


# ------------------------------------------------------------------------------ sm90 compile

_AOT = r'''
import importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ML = importlib.import_module("ssmc.backends.triton.mixing_loss")
TYPES = {"z_ptr": "*i32", "pre_ptr": "*fp64", "qt_ptr": "*bf16", "kt_ptr": "*bf16",
         "scale": "fp32", "gscale": "fp32"}
for decay in (0, 1, 2):
    consts = dict(BT=32 if decay == 2 else 64, BN=16 if decay == 2 else 64, BD=64, DECAY=decay,
                  LOWP=True, PREC="tf32x3")
    for name, extra in (("mixing_loss_fwd", dict(STATS_ONLY=False)),
                        ("mixing_loss_fwd", dict(STATS_ONLY=True)),
                        ("mixing_loss_bwd_rows", {}), ("mixing_loss_bwd_cols", {}),
                        ("matrix_bwd_rows", {}), ("matrix_bwd_cols", {})):
        fn = getattr(ML, name)
        c = {k: v for k, v in dict(consts, **extra).items() if k in fn.arg_names}
        sig = {a: "constexpr" if a in c else TYPES.get(a, "*fp32" if a.endswith("_ptr") else "i32")
               for a in fn.arg_names}
        k = triton.compile(ASTSource(fn, sig, c), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=4))
        assert k.asm.get("cubin"), (name, decay)
print("compiled")
'''


def test_mixing_loss_kernels_compile_for_sm90(tmp_path):
    """Every kernel of the file, for each decay kind, through Triton's real compiler (sm90
    cubin) without a GPU: the interpreter above does not see GPU-only front-end errors."""
    compile_for_hopper(_AOT, tmp_path, timeout=600)
