"""The compiled library: built, loaded, every schema backed by a CPU kernel and, in the sources,
by a CUDA kernel (checked in the dispatcher too wherever the CUDA ops were built, GPU or not;
skipped, by name, where they were not), and clear failures when it is missing or stale."""
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ddpm_fast
from ddpm_fast import _extension
from helpers import REQUIRE_CUDA

ROOT = Path(__file__).resolve().parents[1]
OPS = re.findall(r'm\.def\(\s*"(\w+)\(', (ROOT / "csrc" / "ops.cpp").read_text())


def test_the_library_is_built_and_loaded():
    assert OPS, "csrc/ops.cpp defines no op"
    assert _extension.AVAILABLE, _extension.REASON
    assert _extension.BUILD_INFO["TORCH_VERSION"] == torch.__version__


def _cuda_built_or_skip() -> None:
    """The CUDA dispatch checks run where the CUDA ops were built; elsewhere an honest skip (a
    failure under DDPM_FAST_REQUIRE_CUDA=1, as for every CUDA test)."""
    if not _extension.cuda_built():
        if REQUIRE_CUDA:
            pytest.fail("DDPM_FAST_REQUIRE_CUDA=1 but the CUDA ops were not built")
        pytest.skip("the CUDA ops were not built here (no nvcc, a CPU-only torch, or DDPM_FAST_CUDA=0)")


def test_cuda_ops_are_built_wherever_nvcc_is_found():
    # A build that silently skipped csrc/cuda would leave every CUDA kernel unchecked on CPU-only CI.
    nvcc = shutil.which("nvcc") or os.environ.get("CUDA_HOME")
    if not (nvcc and torch.version.cuda):
        pytest.skip(f"the CUDA ops cannot be built here: nvcc={nvcc}, torch.version.cuda={torch.version.cuda}")
    if os.environ.get("DDPM_FAST_CUDA") == "0":
        pytest.skip("DDPM_FAST_CUDA=0: the CUDA ops were not asked for")
    assert _extension.cuda_built(), "nvcc and a CUDA torch are present but the CUDA ops were not built"


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_its_kernels(op):
    name = f"ddpm_fast::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), f"{name} has no CPU kernel"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Meta"), f"{name} has no fake kernel"


def test_no_op_schema_has_default_arguments():
    # torch 2.11's custom_op bumps the version counter of a mutated argument by its schema index
    # after the dispatcher dropped trailing arguments equal to their defaults: diffusion_step's
    # Triton op raised IndexError on every call with history=None (ddpm_fast/ops/diffusion_step.py).
    # So no schema of ours, C++ or Python custom op, has a default; the public wrappers hold them.
    import ddpm_fast.ops  # noqa: F401  (registers the Triton custom ops)
    names = [n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("ddpm_fast::")]
    assert set(OPS) <= set(names) and any(n.endswith("_triton") or n.endswith("_triton_") for n in names), names
    for name in names:
        packet = getattr(torch.ops.ddpm_fast, name)
        for overload in packet.overloads():
            schema = getattr(packet, overload)._schema
            defaults = [a.name for a in schema.arguments if a.has_default_value()]
            assert not defaults, f"ddpm_fast::{name} has default arguments {defaults}: {schema}"


def test_every_op_has_a_cuda_kernel_in_the_sources():
    # On any machine, built or not: the kernels csrc/cuda/*.cu register, with the CUDA kernels
    # ddpm_fast/ops registers in Python (a Triton kernel where there is no CUDA C++ one), cover
    # every schema, and each CPU kernel file has its CUDA counterpart of the same stem.
    cuda_sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    in_cuda = set()
    for source in cuda_sources:
        block = re.search(r"TORCH_LIBRARY_IMPL\(ddpm_fast, CUDA, m\) \{(.*?)\}", source.read_text(), re.S)
        assert block, f"csrc/cuda/{source.name} registers no CUDA kernel"
        in_cuda |= set(re.findall(r'm\.impl\(\s*"(\w+)"', block.group(1)))
    in_python = {op for path in (ROOT / "ddpm_fast" / "ops").glob("*.py")
                 for op in re.findall(r'torch\.library\.impl\(\s*"ddpm_fast::(\w+)",\s*"CUDA"\)', path.read_text())}
    assert in_cuda | in_python == set(OPS) and not in_cuda & in_python, (in_cuda, in_python)
    assert {p.stem for p in cuda_sources} == {p.stem for p in (ROOT / "csrc" / "cpu").glob("*.cpp")}


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_its_cuda_kernel_where_built(op):
    _cuda_built_or_skip()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ddpm_fast::{op}", "CUDA"), f"{op} has no CUDA kernel"


