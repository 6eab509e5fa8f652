"""The report's arithmetic over the benchmark records (conftest.py writes one JSON object per
result): measured peaks, fractions of peak, like-for-like ratios, the 1000-step projection and
the project's goals (the CPU's; the GPU's, which make gpu-check measures). Pure functions,
tested in tests/test_report.py.

A record's `name` says its role: "eager" is the eager reference, names starting "fused" or
"ours" are this project's (but "ours (sdpa on cpu)", torch's SDPA itself), anything else is a
baseline. Ours is compared with each baseline of its group that has the same CUDA-graph use
(DESIGN §7: like for like).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

CONFIG_DTYPES = {"fp32": "float32", "bf16-cl": "bfloat16"}
T_FULL = 1000          # DDPM steps per sample
FID_SAMPLES = 50_000   # an FID evaluation's sample count
DPM_SOLVER_STEPS = 20  # DPM-Solver++(2M)'s default step count (DESIGN §2.4)
# The CPU goals, ours over a baseline in one run, judged in each report at its thread count (make
# the report with one thread and with two). GroupNorm+SiLU against eager at every benchmark shape,
# more at the four largest (C·H·W ≥ CPU_GN_LARGE: 128×32×32 and 256×16×16, both layouts); the
# fused step against eager.
CPU_GN_GOAL, CPU_GN_LARGE_GOAL, CPU_GN_LARGE = 1.5, 2.0, 65_536
CPU_STEP_GOAL = 3.0
# End to end: (model, kind, batch, wanted over eager, wanted over the best torch.compile baseline);
# ours is the faster of "ours" and "ours + compile". The digits model's eager is the U-Net on
# torch's ops and the update with torch.randn, not the reference sampler (whose Philox written in
# PyTorch costs ~9% of a digits step).
CPU_E2E_GOALS = (
    ("cifar10", "e2e-step", 2, 1.2, 1.1),
    ("cifar10", "e2e-step", 8, 1.2, 1.1),
    ("cifar10", "e2e-sample", 2, 1.2, 1.1),
    ("digits", "e2e-sample", 8, 1.5, 1.1),
    ("digits", "e2e-sample", 64, 1.5, 1.1),
)
CPU_OURS = ("ours", "ours + compile")
# The GPU goals (H200, like for like), each over the ops or runs it names: (label, what is
# measured, wanted). Op goals are judged at every shape, with the faster of our kernels there.
GPU_OP_GOALS = (
    ("GroupNorm+SiLU: fraction of copy bandwidth", "group_norm_silu", "copy", 0.85),
    ("GroupNorm+SiLU: vs torch.compile", "group_norm_silu", "torch.compile", 1.2),
    ("step: fraction of copy bandwidth", "step", "copy", 0.80),
    ("attention d=256: vs SDPA", "attention d=256", "sdpa", 1.0),
    ("attention d=512: vs SDPA", "attention d=512", "sdpa", 1.5),
)
GPU_E2E_GOALS = (  # (baseline, config, ratio): ours over the baseline, CIFAR-10 sampling runs
    ("torch.compile", "fp32", 1.15),
    ("torch.compile", "bf16-cl", 1.15),
    ("diffusers", "bf16-cl", 2.0),
)
GPU_FID = ("ours + CUDA graph", "bf16-cl", 30.0)  # 50,000 samples within this many minutes
# The ADM network against guided-diffusion's own code (benchmarks/test_adm.py): (kind, baseline,
# wanted), ours over the baseline — on the CPU its eager code at one thread (a reduced network),
# on the GPU its fp16 sampling and torch.compile of it.
CPU_ADM_GOALS = (("adm-sampling", "eager", 1.1),)
GPU_ADM_GOALS = (("adm-sampling", "eager", 1.5), ("adm-sampling", "torch.compile", 1.15))


def load(report_dir: Path) -> list[dict]:
    records = []
    for path in sorted(report_dir.glob("*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def is_ours(name: str) -> bool:
    # "ours (sdpa on cpu)" is ops.attention on CPU tensors, which is torch's SDPA itself: a
    # baseline there, never counted as a kernel of ours
    return name.startswith(("fused", "ours")) and not name.endswith("(sdpa on cpu)")


def peaks(records: list[dict]) -> dict:
    """{"copy_gb_per_s": float, "matmul_tflop_per_s": {dtype: float}} from the peak records."""
    found = {"copy_gb_per_s": None, "matmul_tflop_per_s": {}}
    for r in records:
        if r.get("kind") != "peak":
            continue
        if "gb_per_s" in r:
            found["copy_gb_per_s"] = r["gb_per_s"]
        elif "tflop_per_s" in r:
            found["matmul_tflop_per_s"][r["dtype"]] = r["tflop_per_s"]
    return found


def record_dtype(r: dict) -> str | None:
    return r.get("dtype") or CONFIG_DTYPES.get(r.get("config"))


def fraction_of_peak(r: dict, measured: dict) -> tuple[float, str] | None:
    """(fraction, what it is of): flops-bound results against the matmul peak of their dtype,
    the rest against the copy bandwidth."""
    if r.get("flops"):
        peak = measured["matmul_tflop_per_s"].get(record_dtype(r))
        return (r["tflop_per_s"] / peak, f"{record_dtype(r)} matmul") if peak else None
    if r.get("bytes_moved") and measured["copy_gb_per_s"]:
        return r["gb_per_s"] / measured["copy_gb_per_s"], "copy"
    return None


def groups(records: list[dict], kinds: tuple[str, ...]) -> dict[str, list[dict]]:
    """Records of the given kinds by group, in the order measured; a result measured twice
    (a stage run again into the same folder) keeps its last measurement."""
    by_group: dict[str, dict[str, dict]] = {}
    for r in records:
        if r.get("kind") in kinds:
            by_group.setdefault(r["group"], {})[r["name"]] = r
    return {g: list(named.values()) for g, named in by_group.items()}


def comparisons(records: list[dict], kinds: tuple[str, ...]) -> list[dict]:
    """One row per (group, ours, baseline) of equal CUDA-graph use: ratio = baseline / ours."""
    rows = []
    for group, members in groups(records, kinds).items():
        for ours in (r for r in members if is_ours(r["name"])):
            for base in (r for r in members if not is_ours(r["name"])):
                if bool(base.get("cuda_graph")) == bool(ours.get("cuda_graph")):
                    rows.append({"group": group, "ours": ours["name"], "baseline": base["name"],
                                 "ratio": base["median_s"] / ours["median_s"], "ours_record": ours})
    return rows


def projection(r: dict) -> dict:
    """A sampling run extrapolated linearly to T_FULL steps: per-step time (fixed costs such as
    x_T and a graph capture are spread over the timed steps, so counted T_FULL/steps times:
    conservative), images per second at T_FULL steps and the time for FID_SAMPLES samples — and
    that time at DPM_SOLVER_STEPS network evaluations (DPM-Solver++(2M): the same network and one
    fused update per step, so the same per-step time)."""
    per_step = r["median_s"] / r["steps"]
    images_per_s = r["batch"] / (per_step * T_FULL)
    return {"per_step_s": per_step, "images_per_s": images_per_s, "fid_s": FID_SAMPLES / images_per_s,
            "fid_dpm_solver_s": FID_SAMPLES * per_step * DPM_SOLVER_STEPS / r["batch"]}


def cpu_goals(records: list[dict]) -> list[dict]:
    """The CPU goals, each a row whether measured or not: GroupNorm+SiLU and the step (fused cpu
    against eager, per shape and layout), then every end-to-end goal of CPU_E2E_GOALS against
    eager and against the best (fastest) torch.compile baseline of its group."""
    goals = []
    for group, members in groups(records, ("op",)).items():
        op, shape = group.split()[0], group.split()[1] if len(group.split()) > 1 else ""
        ours = next((r for r in members if r["name"] == "fused cpu"), None)
        eager = next((r for r in members if r["name"] == "eager"), None)
        if ours is None or eager is None or op not in ("group_norm_silu", "step"):
            continue
        want = CPU_STEP_GOAL
        if op == "group_norm_silu":
            chw = math.prod(int(d) for d in shape.split("x")[1:])
            want = CPU_GN_LARGE_GOAL if chw >= CPU_GN_LARGE else CPU_GN_GOAL
        goals.append(_goal(f"{group}: fused cpu vs eager", eager["median_s"] / ours["median_s"], want))
    for model, kind, batch, over_eager, over_compile in CPU_E2E_GOALS:
        members = next((m for m in groups(records, (kind,)).values()
                        if m[0].get("model") == model and m[0].get("batch") == batch), [])
        ours = [r for r in members if r["name"] in CPU_OURS]
        best = min(ours, key=lambda r: r["median_s"]) if ours else None
        run = "one step" if kind == "e2e-step" else f"{best['steps']}-step sampling" if best else "sampling"
        if best and kind == "e2e-sample" and model == "digits" and best["steps"] != T_FULL:
            run += f" (not the full {T_FULL})"
        for baseline, want in (("eager", over_eager), ("torch.compile", over_compile)):
            found = [r for r in members if r["name"] == baseline or
                     (baseline == "torch.compile" and r["name"].startswith("torch.compile"))]
            base = min(found, key=lambda r: r["median_s"]) if found else None
            label = f"{model} {run}, batch {batch}: ours vs {'eager' if baseline == 'eager' else 'the best torch.compile'}"
            if best is None or base is None:
                goals.append(_worst(label, {}, want, "ratio"))
            else:
                goal = _goal(label, base["median_s"] / best["median_s"], want)
                goals.append(dict(goal, where=f"{best['name']} against {base['name']}"))
    return goals + adm_goals(records, CPU_ADM_GOALS)


def adm_goals(records: list[dict], table: tuple) -> list[dict]:
    """One row per goal of `table`, ours against guided-diffusion's code ("eager") or torch.compile
    of it, the worst of the groups measured (rows without its code are not measured)."""
    rows = comparisons(records, ("adm-forward", "adm-sampling"))
    goals = []
    for kind, baseline, want in table:
        values = {row["group"]: row["ratio"] for row in rows
                  if row["ours_record"]["kind"] == kind and row["baseline"] == baseline}
        against = "eager code" if baseline == "eager" else "code under torch.compile"
        goals.append(_worst(f"ADM {kind.removeprefix('adm-')}: ours vs guided-diffusion's {against}", values, want,
                            "ratio"))
    return goals


def gpu_goals(records: list[dict]) -> list[dict]:
    """The GPU goals, each a row whether measured or not: an op goal's value is its worst shape
    (named in `where`, with how many shapes met it); "not measured" rows have value None."""
    measured = peaks(records)
    goals = []
    for label, prefix, against, want in GPU_OP_GOALS:
        values = {}
        for group, members in groups(records, ("op",)).items():
            if _in_op_group(group, prefix):
                ours = [r for r in members if is_ours(r["name"])]
                best = min(ours, key=lambda r: r["median_s"]) if ours else None
                value = _op_value(best, members, against, measured) if best else None
                if value is not None:
                    values[f"{group} ({best['name']})"] = value
        goals.append(_worst(label, values, want, "percent" if against == "copy" else "ratio"))
    rows = [row for row in comparisons(records, ("e2e-sample",)) if row["ours_record"].get("model") == "cifar10"]
    for baseline, config, want in GPU_E2E_GOALS:
        values = {f"{row['group']}: {row['ours']}{_size_note(row['ours_record'])}": row["ratio"] for row in rows
                  if row["baseline"] == baseline and row["ours_record"]["config"] == config}
        goals.append(_worst(f"end to end {config}: vs {baseline}", values, want, "ratio"))
    name, config, minutes = GPU_FID
    values = {f"{r['group']}{_size_note(r)}": projection(r)["fid_s"] / 60 for r in records
              if r.get("kind") == "e2e-sample" and r.get("model") == "cifar10" and r["name"] == name
              and r["config"] == config}
    goals.append(_worst(f"{FID_SAMPLES} CIFAR-10 samples, {config}, {name} (projected)", values, minutes, "minutes",
                        at_most=True))
    return goals + adm_goals(records, GPU_ADM_GOALS)


def _in_op_group(group: str, prefix: str) -> bool:
    """Whether an op group ("attention B=256 N=256 d=512 bfloat16") is the goal's ("attention d=512")."""
    op, *keys = prefix.split()
    return group.split()[0] == op and all(key in group.split() for key in keys)


