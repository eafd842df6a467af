"""Call-time validation (`ssmc.validate.bind`): every bad input is reported, before any kernel,
with a message naming the function, the argument, the axis, expected and actual."""
import re

import pytest
import torch

import ssmc
from ssmc import dsl as S
from ssmc.ops import mamba2, selective_scan, ssd
from ssmc.validate import bind
from tests.helpers import cu_seqlens, make_definition, random_inputs, ssd_inputs

# mamba2 (program name "ssd"): x (b t h p), dt (b t h), A (h), B, C (b t g n), D (h), z (b t h p)
NAMES = ("x", "dt", "A", "B", "C", "D", "z")


def args(b=2, t=5, h=4, g=2, n=3, p=6, **replace):
    x = ssd_inputs(b, t, h, g, n, p, dt_bias=False, seed=0)
    x.update(replace)
    return tuple(x[k] for k in NAMES)


def raises(exc, message):
    """pytest.raises matching the whole message literally."""
    return pytest.raises(exc, match="^" + re.escape(message) + "$")


def reference_op():
    return ssmc.compile(mamba2, backend="reference")


def test_bind_accepts_and_sizes():
    bound = bind(mamba2.program, args(), {})
    assert bound.sizes == dict(b=2, t=5, h=4, g=2, n=3, p=6)
    assert bound.dtype == torch.float32 and bound.device == torch.device("cpu")
    assert bound.initial_state is None and bound.cu_seqlens is None
    assert not bound.return_final_state and bound.num_states == 2
    assert set(bound.tensors) == set(NAMES)


def test_one_group_where_no_input_has_the_axis():
    """Inputs without a head axis are the same for every head: with no group axis anywhere the
    heads form one group (g = 1), as with an explicit g of 1."""
    @ssmc.ssm
    def shared_keys(k: S.In["b t n"], v: S.In["b t h p"], q: S.In["b t n"]):
        return S.recurrence(key=k, value=v, query=q)
    b, t, h, n, p = 2, 5, 3, 4, 6
    bound = bind(shared_keys.program, (torch.randn(b, t, n), torch.randn(b, t, h, p),
                                       torch.randn(b, t, n)), {})
    assert (bound.sizes["h"], bound.sizes["g"]) == (3, 1)


def test_bind_keywords_and_mixed_dtypes():
    a = dict(zip(NAMES, args()))
    a["x"], a["z"] = a["x"].bfloat16(), a["z"].bfloat16()
    bound = bind(mamba2.program, (a["x"], a["dt"]), {k: v for k, v in a.items()
                                                       if k not in ("x", "dt")})
    assert bound.dtype == torch.bfloat16  # the output follows x, the first input over (t, p)


def test_axis_mismatch_names_both_arguments_axis_and_sizes():
    a = args(b=2, t=256, h=1, g=1, n=128, p=2)
    C = torch.randn(2, 256, 1, 64)
    with raises(ssmc.ShapeError, "ssd(): 'C' has n=64 but 'B' has n=128 "
                "(B: (2, 256, 1, 128), C: (2, 256, 1, 64))"):
        reference_op()(*a[:4], C, *a[5:])


@pytest.mark.parametrize("name,shape,message", [
    ("dt", (2, 7, 4), "'dt' has t=7 but 'x' has t=5 (x: (2, 5, 4, 6), dt: (2, 7, 4))"),
    ("z", (3, 5, 4, 6), "'z' has b=3 but 'x' has b=2 (x: (2, 5, 4, 6), z: (3, 5, 4, 6))"),
    ("A", (5,), "'A' has h=5 but 'x' has h=4 (x: (2, 5, 4, 6), A: (5,))"),
    ("C", (2, 5, 1, 3), "'C' has g=1 but 'B' has g=2 (B: (2, 5, 2, 3), C: (2, 5, 1, 3))"),
    ("z", (2, 5, 4, 7), "'z' has p=7 but 'x' has p=6 (x: (2, 5, 4, 6), z: (2, 5, 4, 7))"),
])
def test_axis_mismatch_each_axis(name, shape, message):
    with raises(ssmc.ShapeError, "ssd(): " + message):
        bind(mamba2.program, args(**{name: torch.randn(*shape)}), {})


@pytest.mark.parametrize("h,g", [(6, 4), (2, 4)])
def test_heads_not_a_multiple_of_groups(h, g):
    with raises(ssmc.ShapeError, f"ssd(): heads h={h} ('x') is not a multiple of groups "
                f"g={g} ('B')"):
        bind(mamba2.program, args(h=h, g=g), {})


