"""The bundled class-conditional digits models, measured (DESIGN §2.5):

    python -m benchmarks.digits_conditional [--model digits-cond] [--num 500] [--steps 100] [--guidance 0]
                                            [--grid docs/digits_cond_grid.png]
    python -m benchmarks.digits_conditional --classifier digits-classifier

digits-cond: sample i is asked for label i mod 10 (DDIM, η = 0, the fused CPU step, the noise
contract's seed), and the quality gate's SVC (benchmarks/digits_quality.py) reads every sample;
reported per label: the share it reads as the label asked for, and the gate's figures.
--guidance w runs classifier-free guidance, ε̃ = (1 + w) ε_θ(x_t, t, y) − w ε_θ(x_t, t, ∅)
(Ho & Salimans 2022, eq. 6), in the fused step (Sampler(guidance_scale=w)); w = 0 is the
conditional model alone. benchmarks/guidance.py measures fidelity against diversity over w.

digits-classifier: its accuracy on the real digits noised to x_t = q_sample(x_0, t, ε) (eq. 4),
at a few t (the digits it was trained on: this checks the noise conditioning, not generalisation).
"""
from __future__ import annotations

import argparse
import time

import torch

import ddpm_fast as df
from ddpm_fast.classifier import NoisyClassifier
from ddpm_fast.cli.data import digits_dataset, digits_labels
from ddpm_fast.cli.images import save_grid
from ddpm_fast.reference.diffusion import q_sample

from benchmarks.digits_quality import as_digits, classifier, gate, passes, real_digits


def conditional_quality(args: argparse.Namespace) -> None:
    real, labels = real_digits()
    svc = classifier(real, labels)[0]
    model = df.UNet.from_pretrained(args.model).eval()
    y = torch.arange(args.num) % model.num_classes
    sampler = df.Sampler(model, df.NoiseSchedule.linear(1000), method="ddim", steps=args.steps, backend="cpu",
                         guidance_scale=args.guidance)
    start = time.perf_counter()
    samples = sampler.sample(args.num, seed=args.seed, labels=y)
    seconds = time.perf_counter() - start
    read = svc.predict(as_digits(samples))
    shares = [float((read[y.numpy() == k] == k).mean()) for k in range(model.num_classes)]
    result = gate(samples, svc, real)
    print(f"{args.model}: {args.num} samples, label i mod {model.num_classes}, DDIM {args.steps} steps, "
          f"guidance w = {args.guidance}, seed {args.seed}, {seconds:.1f} s")
    print("read as the label asked for, per label: " + ", ".join(f"{k}: {s:.2f}" for k, s in enumerate(shares))
          + f"; all: {float((read == y.numpy()).mean()):.3f}")
    print(f"gate: confident {result['confident']:.3f}, class shares {result['class_shares']}, copies "
          f"{result['copies']:.3f} -> {'PASS' if passes(result) else 'FAIL'}")
    if args.grid:  # one class per row: samples sorted by the label asked for (stable, so by index within)
        order = torch.argsort(y, stable=True)
        print(f"wrote {save_grid(samples[order], args.grid, nrow=args.num // model.num_classes)}")


def classifier_accuracy(args: argparse.Namespace) -> None:
    clf = NoisyClassifier.from_pretrained(args.classifier).eval()
    x0, y = digits_dataset(clf.resolution), digits_labels()
    schedule, generator = df.NoiseSchedule.linear(1000), torch.Generator().manual_seed(args.seed)
    figures = []
    for step in (0, 100, 250, 500, 750, 999):
        t = torch.full_like(y, step)
        x_t = q_sample(schedule, x0, t, torch.randn(x0.shape, generator=generator))
        with torch.no_grad():
            figures.append(f"t={step}: {float((clf(x_t.float(), t).argmax(1) == y).float().mean()):.3f}")
    print(f"{args.classifier}: accuracy on the {len(y)} digits noised to x_t (seed {args.seed}): " + ", ".join(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-cond")
    parser.add_argument("--classifier", default=None, help="measure this noisy classifier instead")
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight w >= 0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", default=None, help="also write the samples to this PNG, one class per row")
    args = parser.parse_args()
    torch.manual_seed(0)
    classifier_accuracy(args) if args.classifier else conditional_quality(args)


if __name__ == "__main__":
    main()
