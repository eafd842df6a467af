"""Differential fuzzing of the backends: random *definitions* from the language's grammar, each
compiled once and checked on many random *cases* (value draws), on every legal lowering a
backend runs, against the float64 sequential reference (tests/backends/*/test_fuzz.py use it).

A drawn `Spec` is plain data (so hypothesis shrinks and prints it): the decay structure (none,
per head "h", "h n", per step "b t h", per key "b t h n", full "b t h p n") and how it is
squashed, the direction (cross2d on a random factorisation of t), whether key/query are per
group, extra inputs with random axes, and expression trees (+ - * / exp log softplus sigmoid
silu tanh sqrt abs maximum minimum clamp and Python constants) that modify the key, value,
query and decay and form the epilogue over y.
Operand values are kept finite by construction: log and sqrt take softplus(.) + 0.1, division
divides by 1 + |.|, exp takes tanh(.). Decays are drawn from the whole domain the language
accepts: positive ones through sigmoid(.) or exp(-softplus(.)), signed ones through tanh(.),
ones with exact zeros through maximum(tanh(.), 0).

A `Setup` (also drawn by hypothesis) fixes what changes the generated code or the kernel
specialisation: dtype, h g n p, initial state, final state, packed calls, and whether the
cases compare gradients (fp32 only). A `Case` is what kernels take at run time: b and t
(t = 0 and b = 0 included), the packed lengths (empty sequences included), the share of the
decay input set to the edges (`EDGE_VALUES`: -inf, -1e4, -200, -90 and +18, so decays of
exactly 0, underflowing ones, log-decays of -1e4 and -inf, and decays within 1e-8 of 1) and the
seed of every tensor. Cases come from a seeded `random.Random`, not from hypothesis: one drawn
definition is checked on `--fuzz-cases-per-definition` of them, reusing its compiled kernels
(kernel builds, not runs, are what a GPU and TVM's LLVM spend their time on), and a failure
prints the `Case`, which `case_inputs` turns back into the same tensors.

`--fuzz-count N` sets the cases of a backend's fuzz test, split over `--fuzz-shards` tests;
`--hypothesis-seed S` fixes the draw; `scripts/fuzz_campaign.sh` runs campaigns. A printed
failure replays without hypothesis: `defn = build_definition(Spec(...))`, `inputs, kwargs =
case_inputs(defn, Setup(...), Case(...), device)`, then `check_against_reference(defn, inputs,
tol=FUZZ_TOL[dtype], backend=..., lowering=..., **kwargs)`.
"""
from __future__ import annotations

import inspect
import json
import math
import random
import time
import zlib
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st

import ssmc
from ssmc import dsl as S
from ssmc.backends import get_backend
from ssmc.errors import UnsupportedError
from ssmc.ir import Y, print_program
from ssmc.plan import Plan
from ssmc.reference.evaluate import evaluate
from ssmc.validate import bind
from tests.helpers import term_magnitude

