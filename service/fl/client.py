"""A client's local training, done exactly as a real FL client does it.

FedSGD: one gradient of the mean cross-entropy over the whole local batch. FedAvg: E epochs of
mini-batch SGD (torch.optim.SGD, momentum and weight decay included), ceil(N / B) steps per
epoch with a smaller last batch, a fresh permutation per epoch from one seeded generator.
Nothing here mutates the caller's model: every run works on a deep copy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.errors import SpecError
from service.fl.updates import Update, weights_to_delta
from service.specs import ClientTraining

BNMode = Literal["train", "eval"]
UpdateKind = Literal["gradient", "delta", "weights"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def client_loss(logits: Tensor, labels: Tensor, *, label_logits: bool = False) -> Tensor:
    """Mean cross-entropy: integer labels (N,), or soft labels (N, K) given as probabilities or logits."""
    if labels.is_floating_point():
        if labels.shape != logits.shape:
            raise SpecError(f"soft labels of shape {tuple(labels.shape)} for logits {tuple(logits.shape)}")
        target = labels.softmax(dim=-1) if label_logits else labels
        return F.cross_entropy(logits, target)
    return F.cross_entropy(logits, labels)


def check_batch(images: Tensor, labels: Tensor) -> None:
    """Refuse a local batch whose labels do not pair up with its images."""
    if images.ndim < 2 or images.shape[0] == 0:
        raise SpecError(f"a local batch needs images of shape (N, ...), N >= 1; got {tuple(images.shape)}")
    if labels.shape[0] != images.shape[0]:
        raise SpecError(f"{labels.shape[0]} labels for {images.shape[0]} images")
    if labels.is_floating_point() and labels.ndim != 2:
        raise SpecError(f"soft labels have shape (N, K); got {tuple(labels.shape)}")
    if not labels.is_floating_point() and labels.ndim != 1:
        raise SpecError(f"class labels have shape (N,); got {tuple(labels.shape)}")


@contextmanager
def training_mode(model: nn.Module, bn_mode: BNMode) -> Iterator[nn.Module]:
    """Put the model in train mode with its batch norms in `bn_mode`; restore every flag on exit."""
    if bn_mode not in ("train", "eval"):
        raise SpecError(f"bn_mode is 'train' or 'eval', got {bn_mode!r}")
    before = [(m, m.training) for m in model.modules()]
    model.train()
    if bn_mode == "eval":
        for m in model.modules():
            if isinstance(m, _BATCH_NORMS):
                m.eval()
    try:
        yield model
    finally:
        for m, flag in before:
            m.training = flag


def minibatch_indices(
    num_samples: int, batch_size: int, local_epochs: int, shuffle_seed: int | None
) -> list[Tensor]:
    """The index of every local step's mini-batch, in order.

    Each epoch draws a fresh permutation from one torch.Generator seeded with `shuffle_seed`
    (torch's RandomSampler draws a second, unused permutation per epoch from its generator, so its
    orders differ from these after the first epoch). None keeps the given order.
    """
    if batch_size < 1 or local_epochs < 1:
        raise SpecError(f"batch_size and local_epochs must be at least 1, got {batch_size}, {local_epochs}")
    gen = None
    if shuffle_seed is not None:
        gen = torch.Generator().manual_seed(shuffle_seed)
    batches: list[Tensor] = []
    for _ in range(local_epochs):
        order = torch.randperm(num_samples, generator=gen) if gen is not None else torch.arange(num_samples)
        batches += list(order.split(batch_size))
    return batches


def fedsgd_gradient(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    loss: Literal["ce"] = "ce",
    bn_mode: BNMode = "train",
) -> Update:
    """The gradient of the mean cross-entropy over the whole batch, per trainable parameter, detached.

    Keys follow model.named_parameters(); a parameter the loss does not reach gets a zero gradient.
    """
    if loss != "ce":
        raise SpecError(f"unknown client loss {loss!r}; valid: ce")
    check_batch(images, labels)
    work = copy.deepcopy(model)
    named = [(k, p) for k, p in work.named_parameters() if p.requires_grad]
    with training_mode(work, bn_mode):
        value = client_loss(work(images), labels)
    grads = torch.autograd.grad(value, [p for _, p in named], allow_unused=True)
    return {
        k: (g.detach() if g is not None else torch.zeros_like(p).detach())
        for (k, p), g in zip(named, grads, strict=True)
    }


def fedavg_local_training(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    lr: float,
    local_epochs: int,
    batch_size: int,
    momentum: float = 0.0,
    shuffle_seed: int | None = 0,
    bn_mode: BNMode = "train",
    weight_decay: float = 0.0,
) -> Update:
    """The client's new weights after FedAvg local training: every floating state_dict entry.

    Batch-norm running statistics are included (they move in train mode); integer counters are not.
    """
    check_batch(images, labels)
    if lr <= 0:
        raise SpecError(f"the learning rate must be positive, got {lr}")
    if not 0 <= momentum < 1 or weight_decay < 0:
        raise SpecError(
            f"momentum must lie in [0, 1) and weight decay be >= 0, got {momentum}, {weight_decay}"
        )
    work = copy.deepcopy(model)
    params = [p for p in work.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    with training_mode(work, bn_mode):
        for idx in minibatch_indices(images.shape[0], batch_size, local_epochs, shuffle_seed):
            idx = idx.to(images.device)
            opt.zero_grad(set_to_none=True)
            client_loss(work(images[idx]), labels[idx]).backward()
            opt.step()
    return float_state(work)


def float_state(model: nn.Module) -> Update:
    """A detached copy of the model's floating state_dict entries (parameters and running statistics)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def simulate_client(
    model: nn.Module, images: Tensor, labels: Tensor, training: ClientTraining, kind: UpdateKind
) -> Update:
    """Train like the client described by `training` and return the update of the given kind.

    - fedsgd + gradient: the full-batch gradient.
    - fedsgd + delta/weights: one SGD step on the whole batch (needs lr); identical to FedAvg with
      one epoch of one batch, so BN running statistics move once.
    - fedavg + delta/weights: local training (needs lr, local_epochs and batch_size).
    - fedavg + gradient is a contradiction (a FedAvg client shares weights) and is refused.
    An unknown protocol follows the kind: gradient means FedSGD, anything else FedAvg. Unknown
    momentum means none, unknown BN mode means train, an unknown shuffle seed means seed 0.
    """
    if kind not in ("gradient", "delta", "weights"):
        raise SpecError(f"unknown update kind {kind!r}; valid: delta, gradient, weights")
    check_batch(images, labels)
    n = images.shape[0]
    if training.num_samples is not None and training.num_samples != n:
        raise SpecError(
            f"the client training says num_samples={training.num_samples} but {n} images were given"
        )
    protocol = training.protocol or ("fedsgd" if kind == "gradient" else "fedavg")
    bn_mode: BNMode = training.bn_mode or "train"
    if protocol == "fedavg" and kind == "gradient":
        raise SpecError(
            "a FedAvg client shares weights or a delta, not a gradient; use kind 'delta' or 'weights'"
        )
    if protocol == "fedsgd":
        if training.local_epochs not in (None, 1) or (training.batch_size or n) < n:
            raise SpecError(
                "FedSGD computes one gradient over the whole local batch; "
                f"local_epochs={training.local_epochs}, batch_size={training.batch_size} contradict it"
            )
        if kind == "gradient":
            return fedsgd_gradient(model, images, labels, bn_mode=bn_mode)
        epochs, batch_size = 1, n
    else:
        missing = [f for f in ("lr", "local_epochs", "batch_size") if getattr(training, f) is None]
        if missing:
            raise SpecError(f"simulating a FedAvg client needs its {', '.join(missing)}")
        epochs, batch_size = training.local_epochs or 1, training.batch_size or n
    if training.lr is None:
        raise SpecError(f"simulating a client that shares {kind} needs its lr")
    new = fedavg_local_training(
        model,
        images,
        labels,
        lr=training.lr,
        local_epochs=epochs,
        batch_size=batch_size,
        momentum=training.momentum or 0.0,
        shuffle_seed=training.shuffle_seed if training.shuffle_seed is not None else 0,
        bn_mode=bn_mode,
    )
    return new if kind == "weights" else weights_to_delta(new, float_state(model))