def test_wrong_number_of_dims():
    with raises(ssmc.ShapeError, "ssd(): 'x' is annotated \"b t h p\" (4 axes) but has shape "
                "(2, 5, 24) (3 dims)"):
        bind(mamba2.program, args(x=torch.randn(2, 5, 24)), {})
    with raises(ssmc.ShapeError, "ssd(): 'A' is annotated \"h\" (1 axes) but has shape () "
                "(0 dims)"):
        bind(mamba2.program, args(A=torch.tensor(-1.0)), {})


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_dtype(dtype):
    A = torch.ones(4, dtype=dtype)
    with raises(ssmc.DTypeError, f"ssd(): 'A' has dtype {dtype}; expected one of float16, "
                "bfloat16, float32, float64"):
        reference_op()(*args(A=A))


@pytest.mark.parametrize("value,type_name", [([1.0, 2.0, 3.0, 4.0], "list"), (-1.0, "float"),
                                             (None, "NoneType")])
def test_non_tensor_argument(value, type_name):
    with raises(ssmc.DTypeError, f"ssd(): 'A' must be a torch.Tensor, got {type_name}"):
        bind(mamba2.program, args(A=value), {})


def test_tensors_on_different_devices():
    """A device mismatch is a DeviceError naming the argument, its device and the expected one
    (still a DTypeError and a TypeError, what it was reported as before)."""
    B = torch.randn(2, 5, 2, 3, device="meta")
    with raises(ssmc.DeviceError, "ssd(): 'B' is on meta but 'x' is on cpu; all tensors must be "
                "on one device") as info:
        reference_op()(*args(B=B))
    assert isinstance(info.value, ssmc.DTypeError) and isinstance(info.value, TypeError)
    on_meta = tuple(t.to("meta") for t in args())
    with raises(ssmc.DeviceError, "ssd(): 'dt' is on cpu but 'x' is on meta; all tensors must "
                "be on one device"):
        bind(mamba2.program, (on_meta[0], args()[1]) + on_meta[2:], {})


def test_all_on_meta_binds():
    a = tuple(t.to("meta") for t in args())
    assert bind(mamba2.program, a, {}).device == torch.device("meta")


PACKED = dict(b=1, t=9)


@pytest.mark.parametrize("cu,exc,message", [
    ([1, 4, 9], ssmc.ShapeError, "'cu_seqlens' must start at 0, got 1"),
    ([0, 6, 4, 9], ssmc.ShapeError, "'cu_seqlens' must be non-decreasing, got [0, 6, 4, 9]"),
    ([0, 4, 8], ssmc.ShapeError, "'cu_seqlens' must end at t=9, got 8"),
    ([0, 4, 10], ssmc.ShapeError, "'cu_seqlens' must end at t=9, got 10"),
    ([9], ssmc.ShapeError, "'cu_seqlens' must be 1-d with at least 2 entries (0 and the total "
                           "length), got shape (1,)"),
])
def test_bad_cu_seqlens_values(cu, exc, message):
    with raises(exc, "ssd(): " + message):
        reference_op()(*args(**PACKED), cu_seqlens=torch.tensor(cu, dtype=torch.int32))


def test_bad_cu_seqlens_type_dtype_shape_device():
    a = args(**PACKED)
    with raises(ssmc.DTypeError, "ssd(): 'cu_seqlens' has dtype torch.float32; expected int32 "
                "or int64"):
        bind(mamba2.program, a, dict(cu_seqlens=torch.tensor([0.0, 9.0])))
    with raises(ssmc.DTypeError, "ssd(): 'cu_seqlens' must be a torch.Tensor, got list"):
        bind(mamba2.program, a, dict(cu_seqlens=[0, 9]))
    with raises(ssmc.ShapeError, "ssd(): 'cu_seqlens' must be 1-d with at least 2 entries "
                "(0 and the total length), got shape (1, 2)"):
        bind(mamba2.program, a, dict(cu_seqlens=torch.tensor([[0, 9]])))
    with raises(ssmc.DeviceError, "ssd(): 'cu_seqlens' is on meta but the inputs are on cpu"):
        bind(mamba2.program, a, dict(cu_seqlens=torch.tensor([0, 9], device="meta")))


def test_cu_seqlens_needs_a_packed_batch():
    with raises(ssmc.ShapeError, "ssd(): with 'cu_seqlens' the batch must be packed into b=1, "
                "got b=2"):
        reference_op()(*args(b=2, t=9), cu_seqlens=cu_seqlens([4, 5]))


