"""Training by Algorithm 1 of Ho et al. 2020: x_0 from the data, t ~ U{0..T−1}, ε ~ N(0, I),
a gradient step on L_simple = ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖² (eq. 14), with Adam,
gradient-norm clipping and an exponential moving average of the weights (what gets sampled).

Checkpoints are safetensors: the model, its EMA, Adam's moments and the random generators'
states, so a resumed run on the CPU continues bit for bit where it stopped (on a GPU, dropout
draws from the CUDA generator, which is not saved: the continuation is then statistically,
not bitwise, the same).
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._atomic import save_safetensors
from ..reference.diffusion import training_losses
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


def train(model: UNet, data: torch.Tensor, config: TrainConfig, out_dir: str | Path, resume: bool = False,
          progress: bool = True) -> UNet:
    """Train `model` on `data` ([N, C, H, W] in [−1, 1]) and return the EMA model. Writes
    out_dir/checkpoint.safetensors every config.checkpoint_every steps and at the end, and
    out_dir/model.safetensors (the EMA weights, loadable with UNet.from_pretrained)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if data.dim() != 4 or data.shape[1:] != (model.in_channels, model.resolution, model.resolution):
        raise ValueError(f"data must be [N, {model.in_channels}, {model.resolution}, {model.resolution}], "
                         f"got {tuple(data.shape)}")
    device = next(model.parameters()).device
    data = data.to(device)
    schedule = NoiseSchedule.linear(config.timesteps)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    start = _load_checkpoint(out_dir / CHECKPOINT, model, ema, optimizer, generator, config) if resume else 0
    model.train()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not progress, desc="train")
    for step in bar:
        index = torch.randint(0, data.shape[0], (config.batch_size,), generator=generator, device=device)
        x_start = data[index]
        t = torch.randint(0, config.timesteps, (config.batch_size,), generator=generator, device=device)
        noise = torch.randn(x_start.shape, generator=generator, device=device)
        loss = training_losses(model, schedule, x_start, t, noise).mean()
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / max(config.warmup, 1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - config.ema_decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            _save_checkpoint(out_dir, step + 1, model, ema, optimizer, generator, config)
    return ema


def _save_checkpoint(out_dir: Path, step: int, model: UNet, ema: UNet, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, config: TrainConfig) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for i, p in enumerate(model.parameters()):
        state = optimizer.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq", "step"):
            if name in state:
                tensors[f"adam.{i}.{name}"] = torch.as_tensor(state[name]).reshape(-1) if name == "step" else state[name]
    tensors["generator_state"] = generator.get_state()
    tensors["torch_rng_state"] = torch.get_rng_state()  # dropout draws from the global generator
    metadata = {"step": str(step), "train_config": json.dumps(asdict(config)), "unet_config": json.dumps(model.config)}
    save_safetensors(tensors, out_dir / CHECKPOINT, metadata)  # atomic: a killed run never leaves half a checkpoint
    ema.save_pretrained(out_dir / EMA_WEIGHTS)


def _load_checkpoint(path: Path, model: UNet, ema: UNet, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, config: TrainConfig) -> int:
    from safetensors import safe_open
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    saved = json.loads(metadata["train_config"])
    differing = {k: (v, getattr(config, k)) for k, v in saved.items() if k != "steps" and getattr(config, k) != v}
    if differing or json.loads(metadata["unet_config"]) != model.config:
        raise ValueError(f"--resume: {path} was written with other settings (saved, now): {differing or 'the model'}")
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
    return int(metadata["step"])
