"""Training by Algorithm 1 of Ho et al. 2020: x_0 from the data, t ~ U{0..T−1}, ε ~ N(0, I),
a gradient step on L_simple = ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖² (eq. 14), with Adam,
gradient-norm clipping and an exponential moving average of the weights (what gets sampled).
A class-conditional U-Net learns ε_θ(x_t, t, y) with each label replaced by ∅ with probability
p_uncond, so that one network is both the conditional and the unconditional model classifier-free
guidance combines (Ho & Salimans 2022, Algorithm 1; DESIGN §2.5). A NoisyClassifier learns
p_φ(y | x_t, t) by cross-entropy on the same x_t (Dhariwal & Nichol 2021), with the same loop.

Checkpoints are safetensors: the model, its EMA, Adam's moments and the random generators'
states, so a resumed run on the CPU continues bit for bit where it stopped (on a GPU, dropout
draws from the CUDA generator, which is not saved: the continuation is then statistically,
not bitwise, the same). Their metadata record the settings, the network and the sha256 of the
training data, which a resume must match, and the sha256 of the tensors, verified on load.
A folder holding a run is never overwritten unasked (overwrite=True), and running again a run
that is finished, with the same settings, is a no-op.
"""
from __future__ import annotations

import copy
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._atomic import exclusive, holds, save_safetensors, tensors_sha256, write_bytes
from ..checkpoints import pretrained_bytes, read_safetensors
from ..contract import SEED_RANGE, UINT32_RANGE, check_int_range
from ..classifier import NoisyClassifier
from ..reference.diffusion import q_sample, training_losses
from ..schedule import NoiseSchedule
from ..unet import UNet

CHECKPOINT = "checkpoint.safetensors"
EMA_WEIGHTS = "model.safetensors"