def _registering_files(key: str) -> set:
    files = set()
    for op in OPS:
        # lines read "CPU: registered at /path/csrc/cpu/noise.cpp:53 :: (schema) [ boxed unboxed ]"
        files.update(re.findall(rf"^{key}: registered at (\S+):\d+", torch._C._dispatch_dump(f"ddpm_fast::{op}"), re.M))
    return files


def _assert_every_file_registers(key: str, folder: str, pattern: str) -> None:
    # A .cpp/.cu file that compiles but registers nothing fails here.
    registered = _registering_files(key)
    for source in sorted((ROOT / "csrc" / folder).glob(pattern)):
        suffix = f"csrc/{folder}/{source.name}"
        assert any(f.endswith(suffix) for f in registered), f"{suffix} registers no {key} kernel"


def test_every_kernel_file_registers_kernels():
    _assert_every_file_registers("CPU", "cpu", "*.cpp")
    _assert_every_file_registers(r"Autograd\[alias\]", "autograd", "*.cpp")


def test_every_cuda_kernel_file_registers_kernels_where_built():
    _cuda_built_or_skip()
    _assert_every_file_registers("CUDA", "cuda", "*.cu")


def _run_package_copy(tmp_path: Path, with_library: bool, code: str, torch_version: str | None = None):
    source = Path(ddpm_fast.__file__).parent
    ignore = ["__pycache__"] + ([] if with_library else ["_C.*"])
    shutil.copytree(source, tmp_path / "ddpm_fast", ignore=shutil.ignore_patterns(*ignore))
    if torch_version is not None:
        info = tmp_path / "ddpm_fast" / f"{_extension.BUILD_INFO_MODULE}.py"
        info.write_text(re.sub(r"TORCH_VERSION = .*", f"TORCH_VERSION = {torch_version!r}", info.read_text()))
    prelude = f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "default"})


def test_import_works_without_the_library_and_says_what_is_missing(tmp_path):
    result = _run_package_copy(tmp_path, with_library=False, code="""
        import warnings
        warnings.simplefilter("error")  # a library that is simply absent is not worth a warning
        import ddpm_fast as df
        assert df.__file__.startswith(sys.path[0]), df.__file__
        z = df.randn((2, 3), seed=0, step=1)  # impl="auto" falls back to the reference
        assert z.shape == (2, 3)
        try:
            df.randn((2, 3), seed=0, step=1, impl="cpu")
        except df.CompiledOpsUnavailable as error:
            print("ERROR:", error)
    """)
    assert result.returncode == 0, result.stderr
    assert "ERROR: ddpm_fast::randn needs the compiled ops" in result.stdout
    assert "_C*.so was not found" in result.stdout and "pip install" in result.stdout


def test_a_library_built_for_another_torch_is_refused(tmp_path):
    result = _run_package_copy(tmp_path, with_library=True, torch_version="1.0.0+elsewhere", code="""
        import ddpm_fast as df
        assert df.__file__.startswith(sys.path[0]), df.__file__
        try:
            df.ops.philox4x32_10(__import__("torch").zeros(1, 4, dtype=__import__("torch").int64), 0, impl="cpu")
        except df.CompiledOpsUnavailable as error:
            print("ERROR:", error)
    """)
    assert result.returncode == 0, result.stderr
    for text in (result.stderr, result.stdout):  # the import warning and the op's error
        assert "built against torch 1.0.0+elsewhere" in text and f"torch {torch.__version__} is installed" in text
