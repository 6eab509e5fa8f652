"""ddpm_fast: fast, reproducible sampling from DDPM-style U-Nets (Ho et al. 2020).

    import ddpm_fast as df
    sampler = df.Sampler(df.UNet.from_pretrained(...), df.NoiseSchedule.linear(1000))
    x0 = sampler.sample(16, seed=0)
"""
from . import _startup  # first: the ddpm-fast command's Ctrl-C while importing torch (ddpm_fast/_startup.py)
from . import ops, reference
from ._extension import CompiledOpsUnavailable
from .ops import randn
from .likelihood import Evaluator
from .sampler import Sampler
from .schedule import NoiseSchedule
from .unet import UNet
from .adm import ADMClassifier, ADMUNet
from .adm_checkpoints import classifier_from_guided_diffusion, from_guided_diffusion, from_improved_diffusion

__version__ = "0.1.0"
__all__ = ["Sampler", "Evaluator", "NoiseSchedule", "UNet", "ADMUNet", "ADMClassifier", "from_guided_diffusion", "from_improved_diffusion",
           "classifier_from_guided_diffusion", "randn", "ops", "reference", "CompiledOpsUnavailable", "__version__"]
