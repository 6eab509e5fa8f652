"""The time breakdown of one U-Net step (breakdown.py) for eager, torch.compile (max-autotune)
and ours, at the profiled model's e2e batch: each result is the step's timing with the
shares of convolutions/GEMMs, attention and everything else in extra_info.

    pytest benchmarks/test_breakdown.py --benchmark-only [--quick]
"""
import pytest

from benchmarks import settings, workloads
from benchmarks.breakdown import profile_step

SIZES = settings.sizes()
E2E = next(e for e in SIZES.e2e if e.model == SIZES.profile)
VARIANTS = ("eager", "torch.compile max-autotune", "ours", "ours + CUDA graph")


@pytest.mark.parametrize("variant", VARIANTS)
def test_breakdown(measure, variant):
    reason = workloads.skip_reason(E2E, variant)
    if reason:
        pytest.skip(reason)
    config = SIZES.e2e_configs[-1]  # bf16 channels_last on GPUs: what one would deploy
    workload = workloads.build(E2E.model, config, variant, E2E.batch)
    workload.step()  # compiles and captures outside the profile
    shares = profile_step(workload.step)
    measure(f"breakdown {E2E.model} {config} B={E2E.batch}", variant, workload.step, warmup=1,
            flops=workloads.flops_per_image(E2E.model) * E2E.batch, images=E2E.batch, kind="breakdown",
            model=E2E.model, config=config, batch=E2E.batch, cuda_graph=workload.cuda_graph, **shares)
