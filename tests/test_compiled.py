"""UNet.compiled() (ddpm_fast/compiled.py): the compiled forward equals the eager one, follows
weights loaded after it was compiled (the CPU default freezes them into the graph), and leaves
Inductor's global settings as they were."""
import torch

from ddpm_fast import UNet
from helpers import relative_error

SMALL = dict(ch=16, out_ch=2, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
             in_channels=2, resolution=8, num_groups=8)


def _random_model(seed: int) -> UNet:
    torch.manual_seed(seed)
    model = UNet(**SMALL).eval()
    with torch.no_grad():  # off the near-zero init, so that another set of weights is another output
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_compiled_forward_follows_new_weights():
    import torch._inductor.config as inductor_config
    model, other = _random_model(0), _random_model(1)
    compiled = model.compiled()
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([3, 700])
    with torch.inference_mode():
        assert relative_error(compiled(x, t), model(x, t)) < 1e-5
        model.load_state_dict(other.state_dict())  # in place, into the parameters frozen above
        expected = other(x, t)
        assert relative_error(compiled(x, t), expected) < 1e-5
    assert inductor_config.freezing is False  # set for that compile only


def test_sampler_compile_runs_the_compiled_forward():
    import pytest
    from ddpm_fast import NoiseSchedule, Sampler
    model = _random_model(2)
    schedule = NoiseSchedule.linear(100)
    eager = Sampler(model, schedule, method="ddim", steps=3).sample(2, seed=1)
    sampler = Sampler(model, schedule, method="ddim", steps=3, compile=True)
    assert sampler.compiled and sampler.sample_shape == (2, 8, 8)
    assert relative_error(sampler.sample(2, seed=1), eager) < 1e-5
    with pytest.raises(ValueError, match="compile=True compiles a ddpm_fast UNet"):
        Sampler(lambda x, t: x, schedule, sample_shape=(1, 2, 2), compile=True)
