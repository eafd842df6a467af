"""Context parallelism (`ssmc.distributed`) on the CPU with gloo.

Four spawned processes form two groups of two and then one group of four; each group runs one
sequence cut into random shards (empty ones included), and each rank compares its shard of the
output, the final state and every gradient with the same compiled op (TVM on LLVM, float64) run
on the whole sequence in one process. The cases cover every decay kind, with decays that are
zero or negative, each direction, with and without `initial_state` and `return_final_state`.
The fold of the shards' states is checked against autograd alone, and a group of one and the
argument checks run in this process.
"""
import datetime
import json
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ssmc
import ssmc.ops
from ssmc import dsl as S
from ssmc.distributed.combine import fold, fold_backward
from tests.helpers import compare, make_definition, random_inputs, random_state, ssd_inputs

SIZES = dict(b=2, h=4, g=2, n=3, p=2)
TOL = 1e-9  # float64 on both sides: only the order of the sums differs
TIMEOUT = datetime.timedelta(seconds=120)  # a collective that hangs fails the test instead


def _signed(decay_axes: str, direction: str):
    """decay = `a` itself, an input that may be any real number (0 resets, < 0 flips)."""
    def signed(q: S.In["b t g n"], k: S.In["b t g n"], v: S.In["b t h p"],
               a: S.In[decay_axes]):
        return S.recurrence(decay=a, key=k, value=v, query=q, direction=direction)
    return ssmc.ssm(signed, name=f"signed_{decay_axes.replace(' ', '')}_{direction}")


def _signed_inputs(definition, t, seed):
    """Standard normal inputs; the decay scaled into (-1.2, 1.2) with about one in five
    entries exactly 0 (one head's decay is 0 when it has no `t`)."""
    xs = random_inputs(definition, dict(SIZES, t=t), dtype=torch.float64, seed=seed)
    if "a" in xs:
        gen = torch.Generator().manual_seed(seed + 1)
        a = torch.tanh(xs["a"]) * 1.2
        xs["a"] = torch.where(torch.rand(a.shape, generator=gen) < 0.2, 0.0, a)
        if xs["a"].dim() == 1:
            xs["a"] = torch.tensor([0.0, -0.7, 0.9, -1.1], dtype=torch.float64)
    return xs


@dataclass(frozen=True)
class Case:
    name: str
    decay: str | None     # the decay's axes ("b t h" ...), None: no decay, "ssd": Mamba-2
    direction: str
    initial_state: bool
    final_state: bool
    four: bool = False    # also on a group of four ranks (all cases run on groups of two)
    dtype: torch.dtype = torch.float64
    backend: str = "tvm"  # triton: the chunked lowering, whose shards' first runs are its
    #                       state pass alone (`CompiledOp.final_state`)

    @property
    def lowering(self) -> str:
        """The scan for the signed decays (what `auto` mostly picks for them on TVM; planning
        costs CPU time in every process), the cost model's choice for Mamba-2; Triton's
        chunked lowering."""
        if self.backend == "triton":
            return "chunked"
        return "auto" if self.decay == "ssd" else "scan"

    def definition(self):
        if self.decay == "ssd":
            return ssmc.ops.mamba2
        if self.decay is None:
            return make_definition("none", self.direction)
        return _signed(self.decay, self.direction)

    def inputs(self, definition, t, seed):
        if self.decay == "ssd":  # positive decays exp(softplus(dt) A), an epilogue, D and A
            xs = ssd_inputs(SIZES["b"], t, SIZES["h"], SIZES["g"], SIZES["n"], SIZES["p"],
                            dt_bias=False, dtype=torch.float64, seed=seed)
        else:
            xs = _signed_inputs(definition, t, seed)
        return {k: v.to(self.dtype) for k, v in xs.items()}


#: every decay kind and direction; initial and final states in turn
CASES = [
    Case("none-fwd", None, "forward", True, True),
    Case("per_head-fwd", "h", "forward", False, True, four=True),
    Case("per_step-fwd", "b t h", "forward", True, False, four=True),
    Case("per_key-fwd", "b t h n", "forward", False, False),
    Case("full-fwd", "b t h n p", "forward", True, True, four=True),
    Case("none-rev", None, "reverse", False, True, four=True),
    Case("per_step-rev", "b t h", "reverse", True, True),
    Case("per_key-rev", "b t h n", "reverse", True, False, four=True),
    Case("per_head-bi", "h", "bidirectional", False, False),
    Case("per_step-bi", "b t h", "bidirectional", True, True, four=True),
    Case("ssd-fwd", "ssd", "forward", True, True, four=True),
    Case("ssd-fwd-fp32", "ssd", "forward", True, True, dtype=torch.float32),
    Case("ssd-fwd-triton", "ssd", "forward", True, True, four=True, backend="triton"),
    Case("per_step-rev-triton", "b t h", "reverse", False, True, backend="triton"),
]


