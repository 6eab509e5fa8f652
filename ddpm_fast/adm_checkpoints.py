"""guided-diffusion's and improved-diffusion's checkpoints as ADMUNet / ADMClassifier (DESIGN §2.7):
their flags — the keywords of guided-diffusion's create_model and create_classifier and of
improved-diffusion's create_model, as their READMEs give them — turned into the networks'
arguments, named presets for every published model, and the loaders. A .pt file is read with
torch.load(weights_only=True) only; nothing is unpickled as code.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import NamedTuple

import torch

from . import checkpoints
from .adm import ADMClassifier, ADMUNet
from .schedule import NoiseSchedule

NUM_CLASSES = 1000  # ImageNet's, as both code bases hard-code it

# Each code base's flags and defaults; a type in place of a default marks a flag without one.
GUIDED_MODEL_FLAGS = dict(  # guided-diffusion script_util.create_model
    image_size=int, num_channels=int, num_res_blocks=int, channel_mult="", learn_sigma=False, class_cond=False,
    use_checkpoint=False, attention_resolutions="16", num_heads=1, num_head_channels=-1, num_heads_upsample=-1,
    use_scale_shift_norm=False, dropout=0.0, resblock_updown=False, use_fp16=False, use_new_attention_order=False)
GUIDED_CLASSIFIER_FLAGS = dict(  # create_classifier, which has no defaults: classifier_defaults()'s
    image_size=64, classifier_use_fp16=False, classifier_width=128, classifier_depth=2,
    classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True, classifier_resblock_updown=True,
    classifier_pool="attention")
IMPROVED_MODEL_FLAGS = dict(  # improved-diffusion create_model, which has no defaults: model_and_diffusion_defaults()'s
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1, attention_resolutions="16,8",
    dropout=0.0, learn_sigma=False, class_cond=False, use_checkpoint=False, use_scale_shift_norm=True)
# The diffusion flags their scripts take beside (diffusion_defaults(), model_and_diffusion_defaults()):
# not the network's, kept with a preset for sampling it.
GUIDED_DIFFUSION_FLAGS = dict(learn_sigma=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="",
                              use_kl=False, predict_xstart=False, rescale_timesteps=False, rescale_learned_sigmas=False)
IMPROVED_DIFFUSION_FLAGS = dict(learn_sigma=False, sigma_small=False, diffusion_steps=1000, noise_schedule="linear",
                                timestep_respacing="", use_kl=False, predict_xstart=False, rescale_timesteps=True,
                                rescale_learned_sigmas=True)

# channel_mult by image size where the flags leave it out
GUIDED_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
IMPROVED_CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}


def guided_model_config(**flags) -> dict:
    """ADMUNet's arguments from guided-diffusion create_model's keywords (its defaults)."""
    f = _typed("guided-diffusion's create_model", GUIDED_MODEL_FLAGS, flags)
    # use_checkpoint (gradient checkpointing) and use_fp16 (its torso in float16) leave the function as it is:
    # the network loads in float32 (.half() or .to(torch.bfloat16) for 16 bits, the whole network)
    return dict(image_size=f["image_size"], in_channels=3, model_channels=f["num_channels"],
                out_channels=6 if f["learn_sigma"] else 3, num_res_blocks=f["num_res_blocks"],
                attention_resolutions=_downsample_rates(f["image_size"], f["attention_resolutions"]),
                dropout=f["dropout"], channel_mult=_channel_mult(f["image_size"], f["channel_mult"], GUIDED_CHANNEL_MULT),
                num_classes=NUM_CLASSES if f["class_cond"] else None, num_heads=f["num_heads"],
                num_head_channels=f["num_head_channels"], num_heads_upsample=f["num_heads_upsample"],
                use_scale_shift_norm=f["use_scale_shift_norm"], resblock_updown=f["resblock_updown"],
                use_new_attention_order=f["use_new_attention_order"])


def improved_model_config(**flags) -> dict:
    """ADMUNet's arguments from improved-diffusion create_model's keywords (its scripts' defaults).
    Its UNet is guided-diffusion's without resblock_updown, num_head_channels and the new
    attention order: heads split before q/k/v, as QKVAttentionLegacy."""
    f = _typed("improved-diffusion's create_model", IMPROVED_MODEL_FLAGS, flags)
    return dict(image_size=f["image_size"], in_channels=3, model_channels=f["num_channels"],
                out_channels=6 if f["learn_sigma"] else 3, num_res_blocks=f["num_res_blocks"],
                attention_resolutions=_downsample_rates(f["image_size"], f["attention_resolutions"]),
                dropout=f["dropout"], channel_mult=_channel_mult(f["image_size"], "", IMPROVED_CHANNEL_MULT),
                num_classes=NUM_CLASSES if f["class_cond"] else None, num_heads=f["num_heads"], num_head_channels=-1,
                num_heads_upsample=f["num_heads_upsample"], use_scale_shift_norm=f["use_scale_shift_norm"],
                resblock_updown=False, use_new_attention_order=False)


def guided_classifier_config(**flags) -> dict:
    """ADMClassifier's arguments from guided-diffusion create_classifier's keywords
    (classifier_defaults()' defaults): 64 channels a head, 1000 classes, the attention pool."""
    f = _typed("guided-diffusion's create_classifier", GUIDED_CLASSIFIER_FLAGS, flags)
    if f["classifier_pool"] != "attention":
        raise ValueError(f"classifier_pool must be 'attention' (every published classifier's; the adaptive and "
                         f"spatial pools are not built here), got {f['classifier_pool']!r}")
    size = f["image_size"]
    return dict(image_size=size, in_channels=3, model_channels=f["classifier_width"], out_channels=NUM_CLASSES,
                num_res_blocks=f["classifier_depth"],
                attention_resolutions=_downsample_rates(size, f["classifier_attention_resolutions"]),
                channel_mult=_channel_mult(size, "", GUIDED_CHANNEL_MULT), num_head_channels=64,
                use_scale_shift_norm=f["classifier_use_scale_shift_norm"],
                resblock_updown=f["classifier_resblock_updown"])


def _typed(who: str, table: dict, flags: dict) -> dict:
    """flags over table's defaults, each of its default's type (an int where a float is expected
    too), every flag without a default given, no flag outside the table."""
    unknown = sorted(set(flags) - set(table))
    if unknown:
        raise ValueError(f"{who} has no flag {unknown[0]!r}; its flags are {', '.join(table)}")
    missing = [k for k, v in table.items() if isinstance(v, type) and k not in flags]
    if missing:
        raise ValueError(f"{who} needs {', '.join(missing)} (no defaults)")
    for key, value in flags.items():
        kind = table[key] if isinstance(table[key], type) else type(table[key])
        fits = isinstance(value, kind) and (kind is bool or not isinstance(value, bool)) or (
            kind is float and isinstance(value, int) and not isinstance(value, bool))
        if not fits:
            raise ValueError(f"{who}: {key} must be a {kind.__name__}, got {value!r}")
    return {**table, **flags}


def _downsample_rates(image_size: int, resolutions: str) -> tuple[int, ...]:
    # create_model's "32,16,8" are image sizes; the network takes the downsample rates image_size // res
    try:
        return tuple(image_size // int(res) for res in resolutions.split(","))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"attention resolutions must be comma-separated positive ints such as '32,16,8', got "
                         f"{resolutions!r}") from None


def _channel_mult(image_size: int, text: str, defaults: dict) -> tuple[float, ...]:
    if text:
        try:
            return tuple(int(m) for m in text.split(","))
        except ValueError:
            raise ValueError(f"channel_mult must be comma-separated ints such as '1,2,3,4', got {text!r}") from None
    if image_size not in defaults:
        raise ValueError(f"image_size {image_size} has no default channel_mult (those of {sorted(defaults)}): pass "
                         f"channel_mult")
    return defaults[image_size]


# -- presets ------------------------------------------------------------------------------------

class Preset(NamedTuple):
    """A published checkpoint: its code base's flag builder, its README's flags verbatim (the
    model's; improved-diffusion's DIFFUSION_FLAGS after them) and where it is downloaded."""
    builder: str  # "guided", "improved" or "classifier"
    flags: str
    url: str

    def model_flags(self) -> dict:
        """The network's flags, typed as create_model / create_classifier take them."""
        return flag_text(self.flags, self.builder)

    def diffusion(self) -> dict:
        """The diffusion flags over the code base's script defaults (sampling's, not the network's)."""
        table = _diffusion_table(self.builder)
        given = parse_flags(self.flags, _BUILDERS[self.builder][1], table)
        return {**table, **{k: v for k, v in given.items() if k in table}}

    def config(self) -> dict:
        return _BUILDERS[self.builder][0](**self.model_flags())


def flag_text(text: str, builder: str) -> dict:
    """The network's flags in a README's flag text for `builder` ("guided", "improved" or
    "classifier"); the diffusion flags the scripts take beside them are read and left out."""
    table = _BUILDERS[builder][1]
    return {k: v for k, v in parse_flags(text, table, _diffusion_table(builder)).items() if k in table}


def _diffusion_table(builder: str) -> dict:
    return IMPROVED_DIFFUSION_FLAGS if builder == "improved" else GUIDED_DIFFUSION_FLAGS


_BUILDERS = {"guided": (guided_model_config, GUIDED_MODEL_FLAGS),
             "improved": (improved_model_config, IMPROVED_MODEL_FLAGS),
             "classifier": (guided_classifier_config, GUIDED_CLASSIFIER_FLAGS)}

_GD, _ID = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/", \
    "https://openaipublic.blob.core.windows.net/diffusion/march-2021/"
_LSUN = ("--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 --image_size 256 "
         "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
         "--resblock_updown True --use_fp16 True --use_scale_shift_norm True")
# The MODEL_FLAGS of guided-diffusion's README (openai/guided-diffusion 22e0df8) and the MODEL_FLAGS
# then DIFFUSION_FLAGS of improved-diffusion's (openai/improved-diffusion 1bc7bbb), verbatim; the
# classifiers' from the classifier_sample.py commands beside each model (their MODEL_FLAGS' image
# size, the 64×64's --classifier_depth 4) and the README's CLASSIFIER_FLAGS for the 128×128.
PRESETS = {
    "64x64_diffusion": Preset("guided", "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
                              "--dropout 0.1 --image_size 64 --learn_sigma True --noise_schedule cosine --num_channels "
                              "192 --num_head_channels 64 --num_res_blocks 3 --resblock_updown True "
                              "--use_new_attention_order True --use_fp16 True --use_scale_shift_norm True",
                              _GD + "64x64_diffusion.pt"),
    "128x128_diffusion": Preset("guided", "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
                                "--image_size 128 --learn_sigma True --noise_schedule linear --num_channels 256 "
                                "--num_heads 4 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
                                "--use_scale_shift_norm True", _GD + "128x128_diffusion.pt"),
    "256x256_diffusion": Preset("guided", "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
                                "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 "
                                "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
                                "--use_scale_shift_norm True", _GD + "256x256_diffusion.pt"),
    "256x256_diffusion_uncond": Preset("guided", "--attention_resolutions 32,16,8 --class_cond False "
                                       "--diffusion_steps 1000 --image_size 256 --learn_sigma True --noise_schedule "
                                       "linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
                                       "--resblock_updown True --use_fp16 True --use_scale_shift_norm True",
                                       _GD + "256x256_diffusion_uncond.pt"),
    "512x512_diffusion": Preset("guided", "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
                                "--image_size 512 --learn_sigma True --noise_schedule linear --num_channels 256 "
                                "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 False "
                                "--use_scale_shift_norm True", _GD + "512x512_diffusion.pt"),
    "lsun_bedroom": Preset("guided", _LSUN, _GD + "lsun_bedroom.pt"),
    "lsun_cat": Preset("guided", _LSUN, _GD + "lsun_cat.pt"),
    "lsun_horse": Preset("guided", _LSUN, _GD + "lsun_horse.pt"),
    "lsun_horse_nodropout": Preset("guided", _LSUN.replace("--dropout 0.1", "--dropout 0.0"),
                                   _GD + "lsun_horse_nodropout.pt"),
    "64x64_classifier": Preset("classifier", "--image_size 64 --classifier_depth 4", _GD + "64x64_classifier.pt"),
    "128x128_classifier": Preset("classifier", "--image_size 128 --classifier_attention_resolutions 32,16,8 "
                                 "--classifier_depth 2 --classifier_width 128 --classifier_pool attention "
                                 "--classifier_resblock_updown True --classifier_use_scale_shift_norm True",
                                 _GD + "128x128_classifier.pt"),
    "256x256_classifier": Preset("classifier", "--image_size 256", _GD + "256x256_classifier.pt"),
    "512x512_classifier": Preset("classifier", "--image_size 512", _GD + "512x512_classifier.pt"),
    "imagenet64_uncond_100M_1500K": Preset("improved", "--image_size 64 --num_channels 128 --num_res_blocks 3 "
                                           "--learn_sigma True --diffusion_steps 4000 --noise_schedule cosine",
                                           _ID + "imagenet64_uncond_100M_1500K.pt"),
    "cifar10_uncond_50M_500K": Preset("improved", "--image_size 32 --num_channels 128 --num_res_blocks 3 "
                                      "--learn_sigma True --dropout 0.3 --diffusion_steps 4000 --noise_schedule cosine",
                                      _ID + "cifar10_uncond_50M_500K.pt"),
    "imagenet64_cond_270M_250K": Preset("improved", "--image_size 64 --num_channels 192 --num_res_blocks 3 "
                                        "--learn_sigma True --class_cond True --diffusion_steps 4000 --noise_schedule "
                                        "cosine --rescale_learned_sigmas False --rescale_timesteps False",
                                        _ID + "imagenet64_cond_270M_250K.pt"),
    "imagenet64_uncond_vlb_100M_1500K": Preset("improved", "--image_size 64 --num_channels 128 --num_res_blocks 3 "
                                               "--learn_sigma True --diffusion_steps 4000 --noise_schedule cosine "
                                               "--use_kl True", _ID + "imagenet64_uncond_vlb_100M_1500K.pt"),
    "cifar10_uncond_vlb_50M_500K": Preset("improved", "--image_size 32 --num_channels 128 --num_res_blocks 3 "
                                          "--learn_sigma True --dropout 0.3 --diffusion_steps 4000 --noise_schedule "
                                          "cosine --use_kl True", _ID + "cifar10_uncond_vlb_50M_500K.pt"),
}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"no preset {name!r}; the presets are {', '.join(PRESETS)}")
    return PRESETS[name]


def parse_flags(text: str, table: dict, extra: dict | None = None) -> dict:
    """'--key value ...' as the scripts' argparse reads it (str2bool's yes/true/t/y/1 and
    no/false/f/n/0) into typed values: keys of `table` (the network's) or `extra` (others the
    scripts take beside)."""
    words, known, values = shlex.split(text), {**(extra or {}), **table}, {}
    if len(words) % 2 or any(not w.startswith("--") for w in words[::2]):
        raise ValueError(f"flags must be '--name value' pairs, got {text!r}")
    for key, raw in zip((w[2:] for w in words[::2]), words[1::2]):
        if key not in known:
            raise ValueError(f"unknown flag --{key}; the flags are {', '.join('--' + k for k in known)}")
        kind = known[key] if isinstance(known[key], type) else type(known[key])
        values[key] = _parse_value(key, raw, kind)
    return values


def _parse_value(key: str, raw: str, kind: type):
    if kind is bool:
        if raw.lower() not in ("yes", "true", "t", "y", "1", "no", "false", "f", "n", "0"):
            raise ValueError(f"--{key} expects a boolean (True or False), got {raw!r}")
        return raw.lower() in ("yes", "true", "t", "y", "1")
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"--{key} expects a{'n' * (kind is int)} {kind.__name__}, got {raw!r}") from None


