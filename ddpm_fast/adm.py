"""The ADM U-Net (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", §3;
Nichol & Dhariwal 2021 before it) and its noisy classifier, layer for layer as guided-diffusion's
`UNetModel` and `EncoderUNetModel(pool="attention")`, with their parameter names, so that the
.pt state dicts of guided-diffusion and improved-diffusion load key for key (DESIGN §2.7).

ResBlocks: GroupNorm(32, eps 1e-5) → SiLU → conv3×3, then either + dense(SiLU(emb)) before the
second GroupNorm → SiLU, or the scale-shift norm SiLU(GN(h)·(1 + scale) + shift) with (scale, shift)
= dense(SiLU(emb)) ("AdaGN", §3); dropout, zero-initialised conv3×3, a 1×1 shortcut when the width
changes. With resblock_updown the resolution changes inside a ResBlock (BigGAN's: average pool or
nearest ×2 between the first norm and conv, on the shortcut too); else a stride-2 conv3×3 down and
nearest ×2 then conv3×3 up. Multi-head self-attention at the listed downsample rates, with heads
counted (num_heads) or sized (num_head_channels), the 3C projections split into q/k/v and heads in
one of two orders (use_new_attention_order). The timestep embedding is [cos, sin] (not the DDPM
U-Net's [sin, cos]) and takes fractional timesteps.

Every GroupNorm + SiLU runs through the fused op and every attention through the attention op
(ddpm_fast/unet.py's _normalize and attention_residual, with the same `backend` switch).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoints
from .unet import UNet, _normalize, attention_for, attention_residual

GROUPS, EPS = 32, 1e-5  # guided-diffusion's normalization(): GroupNorm32(32, C), torch's default eps


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """guided-diffusion's sinusoidal embedding [cos(t·f_k), sin(t·f_k)], f_k = max_period^(−k/half),
    k < half = dim // 2 (a zero column for odd dim), in float32 for any real t."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(max_period) / half))
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    """guided-diffusion's ResBlock (its names: in_layers, emb_layers, out_layers, skip_connection);
    `updown` "up" or "down" resamples inside the block (resblock_updown)."""

    backend = "auto"  # set for every block by the model's backend

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int,
                 use_scale_shift_norm: bool, updown: str | None = None):
        super().__init__()
        self.use_scale_shift_norm, self.updown = use_scale_shift_norm, updown
        self.in_layers = nn.Sequential(nn.GroupNorm(GROUPS, channels, eps=EPS), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels * (
            2 if use_scale_shift_norm else 1)))
        self.out_layers = nn.Sequential(nn.GroupNorm(GROUPS, out_channels, eps=EPS), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Conv2d(channels, out_channels, 1) if out_channels != channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W]; emb [B, E], SiLU already applied (once for every block, by the model)."""
        h = _normalize(x, self.in_layers[0], self.backend)
        if self.updown is not None:
            h, x = _resample(h, self.updown), _resample(x, self.updown)
        h = self.in_layers[2](h)
        emb_out = self.emb_layers[1](emb)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = _normalize(h, self.out_layers[0], self.backend, scale=scale, shift=shift)  # AdaGN, their §3
        else:
            h = _normalize(h, self.out_layers[0], self.backend, add=emb_out)
        return self.skip_connection(x) + self.out_layers[3](self.out_layers[2](h))


def _resample(x: torch.Tensor, updown: str) -> torch.Tensor:
    # the parameter-free resampling of resblock_updown: nearest ×2 up, 2×2 average pool down
    return F.interpolate(x, scale_factor=2.0, mode="nearest") if updown == "up" else F.avg_pool2d(x, 2)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H·W positions with a residual (names: norm, qkv,
    proj_out; qkv and proj_out are 1×1 Conv1d as guided-diffusion's). The 3C projections split
    heads first, then q/k/v (QKVAttentionLegacy, improved-diffusion's only order: channel
    head·3d + {q,k,v}·d + j) or q/k/v first, then heads (QKVAttention, use_new_attention_order:
    channel {q,k,v}·C + head·d + j). Their scaling of q and k by d^(−1/4) each is the d^(−1/2) of
    the attention op."""

    backend = "auto"  # set for every block by the model's backend

    def __init__(self, channels: int, num_heads: int, use_new_attention_order: bool):
        super().__init__()
        self.num_heads, self.use_new_attention_order = num_heads, use_new_attention_order
        self.norm = nn.GroupNorm(GROUPS, channels, eps=EPS)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        heads, d = self.num_heads, C // self.num_heads
        order = (B, H * W, 3, heads, d) if self.use_new_attention_order else (B, H * W, heads, 3, d)
        qkv_dim = 2 if self.use_new_attention_order else 3  # where q/k/v sits in that view

        def split(qkv: torch.Tensor):  # [B, N, 3C] → q, k, v [B, heads, N, d], strided views
            return qkv.view(order).movedim(qkv_dim, 0).transpose(2, 3).unbind(0)

        h = _normalize(x, self.norm, self.backend, act=False)
        return attention_residual(x, h, self.qkv.weight.view(3 * C, C), self.qkv.bias, self.proj_out.weight.view(C, C),
                                  self.proj_out.bias, split, attention_for(self.backend, x.dtype))


