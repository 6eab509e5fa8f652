"""Triton kernels, one op per file under the op's stem: @triton.jit code and its launch
configuration only. ops/<op>.py imports its module lazily, when a kernel is launched, so
`import ddpm_fast` works without triton; nothing here imports ops/ (DESIGN §4)."""
import torch

# Each module lists its launch configs in launch_configs(capability), for this capability and newer,
# the targets benchmarks/kernel_resources.py compiles and checks them for (DESIGN §5.5).
MIN_CAPABILITY = (8, 0)
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}  # Triton's signature names


def capability(t: torch.Tensor) -> tuple[int, int]:
    """The compute capability to choose t's configs for: its GPU's; for CPU tensors (Triton's
    interpreter, which ignores resources) MIN_CAPABILITY."""
    return torch.cuda.get_device_capability(t.device) if t.is_cuda else MIN_CAPABILITY