@dataclass
class TrainConfig:
    steps: int = 20000
    batch_size: int = 64
    lr: float = 2e-4
    warmup: int = 500  # linear learning-rate warm-up, as in the original code
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 1000
    timesteps: int = 1000
    p_uncond: float = 0.1  # class-conditional U-Nets only: the share of labels dropped to ∅

    def __post_init__(self) -> None:
        """Every setting in its range, or a ValueError naming it (before any work starts)."""
        for name in ("steps", "batch_size", "checkpoint_every", "timesteps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_int_range("timesteps", self.timesteps, UINT32_RANGE)
        check_int_range("warmup", self.warmup, UINT32_RANGE)
        check_int_range("seed", self.seed, SEED_RANGE)
        for name, ok, rule in (("lr", lambda v: 0 < v < math.inf, "a finite number > 0"),
                               ("grad_clip", lambda v: v > 0, "a number > 0 (the largest gradient norm; inf: none)"),
                               ("ema_decay", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
                               ("p_uncond", lambda v: 0 <= v <= 1, "a probability in [0, 1]")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise ValueError(f"{name} must be {rule}, got {value!r}")


Model = UNet | NoisyClassifier


def train(model: Model, data: torch.Tensor, config: TrainConfig, out_dir: str | Path, resume: bool = False,
          progress: bool = True, overwrite: bool = False, labels: torch.Tensor | None = None) -> Model:
    """Train `model` on `data` ([N, C, H, W] in [−1, 1]) and return the EMA model. Writes
    out_dir/checkpoint.safetensors every config.checkpoint_every steps and at the end, and
    out_dir/model.safetensors (the EMA weights, loadable with from_pretrained).

    A class-conditional UNet and a NoisyClassifier need `labels` (int64 [N] in [0, K)); an
    unconditional UNet takes none.

    resume=True continues out_dir's checkpoint (refused if its settings, network or data
    differ, or it is past config.steps). Without it, a folder that already holds a run is
    refused unless overwrite=True — except the same run, finished: then nothing is trained and
    its EMA model is returned."""
    out_dir = Path(out_dir)
    if data.dim() != 4 or data.shape[1:] != (model.in_channels, model.resolution, model.resolution):
        raise ValueError(f"data must be [N, {model.in_channels}, {model.resolution}, {model.resolution}], "
                         f"got {tuple(data.shape)}")
    _check_labels(model, labels, data.shape[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(out_dir, "the training folder"):
        data_sha256 = tensors_sha256({"data": data} if labels is None else {"data": data, "labels": labels})
        checkpoint = out_dir / CHECKPOINT
        saved = _read_checkpoint(checkpoint) if (resume or not overwrite) and checkpoint.exists() else None
        if not resume and not overwrite:
            if saved is not None and _differences(saved[1], model, config, data_sha256) == {} \
                    and int(saved[1]["step"]) == config.steps:
                resume = True  # the same run, finished: a no-op below
            elif saved is not None or (out_dir / EMA_WEIGHTS).exists():
                step = f" at step {saved[1]['step']}" if saved is not None else ""
                raise ValueError(f"{out_dir} already holds a training run ({CHECKPOINT}{step}, {EMA_WEIGHTS}): pass "
                                 f"--resume to continue it, --overwrite to start again, or choose another --out")
        if resume and saved is None:
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}")
        return _train(model, data, labels, config, out_dir, saved if resume else None, data_sha256, progress)


def _check_labels(model: Model, labels: torch.Tensor | None, n: int) -> None:
    classes = model.config.get("num_classes")
    if classes is None:
        if labels is not None:
            raise ValueError("labels given for an unconditional UNet: pass num_classes to the UNet to train a "
                             "class-conditional one")
        return
    if labels is None:
        raise ValueError(f"{type(model).__name__} with num_classes={classes} needs labels: got none (a data set "
                         f"without labels trains unconditional U-Nets only)")
    if labels.shape != (n,) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 [{n}], one per image, got {labels.dtype} {tuple(labels.shape)}")
    if n and not 0 <= int(labels.min()) <= int(labels.max()) < classes:
        raise ValueError(f"labels must lie in [0, {classes}) for num_classes={classes}, got "
                         f"[{int(labels.min())}, {int(labels.max())}]")


def _loss(model: Model, schedule: NoiseSchedule, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
          y: torch.Tensor | None, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """The batch's objective: L_simple (eq. 14), its classifier-free-guidance version or the
    classifier's cross-entropy."""
    if isinstance(model, NoisyClassifier):  # −log p_φ(y | x_t, t) with x_t from eq. 4
        return F.cross_entropy(model(q_sample(schedule, x_start, t, noise), t), y)
    if y is None:
        return training_losses(model, schedule, x_start, t, noise).mean()
    # Ho & Salimans 2022, Algorithm 1: c ← ∅ with probability p_uncond, per example
    dropped = torch.rand(y.shape, generator=generator, device=y.device) < config.p_uncond
    y = torch.where(dropped, model.num_classes, y)
    return training_losses(lambda x_t, t: model(x_t, t, y), schedule, x_start, t, noise).mean()


def _train(model: Model, data: torch.Tensor, labels: torch.Tensor | None, config: TrainConfig, out_dir: Path,
           saved: tuple[dict[str, torch.Tensor], dict[str, str]] | None, data_sha256: str, progress: bool) -> Model:
    device = next(model.parameters()).device
    data = data.to(device)
    labels = labels.to(device) if labels is not None else None
    schedule = NoiseSchedule.linear(config.timesteps)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    start = 0
    if saved is not None:
        start = _restore(out_dir / CHECKPOINT, saved, model, ema, optimizer, generator, config, data_sha256)
        _restore_ema_file(out_dir, ema, start)
        if start == config.steps:
            print(f"note: {out_dir / CHECKPOINT} is already at step {start} with these settings: nothing to train",
                  file=sys.stderr)
    checkpointed = start
    model.train()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not progress, desc="train")
    for step in bar:
        index = torch.randint(0, data.shape[0], (config.batch_size,), generator=generator, device=device)
        x_start = data[index]
        t = torch.randint(0, config.timesteps, (config.batch_size,), generator=generator, device=device)
        noise = torch.randn(x_start.shape, generator=generator, device=device)
        y = labels[index] if labels is not None else None
        loss = _loss(model, schedule, x_start, t, noise, y, config, generator)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / max(config.warmup, 1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - config.ema_decay)
        _stop_unless_finite(step + 1, loss, model, config, out_dir, checkpointed)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            _save_checkpoint(out_dir, step + 1, model, ema, optimizer, generator, config, data_sha256)
            checkpointed = step + 1
    return ema


def _stop_unless_finite(step: int, loss: torch.Tensor, model: Model, config: TrainConfig, out_dir: Path,
                        checkpointed: int) -> None:
    """A diverging run (a learning rate too large, data holding NaN) stops at the first step whose
    loss or weights are not finite, before a checkpoint could save them: the last checkpoint
    stays the last good one. One device read a step, which the progress bar's loss needs anyway."""
    weights = torch.stack([p.isfinite().all() for p in model.parameters()])
    if bool(loss.isfinite() & weights.all()):
        return
    bad = sum(int((~p.isfinite()).sum()) for p in model.parameters())
    kept = f"{out_dir / CHECKPOINT} keeps step {checkpointed}, the last good one" if checkpointed else \
        "no checkpoint was written"
    raise FloatingPointError(f"training diverged at step {step}: the loss is {loss.item()} and {bad:,} weights are "
                             f"not finite; {kept}; lower the learning rate (lr {config.lr:g})")


def _restore_ema_file(out_dir: Path, ema: Model, step: int) -> None:
    """model.safetensors written again when it is not the checkpoint's EMA: a run killed between
    the checkpoint and model.safetensors left the older one; a user may have deleted it."""
    path, data = out_dir / EMA_WEIGHTS, pretrained_bytes(ema)
    if holds(path, data):
        return
    present = path.exists() or path.is_symlink()
    write_bytes(path, data)
    print(f"note: {path} " + (f"was not the EMA weights of {CHECKPOINT} at step {step} (a run killed between the two "
                              f"files, or a file of an older version): written again" if present else
                              f"was missing: written again from the EMA weights of {CHECKPOINT} at step {step}"),
          file=sys.stderr)


def _save_checkpoint(out_dir: Path, step: int, model: Model, ema: Model, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, config: TrainConfig, data_sha256: str) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for i, p in enumerate(model.parameters()):
        state = optimizer.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq", "step"):
            if name in state:
                tensors[f"adam.{i}.{name}"] = torch.as_tensor(state[name]).reshape(-1) if name == "step" else state[name]
    tensors["generator_state"] = generator.get_state()
    tensors["torch_rng_state"] = torch.get_rng_state()  # dropout draws from the global generator
    metadata = {"step": str(step), "train_config": json.dumps(asdict(config)), "unet_config": json.dumps(model.config),
                "data_sha256": data_sha256}
    save_safetensors(tensors, out_dir / CHECKPOINT, metadata)  # atomic: a killed run never leaves half a checkpoint
    ema.save_pretrained(out_dir / EMA_WEIGHTS)


_METADATA = ("step", "train_config", "unet_config")


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a training checkpoint, checksum verified; anything else is a ValueError."""
    tensors, metadata = read_safetensors(path, ours=True)
    missing = [key for key in _METADATA if key not in metadata]
    if missing:
        raise ValueError(f"{path} is not a checkpoint of ddpm-fast train: its metadata lack {missing} (a model file "
                         f"such as {EMA_WEIGHTS} holds weights only)")
    try:
        metadata["step"], metadata["train_config"] = int(metadata["step"]), json.loads(metadata["train_config"])
        metadata["unet_config"] = json.loads(metadata["unet_config"])
    except ValueError as error:
        raise ValueError(f"{path}: unreadable checkpoint metadata: {error}") from error
    return tensors, metadata


def _differences(metadata: dict, model: Model, config: TrainConfig, data_sha256: str) -> dict:
    """What differs between a checkpoint's run and this one (steps aside): name → (saved, now)."""
    now = asdict(config)
    differing = {k: (v, now.get(k)) for k, v in metadata["train_config"].items() if k != "steps" and now.get(k) != v}
    if metadata["unet_config"] != model.config:
        differing["network"] = (metadata["unet_config"], model.config)
    if metadata.get("data_sha256", data_sha256) != data_sha256:
        differing["data"] = (f"sha256 {metadata['data_sha256'][:12]}…", f"sha256 {data_sha256[:12]}…")
    return differing


def _restore(path: Path, saved: tuple[dict[str, torch.Tensor], dict], model: Model, ema: Model,
             optimizer: torch.optim.Optimizer, generator: torch.Generator, config: TrainConfig,
             data_sha256: str) -> int:
    tensors, metadata = saved
    differing = _differences(metadata, model, config, data_sha256)
    if differing:
        raise ValueError(f"--resume: {path} was written with other settings (saved, now): {differing}")
    if "data_sha256" not in metadata:
        print(f"note: {path} does not record which data it was trained on (an older checkpoint): not checked",
              file=sys.stderr)
    if metadata["step"] > config.steps:
        raise ValueError(f"--resume: {path} is at step {metadata['step']}, past --steps {config.steps}: pass --steps "
                         f"{metadata['step']} or more")
    device = next(model.parameters()).device
    model.load_checked({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, str(path))
    ema.load_checked({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, str(path))
    for i, p in enumerate(model.parameters()):
        if f"adam.{i}.exp_avg" in tensors:
            optimizer.state[p] = {"step": tensors[f"adam.{i}.step"].reshape(()).clone(),
                                  "exp_avg": tensors[f"adam.{i}.exp_avg"].to(device),
                                  "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"].to(device)}
    generator.set_state(tensors["generator_state"])
    if "torch_rng_state" in tensors:  # absent from checkpoints written before dropout's state was saved
        torch.set_rng_state(tensors["torch_rng_state"])
    return metadata["step"]
