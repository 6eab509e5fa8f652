"""Shared benchmark plumbing: the --quick sizes, honest timing (DESIGN §7) and the records.

`measure` times a function that synchronises the device itself, after warm-up rounds, and
quotes pytest-benchmark's median. Each result carries its work (bytes moved, flops, images)
and the derived rates in extra_info, and — when the run was given --results FILE — is
appended to that JSON-lines file as soon as it is measured, so a run cut off part-way (a
10-minute GPU lease, slow max-autotune compiles) keeps everything it finished, and a run into
the same file resumes: what it holds already is skipped. The report (python -m
benchmarks.report) reads those files. DDPM_FAST_BENCH_DEADLINE (a Unix time) makes
the benchmarks not yet started skip once it has passed.
"""
import json
import os
import time

import pytest

from benchmarks import settings
from benchmarks.timing import synchronized

RESULTS: dict = {}  # group -> name -> median seconds, for the ratio summary and vs_eager


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="ddpm_fast: reduced sizes and rounds (a smoke test)")
    parser.addoption("--check", action="store_true", help="ddpm_fast: make gpu-check's sizes (on a GPU)")
    parser.addoption("--results", default=None, help="ddpm_fast: append every result to this JSON-lines file")


def pytest_configure(config):
    settings.QUICK = config.getoption("--quick")
    settings.CHECK = config.getoption("--check")
    path = config.getoption("--results")
    # a run resumed into the same results file skips what it has measured at these sizes already
    config.ddpm_fast_recorded = set()
    if path and os.path.exists(path):
        with open(path) as f:
            config.ddpm_fast_recorded = {r["test"] for r in map(json.loads, f)
                                         if (r.get("quick"), r.get("check", False)) == (settings.QUICK, settings.CHECK)}


def pytest_collection_modifyitems(config, items):
    if config.getoption("--check"):  # make gpu-check: a stage stopped at its cap keeps what matters most
        items.sort(key=_check_order)


def _check_order(item) -> tuple[int, int]:
    """(role, dtype) of an op benchmark, for make gpu-check's order: ours first, then the baseline a
    GPU goal is judged against (torch.compile of the op, SDPA), then the rest; bfloat16 before
    float32. The sort is stable: otherwise the collected order (e2e: workloads.cases())."""
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec else {}
    impl = str(params.get("impl", ""))
    if item.originalname == "test_fused" or impl.startswith("fused"):
        role = 0
    elif (item.originalname == "test_compiled_reference" and not params.get("z_given")) or impl == "sdpa":
        role = 1
    else:
        role = 2
    return role, 0 if str(params.get("dtype")) == "torch.bfloat16" else 1


def pytest_runtest_setup(item):
    if item.nodeid in item.config.ddpm_fast_recorded:
        pytest.skip("measured already: its record is in the --results file")
    deadline = os.environ.get("DDPM_FAST_BENCH_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("the report's time budget is used up")


@pytest.fixture
def measure(benchmark, request):
    """measure(group, name, fn, bytes_moved=0, flops=0, images=0, rounds=None, warmup=None, **info):
    time fn (warm-up rounds excluded, median quoted), record its rates and return the median.
    `name` "eager" is the group's eager reference; names starting "fused" or "ours" are ours,
    every other name a baseline. Extra keyword arguments go into extra_info as they are."""
    def run(group: str, name: str, fn, bytes_moved: int = 0, flops: int = 0, images: int = 0,
            rounds: int | None = None, warmup: int | None = None, **info):
        benchmark.group = group
        sizes = settings.sizes()
        benchmark.pedantic(synchronized(fn, settings.DEVICE), rounds=rounds or sizes.rounds, iterations=1,
                           warmup_rounds=sizes.warmup if warmup is None else warmup)
        stats = benchmark.stats.stats
        median = stats.median
        extra = dict(info, group=group, name=name, bytes_moved=bytes_moved, flops=flops, images=images)
        if bytes_moved:
            extra["gb_per_s"] = bytes_moved / median / 1e9
        if flops:
            extra["tflop_per_s"] = flops / median / 1e12
        if images:
            extra["images_per_s"] = images / median
        eager = RESULTS.get(group, {}).get("eager")
        if eager:
            extra["vs_eager"] = eager / median
        benchmark.extra_info.update(extra)
        RESULTS.setdefault(group, {})[name] = median
        _append(request.config.getoption("--results"),
                dict(extra, median_s=median, min_s=stats.min, max_s=stats.max, mean_s=stats.mean,
                     stddev_s=stats.stddev, rounds=stats.rounds, quick=settings.QUICK, check=settings.CHECK,
                     test=request.node.nodeid))
        return median
    return run


def _append(path, record: dict) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    terminalreporter.section("ddpm_fast: ratios to the eager reference (same run, medians)")
    for group, results in RESULTS.items():
        eager = results.get("eager")
        for name, median in results.items():
            ratio = f"{eager / median:6.2f}x" if eager else "   n/a"
            terminalreporter.write_line(f"{group:52s} {name:28s} {median * 1e3:11.3f} ms  {ratio} vs eager")
