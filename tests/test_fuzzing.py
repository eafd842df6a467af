"""The fuzz grammar (tests/fuzzing.py) reaches what it says it does."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from tests.fuzzing import BINARY, DECAYS, SQUASHES, UNARY, build_definition, specs, uses_input


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

    # derandomized: the claim is about the generator, not about one lucky --hypothesis-seed
    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
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