# -- loaders ------------------------------------------------------------------------------------

def from_guided_diffusion(path_or_state_dict, preset: str | None = None, **flags) -> ADMUNet:
    """The ADM U-Net of a guided-diffusion (or improved-diffusion) checkpoint, in eval mode.

    path_or_state_dict: a .pt state dict (torch.load(weights_only=True)), a dict of tensors, or
    our .safetensors. flags: guided-diffusion create_model's keywords as its README's
    MODEL_FLAGS give them (attention_resolutions="32,16,8", class_cond=True, …; create_model's
    defaults), or preset=NAME (PRESETS: guided-diffusion's and improved-diffusion's published
    models), which flags then override. A checkpoint that does not fit is a one-line ValueError
    naming the first key or shape that differs."""
    return _load(ADMUNet, path_or_state_dict, preset, flags, "guided")


def from_improved_diffusion(path_or_state_dict, preset: str | None = None, **flags) -> ADMUNet:
    """from_guided_diffusion for improved-diffusion create_model's keywords (its scripts'
    defaults: num_heads 4, attention_resolutions "16,8", use_scale_shift_norm True)."""
    return _load(ADMUNet, path_or_state_dict, preset, flags, "improved")


def classifier_from_guided_diffusion(path_or_state_dict, preset: str | None = None, **flags) -> ADMClassifier:
    """The noisy classifier of a guided-diffusion checkpoint, in eval mode: flags are
    create_classifier's keywords (classifier_width, classifier_depth, …, image_size; the defaults
    of its classifier_defaults()), or preset=NAME ("64x64_classifier", …). As from_guided_diffusion."""
    return _load(ADMClassifier, path_or_state_dict, preset, flags, "classifier")


