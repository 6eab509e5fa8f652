"""Issue 6's quality gate for the bundled digits model, measured:

    python benchmarks/digits_quality.py [--model digits] [--num 500] [--method ddim --steps 100]

A classifier trained on the real digits (scikit-learn SVC at 8×8, ≥ 97% on held-out digits)
reads the samples (average-pooled to 8×8, grey levels 0..16). Gate: ≥ 90% of samples get a
confidence ≥ 0.8; every class is ≥ 4% of the samples; ≤ 5% of samples lie closer to their
nearest training image than the 5th percentile of the training set's own nearest-neighbour
distances (no copies).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

import ddpm_fast as df


def real_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    data = load_digits()
    return data.images.reshape(-1, 64).astype(np.float64), data.target


def classifier(x: np.ndarray, y: np.ndarray):
    """(SVC fitted on every real digit, its accuracy when fitted on 75% and scored on 25%)."""
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC
    make = lambda: SVC(gamma=0.001, C=10, probability=True, random_state=0)  # noqa: E731
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return make().fit(x, y), make().fit(x_train, y_train).score(x_test, y_test)


def as_digits(samples: torch.Tensor) -> np.ndarray:
    """[N, 1, 16, 16] in [−1, 1] → the data set's form: 8×8, grey levels 0..16, flattened."""
    return ((F.avg_pool2d(samples.double().cpu(), 2) + 1) * 8).clamp(0, 16).reshape(samples.shape[0], 64).numpy()


def gate(samples: torch.Tensor, clf, real: np.ndarray) -> dict:
    x = as_digits(samples)
    probs = clf.predict_proba(x)
    d_real = ((real[:, None, :] - real[None, :, :]) ** 2).sum(-1) ** 0.5
    np.fill_diagonal(d_real, np.inf)
    threshold = np.percentile(d_real.min(axis=1), 5)
    nearest = (((x[:, None, :] - real[None, :, :]) ** 2).sum(-1) ** 0.5).min(axis=1)
    return {"confident": float((probs.max(axis=1) >= 0.8).mean()),
            "class_shares": (np.bincount(probs.argmax(axis=1), minlength=10) / len(x)).round(3).tolist(),
            "copies": float((nearest < threshold).mean())}


def passes(result: dict) -> bool:
    return result["confident"] >= 0.90 and min(result["class_shares"]) >= 0.04 and result["copies"] <= 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--method", default="ddim")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    real, labels = real_digits()
    clf, held_out = classifier(real, labels)
    sampler = df.Sampler(df.UNet.from_pretrained(args.model), df.NoiseSchedule.linear(1000), method=args.method,
                         steps=args.steps if args.method == "ddim" else None, backend="cpu")
    start = time.perf_counter()
    samples = sampler.sample(args.num, seed=args.seed, batch_size=250)
    seconds = time.perf_counter() - start
    result = gate(samples, clf, real)
    print(f"classifier held-out accuracy {held_out:.4f}; {args.num} samples ({args.method}, "
          f"{len(sampler.timesteps)} steps, seed {args.seed}) in {seconds:.1f} s")
    print(f"confident (>= 0.8): {result['confident']:.3f} (gate >= 0.90); class shares {result['class_shares']} "
          f"(gate each >= 0.04); copies {result['copies']:.3f} (gate <= 0.05) -> "
          f"{'PASS' if passes(result) else 'FAIL'}")


if __name__ == "__main__":
    main()
