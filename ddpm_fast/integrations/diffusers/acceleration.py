"""accelerate(): ddpm_fast's fused ops inside an existing diffusers UNet2DModel or pipeline, in place.

    from ddpm_fast.integrations.diffusers import accelerate
    accelerate(pipeline)   # DDPMPipeline, DDIMPipeline: its unet and its scheduler
    accelerate(unet2d)     # or just a UNet2DModel

What changes: every ResnetBlock2D whose maths is the DDPM ResBlock's (SiLU, "default" time
embedding) runs GroupNorm(+ time-embedding add)+SiLU as one fused op, twice per block; the
final GroupNorm+SiLU likewise; every nn.Conv2d becomes a PackedConv2d (weights pre-packed
for oneDNN on the CPU where that measures faster, the residual add of a fused ResnetBlock2D
inside its second convolution, DESIGN §5.8); every Attention module runs AttnProcessor (fused GroupNorm,
ddpm_fast attention); a DDPMScheduler becomes a FusedDDPMScheduler, a DDIMScheduler a
FusedDDIMScheduler, a DPMSolverMultistepScheduler a FusedDPMSolverMultistepScheduler (when its
options are ones the fused step covers). Parameters, state-dict
keys and module types (by isinstance) are unchanged, so checkpoints and hooks keep working.
Blocks whose options the fused maths does not cover are left as they are and counted.
A pipeline saved after accelerate() is a stock diffusers pipeline (the stock scheduler class in
its model_index.json and scheduler config): it loads with diffusers alone; accelerate() it again.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ...ops import group_norm_silu
from ...ops.conv2d import PackedConv2d
from .attention import use_fast_attention


def _fused_norm(x: torch.Tensor, norm: nn.GroupNorm, impl: str, add: torch.Tensor | None = None) -> torch.Tensor:
    return group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, add=add, impl=impl)


def _fused_resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
    """diffusers' ResnetBlock2D.forward for time_embedding_norm="default" and SiLU, with each
    norm → (add) → SiLU fused (the add is the time embedding, applied before norm2 as there)."""
    hidden_states = _fused_norm(input_tensor, self.norm1, self._ddpm_fast_impl)
    if self.upsample is not None:
        input_tensor, hidden_states = self.upsample(input_tensor), self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor, hidden_states = self.downsample(input_tensor), self.downsample(hidden_states)
    hidden_states = self.conv1(hidden_states)
    add = None
    if self.time_emb_proj is not None and temb is not None:
        add = self.time_emb_proj(temb if self.skip_time_act else F.silu(temb))
    hidden_states = _fused_norm(hidden_states, self.norm2, self._ddpm_fast_impl, add=add)
    hidden_states = self.dropout(hidden_states)
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor)
    if self.output_scale_factor == 1 and isinstance(self.conv2, PackedConv2d):  # the add as the conv's post-op
        return self.conv2(hidden_states, add=input_tensor)
    return (input_tensor + self.conv2(hidden_states)) / self.output_scale_factor


@functools.cache
def _fused_class(resnet_class: type) -> type:
    # A subclass rather than a patched instance: isinstance, state dicts and deepcopy still work.
    return type(f"Fused{resnet_class.__name__}", (resnet_class,), {"forward": _fused_resnet_forward})


class FusedGroupNormSiLU(nn.GroupNorm):
    """SiLU(GroupNorm(x)) in one op. accelerate() re-classes the model's own GroupNorm to this,
    so its parameters and state-dict keys stay as they were."""
    _ddpm_fast_impl = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fused_norm(x, self, self._ddpm_fast_impl)


def _fusable(block) -> bool:
    return (block.time_embedding_norm == "default" and isinstance(block.nonlinearity, nn.SiLU)
            and all(isinstance(n, nn.GroupNorm) and n.affine for n in (block.norm1, block.norm2)))


def accelerate(model_or_pipeline, impl: str = "auto", precision: str = "ieee") -> dict[str, int]:
    """Switch a diffusers UNet2DModel (or a pipeline's unet and scheduler) to ddpm_fast's
    fused ops, in place. Returns counts: resnets fused / left, final norm, attention, scheduler."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
    from diffusers.models.resnet import ResnetBlock2D

    from .ddim import FusedDDIMScheduler
    from .dpm_solver import FusedDPMSolverMultistepScheduler
    from .scheduler import FusedDDPMScheduler

    target = model_or_pipeline
    if hasattr(target, "unet") and hasattr(target, "scheduler"):  # a pipeline
        counts = accelerate(target.unet, impl, precision)
        counts["scheduler"] = 0
        stock = type(target.scheduler)
        for plain, fused in ((DDPMScheduler, FusedDDPMScheduler), (DDIMScheduler, FusedDDIMScheduler),
                             (DPMSolverMultistepScheduler, FusedDPMSolverMultistepScheduler)):
            if stock is not plain:  # only exactly the stock class: a fused one, or another subclass, stays
                continue
            scheduler = fused.from_config(target.scheduler.config)
            if scheduler.problems():  # options the fused step does not cover: the stock scheduler stays
                continue
            scheduler.impl = impl
            target.scheduler = scheduler
            if hasattr(target, "register_to_config"):  # saved as a stock pipeline: loads without ddpm_fast
                target.register_to_config(scheduler=("diffusers", plain.__name__))
            counts["scheduler"] = 1
        return counts
    if not isinstance(target, nn.Module):
        raise TypeError(f"accelerate: expected a diffusers UNet2DModel or a pipeline with .unet and .scheduler, "
                        f"got {type(target).__name__}")
    counts = {"resnets": 0, "resnets_left": 0, "final_norm": 0, "convs": 0}
    for module in target.modules():
        if type(module) in (nn.Conv2d, PackedConv2d):  # exactly: a subclass with its own forward stays
            module.__class__ = PackedConv2d
            module.impl = "torch" if impl == "reference" else "auto"
            counts["convs"] += 1
        if isinstance(module, ResnetBlock2D):
            if _fusable(module):
                if type(module).forward is not _fused_resnet_forward:
                    module.__class__ = _fused_class(type(module))
                module._ddpm_fast_impl = impl
                counts["resnets"] += 1
            else:
                counts["resnets_left"] += 1
    norm_out, act = getattr(target, "conv_norm_out", None), getattr(target, "conv_act", None)
    if isinstance(norm_out, nn.GroupNorm) and norm_out.affine and isinstance(act, (nn.SiLU, nn.Identity)):
        # UNet2DModel applies conv_act only right after conv_norm_out, so the pair fuses.
        if isinstance(act, nn.SiLU):
            norm_out.__class__, target.conv_act = FusedGroupNormSiLU, nn.Identity()
        if isinstance(norm_out, FusedGroupNormSiLU):
            norm_out._ddpm_fast_impl = impl
            counts["final_norm"] = 1
    # Attention has a Triton kernel only; for impl="cpu"/"cuda" it takes its own "auto" choice.
    counts["attention"] = use_fast_attention(target, impl if impl in ("auto", "reference", "triton") else "auto",
                                             precision)
    return counts
