"""Compile every Triton kernel config (each kernels module's launch_configs) and every CUDA C++
kernel for each supported GPU target on this CPU machine, read their resources, and write
benchmarks/results/kernel-resources.md (DESIGN §8). `make kernel-report`.

Resources come from the cubins: registers, stack (spills), local memory and static shared
memory from `cuobjdump --dump-resource-usage` (the one in Triton's wheel), Triton's dynamic
shared memory from the compiled kernel's metadata, the dot instruction from the PTX. Compiled
results are cached under build/kernel-resources/ keyed by the kernel source, config, target and
Triton version, so tests/test_kernel_resources.py and a second run reuse them.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "build" / "kernel-resources"
OUT = ROOT / "benchmarks" / "results" / "kernel-resources.md"
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


class Target:
    """A GPU target: opt-in shared memory per block, and the per-SM limits of occupancy."""

    def __init__(self, cc, example, sms, shared_optin, shared_per_sm, threads_per_sm, blocks_per_sm):
        self.cc, self.example, self.sms = cc, example, sms
        self.shared_optin, self.shared_per_sm = shared_optin, shared_per_sm
        self.threads_per_sm, self.blocks_per_sm = threads_per_sm, blocks_per_sm
        self.name = f"sm_{cc}"
        self.capability = (cc // 10, cc % 10)

    def programs_per_sm(self, threads: int, registers: int, shared: int) -> int:
        # registers are allocated per warp in units of 256; each block reserves 1 KiB of shared memory
        warp_registers = -(-registers * 32 // 256) * 256
        by_registers = 65536 // (warp_registers * (threads // 32))
        by_shared = self.shared_per_sm // (shared + 1024)
        return min(self.blocks_per_sm, self.threads_per_sm // threads, by_registers, by_shared)


# CUDA C++ Programming Guide, "Compute capabilities" table; SM counts of one GPU of each
TARGETS = [
    Target(80, "A100", 108, 166_912, 167_936, 2048, 32),
    Target(86, "RTX 3090", 82, 101_376, 102_400, 1536, 16),
    Target(89, "RTX 4090", 128, 101_376, 102_400, 1536, 24),
    Target(90, "H100 SXM", 132, 232_448, 233_472, 2048, 32),
    Target(100, "B200", 148, 232_448, 233_472, 2048, 32),
    Target(120, "RTX 5090", 170, 101_376, 102_400, 1536, 32),
]
DOT_KINDS = ("tcgen05.mma", "wgmma", "mma.sync")  # else "fma" (or "none" without a dot)
_USAGE = re.compile(r"Function (\S+):\s+REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def kernel_modules():
    from ddpm_fast.kernels import attention, diffusion_step, group_norm_silu, vb_terms
    return {"attention": attention, "diffusion_step": diffusion_step, "group_norm_silu": group_norm_silu,
            "vb_terms": vb_terms}


def _usage(binary: bytes, suffix: str) -> list[tuple[str, int, int, int, int]]:
    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        f.write(binary)
        f.flush()
        text = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    return [(m[1], *map(int, m.groups()[1:])) for m in _USAGE.finditer(text)]


def _dot_kind(ptx: str, has_dot: bool) -> str:
    return next((kind for kind in DOT_KINDS if kind in ptx), "fma" if has_dot else "none")


def _source(config: dict) -> tuple[ASTSource, dict]:
    """(what triton.compile compiles, its options) for one launch config."""
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(config["signature"].items())
             if kind.startswith("*")}  # torch allocations are 16-byte aligned, as Triton specialises them
    source = ASTSource(fn=config["kernel"], signature=config["signature"], constexprs=config["constexprs"],
                       attrs=attrs)
    return source, {option: config[option] for option in ("num_warps", "num_stages", "maxnreg") if option in config}


def compile_triton(config: dict, target: Target) -> dict:
    """Compile one launch config for one target (cached); its resources as a dict."""
    fn = config["kernel"]
    source, options = _source(config)
    key = hashlib.sha256(f"{source.hash()}-{target.cc}-{options}-{triton.__version__}".encode()).hexdigest()
    path = CACHE / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    compiled = triton.compile(source, target=GPUTarget("cuda", target.cc, 32), options=options)
    (_, registers, stack, static_shared, local), = _usage(compiled.asm["cubin"], ".cubin")
    shared = static_shared + compiled.metadata.shared
    record = dict(name=config["name"], target=target.name, registers=registers, stack=stack, local=local,
                  shared=shared, threads=32 * config["num_warps"],
                  dot=_dot_kind(compiled.asm["ptx"], "tl.dot(" in fn.src))
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return record


def _job_config(job) -> tuple[dict, Target]:
    module, name, cc = job
    target = next(t for t in TARGETS if t.cc == cc)
    return next(c for c in kernel_modules()[module].launch_configs(target.capability) if c["name"] == name), target


def _compile_job(job):
    return compile_triton(*_job_config(job))


def _ttir_job(job) -> str:
    config, target = _job_config(job)
    source, options = _source(config)
    return triton.compile(source, target=GPUTarget("cuda", target.cc, 32), options=options).asm["ttir"]


def compile_all(jobs: list[tuple[str, str, int]], workers: int | None = None, ir: bool = False) -> list:
    """Compile (module, config name, cc) jobs in fresh worker processes; records in job order
    (with ir=True: each one's Triton IR, uncached, for tests that read the arithmetic)."""
    interpret = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # the workers compile (the tests interpret the kernels)
    try:
        with ProcessPoolExecutor(workers or os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(_ttir_job if ir else _compile_job, jobs))
    finally:
        if interpret is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = interpret


# Stack accepted per kernel (Triton function, or CUDA C++ kernel by base_name), each with its reason
# in NOTES: the frame of the sinf/cosf range reduction that Box–Muller never enters.
ACCEPTED_STACK = {"diffusion_step_kernel": 32, "step_kernel": 32, "randn_kernel": 32}


def violations(record: dict, target: Target, kernel_name: str = "") -> list[str]:
    """The resource rules a shipped config or CUDA C++ kernel must meet on `target` (DESIGN §5.5)."""
    found = []
    if record["shared"] > target.shared_optin:
        found.append(f"shared {record['shared']} B > {target.shared_optin} B")
    if record["stack"] > ACCEPTED_STACK.get(kernel_name, 0) or record["local"]:
        found.append(f"stack {record['stack']} B, local {record['local']} B")
    return found


def expected_dot(config: dict, target: Target) -> str | None:
    """The instruction a tensor-core dot must become on `target` (None: FMAs by request, or no
    dot): wgmma on sm_90 and tcgen05 on sm_100 where the tile has the 64 rows they need."""
    c = config["constexprs"]
    if c.get("INPUT_PRECISION", "ieee") == "ieee":
        return None
    if c["BLOCK_M"] >= 64 and target.cc in (90, 100):
        return "wgmma" if target.cc == 90 else "tcgen05.mma"
    return "mma.sync"


# -- CUDA C++ ------------------------------------------------------------------------------------
def kernel_names(mangled: list[str]) -> list[str]:
    """CUDA C++ kernel names as the report prints them: demangled (c++filt, beside the g++ that builds
    the library), without return type, namespaces and parameters, e.g. `step_kernel<float>`. nvcc's
    mangled names of anonymous-namespace kernels hold a hash that changes with every compile."""
    demangled = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True,
                               check=True).stdout.splitlines()
    return [re.sub(r"^void |ddpm_fast::|\(anonymous namespace\)::", "", name).split("(")[0] for name in demangled]


