"""A sampling run from fresh x_T — e2e.sample_steps steps (1000: the full DDPM chain) — for the
DDPM CIFAR-10 U-Net and the bundled digits model, ours against every baseline of
workloads.py. The report extrapolates these runs to 1000 steps and 50,000 samples.
Work: the forward's flops times batch × steps; images = the batch.

    pytest benchmarks/test_sampling.py --benchmark-only [--quick]
"""
import pytest

from benchmarks import settings, workloads
from benchmarks.timing import synchronized


@pytest.mark.parametrize("case", workloads.cases(), ids=workloads.case_id)
def test_sampling(measure, case):
    e2e, config, variant = case
    reason = workloads.skip_reason(e2e, variant) or (None if e2e.sample_steps else "a one-step workload")
    if reason:
        pytest.skip(reason)
    workload = workloads.build(e2e.model, config, variant, e2e.batch)
    steps = e2e.sample_steps
    workload.prepare(steps)  # the timed run's sampler and table, built outside the timing
    # compiles, captures and autotunes outside the timing, and finishes before round 1 starts
    synchronized(lambda: workload.sample(min(2, steps)), settings.DEVICE)()
    measure(f"e2e sample {e2e.model} {config} B={e2e.batch} steps={steps}", variant, lambda: workload.sample(steps),
            rounds=e2e.sample_rounds or settings.sizes().sample_rounds, warmup=0,
            flops=workloads.flops_per_image(e2e.model) * e2e.batch * steps, images=e2e.batch, kind="e2e-sample",
            model=e2e.model, config=config, batch=e2e.batch, steps=steps, cuda_graph=workload.cuda_graph)