def _lengths(world: int, seed: int) -> list[int]:
    """Random shard lengths of 1..8 tokens; with every third seed one of them is empty."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (world,), generator=gen).tolist()
    if seed % 3 == 0:
        lengths[seed % world] = 0
    return lengths


def _t_slice(x: torch.Tensor, axes, start: int, stop: int) -> torch.Tensor:
    return x.narrow(axes.index("t"), start, stop - start) if "t" in axes else x


def _check_case(case: Case, seed: int, group) -> list[str]:
    """Run one case on this rank of `group`; return its comparisons as lines (ok or FAIL)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    definition = case.definition()
    op = ssmc.compile(definition, backend=case.backend, lowering=case.lowering)
    lengths = _lengths(world, seed)
    start, stop = sum(lengths[:rank]), sum(lengths[:rank + 1])
    full = case.inputs(definition, sum(lengths), seed)
    directions = 2 if case.direction == "bidirectional" else 1
    state = (SIZES["b"], SIZES["h"], SIZES["n"], SIZES["p"])
    h0 = (random_state(*state, directions=directions, dtype=case.dtype, seed=seed + 2)
          if case.initial_state else None)
    gen = torch.Generator().manual_seed(seed + 3)
    w_y = torch.randn(SIZES["b"], sum(lengths), SIZES["h"], SIZES["p"], generator=gen,
                      dtype=torch.float64)
    w_final = torch.randn(world, *((directions,) * (directions > 1)), *state, generator=gen,
                          dtype=torch.float64)

    # the whole sequence in one process; every rank's loss weights the final state its own way
    ref_leaves = {k: v.clone().requires_grad_(True) for k, v in full.items()}
    ref_h0 = None if h0 is None else h0.clone().requires_grad_(True)
    out = op(**ref_leaves, initial_state=ref_h0, return_final_state=case.final_state)
    y_ref, final_ref = out if case.final_state else (out, None)
    loss = (y_ref.double() * w_y).sum()
    if case.final_state:
        loss = loss + (final_ref.double() * w_final.sum(0)).sum()
    ref_wrt = list(ref_leaves.values()) + ([ref_h0] if ref_h0 is not None else [])
    grads_ref = torch.autograd.grad(loss, ref_wrt, allow_unused=True)

    axes = {i.name: i.axes for i in definition.program.inputs}
    shard = {k: _t_slice(v, axes[k], start, stop).clone().requires_grad_(True)
             for k, v in full.items()}
    # read on rank 0 only: elsewhere a tensor of the wrong shape shows it is ignored
    my_h0 = torch.full((1,), float("nan"))
    if rank == 0 and h0 is not None:
        my_h0 = h0.clone().requires_grad_(True)
    elif rank == 0:
        my_h0 = None
    cp = ssmc.distributed.context_parallel(op, group)
    out = cp(**shard, initial_state=my_h0, return_final_state=case.final_state)
    y, final = out if case.final_state else (out, None)
    loss = (y.double() * w_y[:, start:stop]).sum()
    if case.final_state:
        loss = loss + (final.double() * w_final[rank]).sum()
    wrt = list(shard.values()) + ([my_h0] if rank == 0 and h0 is not None else [])
    grads = list(torch.autograd.grad(loss, wrt, allow_unused=True))

    tol = TOL if case.dtype == torch.float64 else 1e-4
    report = [compare("y", y, y_ref[:, start:stop], tol)]
    if case.final_state:
        report.append(compare("final_state", final, final_ref, tol))
    for i, (name, g, g_ref) in enumerate(zip(list(shard) + ["initial_state"], grads,
                                              grads_ref)):
        g = torch.zeros_like(wrt[i]) if g is None else g
        g_ref = torch.zeros_like(ref_wrt[i]) if g_ref is None else g_ref
        if name in axes and "t" not in axes[name]:  # each rank has its shard's share of it
            dist.all_reduce(g, group=group)
        else:
            g_ref = _t_slice(g_ref, axes.get(name, ()), start, stop)
        report.append(compare(f"grad {name}", g, g_ref, tol))
    return [f"{case.name} seed={seed} lengths={lengths} rank={rank}/{world}: {m}"
            for m in report]


