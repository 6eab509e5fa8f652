"""The test stage's verdict, read from pytest's junit XML: on a GPU every CUDA test must run
and pass (DDPM_FAST_REQUIRE_CUDA=1 makes the suite fail rather than skip them; a CUDA test
skipped anyway is still reported as a failure). Triton-interpreter tests are the only skips
allowed there."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path


def summarize_junit(path: Path) -> dict:
    """Counts and the names of failed and skipped tests; `cuda_skips` are skipped tests that
    would have run on CUDA (their id names cuda)."""
    summary = {"tests": 0, "passed": 0, "failed": [], "skipped": [], "cuda_skips": []}
    if not path.exists():
        return summary
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        summary["tests"] += 1
        if case.find("failure") is not None or case.find("error") is not None:
            summary["failed"].append(name)
        elif (skip := case.find("skipped")) is not None:
            summary["skipped"].append(f"{name}: {skip.get('message', '')}")
            if "cuda" in name.lower():
                summary["cuda_skips"].append(name)
        else:
            summary["passed"] += 1
    return summary


def problems(summary: dict, pytest_rc: int, on_gpu: bool) -> list[str]:
    """What fails the report: no test ran, a failure, or (on a GPU) a skipped CUDA test."""
    found = []
    if summary["tests"] == 0:
        found.append("no test ran: see tests.log")
    if pytest_rc or summary["failed"]:
        found.append(f"tests failed (pytest exit {pytest_rc}): {len(summary['failed'])} failing")
    if on_gpu and summary["cuda_skips"]:
        found.append(f"{len(summary['cuda_skips'])} CUDA tests were skipped")
    return found
