"""The package's shape, checked from its sources: the module-level import graph has no circle,
backends depend only downward, and nothing outside a backend imports its internals."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "ssmc"

#: what a backend may import from the rest of ssmc (everything below the planner)
BACKEND_MAY_IMPORT = ("ssmc.errors", "ssmc.config", "ssmc.ir", "ssmc.plan", "ssmc.tiles",
                      "ssmc.lowerings", "ssmc._version", "ssmc.backends", "ssmc.devices",
                      "ssmc.validate")
#: a backend's public face, which the API, the CLI, the tuner and the package may use: the
#: backend objects (through `ssmc.backends`), the on-disk cache they share with the tuner, and
#: the TVM export format
BACKEND_PUBLIC = ("ssmc.backends.base", "ssmc.backends.cache", "ssmc.backends.tvm.export",
                  "ssmc.backends.tvm.load")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def resolve(path: Path, node: ast.ImportFrom) -> list[str]:
    """The ssmc modules a `from ... import ...` names (a submodule where an imported name is
    one)."""
    here = module_name(path).split(".")
    if node.level:
        base = here if is_package(path) else here[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("ssmc"):
        return []
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in MODULES else target)
    return out


def module_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:   # module level only: imports inside functions are lazy
        if isinstance(node, ast.ImportFrom):
            found.update(resolve(path, node))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ssmc"))
    return found


PATHS = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
MODULES = set(PATHS)


def graph() -> dict[str, set[str]]:
    """Module -> modules it imports at module level (importing a.b.c also runs a and a.b)."""
    edges = {}
    for name, path in PATHS.items():
        deps = set()
        for dep in module_level_imports(path):
            parts = dep.split(".")
            deps.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        edges[name] = {d for d in deps if d in MODULES and d != name
                       and not name.startswith(d + ".")}   # a package's own parents run first
    return edges


def test_no_import_circle():
    edges = graph()
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(edges[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("ssmc.backends.")
                                        and n != "ssmc.backends.reference"))
def test_backends_depend_only_downward(name):
    """The reference backend wraps `ssmc.reference` by design; every other backend module
    imports nothing above the Plan (no passes, planner, tuner, API or references)."""
    bad = sorted(d for d in module_level_imports(PATHS[name])
                 if not d.startswith(BACKEND_MAY_IMPORT))
    assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.startswith("ssmc.backends")))
def test_nothing_outside_a_backend_imports_its_internals(name):
    deps = module_level_imports(PATHS[name])
    internal = sorted(d for d in deps if d.startswith("ssmc.backends.")
                      and not d.startswith(BACKEND_PUBLIC))
    assert not internal, f"{name} imports backend internals {internal}"
