"""ddpm-fast nll: the variational bound in bits/dim of a model on a data set (DESIGN §2.6), a
sharded, resumable job like sampling (cli/shards.py), with the paper's rate/distortion figures.

    ddpm-fast nll --model digits --dataset digits --num 256 --out nll.npz --curve rate_distortion.png
    torchrun --nproc_per_node=4 -m ddpm_fast.cli nll --model digits --dataset digits --out nll.npz
"""
from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np
import torch

from .. import NoiseSchedule, UNet
from ..contract import BACKENDS, NOISE_STREAM_VERSION, SEED_RANGE, SIGMA1_CONVENTIONS, VARIANCES, check_int_range
from ..likelihood import Bound, Evaluator
from .data import digits_dataset, digits_labels, image_folder_dataset
from .distributed import world_from_env
from .images import check_output, write_npz
from .nll_figures import save_progressive_grid, save_rate_distortion
from .shards import _Job, run_shards, state_dict_sha256

# the grid's x̂_0 columns, as fractions of T − 1 (0-based 999, 749, 500, 350, 250, 150, 100, 50, 25, 10, 0 at T = 1000)
PROGRESSIVE_FRACTIONS = (1.0, 0.75, 0.5, 0.35, 0.25, 0.15, 0.1, 0.05, 0.025, 0.01, 0.0)
_ARRAYS = ("prior", "terms", "distortion", "mse")


