"""Images per second at equal quality, on the bundled digits model (DESIGN §7):

    python -m benchmarks.quality_vs_steps [--num 1000] [--out-dir DIR]

Every sampler draws the same global samples 0 .. num − 1 of seed 0 (the same x_T and, where it
adds noise, the same noise stream: a paired comparison), through the sampling-job machinery of
`ddpm-fast sample` (resumable shards under --samples-dir, default runs/quality/, so a long
DDPM-1000 run survives being stopped: rerun the command). The digits quality gate (benchmarks/digits_quality.py) scores each ("equal quality": a confident share at most 0.03
below DDPM-1000's):
the share of samples an SVC trained on real digits reads with confidence ≥ 0.8, the smallest and
largest class share, the share of copies.

Speed is the time of one step (network forward + fused update) at the sampling batch, one
thread, each sampler's steps timed in turn (interleaved rounds, median of rounds), times its
number of steps: images/s = batch / (per-step time × steps). Writes DIR/report.md,
DIR/results.json and DIR/quality-vs-steps.png (confident share against network evaluations).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import ddpm_fast as df
from benchmarks.digits_quality import classifier, gate, real_digits
from ddpm_fast.cli.shards import sample_to_file, state_dict_sha256

# (name, Sampler keyword arguments): the anchor first
SAMPLERS = (
    ("DDPM 1000", dict(method="ddpm")),
    ("DDIM 100", dict(method="ddim", steps=100)),
    ("DDIM 50", dict(method="ddim", steps=50)),
    *((f"DPM-Solver++(2M) {k}", dict(method="dpm-solver++", steps=k)) for k in (10, 15, 20, 25)),
    *((f"DPM-Solver++(2M) SDE {k}", dict(method="dpm-solver++-sde", steps=k)) for k in (20, 25)),
)
WITHIN = 0.03  # "equal quality": a confident share at most this far below DDPM-1000's


def draw(model: df.UNet, kwargs: dict, num: int, batch: int, folder: Path, name: str) -> torch.Tensor:
    """Samples 0 .. num − 1 of seed 0 as [num, 1, 16, 16] in [−1, 1], from (or into) a resumable job."""
    sampler = df.Sampler(model, df.NoiseSchedule.linear(1000), backend="cpu", **kwargs)
    out = folder / (name.lower().replace(" ", "-").replace("(", "").replace(")", "").replace("+", "p") + ".npz")
    resume = (out.parent / (out.name + ".parts")).exists()
    if not (out.is_file() and (out.parent / (out.name + ".manifest.json")).is_file()):
        sample_to_file(sampler, out, num, seed=0, micro_batch=batch, model_sha256=state_dict_sha256(model),
                       resume=resume, progress=True)
    images = np.load(out)["arr_0"]  # uint8 [N, H, W, C], as a user saves them
    return torch.from_numpy(images).permute(0, 3, 1, 2).double() / 127.5 - 1


def step_seconds(model: df.UNet, batch: int, rounds: int, steps_per_round: int) -> dict[str, float]:
    """Median seconds of one step at `batch` for each sampler, rounds interleaved."""
    schedule = df.NoiseSchedule.linear(1000)
    times: dict[str, list[float]] = {name: [] for name, _ in SAMPLERS}
    with torch.inference_mode():
        for round_ in range(rounds + 1):  # round 0 warms up
            for name, kwargs in SAMPLERS:
                sampler = df.Sampler(model, schedule, backend="cpu", **kwargs)
                x, step = sampler.stepper(batch, seed=100 + round_)
                n = min(steps_per_round, len(sampler.timesteps))
                start = time.perf_counter()
                for _ in range(n):
                    step()
                if round_:
                    times[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(values) for name, values in times.items()}


def plot(rows: list[dict], anchor: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=130)
    for family, marker in (("DPM-Solver++(2M) SDE", "s"), ("DPM-Solver++(2M)", "o"), ("DDIM", "^"), ("DDPM", "D")):
        points = [r for r in rows if r["name"].rsplit(" ", 1)[0] == family]
        if points:
            ax.plot([r["steps"] for r in points], [r["confident"] for r in points], marker=marker, label=family)
    ax.axhspan(anchor["confident"] - WITHIN, anchor["confident"], color="grey", alpha=0.2,
               label=f"equal quality: at most {WITHIN} below DDPM-1000")
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per sample")
    ax.set_ylabel("confident share (≥ 0.8)")
    ax.set_title(f"bundled digits model, {anchor['num']} paired samples per point")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds")
    parser.add_argument("--steps-per-round", type=int, default=10, help="steps timed per sampler per round")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results/quality-vs-steps"))
    parser.add_argument("--samples-dir", type=Path, default=Path("runs/quality"),
                        help="where the resumable sampling jobs keep their samples")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = df.UNet.from_pretrained("digits").eval()
    real, labels = real_digits()
    clf, accuracy, _ = classifier(real, labels)
    rows = {}
    for name, kwargs in SAMPLERS[1:] + SAMPLERS[:1]:  # the long anchor last: the others are kept if it is stopped
        samples = draw(model, kwargs, args.num, args.batch, args.samples_dir, name)
        steps = len(df.Sampler(model, df.NoiseSchedule.linear(1000), **kwargs).timesteps)
        rows[name] = {"name": name, "steps": steps, "num": args.num, **gate(samples, clf, real)}
    rows = [rows[name] for name, _ in SAMPLERS]
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    per_step = step_seconds(model, args.batch, args.rounds, args.steps_per_round)
    anchor = rows[0]
    for row in rows:
        row["step_s"] = per_step[row["name"]]
        row["images_per_s"] = args.batch / (row["step_s"] * row["steps"])
        row["speedup"] = row["images_per_s"] / (args.batch / (per_step[anchor["name"]] * anchor["steps"]))
        row["equal_quality"] = row["confident"] >= anchor["confident"] - WITHIN
    write(args, rows, anchor, accuracy, load)


def write(args, rows: list[dict], anchor: dict, accuracy: float, load: list[str]) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"num": args.num, "batch": args.batch, "threads": 1, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "loadavg_after_sampling": load,
            "classifier_held_out_accuracy": accuracy}
    (args.out_dir / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    plot(rows, anchor, args.out_dir / "quality-vs-steps.png")
    solver = [r for r in rows if r["name"].startswith("DPM-Solver++(2M) ") and "SDE" not in r["name"]]
    matched = next((r for r in solver if r["equal_quality"]), None)
    lines = [f"# Quality against steps: the bundled digits model ({args.num} paired samples per sampler)", "",
             f"Command: `python -m benchmarks.quality_vs_steps --num {args.num}`. Seed 0, samples 0 .. {args.num - 1} "
             f"for every sampler (the same x_T). Gate classifier: RBF SVC, held-out accuracy {accuracy:.4f}. "
             f"Timing: one thread, batch {args.batch}, per-step median of {args.rounds} interleaved rounds of "
             f"{args.steps_per_round} steps; load average {' '.join(load)}.", "",
             "| sampler | network evaluations | confident ≥ 0.8 | Δ vs DDPM-1000 | smallest / largest class | copies "
             "| per step | images/s | speed-up vs DDPM-1000 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['steps']} | {r['confident']:.3f} | {r['confident'] - anchor['confident']:+.3f} "
                     f"| {min(r['class_shares']):.3f} / {max(r['class_shares']):.3f} | {r['copies']:.3f} "
                     f"| {r['step_s'] * 1e3:.1f} ms | {r['images_per_s']:.2f} | {r['speedup']:.1f}× |")
    lines += ["", "![confident share against network evaluations](quality-vs-steps.png)", ""]
    if matched:
        lines.append(f"Smallest DPM-Solver++(2M) step count whose confident share is at most {WITHIN} below "
                     f"DDPM-1000's: "
                     f"**{matched['steps']}** ({matched['confident']:.3f} vs {anchor['confident']:.3f}), "
                     f"{matched['speedup']:.1f}× DDPM-1000's images/s.")
    else:
        lines.append(f"No DPM-Solver++(2M) step count measured here comes within {WITHIN} below DDPM-1000's "
                     f"confident share ({anchor['confident']:.3f}).")
    (args.out_dir / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
