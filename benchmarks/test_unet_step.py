"""One full denoising step — U-Net forward plus the sampling update, noise included — for the
DDPM CIFAR-10 U-Net (35.7M parameters) and the bundled digits model, ours against every
baseline of workloads.py, like for like (same dtype, layout, CUDA-graph use). Work: the
forward's flops (counted by torch at batch 1, times the batch); images = the batch.

    pytest benchmarks/test_unet_step.py --benchmark-only [--quick]
"""
import pytest

from benchmarks import workloads


@pytest.mark.parametrize("case", workloads.cases(), ids=workloads.case_id)
def test_unet_step(measure, case):
    e2e, config, variant = case
    reason = workloads.skip_reason(e2e, variant) or ("sampling runs only" if variant in workloads.STEPLESS else None)
    if reason:
        pytest.skip(reason)
    workload = workloads.build(e2e.model, config, variant, e2e.batch)
    workload.step()  # compiles, captures and autotunes outside the timing
    measure(f"e2e step {e2e.model} {config} B={e2e.batch}", variant, workload.step,
            flops=workloads.flops_per_image(e2e.model) * e2e.batch, images=e2e.batch, kind="e2e-step",
            model=e2e.model, config=config, batch=e2e.batch, steps=1, cuda_graph=workload.cuda_graph)
