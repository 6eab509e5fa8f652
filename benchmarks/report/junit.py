"""The test stage's verdict, read from the outcomes benchmarks/report/stream.py streamed as the
tests ran (or from pytest's junit XML): on a GPU every CUDA test must run and pass
(DDPM_FAST_REQUIRE_CUDA=1 makes the suite fail rather than skip them; a CUDA test skipped anyway
is still reported as a failure). A CUDA test is known by its skip reason, tests/helpers.py's
cuda_or_skip() message, never by its name: a test's deliberate CPU-parameter skip
(test_cuda_graph_loop_without_host_syncs[cpu]) is not one."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

NO_CUDA = "no CUDA device"  # cuda_or_skip()'s skip reason
SLOWEST = 15  # per-test times the summary keeps


def summarize_junit(path: Path) -> dict:
    """Counts, the names of failed and skipped tests, `cuda_skips` (skipped for want of a CUDA
    device) and the slowest tests with their seconds."""
    outcomes = {}
    if path.exists():
        for case in ET.parse(path).getroot().iter("testcase"):
            skip = case.find("skipped")
            outcome = ("failed" if case.find("failure") is not None or case.find("error") is not None
                       else "skipped" if skip is not None else "passed")
            outcomes[f"{case.get('classname')}::{case.get('name')}"] = (
                outcome, skip.get("message", "") if skip is not None else "", float(case.get("time") or 0))
    return _summary(outcomes)


def summarize_stream(path: Path) -> dict:
    """The same summary from stream.py's lines: every test that finished before a cut-off counts."""
    outcomes = {}
    lines = path.read_text().splitlines() if path.exists() else []
    for r in map(json.loads, filter(None, lines)):
        earlier = outcomes.get(r["nodeid"])
        if earlier is None or earlier[0] == "passed" or r["outcome"] == "failed":  # a failed teardown fails it
            outcomes[r["nodeid"]] = (r["outcome"], r["reason"], r["seconds"] + (earlier[2] if earlier else 0.0))
    return _summary(outcomes)


def _summary(outcomes: dict[str, tuple[str, str, float]]) -> dict:
    summary = {"tests": len(outcomes), "passed": 0, "failed": [], "skipped": [], "cuda_skips": [], "slowest": []}
    for name, (outcome, reason, _) in outcomes.items():
        if outcome == "failed":
            summary["failed"].append(name)
        elif outcome == "skipped":
            summary["skipped"].append(f"{name}: {reason}")
            if NO_CUDA in reason:
                summary["cuda_skips"].append(name)
        else:
            summary["passed"] += 1
    times = sorted(((seconds, name) for name, (_, _, seconds) in outcomes.items()), reverse=True)
    summary["slowest"] = [[name, seconds] for seconds, name in times[:SLOWEST]]
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
