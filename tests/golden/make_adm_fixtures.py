"""Regenerate tests/golden/adm/: guided-diffusion's and improved-diffusion's own networks on fixed
inputs, for tests/test_adm.py (tests/golden/README.md says how and when these were made).

    python tests/golden/make_adm_fixtures.py GUIDED_DIFFUSION_CHECKOUT IMPROVED_DIFFUSION_CHECKOUT

Each checkout is a plain copy of the repository (openai/guided-diffusion, openai/improved-diffusion);
only their `unet` and `script_util` modules are imported (no mpi4py needed), from this script, never
from the package or its tests. Writes, for every configuration below, CONFIG.safetensors holding
their model's state dict (`state.<key>`, float16-representable values so that the file is half
the size, loaded by both networks as float32), the inputs x, t (and y) and their output `out`
(float32, CPU), with our constructor arguments and theirs in the metadata; and presets.json: for
every preset of ddpm_fast.adm_checkpoints, the sha256 of the (key, shape) list of the state dict
that their own script code builds from the preset's flags, and its parameter count.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent / "adm"

# (name, code base, class, their constructor's keywords, image size, fractional t)
COMMON = dict(in_channels=3, model_channels=32, num_res_blocks=1)
CONFIGS = [
    ("gd_ss_updown_new_headch_cond_sigma", "guided", "UNetModel",
     dict(COMMON, image_size=16, out_channels=6, attention_resolutions=(1, 2), channel_mult=(1, 1), num_classes=10,
          num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True), False),
    ("gd_plain_legacy_heads_uncond", "guided", "UNetModel",
     dict(COMMON, image_size=16, out_channels=3, attention_resolutions=(2,), channel_mult=(1, 1), num_heads=2,
          num_heads_upsample=4), False),
    ("gd_ss_legacy_headch_three_levels", "guided", "UNetModel",
     dict(COMMON, image_size=16, out_channels=6, attention_resolutions=(2, 4), channel_mult=(1, 1, 1), dropout=0.1,
          num_head_channels=32, use_scale_shift_norm=True), False),
    ("gd_updown_new_heads_cond", "guided", "UNetModel",
     dict(COMMON, image_size=8, out_channels=6, attention_resolutions=(2,), channel_mult=(1, 1), num_classes=5,
          num_heads=4, resblock_updown=True, use_new_attention_order=True), False),
    ("id_ss_heads_cond_sigma", "improved", "UNetModel",
     dict(COMMON, out_channels=6, attention_resolutions=(1, 2), channel_mult=(1, 1), num_classes=10, num_heads=2,
          use_scale_shift_norm=True), True),
    ("id_plain_uncond", "improved", "UNetModel",
     dict(COMMON, out_channels=3, attention_resolutions=(2,), channel_mult=(1, 1), num_heads=1), True),
    ("gd_classifier_ss_updown", "guided", "EncoderUNetModel",
     dict(COMMON, image_size=16, out_channels=10, attention_resolutions=(1, 2), channel_mult=(1, 2),
          num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True, pool="attention"), False),
    ("gd_classifier_plain_three_levels", "guided", "EncoderUNetModel",
     dict(COMMON, image_size=16, out_channels=7, attention_resolutions=(4,), channel_mult=(1, 1, 1),
          num_head_channels=32, pool="attention"), False),
]
IMPROVED_SIZE = {"id_ss_heads_cond_sigma": 16, "id_plain_uncond": 8}


def our_config(name: str, codebase: str, cls: str, kwargs: dict) -> dict:
    """ADMUNet's / ADMClassifier's arguments for their constructor's keywords."""
    ours = {k: v for k, v in kwargs.items() if k != "pool"}
    if codebase == "improved":  # its UNetModel has no image_size, num_head_channels, updown or new order
        ours["image_size"] = IMPROVED_SIZE[name]
    return ours


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter drawn afresh (their zero-initialised output layers would hide most of the
    network), rounded to float16-representable values: weights N(0, 1/fan_in), the rest N(0, 0.3²),
    GroupNorm scales around 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in sorted(model.state_dict(keep_vars=True).items()):
            if p.dim() > 1:
                value = torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5
            else:
                value = torch.randn(p.shape, generator=generator) * 0.3 + (1.0 if ".norm" in key or "layers.0" in key
                                                                            or key.startswith("out.0") else 0.0)
            p.copy_(value.half().float())


