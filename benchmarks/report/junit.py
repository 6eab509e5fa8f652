"""The test stage's verdict, read from pytest's junit XML: on a GPU every CUDA test must run
and pass (DDPM_FAST_REQUIRE_CUDA=1 makes the suite fail rather than skip them; a CUDA test
skipped anyway is still reported as a failure). A CUDA test is known by its skip reason,
tests/helpers.py's cuda_or_skip() message, never by its name: a test's deliberate CPU-parameter
skip (test_cuda_graph_loop_without_host_syncs[cpu]) is not one."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

NO_CUDA = "no CUDA device"  # cuda_or_skip()'s skip reason
SLOWEST = 15  # per-test times the summary keeps


def summarize_junit(path: Path) -> dict:
    """Counts, the names of failed and skipped tests, `cuda_skips` (skipped for want of a CUDA
    device) and the slowest tests with their seconds."""
    summary = {"tests": 0, "passed": 0, "failed": [], "skipped": [], "cuda_skips": [], "slowest": []}
    if not path.exists():
        return summary
    times = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        times.append((float(case.get("time") or 0), name))
        summary["tests"] += 1
        if case.find("failure") is not None or case.find("error") is not None:
            summary["failed"].append(name)
        elif (skip := case.find("skipped")) is not None:
            reason = skip.get("message", "")
            summary["skipped"].append(f"{name}: {reason}")
            if NO_CUDA in reason:
                summary["cuda_skips"].append(name)
        else:
            summary["passed"] += 1
    summary["slowest"] = [[name, seconds] for seconds, name in sorted(times, reverse=True)[:SLOWEST]]
    return summary


def problems(summary: dict, pytest_rc: int, on_gpu: bool) -> list[str]:
    """What fails the report: no test ran, a failure, or (on a GPU) a test skipped for want of CUDA."""
    found = []
    if summary["tests"] == 0:
        found.append("no test ran: see tests.log")
    if pytest_rc or summary["failed"]:
        found.append(f"tests failed (pytest exit {pytest_rc}): {len(summary['failed'])} failing")
    if on_gpu and summary["cuda_skips"]:
        found.append(f"{len(summary['cuda_skips'])} CUDA tests were skipped")
    return found
