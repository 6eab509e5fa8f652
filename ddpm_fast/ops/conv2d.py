"""conv2d: the U-Net's convolutions on the CPU with their weights pre-packed for oneDNN (DESIGN §5.8).

Two plans run a convolution:
  "torch"   F.conv2d on x as it comes (NCHW or channels_last): oneDNN reorders the weight on
            every call. The GPU's path (cuDNN), autograd's, torch.compile's and every dtype's
            but float32.
  "packed"  the weight reordered once for oneDNN for this input shape
            (torch.ops.mkldnn._reorder_convolution_weight) and reused while the weight stays the
            same; run by torch.ops.mkldnn._convolution_pointwise with the bias folded in and the
            residual add as its binary post-op. It reads x in either layout and writes
            channels_last, so the layers after it stay channels_last.
impl="auto" takes, per input shape and layout, the faster of the two as measured on this
machine once per process (_conv2d_plan.py).

A packed weight is stamped with the parameter's version counter, data pointer, dtype and
device: an optimiser step, load_state_dict, .to() or an in-place edit changes the stamp and
the next call packs again; it is never used stale.
"""
from __future__ import annotations

import functools
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..contract import check_choice
from . import _conv2d_plan

IMPLS = ("auto",) + _conv2d_plan.PLANS
# The private oneDNN ops the packed plan calls (same schemas on torch 2.11 to 2.14).
REQUIRED_OPS = ("_reorder_convolution_weight", "_convolution_pointwise")

# The residual add as the convolution's binary post-op from torch 2.14; before it (seen on 2.11)
# the op copies a channels_last `other` to NCHW first, a layout copy of every residual, so there
# the add follows the packed convolution, in place on its fresh output.
FUSED_ADD = torch.torch_version.TorchVersion(torch.__version__) >= (2, 14)

# conv module → (weight stamp, {input shape: packed weight}, the weight packed). Keyed by the module, weakly: a
# deleted model takes its packed weights with it, and the module itself holds no opaque tensor
# (deepcopy, pickling and state dicts never see one).
_packs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@functools.cache
def packing_available() -> bool:
    """Whether this torch has oneDNN and the private ops of the packed plan; warns once if not."""
    missing = [name for name in REQUIRED_OPS if not hasattr(torch.ops.mkldnn, name)]
    if not missing and not hasattr(torch.ops.mkldnn._convolution_pointwise, "binary"):
        missing.append("_convolution_pointwise.binary")
    if not torch.backends.mkldnn.is_available():
        reason = "this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    elif missing:
        reason = f"torch {torch.__version__} has no torch.ops.mkldnn.{', '.join(missing)}"
    else:
        return True
    warnings.warn(f"ddpm_fast.ops.conv2d: {reason}; the convolutions run through F.conv2d, unpacked",
                  RuntimeWarning, stacklevel=2)
    return False


def conv2d(conv: nn.Conv2d, x: torch.Tensor, add: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """conv(x) + add: the nn.Conv2d `conv` applied to x [B, C_in, H, W], then the residual `add`
    (None, or a tensor of the output's shape) added. impl: "auto" (the faster plan measured for
    this shape where the packed plan applies, else "torch"), "torch" or "packed" (DESIGN §5.8)."""
    check_choice("conv2d: impl", impl, IMPLS)
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv2d: expected an nn.Conv2d, got {type(conv).__name__}")
    if x.dim() != 4 or x.shape[1] != conv.in_channels:
        raise ValueError(f"conv2d: x must be [B, {conv.in_channels}, H, W], got {tuple(x.shape)}")
    if add is not None and add.shape != _output_shape(conv, x):
        raise ValueError(f"conv2d: add must have the output's shape {_output_shape(conv, x)}, got {tuple(add.shape)}")
    if impl == "torch" or not _packable(conv, x, add):
        return run("torch", conv, x, add)
    if impl == "auto":
        impl = _conv2d_plan.choose(conv, x, add, run)
    return run(impl, conv, x, add)


def run(plan: str, conv: nn.Conv2d, x: torch.Tensor, add: torch.Tensor | None) -> torch.Tensor:
    """One plan of conv2d, with no choosing: the calibration times each through this."""
    if plan == "torch":
        out = conv._conv_forward(x, conv.weight, conv.bias)
        return out if add is None else out.add_(add)  # the conv's fresh output: x + h as h + x, the same sum
    if not _layout_known(x):  # strided views: the packed op wants a dense input
        x = x.contiguous(memory_format=torch.channels_last)
    args = (_packed_weight(conv, x.shape), conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation),
            conv.groups)
    if add is None or not FUSED_ADD:
        out = torch.ops.mkldnn._convolution_pointwise(x, *args, "none", [], None)
        return out if add is None else out.add_(add)
    if not _layout_known(add):
        add = add.contiguous(memory_format=torch.channels_last)
    return torch.ops.mkldnn._convolution_pointwise.binary(x, add, *args, "add", None, None, [], None)


def _packed_weight(conv: nn.Conv2d, shape: torch.Size) -> torch.Tensor:
    weight = conv.weight
    stamp = (weight._version, weight.data_ptr(), weight.dtype, weight.device)
    entry = _packs.get(conv)
    if entry is None or entry[0] != stamp:  # new weights (or none packed yet): every shape packs again
        # the entry holds the packed storage (an alias): a weight given new storage (.to(), .data = …)
        # can never reuse its address, with its version unchanged, and pass for it
        entry = _packs[conv] = (stamp, {}, weight.detach())
    packed = entry[1].get(shape)
    if packed is None:
        packed = entry[1][shape] = torch.ops.mkldnn._reorder_convolution_weight(
            weight.detach(), list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, list(shape))
    return packed


def _packable(conv: nn.Conv2d, x: torch.Tensor, add: torch.Tensor | None) -> bool:
    """Whether the packed plan covers this call: float32 CPU inference on a zero-padded conv."""
    tensors = [t for t in (x, conv.weight, conv.bias, add) if t is not None]
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))  # autograd: "torch"
            and not torch.compiler.is_compiling()  # Inductor's freezing packs compiled graphs itself
            and not conv.weight.is_inference()  # no version counter to stamp
            and packing_available())


def _layout_known(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _output_shape(conv: nn.Conv2d, x: torch.Tensor) -> tuple[int, ...]:
    if isinstance(conv.padding, str):  # "same" / "valid": F.conv2d's own rule, on the meta device
        probe = F.conv2d(x.new_empty((1,) + tuple(x.shape[1:]), device="meta"), conv.weight.to("meta"), None,
                         conv.stride, conv.padding, conv.dilation, conv.groups)
        return (x.shape[0], *probe.shape[1:])
    size = [(n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip(x.shape[2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride)]
    return (x.shape[0], conv.out_channels, *size)


class PackedConv2d(nn.Conv2d):
    """nn.Conv2d through ops.conv2d, forward(x, add=None) = conv(x) + add. The U-Net builds its
    convolutions as these; accelerate() re-classes a diffusers model's nn.Conv2d to it (the
    parameters and state-dict keys unchanged). impl: ops.conv2d's, set by the model's backend."""
    impl = "auto"

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        return conv2d(self, x, add, self.impl)
