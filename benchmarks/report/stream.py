"""A pytest plugin (`-p benchmarks.report.stream`) that appends each test's outcome to the JSON-lines
file named by DDPM_FAST_TEST_STREAM the moment it is known, one line a test, flushed: a test stage
killed at its cap (make gpu-check) keeps the verdict of every test that finished, where junit.xml,
written only when pytest exits, would hold nothing. Under pytest-xdist the workers' reports reach
the controller's hooks, so one process writes the file.

A line: {"nodeid", "outcome": "passed" | "failed" | "skipped", "when", "seconds", "reason"}, and for
a failure "traceback", the text pytest would print only at the end of the session.
"""
from __future__ import annotations

import json
import os

ENV = "DDPM_FAST_TEST_STREAM"


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get(ENV)
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):
        return  # a worker's own hook: the controller writes the line
    # one line a test: its call phase, or the setup/teardown phase that failed or skipped it
    if report.when != "call" and report.passed:
        return
    reason = ""
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2]  # (file, line, "Skipped: <reason>")
    elif report.failed:
        reason = str(report.longrepr).splitlines()[-1] if report.longrepr else ""
    record = dict(nodeid=report.nodeid, outcome=report.outcome, when=report.when,
                  seconds=round(report.duration, 3), reason=reason)
    if report.failed:
        record["traceback"] = report.longreprtext
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
