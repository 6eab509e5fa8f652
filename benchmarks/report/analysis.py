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
from pathlib import Path

CONFIG_DTYPES = {"fp32": "float32", "bf16-cl": "bfloat16"}
T_FULL = 1000          # DDPM steps per sample
FID_SAMPLES = 50_000   # an FID evaluation's sample count
DPM_SOLVER_STEPS = 20  # DPM-Solver++(2M)'s default step count (DESIGN §2.4)
CPU_OP_GOALS = {"eager": 2.0, "torch.compile": 1.0}
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
BUNDLED_GOAL = ("reference sampler", 1.3)


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
    """Each fused CPU op ≥ 2× eager and ≥ 1× torch.compile (per shape and layout); the bundled
    model's full sampling ≥ 1.3× the eager reference sampler."""
    goals = []
    for row in comparisons(records, ("op",)):
        if row["ours"] == "fused cpu" and row["baseline"] in CPU_OP_GOALS:
            want = CPU_OP_GOALS[row["baseline"]]
            goals.append(_goal(f"{row['group']}: fused cpu vs {row['baseline']}", row["ratio"], want))
    for row in comparisons(records, ("e2e-sample",)):
        r = row["ours_record"]
        if r.get("model") == "digits" and row["ours"] == "ours" and row["baseline"] == BUNDLED_GOAL[0]:
            label = f"{row['group']}: ours vs the eager reference sampler"
            if r["steps"] != T_FULL:
                label += f" (a {r['steps']}-step run, not the full {T_FULL})"
            goals.append(_goal(label, row["ratio"], BUNDLED_GOAL[1]))
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
    return goals


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
