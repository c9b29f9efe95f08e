"""The client's parameter gradients with a leaner second-order graph for 2-D convolutions.

Gradient matching differentiates the client's parameter gradients with respect to the images, so
every attack iteration is a double backward. PyTorch's double backward of a convolution's backward
(`_convolution_double_backward`) computes the second-order term for the weight whenever the
input-gradient path is live, whether or not that term is wanted; in an attack it never is (the
server's weights are fixed), so each convolution but the first costs one wasted convolution per
iteration: about 13 % of a ConvNet iteration on a CPU.

`ConvTaps` splits a convolution's two backward products into separate differentiable ops:
- the input gradient is a transposed convolution (`_ConvWithTransposedBackward`), whose own
  backward computes only the gradients asked for;
- the weight gradient is ATen's `convolution_backward` with only its weight output, taken from
  the gradient at the convolution's output (its double backward has no input-gradient term, so
  nothing is wasted).
The gradients are the same as autograd's (to float rounding; tested), and so is the graph they
carry, less the wasted term. Only plain autograd is tapped: torch.func transforms (batched
restarts) keep PyTorch's own convolution.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _ConvWithTransposedBackward(torch.autograd.Function):
    """conv2d(x, weight, bias) for fixed (detached) weight and bias, whose backward is the
    transposed convolution of the output gradient: the input gradient and nothing else."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
    ) -> torch.Tensor:
        out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(weight)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.output_padding = _output_padding(x.shape[-2:], out.shape[-2:], weight.shape[-2:], *ctx.conf[:3])
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv_transpose2d(
                grad_out, weight, None, stride, padding, ctx.output_padding, groups, dilation
            )
        return grad_x, None, None, None, None, None, None


def _output_padding(
    in_hw: torch.Size,
    out_hw: torch.Size,
    kernel: torch.Size,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    """The rows and columns a strided convolution dropped, which its transpose must restore."""
    pads = [
        i - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
        for i, o, k, s, p, d in zip(in_hw, out_hw, kernel, stride, padding, dilation, strict=True)
    ]
    return pads[0], pads[1]


@dataclass
class _Call:
    module: str  # the convolution's name in the model
    x: torch.Tensor  # its input
    x_version: int  # autograd's version counter of the input when it was recorded
    z: torch.Tensor  # its output
    weight: torch.Tensor  # detached
    has_bias: bool
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int


def tappable(module: nn.Module) -> bool:
    """Plain 2-D convolutions with zero padding given as numbers (what the tap reproduces)."""
    return type(module) is nn.Conv2d and module.padding_mode == "zeros" and isinstance(module.padding, tuple)


_recording = threading.local()  # .taps: the ConvTaps recording in this thread, if any


def _tapped_forward(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A tapped convolution's forward: PyTorch's own unless a `ConvTaps` that taps this module
    is recording in this thread."""
    taps: ConvTaps | None = getattr(_recording, "taps", None)
    name = taps.modules.get(module) if taps is not None else None
    if taps is None or name is None:
        return nn.Conv2d.forward(module, x)
    weight = module.weight.detach()
    bias = module.bias.detach() if module.bias is not None else None
    conf = (module.stride, module.padding, module.dilation, module.groups)
    z = _ConvWithTransposedBackward.apply(x, weight, bias, *conf)
    if not z.requires_grad:  # an input that does not depend on the images: a leaf
        z.requires_grad_()
    taps.calls.append(_Call(name, x, x._version, z, weight, bias is not None, *conf))  # type: ignore[arg-type]
    # the caller gets a copy: an in-place op after the convolution (torchvision's
    # ReLU(inplace=True)) must not change the tensor whose gradient is taken
    return z.clone()  # type: ignore[no-any-return]


class ConvTaps:
    """Taps the model's convolutions whose weight is among `params`.

    A tapped module's forward is PyTorch's own except while this object is `recording()`, so
    the model behaves as before for every other use, and several ConvTaps on one model (two
    objectives built on the attacker's copy) each see only their own recordings.
    """

    def __init__(self, model: nn.Module, params: Collection[str]) -> None:
        self.calls: list[_Call] = []
        self.modules: dict[nn.Module, str] = {}
        self.tapped: set[str] = set()
        for name, module in model.named_modules():
            if not (tappable(module) and f"{name}.weight" in params):
                continue
            patched = vars(module).get("forward")
            if patched is None:
                module.forward = types.MethodType(_tapped_forward, module)  # type: ignore[method-assign]
            elif getattr(patched, "__func__", None) is not _tapped_forward:
                continue  # someone else's forward: leave it to autograd
            self.modules[module] = name
            self.tapped.add(f"{name}.weight")
            if module.bias is not None:
                self.tapped.add(f"{name}.bias")

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        previous = getattr(_recording, "taps", None)
        self.calls.clear()
        _recording.taps = self
        try:
            yield
        finally:
            _recording.taps = previous

    def gradients(self, loss: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """d loss / d params with create_graph, for the forward pass just recorded.

        Untapped parameters (batch norm, linear layers) go through autograd as usual; a tapped
        convolution's weight gradient is built from the gradient at its output. A parameter the
        loss does not depend on gets zeros, as torch.func.grad gives.
        """
        calls, self.calls = self.calls, []
        rest = [n for n in params if n not in self.tapped]
        wrt = [params[n] for n in rest] + [c.z for c in calls]
        grads = torch.autograd.grad(loss, wrt, create_graph=True, allow_unused=True)
        out: dict[str, torch.Tensor] = {}
        for name, g in zip(rest, grads[: len(rest)], strict=True):
            out[name] = g if g is not None else torch.zeros_like(params[name])
        for call, gz in zip(calls, grads[len(rest) :], strict=True):
            if call.x._version != call.x_version:
                raise RuntimeError(
                    f"the input of convolution {call.module!r} was modified in place after the "
                    "convolution; its weight gradient cannot be taken from it"
                )
            if gz is None:
                continue
            self._accumulate(out, f"{call.module}.weight", _weight_gradient(call, gz))
            if call.has_bias:
                self._accumulate(out, f"{call.module}.bias", gz.sum((0, 2, 3)))
        for name in params:  # tapped but never reached by the loss
            if name not in out:
                out[name] = torch.zeros_like(params[name])
        return {n: out[n] for n in params}

    @staticmethod
    def _accumulate(out: dict[str, torch.Tensor], name: str, grad: torch.Tensor) -> None:
        out[name] = out[name] + grad if name in out else grad  # a convolution applied twice


def _weight_gradient(call: _Call, grad_z: torch.Tensor) -> torch.Tensor:
    """The convolution's weight gradient from its output gradient, differentiable in both the
    output gradient and the input."""
    grad_w: torch.Tensor = torch.ops.aten.convolution_backward(
        grad_z,
        call.x,
        call.weight,
        None,
        call.stride,
        call.padding,
        call.dilation,
        False,
        [0, 0],
        call.groups,
        [False, True, False],
    )[1]
    return grad_w