def load_flag_text(source, text: str = "", preset_name: str | None = None):
    """ADMUNet or ADMClassifier of a checkpoint from a README's flag text as its scripts take it
    ('--attention_resolutions 32,16,8 --class_cond True ...': guided-diffusion's MODEL_FLAGS, or its
    classifier flags where they name one) and/or a preset, which the text then overrides
    (`ddpm-fast convert --preset --flags`)."""
    builder = preset(preset_name).builder if preset_name else ("classifier" if "--classifier_" in text else "guided")
    cls = ADMClassifier if builder == "classifier" else ADMUNet
    return _load(cls, source, preset_name, parse_flags(text, _BUILDERS[builder][1], _diffusion_table(builder)), builder)


def _load(cls, source, preset_name: str | None, flags: dict, builder: str):
    diffusion = {}
    if preset_name is not None:
        chosen = preset(preset_name)
        if (chosen.builder == "classifier") != (cls is ADMClassifier):
            kind, loader = ("a classifier", "classifier_from_guided_diffusion") if chosen.builder == "classifier" \
                else ("a diffusion model", "from_guided_diffusion")
            raise ValueError(f"preset {preset_name!r} is {kind}: load it with {loader}")
        builder, flags, diffusion = chosen.builder, {**chosen.model_flags(), **flags}, chosen.diffusion()
    # the diffusion flags their scripts take beside the network's (diffusion_steps, rescale_timesteps, …)
    table = _diffusion_table(builder)
    diffusion = {**table, **diffusion, **{k: flags.pop(k) for k in list(flags)
                                          if k in table and k not in _BUILDERS[builder][1]}}
    config = _BUILDERS[builder][0](**flags) if preset_name is not None or flags or not _is_safetensors(source) \
        else None
    if config is not None and cls is ADMUNet:
        config["timestep_scale"] = timestep_scale(diffusion)
    if _is_safetensors(source):
        model = checkpoints.load_safetensors(cls, source)
        if config is not None and checkpoints.skeleton(cls, config, str(source)).config != model.config:
            raise ValueError(f"{source} holds {cls.__name__}({model.config}), not the {cls.__name__}({config}) the "
                             f"flags describe")
        return model.eval()
    if isinstance(source, dict):
        state_dict, name = source, "the state dict"
    else:
        state_dict, name = checkpoints.read_torch_weights(Path(source)), str(source)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{name} does not hold a state dict of tensors (guided-diffusion saves its model's "
                         f"state_dict())")
    return checkpoints.build_checked(cls, config, state_dict, name).eval()


