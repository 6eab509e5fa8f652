"""What the report says about the machine it ran on: hardware, software versions, commit,
load. Every value is read on the machine itself; nothing is assumed."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def output(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gib() -> str:
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        return f"{kb / 2 ** 20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        return "unknown"


def machine_slug() -> str:
    """The name part of a report folder: the GPU's model (h100, h200, ...) or cpu-<N>core."""
    import torch
    if torch.cuda.is_available():
        words = torch.cuda.get_device_name().replace("NVIDIA", "").split()
        model = next((w for w in words if re.search(r"\d", w)), words[0] if words else "gpu")
        return re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-") or "gpu"
    return f"cpu-{os.cpu_count()}core"


def default_report_dir() -> Path:
    return ROOT / "benchmarks" / "results" / f"{datetime.date.today().isoformat()}-{machine_slug()}"


def environment() -> dict[str, str]:
    import torch
    import triton

    from benchmarks.rotation import last_level_cache_bytes
    from ddpm_fast import _extension
    try:
        import diffusers
        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = "not installed (its baselines are skipped)"
    nvcc = output(["nvcc", "--version"]).splitlines()
    gpu = output(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    dirty = " (uncommitted changes)" if output(["git", "status", "--porcelain", "--untracked-files=no"]) else ""
    on_gpu = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if on_gpu else None
    return {
        "date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "gpu": gpu or (torch.cuda.get_device_name() if on_gpu else "none"),
        "gpu multiprocessors": str(props.multi_processor_count) if props else "none",
        "cpu": f"{cpu_model()}, {os.cpu_count()} logical cores, {memory_gib()}",
        # the ISA level and the CPU kernels' clone that ran (an AVX2-only CPU once ran a clone 3-4x slower)
        "cpu dispatch": _extension.cpu_dispatch(),
        "torch threads": str(torch.get_num_threads()),
        "last-level cache": f"{last_level_cache_bytes() / 2 ** 20:.0f} MiB",
        "commit": (os.environ.get("DDPM_FAST_COMMIT") or output(["git", "rev-parse", "HEAD"]) or "unknown") + dirty,
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda})",
        "triton": triton.__version__,
        "diffusers": diffusers_version,
        "nvcc": nvcc[-1] if nvcc else "not found",
    }


def fresh_environment() -> dict[str, str]:
    """environment() read by a new interpreter: after the build stage has installed the carried
    wheels (diffusers), this process's imports and version caches predate them."""
    code = "import json; from benchmarks.report.environment import environment; print(json.dumps(environment()))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if result.returncode:
        raise RuntimeError(f"reading the environment failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.splitlines()[-1])