class AttentionPool2d(nn.Module):
    """The classifier's head (CLIP's attention pool, as guided-diffusion adapts it): the mean
    token prepended to the H·W tokens, a learned positional embedding added, multi-head attention
    (q/k/v first, then heads) of that mean token over all of them, projected to the logits."""

    def __init__(self, spatial_dim: int, embed_dim: int, num_head_channels: int, output_dim: int):
        super().__init__()
        self.num_heads = embed_dim // num_head_channels
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spatial_dim ** 2 + 1) / embed_dim ** 0.5)
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim, 1)

    def forward(self, x: torch.Tensor, attend) -> torch.Tensor:
        B, C = x.shape[:2]
        tokens = x.flatten(2)
        tokens = torch.cat([tokens.mean(dim=-1, keepdim=True), tokens], dim=-1) + self.positional_embedding.to(x.dtype)
        if tokens.shape[-1] != self.positional_embedding.shape[-1]:
            raise ValueError(f"the attention pool was built for {self.positional_embedding.shape[-1] - 1} positions "
                             f"(image_size), got {tokens.shape[-1] - 1}")
        w, b = self.qkv_proj.weight.view(3 * C, C), self.qkv_proj.bias
        heads, d = self.num_heads, C // self.num_heads
        # only the mean token's output is read: its query alone, the keys and values of every token
        q = F.linear(tokens[:, :, 0], w[:C], b[:C]).view(B, heads, 1, d)
        k, v = F.conv1d(tokens, w[C:, :, None], b[C:]).view(B, 2, heads, d, -1).transpose(3, 4).unbind(1)
        return F.linear(attend(q, k, v).reshape(B, C), self.c_proj.weight[:, :, 0], self.c_proj.bias)