def fixture(name: str, codebase: str, cls_name: str, kwargs: dict, fractional: bool, modules: dict, seed: int):
    model = getattr(modules[codebase], cls_name)(**kwargs).eval()
    randomise(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    size = kwargs.get("image_size", IMPROVED_SIZE.get(name))
    x = torch.randn(2, 3, size, size, generator=generator)
    t = torch.tensor([12.25, 731.5]) if fractional else torch.tensor([3, 871])
    inputs = {"x": x, "t": t}
    args = (x, t)
    if kwargs.get("num_classes") is not None:
        inputs["y"] = torch.tensor([kwargs["num_classes"] - 1, 2])
        args += (inputs["y"],)
    with torch.no_grad():
        out = model(*args).float()
    tensors = {f"state.{k}": v.half() for k, v in model.state_dict().items()} | inputs | {"out": out}
    ours = our_config(name, codebase, cls_name, kwargs)
    metadata = {"class": "ADMClassifier" if cls_name == "EncoderUNetModel" else "ADMUNet",
                "config": json.dumps(ours), "reference": f"{codebase}_diffusion.unet.{cls_name}",
                "reference_kwargs": json.dumps(kwargs)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / f"{name}.safetensors"), metadata)
    return float(out.abs().max())


def shape_digest(model: torch.nn.Module) -> str:
    lines = "\n".join(f"{k} {tuple(v.shape)}" for k, v in sorted(model.state_dict().items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def preset_shapes(gd, id_, guided_root: Path, improved_root: Path) -> dict:
    """Their scripts' own reading of each preset's flags: argparse over their defaults, then
    create_model / create_classifier, built on the meta device."""
    from ddpm_fast.adm_checkpoints import PRESETS
    readmes = {"guided": (guided_root / "README.md").read_text(), "improved": (improved_root / "README.md").read_text()}
    result = {}
    for name, preset in PRESETS.items():
        util = id_["script_util"] if preset.builder == "improved" else gd["script_util"]
        defaults = util.classifier_and_diffusion_defaults() if preset.builder == "classifier" else \
            util.model_and_diffusion_defaults()
        parser = argparse.ArgumentParser()
        util.add_dict_to_argparser(parser, defaults)
        args = parser.parse_args(preset.flags.split())
        create = util.create_classifier if preset.builder == "classifier" else util.create_model
        keys = inspect.signature(create).parameters
        with torch.device("meta"):
            model = create(**{k: v for k, v in vars(args).items() if k in keys})
        # the README holds the flags verbatim (improved-diffusion's: its MODEL_FLAGS, then DIFFUSION_FLAGS)
        parts = preset.flags.split(" --diffusion_steps") if preset.builder == "improved" else [preset.flags]
        parts = parts[:1] + [" --diffusion_steps" + p for p in parts[1:]]
        verbatim = all(p.strip() in readmes["guided" if preset.builder != "improved" else "improved"] for p in parts)
        result[name] = {"sha256": shape_digest(model), "parameters": sum(p.numel() for p in model.parameters()),
                        "verbatim_in_readme": verbatim}
    return result


def main(guided_root: str, improved_root: str) -> None:
    sys.path.insert(0, guided_root)
    gd = {m: importlib.import_module(f"guided_diffusion.{m}") for m in ("unet", "script_util")}
    sys.path.insert(0, improved_root)
    id_ = {m: importlib.import_module(f"improved_diffusion.{m}") for m in ("unet", "script_util")}
    OUT.mkdir(exist_ok=True)
    modules = {"guided": gd["unet"], "improved": id_["unet"]}
    for seed, (name, codebase, cls_name, kwargs, fractional) in enumerate(CONFIGS):
        peak = fixture(name, codebase, cls_name, kwargs, fractional, modules, 1000 * seed)
        print(f"{name}: max |out| {peak:.3g}")
    commits = {repo: subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
               for repo, root in (("guided-diffusion", guided_root), ("improved-diffusion", improved_root))}
    presets = preset_shapes(gd, id_, Path(guided_root), Path(improved_root))
    (OUT / "presets.json").write_text(json.dumps({"commits": commits, "torch": torch.__version__, "presets": presets},
                                                 indent=1, sort_keys=True) + "\n")
    print(json.dumps(presets, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
