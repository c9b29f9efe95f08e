"""Label inference from the last layer: iDLG for one image, label counts for a batch."""

from __future__ import annotations

from typing import Any

import pytest
import skimage.data
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.attacks.labels import find_last_linear, idlg_label, infer_label_counts, last_layer_grads
from service.errors import ShapeMismatchError, SpecError
from service.fl import simulate_client
from service.specs import ClientTraining

NUM_CLASSES = 10
SHAPE = (3, 32, 32)


def _photo_crops() -> Tensor:
    """32x32 crops of scikit-image's bundled photos, CIFAR-normalised: real, varied images."""
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    crops = []
    for photo in photos:
        t = torch.tensor(photo[..., :3]).permute(2, 0, 1).float() / 255
        h, w = t.shape[1] // 2, t.shape[2] // 2
        for top, left in [(0, 0), (h, w), (h // 2, 0), (0, w // 2)]:
            crops.append(
                F.interpolate(t[None, :, top : top + h, left : left + w], size=SHAPE[1:], mode="area")[0]
            )
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    return (torch.stack(crops) - mean) / std


IMAGES = _photo_crops()


def convnet(seed: int, bias: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, NUM_CLASSES, bias=bias),
    )


def mlp(seed: int, bias: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 32 * 32, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES, bias=bias)
    )


MODELS = {"convnet": convnet, "mlp": mlp}


def _last_grads(model: nn.Module, images: Tensor, labels: list[int]) -> tuple[Tensor, Tensor | None]:
    loss = F.cross_entropy(model(images), torch.tensor(labels))
    names = [k for k, _ in model.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(loss, list(model.parameters())), strict=True))
    return last_layer_grads(grads, model)


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("use_bias", [True, False])
def test_idlg_finds_every_label_of_a_single_image(arch, use_bias) -> None:
    model = MODELS[arch](0, bias=use_bias)
    for label in range(NUM_CLASSES):
        weight, bias = _last_grads(model, IMAGES[label : label + 1], [label])
        assert (bias is not None) == use_bias
        assert idlg_label(weight, bias) == label
        assert infer_label_counts(weight, bias, 1) == ([label], 1)


def test_idlg_bias_rule_needs_no_sign_assumption() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 32), nn.Tanh(), nn.Linear(32, NUM_CLASSES))
    for label in range(NUM_CLASSES):
        weight, bias = _last_grads(model, IMAGES[label : label + 1], [label])
        assert idlg_label(weight, bias) == label


BATCHES = {"distinct": [7, 1, 4, 2], "repeated": [3, 3, 8, 0], "triple": [5, 9, 5, 5]}


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("with_model", [False, True])
def test_counts_of_a_batch_of_four_with_the_bias(arch, batch, with_model) -> None:
    labels = BATCHES[batch]
    model = MODELS[arch](1)
    weight, bias = _last_grads(model, IMAGES[[0, 5, 10, 15]], labels)
    kwargs: dict[str, Any] = {"model": model, "input_shape": SHAPE} if with_model else {}
    assert infer_label_counts(weight, bias, 4, **kwargs) == (sorted(labels), 4)


@pytest.mark.parametrize("arch", MODELS)
def test_weight_rows_alone_give_the_counts_of_most_batches(arch) -> None:
    labels = BATCHES["distinct"]
    hits = 0
    for seed in range(5):
        model = MODELS[arch](seed, bias=False)
        weight, bias = _last_grads(model, IMAGES[[2, 7, 9, 13]], labels)
        got, n = infer_label_counts(weight, bias, 4, model=model, input_shape=SHAPE)
        assert n == 4 and len(got) == 4
        hits += got == sorted(labels)
    assert hits >= 4


def test_weight_rows_of_an_absent_class_are_never_negative() -> None:
    for seed in range(5):
        weight, _ = _last_grads(convnet(seed, bias=False), IMAGES[:6], [0, 0, 2, 4, 4, 6])
        present = {j for j in range(NUM_CLASSES) if weight[j].sum() < 0}
        assert present <= {0, 2, 4, 6}
        assert present


@pytest.mark.parametrize("arch", MODELS)
def test_batch_size_is_estimated_when_unknown(arch) -> None:
    cases = [[7, 1, 4, 2], [3, 3, 8, 0], [6, 2, 2], [0, 5]]
    right = 0
    for seed, labels in enumerate(cases * 2):
        model = MODELS[arch](seed)
        weight, bias = _last_grads(model, IMAGES[2 * seed : 2 * seed + len(labels)], labels)
        got, n = infer_label_counts(weight, bias, None, model=model, input_shape=SHAPE)
        assert len(got) == n
        right += (got, n) == (sorted(labels), len(labels))
    assert right >= 7


