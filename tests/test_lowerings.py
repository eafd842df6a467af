"""ssmc.lowerings: the table of lowerings, and choosing the cheapest legal one at a concrete
shape, with its reasons."""
import pytest

import ssmc
import ssmc.ops
from ssmc import dsl as S
from ssmc.errors import UnsupportedError
from ssmc.devices import DEVICES, DeviceModel
from ssmc.lowerings import choose_lowering, estimate_seconds

MAMBA2_SHAPE = dict(b=8, h=80, p=64, n=128, g=1)


@pytest.mark.parametrize("t", [16, 64])
def test_mamba2_short_sequences_quadratic(t):
    choice = choose_lowering(ssmc.ops.mamba2.program, dict(MAMBA2_SHAPE, t=t), "h100")
    assert choice.lowering == "quadratic"


@pytest.mark.parametrize("t", [4096, 16384])
def test_mamba2_long_sequences_chunked(t):
    choice = choose_lowering(ssmc.ops.mamba2.program, dict(MAMBA2_SHAPE, t=t), "h100")
    assert choice.lowering == "chunked"


@pytest.mark.parametrize("t", [16, 64, 1024, 4096, 16384])
@pytest.mark.parametrize("device", sorted(DEVICES))
def test_choice_is_the_cheapest_legal_estimate(t, device):
    choice = choose_lowering(ssmc.ops.mamba2.program, dict(MAMBA2_SHAPE, t=t), device)
    assert {e.lowering for e in choice.estimates} == {"scan", "chunked", "quadratic"}
    best = min((e for e in choice.estimates if e.legal), key=lambda e: e.seconds)
    assert choice.lowering == best.lowering
    for e in choice.estimates:
        assert e.seconds == estimate_seconds(e.values, DEVICES[device]) > 0


def test_explanation_names_every_lowering():
    choice = choose_lowering(ssmc.ops.mamba2.program, dict(MAMBA2_SHAPE, t=4096), "h100")
    assert choice.explanation.startswith("chunked: estimated ")
    assert "on h100" in choice.explanation
    assert "scan: " in choice.explanation and "quadratic: " in choice.explanation


def test_quadratic_grows_faster_than_chunked():
    prog = ssmc.ops.mamba2.program
    ratios = []
    for t in (256, 1024, 4096, 16384):
        est = {e.lowering: e.seconds for e in
               choose_lowering(prog, dict(MAMBA2_SHAPE, t=t), "h100").estimates}
        ratios.append(est["quadratic"] / est["chunked"])
    assert ratios == sorted(ratios)


def s6(u: S.In["b t h p"], dt: S.In["b t h"], A: S.In["h p n"], B: S.In["b t n"]):
    return S.recurrence(decay=S.exp(dt * A), key=B, value=u, query=B)


def test_full_decay_only_scan():
    choice = choose_lowering(ssmc.ssm(s6).program, dict(b=2, t=16, h=4, n=16, p=8), "h100")
    assert choice.lowering == "scan"
    illegal = {e.lowering: e for e in choice.estimates if not e.legal}
    assert set(illegal) == {"chunked", "quadratic"}
    assert illegal["quadratic"].reason == "not legal for decay kind 'full'"
    assert "quadratic: not legal for decay kind 'full'" in choice.explanation


def test_allowed_restricts_the_choice():
    prog = ssmc.ops.mamba2.program
    shape = dict(MAMBA2_SHAPE, t=16)
    choice = choose_lowering(prog, shape, "h100", allowed=("scan", "chunked"))
    assert choice.lowering in ("scan", "chunked")
    quad = next(e for e in choice.estimates if e.lowering == "quadratic")
    assert not quad.legal and quad.reason == "no backend for the device implements it"


def test_nothing_allowed_is_an_error():
    with pytest.raises(UnsupportedError, match=r"s6: no lowering among \['chunked'\] is legal "
                                               "for decay kind 'full'"):
        choose_lowering(ssmc.ssm(s6).program, dict(b=1, t=8, h=1, n=4, p=2), "h100",
                        allowed=("chunked",))


def test_custom_device_model():
    slow_steps = DeviceModel("slow-steps", 600e12, 50e12, 3e12, 4e-6, step_s=1e-3)
    choice = choose_lowering(ssmc.ops.mamba2.program, dict(MAMBA2_SHAPE, t=4096), slow_steps)
    assert choice.lowering != "scan"  # a slow serial step rules the scan out
    assert "on slow-steps" in choice.explanation


def test_element_size_changes_estimates():
    prog = ssmc.ops.mamba2.program
    shape = dict(MAMBA2_SHAPE, t=4096)
    bf16 = {e.lowering: e.values["bytes"] for e in
            choose_lowering(prog, shape, "h100", elem_bytes=2).estimates}
    fp32 = {e.lowering: e.values["bytes"] for e in
            choose_lowering(prog, shape, "h100", elem_bytes=4).estimates}
    assert fp32["scan"] == 2 * bf16["scan"]
