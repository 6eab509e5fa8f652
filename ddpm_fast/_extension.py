"""Loads the compiled ops (ddpm_fast/_C*.so) and says exactly why when it cannot.

Importing ddpm_fast never fails because of the compiled library: the pure-PyTorch and
Triton paths work without it, and asking for a compiled op raises `CompiledOpsUnavailable`
with the reason. A library built against another torch is refused before it is loaded
(loading it would fail with an undefined symbol, or worse, not fail).
"""
from __future__ import annotations

import importlib
import importlib.machinery
import sys
import warnings
from pathlib import Path

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent
BUILD_INFO_MODULE = "_build_info_" + sys.implementation.cache_tag.replace("-", "_")
_REBUILD_HINT = "rebuild with `pip install --no-build-isolation -e .` (or `make build`)"


class CompiledOpsUnavailable(RuntimeError):
    """A compiled (C++/CUDA) op was asked for but the library is missing or was refused."""


def _library_path() -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _PACKAGE_DIR / f"_C{suffix}"
        if path.exists():
            return path
    return None


def _load() -> tuple[bool, str, dict]:
    path = _library_path()
    if path is None:
        return False, f"the compiled library ddpm_fast/_C*.so was not found in {_PACKAGE_DIR}; {_REBUILD_HINT}", {}
    try:  # setup.py writes one per interpreter, beside the library built for it
        build_info = importlib.import_module(f"{__package__}.{BUILD_INFO_MODULE}")
    except ImportError:
        return False, f"{path.name} has no ddpm_fast/{BUILD_INFO_MODULE}.py beside it; {_REBUILD_HINT}", {}
    info = {k: getattr(build_info, k) for k in ("TORCH_VERSION", "CUDA_VERSION", "WITH_CUDA", "CUDA_ARCH_LIST")}
    if info["TORCH_VERSION"] != torch.__version__:
        return False, (f"{path.name} was built against torch {info['TORCH_VERSION']} but torch "
                       f"{torch.__version__} is installed; {_REBUILD_HINT}"), info
    try:
        torch.ops.load_library(str(path))
    except OSError as error:
        return False, f"loading {path} failed: {error}; {_REBUILD_HINT}", info
    return True, "", info


AVAILABLE, REASON, BUILD_INFO = _load()
if not AVAILABLE and _library_path() is not None:
    # A library that exists but is refused is a broken install worth a word at import;
    # a missing one is a normal pure-Python install, reported only when an op is asked for.
    warnings.warn(f"ddpm_fast compiled ops disabled: {REASON}", RuntimeWarning, stacklevel=2)


def require(op: str) -> None:
    """Raise CompiledOpsUnavailable naming `op` and the reason, unless the library is loaded."""
    if not AVAILABLE:
        raise CompiledOpsUnavailable(f"ddpm_fast::{op} needs the compiled ops, which are unavailable: {REASON}")


def cuda_built() -> bool:
    """Whether the loaded library was compiled with its CUDA kernels."""
    return AVAILABLE and bool(BUILD_INFO.get("WITH_CUDA"))


# The x86-64 micro-architecture levels as GCC 12's libgcc tests them for its function
# multiversioning (__builtin_cpu_supports("x86-64-vN"), libgcc's get_available_features), in
# /proc/cpuinfo's flag names (LZCNT is "abm", CMPXCHG16B "cx16"): each level needs the ones before.
X86_64_LEVELS = (
    ("x86-64-v2", ("cx16", "lahf_lm", "popcnt", "sse4_2")),
    ("x86-64-v3", ("avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe")),
    ("x86-64-v4", ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")),
)


def cpu_flags() -> set[str] | None:
    """The first CPU's flags in /proc/cpuinfo, or None where there is none (not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_isa_level(flags: set[str] | None = None) -> str:
    """This CPU's x86-64 level ("x86-64-v4", "x86-64-v3", "x86-64-v2", "x86-64") from its
    flags, or the machine's name where it is not x86-64 or has no /proc/cpuinfo."""
    import platform
    flags = cpu_flags() if flags is None else flags
    if platform.machine() not in ("x86_64", "AMD64") or flags is None:
        return platform.machine() or "unknown"
    level = "x86-64"
    for name, needed in X86_64_LEVELS:
        if not set(needed) <= flags:
            break
        level = name
    return level


def cpu_vector_clone() -> str | None:
    """The clone of the CPU kernels (csrc/cpu/common/loops.h, DDPM_FAST_VECTOR_CLONES) that GCC's
    resolver picked on this CPU: "x86-64-v4", "x86-64-v3", "default", or "none" for a build
    without clones (not x86-64 GCC); None without the compiled library."""
    if not AVAILABLE:
        return None
    import ctypes
    function = ctypes.CDLL(str(_library_path())).ddpm_fast_cpu_vector_clone
    function.restype = ctypes.c_char_p
    return function().decode()


def cpu_dispatch() -> str:
    """One line for reports and CI's log: the CPU kernels' clone, the CPU's level, ATen's."""
    clone = cpu_vector_clone()
    return (f"CPU kernels: {clone + ' clone' if clone else 'not loaded'}; CPU: {cpu_isa_level()}; "
            f"ATen CPU capability: {torch.backends.cpu.get_cpu_capability()}")
