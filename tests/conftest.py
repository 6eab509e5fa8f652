"""Shared fixtures. Tests parametrised over `device` run on the CPU everywhere and on CUDA
where a GPU is present; DDPM_FAST_REQUIRE_CUDA=1 (the GPU report) turns a missing GPU into a
failure instead of a skip. Triton kernels run in Triton's interpreter on machines without
CUDA: TRITON_INTERPRET must be set before any kernel is defined, hence here."""
import inspect
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from helpers import cuda_or_skip  # noqa: E402

# Property-based tests (test_hostile_inputs.py) draw the same examples on every run and machine,
# so a CI result is reproducible and a failure is a code change, not luck: examples come from a
# hash of the test, with no example database. DDPM_FAST_HYPOTHESIS=explore (or pytest's
# --hypothesis-profile=explore) draws fresh random examples to hunt for new failures locally.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, database=None)
settings.load_profile(os.environ.get("DDPM_FAST_HYPOTHESIS", "ci"))


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> torch.device:
    return cuda_or_skip() if request.param == "cuda" else torch.device("cpu")


@pytest.fixture
def triton_device() -> torch.device:
    """Where a Triton kernel runs: the GPU when there is one, else the interpreter on the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(params=["cpu", "triton", "cuda"])
def fused(request, triton_device):
    """(impl, device) of one fused backend: the C++ CPU op, Triton (GPU, or the interpreter on
    the CPU), the CUDA C++ op."""
    impl = request.param
    if impl == "cuda":
        return impl, cuda_or_skip()
    return impl, torch.device("cpu") if impl == "cpu" else triton_device


def pytest_collection_modifyitems(items):
    for item in items:
        params = {str(v) for v in item.callspec.params.values()} if hasattr(item, "callspec") else set()
        asks = inspect.signature(item.function).parameters if hasattr(item, "function") else {}
        triton = "triton" in params or "triton_device" in asks
        if triton or "cuda" in params:
            item.add_marker(pytest.mark.gpu)
        if triton and INTERPRETED:
            item.add_marker(pytest.mark.interpreter)
        if item.get_closest_marker("slow"):  # past 2³¹ elements: one at a time under pytest-xdist
            item.add_marker(pytest.mark.xdist_group("large"))
