"""The DDPM U-Net (Ho et al. 2020, appendix B), layer for layer as in the original
TensorFlow code (diffusion_tf/models/unet.py), with the parameter names of its PyTorch port
(pesser/pytorch_diffusion) so that port's state dicts load as they are.

ResBlocks: GroupNorm(32, eps 1e-6) → swish → conv3×3, + dense(swish(temb)), GroupNorm →
swish → dropout → conv3×3, 1×1 shortcut when the width changes. Single-head self-attention
at the listed resolutions; stride-2 3×3 conv downsampling with (0, 1, 0, 1) padding (TF's
"SAME"); nearest ×2 upsampling then conv3×3.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoints, ops
from .contract import BACKENDS, check_choice
from .ops.conv2d import PackedConv2d
from .reference.attention import attention as reference_attention
from .reference.group_norm_silu import group_norm_silu as reference_group_norm_silu

if TYPE_CHECKING:
    from .compiled import CompiledUNet


def get_timestep_embedding(timesteps: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """Sinusoidal embedding [sin, cos] with frequencies 10000^(−k/(half−1)), in float32 whatever
    the model dtype (timesteps up to 999 lose their low bits in bf16)."""
    half = embedding_dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=timesteps.device)
                      * -(math.log(10000) / (half - 1)))
    args = timesteps.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if embedding_dim % 2 else emb


# UNet.backend: the ops' backends (contract.BACKENDS), plus "torch" — PyTorch's own ops as anyone
# would write them (F.group_norm, F.silu, scaled_dot_product_attention): the fair eager baseline,
# where "reference" is the float64-checkable maths written out (multi-pass, slower than PyTorch's).
UNET_BACKENDS = BACKENDS + ("torch",)


def _normalize(x: torch.Tensor, norm: nn.GroupNorm, backend: str, add: torch.Tensor | None = None,
               act: bool = True, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
    """The original's nonlinearity(normalize(x + add)), with the ADM ResBlock's scale-shift
    (·(1 + scale) + shift, [B, C] each) before the nonlinearity: the fused group_norm_silu op
    (impl=backend, "auto" being the op's own choice), the unfused reference maths for backend
    "reference", or PyTorch's F.group_norm and F.silu for backend "torch"."""
    if backend == "reference":
        return reference_group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, add=add, act=act,
                                         scale=scale, shift=shift)
    if backend == "torch":
        h = F.group_norm(x if add is None else x + add[:, :, None, None], norm.num_groups, norm.weight, norm.bias,
                         norm.eps)
        if scale is not None or shift is not None:
            h = h * (1 + (0 if scale is None else scale[:, :, None, None])) + (0 if shift is None else
                                                                              shift[:, :, None, None])
        return F.silu(h) if act else h
    return ops.group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, add=add, act=act, impl=backend,
                               scale=scale, shift=shift)


def _variance_scaling_init_(module: nn.Module, scale: float = 1.0) -> None:
    # The original's default_init: variance scaling, fan_avg, uniform; a scale of 1e-10 stands
    # in for its "init_scale=0." on the last layer of each residual branch.
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(module.weight)
    bound = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2))
    nn.init.uniform_(module.weight, -bound, bound)
    nn.init.zeros_(module.bias)


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0,
          scale: float = 1.0) -> PackedConv2d:
    conv = PackedConv2d(in_ch, out_ch, kernel, stride, padding)
    _variance_scaling_init_(conv, scale)
    return conv


def _dense(in_features: int, out_features: int) -> nn.Linear:
    dense = nn.Linear(in_features, out_features)
    _variance_scaling_init_(dense)
    return dense