def timestep_scale(diffusion: dict) -> float:
    """What the network's t is multiplied by: 1000/T under improved-diffusion's rescale_timesteps
    (its _WrappedModel's t·1000/original_num_steps), else 1."""
    return 1000.0 / diffusion["diffusion_steps"] if diffusion["rescale_timesteps"] else 1.0


def sampling(diffusion: dict) -> tuple[NoiseSchedule, dict]:
    """(the schedule, Sampler keywords) of a checkpoint's diffusion flags, as their
    create_gaussian_diffusion builds the process: get_named_beta_schedule's "linear" (β from
    0.1/T to 20/T, i.e. the paper's 1e-4 … 0.02 scaled by 1000/T) or "cosine"; learn_sigma →
    learned_range, else sigma_small → fixed_small or fixed_large; predict_xstart → x0 prediction;
    timestep_respacing as the steps ("" = all T)."""
    T, name = diffusion["diffusion_steps"], diffusion["noise_schedule"]
    if name == "linear":
        schedule = NoiseSchedule.linear(T, 0.1 / T, 20.0 / T)
    elif name == "cosine":
        schedule = NoiseSchedule.cosine(T)
    else:
        raise ValueError(f"noise_schedule must be 'linear' or 'cosine' (their get_named_beta_schedule's), got {name!r}")
    variance = "learned_range" if diffusion["learn_sigma"] else (
        "fixed_small" if diffusion.get("sigma_small") else "fixed_large")
    return schedule, dict(variance=variance, prediction_type="x0" if diffusion["predict_xstart"] else "epsilon",
                          steps=diffusion["timestep_respacing"] or None)


def _is_safetensors(source) -> bool:
    return isinstance(source, (str, Path)) and Path(source).suffix == ".safetensors"
