"""Builds ddpm_fast's compiled ops with ninja (torch.utils.cpp_extension.BuildExtension).

The CPU ops are always built. The CUDA ops are built too when nvcc and a CUDA build of
torch are both found, so every .cu file is compiled and linked even on machines with no
GPU. DDPM_FAST_CUDA=0 or 1 forces the choice; TORCH_CUDA_ARCH_LIST picks the targets
(default: Ampere and Hopper). The metadata lives in pyproject.toml.
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _set_cuda_home() -> None:
    # torch takes CUDA_HOME from `which nvcc`'s parent folder, which is wrong when nvcc is
    # a wrapper script outside the toolkit (/usr/local/bin/nvcc → /usr/local/cuda-X/bin).
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [Path(os.path.realpath(nvcc)).parent.parent] if nvcc else []
    candidates += [Path("/usr/local/cuda"), *sorted(Path("/usr/local").glob("cuda-*"), reverse=True)]
    for home in candidates:
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists():
            os.environ["CUDA_HOME"] = str(home)
            return


_set_cuda_home()
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;9.0+PTX")  # PTX: loads on newer GPUs (JIT)

import torch  # noqa: E402  (CUDA_HOME must be settled before cpp_extension reads it)
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _build_cuda() -> bool:
    available = torch.version.cuda is not None and CUDA_HOME is not None
    choice = os.environ.get("DDPM_FAST_CUDA", "auto")
    if choice == "1" and not available:
        raise SystemExit(
            f"DDPM_FAST_CUDA=1 but the CUDA ops cannot be built: torch.version.cuda={torch.version.cuda}, "
            f"CUDA_HOME={CUDA_HOME} (set CUDA_HOME to the CUDA toolkit's folder)")
    return available if choice == "auto" else choice == "1"


def _pip_cuda_include_dirs() -> list:
    # ATen's CUDA headers include cuBLAS/cuSPARSE; a toolkit installed without them can
    # borrow the headers that torch's pip dependencies (nvidia-*) ship.
    if (Path(CUDA_HOME) / "include" / "cublas_v2.h").exists():
        return []
    try:
        import nvidia
    except ImportError:
        return []
    return [str(inc) for base in nvidia.__path__ for inc in sorted(Path(base).glob("*/include"))
            if (inc / "cublas_v2.h").exists()]


def _write_build_info(with_cuda: bool) -> None:
    # Read at import time: a library built against another torch is refused before it is
    # loaded, with both versions named, instead of failing on an undefined symbol. One file per
    # interpreter, like the library's own name (_C.cpython-312-...so): a checkout that holds
    # builds for two Pythons (make test and make test-oldest) keeps each one's facts.
    tag = sys.implementation.cache_tag.replace("-", "_")
    (ROOT / "ddpm_fast" / f"_build_info_{tag}.py").write_text(
        '"""Written by setup.py when the compiled ops are built; not tracked by git."""\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"CUDA_VERSION = {torch.version.cuda if with_cuda else None!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_ARCH_LIST = {os.environ['TORCH_CUDA_ARCH_LIST'] if with_cuda else None!r}\n")


def _extension():
    with_cuda = _build_cuda()
    _write_build_info(with_cuda)
    # cpu/<op>.cpp register kernels; cpu/common/ holds what several of them share; autograd/<op>.cpp
    # registers an op's autograd for every device
    sources = [str(p.relative_to(ROOT)) for p in [CSRC / "ops.cpp", *sorted((CSRC / "autograd").glob("*.cpp")),
                                                  *sorted((CSRC / "cpu").rglob("*.cpp"))]]
    cxx = ["-O3", "-fopenmp"]  # torch adds the C++ standard it was built with
    if not with_cuda:
        return CppExtension("ddpm_fast._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=["-fopenmp"])
    sources += [str(p.relative_to(ROOT)) for p in sorted((CSRC / "cuda").glob("*.cu"))]
    return CUDAExtension("ddpm_fast._C", sources, include_dirs=_pip_cuda_include_dirs(),
                         extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
                         extra_link_args=["-fopenmp"])


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