def add_parser(commands) -> None:
    nll = commands.add_parser("nll", help="the variational bound in bits/dim (the paper's NLL), term by term")
    nll.add_argument("--model", default="digits", help="a bundled model's name or our .safetensors file")
    data = nll.add_mutually_exclusive_group()
    data.add_argument("--dataset", choices=["digits"], help="a bundled data set (default: digits)")
    data.add_argument("--data", metavar="FOLDER", help="a folder of images (resized to the model's size)")
    nll.add_argument("--num", "--num-images", dest="num", type=int, default=None,
                     help="the first N images in the data set's order (default: all; spell it --num-images after "
                          "torchrun, whose parser takes --num for its --numa-binding)")
    nll.add_argument("--timesteps-subset", type=int, default=None, metavar="K",
                     help="an estimate over K of the T timesteps (log-spaced, trapezoid-weighted; labelled as an "
                          "estimate) instead of the full T-term bound")
    nll.add_argument("--label", default=None,
                     help="class-conditional models: 'given' (each image's own label), 'none' (∅) or a class N")
    nll.add_argument("--variance", choices=VARIANCES, default="fixed_large")
    nll.add_argument("--no-clip", action="store_true", help="do not clip x̂0 to [-1, 1] in p_θ's mean")
    nll.add_argument("--sigma1", choices=SIGMA1_CONVENTIONS, default="paper",
                     help="the decoder's σ_1: 'paper' (σ_1² = β_1 with fixed_large; the default) or "
                          "'improved-diffusion' (β̃ of the second timestep, as improved-diffusion computes it)")
    nll.add_argument("--timesteps", type=int, default=1000, help="T of the model's linear schedule")
    nll.add_argument("--seed", type=int, default=0, help="seed of the x_t noise (DESIGN §3)")
    nll.add_argument("--batch-size", type=int, default=None, help="images per network call (default: min(N, 256))")
    nll.add_argument("--shard-size", type=int, default=None, help="images per shard (default: one batch)")
    nll.add_argument("--resume", action="store_true", help="continue the unfinished job writing --out")
    nll.add_argument("--overwrite", action="store_true", help="replace an --out that another job wrote")
    nll.add_argument("--curve", metavar="PNG", help="draw the rate-distortion figure (the paper's Figure 5)")
    nll.add_argument("--progressive", metavar="PNG",
                     help="draw x̂0 from x_t at a few t for the first 8 images, beside x_0 (progressive decompression)")
    nll.add_argument("--backend", choices=BACKENDS, default="auto")
    nll.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    nll.add_argument("--out", required=True, help="nll.npz: per-image bpd and every term")
    nll.add_argument("--quiet", action="store_true", help="no progress bar")
    nll.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if Path(args.out).suffix != ".npz":
        raise ValueError(f"--out must be a .npz file, got {args.out!r}")
    check_output(args.out, suffixes=(".npz",), folders=False)
    for flag in ("curve", "progressive"):
        if getattr(args, flag):
            check_output(getattr(args, flag), suffixes=(".png",), folders=False)
    check_int_range("--seed", args.seed, SEED_RANGE)
    with world_from_env(args.device) as world:
        model = UNet.from_pretrained(args.model)
        checksum = state_dict_sha256(model)
        schedule = NoiseSchedule.linear(args.timesteps)
        evaluator = Evaluator(model.to(world.device), schedule, variance=args.variance,
                              clip_denoised=not args.no_clip, sigma1=args.sigma1, backend=args.backend)
        images, labels = _data(args, model)
        if args.timesteps_subset is not None and not 2 <= args.timesteps_subset <= args.timesteps:
            raise ValueError(f"--timesteps-subset must be in [2, {args.timesteps}], got {args.timesteps_subset}")
        batch = min(len(images), 256) if args.batch_size is None else args.batch_size
        shard = batch if args.shard_size is None else args.shard_size
        for name, value in (("--batch-size", batch), ("--shard-size", shard)):
            if value < 1:
                raise ValueError(f"{name} must be a positive int, got {value}")
        if shard % batch:
            raise ValueError(f"--shard-size must be a multiple of --batch-size {batch}, got {shard}")
        evaluator.check_images(images)  # shape and range now, not after the first shard
        settings = dict(evaluator.config, model_sha256=checksum, data_sha256=_sha256(images, labels), seed=args.seed,
                        num_samples=len(images), micro_batch=batch, shard_size=shard,
                        timesteps_subset=args.timesteps_subset, backend=evaluator.resolved_backend,
                        noise_stream_version=NOISE_STREAM_VERSION)
        job = _NllJob(args.out, settings, world)
        per_image = args.timesteps if args.timesteps_subset is None else args.timesteps_subset
        start = time.perf_counter()
        run_shards(job, args.resume, args.overwrite, not args.quiet, unit="eval", units=lambda n: n * per_image,
                   desc=lambda n: f"bound [{settings['backend']}], {n} of {len(images)} images, {per_image} evaluations "
                                  f"each", work=lambda k, bar: job.draw(evaluator, k, bar, images, labels))
        if world.rank != 0:
            return 0
        bound = read_bound(args.out)
        print(report(bound, time.perf_counter() - start))
        if args.curve:
            print(f"wrote the rate-distortion figure to {save_rate_distortion(bound, args.curve, args.model)}")
        if args.progressive:
            shown = list(range(min(8, len(images))))
            steps = sorted({round(f * (args.timesteps - 1)) for f in PROGRESSIVE_FRACTIONS}, reverse=True)
            frames = evaluator.denoised(images[shown], steps, seed=args.seed,
                                        labels=None if labels is None else labels[shown])
            path = save_progressive_grid(images[shown], frames, args.progressive)
            print(f"wrote the progressive-decompression grid to {path}")
    return 0


def _data(args: argparse.Namespace, model: UNet) -> tuple[torch.Tensor, torch.Tensor | None]:
    if args.data:
        images, given = image_folder_dataset(args.data, model.resolution, model.in_channels), None
    else:
        images, given = digits_dataset(model.resolution), digits_labels()
    if args.num is not None:
        if not 1 <= args.num <= len(images):
            raise ValueError(f"--num must be in [1, {len(images)}] (the data set's size), got {args.num}")
        images, given = images[:args.num], None if given is None else given[:args.num]
    if model.num_classes is None:
        if args.label is not None:
            raise ValueError(f"--label {args.label}: --model {args.model} is unconditional")
        return images, None
    if args.label is None:
        raise ValueError(f"--model {args.model} is class-conditional: pass --label given (each image's own), none (∅) "
                         f"or a class 0 … {model.num_classes - 1}")
    if args.label == "given":
        if given is None:
            raise ValueError("--label given needs a labelled data set (--dataset digits); a --data folder has none")
        return images, given
    if args.label == "none":
        return images, torch.full((len(images),), model.num_classes)
    if not args.label.isdigit() or not 0 <= int(args.label) < model.num_classes:
        raise ValueError(f"--label must be 'given', 'none' or a class in [0, {model.num_classes}), got {args.label!r}")
    return images, torch.full((len(images),), int(args.label))


