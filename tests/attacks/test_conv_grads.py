"""The convolutions' split backward (service.attacks.conv_grads) gives autograd's gradients and
second-order gradients, on the registry's architectures and on the awkward cases."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from service.attacks.conv_grads import ConvTaps, tappable
from service.models import MODELS, build_model
from service.specs import DataSpec, ModelSpec

Grads = tuple[list[torch.Tensor], torch.Tensor]


def _autograd_way(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Grads:
    """(parameter gradients, d/dx of their squared norm) by plain autograd."""
    reference = copy.deepcopy(model)
    xr = x.clone().requires_grad_()
    loss = nn.functional.cross_entropy(reference(xr), y)
    params = list(reference.parameters())
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    grads = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True))
    (gx,) = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), xr)
    return [g.detach() for g in grads], gx


def _tapped_way(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[Grads, ConvTaps]:
    """The same through the taps, as the attack objective takes them."""
    tapped_model = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    taps = ConvTaps(tapped_model, names)
    xr = x.clone().requires_grad_()
    params = {n: p.detach().requires_grad_() for n, p in tapped_model.named_parameters()}
    with taps.recording():
        loss = nn.functional.cross_entropy(functional_call(tapped_model, params, (xr,)), y)
    grads = taps.gradients(loss, params)
    (gx,) = torch.autograd.grad(sum(g.pow(2).sum() for g in grads.values()), xr)
    return ([grads[n].detach() for n in names], gx), taps


def _reference_and_tapped(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[Grads, Grads, ConvTaps]:
    tapped, taps = _tapped_way(model, x, y)
    return _autograd_way(model, x, y), tapped, taps


def _assert_same(a: Grads, b: Grads) -> None:
    for ga, gb in zip(a[0], b[0], strict=True):
        torch.testing.assert_close(gb, ga, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b[1], a[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("arch", "knobs"),
    [
        ("lenet", {}),  # 5x5 stride-2 convolutions
        ("igconvnet", {"width": 4}),
        ("resnet18", {"stem": "cifar"}),  # stride-2 3x3 and 1x1 downsampling convolutions
        ("resnet18", {"stem": "imagenet"}),  # 7x7 stride-2 stem, padding 3
        ("vgg11", {}),
        ("googlenet", {}),
    ],
)
def test_tapped_gradients_equal_autograds(arch: str, knobs: dict) -> None:
    side = max(32, MODELS.get(arch).min_size)
    spec = ModelSpec(arch=arch, knobs=knobs, init_seed=0)  # type: ignore[arg-type]
    model = build_model(spec, DataSpec(shape=(3, side, side), num_classes=10)).double().eval()
    torch.manual_seed(1)
    x, y = torch.randn(2, 3, side, side, dtype=torch.float64), torch.tensor([1, 4])
    reference, tapped, taps = _reference_and_tapped(model, x, y)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(taps.tapped) >= len(convs) > 0  # every convolution is tapped (weight, maybe bias)
    _assert_same(reference, tapped)


@pytest.mark.parametrize("side", [9, 10, 11])
def test_strided_convolutions_with_every_remainder(side: int) -> None:
    """A stride-3 convolution drops 0, 1 or 2 rows; the transposed backward restores them."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=1, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 4, 4, stride=3, padding=1, dilation=1),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, stride=1, padding=2, dilation=2, groups=2, bias=False),
        nn.Flatten(),
        nn.LazyLinear(5),
    ).double()
    x, y = torch.randn(3, 2, side, side, dtype=torch.float64), torch.tensor([0, 2, 4])
    model(x)  # materialise the lazy layer
    reference, tapped, _ = _reference_and_tapped(model, x, y)
    _assert_same(reference, tapped)


class _Shared(nn.Module):
    """One convolution applied twice, and one whose output the loss never sees."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.unused = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.unused(x)
        h = torch.tanh(self.conv(torch.tanh(self.conv(x))))
        return self.head(h.flatten(1))


def test_shared_and_unused_convolutions() -> None:
    torch.manual_seed(0)
    model = _Shared().double()
    x, y = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.tensor([1, 3])
    reference, tapped, _ = _reference_and_tapped(model, x, y)
    # the convolution whose output is discarded gets zeros, as torch.func.grad gives
    names = [n for n, _ in model.named_parameters()]
    assert all(float(tapped[0][names.index(n)].abs().sum()) == 0 for n in ("unused.weight", "unused.bias"))
    _assert_same(reference, tapped)


def test_outside_recording_a_tapped_model_is_the_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 2))
    x = torch.randn(2, 3, 4, 4)
    before = model(x)
    taps = ConvTaps(model, [n for n, _ in model.named_parameters()])
    after = model(x)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert not taps.calls  # nothing recorded outside `recording()`
    loss = after.sum()
    loss.backward()  # ordinary training still reaches the weights
    assert model[0].weight.grad is not None


def test_only_plain_zero_padded_conv2d_is_tapped() -> None:
    assert tappable(nn.Conv2d(1, 1, 3, padding=1))
    assert not tappable(nn.Conv2d(1, 1, 3, padding="same"))
    assert not tappable(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"))
    assert not tappable(nn.Conv1d(1, 1, 3))


class _ModifiesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x * 1.0
        h = self.conv(a)
        a.add_(1.0)  # after the convolution read it
        return (h + a).flatten(1)


def test_an_input_modified_in_place_is_an_error_not_a_wrong_gradient() -> None:
    model = _ModifiesItsInput().double()
    x, y = torch.randn(2, 2, 2, 2, dtype=torch.float64), torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _autograd_way(model, x, y)  # autograd refuses too: a tensor it saved has changed
    with pytest.raises(RuntimeError, match="input of convolution 'conv' was modified in place"):
        _tapped_way(model, x, y)


def test_two_taps_on_one_model_each_see_their_own_recording() -> None:
    """Two objectives built on the attacker's one copy of the model tap it twice."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 16, 2)
    ).double()
    names = [n for n, _ in model.named_parameters()]
    first, second = ConvTaps(model, names), ConvTaps(model, names)
    x, y = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.tensor([0, 1])
    expected = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    for taps in (first, second, first):
        params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
        with taps.recording():
            loss = nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
        grads = taps.gradients(loss, params)
        for name, e in zip(names, expected, strict=True):
            torch.testing.assert_close(grads[name], e, rtol=1e-12, atol=1e-14)
