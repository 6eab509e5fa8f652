"""diffusers' attention blocks on ddpm_fast's ops: an attention processor with the fused
GroupNorm and ddpm_fast.ops.attention (head dims up to 512)."""
from __future__ import annotations

import torch

from ...ops import attention, group_norm_silu


class AttnProcessor:
    """A diffusers attention processor running ddpm_fast.ops.attention (head dims up to 512):

        unet2d.set_attn_processor(AttnProcessor())   # where the model class has it, else
        use_fast_attention(unet2d)

    The same steps as diffusers' AttnProcessor2_0 for self-attention blocks (group norm, q/k/v
    projections, output projection, residual, rescale); attention masks, cross-attention
    normalisation and spatial norms are refused rather than ignored."""

    def __init__(self, impl: str = "auto", precision: str = "ieee"):
        self.impl, self.precision = impl, precision

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if attention_mask is not None or getattr(attn, "spatial_norm", None) is not None:
            raise NotImplementedError("ddpm_fast AttnProcessor: attention masks and spatial norms are not supported")
        if encoder_hidden_states is not None and getattr(attn, "norm_cross", None):
            raise NotImplementedError("ddpm_fast AttnProcessor: cross-attention normalisation is not supported")
        residual = hidden_states
        shape = hidden_states.shape
        norm = attn.group_norm
        if norm is not None and hidden_states.dim() == 4 and norm.affine:  # the fused op, without SiLU
            hidden_states = group_norm_silu(hidden_states, norm.weight, norm.bias, norm.num_groups, norm.eps,
                                            act=False, impl=self.impl)
            norm = None
        if hidden_states.dim() == 4:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)  # [B, N, C]
        if norm is not None:
            hidden_states = norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        heads = attn.heads
        split = lambda t: t.unflatten(-1, (heads, t.shape[-1] // heads)).transpose(1, 2)  # noqa: E731
        query, key, value = split(query), split(key), split(value)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
        hidden_states = attention(query, key, value, scale=attn.scale, impl=self.impl, precision=self.precision)
        hidden_states = hidden_states.transpose(1, 2).flatten(2).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if len(shape) == 4:
            hidden_states = hidden_states.transpose(1, 2).reshape(shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def use_fast_attention(model, impl: str = "auto", precision: str = "ieee") -> int:
    """Route every diffusers Attention module inside `model` (a UNet2DModel, a pipeline's unet,
    ...) through AttnProcessor; returns how many were switched. Works whether or not the model
    class has set_attn_processor (UNet2DModel lost it in recent diffusers)."""
    processor = AttnProcessor(impl, precision)
    switched = 0
    for module in model.modules():
        if hasattr(module, "set_processor") and hasattr(module, "to_q"):
            module.set_processor(processor)
            switched += 1
    return switched
