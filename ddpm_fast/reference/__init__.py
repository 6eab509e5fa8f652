"""The pure-PyTorch reference: the paper written plainly, float64-capable. Every fast path
is checked against it; each op's reference has the op's file stem (DESIGN §4)."""
from . import diffusion, noise
from .attention import attention
from .diffusion import (ddim_step, p_mean_variance, p_sample, p_sample_algorithm2, predict_noise_from_start,
                        predict_start_from_noise, q_posterior_mean_variance, q_sample, training_losses)
from .diffusion_step import diffusion_step
from .dpm_solver import dpm_solver_pp
from .group_norm_silu import group_norm_silu

__all__ = ["diffusion", "noise", "attention", "diffusion_step", "dpm_solver_pp", "group_norm_silu", "q_sample",
           "q_posterior_mean_variance", "predict_start_from_noise", "predict_noise_from_start", "p_mean_variance",
           "p_sample", "p_sample_algorithm2", "ddim_step", "training_losses"]
