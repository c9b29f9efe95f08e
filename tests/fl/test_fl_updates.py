"""Update conversions, the parameter/buffer split, and BN statistics recovered from running stats."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.errors import ShapeMismatchError, SpecError
from service.fl import (
    batch_bn_statistics_from_update,
    delta_to_pseudo_gradient,
    fedavg_local_training,
    fedavg_num_steps,
    fedsgd_gradient,
    float_state,
    gradient_to_delta,
    split_buffers,
    weights_to_delta,
)


def test_weights_to_delta_and_back(mlp, batch: tuple[Tensor, Tensor]) -> None:
    old = float_state(mlp)
    new = fedavg_local_training(mlp, *batch, lr=0.1, local_epochs=2, batch_size=2)
    delta = weights_to_delta(new, old)
    for k in new:
        torch.testing.assert_close(old[k] + delta[k], new[k])


def test_weights_to_delta_refuses_mismatched_tensors(mlp) -> None:
    old = float_state(mlp)
    new = dict(old, extra=torch.zeros(1))
    new["1.weight"] = torch.zeros(3, 3)
    with pytest.raises(ShapeMismatchError) as err:
        weights_to_delta(new, old)
    assert len(err.value.mismatches) == 2


def test_one_full_batch_step_gives_back_the_gradient(mlp, batch: tuple[Tensor, Tensor]) -> None:
    lr = 0.05
    old = float_state(mlp)
    delta = weights_to_delta(fedavg_local_training(mlp, *batch, lr=lr, local_epochs=1, batch_size=5), old)
    pseudo = delta_to_pseudo_gradient(delta, lr, fedavg_num_steps(5, 5, 1))
    for k, g in fedsgd_gradient(mlp, *batch).items():
        torch.testing.assert_close(pseudo[k], g)
    for k, d in gradient_to_delta(fedsgd_gradient(mlp, *batch), lr).items():
        torch.testing.assert_close(d, delta[k])


def test_unknown_scale_keeps_the_direction(mlp, batch: tuple[Tensor, Tensor]) -> None:
    old = float_state(mlp)
    delta = weights_to_delta(fedavg_local_training(mlp, *batch, lr=0.05, local_epochs=1, batch_size=5), old)
    grad = fedsgd_gradient(mlp, *batch)
    for lr, steps in [(None, 1), (0.05, None), (None, None)]:
        pseudo = delta_to_pseudo_gradient(delta, lr, steps)
        for k, g in grad.items():
            torch.testing.assert_close(pseudo[k], -delta[k])
            assert F.cosine_similarity(pseudo[k].flatten(), g.flatten(), dim=0) > 0.9999


def test_pseudo_gradient_refuses_buffers_and_bad_scales() -> None:
    with pytest.raises(SpecError, match="split off the buffers"):
        delta_to_pseudo_gradient({"bn.num_batches_tracked": torch.tensor(1)}, 0.1, 1)
    with pytest.raises(SpecError, match="learning rate"):
        delta_to_pseudo_gradient({"w": torch.ones(2)}, -1.0, 1)
    with pytest.raises(SpecError, match="local steps"):
        delta_to_pseudo_gradient({"w": torch.ones(2)}, 0.1, 0)


def test_fedavg_num_steps_counts_the_smaller_last_batch() -> None:
    assert fedavg_num_steps(5, 2, 3) == 9
    assert fedavg_num_steps(4, 2, 1) == 2
    assert fedavg_num_steps(3, 8, 2) == 2


def test_split_buffers_separates_running_statistics(convnet, batch: tuple[Tensor, Tensor]) -> None:
    delta = weights_to_delta(
        fedavg_local_training(convnet, *batch, lr=0.1, local_epochs=1, batch_size=5), float_state(convnet)
    )
    params, buffers = split_buffers(delta, convnet)
    assert list(params) == [k for k, _ in convnet.named_parameters()]
    assert list(buffers) == ["1.running_mean", "1.running_var", "4.running_mean", "4.running_var"]
    grad_params, grad_buffers = split_buffers(fedsgd_gradient(convnet, *batch), convnet)
    assert grad_params.keys() == params.keys() and grad_buffers == {}


def test_split_buffers_refuses_what_does_not_fit(convnet) -> None:
    update = float_state(convnet)
    update["stranger"] = torch.zeros(1)
    update["0.bias"] = torch.zeros(7)
    del update["7.weight"]
    with pytest.raises(ShapeMismatchError) as err:
        split_buffers(update, convnet)
    assert sorted(err.value.mismatches) == [
        "0.bias: shape (7,), the model has (4,)",
        "7.weight: missing",
        "stranger: not in the model",
    ]


def _bn_inputs(model: nn.Module, images: Tensor) -> dict[str, Tensor]:
    seen: dict[str, Tensor] = {}
    probe = copy.deepcopy(model).train()
    for name, m in probe.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda _m, inp, _out, name=name: seen.__setitem__(name, inp[0].detach()))
    probe(images)
    return seen


def _old_and_new_buffers(model: nn.Module, images: Tensor, labels: Tensor, steps: int):
    old = {k: v.clone() for k, v in model.state_dict().items()}
    client = copy.deepcopy(model).train()
    opt = torch.optim.SGD(client.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(client(images), labels).backward()
        opt.step()
    return old, client.state_dict()


def test_bn_statistics_of_a_one_step_client_are_recovered(convnet, batch: tuple[Tensor, Tensor]) -> None:
    images, labels = batch
    old = float_state(convnet)
    new = fedavg_local_training(convnet, images, labels, lr=0.1, local_epochs=1, batch_size=5)
    stats = batch_bn_statistics_from_update(old, new)
    inputs = _bn_inputs(convnet, images)
    assert stats.keys() == inputs.keys() == {"1", "4"}
    for name, x in inputs.items():
        per_channel = x.transpose(0, 1).flatten(1)
        torch.testing.assert_close(stats[name].mean, per_channel.mean(1), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(stats[name].var, per_channel.var(1, unbiased=True), atol=1e-5, rtol=1e-4)
        count = per_channel.shape[1]
        torch.testing.assert_close(
            stats[name].biased_var(count), per_channel.var(1, unbiased=False), atol=1e-5, rtol=1e-4
        )


def test_bn_statistics_with_step_counters(convnet, batch: tuple[Tensor, Tensor]) -> None:
    old, new = _old_and_new_buffers(convnet, *batch, steps=1)
    stats = batch_bn_statistics_from_update(old, new)
    x = _bn_inputs(convnet, batch[0])["1"].transpose(0, 1).flatten(1)
    torch.testing.assert_close(stats["1"].mean, x.mean(1), atol=1e-5, rtol=1e-4)


def test_bn_statistics_refuse_several_steps_eval_mode_and_no_bn(
    convnet, mlp, batch: tuple[Tensor, Tensor]
) -> None:
    old, new = _old_and_new_buffers(convnet, *batch, steps=2)
    with pytest.raises(SpecError, match="exactly one train-mode step; the client took 2"):
        batch_bn_statistics_from_update(old, new)
    with pytest.raises(SpecError, match="the client took 0"):
        batch_bn_statistics_from_update(old, old)
    with pytest.raises(SpecError, match="no batch-norm running statistics"):
        batch_bn_statistics_from_update(float_state(mlp), float_state(mlp))
    with pytest.raises(SpecError, match="momentum"):
        batch_bn_statistics_from_update(old, new, momentum=0.0)
    old, new = _old_and_new_buffers(convnet, *batch, steps=1)
    partial = {k: v for k, v in new.items() if k != "4.running_var"}
    with pytest.raises(SpecError, match=r"4\.running_var missing"):
        batch_bn_statistics_from_update(old, partial)
