"""The report's logic on synthetic data (no GPU, no timing): the test stage's verdict from a
junit file, like-for-like pairing, fractions of peak, the 1000-step projection, the goals and
the rendered markdown."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks.report import analysis, junit
from benchmarks.report.render import ratio, render

ROOT = Path(__file__).resolve().parents[1]

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_noise" name="test_a[cpu]"/>
<testcase classname="tests.test_noise" name="test_a[cuda]"><skipped message="no CUDA device"/></testcase>
<testcase classname="tests.test_x" name="test_interp"><skipped message="interpreter only"/></testcase>
<testcase classname="tests.test_x" name="test_cuda_loop[cpu]"><skipped message="CUDA graphs need a GPU"/></testcase>
<testcase classname="tests.test_x" name="test_bad"><failure message="boom"/></testcase>
<testcase classname="tests.test_x" name="test_err"><error message="boom"/></testcase>
</testsuite></testsuites>"""


def _record(kind, group, name, median, **extra):
    r = dict(kind=kind, group=group, name=name, median_s=median, **extra)
    if r.get("flops"):
        r["tflop_per_s"] = r["flops"] / median / 1e12
    if r.get("bytes_moved"):
        r["gb_per_s"] = r["bytes_moved"] / median / 1e9
    return r


def _records():
    op = dict(bytes_moved=10 ** 9, dtype="float32")
    e2e = dict(model="cifar10", config="bf16-cl", batch=256, steps=50, flops=10 ** 12)
    return [
        _record("peak", "peak copy", "copy", 1.0, bytes_moved=2 * 10 ** 9, dtype="float32"),
        _record("peak", "peak matmul bfloat16", "matmul", 1.0, flops=8 * 10 ** 14, dtype="bfloat16"),
        _record("op", "step", "eager", 0.4, **op),
        _record("op", "step", "torch.compile", 0.25, **op),
        _record("op", "step", "fused cpu", 0.1, **op),
        _record("e2e-sample", "s", "diffusers", 10.0, cuda_graph=False, **e2e),
        _record("e2e-sample", "s", "torch.compile", 4.5, cuda_graph=False, **e2e),
        _record("e2e-sample", "s", "torch.compile max-autotune", 3.0, cuda_graph=True, **e2e),
        _record("e2e-sample", "s", "ours", 4.0, cuda_graph=False, **e2e),
        _record("e2e-sample", "s", "ours + CUDA graph", 2.5, cuda_graph=True, **e2e),
    ]


def test_summary_flags_failures_and_cuda_skips(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    s = junit.summarize_junit(path)
    assert s["tests"] == 6 and s["passed"] == 1
    assert s["failed"] == ["tests.test_x::test_bad", "tests.test_x::test_err"]
    # by the skip reason: a deliberate skip of a test named cuda is not a CUDA test skipped
    assert s["cuda_skips"] == ["tests.test_noise::test_a[cuda]"] and len(s["skipped"]) == 3
    assert len(junit.problems(s, 1, on_gpu=True)) == 2  # failures, and the skipped CUDA test
    assert len(junit.problems(s, 1, on_gpu=False)) == 1  # without a GPU, CUDA skips are expected


def test_verdict_on_the_deliberate_cpu_parameter_skip(tmp_path):
    # the GPU report's verdict, rehearsed on pytest's own junit of the test whose [cpu] parameter
    # skips on purpose; CUDA hidden, so its [cuda] parameter skips for want of a device everywhere
    xml = tmp_path / "junit.xml"
    env = {k: v for k, v in os.environ.items() if k != "DDPM_FAST_REQUIRE_CUDA"}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                    "tests/test_sampler.py::test_cuda_graph_loop_without_host_syncs"], cwd=ROOT, check=True,
                   env=dict(env, CUDA_VISIBLE_DEVICES=""), capture_output=True)
    s = junit.summarize_junit(xml)
    assert s["tests"] == 2 and len(s["skipped"]) == 2
    assert s["cuda_skips"] == ["tests.test_sampler::test_cuda_graph_loop_without_host_syncs[cuda]"]
    assert junit.problems(s, 0, on_gpu=True) == ["1 CUDA tests were skipped"]