def _sha256(images: torch.Tensor, labels: torch.Tensor | None) -> str:
    digest = hashlib.sha256(images.contiguous().numpy().tobytes())
    if labels is not None:
        digest.update(labels.numpy().astype(np.int64).tobytes())
    return digest.hexdigest()


class _NllJob(_Job):
    """The bound's job: shards of images, each shard's terms in terms-START-STOP.npz."""
    FORMAT = "ddpm_fast.nll-job/1"
    KIND = "bound (nll) job"
    SHARD_PREFIX = "terms"
    PAYLOAD = _ARRAYS + ("timesteps", "weights", "quantised")

    def draw(self, evaluator: Evaluator, k: int, bar, images: torch.Tensor, labels: torch.Tensor | None) -> None:
        start, stop = self.plan.bounds(k)
        bound = evaluator.bits_per_dim(images[start:stop], seed=self.settings["seed"], sample_offset=start,
                                       labels=None if labels is None else labels[start:stop],
                                       timesteps=self.settings["timesteps_subset"],
                                       batch_size=self.settings["micro_batch"], progress=bar)
        rate = bar.format_dict.get("rate")
        if rate:
            bar.set_postfix_str(f"{rate / len(bound.timesteps):.2f} images/s")
        arrays = {name: getattr(bound, name).numpy() for name in _ARRAYS + ("timesteps", "weights")}
        write_npz(self.shard_path(k), dict(arrays, quantised=np.array(bound.quantised),
                                           indices=np.arange(start, stop, dtype=np.int64),
                                           settings_sha256=np.array(self.digest)))

    def _check_payload(self, path: Path, n: int, arrays: dict[str, np.ndarray]):
        columns = arrays["timesteps"].shape[0]
        for name in _ARRAYS:
            expected = (n,) if name == "prior" else (n, columns)
            if arrays[name].dtype != np.float64 or arrays[name].shape != expected:
                raise ValueError(f"shard {path} must hold float64 {name} {expected}, holds {arrays[name].dtype} "
                                 f"{arrays[name].shape}")
        return arrays

    def _write_output(self, files: dict[int, Path]) -> Path:
        shards = [self._read_shard(k, path, payload=True) for k, path in sorted(files.items())]
        bound = Bound(timesteps=torch.from_numpy(shards[0]["timesteps"]), weights=torch.from_numpy(shards[0]["weights"]),
                      quantised=sum(int(s["quantised"]) for s in shards),
                      estimate=self.settings["timesteps_subset"] not in (None, self.settings["timesteps"]),
                      **{name: torch.from_numpy(np.concatenate([s[name] for s in shards])) for name in _ARRAYS})
        arrays = {name: value.numpy() for name, value in bound.arrays().items()}
        return write_npz(self.target, dict(arrays, quantised=np.array(bound.quantised), estimate=np.array(bound.estimate)))


def read_bound(path: str | Path) -> Bound:
    """The Bound a finished `nll` job wrote."""
    with np.load(path) as f:
        return Bound(timesteps=torch.from_numpy(f["timesteps"]), weights=torch.from_numpy(f["weights"]),
                     quantised=int(f["quantised"]), estimate=bool(f["estimate"]),
                     **{name: torch.from_numpy(f[name]) for name in _ARRAYS})


def report(bound: Bound, seconds: float) -> str:
    s = bound.summary()
    kind = (f"an ESTIMATE over {s['terms']} of the timesteps (--timesteps-subset)" if s["estimate"]
            else f"the full {s['terms']}-term bound")
    lines = [f"bits/dim: {s['bpd']:.4f} ± {s['bpd_stderr']:.4f} (standard error; {s['images']} images, {kind}, "
             f"{seconds:.1f} s)",
             f"rate L_T + ... + L_1: {s['rate']:.4f} bits/dim (L_T {s['prior']:.3g}); distortion L_0: "
             f"{s['distortion_bpd']:.4f} bits/dim; x̂0 RMSE at t = 1: {s['rmse']:.4f} on the 0-255 scale"]
    if s["quantised"]:
        lines.append(f"note: {s['quantised']} of {s['images']} images were not on the 8-bit grid and were quantised "
                     f"to it first")
    return "\n".join(lines)
