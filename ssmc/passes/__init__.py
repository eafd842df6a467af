"""Analyses and rewrites over the IR; `pipeline.PIPELINE` is the order they run in."""
from .base import PassContext, register_pass, run_passes
from .choose_lowering import DEVICES, Choice, DeviceModel, choose_lowering
from .classify_decay import LEGAL_LOWERINGS, decay_kind_of, legal_lowerings
from .cost import lowering_costs
from .log_space import log_of
from .pipeline import PIPELINE, run_pipeline

__all__ = ["PassContext", "register_pass", "run_passes", "DEVICES", "Choice", "DeviceModel",
           "choose_lowering", "LEGAL_LOWERINGS", "decay_kind_of", "legal_lowerings",
           "lowering_costs", "log_of", "PIPELINE", "run_pipeline"]