def test_missing_junit_counts_nothing(tmp_path):
    s = junit.summarize_junit(tmp_path / "none.xml")
    assert s["tests"] == 0 and junit.problems(s, 0, on_gpu=True) == ["no test ran: see tests.log"]


def test_ours_is_paired_only_with_baselines_of_the_same_graph_use():
    rows = {(c["ours"], c["baseline"]): c["ratio"] for c in analysis.comparisons(_records(), ("e2e-sample",))}
    assert rows == {("ours", "diffusers"): 2.5, ("ours", "torch.compile"): 1.125,
                    ("ours + CUDA graph", "torch.compile max-autotune"): 1.2}


def test_fraction_of_peak_uses_the_matching_ceiling():
    records = _records()
    peaks = analysis.peaks(records)
    assert peaks == {"copy_gb_per_s": 2.0, "matmul_tflop_per_s": {"bfloat16": 800.0}}
    fused = next(r for r in records if r["name"] == "fused cpu")
    assert analysis.fraction_of_peak(fused, peaks) == (5.0, "copy")
    ours = next(r for r in records if r["name"] == "ours")
    assert analysis.fraction_of_peak(ours, peaks) == (1e12 / 4.0 / 1e12 / 800.0, "bfloat16 matmul")


def test_projection_extrapolates_per_step_time():
    p = analysis.projection(dict(median_s=5.0, steps=50, batch=256))
    # at DPM-Solver++(2M)'s 20 evaluations: 50,000 samples × 0.1 s × 20 steps / 256 per batch
    assert p == pytest.approx({"per_step_s": 0.1, "images_per_s": 2.56, "fid_s": 50_000 / 2.56,
                               "fid_dpm_solver_s": 50_000 * 0.1 * 20 / 256})


def test_goals_are_judged_on_exact_values():
    cpu = {g["goal"]: g["met"] for g in analysis.cpu_goals(_records())}
    assert cpu["step: fused cpu vs eager"]  # 4× against 3×
    assert "step: fused cpu vs torch.compile" not in cpu  # the step's CPU goal is against eager alone
    # no CPU-sized run among the records: every end-to-end goal is a row, not measured
    assert sum(met is None for met in cpu.values()) == 2 * len(analysis.CPU_E2E_GOALS) + len(analysis.CPU_ADM_GOALS)
    gpu = {g["goal"]: g for g in analysis.gpu_goals(_records())}
    compile_goal = gpu["end to end bf16-cl: vs torch.compile"]
    assert compile_goal["value"] == 1.125 and not compile_goal["met"]  # against 1.15×
    assert gpu["end to end bf16-cl: vs diffusers"]["met"]  # 2.5× against 2×
    fid = next(g for g in gpu.values() if g["at_most"])
    assert fid["value"] == pytest.approx(50_000 / (256 / 50.0) / 60) and not fid["met"]  # 162.7 min
    assert ratio(1.999) == "1.99×"  # truncated, never rounded up to a goal


def test_adm_goals_compare_ours_with_guided_diffusions_code():
    records = [_record("adm-sampling", "adm64 sampling 250 steps B=16", name, median)
               for name, median in (("eager", 3.0), ("ours", 2.0), ("torch.compile", 2.2))]
    records.append(_record("adm-forward", "adm64 forward B=16", "eager", 9.0))  # a forward is not a sampling goal
    gpu = {g["goal"]: g for g in analysis.gpu_goals(records)}
    assert gpu["ADM sampling: ours vs guided-diffusion's eager code"]["value"] == 1.5
    assert gpu["ADM sampling: ours vs guided-diffusion's eager code"]["met"]  # 1.5× against 1.5×
    compiled = gpu["ADM sampling: ours vs guided-diffusion's code under torch.compile"]
    assert compiled["value"] == pytest.approx(1.1) and not compiled["met"]  # against 1.15×
    cpu = {g["goal"]: g for g in analysis.cpu_goals(records[:2])}
    assert cpu["ADM sampling: ours vs guided-diffusion's eager code"]["value"] == 1.5


