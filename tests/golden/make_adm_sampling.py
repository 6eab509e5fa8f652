"""Writes tests/golden/adm_sampling.safetensors: guided-diffusion's own sampling of a small random
class-conditional learned-sigma ADM U-Net (respaced to 20 steps, learned_range, classifier
guidance through its cond_fn), fed ddpm_fast's noise (DESIGN §3), for tests/test_adm_sampling.py.

    python tests/golden/make_adm_sampling.py /path/to/guided-diffusion COMMIT

imports their code from the path given (it is not part of this repository) and runs on the CPU in
float32, one thread."""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, sys.argv[1])
from guided_diffusion import gaussian_diffusion  # noqa: E402  (their code, from the path given)
from guided_diffusion.script_util import create_gaussian_diffusion  # noqa: E402
from guided_diffusion.unet import EncoderUNetModel, UNetModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import ddpm_fast  # noqa: E402  (our noise only)

torch.set_num_threads(1)
SEED, LABELS, CLASSIFIER_SCALE, RESPACING = 1234, [3, 7], 2.0, "20"
# UNetModel and EncoderUNetModel as create_model / create_classifier build them, with 10 classes
# (theirs fix 1000) and 16×16 images (theirs refuse sizes below 64), to keep the file small
MODEL_ARGS = dict(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                  attention_resolutions=(2,), dropout=0.0, channel_mult=(1, 1), num_classes=10, use_fp16=False,
                  num_heads=1, num_head_channels=16, num_heads_upsample=-1, use_scale_shift_norm=True,
                  resblock_updown=True, use_new_attention_order=True)
CLASSIFIER_ARGS = dict(image_size=16, in_channels=3, model_channels=32, out_channels=10, num_res_blocks=1,
                       attention_resolutions=(2,), channel_mult=(1, 1), use_fp16=False, num_head_channels=16,
                       use_scale_shift_norm=True, resblock_updown=True, pool="attention")


def randomised(module: torch.nn.Module, seed: int, gain: float) -> torch.nn.Module:
    """Every parameter random (gain/√fan-in): their zero-initialised output layers would make ε ≡ 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.1 * noise if isinstance(_owner(module, name), torch.nn.GroupNorm) and name.endswith("weight")
                    else gain * noise / max(1, p[0].numel()) ** 0.5)
    return module.eval()


def _owner(module, name):
    return module.get_submodule(name.rsplit(".", 1)[0])


model = randomised(UNetModel(**MODEL_ARGS), 0, 0.2)
classifier = randomised(EncoderUNetModel(**CLASSIFIER_ARGS), 1, 2.0)
y = torch.tensor(LABELS)
B, shape = len(LABELS), (len(LABELS), 3, 16, 16)


def cond_fn(x, t, y=None):  # their classifier_sample.py's
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
        selected = log_probs[range(len(log_probs)), y.view(-1)]
        return torch.autograd.grad(selected.sum(), x_in)[0] * CLASSIFIER_SCALE


def model_fn(x, t, y=None):
    return model(x, t, y)


key = {"step": None}
their_randn_like = torch.randn_like


def our_noise(x, *args, **kwargs):  # z of the update at original timestep t is keyed t (DESIGN §3.2)
    return ddpm_fast.randn(x.shape, seed=SEED, step=key["step"], impl="reference")


def run(method: str, respacing: str, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x after the first update, the final x_0) of their loop, one p_sample / ddim_sample at a time."""
    diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="linear",
                                          timestep_respacing=respacing)
    x = ddpm_fast.randn(shape, seed=SEED, step=1000, impl="reference")  # x_T under key T
    first = None
    gaussian_diffusion.th.randn_like = our_noise
    try:
        for i in reversed(range(diffusion.num_timesteps)):
            key["step"] = diffusion.timestep_map[i]
            t = torch.full((B,), i, dtype=torch.long)
            sample = diffusion.p_sample if method == "ddpm" else diffusion.ddim_sample
            with torch.no_grad():
                x = sample(model_fn, x, t, clip_denoised=True, cond_fn=cond_fn if guided else None,
                           model_kwargs={"y": y})["sample"]
            first = x.clone() if first is None else first
    finally:
        gaussian_diffusion.th.randn_like = their_randn_like
    return first, x


tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
tensors |= {f"classifier.{k}": v.contiguous() for k, v in classifier.state_dict().items()}
tensors["labels"] = y
runs = {"ddpm_guided": ("ddpm", RESPACING, True), "ddpm": ("ddpm", RESPACING, False),
        "ddim_guided": ("ddim", "ddim10", True)}
for name, args in runs.items():
    tensors[f"{name}.first"], tensors[f"{name}.x0"] = run(*args)
    final = tensors[f"{name}.x0"]
    print(name, "clipped share", float((final.abs() >= 1).float().mean()), "std", float(final.std()))
print("guidance moves x_0 by up to", float((tensors["ddpm_guided.x0"] - tensors["ddpm.x0"]).abs().max()),
      "mean", float((tensors["ddpm_guided.x0"] - tensors["ddpm.x0"]).abs().mean()))
metadata = {"model_args": json.dumps(MODEL_ARGS), "classifier_args": json.dumps(CLASSIFIER_ARGS),
            "seed": str(SEED), "classifier_scale": str(CLASSIFIER_SCALE), "runs": json.dumps(runs),
            "diffusion": json.dumps(dict(steps=1000, learn_sigma=True, noise_schedule="linear")),
            "guided_diffusion_commit": sys.argv[2]}
save_file(tensors, str(Path(__file__).with_name("adm_sampling.safetensors")), metadata=metadata)
