"""Every attention and diffusion-step launch config compiles, without a GPU, for each target
family it can be chosen on, within that target's resources (DESIGN §5.5,
benchmarks/kernel_resources.py): shared memory within the opt-in limit, no stack or local
memory, 16-bit dots on tensor cores; so do the kernels of the built CUDA C++ library, for every
target it holds, and it carries PTX for its newest. GroupNorm's 2,184 configs a target are sampled: the
largest tile of each kernel for each BLOCK_C (its register-heaviest), float32, with add and
SiLU. Compiled results are cached under build/kernel-resources/ (`make kernel-report` fills it)."""
import pytest
import torch

pytest.importorskip("triton")
from benchmarks import kernel_resources as kr  # noqa: E402
from ddpm_fast import _extension  # noqa: E402
from ddpm_fast.kernels import attention, diffusion_step, group_norm_silu  # noqa: E402

# One target per family (its configs are the same within one: launch_configs is keyed by capability):
# sm_86 has the smallest shared-memory limit of Ampere/Ada/consumer Blackwell, sm_90 wgmma, sm_100 tcgen05.
FAMILIES = [t for t in kr.TARGETS if t.cc in (80, 86, 90, 100)]


def _group_norm_sample(capability):
    return [c for c in group_norm_silu.launch_configs(capability) if "_fp32_add_silu_" in c["name"]
            and c["constexprs"]["BLOCK_C"] * c["constexprs"]["BLOCK_P"] == (
                group_norm_silu.ON_CHIP_ELEMENTS if c["constexprs"].get("ONE_PASS") else group_norm_silu.CHUNK_ELEMENTS)]


CONFIGS = {"attention": attention.launch_configs, "diffusion_step": diffusion_step.launch_configs,
           "group_norm_silu": _group_norm_sample}
JOBS = [(module, config["name"], target.cc) for module, configs in CONFIGS.items() for target in FAMILIES
        for config in configs(target.capability)]


@pytest.fixture(scope="module")
def compiled():
    return dict(zip(JOBS, kr.compile_all(JOBS)))


# Open findings, listed in benchmarks/results/kernel-resources.md: 8 B of stack a thread in these
# GroupNorm tiles (registers 80–128, so not register pressure; not yet explained). strict: a fix shows.
OPEN = {("group_norm_silu_bwd_fp32_add_silu_1x1024", 86), ("group_norm_silu_bwd_fp32_add_silu_8x128", 86),
        ("group_norm_silu_fwd_three_pass_fp32_add_silu_512x2", 90)}


@pytest.mark.parametrize("job", [pytest.param(job, marks=pytest.mark.xfail(strict=True, reason="open finding"))
                                 if job[1:] in OPEN else job for job in JOBS], ids=lambda job: f"{job[1]}-sm_{job[2]}")
def test_config_within_target_resources(compiled, job):
    module, name, cc = job
    target = next(t for t in kr.TARGETS if t.cc == cc)
    config = next(c for c in CONFIGS[module](target.capability) if c["name"] == name)
    record = compiled[job]
    assert kr.violations(record, target, config["kernel"].__name__) == []
    want = kr.expected_dot(config, target)
    assert want is None or record["dot"] == want


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


@pytest.mark.parametrize("capability", [t.capability for t in kr.TARGETS])
def test_launchers_choose_from_launch_configs(capability):
    names = {c["name"] for c in attention.launch_configs(capability)}
    for head_dim in (1, 17, 64, 100, 256, 320, 512):
        for dtype in attention._TYPES:
            for precision in ("tf32x3", "ieee", "tf32"):
                assert attention.select(head_dim, dtype, precision, capability)["name"] in names
    names = {c["name"] for c in diffusion_step.launch_configs(capability)}
    for quads in (1, 3, 768, 10 ** 6):
        for history in (False, True):
            assert diffusion_step.select(quads, torch.float16, history, capability)["name"] in names
    names = {c["name"] for c in group_norm_silu.launch_configs(capability)}
    for shape, groups in (((1, 128, 32, 32), 32), ((2, 384, 32, 32), 32), ((1, 128, 256, 256), 32),
                          ((1, 8192, 2, 2), 1), ((1, 3, 1, 1), 3)):
        for backward in (False, True):
            assert group_norm_silu.select(shape, groups, torch.bfloat16, True, False, backward,
                                          capability)["name"] in names


def test_capability_below_sm80_refused():
    with pytest.raises(ValueError, match="capability"):
        attention.launch_configs((7, 5))