def test_gpu_op_goals_take_the_worst_shape_with_our_faster_kernel():
    def op(group, name, median):
        return _record("op", group, name, median, bytes_moved=10 ** 9, dtype="bfloat16")
    records = [_record("peak", "peak copy", "copy", 1.0, bytes_moved=2 * 10 ** 9, dtype="float32"),
               op("group_norm_silu 64x128x32x32 nchw bfloat16", "torch.compile", 0.6),
               op("group_norm_silu 64x128x32x32 nchw bfloat16", "fused triton", 0.55),
               op("group_norm_silu 64x128x32x32 nchw bfloat16", "fused cuda", 0.5),  # 1.2×, 100% of copy
               op("group_norm_silu 256x256x4x4 nchw bfloat16", "torch.compile", 0.9),
               op("group_norm_silu 256x256x4x4 nchw bfloat16", "fused cuda", 1.0)]  # 0.9×, 50% of copy
    gpu = {g["goal"]: g for g in analysis.gpu_goals(records)}
    bandwidth = gpu["GroupNorm+SiLU: fraction of copy bandwidth"]
    assert bandwidth["value"] == 0.5 and not bandwidth["met"] and bandwidth["where"].endswith("met at 1 of 2")
    assert bandwidth["where"].startswith("group_norm_silu 256x256x4x4 nchw bfloat16 (fused cuda)")
    assert gpu["GroupNorm+SiLU: vs torch.compile"]["value"] == pytest.approx(0.9)
    assert gpu["attention d=512: vs SDPA"]["value"] is None  # not measured


