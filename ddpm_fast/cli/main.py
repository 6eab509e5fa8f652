"""ddpm-fast: the command line.

    ddpm-fast sample --model digits --num 16 --seed 0 --out samples/grid.png
    ddpm-fast sample --model digits-cond --label all --guidance-scale 2 --method ddim --steps 50 --num 100
    torchrun --nproc_per_node=8 -m ddpm_fast.cli sample --model digits --num-samples 50000 --out samples.npz
    ddpm-fast train --dataset digits --out runs/digits --steps 6000 --seed 0
    ddpm-fast train --dataset digits --num-classes 10 --p-uncond 0.1 --dropout 0.3 --out runs/digits-cond --steps 6000
    ddpm-fast train-classifier --dataset digits --out runs/digits-classifier --steps 3000
    ddpm-fast nll --model digits --dataset digits --num 256 --out nll.npz --curve rate_distortion.png
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from .. import NoiseSchedule, Sampler, UNet, _startup
from ..adm_checkpoints import PRESETS as ADM_PRESETS, classifier_from_guided_diffusion, from_guided_diffusion, load_flag_text
from ..adm_checkpoints import preset as adm_preset, sampling
from ..classifier import NoisyClassifier
from .._atomic import must_write, read_regular, write_bytes
from ..checkpoints import Notice, skeleton
from ..contract import BACKENDS, DPM_SPACINGS, METHODS, SAMPLING_VARIANCES, SEED_RANGE, SPACINGS, check_int_range
from ..unet import DIGITS
from .data import DIGITS_CLASSES, digits_dataset, digits_labels, image_folder_dataset
from .distributed import ReportedOnRankZero, world_from_env
from .images import GRID_WIDTH, check_output, finished_manifest, trajectory_png
from .nll import add_parser as add_nll_parser
from .shards import sample_to_file, state_dict_sha256
from .train import EMA_WEIGHTS, TrainConfig, train

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RANDOM_SMALL = "random-small"
MICRO_BATCH = 256  # the default --batch-size; never derived from the world size, so outputs do not depend on it


def _load_model(name: str, quiet: bool = False) -> UNet:
    if name == RANDOM_SMALL:
        if not quiet:
            print("note: --model random-small is a small randomly initialised U-Net (seed 0), not a trained model: "
                  "the grid shows what an untrained network draws", file=sys.stderr)
        torch.manual_seed(0)
        return UNet.small()
    return UNet.from_pretrained(name)


def _sample(args: argparse.Namespace) -> int:
    out = check_output(args.out)  # before minutes of sampling, not after
    if args.trajectory and check_output(args.trajectory, suffixes=(".png",), folders=False) == out:
        raise ValueError(f"--trajectory and --out are both {args.out}: give the trajectory a file of its own")
    if args.dtype != "float32" and torch.device(args.device).type == "cpu":
        print(f"note: --dtype {args.dtype} on the CPU is emulated by PyTorch and runs many times slower than float32 "
              f"(it is for GPUs)", file=sys.stderr)
    with world_from_env(args.device) as world:  # torch.distributed when torchrun started us
        model, classifier, schedule, process = _networks(args, quiet=world.rank != 0)
        checksum = state_dict_sha256(model)  # of the weights as loaded, before any dtype cast
        classifier = classifier.to(world.device) if classifier is not None else None
        labels, nrow = _labels(args, model, classifier)
        sampler = Sampler(model.to(world.device), schedule, method=args.method, **process, eta=args.eta,
                          spacing=args.spacing, use_karras_sigmas=args.karras, backend=args.backend,
                          dtype=DTYPES[args.dtype], clip_denoised=not args.no_clip,
                          finite_check_every=args.check_finite, compile=args.compile,
                          guidance_scale=args.guidance_scale, classifier=classifier,
                          classifier_scale=args.classifier_scale)
        # the trajectory (a few samples) first: one refused (another file there) stops the job before its work
        trajectory = _trajectory(args, sampler, labels) if args.trajectory and world.rank == 0 else None
        start, manifest = time.perf_counter(), finished_manifest(out)
        earlier = manifest.stat().st_ino if manifest.is_file() else None  # a finished job writes a new one
        path = sample_to_file(sampler, args.out, args.num, seed=args.seed,
                              micro_batch=min(args.num, MICRO_BATCH) if args.batch_size is None else args.batch_size,
                              shard_size=args.shard_size, model_sha256=checksum, world=world, resume=args.resume,
                              overwrite=args.overwrite, progress=not args.quiet, grid_width=args.grid_width,
                              labels=labels, nrow=nrow)
        if world.rank != 0:
            return 0
    if not manifest.is_file() or manifest.stat().st_ino != earlier:  # else the job was finished before: a no-op
        seconds = time.perf_counter() - start
        # a resumed job drew only what was missing, so its time is not per image of --num
        rate = "" if args.resume else f", {1e3 * seconds / args.num:.1f} ms an image"
        print(f"wrote {args.num} samples ({args.method}, {len(sampler.timesteps)} steps, seed {args.seed}, "
              f"{world.size} process{'es' * (world.size > 1)}) to {path} in {seconds:.1f} s{rate}")
    if trajectory is not None:
        Path(args.trajectory).parent.mkdir(parents=True, exist_ok=True)
        done = "wrote the" if write_bytes(args.trajectory, trajectory, args.overwrite) else "kept the identical"
        print(f"{done} x̂0 trajectory of {min(args.num, 8)} samples to {args.trajectory}")
    return 0


def _networks(args: argparse.Namespace, quiet: bool):
    """(model, classifier or None, schedule, the Sampler's variance / prediction_type / steps) of
    --model and --classifier: ours, or with --preset a guided-diffusion / improved-diffusion
    checkpoint (.pt or our .safetensors), whose preset also gives the process (DESIGN §2.7)."""
    if args.respacing is not None and args.steps is not None:
        raise ValueError("--respacing and --steps both choose the timesteps: give one")
    steps = args.respacing if args.respacing is not None else args.steps
    if args.preset is None:
        for flag, given in (("--classifier-preset", args.classifier_preset), ("--respacing", args.respacing)):
            if given is not None:
                raise ValueError(f"{flag} belongs to guided-diffusion and improved-diffusion checkpoints: pass --preset")
        classifier = NoisyClassifier.from_pretrained(args.classifier) if args.classifier else None
        process = dict(variance=args.variance or "fixed_large", prediction_type="epsilon", steps=steps)
        return (_load_model(args.model, quiet), classifier, NoiseSchedule.linear(args.timesteps or 1000), process)
    if args.timesteps is not None:
        raise ValueError(f"--timesteps: preset {args.preset!r} sets the schedule (its diffusion_steps and "
                         f"noise_schedule)")
    chosen = adm_preset(args.preset)
    if chosen.builder == "classifier":
        raise ValueError(f"--preset {args.preset} is a classifier: give it as --classifier-preset")
    model = from_guided_diffusion(args.model, preset=args.preset)
    schedule, process = sampling(chosen.diffusion())
    process["steps"] = process["steps"] if steps is None else steps
    process["variance"] = args.variance or process["variance"]
    classifier = None
    if args.classifier:
        size = model.config["image_size"]
        name = args.classifier_preset or f"{size}x{size}_classifier"
        if name not in ADM_PRESETS:
            raise ValueError(f"no published classifier for {size}×{size} images: pass --classifier-preset")
        classifier = classifier_from_guided_diffusion(args.classifier, preset=name)
    elif args.classifier_preset is not None:
        raise ValueError("--classifier-preset names the flags of --classifier: pass --classifier too")
    return model, classifier, schedule, process


def _trajectory(args: argparse.Namespace, sampler: Sampler, labels: list[int] | None) -> bytes:
    """The PNG of x̂0 over time of the first samples (at most 8), refused now if --trajectory
    holds another file and --overwrite is absent."""
    frames = sampler.trajectory(min(args.num, 8), seed=args.seed, frames=min(12, len(sampler.timesteps)),
                                labels=None if labels is None else labels[:8])
    png = trajectory_png(frames, width=args.grid_width)
    must_write(args.trajectory, png, args.overwrite)
    return png


def _labels(args: argparse.Namespace, model: UNet, classifier) -> tuple[list[int] | None, int | None]:
    """The class of each sample from --label (N, or "all": an equal share of every class, in order)
    and the grid's samples per row (one class a row for "all")."""
    classes = model.num_classes if model.num_classes is not None else (
        classifier.config.get("num_classes", classifier.config.get("out_channels")) if classifier is not None
        else None)
    if args.label is None:
        if classes is not None:
            raise ValueError(f"--model {args.model}{' with --classifier' * (classifier is not None)} draws classes: "
                             f"pass --label N (0 … {classes - 1}) or --label all")
        return None, None
    if classes is None:
        raise ValueError(f"--label {args.label}: --model {args.model} is unconditional; pass --classifier to guide "
                         f"it to a label, or a class-conditional model")
    if args.label == "all":
        if args.num % classes:
            raise ValueError(f"--label all draws an equal share of each of the {classes} classes: --num must be a "
                             f"multiple of {classes}, got {args.num}")
        share = args.num // classes
        return [j // share for j in range(args.num)], share
    label = int(args.label) if args.label.lstrip("-").isdigit() else None
    if label is None or not 0 <= label < classes:
        raise ValueError(f"--label must be an int in [0, {classes}) or 'all', got {args.label!r}")
    return [label] * args.num, None


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if any(v < 0 for v in values) or (text.strip() and not values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0 such as 1,2,2, got {text!r}")
    return values


def _text(ints: tuple[int, ...]) -> str:
    return ",".join(map(str, ints))


def _train_config(args: argparse.Namespace, **extra) -> TrainConfig:
    """Every setting checked before any work."""
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                       ema_decay=args.ema_decay, grad_clip=args.grad_clip, seed=args.seed,
                       checkpoint_every=args.checkpoint_every, **extra)


def _network(args: argparse.Namespace) -> dict:
    return dict(ch=args.ch, ch_mult=args.ch_mult, num_res_blocks=args.num_res_blocks,
                attn_resolutions=args.attn_resolutions, dropout=args.dropout, in_channels=args.channels,
                resolution=args.resolution, num_groups=args.num_groups)


def _labelled_digits(args: argparse.Namespace, flag: str) -> tuple[torch.Tensor, torch.Tensor]:
    if args.dataset != "digits":
        raise ValueError(f"{flag} needs a data set with labels: --dataset {args.dataset!r} is a folder of images "
                         f"without labels (only --dataset digits has them)")
    return digits_dataset(args.resolution), digits_labels()


def _run_training(model, data: torch.Tensor, labels: torch.Tensor | None, config: TrainConfig,
                  args: argparse.Namespace) -> int:
    start = time.perf_counter()
    train(model.to(args.device), data, config, args.out, resume=args.resume, overwrite=args.overwrite,
          progress=not args.quiet, labels=labels)
    print(f"EMA weights of step {args.steps} ({data.shape[0]} images, {time.perf_counter() - start:.0f} s): "
          f"{args.out}/{EMA_WEIGHTS}")
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.p_uncond is not None and args.num_classes is None:
        raise ValueError("--p-uncond applies to class-conditional training only: add --num-classes K")
    config = _train_config(args, **({} if args.p_uncond is None else {"p_uncond": args.p_uncond}))
    _check_network(UNet, args, out_ch=args.channels, num_classes=args.num_classes)
    if args.num_classes is None:
        data, labels = (digits_dataset(args.resolution) if args.dataset == "digits"
                        else image_folder_dataset(args.dataset, args.resolution, args.channels)), None
    else:
        data, labels = _labelled_digits(args, "--num-classes")
        if args.num_classes != DIGITS_CLASSES:
            raise ValueError(f"--num-classes must be the data set's number of classes, {DIGITS_CLASSES} for "
                             f"--dataset digits, got {args.num_classes}")
    torch.manual_seed(args.seed)
    model = UNet(out_ch=args.channels, num_classes=args.num_classes, **_network(args))
    return _run_training(model, data, labels, config, args)


def _check_network(cls, args: argparse.Namespace, **extra) -> None:
    """The network's flags checked on the meta device before the data set is read or a weight
    allocated: arguments the network refuses, and a network too large for the device to train
    (its weights, their EMA and Adam's two moments: 4 copies)."""
    network = skeleton(cls, {**extra, **_network(args)}, "the network flags (--ch, --ch-mult, --resolution, ...)")
    parameters = sum(p.numel() for p in network.parameters())
    needed = 4 * sum(p.numel() * p.element_size() for p in network.parameters())
    device = torch.device(args.device)
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else \
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > memory:
        raise ValueError(f"the network flags make a {cls.__name__} of {parameters:,} parameters, which need "
                         f"{needed / 2 ** 30:,.1f} GiB to train (weights, EMA, Adam's moments), more than the "
                         f"{memory / 2 ** 30:,.1f} GiB of --device {args.device}")


def _train_classifier(args: argparse.Namespace) -> int:
    config = _train_config(args)
    _check_network(NoisyClassifier, args, num_classes=DIGITS_CLASSES)
    data, labels = _labelled_digits(args, "train-classifier")
    torch.manual_seed(args.seed)
    return _run_training(NoisyClassifier(DIGITS_CLASSES, **_network(args)), data, labels, config, args)


PRESETS = {"cifar10": UNet.ddpm_cifar10, "digits": UNet.digits, "small": UNet.small}


def _convert(args: argparse.Namespace) -> int:
    import json
    check_output(args.out, suffixes=(".safetensors",), folders=False)  # before reading a large source
    if args.preset or args.flags:  # a guided-diffusion or improved-diffusion checkpoint (DESIGN §2.7)
        if args.config:
            raise ValueError("--config is for original-DDPM state dicts; --preset and --flags for guided-diffusion "
                             "and improved-diffusion ones: give one or the other")
        model = load_flag_text(args.source, args.flags or "", args.preset)
    else:
        config = None
        if args.config:
            config = PRESETS[args.config]().config if args.config in PRESETS else json.loads(read_regular(args.config))
        model = UNet.from_pretrained(args.source, config=config)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    done = "wrote" if model.save_pretrained(args.out, overwrite=args.overwrite) else "kept the identical"
    print(f"{done} {sum(p.numel() for p in model.parameters()):,} parameters of {type(model).__name__}({model.config}) "
          f"to {args.out}")
    return 0


def _int_at_least(low: int, wanted: str):
    """An argparse type: an integer >= low, or one line saying what was `wanted`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {value}")
        return value
    return parse


_positive, _non_negative = _int_at_least(1, "a positive integer"), _int_at_least(0, "an integer >= 0")


def _non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0, or one line saying what was wanted."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        check_int_range("seed", int(text), SEED_RANGE)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2^63), got {text!r}") from None
    return int(text)


def _device(text: str) -> str:
    """cpu, cuda or cuda:N that this machine has, checked before any work."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda") or device.type == "cpu" and device.index not in (None, 0):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} asked for, but this machine has no usable CUDA GPU "
                                         f"(torch.cuda.is_available() is False): use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r} asked for, but this machine has {torch.cuda.device_count()} GPUs")
    return text


