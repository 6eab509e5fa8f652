"""The facts every backend shares, written once: the noise stream's constants (DESIGN §3), the
step table's columns (DESIGN §2), the names of methods, variances, prediction types, spacings
and backends, and the range checks of seeds and sample indices.

csrc/common/contract.h mirrors the constants the C++ and CUDA kernels need; a test compares
the two. Public functions validate their arguments here once; the sampling loop then calls
unchecked internals.
"""
from __future__ import annotations

import math
from typing import Sequence

# -- noise stream (DESIGN §3) -------------------------------------------------------------------
NOISE_STREAM_VERSION = 0  # the counter's last word; bump it, never change the stream silently
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
PHILOX_ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10  # largest float32 with (2^31 - 1) * scale < 1
BOX_MULLER_MIN_U = 1.0e-7  # Box–Muller's first uniform is clamped here so log(u) stays finite
UINT32_RANGE = 1 << 32  # noise keys and global sample indices are uint32 counter words
SEED_RANGE = 1 << 63  # seeds travel as int64 through torch.library schemas
MAX_ELEMENTS_PER_SAMPLE = 4 * UINT32_RANGE  # four normals per Philox call, quads counted in a uint32

# -- step table (DESIGN §2) ---------------------------------------------------------------------
# One sampling update, whatever the method, with `out` the network output, x̂0' the previous
# row's x̂0 (the history buffer of multistep solvers, DESIGN §2.4) and, under guidance (DESIGN
# §2.5), `uncond` the unconditional output and g = ∇ₓ log p_φ(y | x_t, t) a classifier's gradient:
#   out ← out + w·(out − uncond) + Gout·g   (classifier-free guidance; classifier guidance as ε̂)
#   x̂0 = A·x + B·out   (clipped to [−1, 1] when clip = 1)
#   x_prev = C·x̂0 + D·x + E·out + H·x̂0' + Gmean·g + σ·z   (Gmean: classifier guidance as μ + sΣg)
# A learned-variance row (learned ≠ 0, DESIGN §2.3) reads the network's variance channels v too:
# log Σ_θ = frac·log_beta + (1 − frac)·log_beta_tilde with frac = (v + 1)/2 ("learned_range",
# Nichol & Dhariwal 2021 eq. 15; log_beta_tilde the clipped log β̃_t), or log Σ_θ = v ("learned"),
# and its noise and mean shift become σ·√Σ_θ·z and Gmean·Σ_θ·g, per element (σ = 1, 0 on the last
# row; Gmean = s). Every other row has learned = log_beta = log_beta_tilde = 0.
STEP_COLUMNS = ("A", "B", "C", "D", "E", "sigma", "clip", "H", "w", "Gout", "Gmean", "learned", "log_beta",
                "log_beta_tilde")
NUM_STEP_COLUMNS = len(STEP_COLUMNS)
# The values of the learned column: the variances the network outputs (its 2C channels' second half)
LEARNED_VARIANCES = {"learned_range": 1.0, "learned": 2.0}

# -- the variational bound (DESIGN §2.6) -----------------------------------------------------
# The noise ε that makes x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε for the bound's term at timestep i is
# randn(..., step=NLL_NOISE_KEY_BASE + i): keys [2^31, 2^31 + T), apart from the sampler's keys 0 … T.
NLL_NOISE_KEY_BASE = 1 << 31
# One timestep's row of the fused term op (ops.vb_terms; float64), with d = out − (P·x_0 + Q·ε) the error of
# the network output against its target and x̂0 = x_0 + B·d (= A·x_t + B·out, clipped when clip = 1):
#   KL row: D·kl_const + ½·(c1·inv_sigma)²·Σ(x_0 − x̂0)²      (decoder = 0, eqs. 6–7 against p_θ)
#   decoder row: −Σ log ∫_bin N(x; x_0 − c1·(x_0 − x̂0), 1/inv_sigma²)   (decoder = 1, eq. 13)
TERM_COLUMNS = ("B", "P", "Q", "clip", "c1", "inv_sigma", "kl_const", "decoder")
NUM_TERM_COLUMNS = len(TERM_COLUMNS)
BIN_HALF_WIDTH = 1 / 255  # data in [−1, 1] on 256 levels: bins of width 2/255 (eq. 13)
EDGE_BIN = 0.999  # |x_0| above this is an edge bin, extended to ±∞ (eq. 13)
# σ_1 of the decoder: "paper" takes σ_1² = β_1 with fixed_large (as eq. 13's σ_1 is written);
# "improved-diffusion" β̃ of the second timestep, as improved-diffusion's and Ho et al.'s released
# code do. fixed_small (β̃_1 = 0) takes β̃ of the second timestep under both.
SIGMA1_CONVENTIONS = ("paper", "improved-diffusion")