class TimestepSequential(nn.Sequential):
    """guided-diffusion's TimestepEmbedSequential: ResBlocks get (h, emb), other layers h."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ADMUNet(nn.Module):
    """ε_θ(x_t, t[, y]) of guided-diffusion's UNetModel, with its constructor arguments:
    x [B, in_channels, H, W] (H, W divisible by 2^(len(channel_mult) − 1)), t [B] timesteps as the
    network was trained on them (integers, or the rescaled reals of improved-diffusion's
    rescale_timesteps), y [B] labels in [0, num_classes) when class-conditional → [B, out_channels,
    H, W] (out_channels = 2·in_channels with a learned variance: ε then the variance channels).

    attention_resolutions are downsample rates (1 = full resolution), as UNetModel takes them;
    create_model's "32,16,8" are image sizes (ddpm_fast/adm_checkpoints.py converts). channel_mult
    may hold fractions (the 512×512 model's 0.5): each width is int(mult · model_channels).
    timestep_scale multiplies t first: 1000/T for the models improved-diffusion trained with
    rescale_timesteps (their presets set it), so a sampler passes the chain's own indices.
    `backend`: as UNet's ("auto", "reference", "torch", "cpu", "cuda", "triton")."""

    null_label = False  # label_emb has num_classes rows: no "no label" token

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: tuple[int, ...], dropout: float = 0.0,
                 channel_mult: tuple[float, ...] = (1, 2, 4, 8), num_classes: int | None = None,
                 num_heads: int = 1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False, timestep_scale: float = 1.0, backend: str = "auto"):
        super().__init__()
        if isinstance(timestep_scale, bool) or not isinstance(timestep_scale, (int, float)) or not (
                math.isfinite(timestep_scale) and timestep_scale > 0):
            raise ValueError(f"timestep_scale must be a finite number > 0, got {timestep_scale!r}")
        num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        _check_config(image_size=image_size, in_channels=in_channels, model_channels=model_channels,
                      out_channels=out_channels, num_res_blocks=num_res_blocks, dropout=dropout,
                      channel_mult=channel_mult, attention_resolutions=attention_resolutions, num_heads=num_heads,
                      num_head_channels=num_head_channels, num_heads_upsample=num_heads_upsample,
                      num_classes=num_classes)
        self.config = dict(image_size=image_size, in_channels=in_channels, model_channels=model_channels,
                           out_channels=out_channels, num_res_blocks=num_res_blocks,
                           attention_resolutions=list(attention_resolutions), dropout=dropout,
                           channel_mult=list(channel_mult), num_classes=num_classes, num_heads=num_heads,
                           num_head_channels=num_head_channels, num_heads_upsample=num_heads_upsample,
                           use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
                           use_new_attention_order=use_new_attention_order, timestep_scale=float(timestep_scale))
        self.in_channels, self.model_channels, self.num_classes = in_channels, model_channels, num_classes
        self.timestep_scale = float(timestep_scale)
        self.num_resolutions = len(channel_mult)
        encoder = _Encoder(self.config)
        self.time_embed, self.input_blocks, self.middle_block = encoder.time_embed, encoder.blocks, encoder.middle
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, encoder.emb_channels)

        ch, ds, skips = encoder.ch, encoder.ds, encoder.skip_channels
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [encoder.res_block(ch + skips.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(encoder.attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(encoder.res_block(ch, ch, "up") if resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(GROUPS, ch, eps=EPS), nn.SiLU(), nn.Conv2d(ch, out_channels, 3,
                                                                                          padding=1))
        self.backend = backend

    backend = UNet.backend  # sets every block's

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        t, y = UNet._check_inputs(self, x, timesteps, fractional=True), self._check_labels(x, y)
        if self.timestep_scale != 1.0:  # improved-diffusion's rescale_timesteps: t·1000/T, T the chain's length
            t = t * self.timestep_scale
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        emb = F.silu(emb)  # every ResBlock's emb_layers begins with SiLU: applied once here
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out[2](_normalize(h, self.out[0], self.backend))

    _check_labels = UNet._check_labels

    # -- checkpoints (ddpm_fast/checkpoints.py; guided-diffusion's flags: adm_checkpoints.py) ---

    save_pretrained = UNet.save_pretrained
    check_state_dict = UNet.check_state_dict
    load_checked = UNet.load_checked

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ADMUNet":
        """Our .safetensors file of this class, in eval mode (guided-diffusion's .pt: from_guided_diffusion)."""
        return checkpoints.load_safetensors(cls, path).eval()


class ADMClassifier(nn.Module):
    """log p_φ(y | x_t, t) up to a constant: guided-diffusion's EncoderUNetModel with
    pool="attention", as its create_classifier builds it — the ADM U-Net's encoder (time
    embedding, input blocks, middle block), GroupNorm + SiLU, the attention pool → [B, out_channels]
    logits. Arguments as ADMUNet's; num_head_channels (≥ 1) also sizes the pool's heads."""

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: tuple[int, ...], dropout: float = 0.0,
                 channel_mult: tuple[float, ...] = (1, 2, 4, 8), num_heads: int = 1, num_head_channels: int = 64,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False, backend: str = "auto"):
        super().__init__()
        _check_config(image_size=image_size, in_channels=in_channels, model_channels=model_channels,
                      out_channels=out_channels, num_res_blocks=num_res_blocks, dropout=dropout,
                      channel_mult=channel_mult, attention_resolutions=attention_resolutions, num_heads=num_heads,
                      num_head_channels=num_head_channels, num_heads_upsample=num_heads, num_classes=None)
        if num_head_channels < 1:
            raise ValueError(f"the attention pool sizes its heads by num_head_channels: expected an int >= 1, got "
                             f"{num_head_channels!r}")
        self.config = dict(image_size=image_size, in_channels=in_channels, model_channels=model_channels,
                           out_channels=out_channels, num_res_blocks=num_res_blocks,
                           attention_resolutions=list(attention_resolutions), dropout=dropout,
                           channel_mult=list(channel_mult), num_heads=num_heads, num_head_channels=num_head_channels,
                           use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
                           use_new_attention_order=use_new_attention_order)
        self.in_channels, self.model_channels = in_channels, model_channels
        self.num_resolutions = len(channel_mult)
        encoder = _Encoder(self.config)
        self.time_embed, self.input_blocks, self.middle_block = encoder.time_embed, encoder.blocks, encoder.middle
        if image_size % encoder.ds:
            raise ValueError(f"image_size {image_size} must be divisible by {encoder.ds} = 2^(len(channel_mult) - 1)")
        self.out = nn.Sequential(nn.GroupNorm(GROUPS, encoder.ch, eps=EPS), nn.SiLU(), AttentionPool2d(
            image_size // encoder.ds, encoder.ch, num_head_channels, out_channels))
        self.backend = backend

    backend = UNet.backend  # sets every block's

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        t = UNet._check_inputs(self, x, timesteps, fractional=True)
        emb = F.silu(self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype)))
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
        h = _normalize(self.middle_block(h, emb), self.out[0], self.backend)
        return self.out[2](h, attention_for(self.backend, x.dtype))

    save_pretrained = UNet.save_pretrained
    check_state_dict = UNet.check_state_dict
    load_checked = UNet.load_checked

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ADMClassifier":
        """Our .safetensors file of this class, in eval mode (guided-diffusion's .pt:
        classifier_from_guided_diffusion)."""
        return checkpoints.load_safetensors(cls, path).eval()


class _Encoder:
    """What ADMUNet and ADMClassifier share: the time embedding, the input blocks and the middle
    block built from a config, with the widths and downsample rate they end at."""

    def __init__(self, config: dict):
        self.config = c = config
        mc = c["model_channels"]
        self.emb_channels = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, self.emb_channels), nn.SiLU(),
                                        nn.Linear(self.emb_channels, self.emb_channels))
        ch = int(c["channel_mult"][0] * mc)
        self.blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(c["in_channels"], ch, 3, padding=1))])
        self.skip_channels, ds = [ch], 1
        for level, mult in enumerate(c["channel_mult"]):
            for _ in range(c["num_res_blocks"]):
                layers = [self.res_block(ch, int(mult * mc))]
                ch = int(mult * mc)
                if ds in c["attention_resolutions"]:
                    layers.append(self.attention(ch, c["num_heads"]))
                self.blocks.append(TimestepSequential(*layers))
                self.skip_channels.append(ch)
            if level != len(c["channel_mult"]) - 1:
                self.blocks.append(TimestepSequential(
                    self.res_block(ch, ch, "down") if c["resblock_updown"] else Downsample(ch)))
                self.skip_channels.append(ch)
                ds *= 2
        self.middle = TimestepSequential(self.res_block(ch, ch), self.attention(ch, c["num_heads"]),
                                         self.res_block(ch, ch))
        self.ch, self.ds = ch, ds

    def res_block(self, channels: int, out_channels: int, updown: str | None = None) -> ResBlock:
        return ResBlock(channels, self.emb_channels, self.config["dropout"], out_channels,
                        self.config["use_scale_shift_norm"], updown)

    def attention(self, channels: int, num_heads: int) -> AttentionBlock:
        """A block of num_heads heads, or of channels / num_head_channels where that is given."""
        head_channels = self.config["num_head_channels"]
        heads = num_heads if head_channels == -1 else channels // head_channels
        return AttentionBlock(channels, heads, self.config["use_new_attention_order"])


