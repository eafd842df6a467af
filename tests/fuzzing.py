"""Differential fuzzing of the backends: random *definitions* from the language's grammar,
random shapes, decay values and call features, run on every legal lowering a backend supports
and compared with the float64 sequential reference (tests/backends/*/test_fuzz.py use it).

A drawn `Spec` is plain data (so hypothesis shrinks and prints it): the decay structure (none,
per head "h", "h n", per step "b t h", per key "b t h n", full "b t h p n") and how it is
squashed, the direction, whether key/query are per group, extra inputs with random axes, and
expression trees (+ - * / exp log softplus sigmoid silu tanh sqrt abs maximum minimum clamp and
Python constants) that modify the key, value, query and decay and form the epilogue over y.
Operand values are kept finite by construction: log and sqrt take softplus(.) + 0.1, division
divides by 1 + |.|, exp takes tanh(.). Decays are drawn from the whole domain the language
accepts: positive ones through sigmoid(.) or exp(-softplus(.)), signed ones through tanh(.),
ones with exact zeros through maximum(tanh(.), 0); and a call may set some of the decay input's
values to the edges (`EDGE_VALUES`: -inf, -1e4, -200, -90 and +18, so decays of exactly 0,
underflowing ones, log-decays of -1e4 and -inf, and decays within 1e-8 of 1). Packed calls may
hold empty sequences. fp32 calls may also compare the gradients of every input and of the
initial state.

`--fuzz-count N` sets the examples of a backend's fuzz test (split over its shards);
`--hypothesis-seed S` fixes the draw. Each example checks its definition on one to three
shapes, since compiled modules are cached per structure and shapes are cheap.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st

import ssmc
from ssmc import dsl as S
from ssmc.backends import get_backend
from ssmc.ir import Y, print_program
from ssmc.passes import legal_lowerings
from ssmc.plan import Plan
from ssmc.reference import evaluate

#: each backend's fuzz test splits its examples over SHARDS tests (parallel workers share them)
SHARDS = 4
#: relative L2 bounds. Random expressions compose up to three nonlinear layers (each a few fp32
#: roundings, tanh as 2 sigmoid(2x) - 1) and the chunked/quadratic lowerings reassociate sums of
#: up to t terms, so fp32 gets 2e-5 rather than test_scan's 1e-5; bf16 rounds the output once.
FUZZ_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
#: values a call may put into the decay input (about a tenth of them): through the squashes
#: above they give decays of exactly 0 (-inf; -90 and below under maximum(tanh, 0) or in
#: fp32's sigmoid), log-decays of -1e4 and -200, and decays within 1e-8 of 1 (+18)
EDGE_VALUES = (float("-inf"), -1e4, -200.0, -90.0, 18.0)
SQUASHES = ("sigmoid", "exp_neg_softplus", "tanh", "relu_tanh")

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
        direction=draw(st.sampled_from(["forward", "reverse", "bidirectional"])),
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


# --------------------------------------------------------------------------- calls

@st.composite
def calls(draw, spec: Spec) -> dict:
    """Sizes and call features; b * h * t stays small (the interpreter runs the scan's programs
    one step at a time)."""
    t = draw(st.sampled_from([1, 2, 5, 16, 17, 33, 64, 65]))
    varlen = draw(st.booleans()) and t > 1
    b = 1 if varlen or t > 33 else draw(st.integers(1, 2))
    h = draw(st.sampled_from([1, 2, 3, 4] if t <= 17 else [1, 2]))
    g = h if spec.kq == "h" else draw(st.sampled_from([d for d in (1, 2, 3, 4) if h % d == 0]))
    lengths = None
    if varlen:
        cuts = sorted(draw(st.lists(st.integers(0, t), min_size=1, max_size=3)))
        lengths = [y - x for x, y in zip([0] + cuts, cuts + [t])]
    return dict(
        sizes=dict(b=b, t=t, h=h, g=g, n=draw(st.integers(1, 8)), p=draw(st.integers(1, 9))),
        lengths=lengths,
        h0=draw(st.booleans()),
        final=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32] * 3 + [torch.bfloat16])),
        seed=draw(st.integers(0, 2 ** 16)),
        edges=spec.decay is not None and draw(st.booleans()),
        # gradients build the backward kernels too: a quarter of the calls keeps the CI run short
        grad=draw(st.sampled_from([True, False, False, False])),
    )


def runnable_lowerings(backend: str, program, dtype, call) -> list[str]:
    """The legal lowerings `backend` runs for this call (the others refuse it by design)."""
    out = []
    for lowering in legal_lowerings(program):
        plan = Plan(program=program, lowering=lowering, dtype=str(dtype).split(".")[1],
                    has_initial_state=call["h0"], return_final_state=call["final"],
                    varlen=call["lengths"] is not None)
        if get_backend(backend).supports(plan) is None:
            out.append(lowering)
    return out


def call_inputs(defn, call, device) -> tuple[dict, dict]:
    """The call's inputs (the decay input with its edge values) and keyword arguments."""
    sizes, dtype = call["sizes"], call["dtype"]
    gen = torch.Generator().manual_seed(call["seed"])
    inputs = {inp.name: torch.randn(tuple(sizes[a] for a in inp.axes), generator=gen)
              for inp in defn.program.inputs}
    if call["edges"]:
        a = inputs["a"].view(-1)
        picked = torch.rand(a.shape, generator=gen) < 0.1
        which = torch.randint(len(EDGE_VALUES), a.shape, generator=gen)
        a[picked] = torch.tensor(EDGE_VALUES)[which][picked]
    inputs = {k: v.to(dtype=dtype, device=device) for k, v in inputs.items()}
    kwargs = dict(return_final_state=call["final"])
    num_states = sizes["b"]
    if call["lengths"] is not None:
        cu = torch.tensor([0, *torch.tensor(call["lengths"]).cumsum(0).tolist()],
                          dtype=torch.int32, device=device)
        kwargs["cu_seqlens"], num_states = cu, len(call["lengths"])
    if call["h0"]:
        shape = (num_states, sizes["h"], sizes["n"], sizes["p"])
        if len(defn.program.recurrence.directions) > 1:
            shape = (2,) + shape
        kwargs["initial_state"] = torch.randn(shape, generator=gen).to(device)
    return inputs, kwargs


def fuzz(pytestconfig, shard: int, backend: str, default_examples: int, check) -> dict:
    """Shard `shard` of a backend's fuzz test: `--fuzz-count` (default `default_examples`)
    examples in all, each shard drawing its own (with --hypothesis-seed S, shard k uses seed
    S * SHARDS + k); `check(defn, call, lowering)` compares one call. Returns what it ran."""
    total = pytestconfig.getoption("--fuzz-count") or default_examples
    examples = max(1, -(-total // SHARDS))
    checked = {"lowerings": set(), "calls": 0}
    base_seed = pytestconfig.getoption("hypothesis_seed", None)

    @settings(max_examples=examples, deadline=None, derandomize=False, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def run(data):
        spec = data.draw(specs(), label="spec")
        defn = build_definition(spec)
        note("IR of the failing definition:\n" + print_program(defn.program))
        for _ in range(data.draw(st.integers(1, 3), label="shapes")):
            call = data.draw(calls(spec), label="call")
            for lowering in runnable_lowerings(backend, defn.program, call["dtype"], call):
                check(defn, call, lowering)
                checked["lowerings"].add(lowering)
                checked["calls"] += 1

    if base_seed is not None:
        run = seed(int(base_seed) * SHARDS + shard)(run)
    run()
    return checked
