"""ssmc/backends/triton/mixing_loss.py, the host side of a call: a fixed number of launches
whatever t is, with the same compile-time constants (no kernel specialised on t), grids of
one program per (b * h, block) (per (b * h) for the generated prologue and chain-rule
kernels), no host synchronisation, and a bounded number of torch ops per step (at short t the
host's time is the step's time). The kernels are replaced by recorders here: what runs on the
device is tested in test_mixing_loss.py, and that every kernel compiles for sm_90 at the end
here."""
import collections
import importlib

import pytest

from tests.helpers import HOST_VALUE, compile_for_hopper
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ssmc
from tests.backends.triton.test_mixing_loss import inputs, mamba2_like, teacher

ML = importlib.import_module("ssmc.backends.triton.mixing_loss")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BT = 64 if DEVICE == "cuda" else 16       # row blocks of a decay not over n
KERNELS = ("mixing_loss_fwd", "mixing_loss_bwd_rows", "mixing_loss_bwd_cols", "matrix_bwd_rows",
           "matrix_bwd_cols")
GENERATED = ("ssmc_mixing_prep", "ssmc_mixing_grads")

# aten ops that wait for the device to hand a value to the host
SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "_unique", "unique_",
           "unique_dim", "unique_consecutive", "is_nonzero", "equal", "allclose")


class _Recorded:
    """A generated module whose kernels record their launches."""

    def __init__(self, seen):
        for name in GENERATED:
            setattr(self, name, _Kernel(name, seen))


class _Kernel:
    def __init__(self, name, seen):
        self.name, self.seen = name, seen

    def __getitem__(self, grid):
        assert not callable(grid)
        return lambda *args, **kwargs: self.seen.append((self.name, tuple(grid), kwargs))


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
    module = _Recorded(seen)
    monkeypatch.setattr(ML, "_module", lambda plan: module)
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


def _expected(nb: int, kept: bool = True) -> list:
    """The launches of a forward + backward at b * h = 6: the prologue, the loss; the
    prologue again unless the forward kept its operands, the rows (with their own softmax
    statistics), the columns, the chain rule."""
    prep = [("ssmc_mixing_prep", (2 * 3,))]
    return prep + [("mixing_loss_fwd", (2 * 3, nb))] + ([] if kept else prep) + [
        ("mixing_loss_bwd_rows", (2 * 3, nb)), ("mixing_loss_bwd_cols", (2 * 3, nb)),
        ("ssmc_mixing_grads", (2 * 3,))]