def _op_value(ours: dict, members: list[dict], against: str, measured: dict) -> float | None:
    if against == "copy":
        found = fraction_of_peak(ours, measured)
        return found[0] if found and found[1] == "copy" else None
    base = next((r for r in members if r["name"] == against), None)
    return base["median_s"] / ours["median_s"] if base else None


def _worst(label: str, values: dict[str, float], want: float, unit: str, at_most: bool = False) -> dict:
    """The goal judged at its worst case over `values` ({where: value}); value None when empty."""
    if not values:
        return {"goal": label, "value": None, "want": want, "unit": unit, "met": None, "at_most": at_most, "where": ""}
    where = max(values, key=values.get) if at_most else min(values, key=values.get)
    met = sum((v <= want) if at_most else (v >= want) for v in values.values())
    goal = _goal(label, values[where], want, at_most=at_most)
    return dict(goal, unit=unit, where=where if len(values) == 1 else f"{where}; met at {met} of {len(values)}")


def _size_note(r: dict) -> str:
    return "" if r["batch"] == 256 else f" (batch {r['batch']}, not 256)"


def _goal(label: str, value: float, want: float, at_most: bool = False) -> dict:
    met = value <= want if at_most else value >= want
    return {"goal": label, "value": value, "want": want, "unit": "ratio", "met": met, "at_most": at_most, "where": ""}
