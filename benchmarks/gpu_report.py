"""The one GPU report (DESIGN §8): build the CUDA ops on this machine, run the whole test
suite on the GPU, run the benchmarks, and write what happened into REPORT_DIR:

    report.md         GPU, versions, commit, phase times, pass/fail/skip counts, verdict
    build.log  tests.log  junit.xml  benchmarks.log  benchmarks.json

Run as `make gpu-report` (or `python3 benchmarks/gpu_report.py`) where torch and triton are
installed; it needs no network. Exits non-zero when there is no GPU, the build or a test
fails, or a test that runs on CUDA was skipped (DDPM_FAST_REQUIRE_CUDA=1 makes the suite
fail rather than skip those; Triton-interpreter tests are the only skips allowed).
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], log: Path, env: dict | None = None) -> tuple[int, float]:
    start = time.perf_counter()
    with log.open("w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    return rc, time.perf_counter() - start


def _output(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment() -> dict[str, str]:
    import torch
    import triton
    nvcc = _output(["nvcc", "--version"]).splitlines()
    return {
        "date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "gpu": _output(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
        or (torch.cuda.get_device_name() if torch.cuda.is_available() else "none"),
        "commit": os.environ.get("DDPM_FAST_COMMIT") or _output(["git", "rev-parse", "HEAD"]) or "unknown",
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda})",
        "triton": triton.__version__,
        "nvcc": nvcc[-1] if nvcc else "not found",
        "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
    }


def summarize_junit(path: Path) -> dict:
    """Counts and the names of failed and skipped tests; `cuda_skips` are skipped tests that
    would have run on CUDA (their id names cuda), which the report does not allow."""
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


def main() -> int:
    report_dir = Path(os.environ.get("REPORT_DIR") or ROOT / "benchmarks" / "results" /
                      f"{datetime.date.today().isoformat()}-gpu").resolve()
    report_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    env = environment()
    import torch
    problems = [] if torch.cuda.is_available() else ["no CUDA device: torch.cuda.is_available() is False"]

    phases = {}
    rc, phases["build"] = _run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
                               report_dir / "build.log", {"DDPM_FAST_CUDA": "1"})
    if rc:
        problems.append(f"build failed (exit {rc}): see build.log")
    junit = report_dir / "junit.xml"
    rc, phases["tests"] = _run([sys.executable, "-m", "pytest", "tests", "-q", "-rs", f"--junitxml={junit}"],
                               report_dir / "tests.log", {"DDPM_FAST_REQUIRE_CUDA": "1"})
    tests = summarize_junit(junit)
    if tests["tests"] == 0:
        problems.append("no test ran: see tests.log")
    if rc or tests["failed"]:
        problems.append(f"tests failed (pytest exit {rc}): {len(tests['failed'])} failing")
    if tests["cuda_skips"]:
        problems.append(f"{len(tests['cuda_skips'])} CUDA tests were skipped")
    if any(ROOT.glob("benchmarks/test_*.py")):
        rc, phases["benchmarks"] = _run(
            [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only",
             f"--benchmark-json={report_dir / 'benchmarks.json'}"], report_dir / "benchmarks.log")
        if rc:
            problems.append(f"benchmarks failed (exit {rc}): see benchmarks.log")

    lines = ["# ddpm_fast GPU report", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    lines += ["", "## Phases", ""] + [f"- {k}: {v:.1f} s" for k, v in phases.items()]
    lines += ["", "## Tests", "",
              f"{tests['tests']} tests: {tests['passed']} passed, {len(tests['failed'])} failed, "
              f"{len(tests['skipped'])} skipped", ""]
    lines += [f"- FAILED {name}" for name in tests["failed"]]
    lines += [f"- skipped {entry}" for entry in tests["skipped"]]
    lines += ["", "## Verdict", "", "PASS" if not problems else "FAIL"] + [f"- {p}" for p in problems]
    (report_dir / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nreport written to {report_dir}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
