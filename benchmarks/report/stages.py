"""The report's stages. Each runs on its own (`--stage NAME`), writes its logs and records
into the report folder and returns the problems it found; the caller re-renders report.md
after each, so a run cut off part-way keeps every stage it finished — and, since conftest.py
appends each benchmark's record as soon as it is measured, every benchmark too: a benchmark
stage run again into the same folder resumes where it stopped (--fresh starts it over).

    env        make gpu-check's first stage: the peaks below, into env.jsonl (the environment line)
    build      install carried wheels (.whl/*.whl), then build the ops (CUDA ones on a GPU)
    tests      the test suite; on a GPU every CUDA test must run and pass
    peaks      copy bandwidth and matmul rates: the ceilings everything is divided by
    ops        diffusion_step, group_norm_silu, attention against their baselines
    e2e        one U-Net step and sampling runs, both models, every baseline
    breakdown  torch.profiler shares of one U-Net step
    plot       speedup.png

make gpu-check (check.py) runs env, build, tests, ops, e2e with a hard time cap on each.
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

from benchmarks.report import analysis, check, junit, plot, stream
from benchmarks.report.environment import ROOT

BENCHMARKS = {
    "env": ["test_peaks.py"],
    "peaks": ["test_peaks.py"],
    "ops": ["test_step.py", "test_vb_terms.py", "test_group_norm.py", "test_attention.py"],
    "e2e": ["test_unet_step.py", "test_sampling.py", "test_dpm_solver.py", "test_bound.py", "test_adm.py"],
    "breakdown": ["test_breakdown.py"],
}
ALL = ("env", "build", "tests", "peaks", "ops", "e2e", "breakdown", "plot")
GRACE_S = 60  # past the budget, a stage still gets this long to finish its current benchmark
INTERRUPT_GRACE_S = 10  # a stopped stage's command gets this long between SIGINT and SIGKILL


def default_stages(on_gpu: bool) -> tuple[str, ...]:
    """Everything but env (make gpu-check's peaks) on a GPU (a bare machine: build first, then
    the tests); on a CPU the ops are built already (make build) and the tests run separately
    (make test)."""
    return tuple(n for n in ALL if n != "env") if on_gpu else ("peaks", "ops", "e2e", "breakdown", "plot")


@dataclass
class Context:
    report_dir: Path
    quick: bool
    fresh: bool  # measure the benchmark stages anew rather than resume them
    deadline: float | None  # Unix time after which no new benchmark starts
    on_gpu: bool
    check: bool = False  # make gpu-check's cut: its test selection, build settings and benchmark sizes
    cap_until: float | None = None  # Unix time at which the running stage is killed (make gpu-check)

    def kill_at(self) -> float | None:
        """When a stage's command is killed: the budget's deadline plus grace, or the stage's cap."""
        ends = [t for t in (self.deadline and self.deadline + GRACE_S, self.cap_until) if t]
        return min(ends) if ends else None

    def start_by(self) -> float | None:
        """After when no benchmark starts: the budget's deadline or the stage's cap."""
        ends = [t for t in (self.deadline, self.cap_until) if t]
        return min(ends) if ends else None


def run(name: str, ctx: Context) -> list[str]:
    if name == "build":
        return _build(ctx)
    if name == "tests":
        return _tests(ctx)
    if name == "plot":
        return _plot(ctx)
    return _benchmarks(name, ctx)


