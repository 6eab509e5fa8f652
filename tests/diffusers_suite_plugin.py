"""Run diffusers' own DDPM, DDIM and DPM-Solver tests with the drop-ins swapped in (not collected
by `make test`).

    git archive v0.40.0 tests | tar -x -C /tmp/dsuite     # diffusers' repository, the tag matching the
                                                          # installed 0.42.1's scheduler and U-Net files
    cd /tmp/dsuite && PYTHONPATH=/work/main/tests python -m pytest -p diffusers_suite_plugin \
        tests/schedulers/test_scheduler_ddpm.py tests/pipelines/ddpm/test_ddpm.py \
        tests/schedulers/test_scheduler_ddim.py tests/schedulers/test_scheduler_dpm_multi.py

`diffusers.DDPMScheduler` becomes FusedDDPMScheduler, `diffusers.DDIMScheduler`
FusedDDIMScheduler, `diffusers.DPMSolverMultistepScheduler` FusedDPMSolverMultistepScheduler,
and every DDPMPipeline is accelerate()d as it is built; the tests import these names after this
plugin has replaced them. (v0.40.0's tests/pipelines/ddim/test_ddim.py does not import with
diffusers 0.42.1: its common pipeline tests need a newer `diffusers.loaders`.)
"""
import diffusers

from ddpm_fast.integrations.diffusers import (FusedDDIMScheduler, FusedDDPMScheduler, FusedDPMSolverMultistepScheduler,
                                              accelerate)

_Pipeline = diffusers.DDPMPipeline


class AcceleratedDDPMPipeline(_Pipeline):
    def __init__(self, unet, scheduler):
        super().__init__(unet=unet, scheduler=scheduler)
        accelerate(self)


AcceleratedDDPMPipeline.__name__ = "DDPMPipeline"


def pytest_configure(config):
    diffusers.DDPMScheduler = FusedDDPMScheduler
    diffusers.DDIMScheduler = FusedDDIMScheduler
    diffusers.DPMSolverMultistepScheduler = FusedDPMSolverMultistepScheduler
    diffusers.DDPMPipeline = AcceleratedDDPMPipeline
