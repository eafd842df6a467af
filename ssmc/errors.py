"""The error tree. Each class mixes in the builtin a caller would naturally catch."""


class SSMCError(Exception):
    """Base class of every error ssmc raises on purpose."""


class SpecError(SSMCError, ValueError):
    """A definition written in the language is not valid (raised at definition time)."""


class ShapeError(SSMCError, ValueError):
    """Call-time tensors disagree with the definition or with each other."""


class DTypeError(SSMCError, TypeError):
    """A tensor has a dtype (or device) the op cannot take."""


class UnsupportedError(SSMCError, NotImplementedError):
    """Valid input that this lowering, backend or shim does not implement."""


class BackendUnavailableError(SSMCError, RuntimeError):
    """The requested backend cannot run here (package or device missing)."""


class DeviceLostError(SSMCError, RuntimeError):
    """A kernel faulted in a way that leaves the GPU context unusable for this process (an
    illegal memory access, say): every later launch would fail too."""
