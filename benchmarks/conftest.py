"""Shared benchmark plumbing: honest timing (DESIGN §7) and a ratio table at the end.

Each benchmark times a function that synchronises the device itself; warm-up rounds run
before timing and pytest-benchmark quotes the median. Results are also collected here so the
terminal summary can print every op's ratio to the eager reference measured in the same run.
"""
import pytest
import torch

RESULTS: dict = {}


def synchronized(fn, device: torch.device):
    if device.type == "cuda":
        def run():
            fn()
            torch.cuda.synchronize(device)
        return run
    return fn


@pytest.fixture
def measure(benchmark):
    """measure(group, name, fn, device, bytes_moved): time fn and record median and GB/s."""
    def run(group: str, name: str, fn, device: torch.device, bytes_moved: int):
        benchmark.group = group
        benchmark.pedantic(synchronized(fn, device), rounds=20, iterations=1, warmup_rounds=3)
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(bytes_moved=bytes_moved, gb_per_s=bytes_moved / median / 1e9)
        RESULTS.setdefault(group, {})[name] = (median, bytes_moved)
        return median
    return run


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    terminalreporter.section("ddpm_fast: ratios to the eager reference (same run, medians)")
    for group, results in RESULTS.items():
        eager = results.get("eager")
        for name, (median, bytes_moved) in results.items():
            ratio = f"{eager[0] / median:6.2f}x" if eager else "   n/a"
            terminalreporter.write_line(f"{group:40s} {name:16s} {median * 1e3:9.3f} ms "
                                        f"{bytes_moved / median / 1e9:8.2f} GB/s  {ratio} vs eager")
