"""The host emulator of the CUDA C++ kernels (csrc/emulator/, DESIGN §5.6): the ops' host sides and
kernel bodies from csrc/cuda/<op>.cuh, compiled by the host compiler into build/emulator-<torch
version>/ once per checkout and torch (ninja rebuilds it when a source or header changes) and run on
CPU tensors as torch.ops.ddpm_fast_emulator.*."""
import functools
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def ops():
    from torch.utils import cpp_extension
    build = ROOT / "build" / f"emulator-{torch.__version__}"
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name="ddpm_fast_emulator", sources=[str(ROOT / "csrc" / "emulator" / "kernels.cpp")],
                       extra_cflags=["-O2", "-Wno-unknown-pragmas"], build_directory=str(build),
                       is_python_module=False, verbose=False)
    return torch.ops.ddpm_fast_emulator