def test_mixing_loss_launches_fixed_in_t(launches, monkeypatch):
    """Forward + backward is five launches at any t (none per block from the host), six where
    the backward makes the operands again, and the constexprs do not change with t: a longer
    sequence reuses the compiled kernels (Triton specialises the integer sizes only on
    divisibility by 16)."""
    per_t = {}
    for t in (40, 200, 1000):
        launches.clear()
        _step(t)
        assert [(name, grid) for name, grid, _ in launches] == _expected(-(-t // BT))
        per_t[t] = [(name, consts) for name, _, consts in launches]
    assert per_t[40] == per_t[200] == per_t[1000]
    monkeypatch.setattr(ML, "KEEP_BYTES", 0)
    launches.clear()
    _step(40)
    assert [(name, grid) for name, grid, _ in launches] == _expected(-(-40 // BT), kept=False)


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
            ("ssmc_mixing_prep", (2,)), ("matrix_bwd_rows", (2, nb)),
            ("matrix_bwd_cols", (2, nb)), ("ssmc_mixing_grads", (2,))]
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
    assert len(launches) == 5


class _Count(TorchDispatchMode):
    """Counts the torch ops of a step by name, those inside ssmc's custom ops included (each
    is run below the mode's dispatch key with the mode on)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "ssmc":
            key = torch._C.DispatchKey.CUDA if DEVICE == "cuda" else torch._C.DispatchKey.CPU
            with self:
                return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
        self.ops[str(func)] += 1
        return func(*args, **kwargs)


#: torch ops of one forward + backward below (the loss's sum, autograd's seed and its
#: detaching of the leaves' gradients included), where the forward keeps its operands for the
#: backward and where the backward makes them again; there were about 150 and 200 when the
#: prologue, the decay's sums and the chain rule were torch ops on the host
OPS_PER_STEP = {True: 28, False: 29}


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "made_again"])
def test_mixing_loss_torch_ops_per_step(launches, monkeypatch, keep):
    """At short t a step's time is the host's, mostly one dispatch per torch op (on a GPU
    also an allocation or a launch): the prologue, the log-decay's sums and the chain rule
    run in the generated kernels, so a forward + backward of a Mamba-2-like definition (B, C
    shared by groups of heads, A per head: gradients summed over heads and batch) takes at
    most OPS_PER_STEP torch ops, the same at any t."""
    monkeypatch.setattr(torch, "empty", torch._C._VariableFunctions.empty)  # no NaN fill
    if not keep:
        monkeypatch.setattr(ML, "KEEP_BYTES", 0)
    op = ssmc.compile(mamba2_like, backend="triton")
    counts = {}
    for t in (40, 1000):
        x = inputs(mamba2_like, 2, t, 6, 2, 8, 4, seed=t, dtype=torch.bfloat16)
        q, k = (v.to(DEVICE).requires_grad_(True)
                for v in teacher(2, t, 6, 3, 8, seed=t, dtype=torch.bfloat16))
        leaves = [v.to(DEVICE).requires_grad_(True) for v in x.values()]
        with _Count() as count:
            ssmc.mixing_loss(op, *leaves, q=q, k=k).backward()
        counts[t] = count.ops
        assert all(v.grad is not None for v in (*leaves, q, k))
    assert counts[40] == counts[1000]
    total = sum(counts[40].values())
    assert total <= OPS_PER_STEP[keep], f"{total} torch ops per step: {dict(counts[40])}"


# ------------------------------------------------------------------------------ sm90 compile

_AOT = r'''
import importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ML = importlib.import_module("ssmc.backends.triton.mixing_loss")
TYPES = {"qt_ptr": "*bf16", "kt_ptr": "*bf16", "dqt_ptr": "*bf16",
         "dkt_ptr": "*bf16", "scale": "fp32", "gscale": "fp32"}
for decay in (0, 1, 2):
    consts = dict(BT=32 if decay == 2 else 64, BN=16 if decay == 2 else 64, BD=64, DECAY=decay,
                  LOWP=True, PREC="tf32x3")
    for name, extra in (("mixing_loss_fwd", {}),
                        ("mixing_loss_bwd_rows", {}), ("mixing_loss_bwd_cols", {}),
                        ("matrix_bwd_rows", {}), ("matrix_bwd_cols", {})):
        fn = getattr(ML, name)
        c = {k: v for k, v in dict(consts, **extra).items() if k in fn.arg_names}
        sig = {a: "constexpr" if a in c else TYPES.get(a, "*fp32" if a.endswith("_ptr") else "i32")
               for a in fn.arg_names}
        k = triton.compile(ASTSource(fn, sig, c), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=4))
        assert k.asm.get("cubin"), (name, decay)

# the generated prologue and chain-rule kernels of definitions of each decay kind
import importlib.util
import os
import re
import tempfile

from ssmc.backends.triton.render import arg_names
from ssmc.plan import Plan
from tests.backends.triton import test_mixing_loss as defs

tmp = tempfile.mkdtemp()
for defn in (defs.mamba2_like, defs.gla_like, defs.retention, defs.linear, defs.exp_decay_keys):
    prog = defn.program
    path = os.path.join(tmp, f"gen_{prog.name}.py")
    with open(path, "w") as f:
        f.write(ML.render(Plan(program=prog, lowering="quadratic", dtype="bfloat16")))
    spec = importlib.util.spec_from_file_location(f"gen_{prog.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    inputs = {arg_names(i)[0] for i in prog.inputs}   # each input's pointer parameter
    for name in ("ssmc_mixing_prep", "ssmc_mixing_grads"):
        fn = getattr(module, name)
        c = dict(BT=64, BN=64, DECAY=ML._decay_mode(prog))
        sig = {a: "constexpr" if a in c else "*bf16" if a in inputs else "*fp32"
               if a == "ssmc_ws" or re.fullmatch(r"ssmc_g[0-9]+", a) else "i32"
               for a in fn.arg_names}
        k = triton.compile(ASTSource(fn, sig, c), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=4))
        assert k.asm.get("cubin"), (name, prog.name)
print("compiled")
'''


def test_mixing_loss_kernels_compile_for_sm90(tmp_path):
    """Every kernel of the file, for each decay kind, and the generated ones of definitions of
    each decay kind, through Triton's real compiler (sm90 cubin) without a GPU: the
    interpreter above does not see GPU-only front-end errors."""
    compile_for_hopper(_AOT, tmp_path, timeout=600)
