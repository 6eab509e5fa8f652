"""Where one forward of ours spends its time on the CPU (torch.profiler, self time per op), for
the convolution report's misses: the share the convolutions take bounds what packing them can
give, and the rest is what stands in the way."""
from __future__ import annotations

import torch

CONV_OPS = ("mkldnn::_convolution_pointwise", "aten::mkldnn_convolution", "aten::convolution",
            "aten::_convolution", "aten::thnn_conv2d", "aten::_slow_conv2d_forward")


def profile(model, batch: int, top: int = 8) -> dict:
    """Self CPU time of one forward (after a warm-up one), in total, in convolutions, and its top ops."""
    x = torch.randn(batch, model.in_channels, model.resolution, model.resolution)
    t = torch.full((batch,), 500)
    with torch.inference_mode():
        model(x, t)
        with torch.profiler.profile() as prof:
            model(x, t)
    ops = sorted(((e.key, e.self_cpu_time_total) for e in prof.key_averages()), key=lambda kv: -kv[1])
    total = sum(us for _, us in ops)
    conv = sum(us for name, us in ops if name in CONV_OPS)
    return dict(total_ms=total / 1e3, conv_share=conv / total, top=[(name, us / total) for name, us in ops[:top]])


def lines(name: str, found: dict) -> list[str]:
    top = ", ".join(f"`{op}` {share:.1%}" for op, share in found["top"])
    return [f"- {name}: one forward {found['total_ms']:.1f} ms of self CPU time under the profiler, "
            f"convolutions {found['conv_share']:.1%}; the top ops: {top}."]
