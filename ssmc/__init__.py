"""ssmc: compile state-space-model recurrences into fast kernels.

    import ssmc
    from ssmc import dsl as S

    @ssmc.ssm
    def linear_attention(q: S.In["b t h n"], k: S.In["b t h n"], v: S.In["b t h p"]):
        return S.recurrence(key=k, value=v, query=q)

    op = ssmc.compile(linear_attention)
"""
from ._version import __version__
from . import dsl
from .api import CompiledOp, Definition, compile, ssm
from .matrix import attention_matrix, mixing_loss
from . import distributed
from .backends.tvm.export import export
from .backends.tvm.load import ExportedKernel, load
from .errors import (ArgumentError, BackendUnavailableError, ConfigError, DeviceError,
                     DeviceLostError, DTypeError, ShapeError, SpecError, SSMCError,
                     UnsupportedError)

__all__ = ["__version__", "dsl", "distributed", "ssm", "compile", "attention_matrix",
           "mixing_loss",
           "CompiledOp", "Definition", "export", "load", "ExportedKernel", "SSMCError",
           "SpecError", "ShapeError", "DTypeError", "DeviceError", "ArgumentError",
           "ConfigError", "UnsupportedError", "BackendUnavailableError", "DeviceLostError"]