def _check_config(*, channel_mult, attention_resolutions, dropout, num_head_channels, num_heads, num_heads_upsample,
                  num_classes, model_channels, **sizes) -> None:
    """A ValueError naming the argument, for any configuration the networks cannot be built from."""
    for name, value in dict(sizes, model_channels=model_channels, num_heads=num_heads,
                            num_heads_upsample=num_heads_upsample).items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if (not isinstance(channel_mult, (tuple, list)) or not channel_mult
            or any(isinstance(m, bool) or not isinstance(m, (int, float)) or int(m * model_channels) < 1
                   for m in channel_mult)):
        raise ValueError(f"channel_mult must be a non-empty sequence of numbers with int(mult · model_channels) >= 1, "
                         f"got {channel_mult!r}")
    widths = [int(m * model_channels) for m in channel_mult]
    if any(w % GROUPS for w in widths):
        raise ValueError(f"every width int(mult · model_channels) = {widths} must be divisible by the {GROUPS} "
                         f"GroupNorm groups")
    if not isinstance(attention_resolutions, (tuple, list)) or any(
            isinstance(r, bool) or not isinstance(r, int) for r in attention_resolutions):
        raise ValueError(f"attention_resolutions must be a sequence of int downsample rates, got "
                         f"{attention_resolutions!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
    attended = sorted({w for level, w in enumerate(widths) if 2 ** level in attention_resolutions} | {widths[-1]})
    if num_head_channels == -1 and any(w % h for w in attended for h in (num_heads, num_heads_upsample)):
        raise ValueError(f"num_heads={num_heads} and num_heads_upsample={num_heads_upsample} must divide the width "
                         f"of every attention block {attended}")
    if num_head_channels != -1 and (isinstance(num_head_channels, bool) or not isinstance(num_head_channels, int)
                                    or num_head_channels < 1 or any(w % num_head_channels for w in attended)):
        raise ValueError(f"num_head_channels must be -1 (heads by num_heads) or an int >= 1 dividing the width of "
                         f"every attention block {attended}, got {num_head_channels!r}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int or None (unconditional), got {num_classes!r}")
