"""FedAvg local training as a differentiable function of the client's data.

The FedAvg-aware attack (Dimitrov et al., "Data leakage in federated averaging") simulates the
client's local SGD on dummy data and matches the resulting weight change to the shared one; it
needs that change to be differentiable w.r.t. the dummy images (and soft labels). This module
replays `fedavg_local_training` with torch.func.functional_call on explicit parameter tensors,
keeping the graph of every step (create_graph), so that autograd reaches back through all steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from service.errors import SpecError
from service.fl.client import BNMode, check_batch, client_loss, minibatch_indices, training_mode
from service.fl.updates import Update


def unroll_fedavg(
    model: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    images: Tensor,
    labels: Tensor,
    *,
    lr: float,
    local_epochs: int,
    batch_size: int,
    shuffle_seed: int | None = None,
    bn_mode: BNMode = "train",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    label_logits: bool = False,
    create_graph: bool = True,
    functional: bool = False,
    batches: Sequence[Tensor] | None = None,
) -> Update:
    """The parameter delta w_new - w_old of FedAvg local training, differentiable w.r.t. the data.

    `params` are the starting weights of the parameters to train (the server's model); `buffers`
    the model's buffers (BN running statistics), copied so that train-mode BN does not move the
    caller's. `labels` are class indices (N,), or soft labels (N, K): probabilities, or logits with
    `label_logits` (for joint label optimisation). With `shuffle_seed` None the mini-batches take
    the data in the given order: the attacker does not know the client's permutation, and the
    order of dummy images is arbitrary anyway. The SGD update matches torch.optim.SGD (momentum
    without dampening, weight decay added to the gradient), so with the same order the result
    equals `fedavg_local_training`'s delta to float tolerance.

    `functional` takes each step's gradient with torch.func.grad instead of autograd, so the
    unrolling composes with torch.func transforms (the attacks vmap it over restarts); a
    parameter the loss does not reach then gets a zero gradient rather than being skipped.
    `batches` are the steps' mini-batch indices when computed once beforehand (the attacks do,
    since the order is fixed per job and drawing it under vmap is not allowed); by default they
    come from `minibatch_indices` with the given sizes and seed.
    """
    check_batch(images, labels)
    if lr <= 0:
        raise SpecError(f"the learning rate must be positive, got {lr}")
    if not params:
        raise SpecError("nothing to train: no parameters given")
    if functional:
        start = dict(params)
    else:
        start = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()}
    current = dict(start)
    state = {k: v.detach().clone() for k, v in buffers.items()}
    velocity: dict[str, Tensor] = {}
    names = list(current)
    # enable_grad: the local SGD needs gradients even when the caller evaluates under no_grad
    with training_mode(model, bn_mode), torch.enable_grad():
        if batches is None:
            batches = minibatch_indices(images.shape[0], batch_size, local_epochs, shuffle_seed)
        for idx in batches:
            idx = idx.to(images.device)
            x, y = images[idx], labels[idx]

            def batch_loss(weights: dict[str, Tensor], x: Tensor = x, y: Tensor = y) -> Tensor:
                logits = functional_call(model, {**state, **weights}, (x,), strict=False)
                return client_loss(logits, y, label_logits=label_logits)

            grads: Sequence[Tensor | None]
            if functional:
                by_name = torch.func.grad(batch_loss)(current)
                grads = [by_name[k] for k in names]
            else:
                grads = torch.autograd.grad(
                    batch_loss(current),
                    [current[k] for k in names],
                    create_graph=create_graph,
                    allow_unused=True,
                )
            for k, g in zip(names, grads, strict=True):
                if g is None:  # torch.optim.SGD skips a parameter without a gradient
                    continue
                step = g
                if weight_decay:
                    step = step + weight_decay * current[k]
                if momentum:
                    step = step if k not in velocity else momentum * velocity[k] + step
                    velocity[k] = step
                current[k] = current[k] - lr * step
    return {k: current[k] - start[k] for k in names}
