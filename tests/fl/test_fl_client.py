"""Client simulation: FedSGD gradients and FedAvg local training behave like a real client's."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from service.errors import SpecError
from service.fl import (
    fedavg_local_training,
    fedsgd_gradient,
    float_state,
    gradient_to_delta,
    minibatch_indices,
    simulate_client,
)
from service.specs import ClientTraining


def _assert_unchanged(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert all(p.grad is None for p in model.parameters())


def _reference_gradient(model: nn.Module, images: Tensor, labels: Tensor, train: bool) -> dict[str, Tensor]:
    ref = copy.deepcopy(model).train(train)
    F.cross_entropy(ref(images), labels).backward()
    return {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["mlp", "convnet"])
def test_fedsgd_gradient_is_the_full_batch_gradient(request, arch, batch: tuple[Tensor, Tensor]) -> None:
    model = request.getfixturevalue(arch)
    images, labels = batch
    before = copy.deepcopy(model.state_dict())
    grad = fedsgd_gradient(model, images, labels)
    ref = _reference_gradient(model, images, labels, train=True)
    assert list(grad) == [k for k, _ in model.named_parameters()]
    for k, g in grad.items():
        assert not g.requires_grad
        torch.testing.assert_close(g, ref[k])
    _assert_unchanged(model, before)
    assert model.training


def test_fedsgd_gradient_in_eval_bn_mode_uses_running_statistics(
    convnet, batch: tuple[Tensor, Tensor]
) -> None:
    images, labels = batch
    convnet.eval()
    grad = fedsgd_gradient(convnet, images, labels, bn_mode="eval")
    ref = _reference_gradient(convnet, images, labels, train=False)
    for k, g in grad.items():
        torch.testing.assert_close(g, ref[k])
    train_grad = fedsgd_gradient(convnet, images, labels, bn_mode="train")
    assert not torch.allclose(train_grad["0.weight"], grad["0.weight"])
    assert not convnet.training


def test_fedsgd_gradient_gives_zero_for_unreached_parameters(mlp, batch: tuple[Tensor, Tensor]) -> None:
    model = nn.ModuleDict({"head": mlp, "unused": nn.Linear(2, 2)})
    model.forward = model["head"].forward  # type: ignore[method-assign]
    grad = fedsgd_gradient(model, *batch)
    assert torch.count_nonzero(grad["unused.weight"]) == 0
    assert torch.count_nonzero(grad["head.1.weight"]) > 0


class _EpochPermutation(Sampler[int]):
    """One permutation per epoch from one seeded generator (RandomSampler draws a second, unused one)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.gen = n, torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=self.gen).tolist())

    def __len__(self) -> int:
        return self.n


def _reference_fedavg(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    lr: float,
    epochs: int,
    batch_size: int,
    momentum: float,
    seed: int,
    weight_decay: float,
) -> dict[str, Tensor]:
    """A client written the everyday way: a DataLoader and torch.optim.SGD."""
    client = copy.deepcopy(model).train()
    data = TensorDataset(images, labels)
    loader = DataLoader(data, batch_size=batch_size, sampler=_EpochPermutation(len(data), seed))
    opt = torch.optim.SGD(client.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(client(x), y).backward()
            opt.step()
    return {k: v for k, v in client.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("arch", ["mlp", "convnet"])
@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 1e-3)])
def test_fedavg_local_training_matches_a_dataloader_client(
    request, arch, batch: tuple[Tensor, Tensor], momentum, weight_decay
) -> None:
    model = request.getfixturevalue(arch)
    images, labels = batch
    before = copy.deepcopy(model.state_dict())
    kwargs = {"lr": 0.1, "momentum": momentum, "weight_decay": weight_decay}
    new = fedavg_local_training(
        model, images, labels, local_epochs=3, batch_size=2, shuffle_seed=11, **kwargs
    )
    ref = _reference_fedavg(model, images, labels, epochs=3, batch_size=2, seed=11, **kwargs)
    assert new.keys() == ref.keys()
    for k, v in ref.items():
        torch.testing.assert_close(new[k], v)
    first = next(iter(new))
    assert not torch.allclose(new[first], before[first])
    _assert_unchanged(model, before)


def test_fedavg_weights_carry_running_statistics_only_in_train_mode(
    convnet, batch: tuple[Tensor, Tensor]
) -> None:
    old = float_state(convnet)
    trained = fedavg_local_training(convnet, *batch, lr=0.1, local_epochs=1, batch_size=5, bn_mode="train")
    frozen = fedavg_local_training(convnet, *batch, lr=0.1, local_epochs=1, batch_size=5, bn_mode="eval")
    assert "1.running_mean" in trained
    assert "1.num_batches_tracked" not in trained
    assert not torch.allclose(trained["1.running_mean"], old["1.running_mean"])
    assert torch.equal(frozen["1.running_mean"], old["1.running_mean"])
    assert not torch.allclose(frozen["0.weight"], old["0.weight"])


