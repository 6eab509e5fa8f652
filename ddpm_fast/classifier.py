"""A noise-conditioned classifier p_φ(y | x_t, t) (Dhariwal & Nichol 2021, §4 and appendix; DESIGN
§2.5): the U-Net's encoder half — time embedding, down path, middle — then GroupNorm, SiLU, a
global average pool and a linear map to K logits. Trained with cross-entropy on noisy images
x_t = q_sample(x_0, t, ε) at uniformly random t (`ddpm-fast train-classifier`), so that its
gradient ∇_{x_t} log p_φ(y | x_t, t) can steer sampling (classifier guidance, their Algorithm 1).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoints
from .unet import DIGITS, UNet, _normalize, get_timestep_embedding


class NoisyClassifier(nn.Module):
    """clf(x_t, t) → logits [B, num_classes]: x [B, in_channels, H, W], t [B] 0-based timesteps.
    The other arguments are the U-Net's (ddpm_fast/unet.py), shaping the encoder alike."""

    def __init__(self, num_classes: int, ch: int = 128, ch_mult: tuple[int, ...] = (1, 2, 2, 2),
                 num_res_blocks: int = 2, attn_resolutions: tuple[int, ...] = (16,), dropout: float = 0.1,
                 in_channels: int = 3, resolution: int = 32, num_groups: int = 32, backend: str = "auto"):
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        # the U-Net checks the arguments and builds the encoder; its decoder is dropped here
        unet = UNet(ch=ch, out_ch=in_channels, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                    attn_resolutions=attn_resolutions, dropout=dropout, in_channels=in_channels,
                    resolution=resolution, num_groups=num_groups)
        self.config = {k: v for k, v in unet.config.items() if k != "out_ch"} | {"num_classes": num_classes}
        self.ch, self.in_channels, self.resolution = ch, in_channels, resolution
        self.num_resolutions = unet.num_resolutions
        self.temb, self.conv_in, self.down, self.mid = unet.temb, unet.conv_in, unet.down, unet.mid
        width = ch * ch_mult[-1]
        self.norm_out = nn.GroupNorm(num_groups, width, eps=1e-6)
        self.out = nn.Linear(width, num_classes)
        nn.init.zeros_(self.out.weight)  # uniform p_φ at the start: log K nats, as guided-diffusion's zero_module
        nn.init.zeros_(self.out.bias)
        self.backend = backend

    backend = UNet.backend  # "reference" or an op implementation for every GroupNorm and attention

    @classmethod
    def digits(cls, **overrides) -> "NoisyClassifier":
        """The bundled digits-classifier's network: the digits U-Net's encoder, 10 classes."""
        encoder = {k: v for k, v in DIGITS.items() if k != "out_ch"}
        return cls(**{"num_classes": 10, **encoder, **overrides})

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = UNet._check_inputs(self, x, t)
        temb = get_timestep_embedding(t, self.ch).to(x.dtype)
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))
        h = self.conv_in(x)
        for down in self.down:  # the U-Net's down path without its skip connections
            for i_block, block in enumerate(down.block):
                h = block(h, temb)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, temb)), temb)
        return self.out(_normalize(h, self.norm_out, self.backend).mean(dim=(2, 3)))

    save_pretrained = UNet.save_pretrained
    check_state_dict = UNet.check_state_dict
    load_checked = UNet.load_checked

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> "NoisyClassifier":
        """Load a bundled classifier by name ("digits-classifier") or our .safetensors file."""
        return checkpoints.load_safetensors(cls, name_or_path)


def classifier_gradient(classifier, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """g = ∇ₓ log p_φ(y | x_t, t), what classifier guidance adds (Dhariwal & Nichol 2021, Algorithms
    1 and 2), by autograd through `classifier` — any callable (x_t [B, ...], t [B]) → logits [B, K] —
    in the dtype of its floating-point parameters (x's for a plain function). Runs with autograd on
    whatever mode the caller is in (the sampler's inference mode included); returns g in x's shape."""
    dtype = next((p.dtype for p in classifier.parameters() if p.is_floating_point()), x.dtype) \
        if isinstance(classifier, nn.Module) else x.dtype
    with torch.inference_mode(False), torch.enable_grad():
        # clones made outside inference mode are ordinary tensors that autograd may record
        x_in = x.detach().to(dtype).clone().requires_grad_(True)
        logits = classifier(x_in, t.clone())
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"the classifier must return logits [B, K] with B = {x.shape[0]}, got "
                             f"{getattr(logits, 'shape', type(logits).__name__)}")
        if y.device.type == "cpu" and y.numel() and int(y.max()) >= logits.shape[1]:
            raise ValueError(f"label {int(y.max())} is outside the classifier's {logits.shape[1]} classes")
        log_p = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)
        (grad,) = torch.autograd.grad(log_p.gather(1, y.clone()[:, None]).sum(), x_in)
    return grad

