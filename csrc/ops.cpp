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
  // read at step_index (device memory) from coefs [S, 7] and noise_keys [S]; z in-kernel.
  m.def(
      "diffusion_step_(Tensor(a!) x, Tensor model_output, Tensor coefs, Tensor noise_keys, Tensor step_index, "
      "int seed, int sample_offset) -> ()");
}
