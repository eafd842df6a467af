"""Call-time checks: every bad input is reported here, before any kernel launches."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor

from .errors import ArgumentError, DeviceError, DTypeError, ShapeError, UnsupportedError
from .ir import Program
from .ir.orders import ORDER_AXIS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
EXTRA_ARGS = ("initial_state", "return_final_state", "cu_seqlens", "grid")


@dataclass
class Bound:
    """A checked call: tensors by input name and the size of every axis."""

    tensors: dict[str, torch.Tensor]
    sizes: dict[str, int]
    device: torch.device
    dtype: torch.dtype
    initial_state: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    return_final_state: bool

    @property
    def num_states(self) -> int:
        return self.sizes["b"] if self.cu_seqlens is None else self.cu_seqlens.numel() - 1


def complete_sizes(sizes: dict) -> dict:
    """The sizes of the axes no input has, in place: b, t, n, p of 1; h as g (or 1); g of 1
    where no input has a group axis (what has no head axis is then the same for every head:
    one group of them all, so the kernels form q k^T once for the heads and sum dq, dk over
    them). Returns `sizes`."""
    for axis in ("b", "t", "n", "p"):
        sizes.setdefault(axis, 1)
    if "h" not in sizes:
        sizes["h"] = sizes.get("g", 1)
    sizes.setdefault("g", 1)
    return sizes


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def bind(program: Program, args: tuple, kwargs: dict) -> Bound:
    fn = f"{program.name}()"
    names = program.input_names
    kwargs = dict(kwargs)
    extras = {k: kwargs.pop(k) for k in EXTRA_ARGS if k in kwargs}
    if len(args) > len(names):
        raise ArgumentError(f"{fn} takes {len(names)} tensor arguments ({', '.join(names)}) "
                            f"but {len(args)} were given")
    values = dict(zip(names, args))
    for k, v in kwargs.items():
        if k not in names:
            raise ArgumentError(f"{fn} got an unexpected keyword argument {k!r}; arguments "
                                f"are {', '.join(names + EXTRA_ARGS)}")
        if k in values:
            raise ArgumentError(f"{fn} got multiple values for argument {k!r}")
        values[k] = v
    missing = [n for n in names if n not in values]
    if missing:
        raise ArgumentError(f"{fn} missing tensor argument(s): "
                            f"{', '.join(repr(m) for m in missing)}")

    device = None
    first_name = None
    sizes: dict[str, int] = {}
    owner: dict[str, str] = {}
    for inp in program.inputs:
        x = values[inp.name]
        if not isinstance(x, torch.Tensor):
            raise DTypeError(f"{fn}: {inp.name!r} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise DTypeError(f"{fn}: {inp.name!r} has dtype {x.dtype}; expected one of "
                             "float16, bfloat16, float32, float64")
        if device is None:
            device, first_name = x.device, inp.name
        elif x.device != device:
            raise DeviceError(f"{fn}: {inp.name!r} is on {x.device} but {first_name!r} is on "
                              f"{device}; all tensors must be on one device")
        spec = " ".join(inp.axes)
        if x.dim() != len(inp.axes):
            raise ShapeError(f'{fn}: {inp.name!r} is annotated "{spec}" ({len(inp.axes)} axes) '
                             f"but has shape {_shape(x)} ({x.dim()} dims)")
        for axis, size in zip(inp.axes, x.shape):
            if axis in sizes and sizes[axis] != size:
                other = owner[axis]
                raise ShapeError(
                    f"{fn}: {inp.name!r} has {axis}={size} but {other!r} has {axis}={sizes[axis]} "
                    f"({other}: {_shape(values[other])}, {inp.name}: {_shape(x)})")
            sizes.setdefault(axis, size)  # an int, or a SymInt under tracing (not specialised)
            owner.setdefault(axis, inp.name)
    complete_sizes(sizes)
    if sizes["g"] == 0 or sizes["h"] % sizes["g"]:
        raise ShapeError(f"{fn}: heads h={sizes['h']} ({owner.get('h', 'implied')!r}) is not a "
                         f"multiple of groups g={sizes['g']} ({owner.get('g')!r})")

    _check_grid(fn, program, extras, sizes, owner)
    dtype = _output_dtype(program, values)
    cu = _check_cu_seqlens(fn, extras.get("cu_seqlens"), sizes, device)
    bound = Bound(tensors={n: values[n] for n in names}, sizes=sizes, device=device, dtype=dtype,
                  initial_state=None, cu_seqlens=cu,
                  return_final_state=bool(extras.get("return_final_state", False)))
    bound.initial_state = _check_state(fn, program, extras.get("initial_state"), bound)
    return bound


def _check_grid(fn, program: Program, extras: dict, sizes: dict, owner: dict) -> None:
    """`grid=(H, W)` of a cross2d call: t = H * W (row-major); sets sizes grid_h, grid_w."""
    grid = extras.get("grid")
    orders = len(program.recurrence.directions)
    if ORDER_AXIS in sizes and sizes[ORDER_AXIS] != orders:
        raise ShapeError(f"{fn}: {owner[ORDER_AXIS]!r} has k={sizes[ORDER_AXIS]}; the order axis "
                         f"k holds one slice per scan order, {orders} for direction="
                         f"{program.recurrence.direction_name!r}")
    if not program.on_grid:
        if grid is not None:
            raise ArgumentError(f"{fn}: 'grid' is only for a recurrence over a grid "
                                f"(direction='cross2d'); this one has direction="
                                f"{program.recurrence.direction_name!r}")
        return
    if grid is None:
        raise ArgumentError(f"{fn}: a cross2d recurrence needs grid=(H, W), the image's height "
                            f"and width (t = H * W, row-major); got no grid")
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)
                       for v in grid)):
        raise ArgumentError(f"{fn}: 'grid' must be a pair of ints (H, W), got {grid!r}")
    gh, gw = grid
    if gh < 1 or gw < 1:
        raise ShapeError(f"{fn}: 'grid' must be positive, got grid=({gh}, {gw})")
    if gh * gw != sizes["t"]:
        raise ShapeError(f"{fn}: grid=({gh}, {gw}) has {gh * gw} positions but the inputs have "
                         f"t={sizes['t']} ({owner.get('t', 'implied')!r}); t must be H * W")
    for name in ("initial_state", "cu_seqlens"):
        if extras.get(name) is not None:
            raise UnsupportedError(f"{fn}: {name!r} is not supported with direction='cross2d' "
                                   "(one image per batch entry, no state carried in)")
    if extras.get("return_final_state"):
        raise UnsupportedError(f"{fn}: return_final_state=True is not supported with "
                               "direction='cross2d' (four orders end at four different places)")
    sizes["grid_h"], sizes["grid_w"] = gh, gw


def _output_dtype(program: Program, values) -> torch.dtype:
    """The dtype of the first input over (t, p), else over t, else the first input."""
    for want in (("t", "p"), ("t",), ()):
        for inp in program.inputs:
            if all(a in inp.axes for a in want):
                return values[inp.name].dtype
    raise AssertionError("unreachable: a program has inputs")


def _check_cu_seqlens(fn, cu, sizes, device):
    if cu is None:
        return None
    if not isinstance(cu, torch.Tensor):
        raise DTypeError(f"{fn}: 'cu_seqlens' must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise DTypeError(f"{fn}: 'cu_seqlens' has dtype {cu.dtype}; expected int32 or int64")
    if cu.device != device:
        raise DeviceError(f"{fn}: 'cu_seqlens' is on {cu.device} but the inputs are on {device}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ShapeError(f"{fn}: 'cu_seqlens' must be 1-d with at least 2 entries "
                         f"(0 and the total length), got shape {_shape(cu)}")
    if sizes["b"] != 1:
        raise ShapeError(f"{fn}: with 'cu_seqlens' the batch must be packed into b=1, got "
                         f"b={sizes['b']}")
    if not _tracing(cu):  # under tracing the custom op checks the values at run time
        check_cu_seqlens_values(fn, cu, sizes["t"])
    return cu


def _tracing(x: torch.Tensor) -> bool:
    """True while torch.compile/export traces (or `x` is a FakeTensor): the values are unknown,
    and reading them would break the graph."""
    return torch.compiler.is_compiling() or isinstance(x, FakeTensor)


def check_cu_seqlens_values(fn: str, cu: torch.Tensor, t: int) -> None:
    """The checks on the values of `cu_seqlens` (a host sync on GPU)."""
    host = cu.tolist()
    if host[0] != 0:
        raise ShapeError(f"{fn}: 'cu_seqlens' must start at 0, got {host[0]}")
    if any(b < a for a, b in zip(host, host[1:])):
        raise ShapeError(f"{fn}: 'cu_seqlens' must be non-decreasing, got {host}")
    if host[-1] != t:
        raise ShapeError(f"{fn}: 'cu_seqlens' must end at t={t}, got {host[-1]}")


def expected_state_shape(program: Program, bound: Bound) -> tuple[int, ...]:
    s = bound.sizes
    shape = (bound.num_states, s["h"], s["n"], s["p"])
    if len(program.recurrence.directions) > 1:
        shape = (len(program.recurrence.directions),) + shape
    return shape


def _check_state(fn, program, h0, bound):
    if h0 is None:
        return None
    if not isinstance(h0, torch.Tensor):
        raise DTypeError(f"{fn}: 'initial_state' must be a torch.Tensor, got {type(h0).__name__}")
    if h0.dtype not in FLOAT_DTYPES:
        raise DTypeError(f"{fn}: 'initial_state' has dtype {h0.dtype}; expected a float dtype")
    if h0.device != bound.device:
        raise DeviceError(f"{fn}: 'initial_state' is on {h0.device} but the inputs are on "
                          f"{bound.device}")
    want = expected_state_shape(program, bound)
    if tuple(h0.shape) != want:
        lead = "(directions, " if len(want) == 5 else "("
        who = "sequences" if bound.cu_seqlens is not None else "b"
        raise ShapeError(f"{fn}: 'initial_state' has shape {_shape(h0)}; expected {want} = "
                         f"{lead}{who}, h, n, p)")
    return h0