#: each backend's fuzz test splits its cases over this many tests by default (`--fuzz-shards`)
SHARDS = 4
#: relative L2 bounds. Random expressions compose up to three nonlinear layers (each a few fp32
#: roundings, tanh as 2 sigmoid(2x) - 1) and the chunked/quadratic lowerings reassociate sums of
#: up to t terms, so fp32 gets 2e-5 rather than test_scan's 1e-5; bf16 rounds the output once.
FUZZ_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
#: how far (a fraction of its terms' size) a kernel's fp32 y may be off where it feeds an
#: epilogue's slope (`tests.helpers.epilogue_slack`): about 32 roundings
EPILOGUE_EPS = 4e-6
#: values a case may put into the decay input (a share `Case.edges` of them): through the
#: squashes above they give decays of exactly 0 (-inf; -90 and below under maximum(tanh, 0) or
#: in fp32's sigmoid), log-decays of -1e4 and -200, and decays within 1e-8 of 1 (+18)
EDGE_VALUES = (float("-inf"), -1e4, -200.0, -90.0, 18.0)
#: the shares of decay values a case with edges sets to them (1.0: every one)
EDGE_SHARES = (0.1, 0.1, 0.5, 1.0)
SQUASHES = ("sigmoid", "exp_neg_softplus", "tanh", "relu_tanh")
LOWERINGS = ("scan", "chunked", "quadratic")
#: sequence lengths; b * h * t stays small (the interpreter runs the scan's programs one step
#: at a time): h > 2 only with the short ones, b > 1 only up to 33
T_SHORT = (1, 2, 5, 16, 17)
T_ALL = T_SHORT + (33, 64, 65)
#: long sequences (many chunks), drawn only where kernels run on a GPU (`draw_cases(long=True)`);
#: 256, four 64-step row blocks: opposite orders paired block by mirror block (chunked_pairs.py)
T_LONG = (255, 256, 1000)
LONG_SHARE = 0.1
#: the share of cases with t = 0, and of unpacked ones with b = 0
EMPTY_SHARE = 0.03
#: the seed of a run without --hypothesis-seed (the CI suite's)
DEFAULT_SEED = 0

DECAYS = (None, "h", "h n", "b t h", "b t h n", "b t h p n")
EXTRA_AXES = ("h", "p", "n", "b t", "b t h", "h p", "h n", "b t h p", "b t h n", "b t g n",
              "b t g")
UNARY = ("neg", "exp", "log", "softplus", "sigmoid", "silu", "tanh", "sqrt", "abs", "clamp")
BINARY = ("add", "sub", "mul", "div", "maximum", "minimum")
CONSTANTS = st.sampled_from([-2.0, -1.5, -0.5, 0.25, 0.5, 1.0, 2.0, 3.0])


# --------------------------------------------------------------------------- specs

@dataclass(frozen=True)
class Spec:
    decay: str | None            # the decay input's axes, or no decay
    squash: str                  # one of SQUASHES
    direction: str
    kq: str                      # "g" (key/query per group) or "h"
    extras: tuple                # ((name, axes), ...)
    decay_mod: tuple | None      # expression trees (nested tuples), or None
    key_mod: tuple | None
    value_mod: tuple | None
    query_mod: tuple | None
    epilogue: tuple | None       # may use "y"

    @property
    def inputs(self) -> dict[str, str]:
        axes = {"q": f"b t {self.kq} n", "k": f"b t {self.kq} n", "v": "b t h p"}
        if self.decay is not None:
            axes["a"] = self.decay
        axes.update(dict(self.extras))
        return axes


def _canon(axes: str) -> set[str]:
    s = set(axes.split())
    if "g" in s:
        s = (s - {"g"}) | {"h"}
    return s


def _leaves_within(spec_inputs: dict, allowed: set[str], extra_names) -> list[str]:
    return [n for n in extra_names if _canon(spec_inputs[n]) <= allowed]


def trees(leaves: list[str], max_leaves: int = 4):
    leaf = st.sampled_from(leaves).map(lambda n: ("in", n)) if leaves else st.nothing()
    base = st.one_of(leaf, CONSTANTS.map(lambda c: ("c", c))) if leaves else \
        CONSTANTS.map(lambda c: ("c", c))

    def extend(children):
        unary = st.tuples(st.sampled_from(UNARY), children)
        binary = st.tuples(st.sampled_from(BINARY), children, children)
        return st.one_of(unary, binary)
    return st.recursive(base, extend, max_leaves=max_leaves)


