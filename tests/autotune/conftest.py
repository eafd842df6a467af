"""Autotune test set-up: a fresh cache directory per test, no process-wide memo carried over,
and helpers for fake timers and fake tasks (no GPU, no real timing)."""
import pytest

from ssmc.autotune import cache as cache_mod
from ssmc.autotune import tuner as tuner_mod


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSMC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SSMC_AUTOTUNE", raising=False)
    monkeypatch.setattr(cache_mod, "_reported", set())
    monkeypatch.setattr(cache_mod, "_packaged_memo", {})
    monkeypatch.setattr(tuner_mod, "_caches", {})
    yield