class ResnetBlock(nn.Module):
    backend = "auto"  # set for every block by UNet.backend

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float, num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels, eps=1e-6)
        self.conv1 = _conv(in_channels, out_channels, 3, padding=1)
        self.temb_proj = _dense(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(num_groups, out_channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv(out_channels, out_channels, 3, padding=1, scale=1e-10)
        self.nin_shortcut = _conv(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_normalize(x, self.norm1, self.backend))
        h = self.dropout(_normalize(h, self.norm2, self.backend, add=self.temb_proj(F.silu(temb))))
        # the skip connection added by the convolution itself (oneDNN's binary post-op, DESIGN §5.8)
        return self.conv2(h, add=x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    backend = "auto"  # set for every block by UNet.backend

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, channels, eps=1e-6)
        self.q = _conv(channels, channels, 1)
        self.k = _conv(channels, channels, 1)
        self.v = _conv(channels, channels, 1)
        self.proj_out = _conv(channels, channels, 1, scale=1e-10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _normalize(x, self.norm, self.backend, act=False)
        attend, (B, C, H, W) = attention_for(self.backend, x.dtype), x.shape
        if self.backend in ("reference", "torch") or x.dtype == torch.float64:
            # single head over the H·W positions: [B, 1, N, C]
            q, k, v = (proj(h).reshape(B, 1, C, H * W).transpose(2, 3) for proj in (self.q, self.k, self.v))
            return x + self.proj_out(attend(q, k, v).transpose(2, 3).reshape(B, C, H, W))
        weight = torch.cat([self.q.weight, self.k.weight, self.v.weight]).view(3 * C, C)
        bias = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        return attention_residual(x, h, weight, bias, self.proj_out.weight.view(C, C), self.proj_out.bias,
                                  lambda qkv: qkv.view(B, H * W, 3, 1, C).permute(2, 0, 3, 1, 4), attend)


def attention_for(backend: str, dtype: torch.dtype):
    """attend(q, k, v) over [B, heads, N, d] as `backend` names it: PyTorch's SDPA ("torch"), the
    materialised maths ("reference", and float64, which the op has no kernel for), else the fused
    op (Triton's kernel forced by "triton"; "auto", "cpu" and "cuda" leave the choice to the op)."""
    if backend == "torch":
        return F.scaled_dot_product_attention
    if backend == "reference" or dtype == torch.float64:
        return reference_attention
    return _fused_attention if backend != "triton" else lambda q, k, v: ops.attention(q, k, v, impl="triton")


def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # The op's choice, but SDPA on CUDA tensors where autograd records (training, a classifier's
    # gradient for guidance): the op's choice there, Triton's kernel, has no backward. Sampling
    # runs under inference mode and keeps the kernel; on CPU tensors the op's choice is SDPA.
    if q.is_cuda and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return F.scaled_dot_product_attention(q, k, v)
    return ops.attention(q, k, v)


def attention_residual(x: torch.Tensor, h: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor,
                       proj_weight: torch.Tensor, proj_bias: torch.Tensor, split, attend) -> torch.Tensor:
    """x + P·attention(q, k, v) + p, with q, k, v = split(h·Wᵀ + b) over the H·W tokens.

    qkv_weight [3C, C], qkv_bias [3C], proj_weight [C, C], proj_bias [C]; split: the token-major
    [B, N, 3C] projections → (q, k, v), each [B, heads, N, d] (how the 3C channels divide into
    q/k/v and heads is the model's), the output's channel being head·d + j. q, k, v come from one
    batched GEMM over the tokens (h read through strides in either layout), read by the kernel
    through strides; the output projection adds the residual inside the GEMM (baddbmm, beta = 1)
    and writes x's own layout, token-major (channels_last) or channel-major (NCHW), so that the
    next convolution needs no layout conversion."""
    B, C, H, W = x.shape
    qkv = torch.baddbmm(qkv_bias, h.flatten(2).transpose(1, 2), qkv_weight.t().expand(B, C, 3 * C))  # [B, N, 3C]
    o = attend(*split(qkv)).transpose(1, 2).reshape(B, H * W, C)  # [B, N, heads, d] → [B, N, C]
    if x.is_contiguous(memory_format=torch.channels_last):  # [B, N, C] = x + o·Pᵀ
        out = torch.baddbmm(x.flatten(2).transpose(1, 2), o, proj_weight.t().expand(B, C, C))
        return out.add_(proj_bias).transpose(1, 2).view(B, C, H, W)
    out = torch.baddbmm(x.flatten(2), proj_weight.expand(B, C, C), o.transpose(1, 2))  # [B, C, N] = x + P·oᵀ
    return out.add_(proj_bias[:, None]).view(B, C, H, W)


def _first_few(items: list[str], few: int = 5) -> str:
    return f"{items[:few]}" + (f" and {len(items) - few} more" if len(items) > few else "")


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


CIFAR10 = dict(ch=128, out_ch=3, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1,
               in_channels=3, resolution=32)
DIGITS = dict(ch=32, out_ch=1, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1,
              in_channels=1, resolution=16, num_groups=8)
SMALL = dict(ch=32, out_ch=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, in_channels=1,
             resolution=16)


class UNet(nn.Module):
    """ε_θ(x_t, t): x [B, in_channels, H, W], t [B] 0-based integer timesteps → [B, out_ch, H, W].

    num_classes=K makes it class-conditional, ε_θ(x_t, t, y) (DESIGN §2.5): y [B] int64 labels in
    [0, K], where K is the "no label" token ∅ that classifier-free guidance trains and samples with.

    backend picks the implementation of the fusable pieces (GroupNorm+SiLU, attention):
    "reference" runs the plain maths written out (the float64 reference); "torch" PyTorch's own
    ops (F.group_norm, F.silu, scaled_dot_product_attention); "auto" the fastest op of ours for
    the tensors' device, or one of them named ("cpu", "cuda", "triton")."""

    def __init__(self, ch: int = 128, out_ch: int = 3, ch_mult: tuple[int, ...] = (1, 2, 2, 2),
                 num_res_blocks: int = 2, attn_resolutions: tuple[int, ...] = (16,), dropout: float = 0.1,
                 in_channels: int = 3, resolution: int = 32, num_groups: int = 32, backend: str = "auto",
                 num_classes: int | None = None):
        super().__init__()
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        for name, value in (("ch", ch), ("out_ch", out_ch), ("num_res_blocks", num_res_blocks),
                            ("in_channels", in_channels), ("resolution", resolution), ("num_groups", num_groups)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not ch_mult or any(not isinstance(m, int) or m < 1 for m in ch_mult):
            raise ValueError(f"ch_mult must be a non-empty tuple of positive ints, got {ch_mult!r}")
        if any(ch * m % num_groups for m in ch_mult):
            raise ValueError(f"every width ch * ch_mult = {[ch * m for m in ch_mult]} must be divisible by num_groups={num_groups}")
        if resolution % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"resolution {resolution} must be divisible by 2^(len(ch_mult) - 1) = {2 ** (len(ch_mult) - 1)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                                        or num_classes < 1):
            raise ValueError(f"num_classes must be a positive int or None (unconditional), got {num_classes!r}")
        self.config = dict(ch=ch, out_ch=out_ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                           attn_resolutions=list(attn_resolutions), dropout=dropout, in_channels=in_channels,
                           resolution=resolution, num_groups=num_groups)
        if num_classes is not None:  # only then: unconditional configs stay as they were saved before
            self.config["num_classes"] = num_classes
        self.num_classes = num_classes
        self.ch, self.in_channels, self.resolution = ch, in_channels, resolution
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        temb_ch = 4 * ch
        block = lambda c_in, c_out: ResnetBlock(c_in, c_out, temb_ch, dropout, num_groups)  # noqa: E731

        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([_dense(ch, temb_ch), _dense(temb_ch, temb_ch)])
        # one learned vector per class and one more, row K, for ∅ (guided-diffusion's label_emb)
        self.label_emb = nn.Embedding(num_classes + 1, temb_ch) if num_classes is not None else None
        self.conv_in = _conv(in_channels, ch, 3, padding=1)

        in_ch_mult, curr_res, block_in = (1,) + ch_mult, resolution, ch
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            down = nn.Module()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                down.block.append(block(block_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    down.attn.append(AttnBlock(block_in, num_groups))
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = block(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in, num_groups)
        self.mid.block_2 = block(block_in, block_in)

        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for i_block in range(num_res_blocks + 1):
                skip_in = ch * (in_ch_mult[i_level] if i_block == num_res_blocks else ch_mult[i_level])
                up.block.append(block(block_in + skip_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    up.attn.append(AttnBlock(block_in, num_groups))
            if i_level != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            self.up.insert(0, up)

        self.norm_out = nn.GroupNorm(num_groups, block_in, eps=1e-6)
        self.conv_out = _conv(block_in, out_ch, 3, padding=1, scale=1e-10)
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        check_choice("backend", value, UNET_BACKENDS)
        self._backend = value
        for module in self.modules():  # every block that names one (a class attribute: ResnetBlock, AttnBlock, …)
            if module is not self and isinstance(getattr(type(module), "backend", None), str):
                module.backend = value
            if isinstance(module, PackedConv2d):  # the baselines keep F.conv2d; ours packs where faster
                module.impl = "torch" if value in ("reference", "torch") else "auto"

    # -- presets: the architectures the package ships, trains and tests ----------------------

    @classmethod
    def ddpm_cifar10(cls, **overrides) -> "UNet":
        """The paper's CIFAR-10 network (35,746,307 parameters)."""
        return cls(**{**CIFAR10, **overrides})

    @classmethod
    def digits(cls, **overrides) -> "UNet":
        """The bundled digits model's network (16×16 grey digits), `ddpm-fast train`'s default."""
        return cls(**{**DIGITS, **overrides})

    @classmethod
    def small(cls, **overrides) -> "UNet":
        """A small 16×16 grey network for demos and tests (`--model random-small`)."""
        return cls(**{**SMALL, **overrides})

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, fractional: bool = False) -> torch.Tensor:
        """t as a [B] tensor on x's device: integer timesteps >= 0, or any real ones >= 0 where the
        network takes `fractional` timesteps (the ADM networks: improved-diffusion rescales t)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        factor = 2 ** (self.num_resolutions - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"H and W must be divisible by {factor}, got {tuple(x.shape[2:])}")
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be a scalar or have shape [B] = [{x.shape[0]}], got {tuple(t.shape)}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError("t must be finite")
        if t.dtype.is_floating_point and not fractional or t.dtype == torch.bool or t.is_complex():
            kind = "real timesteps" if fractional else "integer timesteps (0-based)"
            raise TypeError(f"t must hold {kind}, got {t.dtype}")
        # on a GPU this would cost a sync per call; a compiled forward checks before the graph (compiled.py)
        if t.device.type == "cpu" and t.numel() and not torch.compiler.is_compiling() and t.min().item() < 0:
            raise ValueError(f"t must hold timesteps >= 0, got {t.min().item()}")
        return t

    # whether label num_classes is the "no label" token ∅ (classifier-free guidance, DESIGN §2.5)
    null_label = True

    def _check_labels(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor | None:
        if self.num_classes is None:
            if y is not None:
                raise ValueError(f"y given to an unconditional {type(self).__name__} (num_classes=None): expected no "
                                 f"labels, got a tensor of shape {tuple(torch.as_tensor(y).shape)}")
            return None
        top = self.num_classes if self.null_label else self.num_classes - 1
        labels = f"[0, {top}]" + (f" ({top} = no label)" if self.null_label else "")
        if y is None:
            raise ValueError(f"this {type(self).__name__} is class-conditional (num_classes={self.num_classes}): "
                             f"expected labels y [B] in {labels}, got none")
        y = torch.as_tensor(y, device=x.device)
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
            raise TypeError(f"y must hold integer class labels, got {y.dtype}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must have shape [B] = [{x.shape[0]}], got {tuple(y.shape)}")
        if y.device.type == "cpu" and y.numel() and not 0 <= int(y.min()) <= int(y.max()) <= top:
            raise ValueError(f"y must hold labels in {labels}, got [{int(y.min())}, {int(y.max())}]")
        return y.long()  # (on a GPU the range check would cost a sync per call)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        t, y = self._check_inputs(x, t), self._check_labels(x, y)
        temb = get_timestep_embedding(t, self.ch).to(x.dtype)
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))
        if y is not None:  # the class enters every ResBlock with the time: emb(t) + emb(y)
            temb = temb + self.label_emb(y)

        hs = [self.conv_in(x)]
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](hs[-1], temb)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
                hs.append(h)
            if i_level != self.num_resolutions - 1:
                hs.append(down.downsample(hs[-1]))

        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)

        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](torch.cat([h, hs.pop()], dim=1), temb)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        out = self.conv_out(_normalize(h, self.norm_out, self.backend))
        # the packed convolutions write channels_last: the output comes back in x's layout
        return out.contiguous() if x.is_contiguous() and not out.is_contiguous() else out

    def compiled(self, mode: str | None = None, freezing: bool | None = None) -> "CompiledUNet":
        """This network's forward through torch.compile, our ops opaque in the graph, as a module
        called like this one (ddpm_fast/compiled.py). mode: torch.compile's; freezing (None: on
        for CPU inference) pre-packs the weights and recompiles when they change."""
        from .compiled import CompiledUNet
        return CompiledUNet(self, mode, freezing)

    # -- checkpoints (ddpm_fast/checkpoints.py) ----------------------------------------------

    def save_pretrained(self, path: str | Path, overwrite: bool = True) -> bool:
        """Write the weights as safetensors with the constructor arguments and the sha256 of the
        tensor data in its metadata. overwrite=False keeps an identical file and refuses a
        different one (returns whether it wrote)."""
        return checkpoints.save_pretrained(self, path, overwrite)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, config: dict | None = None) -> "UNet":
        """Load a bundled model by name ("digits"), our .safetensors file, a diffusers
        UNet2DModel folder, or a .pt/.pth/.ckpt state dict in this class's (pesser/
        pytorch_diffusion's) names — read with torch.load(weights_only=True), never
        unpickling code; `config` gives its constructor arguments unless the file holds
        {"config": ..., "state_dict": ...}."""
        return checkpoints.load_pretrained(cls, name_or_path, config)

    @classmethod
    def from_diffusers(cls, model) -> "UNet":
        """This network with the weights of a diffusers UNet2DModel instance, in its dtype."""
        return checkpoints.from_diffusers(cls, model)

    def check_state_dict(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Raise, in one line, unless state_dict fits this network (works on the meta device too):
        the first key (in the network's order) that is missing or mis-shaped, else the first
        unexpected one, then the counts and the first few of each kind."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = sorted(set(state_dict) - set(own))
        misshaped = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(state_dict[k].shape)}"
                     for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
        if missing or unexpected or misshaped:
            differing = [k for k in own if k not in state_dict or state_dict[k].shape != own[k].shape]
            if differing:
                key = differing[0]
                got = f"got {tuple(state_dict[key].shape)}" if key in state_dict else "missing"
                first = f"key {key!r} expected {tuple(own[key].shape)}, {got}"
            else:
                first = f"unexpected key {unexpected[0]!r}"
            raise ValueError(f"{source} does not match {type(self).__name__}({self.config}): first difference: "
                             f"{first}; missing keys {_first_few(sorted(missing))}, unexpected keys "
                             f"{_first_few(unexpected)}, mismatched shapes {_first_few(sorted(misshaped))}")

    def load_checked(self, state_dict: dict[str, torch.Tensor], source: str) -> "UNet":
        """load_state_dict that names every missing, unexpected or mis-shaped key of `source`."""
        self.check_state_dict(state_dict, source)
        self.load_state_dict(state_dict)
        return self

