"""Test set-up. Without CUDA, Triton kernels run under the interpreter, which must be switched on
before triton is first imported."""
import os

try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SSMC_VERIFY_IR", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from tests.interpreter_scan import install   # noqa: E402

    install()

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _nan_filled_empty(monkeypatch):
    """torch.empty returns NaNs in tests, so outputs a kernel forgot to write show up."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            with torch.no_grad():  # leaves that require grad (torch.compile makes some) too
                t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)


def pytest_addoption(parser):
    group = parser.getgroup("fuzz", "differential fuzz tests (tests/backends/*/test_fuzz.py, "
                                    "tests/fuzzing.py; defaults there)")
    group.addoption("--fuzz-count", type=int, default=None,
                    help="cases of each backend's fuzz test in all, split over its shards "
                         "(a case: one value draw, checked on every lowering)")
    group.addoption("--fuzz-cases-per-definition", type=int, default=None,
                    help="cases checked on each drawn definition, reusing its kernels")
    group.addoption("--fuzz-shards", type=int, default=None,
                    help="tests each backend's fuzz cases are split over (parallel workers "
                         "share them)")
    group.addoption("--fuzz-stop-at", type=float, default=None,
                    help="time (seconds since the epoch) after which no new definition starts")
    group.addoption("--fuzz-report", default=None,
                    help="file each fuzz shard appends a JSON line of what it ran to")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
