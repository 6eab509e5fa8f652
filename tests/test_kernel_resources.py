"""Every Triton launch config compiles, without a GPU, within the resources of a target it can
be chosen on, and the built CUDA C++ library within those of every target it holds (DESIGN §5.5,
benchmarks/kernel_resources.py): shared memory within the opt-in limit, no stack or local memory
but the accepted frames, 16-bit dots on tensor cores, PTX for the newest target. Compiled results
are cached under build/kernel-resources/ (`make kernel-report` fills it)."""
import re

import pytest
import torch

pytest.importorskip("triton")
import emulator  # noqa: E402
from benchmarks import kernel_resources as kr  # noqa: E402
from ddpm_fast import _extension  # noqa: E402
from ddpm_fast.kernels import attention, diffusion_step, group_norm_silu, vb_terms  # noqa: E402

# Attention's configs depend on the target family, so each is compiled for every family: sm_80;
# sm_86, whose limits sm_89 and sm_120 share; sm_90 (wgmma); sm_100 (tcgen05).
FAMILIES = [t for t in kr.TARGETS if t.cc in (80, 86, 90, 100)]
# The step's, GroupNorm's and the bound's term's configs are the same on every target (test_same_configs_on_every_target):
# each is compiled once, for the six targets in turn, which keeps CI to minutes; the report
# compiles every one for every target.
SAME_EVERYWHERE = {"diffusion_step": diffusion_step, "group_norm_silu": group_norm_silu, "vb_terms": vb_terms}
MODULES = {"attention": attention, **SAME_EVERYWHERE}
JOBS = ([("attention", config["name"], target.cc) for target in FAMILIES
         for config in attention.launch_configs(target.capability)]
        + [(module, config["name"], kr.TARGETS[i % len(kr.TARGETS)].cc) for module, m in SAME_EVERYWHERE.items()
           for i, config in enumerate(m.launch_configs(kr.TARGETS[0].capability))])


@pytest.fixture(scope="module")
def compiled():
    return dict(zip(JOBS, kr.compile_all(JOBS)))


@pytest.mark.parametrize("job", JOBS, ids=lambda job: f"{job[1]}-sm_{job[2]}")
def test_config_within_target_resources(compiled, job):
    module, name, cc = job
    target = next(t for t in kr.TARGETS if t.cc == cc)
    config = next(c for c in MODULES[module].launch_configs(target.capability) if c["name"] == name)
    record = compiled[job]
    assert kr.violations(record, target, config["kernel"].__name__) == []
    want = kr.expected_dot(config, target)
    assert want is None or record["dot"] == want


@pytest.mark.parametrize("module", SAME_EVERYWHERE)
def test_same_configs_on_every_target(module):
    names = [[c["name"] for c in SAME_EVERYWHERE[module].launch_configs(t.capability)] for t in kr.TARGETS]
    assert all(n == names[0] for n in names)


def test_every_target_family_tested():
    # the limits of the other targets are those of a tested one (the report compiles them all)
    for target in kr.TARGETS:
        assert any(f.shared_optin <= target.shared_optin for f in FAMILIES)


@pytest.fixture(scope="module")
def library():
    """(path, TORCH_CUDA_ARCH_LIST) of the built library with its CUDA kernels (CI builds them)."""
    if not _extension.cuda_built():
        pytest.skip("the compiled library was built without its CUDA kernels")
    return _extension._library_path(), _extension.BUILD_INFO["CUDA_ARCH_LIST"]


def _capabilities(arch_list: str) -> list[int]:
    return [int(arch.removesuffix("+PTX").replace(".", "")) for arch in arch_list.replace(" ", ";").split(";")]


def test_cuda_kernels_within_target_resources(library):
    path, arch_list = library
    records = kr.cuda_usage(path)
    assert {r["target"] for r in records} == {f"sm_{cc}" for cc in _capabilities(arch_list)}
    by_name = {t.name: t for t in kr.TARGETS}
    found = {(r["name"], r["target"]): kr.violations(r, by_name[r["target"]], kr.base_name(r["name"]))
             for r in records}
    assert {key: v for key, v in found.items() if v} == {}


def test_group_norm_launch_shared_memory_within_limits(library):
    # the launcher's plan (csrc/cuda/group_norm_silu.cuh, run by the emulator's build of it) beside each
    # GroupNorm kernel's static shared memory in the cubins: static + dynamic within 48 KiB, or within
    # the target's opt-in limit where the launcher opts in, for every group size up to the largest it
    # caches. cuobjdump counts 1,088 B for the 64 B float32 scratch (1 KiB more: the size the runtime
    # reserves a block on sm_80 and later); the plan holds for whichever the runtime reports.
    plan = emulator.ops().group_norm_shared_plan
    default = 48 * 1024
    by_name = {t.name: t for t in kr.TARGETS}
    records = [r for r in kr.cuda_usage(library[0]) if kr.base_name(r["name"]) == "group_norm_silu_kernel"]
    assert records
    for r in records:
        static, optin = r["shared"], by_name[r["target"]].shared_optin
        largest = optin - static  # the largest group it caches
        for group in sorted({0, 4, default - static, default - static + 4, default, largest, largest + 4}):
            cached, dynamic, opt_in = plan(group, static, optin)
            assert static + dynamic <= (optin if opt_in else default), (r["name"], r["target"], group)
        assert plan(largest, static, optin) == (True, largest, True)


