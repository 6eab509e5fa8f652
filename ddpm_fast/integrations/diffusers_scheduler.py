"""Old import path of FusedDDPMScheduler, kept for code that names it; its home is
ddpm_fast.integrations.diffusers.scheduler."""
from .diffusers.scheduler import FusedDDPMScheduler

__all__ = ["FusedDDPMScheduler"]