def test_a_check_without_gpu_data_renders_every_gpu_goal_not_measured(tmp_path):
    meta = {"environment": {"gpu": "none", "torch": "2"}, "quick": True, "check": True, "stages": {}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    text = render(tmp_path)
    goals = text.split("## GPU goals (H200, like for like)")[1].split("## Verdict")[0]
    assert goals.count("| not measured |") == len(analysis.GPU_OP_GOALS) + len(analysis.GPU_E2E_GOALS) + 1 + len(
        analysis.GPU_ADM_GOALS)
    assert "Environment: GPU none;" in text and "copy not measured; bf16 matmul not measured" in text


def test_render_shows_every_section_and_the_verdict(tmp_path):
    (tmp_path / "ops.jsonl").write_text("\n".join(json.dumps(r) for r in _records()))
    meta = {"environment": {"gpu": "none"}, "quick": True,
            "stages": {"ops": dict(seconds=1.0, load_before="1", load_after="1", problems=["boom"])}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    text = render(tmp_path)
    for heading in ("## Measured peaks", "## Ops", "## End to end: sampling runs", "## Projection", "## CPU goals"):
        assert heading in text
    assert text.rstrip().endswith("FAIL\n- boom")


def test_sdpa_on_the_cpu_is_never_counted_as_ours():
    # ops.attention on CPU tensors is torch's SDPA: a baseline row, in no ratio table or plot bar
    group = dict(kind="op", group="attention B=8 N=256 d=256 float32")
    records = [dict(group, name=name, median_s=s) for name, s in
               (("eager", 3.0), ("sdpa", 2.0), ("ours (sdpa on cpu)", 1.9))]
    assert not analysis.is_ours("ours (sdpa on cpu)") and analysis.is_ours("ours + compile")
    assert analysis.comparisons(records, ("op",)) == []


def test_cpu_goals_follow_the_shapes_and_the_best_compile_baseline():
    def op(group, name, median):
        return _record("op", group, name, median, bytes_moved=10 ** 6, dtype="float32")

    def run(name, median, model="cifar10", batch=2, kind="e2e-step", steps=1):
        return _record(kind, f"{kind} {model} fp32 B={batch}", name, median, model=model, config="fp32", batch=batch,
                       steps=steps, cuda_graph=False)
    records = [op("group_norm_silu 8x256x16x16 nchw float32", "eager", 1.8),  # a large shape: 1.8× < 2×
               op("group_norm_silu 8x256x16x16 nchw float32", "fused cpu", 1.0),
               op("group_norm_silu 8x256x8x8 channels_last float32", "eager", 1.6),  # 1.6× ≥ 1.5×
               op("group_norm_silu 8x256x8x8 channels_last float32", "fused cpu", 1.0),
               run("eager", 1.3), run("torch.compile max-autotune", 1.5), run("torch.compile U-Net + eager update", 1.04),
               run("ours", 1.0), run("ours + compile", 0.95),
               run("eager", 2000.0, "digits", 64, "e2e-sample", 1000), run("ours", 1000.0, "digits", 64, "e2e-sample", 1000)]
    goals = {g["goal"]: g for g in analysis.cpu_goals(records)}
    assert not goals["group_norm_silu 8x256x16x16 nchw float32: fused cpu vs eager"]["met"]
    assert goals["group_norm_silu 8x256x8x8 channels_last float32: fused cpu vs eager"]["met"]
    vs_eager = goals["cifar10 one step, batch 2: ours vs eager"]
    assert vs_eager["value"] == pytest.approx(1.3 / 0.95) and vs_eager["met"]  # the faster of ours, ours + compile
    vs_compile = goals["cifar10 one step, batch 2: ours vs the best torch.compile"]
    assert vs_compile["value"] == pytest.approx(1.04 / 0.95) and not vs_compile["met"]  # the fastest compile: 1.09× < 1.1×
    assert vs_compile["where"] == "ours + compile against torch.compile U-Net + eager update"
    assert goals["digits 1000-step sampling, batch 64: ours vs eager"]["met"]  # 2× against 1.5×
    assert goals["digits 1000-step sampling, batch 64: ours vs the best torch.compile"]["value"] is None
    assert goals["cifar10 one step, batch 8: ours vs eager"]["met"] is None  # not measured
    assert goals["cifar10 sampling, batch 2: ours vs eager"]["met"] is None


# -- make gpu-check's plumbing, against planted outcomes (the rehearsal: make gpu-check-rehearsal) --
PLANTED = '''
import time
import pytest

def test_passes():
    pass

def test_fails():
    assert 1 == 2

def test_wants_a_gpu():
    pytest.skip("no CUDA device")  # tests/helpers.py's cuda_or_skip()

def test_outlasts_the_cap():
    time.sleep(600)
'''


def _context(tmp_path, cap_s, on_gpu=False):
    from benchmarks.report import stages
    ctx = stages.Context(tmp_path, quick=True, fresh=False, deadline=None, on_gpu=on_gpu)
    ctx.cap_until = __import__("time").time() + cap_s
    return ctx


@pytest.mark.parametrize("on_gpu", [False, True])
def test_a_tests_stage_stopped_at_its_cap_keeps_the_verdict_of_what_finished(tmp_path, on_gpu):
    # the hanging test is interrupted (SIGINT) at the cap; the streamed outcomes still hold the
    # pass, the failure and the skip for want of CUDA, which fails the verdict on a GPU only
    from benchmarks.report import stages
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "test_planted.py").write_text(PLANTED)
    report = tmp_path / "report"
    report.mkdir()
    problems = stages._tests(_context(report, cap_s=15, on_gpu=on_gpu), paths=(str(planted),))
    summary = json.loads((report / "tests.json").read_text())
    assert summary["tests"] == 3 and summary["passed"] == 1
    assert len(summary["failed"]) == 1 and summary["failed"][0].endswith("test_planted.py::test_fails")
    assert len(summary["cuda_skips"]) == 1 and summary["cuda_skips"][0].endswith("::test_wants_a_gpu")
    assert problems[0].startswith("stage tests was stopped at its time cap after 3 tests")
    assert problems[1] == "tests failed (pytest exit 0): 1 failing"
    assert problems[2:] == (["1 CUDA tests were skipped"] if on_gpu else [])


def test_a_stopped_stage_leaves_no_process_behind(tmp_path, monkeypatch):
    # a command that ignores Ctrl-C and started a child in a process group of its own (as ninja
    # starts nvcc and cc1plus): SIGKILL reaches both
    from benchmarks.report import stages
    monkeypatch.setattr(stages, "INTERRUPT_GRACE_S", 1.0)
    child_pid = tmp_path / "child.pid"
    code = textwrap.dedent(f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                  "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)"],
                                 start_new_session=True)
        open({str(child_pid)!r}, "w").write(str(child.pid))
        time.sleep(600)
    """)
    rc = stages._call([sys.executable, "-c", code], tmp_path / "stage.log", _context(tmp_path, cap_s=4))
    assert rc == -9 and "stopped: the time budget or the stage's cap" in (tmp_path / "stage.log").read_text()
    pid = int(child_pid.read_text())
    for _ in range(50):  # the child is reparented to init, which reaps it
        if not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            break
        __import__("time").sleep(0.1)
    else:
        pytest.fail(f"the stage's grandchild {pid} outlived the stop")


def test_the_build_stage_refreshes_the_environment(tmp_path, monkeypatch):
    # the carried wheels (diffusers) are installed by the build stage: the report must name the
    # versions the later stages ran with, not what the first stage saw
    from benchmarks.report import __main__ as report, check, stages
    monkeypatch.setattr(stages, "run", lambda name, ctx: [])
    monkeypatch.setattr(report, "fresh_environment", lambda: {"diffusers": "0.42.1", "gpu": "none"})
    meta = {"environment": {"diffusers": "not installed (its baselines are skipped)", "gpu": "none"}, "stages": {}}
    ctx = stages.Context(tmp_path, quick=True, fresh=False, deadline=None, on_gpu=False, check=True)
    with check.Archive(tmp_path, None) as archive:
        assert not report._run_stages(["env", "build"], ctx, meta, "abc", archive)
    assert meta["environment"]["diffusers"] == "0.42.1"


def test_a_fresh_environment_is_read_by_a_new_interpreter():
    from benchmarks.report.environment import environment, fresh_environment
    fresh = fresh_environment()
    assert fresh.keys() == environment().keys() and fresh["torch"] == environment()["torch"]


def test_check_orders_ours_and_the_goal_baselines_first():
    # make gpu-check's ops stage may be cut at its cap: the goals' rows run first, bf16 first
    found = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_step.py", "benchmarks/test_group_norm.py",
                            "benchmarks/test_attention.py", "--collect-only", "-q", "--check", "-p", "no:cacheprovider"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()

    def role(node_id):
        test, params = node_id.split("::")[-1].split("[", 1)
        impl = params.rstrip("]").split("-")[-1]
        if test == "test_fused" or impl.startswith("fused"):
            return 0
        return 1 if (test == "test_compiled_reference" and "z_given" not in params) or impl == "sdpa" else 2
    roles = [role(line) for line in found if "::" in line]
    assert roles == sorted(roles) and roles[0] == 0 and 1 in roles


@pytest.mark.parametrize("variant", ["ours", "reference sampler"])
def test_a_timed_sampling_run_builds_nothing(monkeypatch, variant):
    # benchmarks/test_sampling.py prepares the timed run's sampler (its table on the device, on a GPU
    # its graphs at the first call) before round 1; the timed call must find it built
    from benchmarks import workloads
    workload = workloads.build("digits", "fp32", variant, 1)
    workload.prepare(3)

    def refuse(*args, **kwargs):
        raise AssertionError("a sampler was built inside the timed run")
    monkeypatch.setattr(workloads, "_sampler", refuse)
    assert workload.sample(3).shape == (1, 1, 16, 16)
