"""report.md from what a report folder holds: meta.json (machine, stages run) and the records
(*.jsonl). Rendered anew after every stage, so the file always shows everything measured so
far, and a stage run again replaces its own figures. Ratios are truncated, never rounded up,
so a table cannot show a goal met that was missed by a hair; so are percentages and the
projection's images/s."""
from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.report import analysis as A

TITLE = "# ddpm_fast benchmark report"


def render(report_dir: Path) -> str:
    meta = json.loads((report_dir / "meta.json").read_text()) if (report_dir / "meta.json").exists() else {}
    records = A.load(report_dir)
    measured = A.peaks(records)
    on_gpu = meta.get("environment", {}).get("gpu", "none") != "none"
    lines = [TITLE, ""]
    lines += _environment(meta, measured) + _stages(meta) + _tests(report_dir)
    lines += _peaks(measured) + _ops(records, measured) + _e2e(records, measured)
    threads = sorted({s["threads"] for name, s in meta.get("stages", {}).items() if name in ("ops", "e2e") and "threads" in s})
    lines += _projection(records) + _breakdown(records) + _goals(records, on_gpu, meta.get("check", False), threads)
    if (report_dir / "speedup.png").exists():
        lines += ["## Speed-ups, like for like", "", "![ours over each baseline](speedup.png)", ""]
    problems = [p for stage in meta.get("stages", {}).values() for p in stage.get("problems", [])]
    lines += ["## Verdict", "", "PASS" if not problems else "FAIL"] + [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"


def ms(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds >= 10 else f"{seconds * 1e3:.3f} ms"


def truncated(value: float, places: int) -> str:
    return f"{math.floor(value * 10 ** places) / 10 ** places:.{places}f}"


def ratio(value: float) -> str:
    return truncated(value, 2) + "×"


def percent(value: float) -> str:
    return truncated(100 * value, 1) + "%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def environment_line(env: dict, measured: dict) -> str:
    """One line: the GPU (name, memory, driver), its multiprocessors, torch, triton, nvcc and the
    measured ceilings (copy bandwidth, bf16 matmul), "not measured" where the peaks are missing."""
    copy = measured["copy_gb_per_s"]
    bf16 = measured["matmul_tflop_per_s"].get("bfloat16")
    return (f"GPU {env.get('gpu', '?')}; {env.get('gpu multiprocessors', '?')} multiprocessors; "
            f"torch {env.get('torch', '?')}; triton {env.get('triton', '?')}; nvcc {env.get('nvcc', '?')}; "
            f"copy {f'{copy:.2f} GB/s' if copy else 'not measured'}; "
            f"bf16 matmul {f'{bf16:.3f} TFLOP/s' if bf16 else 'not measured'}")


def _environment(meta: dict, measured: dict) -> list[str]:
    env = meta.get("environment", {})
    mode = "--quick (reduced sizes: a smoke test)" if meta.get("quick") else "full sizes for this machine"
    if meta.get("check"):
        mode = "make gpu-check" + (" rehearsed without a GPU: " + mode if meta.get("quick") else "")
    rows = [[k, str(v)] for k, v in env.items()] + [["suite", mode]]
    return (["## Machine and software", "", "Environment: " + environment_line(env, measured), ""]
            + _table(["", ""], rows) + [""])


def _stages(meta: dict) -> list[str]:
    rows = [[name, "ok" if not s.get("problems") else "FAILED", f"{s['seconds']:.1f} s",
             f"{s['load_before']} → {s['load_after']}", str(s.get("threads", "")), s.get("commit", ""),
             s.get("when", "")]
            for name, s in meta.get("stages", {}).items()]
    note = ("Load average (1, 5, 15 min) before and after each stage: on a shared machine, anything above "
            "the idle level means other jobs competed for the cores during the timing. A blank commit or "
            "thread count: the one in the table above.")
    header = ["stage", "status", "took", "load average", "torch threads", "commit", "finished (UTC)"]
    return ["## Stages", "", note, ""] + _table(header, rows) + [""]


def _tests(report_dir: Path) -> list[str]:
    path = report_dir / "tests.json"
    if not path.exists():
        return []
    s = json.loads(path.read_text())
    lines = ["## Tests", "", f"{s['tests']} tests: {s['passed']} passed, {len(s['failed'])} failed, "
             f"{len(s['skipped'])} skipped", ""]
    lines += [f"- FAILED {n}" for n in s["failed"]] + [f"- skipped {n}" for n in s["skipped"]] + [""]
    slowest = [f"- {seconds:.2f} s {name}" for name, seconds in s.get("slowest", [])]
    return lines + (["Slowest tests (junit.xml has every test's time):", ""] + slowest + [""] if slowest else [])


def _peaks(measured: dict) -> list[str]:
    rows = []
    if measured["copy_gb_per_s"]:
        rows.append(["device-to-device copy (read + write)", f"{measured['copy_gb_per_s']:.2f} GB/s"])
    rows += [[f"{dtype} matmul", f"{v:.3f} TFLOP/s"] for dtype, v in measured["matmul_tflop_per_s"].items()]
    if not rows:
        return ["## Measured peaks", "", "Not measured (stage `peaks`); fractions of peak are left out.", ""]
    return ["## Measured peaks", ""] + _table(["ceiling", "measured"], rows) + [""]


def _throughput(r: dict) -> str:  # flops first, as fraction_of_peak judges them
    if r.get("flops"):
        return f"{r['tflop_per_s']:.4f} TFLOP/s"
    return f"{r['gb_per_s']:.2f} GB/s" if r.get("bytes_moved") else ""


def _of_peak(r: dict, measured: dict) -> str:
    found = A.fraction_of_peak(r, measured)
    return f"{percent(found[0])} of {found[1]}" if found else "n/a"


def _results(records: list[dict], kinds: tuple, measured: dict, extra: bool = False) -> list[str]:
    rows = []
    for group, members in A.groups(records, kinds).items():
        for r in members:
            row = [group, r["name"], ms(r["median_s"]), _throughput(r), _of_peak(r, measured),
                   ratio(r["vs_eager"]) if "vs_eager" in r else ("1.00×" if r["name"] == "eager" else "")]
            if extra:
                images = f"{r['images'] / r['median_s']:.3f}" if r.get("images") else ""
                row[2:2] = ["yes" if r.get("cuda_graph") else "no", images]
            rows.append(row)
    header = ["group", "implementation", "median", "throughput", "of peak", "vs eager"]
    if extra:
        header[2:2] = ["CUDA graph", "images/s"]
    return _table(header, rows) + [""]


def _ratios(records: list[dict], kinds: tuple) -> list[str]:
    rows = [[c["group"], c["ours"], c["baseline"], ratio(c["ratio"])] for c in A.comparisons(records, kinds)]
    return _table(["group", "ours", "baseline (same CUDA-graph use)", "ours is faster by"], rows) + [""] if rows else []


def _ops(records: list[dict], measured: dict) -> list[str]:
    if not A.groups(records, ("op",)):
        return []
    note = ("Medians; throughput is bytes moved (x read, y written) over time for the memory-bound ops and "
            "flops over time for attention; `of peak` divides it by the measured ceiling. Inputs rotate over "
            "several sets (`input_sets` in the records) to leave the cache; where the last-level cache "
            "(above) holds them all, an op can beat the copy ceiling, which was measured on a larger buffer.")
    return (["## Ops", "", note, ""]
            + _results(records, ("op",), measured) + ["Ours against every baseline:", ""] + _ratios(records, ("op",)))


def _e2e(records: list[dict], measured: dict) -> list[str]:
    lines = []
    for kind, title in (("e2e-step", "one denoising step (U-Net forward + update)"),
                        ("e2e-sample", "sampling runs from x_T"),
                        ("e2e-dpm-solver", "DPM-Solver++(2M) sampling runs from x_T (DESIGN §2.4)"),
                        ("e2e-bound", "the variational bound, ddpm-fast nll's evaluation (DESIGN §2.6)"),
                        ("adm-forward", "the ADM U-Net's forward against guided-diffusion's code (DESIGN §2.7)"),
                        ("adm-sampling", "respaced ADM sampling against guided-diffusion's loop (DESIGN §2.7)")):
        if A.groups(records, (kind,)):
            lines += [f"## End to end: {title}", ""] + _results(records, (kind,), measured, extra=True)
            lines += ["Ours against every baseline of the same CUDA-graph use:", ""] + _ratios(records, (kind,))
    return lines


def _projection(records: list[dict]) -> list[str]:
    rows = []
    for r in records:
        if r.get("kind") == "e2e-sample" and r.get("model") == "cifar10":
            p = A.projection(r)
            rows.append([r["name"], r["config"], f"batch {r['batch']} × {r['steps']} steps", ms(p["per_step_s"]),
                         truncated(p["images_per_s"], 5), truncated(p["fid_s"] / 3600, 2) + " h",
                         truncated(p["fid_dpm_solver_s"] / 60, 2) + " min"])
    if not rows:
        return []
    note = (f"DDPM CIFAR-10 U-Net, {A.T_FULL} steps per image, extrapolated linearly from each timed run "
            f"(time per step × {A.T_FULL}; the run's fixed costs are counted {A.T_FULL}/steps times, so this is "
            f"conservative). The headline figure is batch 256 from ≥ 50 timed steps; the column `measured` "
            f"says what was actually timed here. The last column: the same per-step time at DPM-Solver++(2M)'s "
            f"{A.DPM_SOLVER_STEPS} network evaluations per image (DESIGN §2.4; its quality against DDPM-1000's "
            f"is measured by benchmarks/quality_vs_steps.py).")
    return (["## Projection: images/s at 1000 steps and 50,000 samples", "", note, ""]
            + _table(["variant", "config", "measured", "per step", f"images/s at {A.T_FULL} steps",
                      f"{A.FID_SAMPLES} samples", f"{A.FID_SAMPLES} samples at {A.DPM_SOLVER_STEPS} steps"], rows) + [""])


def _breakdown(records: list[dict]) -> list[str]:
    rows = []
    for r in records:
        if r.get("kind") == "breakdown":
            idle = percent(r["share idle"]) if "share idle" in r else "n/a"
            rows.append([r["group"], r["name"], ms(r["wall_per_step_s"]), percent(r["share conv/GEMM"]),
                         percent(r["share attention"]), percent(r["share other"]), idle,
                         "; ".join(r.get("top_other", [])), r.get("measured_on", "")])
    if not rows:
        return []
    note = ("torch.profiler over 3 steps. `other` is what fusion can remove (norms, activations, the update, "
            "copies, Python); conv/GEMM bounds what any fusion reaches end to end. Shares are of "
            "the time in `measured on`; `idle` is the device's idle share of the wall time.")
    return (["## Time breakdown of one U-Net step", "", note, ""]
            + _table(["group", "variant", "profiled step", "conv/GEMM", "attention", "other", "idle",
                      "costliest other", "measured on"], rows) + [""])


def _goals(records: list[dict], on_gpu: bool, check: bool, threads: list[int]) -> list[str]:
    """The GPU goals on a GPU and in make gpu-check (without a GPU: every one not measured), else the
    CPU's, titled with the torch thread count of the stages that measured them."""
    gpu = on_gpu or check
    goals = A.gpu_goals(records if on_gpu else []) if gpu else A.cpu_goals(records)
    if not goals:
        return []
    rows = []
    for g in goals:
        if g["value"] is None:
            rows.append([g["goal"], "", _goal_value(g["want"], g, wanted=True), "not measured", ""])
            continue
        rows.append([g["goal"], _goal_value(g["value"], g), _goal_value(g["want"], g, wanted=True),
                     "met" if g["met"] else "missed", g["where"]])
    counts = " and ".join(map(str, threads)) or "?"
    title = "GPU goals (H200, like for like)" if gpu else f"CPU goals (2 cores, {counts} torch thread{'s' * (counts != '1')})"
    note = "Measured, not pass/fail tests." + (" An op goal's figure is its worst shape, with the faster of our "
                                               "kernels there." if gpu else " Attention has no CPU kernel of ours "
                                               "(the CPU runs scaled_dot_product_attention), so it has no CPU goal.")
    return [f"## {title}", "", note, ""] + _table(["goal", "measured", "wanted", "", "where"], rows) + [""]


def _goal_value(value: float, goal: dict, wanted: bool = False) -> str:
    """A measured figure truncated ("1.19×", "84.9%", "29.99 min"); a wanted one as set, with ≥ or ≤."""
    if wanted:
        text = {"ratio": f"{value:g}×", "percent": f"{100 * value:g}%"}.get(goal["unit"], f"{value:g} min")
        return ("≤ " if goal["at_most"] else "≥ ") + text
    return {"ratio": ratio, "percent": percent}.get(goal["unit"], lambda v: truncated(v, 2) + " min")(value)
