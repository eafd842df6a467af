"""Pass registration and the runner: requires are checked, the IR verified after each pass."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

from .. import config
from ..ir import Program, print_program, verify

PassFn = Callable[[Program, "PassContext"], Program]
_PASSES: dict[str, tuple[PassFn, tuple[str, ...]]] = {}


@dataclass
class PassContext:
    debug: int = field(default_factory=config.debug_level)
    verify: bool = field(default_factory=config.verify_ir)
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)


def register_pass(name: str, requires: tuple[str, ...] = ()):
    def deco(fn: PassFn) -> PassFn:
        _PASSES[name] = (fn, tuple(requires))
        fn.pass_name = name
        return fn
    return deco


def get_pass(name: str) -> tuple[PassFn, tuple[str, ...]]:
    return _PASSES[name]


def run_passes(program: Program, names, ctx: PassContext | None = None) -> Program:
    ctx = ctx or PassContext()
    for name in names:
        fn, requires = _PASSES[name]
        missing = [r for r in requires if r not in program.analyses]
        if missing:
            raise RuntimeError(f"pass {name!r} requires {missing} to run first")
        program = fn(program, ctx).replace(analyses=program.analyses + (name,))
        if ctx.verify:
            verify(program)
        if ctx.debug >= 2:
            ctx.log(f"--- after {name} ---\n{print_program(program)}")
    return program