class _Parser(argparse.ArgumentParser):
    """Bad arguments end in one line on stderr and exit status 2 (argparse's usage block
    would bury the reason); --help still prints the full usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


CLASSIFIER_STEPS = 3000  # train-classifier's default --steps


def _add_training_arguments(train: argparse.ArgumentParser, steps: int) -> None:
    """The flags `train` and `train-classifier` share: the optimisation, the run and the network."""
    train.add_argument("--out", required=True, help="folder for checkpoint.safetensors and model.safetensors (EMA)")
    optimisation, network = TrainConfig(), DIGITS  # the defaults: the bundled digits models' runs
    train.add_argument("--steps", type=int, default=steps)
    train.add_argument("--batch-size", type=_positive, default=optimisation.batch_size)
    train.add_argument("--lr", type=float, default=optimisation.lr)
    train.add_argument("--warmup", type=int, default=optimisation.warmup, help="learning-rate warm-up steps")
    train.add_argument("--ema-decay", type=float, default=optimisation.ema_decay)
    train.add_argument("--grad-clip", type=float, default=optimisation.grad_clip)
    train.add_argument("--checkpoint-every", type=int, default=optimisation.checkpoint_every)
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    train.add_argument("--overwrite", action="store_true",
                       help="start again in an --out that holds another run (without it, that is refused)")
    train.add_argument("--seed", type=_seed, default=optimisation.seed)
    train.add_argument("--resolution", type=int, default=network["resolution"])
    train.add_argument("--channels", type=int, choices=(1, 3), default=network["in_channels"])
    train.add_argument("--ch", type=int, default=network["ch"])
    train.add_argument("--ch-mult", type=_ints, default=_text(network["ch_mult"]))
    train.add_argument("--num-res-blocks", type=int, default=network["num_res_blocks"])
    train.add_argument("--attn-resolutions", type=_ints, default=_text(network["attn_resolutions"]))
    train.add_argument("--dropout", type=float, default=network["dropout"])
    train.add_argument("--num-groups", type=int, default=network["num_groups"])
    train.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    train.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ddpm-fast", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser("sample", help="draw samples and write an image grid")
    sample.add_argument("--model", default=RANDOM_SMALL,
                        help=f"a bundled model's name, our .safetensors file, a diffusers UNet2DModel folder, "
                             f"or {RANDOM_SMALL!r} (default)")
    sample.add_argument("--num", "--num-samples", dest="num", type=_positive, default=16,
                        help="number of samples (spell it --num-samples after torchrun, whose own parser takes --num "
                             "for its --numa-binding)")
    sample.add_argument("--batch-size", type=_positive, default=None,
                        help=f"micro-batch: samples per network call (default: --num, at most {MICRO_BATCH}); the "
                             f"same micro-batch gives the same bytes on any number of processes")
    sample.add_argument("--shard-size", type=_positive, default=None,
                        help="samples per shard, the unit of work a process draws and saves (default: one micro-batch)")
    sample.add_argument("--resume", action="store_true",
                        help="continue the unfinished job writing --out (refused if its settings differ)")
    sample.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out (and --trajectory) that another job wrote; without it they "
                             "are refused, and the same job's finished output is kept as it is")
    sample.add_argument("--method", choices=METHODS, default="ddpm")
    sample.add_argument("--steps", type=_positive, default=None,
                        help="network evaluations (default: all T for ddpm/ddim, 20 for dpm-solver++); fewer give "
                             "DDIM's or a respaced DDPM's chain")
    sample.add_argument("--eta", type=float, default=0.0, help="DDIM η in [0, 1]")
    sample.add_argument("--preset", default=None, choices=[n for n, p in ADM_PRESETS.items() if p.builder != "classifier"],
                        metavar="NAME",
                        help="--model is a guided-diffusion or improved-diffusion checkpoint (.pt, or our .safetensors "
                             "from ddpm-fast convert) published as NAME: its network flags and its process "
                             "(schedule, learned variance, timestep rescaling) (DESIGN §2.7)")
    sample.add_argument("--classifier-preset", default=None, metavar="NAME",
                        choices=[n for n, p in ADM_PRESETS.items() if p.builder == "classifier"],
                        help="with --preset: the flags of --classifier (default: the published classifier of the "
                             "model's image size, e.g. 64x64_classifier)")
    sample.add_argument("--respacing", default=None, metavar="TEXT",
                        help="guided-diffusion's --timestep_respacing: '250', 'ddim25' or section counts '10,15,20' "
                             "(DESIGN §2.3); instead of --steps")
    sample.add_argument("--variance", choices=SAMPLING_VARIANCES, default=None,
                        help="ddpm's σ_t²: fixed_large (β_t, the default; a --preset's own), fixed_small (β̃_t), or learned by a model "
                             "with 2C output channels: learned_range (Nichol & Dhariwal eq. 15) or learned (log σ²) "
                             "(DESIGN §2.3); ddim and dpm-solver++ ignore a learned variance")
    sample.add_argument("--spacing", choices=tuple(dict.fromkeys(SPACINGS + DPM_SPACINGS)), default=None,
                        help="which timesteps --steps keeps. ddpm/ddim: uniform (the default, = diffusers' leading), "
                             "leading, trailing, linspace, quadratic (DESIGN §2.3); dpm-solver++: linspace (the "
                             "default), leading, trailing as diffusers' DPMSolverMultistepScheduler defines them, or "
                             "lambda (uniform log-SNR) (DESIGN §2.4)")
    sample.add_argument("--karras", action="store_true",
                        help="dpm-solver++: Karras et al.'s σ ramp (diffusers' use_karras_sigmas)")
    sample.add_argument("--label", default=None, metavar="N|all",
                        help="class of every sample (a class-conditional --model or a --classifier), or 'all': an "
                             "equal share of every class, one class a grid row")
    sample.add_argument("--guidance-scale", type=_non_negative_float, default=0.0, metavar="W",
                        help="classifier-free guidance weight w >= 0 of a class-conditional model (0: the "
                             "conditional model alone) (DESIGN §2.5)")
    sample.add_argument("--classifier", default=None,
                        help="a noisy classifier (bundled name such as digits-classifier, or our .safetensors) "
                             "whose gradient guides sampling towards --label")
    sample.add_argument("--classifier-scale", type=_non_negative_float, default=None, metavar="S",
                        help="scale s of the classifier's gradient (default 1; needs --classifier)")
    sample.add_argument("--timesteps", type=_positive, default=None,
                        help="T of the linear schedule (default 1000; a --preset sets its own)")
    sample.add_argument("--no-clip", action="store_true", help="do not clip x̂0 to [-1, 1]")
    sample.add_argument("--seed", type=_seed, default=0)
    sample.add_argument("--out", default="samples/grid.png",
                        help="grid.png (a PNG grid), samples.npz (arr_0 uint8 [N, H, W, C]) or DIR/ (one PNG each)")
    sample.add_argument("--trajectory", default=None, help="also write the predicted x̂0 over time to this PNG")
    sample.add_argument("--grid-width", type=_non_negative, default=GRID_WIDTH, metavar="PX",
                        help=f"enlarge PNG grids and the trajectory (nearest neighbour, by a whole factor) to at "
                             f"least PX pixels wide (default {GRID_WIDTH}; 0: the native size)")
    sample.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    sample.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    sample.add_argument("--backend", choices=BACKENDS, default="auto")
    sample.add_argument("--compile", action="store_true",
                        help="run the U-Net through torch.compile with our ops opaque (compiles once on the first "
                             "step, 16.8-39.3 s on the CPU, where it gains at most 13.7%%: off by default)")
    sample.add_argument("--check-finite", type=int, nargs="?", const=1, default=None, metavar="K",
                        help="stop with an error at the first step that leaves x NaN or infinite, reading the "
                             "device-side flag every K steps (default K: 1)")
    sample.add_argument("--quiet", action="store_true", help="no progress bar")
    sample.set_defaults(run=_sample)

    train = commands.add_parser("train", help="train a DDPM U-Net (Algorithm 1) on the digits set or a folder")
    train.add_argument("--dataset", default="digits", help="'digits' (scikit-learn's, offline) or a folder of images")
    train.add_argument("--num-classes", type=_positive, default=None,
                       help="train a class-conditional U-Net on the data set's labels (digits: 10)")
    train.add_argument("--p-uncond", type=float, default=None,
                       help=f"with --num-classes: the probability a label is dropped to the no-label token, for "
                            f"classifier-free guidance (default {TrainConfig.p_uncond})")
    _add_training_arguments(train, TrainConfig.steps)
    train.set_defaults(run=_train)

    classifier = commands.add_parser("train-classifier",
                                     help="train a noise-conditioned classifier p(y | x_t, t) on the digits' labels")
    classifier.add_argument("--dataset", default="digits", help="'digits' (scikit-learn's, offline, labelled)")
    _add_training_arguments(classifier, CLASSIFIER_STEPS)
    classifier.set_defaults(run=_train_classifier)

    convert = commands.add_parser("convert", help="turn a diffusers UNet2DModel folder, a .pt/.ckpt state dict "
                                                  "(original-DDPM PyTorch port names) or a guided-diffusion / "
                                                  "improved-diffusion checkpoint into our .safetensors")
    convert.add_argument("source", help="a diffusers UNet2DModel folder, or a .pt/.pth/.ckpt file")
    convert.add_argument("out", help="the .safetensors file to write")
    convert.add_argument("--config", default=None,
                         help=f"for bare state dicts: a preset ({', '.join(PRESETS)}) or a JSON file of UNet arguments")
    convert.add_argument("--preset", choices=tuple(ADM_PRESETS), default=None, metavar="NAME",
                         help=f"a published guided-diffusion or improved-diffusion checkpoint's flags, by its file's "
                              f"name: {', '.join(ADM_PRESETS)}")
    convert.add_argument("--flags", default=None, metavar="TEXT",
                         help="guided-diffusion's flags as its README gives them, in one argument: \"$MODEL_FLAGS\" "
                              "(create_model's) or a classifier's --classifier_* flags; over --preset's where both")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing, different OUT")
    convert.set_defaults(run=_convert)
    add_nll_parser(commands)  # ddpm-fast nll: the bound in bits/dim (cli/nll.py)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, Notice):
        print(f"note: {message}", file=sys.stderr)
    else:
        _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    _startup.started()  # Ctrl-C from here on: the KeyboardInterrupt below
    try:
        args = build_parser().parse_args(argv)
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return args.run(args)
    except ReportedOnRankZero:
        return 2  # rank 0 printed it
    except KeyboardInterrupt:
        print(f"{_startup.INTERRUPTED} (what was finished is kept: --resume continues a sampling job or a training "
              "run)", file=sys.stderr)
        return 130
    except (ValueError, OSError, NotImplementedError, FloatingPointError) as error:
        print(f"ddpm-fast: error: {error}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
        text = str(error)
        if not isinstance(error, MemoryError) and not any(
                words in text for words in ("alloc", "out of memory", "Storage size calculation overflowed")):
            raise
        print(f"ddpm-fast: error: out of memory ({text.strip().splitlines()[-1] if text.strip() else 'MemoryError'}): "
              f"use a smaller --batch-size (or --timesteps)", file=sys.stderr)
        return 2
