"""make gpu-check: the report's stages cut to one GPU lease (docs/DESIGN.md §8), each under a
hard time cap, so that one run fits about eight and a half minutes and a run cut off anywhere
still returns what it measured:

    env    20 s aimed, 30 s cap   the environment line: machine, versions, copy bandwidth, matmul
    build  120 s cap              carried wheels, then the ops for sm_90 (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16)
    tests  180 s cap              every test that runs on the GPU (the `gpu` mark, tests/conftest.py),
                                  none skipped, none in Triton's interpreter, each one timed
    ops     90 s cap              the ops at the real shapes (benchmarks/settings.py, --check)
    e2e     90 s cap              one end-to-end figure: CIFAR-10 at batch 256, 20-step runs

A stage past its cap is killed; the benchmarks streamed so far stay, and a stage run again
into the same folder resumes. Where the machine returns only a few files, `--archive FILE`
keeps one .tar.gz of the folder up to date (every ARCHIVE_EVERY_S seconds and after each stage).
"""
from __future__ import annotations

import importlib.util
import os
import tarfile
import threading
from pathlib import Path

STAGES = ("env", "build", "tests", "ops", "e2e")
CAPS_S = {"env": 30, "build": 120, "tests": 180, "ops": 90, "e2e": 90}
# the end-to-end figures: sampling runs (DDPM/DDIM and DPM-Solver++), no one-step timing
BENCHMARKS = {"e2e": ["test_sampling.py", "test_dpm_solver.py"]}
# the GPU machine's 16 cores; a rehearsal on a smaller machine passes its own MAX_JOBS
BUILD_ENV = {"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": os.environ.get("MAX_JOBS", "16")}
TEST_TIMEOUT_S = 90  # one test's limit where pytest-timeout is installed (the GPU image has it)
# ~845 GPU tests, 60 distinct Triton compiles among the fp32 attention cases: on the GPU
# machine's 16 cores, 12 pytest-xdist workers (the image has the plugin) leave the build's
# and the driver's threads room and bring the stage under its 180 s cap
WORKERS = 12
ARCHIVE_EVERY_S = 10


def test_args() -> list[str]:
    """pytest's arguments: the GPU tests, each one's time (verbose lines stream into tests.log;
    stream.py's tests.jsonl, --durations and junit.xml keep the times), and where the plugins are
    installed a limit per test and GPU_CHECK_WORKERS processes (default WORKERS; 0 runs them in
    one), the tests past 2³¹ elements (10–13 GB each) all in one of them (tests/conftest.py's
    xdist_group), so that no two share the GPU's memory."""
    args = ["-m", "gpu and not interpreter", "-v", "--durations=25"]
    if importlib.util.find_spec("pytest_timeout"):
        args.append(f"--timeout={TEST_TIMEOUT_S}")
    workers = int(os.environ.get("GPU_CHECK_WORKERS") or WORKERS)
    if workers and importlib.util.find_spec("xdist"):
        args += ["-n", str(workers), "--dist", "loadgroup"]
    return args


def cap_s(stage: str) -> float:
    """A stage's cap; GPU_CHECK_CAP_SCALE stretches every cap for a rehearsal on a machine slower
    than the GPU machine (2 CPU cores build the ops in minutes where 16 take one)."""
    return CAPS_S[stage] * float(os.environ.get("GPU_CHECK_CAP_SCALE") or 1)


class Archive:
    """`with Archive(folder, path):` keeps `path`, a .tar.gz of `folder`, up to date: every
    ARCHIVE_EVERY_S seconds, on `update()` and on leaving. Each write replaces the file whole."""

    def __init__(self, folder: Path, path: Path | None):
        self.folder, self.path = folder, path
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the timer and the stage loop both write
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Archive:
        if self.path:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.path:
            self._stop.set()
            self._thread.join()
            self.update()

    def _loop(self) -> None:
        while not self._stop.wait(ARCHIVE_EVERY_S):
            self.update()

    def update(self) -> None:
        if not self.path:
            return
        partial = self.path.with_name(self.path.name + ".partial")
        with self._lock:
            with tarfile.open(partial, "w:gz") as tar:
                tar.add(self.folder, arcname=self.folder.name)
            os.replace(partial, self.path)
