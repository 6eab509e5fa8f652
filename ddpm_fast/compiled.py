"""UNet.compiled(): the U-Net's forward through torch.compile (DESIGN §5.5), our ops opaque in the
graph (torch.library custom ops with fake kernels, fullgraph=True), Inductor fusing what lies
between them (time embedding, residual adds, concatenations, pads).

On the CPU, inference (grad off) is compiled with Inductor's `freezing` by default: parameters
become constants, so convolution weights are pre-packed once for oneDNN instead of reordered
at every call. It is passed to this compile alone (torch.compile's `options`), never set
globally. A frozen graph would keep the weights it was compiled with, so every call compares
the parameters' storage and version counters (bumped by any in-place change, such as
load_state_dict) with those it froze, and recompiles after a change."""
from __future__ import annotations

import types

import torch
from torch import nn


def _forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return model(x, t, y)


class CompiledUNet(nn.Module):
    """model's forward, compiled: call it as the model, (x, t[, y]) -> ε. `mode` is torch.compile's;
    `freezing` None = on for CPU inference, off elsewhere (training needs parameters as inputs)."""

    def __init__(self, model: nn.Module, mode: str | None = None, freezing: bool | None = None):
        super().__init__()
        self.model, self.mode, self.freezing = model, mode, freezing
        # a code object of its own: dynamo caches compiled graphs per code object, so this
        # model's graphs can be dropped (after a weight change) without touching any other's
        self._code = _forward.__code__.replace()
        self._compiled = {}  # freezing on/off -> compiled function
        self._frozen_weights = None

    def _weights(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self.model.parameters())

    def _function(self, freeze: bool):
        if freeze not in self._compiled:
            options = {**torch._inductor.list_mode_options(self.mode or "default"), "freezing": freeze}
            function = types.FunctionType(self._code, _forward.__globals__, "compiled_unet_forward")
            self._compiled[freeze] = torch.compile(function, fullgraph=True, options=options)
        return self._compiled[freeze]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        # eagerly: their data-dependent checks would break the graph
        t, y = self.model._check_inputs(x, t), self.model._check_labels(x, y)
        freeze = self.freezing
        if freeze is None:
            freeze = x.device.type == "cpu" and not torch.is_grad_enabled()
        if freeze:
            weights = self._weights()
            if weights != self._frozen_weights:
                torch._C._dynamo.eval_frame.reset_code(self._code)  # drop the graphs frozen with the old weights
                self._frozen_weights = weights
        return self._function(bool(freeze))(self.model, x, t, y)
