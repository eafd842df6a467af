"""Making a Plan: the one policy every caller uses (a compiled op's call, `ssmc tune`,
`ssmc explain`).

A plan is the program with a lowering, the inputs' dtype, the call's features and, where tuned,
tiles. The lowering is the cheapest by the cost model among those that are legal for the decay
and that a backend eligible for the device implements; the tuner may then replace it and the
tiles with a measured configuration (`ssmc.autotune.tuner.tuned_plan`).
"""
from __future__ import annotations

import dataclasses
import sys

import torch

from . import config
from .autotune.tuner import tuned_plan
from .backends.base import implementing_lowerings
from .devices import device_model
from .ir import Program
from .lowerings import Choice, choose_lowering, legal_lowerings
from .plan import Plan
from .validate import Bound

ELEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[1]


def base_plan(program: Program, bound: Bound, lowering: str = "scan") -> Plan:
    """The plan of a bound call before a lowering is chosen."""
    return Plan(program=program, lowering=lowering, dtype=dtype_name(bound.dtype),
                has_initial_state=bound.initial_state is not None,
                return_final_state=bound.return_final_state,
                varlen=bound.cu_seqlens is not None)


def candidates(program: Program, backend_name: str, device, base: Plan) -> list[str]:
    """The legal lowerings that an eligible backend implements for `base`'s features."""
    return implementing_lowerings(legal_lowerings(program), backend_name, torch.device(device),
                                  base)


def choose(program: Program, backend_name: str, device, sizes: dict[str, int], base: Plan,
           model: str | None = None, chunk: int = 64,
           among: list[str] | None = None) -> tuple[Choice, list[str]]:
    """The cost model's choice among the candidates (or those of `among` that are candidates;
    all legal ones where no backend implements any, so that the error names the real reason
    later), and the candidates."""
    allowed = candidates(program, backend_name, device, base)
    if among is not None:
        allowed = [lw for lw in allowed if lw in among]
    choice = choose_lowering(program, sizes, model or device_model(device),
                             ELEM_BYTES.get(base.dtype, 4), chunk, allowed=allowed or None)
    return choice, allowed


def make_plan(program: Program, backend_name: str, lowering_policy: str, bound: Bound) -> Plan:
    """The plan of one call: `lowering_policy` ("auto" or a lowering name) on the backend
    `backend_name` ("auto" or a backend name)."""
    base = base_plan(program, bound)
    if lowering_policy != "auto":
        return tuned_plan(program, backend_name, lowering_policy, bound,
                          dataclasses.replace(base, lowering=lowering_policy), [lowering_policy])
    choice, allowed = choose(program, backend_name, bound.device, bound.sizes, base)
    if config.debug_level() >= 1:
        print(f"ssmc: {program.name}: {choice.explanation}", file=sys.stderr)
    return tuned_plan(program, backend_name, lowering_policy, bound,
                      dataclasses.replace(base, lowering=choice.lowering),
                      allowed or [choice.lowering])
