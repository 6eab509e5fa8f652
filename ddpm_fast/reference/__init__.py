"""The pure-PyTorch reference: the paper written plainly, float64-capable. Every fast path
is checked against it."""
from . import diffusion, noise, ops
from .diffusion import (ddim_step, p_mean_variance, p_sample, p_sample_algorithm2, predict_noise_from_start,
                        predict_start_from_noise, q_posterior_mean_variance, q_sample, training_losses)

__all__ = ["diffusion", "noise", "ops", "q_sample", "q_posterior_mean_variance", "predict_start_from_noise",
           "predict_noise_from_start", "p_mean_variance", "p_sample", "p_sample_algorithm2", "ddim_step",
           "training_losses"]