def test_cu_seqlens_valid_with_empty_sequences():
    bound = bind(mamba2.program, args(**PACKED), dict(cu_seqlens=cu_seqlens([0, 9, 0],
                                                                            torch.int64)))
    assert bound.num_states == 3


def test_initial_state_wrong_shape_gives_expected_shape():
    with raises(ssmc.ShapeError, "ssd(): 'initial_state' has shape (2, 4, 6, 3); expected "
                "(2, 4, 3, 6) = (b, h, n, p)"):
        reference_op()(*args(), initial_state=torch.zeros(2, 4, 6, 3))
    with raises(ssmc.ShapeError, "ssd(): 'initial_state' has shape (1, 4, 3, 6); expected "
                "(3, 4, 3, 6) = (sequences, h, n, p)"):
        bind(mamba2.program, args(**PACKED), dict(cu_seqlens=cu_seqlens([2, 0, 7]),
                                                  initial_state=torch.zeros(1, 4, 3, 6)))


def test_initial_state_bidirectional_shape():
    d = make_definition("scalar", "bidirectional")
    x = random_inputs(d, dict(b=2, t=5, h=4, g=2, n=3, p=6), seed=1)
    with raises(ssmc.ShapeError, "scalar_bidirectional(): 'initial_state' has shape "
                "(2, 4, 3, 6); expected (2, 2, 4, 3, 6) = (directions, b, h, n, p)"):
        bind(d.program, (), dict(x, initial_state=torch.zeros(2, 4, 3, 6)))
    ok = bind(d.program, (), dict(x, initial_state=torch.zeros(2, 2, 4, 3, 6)))
    assert ok.initial_state.shape == (2, 2, 4, 3, 6)


def test_initial_state_type_dtype_device():
    a = args()
    with raises(ssmc.DTypeError, "ssd(): 'initial_state' must be a torch.Tensor, got float"):
        bind(mamba2.program, a, dict(initial_state=0.0))
    with raises(ssmc.DTypeError, "ssd(): 'initial_state' has dtype torch.int64; expected a "
                "float dtype"):
        bind(mamba2.program, a, dict(initial_state=torch.zeros(2, 4, 3, 6, dtype=torch.long)))
    with raises(ssmc.DeviceError, "ssd(): 'initial_state' is on meta but the inputs are on cpu"):
        bind(mamba2.program, a, dict(initial_state=torch.zeros(2, 4, 3, 6, device="meta")))


def test_unknown_keyword_argument():
    with raises(ssmc.ArgumentError, "ssd() got an unexpected keyword argument 'w'; arguments are "
                "x, dt, A, B, C, D, z, initial_state, return_final_state, cu_seqlens, grid"):
        reference_op()(*args(), w=torch.zeros(1))


def test_missing_and_extra_arguments():
    a = args()
    with raises(ssmc.ArgumentError, "ssd() missing tensor argument(s): 'D', 'z'"):
        reference_op()(*a[:5])
    with raises(ssmc.ArgumentError, "ssd() takes 7 tensor arguments (x, dt, A, B, C, D, z) but 8 "
                "were given"):
        bind(mamba2.program, a + (a[0],), {})
    with raises(ssmc.ArgumentError, "ssd() got multiple values for argument 'x'"):
        bind(mamba2.program, a, dict(x=a[0]))


def test_error_classes_mix_in_builtins():
    assert issubclass(ssmc.ShapeError, ValueError) and issubclass(ssmc.ShapeError,
                                                                  ssmc.SSMCError)
    assert issubclass(ssmc.DTypeError, TypeError) and issubclass(ssmc.DTypeError,
                                                                 ssmc.SSMCError)
    with pytest.raises(ValueError):
        bind(mamba2.program, args(A=torch.randn(5)), {})
    with pytest.raises(TypeError):
        bind(mamba2.program, args(A=torch.ones(4, dtype=torch.int32)), {})
    # the classes added for argument, option and device errors keep the builtin each case was
    # reported as before, so `except TypeError` / `except ValueError` still catch them
    for cls, builtin in ((ssmc.ArgumentError, TypeError), (ssmc.ConfigError, ValueError),
                         (ssmc.DeviceError, TypeError), (ssmc.DeviceError, ssmc.DTypeError)):
        assert issubclass(cls, builtin) and issubclass(cls, ssmc.SSMCError), cls
    with pytest.raises(TypeError):
        bind(mamba2.program, args(), dict(w=torch.zeros(1)))


