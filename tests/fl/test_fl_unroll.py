"""The differentiable FedAvg unrolling equals real local training and carries gradients to the data."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.errors import SpecError
from service.fl import fedavg_local_training, float_state, unroll_fedavg, weights_to_delta


def _start(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    return (
        {k: p.detach().clone() for k, p in model.named_parameters()},
        {k: b.detach().clone() for k, b in model.named_buffers()},
    )


@pytest.mark.parametrize("arch", ["mlp", "convnet"])
@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 1e-2)])
@pytest.mark.parametrize("shuffle_seed", [None, 5])
def test_unroll_equals_local_training(
    request, arch, batch: tuple[Tensor, Tensor], momentum, weight_decay, shuffle_seed
) -> None:
    model = request.getfixturevalue(arch)
    images, labels = batch
    settings: dict[str, Any] = {
        "lr": 0.1,
        "local_epochs": 2,
        "batch_size": 2,
        "momentum": momentum,
        "shuffle_seed": shuffle_seed,
    }
    real = weights_to_delta(
        fedavg_local_training(model, images, labels, weight_decay=weight_decay, **settings),
        float_state(model),
    )
    params, buffers = _start(model)
    unrolled = unroll_fedavg(
        model, params, buffers, images, labels, bn_mode="train", weight_decay=weight_decay, **settings
    )
    assert list(unrolled) == list(params)
    for k, d in unrolled.items():
        torch.testing.assert_close(d.detach(), real[k], atol=2e-6, rtol=1e-4)
    # training moved the model (a conv bias that feeds batch norm has an exactly zero gradient,
    # so non-triviality is checked over all parameters, not per tensor)
    assert sum(float(d.abs().sum()) for d in unrolled.values()) > 0


def test_unroll_in_eval_bn_mode_equals_local_training(convnet, batch: tuple[Tensor, Tensor]) -> None:
    settings: dict[str, Any] = {
        "lr": 0.2,
        "local_epochs": 1,
        "batch_size": 3,
        "shuffle_seed": 1,
        "bn_mode": "eval",
    }
    real = weights_to_delta(fedavg_local_training(convnet, *batch, **settings), float_state(convnet))
    unrolled = unroll_fedavg(convnet, *_start(convnet), *batch, **settings)
    for k, d in unrolled.items():
        torch.testing.assert_close(d.detach(), real[k], atol=2e-6, rtol=1e-4)


def test_unroll_leaves_model_and_inputs_untouched(convnet, batch: tuple[Tensor, Tensor]) -> None:
    convnet.eval()
    before = copy.deepcopy(convnet.state_dict())
    params, buffers = _start(convnet)
    saved = {k: v.clone() for k, v in {**params, **buffers}.items()}
    unroll_fedavg(convnet, params, buffers, *batch, lr=0.1, local_epochs=2, batch_size=2, bn_mode="train")
    for k, v in convnet.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in {**params, **buffers}.items():
        assert torch.equal(v, saved[k]), k
        assert not v.requires_grad
    assert not convnet.training and not any(m.training for m in convnet.modules())


def test_gradient_through_the_unroll_matches_finite_differences() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    params, buffers = _start(model)
    images = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 2, 1])
    probe = torch.randn(3, 4, dtype=torch.float64)
    weights = {k: torch.randn_like(v) for k, v in params.items()}

    def objective(x: Tensor) -> Tensor:
        delta = unroll_fedavg(
            model, params, buffers, x, labels, lr=0.5, local_epochs=2, batch_size=2, momentum=0.5
        )
        return sum((delta[k] * weights[k]).sum() for k in delta)  # type: ignore[return-value]

    (grad,) = torch.autograd.grad(objective(images), images)
    eps = 1e-6
    with torch.no_grad():
        numeric = (objective(images + eps * probe) - objective(images - eps * probe)) / (2 * eps)
    torch.testing.assert_close((grad * probe).sum(), numeric, rtol=1e-6, atol=1e-9)


def test_soft_labels_equal_hard_labels_and_receive_gradients(mlp, batch: tuple[Tensor, Tensor]) -> None:
    images, labels = batch
    params, buffers = _start(mlp)
    settings: dict[str, Any] = {"lr": 0.1, "local_epochs": 1, "batch_size": 2}
    hard = unroll_fedavg(mlp, params, buffers, images, labels, **settings)
    soft = unroll_fedavg(mlp, params, buffers, images, F.one_hot(labels, 5).float(), **settings)
    for k in hard:
        torch.testing.assert_close(soft[k], hard[k])
    label_logits = torch.zeros(5, 5, requires_grad=True)
    delta = unroll_fedavg(mlp, params, buffers, images, label_logits, label_logits=True, **settings)
    (g,) = torch.autograd.grad(torch.stack([d.square().sum() for d in delta.values()]).sum(), label_logits)
    assert g.abs().sum() > 0


def test_unroll_refuses_bad_input(mlp, batch: tuple[Tensor, Tensor]) -> None:
    params, buffers = _start(mlp)
    images, labels = batch
    with pytest.raises(SpecError, match="learning rate"):
        unroll_fedavg(mlp, params, buffers, images, labels, lr=0, local_epochs=1, batch_size=2)
    with pytest.raises(SpecError, match="soft labels"):
        unroll_fedavg(mlp, params, buffers, images, torch.zeros(5, 3), lr=0.1, local_epochs=1, batch_size=2)
