"""The CPU convolution report (DESIGN §5.8, §7): every convolution of both U-Nets in each way
the CPU runs it, against the core's measured FMA peak, and the end-to-end goals against
diffusers, with 1 and 2 threads; written as one markdown file.

    make cpu-convs-report [CONV_REPORT=benchmarks/results/<date>-cpu-convs.md] [CONV_THREADS=1,2]

Each thread count runs in a process of its own (Inductor bakes the thread count into the code
it compiles). Variants are interleaved round by round and the fastest round is the figure (the
median beside it): on a shared machine a wait for a core only ever adds time. The load average
and the CPU's ISA level are recorded before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

from benchmarks import conv_profile, conv_shapes, cpu_e2e
from benchmarks.cpu_e2e import Workload

ROOT = Path(__file__).resolve().parents[1]
CONV_TABLES = (("cifar10", 2), ("cifar10", 8), ("digits", 8), ("digits", 64))
CONV_ROUNDS = 5
WORKLOADS = (
    Workload("CIFAR-10, one step, batch 2", "cifar10", 2, 1, rounds=5),
    Workload("CIFAR-10, one step, batch 8", "cifar10", 8, 1, rounds=3),
    Workload("CIFAR-10, 50 steps, batch 2", "cifar10", 2, 50, rounds=1),
    Workload("digits, 1000 steps, batch 8", "digits", 8, 200, rounds=2),
    Workload("digits, 1000 steps, batch 64", "digits", 64, 100, rounds=2),
    Workload("digits, DPM-Solver++(2M) 20 steps, batch 64", "digits", 64, 20, rounds=2, method="dpm-solver++"),
)
# DESIGN §5.8's goals: ours over diffusers eager, over its best torch.compile; each 3×3 conv's share of the peak
GOALS = {"cifar10": (1.25, 1.1), "digits": (1.5, 1.1)}
PEAK_SHARE = 0.85


def environment() -> dict:
    from ddpm_fast import _extension
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return dict(time=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), loadavg=Path("/proc/loadavg").read_text().strip(),
                dispatch=_extension.cpu_dispatch(), torch=torch.__version__, commit=commit.stdout.strip(),
                cpus=os.cpu_count())


def worker(threads: int) -> dict:
    """Everything measured with `threads` torch threads."""
    torch.set_num_threads(threads)
    result = dict(threads=threads, start=environment(), peak_gflops=conv_shapes.gemm_peak_gflops(), convs={}, e2e=[])
    if threads == 1:  # the per-conv table and its goal are single-core, and so is the profile of misses
        for model, batch in CONV_TABLES:
            rows = conv_shapes.table(cpu_e2e.base_model(model), batch, CONV_ROUNDS)
            result["convs"][f"{model} B{batch}"] = rows
        result["profile"] = {f"{model} B{batch}": conv_profile.profile(cpu_e2e.base_model(model), batch)
                             for model, batch in CONV_TABLES}
    for work in WORKLOADS:
        result["e2e"].append(cpu_e2e.measure(work))
        print(f"[{threads} thread(s)] {work.name}: done", file=sys.stderr, flush=True)
    result["end"] = environment()
    return result


def _conv_section(result: dict) -> tuple[list[str], list[str]]:
    peak = result["peak_gflops"]
    sizes = " and ".join(f"{n}³" for n in conv_shapes.GEMM_SIZES)
    lines = [f"Core FMA peak (float32 GEMM {sizes}, torch.mm, 1 thread, the better's fastest of 15): "
             f"**{peak:.1f} GFLOP/s**.", "",
             "GFLOP/s of each way (fastest of {} interleaved rounds); share = the chosen plan's GFLOP/s over the peak."
             .format(CONV_ROUNDS), "",
             "| U-Net, batch | input | conv | + add | today NCHW | channels_last | packed cl | chosen (plan) | share of peak | chosen / today |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    misses = []
    for table, rows in result["convs"].items():
        for row in rows:
            g = row["gflops"]
            share = g["chosen"] / peak
            conv = f"{row['kernel']}×{row['kernel']}{' s2' if row['stride'] == 2 else ''} →{row['out_channels']}"
            lines.append(f"| {table} | {'×'.join(map(str, row['shape']))} | {conv} | {'yes' if row['residual'] else ''} | "
                         f"{g['today NCHW']:.1f} | {g['channels_last']:.1f} | {g['packed channels_last']:.1f} | "
                         f"{g['chosen']:.1f} ({row['chosen']}) | {share:.0%} | {g['chosen'] / g['today NCHW']:.2f}× |")
            if row["kernel"] == 3 and row["shape"][1] > 3 and share < PEAK_SHARE:
                misses.append(f"{table} {'×'.join(map(str, row['shape']))} {conv}: {share:.0%}")
    flops = {t: sum(r["flops"] for r in rows) for t, rows in result["convs"].items()}
    for table, rows in result["convs"].items():
        today = sum(r["flops"] / r["gflops"]["today NCHW"] for r in rows) / 1e9  # seconds
        chosen = sum(r["flops"] / r["gflops"]["chosen"] for r in rows) / 1e9
        lines.append("")
        lines.append(f"{table}: its distinct convolutions, once each, {flops[table] / 1e9:.2f} GFLOP; today {today * 1e3:.1f} ms "
                     f"({flops[table] / today / 1e9:.1f} GFLOP/s), chosen {chosen * 1e3:.1f} ms "
                     f"({flops[table] / chosen / 1e9:.1f} GFLOP/s, {today / chosen:.2f}×).")
    return lines, misses


def _e2e_section(result: dict) -> tuple[list[str], list[tuple]]:
    lines = ["| workload | timed | " + " | ".join(cpu_e2e.VARIANTS) + " | ours / diffusers | ours / compile | ours / F.conv2d |",
             "|---|---|" + "---|" * (len(cpu_e2e.VARIANTS) + 3)]
    goals = []
    for record in result["e2e"]:
        work, secs = record["workload"], record["seconds"]
        best = {v: min(s) for v, s in secs.items()}
        timed = f"{work['steps']} step{'s' if work['steps'] > 1 else ''} × {len(secs['ours'])}"
        cells = [f"{best[v]:.3f} s (med {median(secs[v]):.3f})" for v in cpu_e2e.VARIANTS]
        vs_eager, vs_compile = best["diffusers"] / best["ours"], best["diffusers + torch.compile"] / best["ours"]
        lines.append(f"| {work['name']} | {timed} | " + " | ".join(cells) +
                     f" | {vs_eager:.2f}× | {vs_compile:.2f}× | {best['ours, F.conv2d'] / best['ours']:.2f}× |")
        want_eager, want_compile = GOALS[work["model"]]
        goals += [(f"{work['name']}: ours vs diffusers eager", vs_eager, want_eager),
                  (f"{work['name']}: ours vs diffusers + torch.compile", vs_compile, want_compile)]
    first = {v: max(r["first_call_s"][v] for r in result["e2e"]) for v in cpu_e2e.VARIANTS}
    lines += ["", "Longest first call (warm-up: compile, packing, calibration) over the workloads: " +
              ", ".join(f"{v} {s:.2f} s" for v, s in first.items()) + "."]
    return lines, goals


def render(results: list[dict], duration_s: float, command: str) -> str:
    out = ["# CPU convolutions: pre-packed oneDNN weights, the plan per shape, fused residual add (2026-12-07)", "",
           f"`{command}` — one run, {duration_s / 60:.1f} minutes. Machine shared with other jobs: read the "
           "ratios (variants interleaved, fastest round), not the absolute times.", ""]
    goal_rows = []
    for result in results:
        n = result["threads"]
        start, end = result["start"], result["end"]
        out += [f"## {n} thread{'s' if n > 1 else ''}", "",
                f"Start {start['time']} (load `{start['loadavg']}`), end {end['time']} (load `{end['loadavg']}`); "
                f"torch {start['torch']}, commit {start['commit']}, {start['cpus']} CPUs; dispatch: `{start['dispatch']}`.",
                "", f"GEMM rate with {n} thread{'s' if n > 1 else ''}: {result['peak_gflops']:.1f} GFLOP/s.", ""]
        if result["convs"]:
            lines, misses = _conv_section(result)
            out += ["### Every convolution of both U-Nets", ""] + lines + [""]
            goal_rows.append((f"every 3×3 convolution (C_in > 3) at ≥ {PEAK_SHARE:.0%} of the single-core FMA peak",
                              f"{len(misses)} below" + (": " + "; ".join(misses) if misses else ""), "all",
                              not misses))
        lines, goals = _e2e_section(result)
        out += ["### End to end", "", "Seconds of the timed steps, fastest round (median). DDPM rows time the given "
                "number of consecutive steps of the 1000-step chain per round (every step the same work: the "
                "ratio is the 1000-step run's); the DPM-Solver++ row is a whole run from fresh noise.", ""] + lines + [""]
        goal_rows += [(f"{name} ({n} thread{'s' if n > 1 else ''})", f"{got:.2f}×", f"≥ {want}×", got >= want)
                      for name, got, want in goals]
        if result.get("profile"):
            out += ["### Profile of ours (one forward, torch.profiler, self CPU time)", ""]
            out += [line for name, found in result["profile"].items() for line in conv_profile.lines(name, found)]
            out += [""]
    table = ["## Goals", "", "| goal | measured | wanted | |", "|---|---|---|---|"]
    table += [f"| {name} | {got} | {want} | {'met' if met else 'missed'} |" for name, got, want, met in goal_rows]
    return "\n".join(out[:4] + table + [""] + out[4:]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/2026-12-07-cpu-convs.md"))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        Path(args.json).write_text(json.dumps(worker(args.worker), default=str))
        return
    started, results = time.time(), []
    for threads in map(int, args.threads.split(",")):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            subprocess.run([sys.executable, "-m", "benchmarks.cpu_convs", "--worker", str(threads), "--json", f.name],
                           cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            results.append(json.loads(Path(f.name).read_text()))
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, default=str))  # the figures, for re-reading
    command = f"make cpu-convs-report CONV_REPORT={Path(args.out).resolve().relative_to(ROOT)} CONV_THREADS={args.threads}"
    Path(args.out).write_text(render(results, time.time() - started, command))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
