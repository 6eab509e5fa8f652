"""The report's arithmetic over the benchmark records (conftest.py writes one JSON object per
result): measured peaks, fractions of peak, like-for-like ratios, the 1000-step projection and
the project's goals. Pure functions, tested in tests/test_report.py.

A record's `name` says its role: "eager" is the eager reference, names starting "fused" or
"ours" are this project's, anything else is a baseline. Ours is compared with each baseline
of its group that has the same CUDA-graph use (DESIGN §7: like for like).
"""
from __future__ import annotations

import json
from pathlib import Path

CONFIG_DTYPES = {"fp32": "float32", "bf16-cl": "bfloat16"}
T_FULL = 1000          # DDPM steps per sample
FID_SAMPLES = 50_000   # an FID evaluation's sample count
CPU_OP_GOALS = {"eager": 2.0, "torch.compile": 1.0}
GPU_GOALS = (  # (baseline, config, ratio, stretch): ours over the baseline, CIFAR-10 sampling, like for like
    ("diffusers", "bf16-cl", 2.0, None),
    ("diffusers", "fp32", 5.0, None),
    ("torch.compile max-autotune", "bf16-cl", 1.15, 1.3),
)
GPU_FID_MINUTES = 30.0
BUNDLED_GOAL = ("reference sampler", 1.3)


def load(report_dir: Path) -> list[dict]:
    records = []
    for path in sorted(report_dir.glob("*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def is_ours(name: str) -> bool:
    return name.startswith(("fused", "ours"))


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
    conservative), images per second at T_FULL steps and the time for FID_SAMPLES samples."""
    per_step = r["median_s"] / r["steps"]
    images_per_s = r["batch"] / (per_step * T_FULL)
    return {"per_step_s": per_step, "images_per_s": images_per_s, "fid_s": FID_SAMPLES / images_per_s}


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
    """The H100 goals for DDPM CIFAR-10 sampling, from the CIFAR-10 sampling runs of a GPU."""
    goals = []
    rows = [row for row in comparisons(records, ("e2e-sample",)) if row["ours_record"].get("model") == "cifar10"]
    for baseline, config, want, stretch in GPU_GOALS:
        for row in rows:
            r = row["ours_record"]
            if row["baseline"] == baseline and r["config"] == config:
                goals.append(_goal(f"{row['group']}: {row['ours']} vs {baseline}{_size_note(r)}", row["ratio"],
                                   want, stretch))
    for r in records:
        if r.get("kind") == "e2e-sample" and r.get("model") == "cifar10" and r["name"] == "ours + CUDA graph":
            minutes = projection(r)["fid_s"] / 60
            goals.append(_goal(f"{r['group']}: {FID_SAMPLES} samples in minutes (projected){_size_note(r)}",
                               minutes, GPU_FID_MINUTES, at_most=True))
    return goals


def _size_note(r: dict) -> str:
    return "" if r["batch"] == 256 else f" (batch {r['batch']}, not 256)"


def _goal(label: str, value: float, want: float, stretch: float | None = None, at_most: bool = False) -> dict:
    met = value <= want if at_most else value >= want
    return {"goal": label, "value": value, "want": want, "met": met, "at_most": at_most,
            "stretch_met": None if stretch is None else value >= stretch, "stretch": stretch}
