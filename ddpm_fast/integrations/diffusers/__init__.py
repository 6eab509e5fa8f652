"""ddpm_fast inside diffusers: convert UNet2DModel configs and weights (convert.py), run its
attention blocks on our ops (attention.py), fuse a model or pipeline in place (acceleration.py:
`accelerate`) and step with the fused update (scheduler.py: `FusedDDPMScheduler`; ddim.py:
`FusedDDIMScheduler`; dpm_solver.py: `FusedDPMSolverMultistepScheduler`).

    from ddpm_fast.integrations.diffusers import accelerate, FusedDDPMScheduler

Every name loads on first use, so the converter works without diffusers installed and
importing this package imports nothing else.
"""
from __future__ import annotations

import importlib

_HOMES = {
    "unet_config_from_diffusers": "convert", "unet_config_to_diffusers": "convert",
    "convert_diffusers_state_dict": "convert",
    "AttnProcessor": "attention", "use_fast_attention": "attention",
    "accelerate": "acceleration", "FusedGroupNormSiLU": "acceleration",
    "FusedDDPMScheduler": "scheduler", "FusedDDIMScheduler": "ddim",
    "FusedDPMSolverMultistepScheduler": "dpm_solver",
}
__all__ = sorted([*_HOMES, "from_diffusers", "load_diffusers_unet"])


def from_diffusers(model):
    """Our UNet with the weights of a diffusers UNet2DModel instance."""
    from ...unet import UNet
    return UNet.from_diffusers(model)


def load_diffusers_unet(folder):
    """Load a diffusers UNet2DModel folder as our UNet."""
    from ...unet import UNet
    return UNet.from_pretrained(folder)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