def _call(cmd: list[str], log: Path, ctx: Context, env: dict | None = None) -> int:
    """Run cmd with output to log; past the deadline (plus grace) or the stage's cap it is stopped
    (stop()) and -9 returned."""
    timeout = None if ctx.kill_at() is None else max(1.0, ctx.kill_at() - time.time())
    with log.open("w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            f.write("\n[report] stopped: the time budget or the stage's cap was used up\n")
            return -9


def stop(proc: subprocess.Popen, grace_s: float = INTERRUPT_GRACE_S) -> None:
    """Stop a stage's command as Ctrl-C would, then for good: SIGINT to its process group lets
    pytest finish its reports (junit.xml, the benchmarks' tracebacks) within grace_s; then SIGKILL
    to the group and to every descendant, wherever it went — ninja starts each compiler in a
    process group of its own, so nvcc and cc1plus would outlive a signal to the group alone."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    for _ in range(10):  # a dying parent may have started one more child: until none is left
        survivors = descendants(proc.pid) + ([proc.pid] if proc.poll() is None else [])
        if not survivors:
            break
        for pid in survivors:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        time.sleep(0.1)
    proc.wait()


def descendants(pid: int) -> list[int]:
    """Every living process below pid (children, theirs, …), read from /proc, whatever their group."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":  # a zombie is dead already
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children.get(child, [])
    return found


def _build(ctx: Context) -> list[str]:
    problems = []
    wheels = sorted(str(p) for p in (ROOT / ".whl").glob("*.whl"))
    if wheels:
        rc = _call([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", *wheels],
                   ctx.report_dir / "wheels.log", ctx)
        if rc:
            problems.append(f"installing the carried wheels failed (exit {rc}): see wheels.log")
    env = {"DDPM_FAST_CUDA": "1"} if ctx.on_gpu else {}
    rc = _call([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
               ctx.report_dir / "build.log", ctx, {**env, **check.BUILD_ENV} if ctx.check else env)
    if rc:
        problems.append(f"build failed (exit {rc}): see build.log")
    return problems


def _tests(ctx: Context, paths: tuple[str, ...] = ("tests",)) -> list[str]:
    xml, streamed = ctx.report_dir / "junit.xml", outcomes(ctx, "tests")
    xml.unlink(missing_ok=True)
    streamed.unlink(missing_ok=True)
    selection = check.test_args() if ctx.check else ["-q"]
    rc = _call([sys.executable, "-m", "pytest", *paths, *selection, "-rs", "-p", "no:cacheprovider",
                "-p", "benchmarks.report.stream", f"--junitxml={xml}"],
               ctx.report_dir / "tests.log", ctx,
               {stream.ENV: str(streamed), **({"DDPM_FAST_REQUIRE_CUDA": "1"} if ctx.on_gpu else {})})
    # the streamed outcomes hold every test that finished, a stage stopped at its cap included
    summary = junit.summarize_stream(streamed)
    (ctx.report_dir / "tests.json").write_text(json.dumps(summary, indent=1))
    cut = [f"stage tests was stopped at its time cap after {summary['tests']} tests: outcomes/tests.jsonl and "
           f"tests.log have what finished"] if rc == -9 else []
    return cut + junit.problems(summary, 0 if cut else rc, ctx.on_gpu)


def _benchmarks(name: str, ctx: Context) -> list[str]:
    results = ctx.report_dir / f"{name}.jsonl"
    if ctx.fresh:
        results.unlink(missing_ok=True)  # else a stage run again resumes: its recorded benchmarks are skipped
    files = check.BENCHMARKS.get(name, BENCHMARKS[name]) if ctx.check else BENCHMARKS[name]
    cmd = [sys.executable, "-m", "pytest", *(f"benchmarks/{f}" for f in files), "--benchmark-only",
           "-q", "-p", "no:cacheprovider", "-p", "benchmarks.report.stream", f"--results={results}"]
    cmd += (["--quick"] if ctx.quick else []) + (["--check"] if ctx.check else [])
    # each benchmark's outcome (a failure's traceback too) as it ends: a stopped stage keeps them
    env = {stream.ENV: str(outcomes(ctx, name))}
    env.update({"DDPM_FAST_BENCH_DEADLINE": str(ctx.start_by())} if ctx.start_by() else {})
    rc = _call(cmd, ctx.report_dir / f"{name}.log", ctx, env)
    if rc == -9:
        return [f"stage {name} was cut off at the time budget or its cap: run it again to resume (see {name}.log)"]
    if rc:
        return [f"benchmarks of stage {name} failed (pytest exit {rc}): see {name}.log"]
    if ctx.start_by() and time.time() > ctx.start_by():
        return [f"stage {name} ran out of time budget, some benchmarks were skipped: run it again to resume"]
    return []


def outcomes(ctx: Context, stage: str) -> Path:
    """Where stream.py writes a stage's per-test outcomes: beside the records (the folder's *.jsonl,
    which analysis.load reads), not among them."""
    folder = ctx.report_dir / "outcomes"
    folder.mkdir(exist_ok=True)
    return folder / f"{stage}.jsonl"


def _plot(ctx: Context) -> list[str]:
    try:
        plot.write(ctx.report_dir, analysis.load(ctx.report_dir))
    except ImportError as error:
        return [str(error)]
    return []