def base_name(kernel: str) -> str:
    return kernel.split("<")[0]


def cuda_usage(binary: Path, source: str = "") -> list[dict]:
    """Resources of every CUDA C++ kernel × target in a library, or in the fatbin nvcc made of
    `source` (a library's cubins name their source file, a bare fatbin's do not)."""
    text = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", str(binary)], capture_output=True, text=True,
                          check=True).stdout
    records = []
    for chunk in re.split(r"(?=Fatbin elf code)", text):
        m = re.search(r"arch = sm_(\d+)", chunk)
        if m:
            identifier = re.search(r"identifier = (\S+)", chunk)
            file = Path(identifier[1]).name if identifier else source
            usage = [(u[1], *map(int, u.groups()[1:])) for u in _USAGE.finditer(chunk)]
            for name, (_, registers, stack, shared, local) in zip(kernel_names([u[0] for u in usage]), usage):
                records.append(dict(file=file, name=name, target=f"sm_{m[1]}", registers=registers, stack=stack,
                                    local=local, shared=shared))
    return records


def ptx_archs(binary: Path) -> dict[str, set[int]]:
    """{source file: the compute capabilities it carries PTX for} of a library's fatbin."""
    text = subprocess.run([str(CUOBJDUMP), "--list-ptx", str(binary)], capture_output=True, text=True,
                          check=True).stdout
    found: dict[str, set[int]] = {}
    for file, cc in re.findall(r"PTX file\s+\d+: (\S+)\.sm_(\d+)\.ptx", text):
        found.setdefault(file + ".cu", set()).add(int(cc))
    return found


