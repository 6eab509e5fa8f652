"""The bound against an independent implementation: improved-diffusion's calc_bpd_loop run on the
bundled digits model with the same x_t noise (tests/golden/README.md says how the numbers were
made): every term to 1e-4 relative, the total to 1e-3 bits/dim."""
from pathlib import Path

import numpy as np
import torch

import ddpm_fast as df
from ddpm_fast.likelihood import Evaluator

GOLDEN = Path(__file__).parent / "golden" / "improved_diffusion_bpd.npz"


def test_bound_matches_improved_diffusion():
    network, outputs = df.UNet.from_pretrained("digits").eval(), {}

    def model(x_t, t):  # the clip changes the terms, not x_t nor the output: run the network once a timestep
        key = int(t[0])
        if key not in outputs:
            outputs[key] = network(x_t, t)
        return outputs[key]

    with np.load(GOLDEN) as golden:
        x0, seed = torch.from_numpy(golden["x0"]).float(), int(golden["seed"])
        for clip, name in ((True, "fixed_large_clip"), (False, "fixed_large_noclip")):
            theirs = {key: torch.from_numpy(golden[f"{name}/{key}"]) for key in ("total_bpd", "prior_bpd", "vb",
                                                                                 "xstart_mse")}
            bound = Evaluator(model, df.NoiseSchedule.linear(1000), clip_denoised=clip, sigma1="improved-diffusion",
                              sample_shape=(1, 16, 16)).bits_per_dim(x0, seed=seed)
            assert bound.quantised == 0 and bound.timesteps.tolist() == list(range(999, -1, -1))  # its loop order
            for ours, reference in ((bound.terms, theirs["vb"]), (bound.prior, theirs["prior_bpd"]),
                                    (bound.distortion, theirs["xstart_mse"])):
                assert float(((ours - reference) / reference).abs().max()) < 1e-4, name
            assert float((bound.bpd - theirs["total_bpd"]).abs().max()) < 1e-3, name
