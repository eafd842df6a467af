"""The error tree. Each class mixes in the builtin a caller would naturally catch."""


class SSMCError(Exception):
    """Base class of every error ssmc raises on purpose."""


class SpecError(SSMCError, ValueError):
    """A definition written in the language is not valid (raised at definition time)."""


class ShapeError(SSMCError, ValueError):
    """Call-time tensors disagree with the definition or with each other."""


class DTypeError(SSMCError, TypeError):
    """A tensor has a dtype (or is not a tensor) the op cannot take."""


class DeviceError(DTypeError):
    """Tensors of one call are on different devices. A `DTypeError` (so a `TypeError`) because
    that is what a device mismatch was reported as before this class existed."""


class ArgumentError(SSMCError, TypeError):
    """A call does not fit the signature: a missing, unknown or repeated argument, too many
    positional ones, or an argument of the wrong kind (`ssmc.compile(a_plain_function)`)."""


class ConfigError(SSMCError, ValueError):
    """An option or setting has a value ssmc does not accept: `backend=`, `lowering=`, an
    `SSMC_*` environment variable, an op's or layer's option."""


class UnsupportedError(SSMCError, NotImplementedError):
    """Valid input that this lowering, backend or shim does not implement."""


class BackendUnavailableError(SSMCError, RuntimeError):
    """The requested backend cannot run here (package or device missing)."""


class DeviceLostError(SSMCError, RuntimeError):
    """A kernel faulted in a way that leaves the GPU context unusable for this process (an
    illegal memory access, say): every later launch would fail too."""
