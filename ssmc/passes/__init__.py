"""Analyses and rewrites over the IR; `pipeline.PIPELINE` is the order they run in."""
from .base import PassContext, register_pass, run_passes
from .classify_decay import decay_kind_of
from .log_space import log_of
from .pipeline import PIPELINE, run_pipeline

__all__ = ["PassContext", "register_pass", "run_passes", "decay_kind_of", "log_of", "PIPELINE",
           "run_pipeline"]