def compile_cuda(source: Path) -> list[dict]:
    """nvcc one .cu for every target into a fatbin (cached); resources of each kernel × target."""
    import torch.utils.cpp_extension as ext
    import nvidia
    includes = [*ext.include_paths(device_type="cuda"), str(Path(nvidia.__path__[0]) / "cu13" / "include")]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in sorted((ROOT / "csrc").rglob("*")) if p.is_file())
                         + source.name.encode() + str([t.cc for t in TARGETS]).encode()
                         + inspect.getsource(cuda_usage).encode()).hexdigest()  # the records' form
    path = CACHE / f"cuda-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    nvcc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "k.fatbin"
        # the flags setup.py's build gives nvcc (torch's cpp_extension), for every target at once
        subprocess.run([str(nvcc), "--fatbin", "-O3", "-std=c++20", "-DTORCH_EXTENSION_NAME=_C",
                        "-DTORCH_API_INCLUDE_EXTENSION_H", *ext.COMMON_NVCC_FLAGS, *(f"-I{i}" for i in includes),
                        *(f"-gencode=arch=compute_{t.cc},code=sm_{t.cc}" for t in TARGETS),
                        "-o", str(out), str(source)], check=True, capture_output=True)
        records = cuda_usage(out, source.name)
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return records


# -- the CIFAR-10 U-Net's launches ----------------------------------------------------------------
BATCHES = (1, 16, 256)