def test_shuffle_seed_changes_the_result_and_repeats_exactly(mlp, batch: tuple[Tensor, Tensor]) -> None:
    def run(seed: int | None) -> Tensor:
        return fedavg_local_training(mlp, *batch, lr=0.5, local_epochs=2, batch_size=2, shuffle_seed=seed)[
            "1.weight"
        ]

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))
    assert not torch.allclose(run(1), run(None))


def test_minibatch_indices_cover_every_sample_each_epoch() -> None:
    batches = minibatch_indices(5, 2, 3, shuffle_seed=4)
    assert [len(b) for b in batches] == [2, 2, 1] * 3
    epochs = [torch.cat(batches[i : i + 3]) for i in range(0, 9, 3)]
    for order in epochs:
        assert sorted(order.tolist()) == [0, 1, 2, 3, 4]
    assert len({tuple(e.tolist()) for e in epochs}) > 1
    assert torch.cat(minibatch_indices(5, 2, 1, shuffle_seed=None)).tolist() == [0, 1, 2, 3, 4]


def test_simulate_fedsgd_gradient(mlp, batch: tuple[Tensor, Tensor]) -> None:
    got = simulate_client(mlp, *batch, ClientTraining(protocol="fedsgd"), "gradient")
    for k, g in fedsgd_gradient(mlp, *batch).items():
        torch.testing.assert_close(got[k], g)


def test_simulate_fedsgd_delta_is_one_sgd_step(mlp, batch: tuple[Tensor, Tensor]) -> None:
    delta = simulate_client(mlp, *batch, ClientTraining(protocol="fedsgd", lr=0.3), "delta")
    expected = gradient_to_delta(fedsgd_gradient(mlp, *batch), 0.3)
    assert delta.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(delta[k], v)


def test_simulate_fedavg_delta_and_weights_agree(convnet, batch: tuple[Tensor, Tensor]) -> None:
    training = ClientTraining(
        protocol="fedavg", lr=0.1, local_epochs=2, batch_size=2, momentum=0.5, shuffle_seed=3
    )
    weights = simulate_client(convnet, *batch, training, "weights")
    delta = simulate_client(convnet, *batch, training, "delta")
    old = float_state(convnet)
    for k, w in weights.items():
        torch.testing.assert_close(delta[k], w - old[k])
    direct = fedavg_local_training(
        convnet, *batch, lr=0.1, local_epochs=2, batch_size=2, momentum=0.5, shuffle_seed=3
    )
    for k, w in direct.items():
        torch.testing.assert_close(weights[k], w)


def test_unknown_protocol_follows_the_kind(mlp, batch: tuple[Tensor, Tensor]) -> None:
    grad = simulate_client(mlp, *batch, ClientTraining(), "gradient")
    torch.testing.assert_close(grad["1.weight"], fedsgd_gradient(mlp, *batch)["1.weight"])
    with pytest.raises(SpecError, match="lr, local_epochs, batch_size"):
        simulate_client(mlp, *batch, ClientTraining(), "weights")


@pytest.mark.parametrize(
    ("training", "kind", "message"),
    [
        (
            ClientTraining(protocol="fedavg", lr=0.1, local_epochs=1, batch_size=2),
            "gradient",
            "not a gradient",
        ),
        (ClientTraining(protocol="fedavg", lr=0.1), "delta", "needs its local_epochs, batch_size"),
        (ClientTraining(protocol="fedavg", local_epochs=1, batch_size=2), "weights", "needs its lr"),
        (ClientTraining(protocol="fedsgd"), "delta", "needs its lr"),
        (ClientTraining(protocol="fedsgd", lr=0.1, local_epochs=3), "delta", "contradict"),
        (ClientTraining(protocol="fedsgd", num_samples=4), "gradient", "num_samples=4 but 5"),
    ],
)
def test_simulate_client_refuses_what_it_cannot_know(
    mlp, batch: tuple[Tensor, Tensor], training, kind, message
) -> None:
    with pytest.raises(SpecError, match=message):
        simulate_client(mlp, *batch, training, kind)


def test_mismatched_batch_is_refused(mlp, batch: tuple[Tensor, Tensor]) -> None:
    images, labels = batch
    with pytest.raises(SpecError, match="4 labels for 5 images"):
        fedsgd_gradient(mlp, images, labels[:4])
    with pytest.raises(SpecError, match="learning rate"):
        fedavg_local_training(mlp, images, labels, lr=0.0, local_epochs=1, batch_size=2)