@pytest.mark.parametrize("call", ["too_many", "unknown", "repeated", "missing"])
def test_argument_errors_are_ssmc_errors(call):
    """Every way a call can miss the signature raises ArgumentError (an SSMCError and still a
    TypeError), through the op and through bind."""
    a = args()
    op = reference_op()
    bad = {"too_many": lambda: op(*a, a[0]), "unknown": lambda: op(*a, w=a[0]),
           "repeated": lambda: op(*a, x=a[0]), "missing": lambda: op(*a[:6])}[call]
    with pytest.raises(ssmc.ArgumentError, match=r"^ssd\(\) ") as info:
        bad()
    assert isinstance(info.value, ssmc.SSMCError) and isinstance(info.value, TypeError)


def test_builtin_wrappers_report_the_same_errors():
    """The ops in ssmc.ops go through the same checks (before any kernel)."""
    x = ssd_inputs(2, 5, 4, 2, 3, 6, seed=2)
    x["C"] = torch.randn(2, 5, 2, 4)
    with raises(ssmc.ShapeError, "ssd(): 'C' has n=4 but 'B' has n=3 (B: (2, 5, 2, 3), "
                "C: (2, 5, 2, 4))"):
        ssd(**x)
    with pytest.raises(ssmc.ShapeError, match=r"^selective_scan\(\): 'delta' has t=4 but 'u' "
                       r"has t=5"):
        selective_scan(torch.randn(2, 5, 3), torch.randn(2, 4, 3), -torch.rand(3, 2),
                       torch.randn(2, 5, 2), torch.randn(2, 5, 2))


# ------------------------------------------------------------------------- grids (cross2d)

@ssmc.ssm
def grid_ssd(x: S.In["b t h p"], dt: S.In["b k t h"], A: S.In["h"], B: S.In["b t n"],
             C: S.In["b t n"]):
    return S.recurrence(decay=S.exp(dt * A), key=B, value=x, query=C, direction="cross2d")


def grid_args(b=1, t=6, h=2, n=3, p=4, k=4):
    return (torch.randn(b, t, h, p), torch.rand(b, k, t, h), -torch.rand(h),
            torch.randn(b, t, n), torch.randn(b, t, n))


def test_grid_sizes_reach_the_kernels():
    bound = bind(grid_ssd.program, grid_args(), {"grid": (2, 3)})
    assert bound.sizes["grid_h"] == 2 and bound.sizes["grid_w"] == 3 and bound.sizes["k"] == 4


@pytest.mark.parametrize("kwargs, exc, message", [
    ({}, ssmc.ArgumentError, "grid_ssd(): a cross2d recurrence needs grid=(H, W), the image's "
     "height and width (t = H * W, row-major); got no grid"),
    ({"grid": (4, 2)}, ssmc.ShapeError, "grid_ssd(): grid=(4, 2) has 8 positions but the "
     "inputs have t=6 ('x'); t must be H * W"),
    ({"grid": 6}, ssmc.ArgumentError, "grid_ssd(): 'grid' must be a pair of ints (H, W), "
     "got 6"),
    ({"grid": (2.0, 3)}, ssmc.ArgumentError, "grid_ssd(): 'grid' must be a pair of ints (H, W), "
     "got (2.0, 3)"),
    ({"grid": (0, 3)}, ssmc.ShapeError, "grid_ssd(): 'grid' must be positive, got grid=(0, 3)"),
    ({"grid": (2, 3), "return_final_state": True}, ssmc.UnsupportedError,
     "grid_ssd(): return_final_state=True is not supported with direction='cross2d' (four "
     "orders end at four different places)"),
    ({"grid": (2, 3), "initial_state": torch.zeros(4, 1, 2, 3, 4)}, ssmc.UnsupportedError,
     "grid_ssd(): 'initial_state' is not supported with direction='cross2d' (one image per "
     "batch entry, no state carried in)"),
])
def test_bad_grids_are_refused_before_any_kernel(kwargs, exc, message):
    with raises(exc, message):
        ssmc.compile(grid_ssd, backend="reference")(*grid_args(), **kwargs)


def test_order_axis_must_have_one_slice_per_order():
    with raises(ssmc.ShapeError, "grid_ssd(): 'dt' has k=3; the order axis k holds one slice "
                "per scan order, 4 for direction='cross2d'"):
        ssmc.compile(grid_ssd, backend="reference")(*grid_args(k=3), grid=(2, 3))


def test_grid_on_a_line_recurrence_is_refused():
    with raises(ssmc.ArgumentError, "ssd(): 'grid' is only for a recurrence over a grid "
                "(direction='cross2d'); this one has direction='forward'"):
        reference_op()(*args(), grid=(1, 5))
