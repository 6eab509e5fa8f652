"""make gpu-check-rehearsal: the first GPU lease's plan (make gpu-check, DESIGN §8) run here, on
the CPU, as the lease will run it, and its outcome checked.

    python -m benchmarks.report.rehearse --python PY [--out DIR]

PY is an interpreter with the GPU image's packages and versions (the Makefile builds it:
.venv-gpu-image, Python 3.12, torch 2.11.0, triton 3.6.0, numpy 2.5.2, no diffusers). As the
device tool does, the working tree is copied — tracked files and untracked ones git does not
ignore, plus the carried .whl/ — without .git (the commit travels as DDPM_FAST_COMMIT), and held
to the lease's 64 MiB. There `make gpu-check` runs with GPU_CHECK_ARCHIVE, as the README's
command does, and then every stage's plumbing is checked: each stage ran and recorded its
environment; the build stage installed the carried wheels the way the lease does (diffusers
appears in the report after it, "not installed" before); the tests ran with no failure and
every CUDA test skipped for want of a device only; the ops and e2e benchmarks streamed records;
the archive holds the report. Caps are stretched by GPU_CHECK_CAP_SCALE (this machine builds in
minutes what 16 cores build in one). The verdict logic itself — a stage cut at its cap, a skip
for want of CUDA, a failure — is checked against planted outcomes by tests/test_report.py.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from benchmarks.report import check
from benchmarks.report.environment import ROOT

LEASE_BYTES = 64 << 20  # what the device tool carries at most
CAP_SCALE = "6"  # 2 shared cores against the GPU machine's 16
CHECK_DIR = "build/gpu-check"


def carried_files() -> list[Path]:
    """What the device tool copies: tracked files, untracked files git does not ignore, .whl/."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    files = [Path(name) for name in listed if name and (ROOT / name).is_file()]
    return files + sorted(p.relative_to(ROOT) for p in (ROOT / ".whl").glob("*.whl"))


def copy_tree(target: Path) -> int:
    """The carried files under target; their total size in bytes."""
    if target.exists():
        shutil.rmtree(target)
    total = 0
    for name in carried_files():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target / name)
        total += (ROOT / name).stat().st_size
    return total


def image_state(python: str, wheels: list[str]) -> None:
    """The GPU image as it comes: without the carried packages, which an earlier rehearsal's build
    stage installed into the same interpreter."""
    names = [wheel.split("-")[0] for wheel in wheels]
    subprocess.run([python, "-m", "pip", "uninstall", "-y", "-q", *names], check=True, capture_output=True)


def run_check(tree: Path, python: str, out: Path, commit: str) -> int:
    # GIT_CEILING_DIRECTORIES: the copy has no .git, and git must not find the checkout around it
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tree.parent), "DDPM_FAST_COMMIT": commit,
           "GPU_CHECK_DIR": CHECK_DIR,
           "GPU_CHECK_ARCHIVE": str(out / "gpu-check.tar.gz"), "GPU_CHECK_CAP_SCALE": CAP_SCALE,
           "MAX_JOBS": str(os.cpu_count() or 1), "GPU_CHECK_WORKERS": str(os.cpu_count() or 1)}
    env.pop("VIRTUAL_ENV", None)
    with (out / "make-gpu-check.log").open("w") as log:
        return subprocess.run(["make", "gpu-check", f"PYTHON={python}"], cwd=tree, env=env, stdout=log,
                              stderr=subprocess.STDOUT).returncode


def findings(tree: Path, out: Path, commit: str, wheels: list[str]) -> list[str]:
    """What is wrong with the rehearsed run (empty: every stage worked as planned)."""
    found = []
    folder = tree / CHECK_DIR
    meta = json.loads((folder / "meta.json").read_text())
    for stage in check.STAGES:
        if stage not in meta["stages"]:
            found.append(f"stage {stage} did not run")
        elif meta["stages"][stage]["problems"]:
            found.append(f"stage {stage}: {meta['stages'][stage]['problems']}")
    env = meta["environment"]
    if not env["commit"].startswith(commit):
        found.append(f"the report names commit {env['commit']!r}, not {commit} (DDPM_FAST_COMMIT)")
    diffusers = next((w.split("-")[1] for w in wheels if w.startswith("diffusers-")), None)
    if diffusers and env["diffusers"] != diffusers:
        found.append(f"after the build stage the report says diffusers {env['diffusers']!r}, "
                     f"but the carried wheel is {diffusers}")
    tests = json.loads((folder / "tests.json").read_text())
    if tests["tests"] == 0 or tests["failed"]:
        found.append(f"tests: {tests['tests']} ran, failed: {tests['failed']}")
    not_cuda = [s for s in tests["skipped"] if "no CUDA device" not in s]
    if not_cuda:
        found.append(f"GPU tests skipped for another reason than a missing device: {not_cuda[:5]}")
    for stage in ("ops", "e2e"):
        path = folder / f"{stage}.jsonl"
        if not path.exists() or not path.read_text().strip():
            found.append(f"stage {stage} streamed no benchmark record")
    with tarfile.open(out / "gpu-check.tar.gz") as archive:
        if f"{folder.name}/report.md" not in archive.getnames():
            found.append("the archive holds no report.md")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report.rehearse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", required=True, help="an interpreter with the GPU image's packages")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gpu-check-rehearsal")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    tree = out / "tree"
    out.mkdir(parents=True, exist_ok=True)
    wheels = sorted(p.name for p in (ROOT / ".whl").glob("*.whl"))
    if not wheels:
        print("rehearsal: no carried wheels in .whl/ (make wheels)", file=sys.stderr)
        return 2
    size = copy_tree(tree)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    print(f"rehearsal: the carried tree is {size / 2 ** 20:.1f} MiB (the lease carries {LEASE_BYTES >> 20} MiB)")
    problems = [f"the carried tree is {size} B, over the lease's {LEASE_BYTES} B"] if size > LEASE_BYTES else []
    image_state(args.python, wheels)
    rc = run_check(tree, args.python, out, commit)
    print((out / "make-gpu-check.log").read_text()[-6000:])
    problems += findings(tree, out, commit, wheels)
    if rc and not problems:
        problems.append(f"make gpu-check exited {rc} without a stage reporting a problem")
    for problem in problems:
        print(f"rehearsal: {problem}")
    print(f"rehearsal: {'FAILED' if problems else 'passed'}; the report is {tree / CHECK_DIR / 'report.md'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