def cifar10_group_norms() -> list[tuple[tuple[int, int, int, int], int]]:
    """(shape at batch 1, groups) of every distinct GroupNorm of the CIFAR-10 U-Net, recorded from
    one forward pass."""
    import torch
    from ddpm_fast import unet
    seen, normalize = [], unet._normalize

    def record(x, norm, backend, add=None, act=True):
        key = (tuple(x.shape), norm.num_groups)
        if key not in seen:
            seen.append(key)
        return normalize(x, norm, backend, add=add, act=act)

    unet._normalize = record
    try:
        with torch.no_grad():
            unet.UNet.ddpm_cifar10().eval()(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
    finally:
        unet._normalize = normalize
    return seen


def cifar10_launches(batch: int, group_norms) -> list[tuple[str, str, int]]:
    """(module, config name, programs) of each distinct Triton launch of one float32 CIFAR-10
    U-Net step at this batch: GroupNorm forward (and backward, as training runs it), attention at
    16×16 (256 tokens, one head of 256), the fused update of [B, 3, 32, 32]."""
    import torch
    from ddpm_fast.kernels import attention, diffusion_step, group_norm_silu
    launches = []
    for shape, groups in group_norms:
        for backward in (False, True):
            config = group_norm_silu.select(shape, groups, torch.float32, backward, (9, 0))
            launches.append(("group_norm_silu", config["name"], batch * groups))
    config = attention.select(256, torch.float32, "tf32x3", (9, 0))
    launches.append(("attention", config["name"], triton.cdiv(256, config["constexprs"]["BLOCK_M"]) * batch))
    config = diffusion_step.select(3 * 32 * 32 // 4, torch.float32, False, (9, 0))
    launches.append(("diffusion_step", config["name"], triton.cdiv(768, config["constexprs"]["BLOCK"]) * batch))
    return list(dict.fromkeys(launches))


# -- the report ---------------------------------------------------------------------------------
def _per_sm(programs: int, sms: int) -> str:
    return f"{programs * 100 // sms / 100:.2f}"  # truncated, never rounded up


def all_jobs() -> list[tuple[str, str, int]]:
    """(module, config name, cc) of every launch config of every kernels module × every target."""
    return [(module, config["name"], target.cc) for module, m in kernel_modules().items() for target in TARGETS
            for config in m.launch_configs(target.capability)]


def render(jobs, records: list[dict], cuda: list[dict], group_norms, notes: list[str],
           command: str = "make kernel-report") -> str:
    by_cc = {t.cc: t for t in TARGETS}
    known = {(module, c["name"], t.cc): c for module, m in kernel_modules().items() for t in TARGETS
             for c in m.launch_configs(t.capability)}
    rows, bad = [], 0
    for (module, name, cc), r in zip(jobs, records):
        target = by_cc[cc]
        config = known[module, name, cc]
        found = violations(r, target, config["kernel"].__name__)
        want = expected_dot(config, target)
        if want and r["dot"] != want:
            found.append(f"dot {r['dot']}, expected {want}")
        bad += bool(found)
        rows.append(f"| {name} | {r['target']} | {config['num_warps']} | {r['registers']} | {r['stack']} | "
                    f"{r['local']} | {r['shared']:,} ({target.shared_optin:,}) | {r['dot']} | "
                    f"{target.programs_per_sm(r['threads'], r['registers'], r['shared'])} | {'; '.join(found) or '—'} |")
    counts = ", ".join(f"{module} {len(m.launch_configs(TARGETS[0].capability))}"
                       for module, m in kernel_modules().items())
    cuda_rows, cuda_bad = [], 0
    for r in cuda:
        found = violations(r, by_cc[int(r["target"][3:])], base_name(r["name"]))
        cuda_bad += bool(found)
        cuda_rows.append(f"| {r['file']} | `{r['name']}` | {r['target']} | {r['registers']} | {r['stack']} | "
                         f"{r['local']} | {r['shared']} | {'; '.join(found) or '—'} |")
    lines = ["# Kernel resources per GPU target", "",
             f"Written by `{command}` (benchmarks/kernel_resources.py), Triton {triton.__version__}, "
             f"on a CPU machine: every launch config of every Triton kernel (configs a target: {counts}) × "
             f"{', '.join(t.name for t in TARGETS)}, and every CUDA C++ kernel × the same targets. "
             "Shared memory is per program (static + dynamic); stack and local are bytes per thread; "
             "programs/SM is the occupancy that registers, threads and shared memory allow (with 1 KiB "
             "reserved a program besides the 1,024 B that sm_90+ cubins list as static, so it may be one low). "
             "A violation is shared memory over the target's opt-in limit, any stack or local memory, "
             "or a dot off the expected tensor-core instruction; stack accepted in Notes is not one.", "",
             f"Triton configs × targets: {len(records)}; with a violation: {bad}. "
             f"CUDA C++ kernels × targets: {len(cuda)}; with a violation: {cuda_bad}.", "", "## Notes", "",
             *(f"- {note}" for note in notes), "", "## Triton kernels", "",
             "| config | target | warps | registers | stack | local | shared (limit) | dot | programs/SM | violations |",
             "|---|---|---|---|---|---|---|---|---|---|", *rows,
             "", "## CUDA C++ kernels (`nvcc --fatbin -O3`, one cubin per target)", "",
             "| file | kernel | target | registers | stack | local | static shared | violations |",
             "|---|---|---|---|---|---|---|---|", *cuda_rows]
    lines += ["", "## CIFAR-10 U-Net launches (float32): programs per launch, and per SM", "",
              "| kernel config | batch | programs | " + " | ".join(f"{t.name} ({t.example}, {t.sms} SMs)"
                                                          for t in TARGETS) + " |",
              "|---|---|---|" + "---|" * len(TARGETS)]
    for batch in BATCHES:
        for module, name, programs in cifar10_launches(batch, group_norms):
            lines.append(f"| {name} | {batch} | {programs} | "
                         + " | ".join(_per_sm(programs, t.sms) for t in TARGETS) + " |")
    return "\n".join(lines) + "\n"


NOTES = [
    "Attention tiles with BLOCK_M < 64 run on mma.sync on sm_90 and sm_100, not wgmma / tcgen05 "
    "(their instructions span 64 rows): 16-bit at BLOCK_D 512 (a 64-row tile spilled 8–48 B a thread), "
    "float32 tf32x3/tf32 on sm_90 and on every target below sm_100 (tf32x3's hi/lo operands, the "
    "accumulator and the logits fill the registers at 64 rows), and float32 at BLOCK_D 512 on sm_100 "
    "(a 64-row tile spilled 416 B). sm_100 keeps tcgen05's accumulator in tensor memory, so float32 "
    "up to BLOCK_D 256 uses 64-row tiles there. \"ieee\" attention is FMA by request.",
    "The fused step (Triton and CUDA C++) and the CUDA randn kernel list 32 B of stack: the "
    "Payne–Hanek reduction that CUDA's sinf/cosf (and Triton's libdevice) take for |θ| ≥ 105,615, "
    "the only code with local loads and stores in the SASS. Box–Muller's θ = 2π·u < 2π never takes "
    "it, so no local memory is touched; the stack is a frame, not a spill. Accepted: replacing "
    "cos/sin with sincospi would change the noise stream's float32 values (DESIGN §3). With the "
    "multistep history buffer, 256 quads a program held 40 B on sm_120 (8 B more than that frame), "
    "so the history variant ships 1–128 quads a program only. Under Triton 3.6 the guided variant with "
    "both guidance inputs (128 quads) held 40 B on sm_120 at 48 registers, ptxas trimming to an occupancy "
    "step (below); the guided variants therefore pass maxnreg = 255, under which none spills with "
    "Triton 3.6 or 3.8 (kernel-resources-triton-3.6.md is this report under the GPU image's Triton 3.6). "
    "The learned-variance variants (the network's variance channels, DESIGN §2.3; alone or with the "
    "guidance inputs, never with the history) ship 128 quads a program under the same maxnreg.",
    "GroupNorm has no dots and little shared memory, so its configs are the same on every target: 126 tiles "
    "(forward: 77 one-pass tiles of 128–8,192 elements and 11 three-pass 1,024-element chunks; backward: "
    "38 tiles of 128–1,024 elements) × 3 dtypes, the add and the SiLU being run-time flags.",
    "ptxas knows a Triton program's block size (.reqntid, from num_warps) and, without a register limit, "
    "trims registers to the next occupancy step when a few bytes of spill get it there. GroupNorm tiles were "
    "cut so to 72, 80, 96, 128 or 168 registers with 8 B of stack (STL/LDL of loop-invariant values, such as "
    "channel-mask predicates and the GradAdd pointer, around the inner loop): 12 of the 588 GroupNorm configs "
    "× targets sampled before, 16 of all 2,268 with the 1,024-element tiles moved to 8 warps. The same PTX "
    "without .reqntid compiled to 84–138 registers and no stack. GroupNorm configs therefore pass "
    "maxnreg = 255: under an explicit limit ptxas spills only what the limit forces, here nothing; the cost "
    "is the registers it had saved by spilling (programs/SM below).",
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--command", default="make kernel-report", help="the command the report names")
    args = parser.parse_args(argv)
    jobs = all_jobs()
    records = compile_all(jobs)
    cuda = [r for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")) for r in compile_cuda(source)]
    args.out.write_text(render(jobs, records, cuda, cifar10_group_norms(), NOTES, args.command))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
