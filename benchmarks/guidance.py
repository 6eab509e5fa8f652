"""Guidance on the bundled digits models, measured (DESIGN §2.5): fidelity against diversity.

    python -m benchmarks.guidance [--num 200] [--gate-num 1000] [--out-dir benchmarks/results/guidance]
    python -m benchmarks.guidance --candidate runs/digits-cond/model.safetensors   # a model in training

Every run draws global samples 0 .. N − 1 of seed 0 with sample j asked for label j mod 10, DDIM
50 steps (η = 0) through the Sampler's fused CPU step, so the runs differ only by their guidance
(paired: the same x_T for the same j). An SVC trained on the real digits alone
(benchmarks/digits_quality.py, never the guidance classifier) reads every sample.

- fidelity: the share of samples it assigns to the label asked for with confidence ≥ 0.8
  (and, for the gate, the share whose most likely class is that label);
- diversity: the mean pairwise distance between samples asked for the same label, in the data
  set's 8×8 grey-level space, averaged over labels (the real digits' own figure is the scale);
- copies: the digits gate's criterion (closer to a training digit than 5% of training digits are
  to each other).

Runs: classifier-free guidance of digits-cond at w ∈ {0, 0.5, 1, 2, 3, 4}; classifier guidance
by digits-classifier at s ∈ {0, 0.5, 1, 2, 4} of the unconditional digits model, and s ∈ {0, 1}
of digits-cond; the done gate: w = 2 at --gate-num samples (every label ≥ 90% read as asked,
≤ 5% copies). Samples are cached under runs/guidance/ (rerunning is cheap). Writes
OUT/report.md, OUT/results.json, docs/guidance_tradeoff.png and docs/guidance_grid.png (label 3
at each w, one row per w).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

import ddpm_fast as df
from benchmarks.digits_quality import CONFIDENCE, as_digits, classifier, gate, real_digits
from ddpm_fast.classifier import NoisyClassifier
from ddpm_fast.cli.images import save_grid

CFG_SCALES = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0)
CLASSIFIER_SCALES = (0.0, 0.5, 1.0, 2.0, 4.0)
GATE_W, GATE_SHARE, GATE_COPIES = 2.0, 0.90, 0.05
GRID_LABEL = 3
SETTINGS = dict(method="ddim", steps=50, backend="cpu")


def draw(model_name: str, num: int, w: float, s: float, cache: Path | None) -> torch.Tensor:
    """Samples 0 .. num − 1 (label j mod 10) of one guided run, from the cache when drawn before
    (cache None: drawn, not kept)."""
    path = None if cache is None else cache / f"{model_name}-w{w}-s{s}-n{num}.pt"
    if path is not None and path.is_file():
        return torch.load(path, weights_only=True)
    model = df.UNet.from_pretrained(model_name).eval()
    guide = NoisyClassifier.from_pretrained("digits-classifier").eval() if s else None
    sampler = df.Sampler(model, df.NoiseSchedule.linear(1000), guidance_scale=w, classifier=guide,
                         classifier_scale=s if s else None, **SETTINGS)
    start = time.perf_counter()
    asked = labels(num) if model.num_classes is not None or guide is not None else None  # else no labels to take
    samples = sampler.sample(num, seed=0, labels=asked, batch_size=200, progress=True)
    print(f"{model_name} w={w} s={s}: {num} samples in {time.perf_counter() - start:.1f} s", flush=True)
    if path is not None:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(samples, path)
    return samples


def labels(num: int) -> list[int]:
    return [j % 10 for j in range(num)]


def diversity(digits: np.ndarray, y: np.ndarray) -> float:
    """Mean pairwise distance within each label, averaged over the labels."""
    per_label = []
    for k in range(10):
        x = digits[y == k]
        d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1) ** 0.5
        per_label.append(d[np.triu_indices(len(x), 1)].mean())
    return float(np.mean(per_label))


def measure(samples: torch.Tensor, svc, real: np.ndarray) -> dict:
    y = np.asarray(labels(len(samples)))
    digits = as_digits(samples)
    probs = svc.predict_proba(digits)
    read = probs.argmax(axis=1)
    per_label = [float((read[y == k] == k).mean()) for k in range(10)]
    return {"fidelity": float(((read == y) & (probs.max(axis=1) >= CONFIDENCE)).mean()),
            "read_as_label": float((read == y).mean()), "read_as_label_per_label": per_label,
            "diversity": diversity(digits, y), "copies": gate(samples, svc, real)["copies"]}


def candidate(path: str, num: int, svc, real: np.ndarray) -> None:
    """A class-conditional checkpoint being trained, judged as the bundled one will be: the gate
    run (w = GATE_W) and the conditional model alone (w = 0), printed, nothing written."""
    for w in (GATE_W, 0.0):
        run = measure(draw(path, num, w, 0.0, None), svc, real)
        print(f"{path} w = {w}, {num} samples: read as label {run['read_as_label']:.3f} (worst label "
              f"{min(run['read_as_label_per_label']):.2f}), fidelity {run['fidelity']:.3f}, diversity "
              f"{run['diversity']:.2f}, copies {run['copies']:.3f}", flush=True)


def figure(results: dict, real_diversity: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = ((axes[0], "cfg", "classifier-free guidance weight w (digits-cond)"),
              (axes[1], "classifier", "classifier guidance scale s (digits + digits-classifier)"))
    for ax, kind, label in panels:
        runs = results[kind]
        x = [run["scale"] for run in runs]
        ax.plot(x, [run["fidelity"] for run in runs], "o-", color="tab:blue", label="fidelity")
        ax.set_xlabel(label)
        ax.set_ylabel(f"fidelity: share read as the label asked for, confidence ≥ {CONFIDENCE}", color="tab:blue",
                      fontsize=8)
        ax.set_ylim(0, 1.02)
        twin = ax.twinx()
        twin.plot(x, [run["diversity"] for run in runs], "s--", color="tab:red", label="diversity")
        twin.axhline(real_diversity, color="tab:red", lw=0.8, alpha=0.5)
        twin.text(x[-1], real_diversity, "real digits", color="tab:red", fontsize=7, ha="right", va="bottom")
        twin.set_ylabel("diversity: mean pairwise distance within a label (8×8 grey levels)", color="tab:red",
                        fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Guidance on the bundled digits models: DDIM {SETTINGS['steps']} steps, seed 0, the same x_T per "
                 f"sample in every run", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=200, help="samples per run of the sweeps (a multiple of 10)")
    parser.add_argument("--gate-num", type=int, default=1000, help="samples of the gate run (100 per label)")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results/guidance"))
    parser.add_argument("--cache", type=Path, default=Path("runs/guidance"))
    parser.add_argument("--candidate", default=None, metavar="PATH",
                        help="only judge this class-conditional .safetensors (the gate run and w = 0, "
                             "--gate-num samples each), writing nothing")
    args = parser.parse_args()
    for flag, value in (("--num", args.num), ("--gate-num", args.gate_num)):
        if value < 20 or value % 10:  # diversity needs two samples of every label
            parser.error(f"{flag} must be a multiple of 10 and at least 20, got {value}")
    torch.manual_seed(0)
    real, real_labels = real_digits()
    svc = classifier(real, real_labels)[0]
    if args.candidate:
        return candidate(args.candidate, args.gate_num, svc, real)
    results = {"cfg": [], "classifier": [], "classifier_conditional": []}
    grid_rows = []
    for w in CFG_SCALES:
        samples = draw("digits-cond", args.num, w, 0.0, args.cache)
        results["cfg"].append({"scale": w, **measure(samples, svc, real)})
        grid_rows.append(samples[GRID_LABEL::10][:10])
    for s in CLASSIFIER_SCALES:
        results["classifier"].append({"scale": s, **measure(draw("digits", args.num, 0.0, s, args.cache), svc, real)})
    for s in (0.0, 1.0):
        results["classifier_conditional"].append(
            {"scale": s, **measure(draw("digits-cond", args.num, 0.0, s, args.cache), svc, real)})
    gate_run = measure(draw("digits-cond", args.gate_num, GATE_W, 0.0, args.cache), svc, real)
    real_diversity = diversity(real, real_labels)
    passed = min(gate_run["read_as_label_per_label"]) >= GATE_SHARE and gate_run["copies"] <= GATE_COPIES
    cfg_diversity = [run["diversity"] for run in results["cfg"]]
    falls = all(b < a for a, b in zip(cfg_diversity, cfg_diversity[1:]))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    record = dict(results, gate={"w": GATE_W, "num": args.gate_num, **gate_run, "passes": passed},
                  diversity_falls_with_w=falls, real_diversity=real_diversity, settings=SETTINGS,
                  num=args.num, torch=torch.__version__, machine=platform.machine())
    (args.out_dir / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    figure(results, real_diversity, Path("docs/guidance_tradeoff.png"))
    order = torch.cat(grid_rows)
    print(f"wrote {save_grid(order, 'docs/guidance_grid.png', nrow=10)}")
    lines = [f"# Guidance on the bundled digits models ({time.strftime('%Y-%m-%d')})", "",
             f"`python -m benchmarks.guidance --num {args.num} --gate-num {args.gate_num}`: DDIM "
             f"{SETTINGS['steps']} steps, seed 0, sample j asked for label j mod 10; read by an SVC trained on "
             f"the real digits only. Fidelity: share read as the label asked for with confidence ≥ {CONFIDENCE}; "
             f"diversity: mean pairwise distance within a label (real digits: {real_diversity:.2f}).", "",
             "![fidelity and diversity](../../../docs/guidance_tradeoff.png)", "",
             "| guidance | scale | fidelity | read as label | worst label | diversity | copies |",
             "|---|---|---|---|---|---|---|"]
    names = {"cfg": "classifier-free (digits-cond), w", "classifier": "classifier (digits), s",
             "classifier_conditional": "classifier (digits-cond, w = 0), s"}
    for kind, name in names.items():
        for run in results[kind]:
            lines.append(f"| {name} | {run['scale']} | {run['fidelity']:.3f} | {run['read_as_label']:.3f} | "
                         f"{min(run['read_as_label_per_label']):.2f} | {run['diversity']:.2f} | {run['copies']:.3f} |")
    lines += ["", f"**Gate** (w = {GATE_W}, {args.gate_num} samples, {args.gate_num // 10} per label): read as the "
              f"label asked for, per label: " + ", ".join(f"{k}: {v:.2f}" for k, v in
                                                          enumerate(gate_run["read_as_label_per_label"]))
              + f" (each ≥ {GATE_SHARE}); copies {gate_run['copies']:.3f} (≤ {GATE_COPIES}); diversity falls as w "
              f"grows: {'yes' if falls else 'no'} → {'PASS' if passed and falls else 'FAIL'}", "",
              "![label 3 at w = " + ", ".join(map(str, CFG_SCALES)) + ", one row each](../../../docs/guidance_grid.png)"]
    (args.out_dir / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
