"""Shared fixtures of the backend tests."""
import pytest


@pytest.fixture(scope="module")
def kernel_cache_per_module(tmp_path_factory):
    """A fresh SSMC_CACHE_DIR for one test module: its kernels are generated, not read from an
    earlier run's cache, and other modules do not see them."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SSMC_CACHE_DIR", str(tmp_path_factory.mktemp("ssmc_cache")))
    yield
    mp.undo()