@st.composite
def specs(draw) -> Spec:
    decay = draw(st.sampled_from(DECAYS))
    kq = draw(st.sampled_from(["g", "h"]))
    n_extra = draw(st.integers(0, 3))
    extras = tuple((f"e{i}", draw(st.sampled_from(EXTRA_AXES))) for i in range(n_extra))
    if kq == "h":  # an input over g needs key/query's g to be meaningful; keep h-only
        extras = tuple((n, a.replace("g", "h")) for n, a in extras)
    names = [n for n, _ in extras]
    axes = dict(extras)

    def maybe_tree(allowed, also=()):
        leaves = _leaves_within(axes, allowed, names) + list(also)
        return draw(st.one_of(st.none(), trees(leaves)))

    return Spec(
        decay=decay,
        squash=draw(st.sampled_from(SQUASHES)),
        direction=draw(st.sampled_from(["forward", "reverse", "bidirectional", "cross2d"])),
        kq=kq, extras=extras,
        decay_mod=None if decay is None else maybe_tree(_canon(decay)),
        key_mod=maybe_tree(set("bthn")),
        value_mod=maybe_tree(set("bthp")),
        query_mod=maybe_tree(set("bthn")),
        epilogue=maybe_tree(set("bthp"), also=["y"]),
    )


# --------------------------------------------------------------------------- specs -> DSL

def _fold(x):
    """A constant-valued expression as a Python float. sympy cannot order an unevaluated
    constant such as softplus(-2.0) against a number, so S.maximum/minimum/clamp of constants
    raises; their constant operands are folded first (through the reference evaluator)."""
    if isinstance(x, S.Expr) and not x.sym.free_symbols:
        return float(evaluate(x.sym, {}, torch.zeros((), dtype=torch.float64)))
    return x


def _expr(tree, env):
    kind = tree[0]
    if kind == "in":
        return env[tree[1]]
    if kind == "c":
        return tree[1]
    if kind in UNARY:
        x = _expr(tree[1], env)
        return {
            "neg": lambda: -x,
            "exp": lambda: S.exp(S.tanh(x)),
            "log": lambda: S.log(S.softplus(x) + 0.1),
            "softplus": lambda: S.softplus(x),
            "sigmoid": lambda: S.sigmoid(x),
            "silu": lambda: S.silu(x),
            "tanh": lambda: S.tanh(x),
            "sqrt": lambda: S.sqrt(S.softplus(x) + 0.1),
            "abs": lambda: S.abs(x),
            "clamp": lambda: S.clamp(_fold(x), -1.5, 2.0),
        }[kind]()
    a, b = _expr(tree[1], env), _expr(tree[2], env)
    return {
        "add": lambda: a + b,
        "sub": lambda: a - b,
        "mul": lambda: a * b,
        "div": lambda: a / (1 + S.abs(b)),
        "maximum": lambda: S.maximum(_fold(a), _fold(b)),
        "minimum": lambda: S.minimum(_fold(a), _fold(b)),
    }[kind]()


def uses_input(tree, name) -> bool:
    if tree is None:
        return False
    if tree[0] == "in":
        return tree[1] == name
    return any(isinstance(c, tuple) and uses_input(c, name) for c in tree[1:])


def _scaled(operand, mod):
    """operand * mod, or operand + mod where mod is identically 0 (a tree such as c - c),
    since the product would lose the operand's axes."""
    product = operand * mod
    if isinstance(product, S.Expr) and product.sym.free_symbols:
        return product
    return operand + mod


def build_definition(spec: Spec):
    axes = spec.inputs

    def body(*args):
        env = dict(zip(axes, args))
        key, value, query = env["k"], env["v"], env["q"]
        if spec.key_mod is not None:
            key = _scaled(key, _expr(spec.key_mod, env))
        if spec.value_mod is not None:
            value = value + _expr(spec.value_mod, env)
        if spec.query_mod is not None:
            query = _scaled(query, S.tanh(_expr(spec.query_mod, env)))
        decay = None
        if spec.decay is not None:
            # a ~ N(0, 1) mostly; a call's edge values (EDGE_VALUES) reach the rest
            arg = env["a"] + 1.5
            if spec.decay_mod is not None:
                arg = arg + S.tanh(_expr(spec.decay_mod, env))
            # sigmoid(x) and exp(-softplus(-x)) are equal, but render (and log) differently;
            # tanh may be negative, and maximum(tanh, 0) exactly 0
            decay = {"sigmoid": lambda: S.sigmoid(arg),
                     "exp_neg_softplus": lambda: S.exp(-S.softplus(-arg)),
                     "tanh": lambda: S.tanh(arg),
                     "relu_tanh": lambda: S.maximum(S.tanh(arg), 0.0)}[spec.squash]()
        y = S.recurrence(decay=decay, key=key, value=value, query=query,
                         direction=spec.direction)
        if spec.epilogue is None:
            return y
        out = _expr(spec.epilogue, {**env, "y": y})
        # an epilogue may cancel y (y - y); the output must depend on the recurrence
        uses_y = isinstance(out, S.Expr) and Y in out.sym.free_symbols
        return out if uses_y else y + out
    body.__signature__ = inspect.Signature([
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=S.In[a])
        for n, a in axes.items()])
    return ssmc.ssm(body, name="fuzz")


