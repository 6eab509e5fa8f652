"""ddpm-fast: the command line.

    ddpm-fast sample --model random-small --num 16 --seed 0 --out samples/grid.png
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import NoiseSchedule, Sampler, UNet
from .images import save_grid

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RANDOM_SMALL = "random-small"


def _load_model(name: str) -> UNet:
    if name == RANDOM_SMALL:
        print("note: --model random-small is a small randomly initialised U-Net (seed 0), not a trained model: "
              "the grid shows what an untrained network draws", file=sys.stderr)
        torch.manual_seed(0)
        return UNet(ch=32, out_ch=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
                    in_channels=1, resolution=16)
    return UNet.from_pretrained(name)


def _sample(args: argparse.Namespace) -> int:
    model = _load_model(args.model).to(args.device)
    sampler = Sampler(model, NoiseSchedule.linear(args.timesteps), method=args.method, steps=args.steps,
                      eta=args.eta, backend=args.backend, dtype=DTYPES[args.dtype],
                      clip_denoised=not args.no_clip)
    start = time.perf_counter()
    x0 = sampler.sample(args.num, seed=args.seed, progress=not args.quiet, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    path = save_grid(x0, args.out)
    print(f"wrote {args.num} samples ({args.method}, {len(sampler.timesteps)} steps, seed {args.seed}) to {path} "
          f"in {seconds:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm-fast", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser("sample", help="draw samples and write an image grid")
    sample.add_argument("--model", default=RANDOM_SMALL,
                        help=f"a bundled model's name, our .safetensors file, a diffusers UNet2DModel folder, "
                             f"or {RANDOM_SMALL!r} (default)")
    sample.add_argument("--num", type=int, default=16, help="number of samples")
    sample.add_argument("--batch-size", type=int, default=None, help="samples per batch (default: all at once)")
    sample.add_argument("--method", choices=("ddpm", "ddim"), default="ddpm")
    sample.add_argument("--steps", type=int, default=None, help="DDIM steps (default: all T)")
    sample.add_argument("--eta", type=float, default=0.0, help="DDIM η in [0, 1]")
    sample.add_argument("--timesteps", type=int, default=1000, help="T of the linear schedule")
    sample.add_argument("--no-clip", action="store_true", help="do not clip x̂0 to [-1, 1]")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", default="samples/grid.png", help="PNG grid to write")
    sample.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sample.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    sample.add_argument("--backend", choices=("auto", "reference", "cpu", "triton", "cuda"), default="auto")
    sample.add_argument("--quiet", action="store_true", help="no progress bar")
    sample.set_defaults(run=_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as error:
        print(f"ddpm-fast: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
