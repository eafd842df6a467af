"""Autotuning per GPU: search spaces, measurement, a persistent per-device cache, the policy.

    space.py    Config, DeviceLimits, search_space (pruned by legality, cost model, device)
    measure.py  bench (events, warm-up, median, rotating inputs, time limit), outputs_match
    cache.py    TuneKey (definition hash, lowering, dtype, shape bucket), TuneCache, defaults
    tuner.py    Tuner (measure, check, select), tuned_plan (SSMC_AUTOTUNE policy hook)

`ssmc tune` (ssmc.cli) drives the same pieces from the command line.
"""
from .cache import TuneCache, TuneKey, environment, packaged_defaults, shape_bucket
from .measure import Measurement, Settings, bench, measure, outputs_match
from .space import Config, DeviceLimits, Space, search_space
from .tuner import Task, Tuner, TuneResult, make_task, tuned_plan

__all__ = ["TuneCache", "TuneKey", "environment", "packaged_defaults", "shape_bucket",
           "Measurement", "Settings", "bench", "measure", "outputs_match", "Config",
           "DeviceLimits", "Space", "search_space", "Task", "Tuner", "TuneResult", "make_task",
           "tuned_plan"]