# --------------------------------------------------------------------------- setups and cases

@dataclass(frozen=True)
class Setup:
    """What a definition's kernels are built for, fixed over its cases: the call features
    that change the generated code, the sizes a kernel is specialised to, and whether the
    cases compare gradients (the backward kernels are built then too)."""
    h: int
    g: int
    n: int
    p: int
    dtype: torch.dtype
    h0: bool                     # an initial state is passed
    final: bool                  # the final state is returned
    varlen: bool                 # packed sequences (cu_seqlens)
    grad: bool                   # fp32 only


@st.composite
def setups(draw, spec: Spec) -> Setup:
    # one in ten: a state of n = 16 by p >= 16, which the scan runs a step at a time
    # (`scan_launch.scan_blocks`); smaller ones run in blocks of steps
    wide = draw(st.sampled_from([False] * 9 + [True]))
    h = draw(st.sampled_from([1, 2] if wide else [1, 2, 1, 2, 3, 4]))  # h > 2: t <= T_SHORT
    g = h if spec.kq == "h" else draw(st.sampled_from([d for d in (1, 2, 3, 4) if h % d == 0]))
    dtype = draw(st.sampled_from([torch.float32] * 3 + [torch.bfloat16]))
    line = spec.direction != "cross2d"     # a grid takes no states and no packed sequences
    return Setup(
        h=h, g=g, n=16 if wide else draw(st.integers(1, 8)),
        p=draw(st.integers(16, 18) if wide else st.integers(1, 9)), dtype=dtype,
        h0=line and draw(st.booleans()), final=line and draw(st.booleans()),
        varlen=line and draw(st.booleans()),
        # a quarter: the gradient cases also run the reference's autograd
        grad=dtype == torch.float32 and draw(st.sampled_from([True, False, False, False])))


@dataclass(frozen=True)
class Case:
    """One value draw for a setup: what kernels take at run time. `case_inputs` builds its
    tensors, each from its own seed (derived from `seed` and the tensor's name)."""
    b: int
    t: int
    lengths: tuple | None        # packed sequence lengths (may be 0), summing to t
    edges: float                 # share of the decay input set to EDGE_VALUES
    seed: int
    grid: tuple | None = None    # cross2d: (H, W) with H * W = t


def _lengths(rng: random.Random, t: int) -> tuple:
    """Zero to three cuts of [0, t]; a third of them at an end, so empty sequences (at the
    start, at the end, or repeated cuts in between) are common."""
    cuts = sorted(rng.choice((0, t)) if rng.random() < 0.3 else rng.randint(0, t)
                  for _ in range(rng.randint(0, 3)))
    return tuple(y - x for x, y in zip([0, *cuts], [*cuts, t]))