def _check_disagreements(group) -> list[str]:
    """Ranks that disagree on return_final_state or on needing gradients fail alike, naming
    the ranks, instead of leaving one of them waiting in a collective."""
    rank = dist.get_rank(group)
    definition = _signed("b t h", "forward")
    cp = ssmc.distributed.context_parallel(ssmc.compile(definition, backend="tvm"), group)
    xs = _signed_inputs(definition, 3, seed=rank)
    lines = []
    with pytest.raises(ssmc.ArgumentError,
                       match=r"ranks \[0\] pass return_final_state=True but ranks \[1\]"):
        cp(**xs, return_final_state=rank == 0)
    lines.append(f"return_final_state disagreement rank={rank}: ok   raised")
    xs = {k: v.requires_grad_(rank == 0) for k, v in xs.items()}
    with pytest.raises(ssmc.UnsupportedError, match=r"ranks \[0\] need gradients"):
        cp(**xs)
    lines.append(f"gradient disagreement rank={rank}: ok   raised")
    return lines


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    """Two groups of two ranks ([0, 1] and [2, 3], so group ranks differ from global ones) run
    every case side by side on different shard lengths, then all four ranks do."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=TIMEOUT)
    try:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        pair = pairs[rank // 2]
        lines = []
        for i, case in enumerate(CASES):
            lines += _check_case(case, seed=200 + 20 * (rank // 2) + i, group=pair)
        for i, case in enumerate(CASES):
            if case.four:
                lines += _check_case(case, seed=400 + i, group=None)
        lines += _check_disagreements(pair)
    finally:
        dist.destroy_process_group()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(lines, f)


def test_context_parallel_matches_single_process(tmp_path):
    world = 4
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world)
    lines = [line for r in range(world)
             for line in json.loads((tmp_path / f"rank{r}.json").read_text())]
    bad = [line for line in lines if ": FAIL" in line]
    assert not bad, "context_parallel disagrees with the single-process op:\n" + "\n".join(bad)
    # every rank compared every case's output in its group of two, and in the group of four
    assert sum("/2: ok   y:" in line for line in lines) == world * len(CASES)
    assert sum("/4: ok   y:" in line for line in lines) == world * sum(c.four for c in CASES)


def test_fold_backward_is_the_gradient_of_fold():
    """The hand-written reverse fold against autograd through the forward fold, with a zero
    and a negative decay, a shard without a decay and an entering state."""
    gen = torch.Generator().manual_seed(0)
    shape = (2, 3, 4, 5)
    S_ = [torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
          for _ in range(4)]
    A = [torch.tensor([[[[0.0]]], [[[-0.5]]]], dtype=torch.float64).expand(2, 1, 1, 1).clone(),
         torch.randn(1, 3, 4, 1, generator=gen, dtype=torch.float64), None,
         torch.randn(1, 3, 1, 1, generator=gen, dtype=torch.float64)]
    A = [None if a is None else a.requires_grad_(True) for a in A]
    H = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    states, final = fold(S_, A, H)
    g_states = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(4)]
    g_final = torch.randn(shape, generator=gen, dtype=torch.float64)
    loss = sum((s * g).sum() for s, g in zip(states, g_states)) + (final * g_final).sum()
    leaves = S_ + [a for a in A if a is not None] + [H]
    expected = torch.autograd.grad(loss, leaves)
    g_S, g_A, g_H = fold_backward(A, [s.detach() for s in states], g_states, g_final)
    actual = g_S + [g for g in g_A if g is not None] + [g_H]
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.fixture
def group_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1, timeout=TIMEOUT)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("t", [0, 9])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_group_of_one_is_the_op(group_of_one, monkeypatch, direction, t):
    """A group of one runs the op alone: no collective and no state fold around its call;
    output, final state and every gradient are the op's."""
    from ssmc.distributed import exchange

    def no_exchange(*args):
        raise AssertionError("a group of one exchanged states")
    monkeypatch.setattr(exchange.StateExchange, "apply", no_exchange)
    definition = _signed("b t h n", direction)
    op = ssmc.compile(definition, backend="tvm")
    xs = {k: v.requires_grad_(True) for k, v in _signed_inputs(definition, t, seed=5).items()}
    h0 = random_state(2, 4, 3, 2, directions=1 + (direction != "forward"),
                      dtype=torch.float64, seed=6).requires_grad_(True)
    y, final = ssmc.distributed.context_parallel(op)(**xs, initial_state=h0,
                                                     return_final_state=True)
    y_ref, final_ref = op(**xs, initial_state=h0, return_final_state=True)
    assert compare("y", y, y_ref, TOL).ok
    assert compare("final_state", final, final_ref, TOL).ok
    leaves = list(xs.values()) + [h0]
    gen = torch.Generator().manual_seed(9)
    gy = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    gf = torch.randn(final.shape, generator=gen, dtype=final.dtype)
    grads = torch.autograd.grad((y * gy).sum() + (final * gf).sum(), leaves, allow_unused=True)
    refs = torch.autograd.grad((y_ref * gy).sum() + (final_ref * gf).sum(), leaves,
                               allow_unused=True)
    for name, g, r in zip(list(xs) + ["initial_state"], grads, refs):
        assert (g is None) == (r is None), name
        if g is not None:
            assert compare(name, g, r, TOL).ok


def test_bad_calls_raise_before_running(group_of_one):
    definition = _signed("b t h", "forward")
    cp = ssmc.distributed.context_parallel(definition)
    xs = _signed_inputs(definition, 4, seed=0)
    with pytest.raises(ssmc.UnsupportedError, match="cu_seqlens"):
        cp(**xs, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ssmc.ShapeError, match="'k' has n=2 but 'q' has n=3"):
        cp(**{**xs, "k": xs["k"][..., :2]})
    with pytest.raises(ssmc.ShapeError, match="'initial_state' has shape"):
        cp(**xs, initial_state=torch.zeros(1, 4, 3, 2))
    with pytest.raises(ssmc.ArgumentError, match="got function"):
        ssmc.distributed.context_parallel(lambda x: x)


def test_needs_an_initialised_group():
    cp = ssmc.distributed.context_parallel(_signed("b t h", "forward"))
    with pytest.raises(ssmc.ConfigError, match="init_process_group"):
        cp(**_signed_inputs(cp.op.definition, 4, seed=0))
