"""diffusers UNet2DModel ↔ ddpm_fast UNet, as data: configs and state-dict names.

The conversion needs no diffusers import: it maps a UNet2DModel config (config.json) to our
constructor arguments and renames its state dict, so diffusers checkpoints load offline
(ddpm_fast/checkpoints.py reads the files).
Only configurations that are the DDPM architecture are accepted; anything else is refused
with the option that differs.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

# Options whose value must be the DDPM architecture's (a missing key means diffusers' default).
_REQUIRED = {
    "act_fn": ("silu", "silu"),
    "time_embedding_type": ("positional", "positional"),
    "flip_sin_to_cos": (False, True),
    "freq_shift": (1, 0),
    "center_input_sample": (False, False),
    "mid_block_scale_factor": (1, 1),
    "downsample_padding": (0, 1),
    "norm_eps": (1e-6, 1e-5),
    "resnet_time_scale_shift": ("default", "default"),
    "add_attention": (True, True),
    "class_embed_type": (None, None),
    "num_class_embeds": (None, None),
    "time_embedding_dim": (None, None),
    "attn_norm_num_groups": (None, None),
    "downsample_type": ("conv", "conv"),
    "upsample_type": ("conv", "conv"),
    "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2D"),
}


def _list_of(config: Mapping[str, Any], key: str, kind: type) -> list:
    value = config[key] if key in config else None
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(v, kind) and not isinstance(v, bool) and (kind is str or v > 0) for v in value):
        what = "positive ints" if kind is int else "names"
        raise ValueError(f"UNet2DModel option {key} must be a non-empty list of {what}, got {value!r:.80}")
    return list(value)


def unet_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our UNet's constructor arguments for a diffusers UNet2DModel config."""
    if not isinstance(config, Mapping):
        raise ValueError(f"a UNet2DModel config must be a JSON object of options, got {config!r:.80}")
    for key, (wanted, default) in _REQUIRED.items():
        value = config.get(key, default)
        if value != wanted:
            raise ValueError(f"diffusers UNet2DModel option {key}={value!r} is not the DDPM architecture "
                             f"(ddpm_fast needs {key}={wanted!r})")
    widths = _list_of(config, "block_out_channels", int)
    down, up = _list_of(config, "down_block_types", str), _list_of(config, "up_block_types", str)
    if len(down) != len(widths) or len(up) != len(widths):
        raise ValueError(f"need one down and one up block per width: {len(widths)} widths, "
                         f"{len(down)} down blocks, {len(up)} up blocks")
    if any(w % widths[0] for w in widths):
        raise ValueError(f"block_out_channels {widths} must all be multiples of the first")
    attn_levels = [i for i, kind in enumerate(down) if kind == "AttnDownBlock2D"]
    for i, kind in enumerate(down):
        if kind not in ("DownBlock2D", "AttnDownBlock2D"):
            raise ValueError(f"down_block_types[{i}]={kind!r} is not DownBlock2D or AttnDownBlock2D")
    for i, kind in enumerate(reversed(up)):
        want = "AttnUpBlock2D" if i in attn_levels else "UpBlock2D"
        if kind != want:
            raise ValueError(f"up_block_types must mirror down_block_types: level {i} needs {want}, got {kind!r}")
    head_dim = config.get("attention_head_dim")
    if head_dim is not None and any(head_dim != widths[i] for i in attn_levels + [len(widths) - 1]):
        raise ValueError(f"attention_head_dim={head_dim} means several heads; the DDPM U-Net has one head per block")
    resolution = config.get("sample_size")
    resolution = _list_of(config, "sample_size", int)[0] if isinstance(resolution, (list, tuple)) else resolution
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
        raise ValueError(f"UNet2DModel option sample_size must be a positive int, got {resolution!r:.80}")
    return dict(ch=widths[0], out_ch=config.get("out_channels", 3), ch_mult=[w // widths[0] for w in widths],
                num_res_blocks=config.get("layers_per_block", 2),
                attn_resolutions=[resolution // 2 ** i for i in attn_levels], dropout=config.get("dropout", 0.0),
                in_channels=config.get("in_channels", 3), resolution=resolution,
                num_groups=config.get("norm_num_groups", 32))


def unet_config_to_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """UNet2DModel keyword arguments for our UNet's config (UNet(...).config): the same
    architecture, so diffusers can be timed against ours like for like; the inverse of
    unet_config_from_diffusers."""
    widths = [config["ch"] * m for m in config["ch_mult"]]
    resolution = config["resolution"]
    attn = [resolution // 2 ** i in config["attn_resolutions"] for i in range(len(widths))]
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    options = {key: wanted for key, (wanted, default) in _REQUIRED.items() if wanted != default}
    return dict(sample_size=resolution, in_channels=config["in_channels"], out_channels=config["out_ch"],
                layers_per_block=config["num_res_blocks"], block_out_channels=tuple(widths),
                down_block_types=tuple(down), up_block_types=tuple(up), attention_head_dim=None,
                norm_num_groups=config["num_groups"], dropout=config["dropout"], **options)


# (diffusers pattern, ours); {L} in ours is replaced by the level counted from the top.
_RENAMES = [
    (r"time_embedding\.linear_1\.", "temb.dense.0."),
    (r"time_embedding\.linear_2\.", "temb.dense.1."),
    (r"conv_norm_out\.", "norm_out."),
    (r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
    (r"down_blocks\.(\d+)\.attentions\.", r"down.\1.attn."),
    (r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
    (r"up_blocks\.(\d+)\.resnets\.", r"up.{L}.block."),
    (r"up_blocks\.(\d+)\.attentions\.", r"up.{L}.attn."),
    (r"up_blocks\.(\d+)\.upsamplers\.0\.", r"up.{L}.upsample."),
    (r"mid_block\.resnets\.0\.", "mid.block_1."),
    (r"mid_block\.resnets\.1\.", "mid.block_2."),
    (r"mid_block\.attentions\.0\.", "mid.attn_1."),
    (r"\.time_emb_proj\.", ".temb_proj."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.group_norm\.", ".norm."),
    (r"\.(to_q|query)\.", ".q."),
    (r"\.(to_k|key)\.", ".k."),
    (r"\.(to_v|value)\.", ".v."),
    (r"\.(to_out\.0|proj_attn)\.", ".proj_out."),
]
_ATTN_LINEAR = re.compile(r"\.attn(_1|\.\d+)\.(q|k|v|proj_out)\.weight$")


def convert_diffusers_state_dict(state_dict: Mapping[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """Rename a UNet2DModel state dict (current or pre-0.14 attention names) to ours; attention
    projections become 1×1 convolutions."""
    converted = {}
    for key, value in state_dict.items():
        new = key
        for pattern, replacement in _RENAMES:
            match = re.search(pattern, new)
            if match:
                if "{L}" in replacement:
                    replacement = replacement.replace("{L}", str(num_levels - 1 - int(match.group(1))))
                new = re.sub(pattern, replacement, new)
        if _ATTN_LINEAR.search(new) and value.dim() == 2:
            value = value[:, :, None, None]
        converted[new] = value
    return converted
