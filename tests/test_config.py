"""The SSMC_* environment variables (`ssmc.config`): an invalid value is a ConfigError (an
SSMCError and a ValueError) naming the variable and the valid values."""
import pytest

import ssmc
from ssmc import config
from ssmc.ops import mamba2


@pytest.mark.parametrize("var, value, read, message", [
    ("SSMC_BACKEND", "cuda", config.backend,
     "SSMC_BACKEND='cuda' is not valid; valid values: auto, triton, tvm, reference"),
    ("SSMC_AUTOTUNE", "always", config.autotune,
     "SSMC_AUTOTUNE='always' is not valid; valid values: off, cached, full"),
    ("SSMC_DEBUG", "loud", config.debug_level,
     "SSMC_DEBUG='loud' is not valid; expected an integer 0, 1 or 2"),
])
def test_invalid_value_is_a_config_error(monkeypatch, var, value, read, message):
    monkeypatch.setenv(var, value)
    with pytest.raises(ssmc.ConfigError) as info:
        read()
    assert str(info.value) == message
    assert isinstance(info.value, ssmc.SSMCError) and isinstance(info.value, ValueError)


def test_invalid_backend_variable_reported_by_compile(monkeypatch):
    monkeypatch.setenv("SSMC_BACKEND", "cuda")
    with pytest.raises(ssmc.ConfigError, match=r"^SSMC_BACKEND='cuda' is not valid"):
        ssmc.compile(mamba2)
