"""Which clone of the CPU kernels runs (csrc/cpu/common/loops.h, DDPM_FAST_VECTOR_CLONES):
never the baseline on a CPU with AVX2 and FMA (x86-64-v3, most cloud x86 CPUs), the AVX-512 one
where AVX-512 F/BW/CD/DQ/VL are present. The library's probe is multiversioned on the same
targets as the kernels (csrc/cpu/common/vector_clones.cpp), so GCC's resolver answers for both."""
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ddpm_fast import _extension

V3_OR_ABOVE = ("x86-64-v3", "x86-64-v4")


@pytest.fixture
def clone() -> str:
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"not x86-64 ({platform.machine()}): the CPU kernels are built without clones")
    assert _extension.AVAILABLE, _extension.REASON
    clone = _extension.cpu_vector_clone()
    if clone == "none":
        pytest.skip("the library was built without GCC's target_clones (not GCC): one generic kernel")
    if _extension.cpu_flags() is None:
        pytest.skip("no /proc/cpuinfo to read the CPU's level from")
    return clone


def test_the_clone_is_the_cpus_level(clone):
    level = _extension.cpu_isa_level()
    assert clone == (level if level in V3_OR_ABOVE else "default"), (clone, level)


def test_a_cpu_with_avx2_and_fma_never_runs_the_baseline_clone(clone):
    level = _extension.cpu_isa_level()
    if level not in V3_OR_ABOVE:
        pytest.skip(f"this CPU is {level}, below x86-64-v3: the baseline clone is the right one")
    assert clone != "default", f"an {level} CPU runs the baseline (SSE2) clone of the CPU kernels"


def test_an_avx512_cpu_runs_the_v4_clone(clone):
    level = _extension.cpu_isa_level()
    if level != "x86-64-v4":
        pytest.skip(f"this CPU is {level}, without AVX-512 F/BW/CD/DQ/VL")
    assert clone == "x86-64-v4"


def test_an_avx2_only_cpu_runs_the_v3_clone(clone):
    # valgrind's CPU is this one without AVX-512 (its CPUID hides what it cannot run): an AVX2-only
    # CPU, such as a Zen 3, on any machine at or above x86-64-v3. The library is loaded alone
    # (ctypes), not with torch's import, which would take minutes under valgrind.
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed: no AVX2-only CPU to load the library on")
    if _extension.cpu_isa_level() not in V3_OR_ABOVE:
        pytest.skip(f"this CPU is {_extension.cpu_isa_level()}, below x86-64-v3")
    import torch
    code = textwrap.dedent(f"""
        import ctypes
        lib = ctypes.CDLL({str(_extension._library_path())!r})
        probe = lib.ddpm_fast_cpu_vector_clone
        probe.restype = ctypes.c_char_p
        print("clone:", probe().decode())
    """)
    torch_lib = str(Path(torch.__file__).parent / "lib")  # the library's libtorch and libc10
    result = subprocess.run(["valgrind", "-q", sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=600, env={"LD_LIBRARY_PATH": torch_lib, "PATH": "/usr/bin:/bin"})
    lines = [line for line in result.stdout.splitlines() if line.startswith("clone:")]
    assert result.returncode == 0 and lines, result.stderr[-2000:]
    assert lines[-1] == "clone: x86-64-v3", result.stdout