def draw_case(rng: random.Random, spec: Spec, setup: Setup, long: bool = False) -> Case:
    if rng.random() < EMPTY_SHARE:
        t = 0
    elif long and setup.h <= 2 and rng.random() < LONG_SHARE:
        t = rng.choice(T_LONG)
    else:
        t = rng.choice(T_ALL if setup.h <= 2 else T_SHORT)
    if setup.varlen:
        b, lengths = 1, _lengths(rng, t)
    else:
        b = 0 if rng.random() < EMPTY_SHARE else 1 if t > 33 else rng.randint(1, 2)
        lengths = None
    edges = 0.0
    if spec.decay is not None and rng.random() < 0.5:
        edges = rng.choice(EDGE_SHARES)
    grid = None
    if spec.direction == "cross2d":   # an image has a position; any factorisation of t
        t = max(t, 1)
        rows = rng.choice([d for d in range(1, t + 1) if t % d == 0])
        grid = (rows, t // rows)
    return Case(b=b, t=t, lengths=lengths, edges=edges, seed=rng.getrandbits(63), grid=grid)


def draw_cases(spec: Spec, setup: Setup, values_seed: int, count: int,
               long: bool = False) -> list[Case]:
    """`count` cases from `values_seed`; with `long`, some have a thousand steps (GPU runs)."""
    rng = random.Random(values_seed)
    return [draw_case(rng, spec, setup, long) for _ in range(count)]


def _generator(case: Case, name: str) -> torch.Generator:
    """A generator per tensor, so a definition that shrinks (loses an input) keeps the values
    of the others."""
    return torch.Generator().manual_seed((case.seed ^ zlib.crc32(name.encode())) % 2 ** 63)


def case_inputs(defn, setup: Setup, case: Case, device) -> tuple[dict, dict]:
    """The case's inputs (the decay input with its edge values) and keyword arguments."""
    sizes = dict(b=case.b, t=case.t, h=setup.h, g=setup.g, n=setup.n, p=setup.p)
    inputs = {}
    for inp in defn.program.inputs:
        gen = _generator(case, inp.name)
        x = torch.randn(tuple(sizes[a] for a in inp.axes), generator=gen)
        if inp.name == "a" and case.edges:
            flat = x.view(-1)
            picked = torch.rand(flat.shape, generator=gen) < case.edges
            which = torch.randint(len(EDGE_VALUES), flat.shape, generator=gen)
            flat[picked] = torch.tensor(EDGE_VALUES)[which][picked]
        inputs[inp.name] = x.to(dtype=setup.dtype, device=device)
    kwargs = dict(return_final_state=setup.final)
    if case.grid is not None:
        kwargs["grid"] = case.grid
    num_states = case.b
    if setup.varlen:
        cu = [0, *torch.tensor(case.lengths, dtype=torch.int64).cumsum(0).tolist()]
        kwargs["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32, device=device)
        num_states = len(case.lengths)
    if setup.h0:
        shape = (num_states, setup.h, setup.n, setup.p)
        if len(defn.program.recurrence.directions) > 1:
            shape = (2,) + shape
        kwargs["initial_state"] = torch.randn(shape, generator=_generator(case, "h0")).to(device)
    return inputs, kwargs


def output_scale(defn, inputs: dict, kwargs: dict) -> dict:
    """{"y": `term_magnitude`}: what an output's error is measured against. A kernel's y is off
    by a rounding of its terms' size; an epilogue with a steep slope where y is small (e0 /
    (|y| + 1)) carries that into an output whose own scale is far smaller (the Triton scan
    and chunked lowerings, fp32, 1e-6 relative to y: 2.3e-5 relative to the output)."""
    bound = bind(defn.program, (), {**inputs, **kwargs})
    return {"y": term_magnitude(defn.program, bound.tensors, bound.sizes,
                                kwargs.get("initial_state"), kwargs.get("cu_seqlens"))}


def compares_gradients(setup: Setup, case: Case, backend: str, lowering: str) -> bool:
    """Whether the case compares gradients: the setup's choice, where some output depends on
    an input (at t = 0 only a returned initial state does)."""
    return setup.grad and (case.t > 0 or (setup.h0 and setup.final))


def runnable_lowerings(backend: str, defn, setup: Setup) -> list[str]:
    """The legal lowerings `backend` runs for this setup (the others refuse it by design)."""
    out = []
    for lowering in LOWERINGS:
        try:
            ssmc.compile(defn, backend=backend, lowering=lowering)
        except UnsupportedError:    # not legal for the decay kind
            continue
        dtype = str(setup.dtype).split(".")[1]
        plan = Plan(program=defn.program, lowering=lowering, dtype=dtype,
                    has_initial_state=setup.h0, return_final_state=setup.final,
                    varlen=setup.varlen)
        if get_backend(backend).supports(plan) is None:
            out.append(lowering)
    return out


# --------------------------------------------------------------------------- the driver

def shard_cases(total: int, shards: int, shard: int) -> int:
    """Shard `shard`'s share of `total` cases (the first ones take the remainder)."""
    return total // shards + (shard < total % shards)


def fuzz_shards(config) -> int:
    return config.getoption("--fuzz-shards") or SHARDS


def parametrize_shards(metafunc):
    """A test module's `pytest_generate_tests`: one test per shard."""
    if "shard" in metafunc.fixturenames:
        metafunc.parametrize("shard", range(fuzz_shards(metafunc.config)))


def fuzz(pytestconfig, shard: int, backend: str, check, *, default_cases: int,
         per_definition: int, long: bool = False) -> dict:
    """Shard `shard` of a backend's fuzz test: its share of `--fuzz-count` cases (default
    `default_cases`), `--fuzz-cases-per-definition` (default `per_definition`) to each drawn
    definition and setup; `check(defn, setup, case, lowering)` compares one case on one
    lowering. With --hypothesis-seed S, shard k draws from seed S * 1000003 + k; without,
    from DEFAULT_SEED's (a run of the suite checks the same cases every time: a failure there
    reproduces; campaigns pass their seeds).
    `--fuzz-stop-at` (seconds since the epoch) stops drawing new definitions; `--fuzz-report`
    gets a JSON line of what the shard ran. Returns that record."""
    opt = pytestconfig.getoption
    mine = shard_cases(opt("--fuzz-count") or default_cases, fuzz_shards(pytestconfig), shard)
    definitions = max(1, math.ceil(mine / (opt("--fuzz-cases-per-definition") or per_definition)))
    per_def = max(1, math.ceil(mine / definitions))   # the shard's share, give or take one each
    stop_at = opt("--fuzz-stop-at")
    base_seed = opt("hypothesis_seed", None)
    record = {"backend": backend, "shard": shard, "seed": base_seed, "definitions": 0,
              "cases": 0, "checks": 0, "lowerings": [], "failed": False, "stopped": False}
    lowerings = set()

    @settings(max_examples=definitions, deadline=None,
              derandomize=False, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def run(data):
        spec = data.draw(specs(), label="spec")
        setup = data.draw(setups(spec), label="setup")
        values = data.draw(st.integers(0, 2 ** 32 - 1), label="values seed")
        if stop_at and time.time() > stop_at and not record["failed"]:
            record["stopped"] = True
            return
        defn = build_definition(spec)
        note("IR of the failing definition:\n" + print_program(defn.program))
        runnable = runnable_lowerings(backend, defn, setup)
        record["definitions"] += 1
        for i, case in enumerate(draw_cases(spec, setup, values, per_def, long)):
            for lowering in runnable:
                try:
                    check(defn, setup, case, lowering)
                except Exception:
                    record["failed"] = True
                    note(f"failing case {i}: {case!r} on {backend}-{lowering}")
                    raise
                record["checks"] += 1
                lowerings.add(lowering)
            record["cases"] += 1

    run = seed(int(DEFAULT_SEED if base_seed is None else base_seed) * 1000003 + shard)(run)
    try:
        run()
    finally:
        record["lowerings"] = sorted(lowerings)
        report = opt("--fuzz-report")
        if report:
            with open(report, "a") as f:   # one short line per shard: appends stay whole
                f.write(json.dumps(record) + "\n")
    return record