def test_cuda_library_carries_ptx_for_its_newest_target(library):
    # PTX for the newest target lets GPUs newer than every cubin load the library (JIT, DESIGN §8)
    path, arch_list = library
    newest = max(_capabilities(arch_list))
    sources = {p.name for p in (kr.ROOT / "csrc" / "cuda").glob("*.cu")}
    assert kr.ptx_archs(path) == {source: {newest} for source in sources}


def test_cuda_kernel_names_drop_the_per_compile_hash():
    # nvcc names anonymous-namespace kernels with a hash that changes with every compile
    mangled = ["_ZN9ddpm_fast56_GLOBAL__N__9fa41b49_17_diffusion_step_cu_6d57ca61_1124711step_kernelIfEEvPfPKT_S2_"
               "NS_8Layout4dES6_NS_10NoiseShapeEPKfPKlSB_lmj",
               "_ZN9ddpm_fast56_GLOBAL__N__9fa41b49_17_diffusion_step_cu_fce8b9e8_1400711step_kernelIfEEvPfPKT_S2_"
               "NS_8Layout4dES6_NS_10NoiseShapeEPKfPKlSB_lmj"]
    assert kr.kernel_names(mangled) == ["step_kernel<float>", "step_kernel<float>"]


def test_group_norm_counts_and_offsets_are_64_bit():
    # Triton multiplies two int32 values in int32: a group of C/G·H·W > 2³¹ elements made the count
    # negative (NaN statistics) and c·sc wrapped in large NCHW samples (tests/test_large_tensors.py,
    # GPU only). In the compiled IR of the forward (one and three passes) and the backward, every
    # tensor product (the offsets) is 64-bit, and the count divided into the sums comes from an i64.
    shapes = [((1, 128, 32, 32), 32, False), ((1, 64, 64, 64), 1, False), ((1, 128, 32, 32), 32, True)]
    jobs = [("group_norm_silu", group_norm_silu.select(shape, groups, torch.float32, backward, (9, 0))["name"], 90)
            for shape, groups, backward in shapes]
    for (_, name, _), ttir in zip(jobs, kr.compile_all(jobs, ir=True)):
        narrow = re.findall(r"arith\.muli .*: tensor<[0-9x]*xi32>", ttir)
        assert not narrow, f"{name}: 32-bit offset products {narrow}"
        counts = re.findall(r"arith\.sitofp %\S+ : (\w+) to f32", ttir)
        assert counts and set(counts) == {"i64"}, f"{name}: counts converted from {counts}"


def test_every_group_norm_config_can_be_chosen():
    # launch_configs is exactly what select() can return: each (channels, positions) group shape
    # of powers of two up to past the chunk and on-chip limits, forward and backward
    chosen = {group_norm_silu.select((1, 1 << c, 1, 1 << p), 1, dtype, backward, (9, 0))["name"]
              for c in range(15) for p in range(16) for dtype in group_norm_silu._TYPES for backward in (False, True)}
    assert chosen == {config["name"] for config in group_norm_silu.launch_configs((9, 0))}


@pytest.mark.parametrize("capability", [t.capability for t in kr.TARGETS])
def test_launchers_choose_from_launch_configs(capability):
    names = {c["name"] for c in attention.launch_configs(capability)}
    for head_dim in (1, 17, 64, 100, 256, 320, 512):
        for dtype in attention._TYPES:
            for precision in ("tf32x3", "ieee", "tf32"):
                assert attention.select(head_dim, dtype, precision, capability)["name"] in names
    names = {c["name"] for c in diffusion_step.launch_configs(capability)}
    for quads in (1, 3, 768, 10 ** 6):
        for history, uncond, grad, var in diffusion_step.VARIANTS:
            assert diffusion_step.select(quads, torch.float16, history, capability, uncond, grad, var)["name"] in names
    names = {c["name"] for c in group_norm_silu.launch_configs(capability)}
    for shape, groups in (((1, 128, 32, 32), 32), ((2, 384, 32, 32), 32), ((1, 128, 256, 256), 32),
                          ((1, 8192, 2, 2), 1), ((1, 3, 1, 1), 3)):
        for backward in (False, True):
            assert group_norm_silu.select(shape, groups, torch.bfloat16, backward, capability)["name"] in names


def test_capability_below_sm80_refused():
    with pytest.raises(ValueError, match="capability"):
        attention.launch_configs((7, 5))
