"""The fuzz grammar and its cases (tests/fuzzing.py) reach what they say they do."""
from __future__ import annotations

import dataclasses
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzzing import (BINARY, DECAYS, EDGE_SHARES, EDGE_VALUES, SQUASHES, T_ALL, T_LONG,
                           T_SHORT, UNARY, Setup, Spec, build_definition, case_inputs,
                           draw_cases, setups, shard_cases, specs, uses_input)

#: derandomized: the claims are about the generators, not about one lucky --hypothesis-seed
DERANDOMIZED = settings(max_examples=300, deadline=None, database=None, derandomize=True,
                        suppress_health_check=list(HealthCheck))
SPEC = Spec(decay="b t h n", squash="sigmoid", direction="bidirectional", kq="g",
            extras=(("e0", "b t h n"),), decay_mod=None, key_mod=None, value_mod=None,
            query_mod=("in", "e0"), epilogue=None)
SETUP = Setup(h=2, g=1, n=3, p=2, dtype=torch.float32, h0=True, final=True, varlen=False,
              grad=False)


def test_fuzz_definitions_cover_the_grammar():
    """The generator reaches every decay structure, direction, operator and role, so the fuzz
    test is not silently narrower than it says."""
    seen = set()

    def walk(tree):
        if tree is None or tree[0] in ("in", "c"):
            return
        seen.add(tree[0])
        for c in tree[1:]:
            if isinstance(c, tuple):
                walk(c)

    @DERANDOMIZED
    @given(specs())
    def collect(spec):
        seen.add(("decay", spec.decay))
        seen.add(("direction", spec.direction))
        seen.add(("squash", spec.squash if spec.decay is not None else None))
        for tree in (spec.decay_mod, spec.key_mod, spec.value_mod, spec.query_mod,
                     spec.epilogue):
            walk(tree)
        if uses_input(spec.epilogue, "y"):
            seen.add("epilogue uses y")
        build_definition(spec)  # every drawn spec is a valid definition

    collect()
    want = ({("decay", d) for d in DECAYS} | {("direction", d) for d in
            ("forward", "reverse", "bidirectional")} | {("squash", q) for q in SQUASHES}
            | set(UNARY) | set(BINARY)
            | {"epilogue uses y"})
    assert want <= seen, sorted(map(str, want - seen))


def test_fuzz_setups_cover_the_call_features():
    """Every dtype, state in and out, packed or not, gradients, groups and heads are drawn."""
    seen = set()

    @DERANDOMIZED
    @given(st.data())
    def collect(data):
        # setups depend on the spec's key/query axes only; drawing whole specs is slow
        spec = data.draw(st.sampled_from([SPEC, dataclasses.replace(SPEC, kq="h")]))
        setup = data.draw(setups(spec))
        assert setup.h % setup.g == 0 and (spec.kq == "g" or setup.g == setup.h)
        assert not setup.grad or setup.dtype == torch.float32
        seen.update({("h", setup.h), ("dtype", setup.dtype), ("grouped", setup.g < setup.h)})
        seen.update((f, getattr(setup, f)) for f in ("h0", "final", "varlen", "grad"))

    collect()
    want = ({("h", h) for h in (1, 2, 3, 4)} | {("dtype", torch.float32),
            ("dtype", torch.bfloat16)} | {(f, v) for f in ("grouped", "h0", "final", "varlen",
                                                           "grad") for v in (True, False)})
    assert want <= seen, sorted(map(str, want - seen))


def test_fuzz_cases_reach_the_edges():
    """Across one seed's cases: every length (and t = 0, b = 0), every edge value and share in
    the decay input next to ordinary values, long sequences only where asked for, and h > 2
    only with short ones."""
    seen = set()
    for setup, long in ((SETUP, False), (SETUP, True), (dataclasses.replace(SETUP, h=3), True)):
        for case in draw_cases(SPEC, setup, 12345, 400, long):
            seen.update({("t", case.t), ("b", case.b), ("edges", case.edges)})
            if case.t in T_LONG:
                assert long and setup.h <= 2
            if setup.h > 2:
                assert case.t in T_SHORT + (0,)
            assert case.b <= (1 if case.t > 33 else 2)
            if not case.edges:
                continue
            a = case_inputs(build_definition(SPEC), setup, case, "cpu")[0]["a"]
            seen.update(("edge", v) for v in EDGE_VALUES if (a == v).any())
            seen.add(("ordinary", bool((a > -4).logical_and(a < 4).any())))
    want = ({("t", t) for t in (0,) + T_ALL + T_LONG} | {("b", b) for b in (0, 1, 2)}
            | {("edges", s) for s in (0.0,) + EDGE_SHARES}
            | {("edge", v) for v in EDGE_VALUES} | {("ordinary", True)})
    assert want <= seen, sorted(map(str, want - seen))


def test_fuzz_cases_pack_empty_sequences():
    """Packed cases have one to four sequences summing to t, empty ones first, last and
    in between, and initial states per sequence."""
    setup = dataclasses.replace(SETUP, varlen=True)
    defn = build_definition(SPEC)
    seen = set()
    for case in draw_cases(SPEC, setup, 7, 400):
        assert case.b == 1 and sum(case.lengths) == case.t
        seen.add(("sequences", len(case.lengths)))
        if 0 in case.lengths[1:-1]:
            seen.add("empty inside")
        seen.update({("empty first", case.lengths[0] == 0), ("empty last",
                                                             case.lengths[-1] == 0)})
        _, kwargs = case_inputs(defn, setup, case, "cpu")
        assert kwargs["cu_seqlens"].tolist() == [0, *torch.tensor(case.lengths).cumsum(0)]
        assert kwargs["initial_state"].shape == (2, len(case.lengths), 2, 3, 2)
    want = ({("sequences", k) for k in (1, 2, 3, 4)} | {"empty inside"}
            | {(f"empty {w}", v) for w in ("first", "last") for v in (True, False)})
    assert want <= seen, sorted(map(str, want - seen))


def test_fuzz_cases_are_reproducible():
    """A printed case rebuilds the same tensors; each tensor has its own seed, so a definition
    that loses an input while shrinking keeps the other inputs' values."""
    defn = build_definition(SPEC)
    fewer = build_definition(dataclasses.replace(SPEC, extras=(), query_mod=None))
    first = draw_cases(SPEC, SETUP, 99, 20)
    assert first == draw_cases(SPEC, SETUP, 99, 20) != draw_cases(SPEC, SETUP, 100, 20)
    for case in first:
        (x, kx), (y, ky), (z, _) = (case_inputs(d, SETUP, case, "cpu")
                                    for d in (defn, defn, fewer))
        for name in x:
            assert torch.equal(x[name].nan_to_num(), y[name].nan_to_num())
            if name in z:
                assert torch.equal(x[name].nan_to_num(), z[name].nan_to_num())
        assert torch.equal(kx["initial_state"], ky["initial_state"])


def test_fuzz_shards_split_the_cases_exactly():
    for total, shards in ((160, 4), (10000, 64), (3, 4), (0, 2)):
        parts = [shard_cases(total, shards, k) for k in range(shards)]
        assert sum(parts) == total and max(parts) - min(parts) <= 1
        assert math.ceil(total / shards) == max(parts)
