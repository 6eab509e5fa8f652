"""Helpers shared by the tests: error measures (DESIGN §6) and the CUDA skip rule."""
import os

import pytest
import torch

REQUIRE_CUDA = os.environ.get("DDPM_FAST_REQUIRE_CUDA") == "1"


def cuda_or_skip() -> torch.device:
    """The CUDA device; a skip where there is none, a failure when DDPM_FAST_REQUIRE_CUDA=1
    (the GPU report), so no CUDA test can pass by not running."""
    if not torch.cuda.is_available():
        if REQUIRE_CUDA:
            pytest.fail("DDPM_FAST_REQUIRE_CUDA=1 but torch.cuda.is_available() is False")
        pytest.skip("no CUDA device")
    return torch.device("cuda")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (DESIGN §6)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many float32 values lie between a and b (0 when bit-identical)."""
    def ordered(x):
        bits = x.float().cpu().contiguous().view(torch.int32).to(torch.int64)
        return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
    return (ordered(a) - ordered(b)).abs()


def opcheck_step(impl: str, device: torch.device, args: tuple) -> None:
    """torch.library.opcheck of the fused step's registered op for `impl` (the Triton custom op or the
    C++ one) on every argument of its schema, which has no defaults (DESIGN §5.5); the AOT dispatch
    check runs where the kernel is compiled, not in Triton's interpreter."""
    op = torch.ops.ddpm_fast.diffusion_step_triton_ if impl == "triton" else torch.ops.ddpm_fast.diffusion_step_
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    if device.type == "cuda" or impl != "triton":
        tests += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(op.default, args, test_utils=tests)