# -- names ------------------------------------------------------------------------------------
METHODS = ("ddpm", "ddim", "dpm-solver++", "dpm-solver++-sde")
MULTISTEP_METHODS = ("dpm-solver++", "dpm-solver++-sde")  # those that read and write the history
VARIANCES = ("fixed_large", "fixed_small")  # fixed σ_t² = β_t or β̃_t (the bound, DESIGN §2.6, takes these)
SAMPLING_VARIANCES = VARIANCES + tuple(LEARNED_VARIANCES)  # the sampler's: fixed, or the network's own
PREDICTION_TYPES = ("epsilon", "x0", "v")
# DDIM's kept timesteps: "uniform" (= diffusers' "leading"), diffusers' "trailing" and "linspace",
# and DDIM's "quadratic" (DESIGN §2.3)
SPACINGS = ("uniform", "leading", "trailing", "linspace", "quadratic")
# DPM-Solver's timesteps as diffusers' DPMSolverMultistepScheduler defines them (not DDIM's
# spacings of the same names), and "lambda": uniform in log-SNR λ (DESIGN §2.4)
DPM_SPACINGS = ("linspace", "leading", "trailing", "lambda")
# Backends of the ops, the U-Net and the Sampler: "auto" picks the fastest built one per device.
BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
# float32 dot precisions of the attention kernel (DESIGN §5.3): three TF32 tensor-core products
# (float32-class accuracy, the default), float32 FMAs, one TF32 product (~1e-3)
ATTENTION_PRECISIONS = ("tf32x3", "ieee", "tf32")
FUSED_BACKENDS = ("triton", "cuda", "cpu")  # "auto" order: Triton on CUDA tensors, the C++ op on CPU ones


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_int_range(name: str, value, upper: int) -> None:
    """Raise unless value is an int (not a bool) in [0, upper)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < upper:
        raise ValueError(f"{name} must be an int in [0, {upper}), got {value!r}")


def check_samples(seed: int, sample_offset: int, batch: int) -> None:
    """A run of global samples sample_offset .. sample_offset + batch − 1 under `seed`."""
    check_int_range("seed", seed, SEED_RANGE)
    check_int_range("sample_offset", sample_offset, UINT32_RANGE)
    if sample_offset + batch > UINT32_RANGE:
        raise ValueError(f"sample indices [{sample_offset}, {sample_offset + batch}) must lie below 2^32")


def check_noise_args(shape: Sequence[int], seed: int, step: int, sample_offset: int) -> tuple[int, int]:
    """Validate a draw's arguments; return (batch, elements per sample)."""
    shape = tuple(shape)
    if len(shape) < 1 or any(not isinstance(n, int) or n < 0 for n in shape):
        raise ValueError(f"shape must be a non-empty sequence of sizes >= 0 with the batch first, got {shape}")
    check_int_range("step", step, UINT32_RANGE)
    check_samples(seed, sample_offset, shape[0])
    per_sample = math.prod(shape[1:])
    if per_sample > MAX_ELEMENTS_PER_SAMPLE:
        raise ValueError(f"at most 2^34 elements per sample, got {per_sample}")
    return shape[0], per_sample