def test_gradient_of_unknown_scale_is_calibrated() -> None:
    labels = BATCHES["repeated"]
    model = convnet(3)
    weight, bias = _last_grads(model, IMAGES[[1, 6, 11, 12]], labels)
    assert bias is not None
    expected = (sorted(labels), 4)
    assert infer_label_counts(weight * 0.01, bias * 0.01, 4, scale=0.01) == expected
    assert infer_label_counts(weight * 0.01, bias * 0.01, 4, scale=None) == expected
    assert infer_label_counts(weight * 0.01, None, 4, scale=None) == expected


@pytest.mark.parametrize("arch", MODELS)
def test_counts_from_a_fedavg_delta(arch) -> None:
    """Four local steps of two images: -delta is about 4 * lr times the full-batch gradient."""
    labels = BATCHES["distinct"]
    training = ClientTraining(protocol="fedavg", lr=0.01, local_epochs=2, batch_size=2)
    estimated_right = 0
    for seed in range(3):
        model = MODELS[arch](seed)
        delta = simulate_client(model, IMAGES[[3, 4, 8, 14]], torch.tensor(labels), training, "delta")
        weight, bias = last_layer_grads({k: -v for k, v in delta.items()}, model)
        assert infer_label_counts(weight, bias, 4, scale=None) == (sorted(labels), 4)
        got = infer_label_counts(weight, bias, None, scale=None, model=model, input_shape=SHAPE)
        estimated_right += got == (sorted(labels), 4)
    assert estimated_right >= 2


def test_one_class_many_times_reads_as_the_smallest_batch() -> None:
    model = convnet(0)
    weight, bias = _last_grads(model, IMAGES[:3], [4, 4, 4])
    assert infer_label_counts(weight, bias, None) == ([4], 1)
    assert infer_label_counts(weight, bias, 3) == ([4, 4, 4], 3)


def test_too_small_a_batch_size_keeps_the_most_negative_classes() -> None:
    weight, bias = _last_grads(convnet(0), IMAGES[:4], [7, 1, 4, 2])
    assert bias is not None
    got, n = infer_label_counts(weight, bias, 2)
    assert n == 2 and got == sorted(bias.argsort()[:2].tolist())
    assert set(got) <= {7, 1, 4, 2}


def test_inputs_are_checked() -> None:
    weight, bias = _last_grads(convnet(0), IMAGES[:2], [1, 2])
    assert bias is not None
    with pytest.raises(SpecError, match="input shape"):
        infer_label_counts(weight, bias, 2, model=convnet(0))
    with pytest.raises(ShapeMismatchError, match="bias gradient has shape"):
        infer_label_counts(weight, bias[:5], 2)
    with pytest.raises(ShapeMismatchError, match="classes, features"):
        idlg_label(weight.flatten())
    with pytest.raises(SpecError, match="scale must be positive"):
        infer_label_counts(weight, bias, 2, scale=0.0)
    with pytest.raises(SpecError, match="num_images"):
        infer_label_counts(weight, bias, 0)
    with pytest.raises(SpecError, match="zero"):
        infer_label_counts(torch.zeros_like(weight), None, 2)
    with pytest.raises(SpecError, match="every class seems present"):
        infer_label_counts(-torch.ones(NUM_CLASSES, 4), None, 2)


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(8, NUM_CLASSES))
        self.aux = nn.Linear(8, 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def test_last_layer_is_located_by_class_count() -> None:
    model = _TwoHeads()
    assert find_last_linear(model)[0] == "aux"
    assert find_last_linear(model, NUM_CLASSES)[0] == "classifier.0"
    grads = {k: torch.full_like(p, i) for i, (k, p) in enumerate(model.named_parameters())}
    weight, bias = last_layer_grads(grads, model, NUM_CLASSES)
    assert weight is grads["classifier.0.weight"] and bias is grads["classifier.0.bias"]
    weight, bias = last_layer_grads(grads, model)
    assert weight is grads["aux.weight"] and bias is None
    with pytest.raises(SpecError, match="with 3 outputs"):
        find_last_linear(model, 3)
    with pytest.raises(SpecError, match="has none"):
        find_last_linear(nn.Conv2d(3, 3, 1))
    del grads["classifier.0.weight"]
    with pytest.raises(ShapeMismatchError, match=r"no classifier\.0\.weight"):
        last_layer_grads(grads, model, NUM_CLASSES)
    with pytest.raises(ShapeMismatchError, match="shape"):
        last_layer_grads({"aux.weight": torch.zeros(3, 8)}, model)


def test_bare_linear_model() -> None:
    layer = nn.Linear(5, NUM_CLASSES)
    grads = {"weight": torch.ones(NUM_CLASSES, 5), "bias": torch.zeros(NUM_CLASSES)}
    weight, bias = last_layer_grads(grads, layer)
    assert weight is grads["weight"] and bias is grads["bias"]
