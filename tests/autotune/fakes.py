"""Fake timers, runs and tasks for the autotune tests."""
from __future__ import annotations

import torch

from ssmc.autotune.cache import TuneKey
from ssmc.autotune.measure import Settings
from ssmc.autotune.space import Config, Space
from ssmc.autotune.tuner import Task, Tuner


class FakeTimer:
    """Times come from a table keyed by config label (or a function of the config); records
    which configs it timed."""

    def __init__(self, ms, reps: int = 5):
        self.ms, self.reps = ms, reps
        self.timed: list[Config] = []

    def __call__(self, run, config, n_inputs, settings):
        self.timed.append(config)
        run(0)
        t = self.ms(config) if callable(self.ms) else self.ms[config.label()]
        if isinstance(t, Exception):
            raise t
        return [t] * self.reps


def output(value: float = 1.0, final: bool = False):
    out = torch.full((2, 3, 4), value)
    return out, (torch.full((2, 2), value) if final else None)


def fake_task(configs, outputs=None, broken=(), key: TuneKey | None = None, dtype="float32"):
    """A task over `configs` (the first is the default). `outputs[label]` is the value a config
    computes (1.0 unless given); labels in `broken` fail to build."""
    outputs = outputs or {}
    built = []

    def build(cfg):
        if cfg.label() in broken:
            raise RuntimeError(f"out of resources: {cfg.label()}")
        built.append(cfg)
        return lambda i: output(outputs.get(cfg.label(), 1.0))

    key = key or TuneKey("fake", "0" * 12, "reference", "auto", dtype,
                         (("bt", 64), ("t", 64), ("h", 2), ("g", 1), ("n", 4), ("p", 4)))
    space = Space(configs[0], list(configs))
    task = Task(key, space, build, n_inputs=2, dtype=dtype, shape={"b": 1, "t": 64})
    task.built = built
    return task


def fake_tuner(ms, **kw) -> Tuner:
    return Tuner(timer=FakeTimer(ms), settings=kw.pop("settings", Settings()), **kw)


C = Config.make
