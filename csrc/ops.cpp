// Every schema of ddpm_fast's compiled ops, and nothing else (torchvision's csrc/ops
// layout): kernels live in cpu/<op>.cpp and cuda/<op>.cu, fake kernels in ddpm_fast/ops.
#include <torch/library.h>

TORCH_LIBRARY(ddpm_fast, m) {
  // Philox4x32-10 words for int32 counters [..., 4] under key (seed mod 2^32, seed >> 32).
  m.def("philox4x32_10(Tensor counter, int seed) -> Tensor");
  // Fills out [B, ...] (float32, contiguous) with the noise stream of DESIGN §3 for samples
  // sample_offset .. sample_offset + B - 1 under noise key `step`.
  m.def("randn_(Tensor(a!) out, int seed, int step, int sample_offset) -> ()");
  // The fused sampling update in place on x (float32 [B, ...]): coefficient row and noise key
  // read at step_index (device memory) from coefs [S, 14] (DESIGN §2) and noise_keys [S]; z in-kernel.
  // history (x's shape and strides): the previous row's x̂0, read and then overwritten with this
  // row's (multistep solvers, DESIGN §2.4). Guidance (DESIGN §2.5): uncond_output (model_output's
  // dtype, shape and strides) is the unconditional output, combined with model_output by the row's
  // w; guidance_grad (float32, x's shape and strides) a classifier's ∇ₓ log p(y | x_t), by Gout and Gmean.
  // variance_output (model_output's dtype, shape and strides: the second half of a 2C-channel output)
  // gives a learned-variance row (DESIGN §2.3) its per-element variance; other rows ignore it.
  // No defaults in any schema: torch 2.11 mis-indexes mutated arguments after trailing defaults
  // (ddpm_fast/ops/diffusion_step.py); the Python wrappers hold them.
  m.def(
      "diffusion_step_(Tensor(a!) x, Tensor model_output, Tensor coefs, Tensor noise_keys, Tensor step_index, "
      "int seed, int sample_offset, Tensor(b!)? history, Tensor? uncond_output, Tensor? guidance_grad, "
      "Tensor? variance_output) -> ()");
  // Fused GroupNorm + SiLU (DESIGN §5): y = act(x̂·weight·(1 + scale) + bias·(1 + scale) + shift) with
  // x̂ = (x + add[:, :, None, None] − mean)·rstd, act = SiLU when act else identity, over [N, C, H, W] x
  // (NCHW or channels_last; y in x's layout); add, scale and shift [N, C] or None (0).
  // Returns (y, mean, rstd) with the per-(n, group) statistics [N, G] in float32 (float64 for
  // float64 x), which the backward reuses.
  m.def(
      "group_norm_silu(Tensor x, Tensor weight, Tensor bias, Tensor? add, Tensor? scale, Tensor? shift, "
      "int num_groups, float eps, bool act) -> (Tensor, Tensor, Tensor)");
  // Its backward: (grad_x, Σ_hw dz, Σ_hw dz·x̂, grad_add) with dz the gradient at the affine output z; the
  // last three are [N, C] in the statistics' dtype (the weight, bias, scale and shift gradients follow
  // from the first two by the chain rule: csrc/autograd/group_norm_silu.cpp).
  m.def(
      "group_norm_silu_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor? add, Tensor? scale, "
      "Tensor? shift, Tensor mean, Tensor rstd, int num_groups, bool act) -> (Tensor, Tensor, Tensor, Tensor)");
  // One timestep's term of the variational bound (DESIGN §2.6) per sample, from x_start (float32 [B, ...], on the
  // 8-bit grid), the noise that made x_t, the network output at x_t and the float64 row [8] (contract.TERM_COLUMNS):
  // float64 [B, 3] = (the KL of eqs. 6-7, or the decoder NLL of eq. 13 on the decoder row, in nats;
  // Σ(x_0 − x̂0)²; Σ(out − target)²).
  m.def("vb_terms(Tensor x_start, Tensor noise, Tensor model_output, Tensor row) -> Tensor");
}
