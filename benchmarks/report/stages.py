"""The report's stages. Each runs on its own (`--stage NAME`), writes its logs and records
into the report folder and returns the problems it found; the caller re-renders report.md
after each, so a run cut off part-way keeps every stage it finished — and, since conftest.py
appends each benchmark's record as soon as it is measured, every benchmark too: a benchmark
stage run again into the same folder resumes where it stopped (--fresh starts it over).

    build      install carried wheels (.whl/*.whl), then build the ops (CUDA ones on a GPU)
    tests      the test suite; on a GPU every CUDA test must run and pass
    peaks      copy bandwidth and matmul rates: the ceilings everything is divided by
    ops        diffusion_step, group_norm_silu, attention against their baselines
    e2e        one U-Net step and sampling runs, both models, every baseline
    breakdown  torch.profiler shares of one U-Net step
    plot       speedup.png
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.report import analysis, junit, plot
from benchmarks.report.environment import ROOT

BENCHMARKS = {
    "peaks": ["test_peaks.py"],
    "ops": ["test_step.py", "test_group_norm.py", "test_attention.py"],
    "e2e": ["test_unet_step.py", "test_sampling.py"],
    "breakdown": ["test_breakdown.py"],
}
ALL = ("build", "tests", "peaks", "ops", "e2e", "breakdown", "plot")
GRACE_S = 60  # past the budget, a stage still gets this long to finish its current benchmark


def default_stages(on_gpu: bool) -> tuple[str, ...]:
    """Everything on a GPU (a bare machine: build first, then the tests); on a CPU the ops are
    built already (make build) and the tests run separately (make test)."""
    return ALL if on_gpu else ("peaks", "ops", "e2e", "breakdown", "plot")


@dataclass
class Context:
    report_dir: Path
    quick: bool
    fresh: bool  # measure the benchmark stages anew rather than resume them
    deadline: float | None  # Unix time after which no new benchmark starts
    on_gpu: bool


def run(name: str, ctx: Context) -> list[str]:
    if name == "build":
        return _build(ctx)
    if name == "tests":
        return _tests(ctx)
    if name == "plot":
        return _plot(ctx)
    return _benchmarks(name, ctx)


def _call(cmd: list[str], log: Path, ctx: Context, env: dict | None = None) -> int:
    """Run cmd with output to log; past the deadline (plus grace) its process group is killed."""
    timeout = None if ctx.deadline is None else max(1.0, ctx.deadline + GRACE_S - time.time())
    with log.open("w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            f.write("\n[report] killed: the time budget was used up\n")
            return -9


def _build(ctx: Context) -> list[str]:
    problems = []
    wheels = sorted(str(p) for p in (ROOT / ".whl").glob("*.whl"))
    if wheels:
        rc = _call([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", *wheels],
                   ctx.report_dir / "wheels.log", ctx)
        if rc:
            problems.append(f"installing the carried wheels failed (exit {rc}): see wheels.log")
    rc = _call([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
               ctx.report_dir / "build.log", ctx, {"DDPM_FAST_CUDA": "1"} if ctx.on_gpu else None)
    if rc:
        problems.append(f"build failed (exit {rc}): see build.log")
    return problems


def _tests(ctx: Context) -> list[str]:
    xml = ctx.report_dir / "junit.xml"
    rc = _call([sys.executable, "-m", "pytest", "tests", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}"],
               ctx.report_dir / "tests.log", ctx, {"DDPM_FAST_REQUIRE_CUDA": "1"} if ctx.on_gpu else None)
    summary = junit.summarize_junit(xml)
    (ctx.report_dir / "tests.json").write_text(json.dumps(summary, indent=1))
    return junit.problems(summary, rc, ctx.on_gpu)


def _benchmarks(name: str, ctx: Context) -> list[str]:
    results = ctx.report_dir / f"{name}.jsonl"
    if ctx.fresh:
        results.unlink(missing_ok=True)  # else a stage run again resumes: its recorded benchmarks are skipped
    cmd = [sys.executable, "-m", "pytest", *(f"benchmarks/{f}" for f in BENCHMARKS[name]), "--benchmark-only",
           "-q", "-p", "no:cacheprovider", f"--results={results}"] + (["--quick"] if ctx.quick else [])
    env = {"DDPM_FAST_BENCH_DEADLINE": str(ctx.deadline)} if ctx.deadline else {}
    rc = _call(cmd, ctx.report_dir / f"{name}.log", ctx, env)
    if rc == -9:
        return [f"stage {name} was cut off at the time budget: run it again to resume (see {name}.log)"]
    if rc:
        return [f"benchmarks of stage {name} failed (pytest exit {rc}): see {name}.log"]
    if ctx.deadline and time.time() > ctx.deadline:
        return [f"stage {name} ran out of time budget, some benchmarks were skipped: run it again to resume"]
    return []


def _plot(ctx: Context) -> list[str]:
    try:
        plot.write(ctx.report_dir, analysis.load(ctx.report_dir))
    except ImportError as error:
        return [str(error)]
    return []
