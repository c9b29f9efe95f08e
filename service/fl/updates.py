"""Conversions between the update kinds a client may share, and what the buffers of an update reveal.

A FedSGD client shares a gradient; a FedAvg client shares its new weights or the delta
w_new - w_old. Attacks match gradients, so deltas are turned into pseudo-gradients here. A
weights or delta update may also carry batch-norm running statistics (buffers); those are split
off from the parameters, and when the client took a single training step they reveal the batch
statistics of its data (knowledge level 4).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from service.errors import ShapeMismatchError, SpecError

Update = dict[str, Tensor]

_RUNNING_MEAN = "running_mean"
_RUNNING_VAR = "running_var"
_NUM_BATCHES = "num_batches_tracked"


def weights_to_delta(new_weights: Mapping[str, Tensor], old_weights: Mapping[str, Tensor]) -> Update:
    """w_new - w_old for every tensor of `new_weights` (integer buffers too: their delta counts steps)."""
    _check_same_tensors(new_weights, old_weights, "new weights", "old weights")
    return {k: (v.detach() - old_weights[k].detach().to(v.device)) for k, v in new_weights.items()}


def gradient_to_delta(grad: Mapping[str, Tensor], lr: float) -> Update:
    """The delta one plain SGD step of learning rate `lr` makes from a gradient: -lr * grad."""
    if lr <= 0:
        raise SpecError(f"the learning rate must be positive, got {lr}")
    return {k: -lr * v.detach() for k, v in grad.items()}


def delta_to_pseudo_gradient(delta: Mapping[str, Tensor], lr: float | None, steps: int | None) -> Update:
    """The average gradient of a local run that moved the weights by `delta`: -delta / (lr * steps).

    When the learning rate or the number of local steps is unknown the scale cannot be recovered
    and -delta is returned: its direction is still the average gradient's, which is all that
    cosine-similarity attacks (Inverting Gradients and its descendants) use, since they are
    invariant to a positive rescaling of the target. Pass parameters only (see `split_buffers`):
    a running statistic has no gradient.
    """
    for k, v in delta.items():
        if not v.is_floating_point():
            raise SpecError(f"{k} is a {v.dtype} tensor, not a parameter; split off the buffers first")
    if lr is not None and lr <= 0:
        raise SpecError(f"the learning rate must be positive, got {lr}")
    if steps is not None and steps < 1:
        raise SpecError(f"the number of local steps must be at least 1, got {steps}")
    scale = 1.0 / (lr * steps) if lr is not None and steps is not None else 1.0
    return {k: -scale * v.detach() for k, v in delta.items()}


def fedavg_num_steps(num_samples: int, batch_size: int, local_epochs: int) -> int:
    """How many optimizer steps a FedAvg client takes: ceil(N / B) per epoch, the last batch smaller."""
    if num_samples < 1 or batch_size < 1 or local_epochs < 1:
        raise SpecError(
            f"num_samples, batch_size and local_epochs must be at least 1, got "
            f"{num_samples}, {batch_size}, {local_epochs}"
        )
    return local_epochs * -(-num_samples // batch_size)


def split_buffers(update: Mapping[str, Tensor], model: nn.Module) -> tuple[Update, Update]:
    """Split an update into (parameters, buffers), each in the model's order, checking names and shapes.

    Buffers (batch-norm running statistics, their step counters) are absent from gradient updates
    and present in weights or delta updates; attacks match the parameters and may use the buffers
    separately. Every trainable parameter must be present; a name the model does not have, or a
    shape that differs from the model's, is refused.
    """
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    mismatches = [f"{k}: not in the model" for k in update if k not in params and k not in buffers]
    for k, v in update.items():
        ref = params.get(k, buffers.get(k))
        if ref is not None and tuple(v.shape) != tuple(ref.shape):
            mismatches.append(f"{k}: shape {tuple(v.shape)}, the model has {tuple(ref.shape)}")
    mismatches += [f"{k}: missing" for k, p in params.items() if p.requires_grad and k not in update]
    if mismatches:
        raise ShapeMismatchError(
            f"the update does not fit the model ({len(mismatches)} mismatches, first: {mismatches[0]})",
            mismatches,
        )
    return (
        {k: update[k] for k in params if k in update},
        {k: update[k] for k in buffers if k in update},
    )


@dataclass(frozen=True)
class BatchNormStatistics:
    """The per-channel statistics of one batch-norm layer's input over the client's batch."""

    mean: Tensor
    var: Tensor  # unbiased (Bessel-corrected): what PyTorch folds into running_var

    def biased_var(self, count: int) -> Tensor:
        """The biased variance BN normalises with; `count` = values per channel (N, or N*H*W for 2d)."""
        if count < 2:
            raise SpecError(f"a variance needs at least 2 values per channel, got {count}")
        return self.var * (count - 1) / count


def batch_bn_statistics_from_update(
    old_buffers: Mapping[str, Tensor], new_buffers: Mapping[str, Tensor], momentum: float = 0.1
) -> dict[str, BatchNormStatistics]:
    """Recover each BN layer's batch statistics from a client that took exactly one train-mode step.

    In train mode PyTorch updates running = (1 - m) * running + m * batch_stat, with the unbiased
    batch variance for running_var. After one step (FedSGD, or FedAvg with one epoch of one batch)
    this is inverted exactly: batch_stat = (new - (1 - m) * old) / m. After several steps the
    running statistics mix several batches and no single batch's statistics can be recovered,
    so an update whose step counter moved by anything but one is refused. Keys are the BN layers'
    module names (the prefix before ".running_mean").
    """
    if not 0 < momentum <= 1:
        raise SpecError(f"the batch-norm momentum must lie in (0, 1], got {momentum}")
    layers = [k[: -len(_RUNNING_MEAN)] for k in old_buffers if k.rsplit(".", 1)[-1] == _RUNNING_MEAN]
    if not layers:
        raise SpecError("the update carries no batch-norm running statistics")
    stats: dict[str, BatchNormStatistics] = {}
    for prefix in layers:
        names = [prefix + _RUNNING_MEAN, prefix + _RUNNING_VAR]
        missing = [n for n in names if n not in old_buffers or n not in new_buffers]
        if missing:
            raise SpecError(f"batch-norm statistics incomplete: {', '.join(missing)} missing")
        counter = prefix + _NUM_BATCHES
        if counter in old_buffers and counter in new_buffers:
            steps = int(new_buffers[counter].item()) - int(old_buffers[counter].item())
            if steps != 1:
                raise SpecError(
                    f"batch statistics of BN layer {prefix.rstrip('.')!r} can be recovered only after "
                    f"exactly one train-mode step; the client took {steps}"
                )
        mean, var = (_invert_running_update(old_buffers[n], new_buffers[n], momentum) for n in names)
        stats[prefix.rstrip(".")] = BatchNormStatistics(mean=mean, var=var)
    return stats


def _invert_running_update(old: Tensor, new: Tensor, momentum: float) -> Tensor:
    # float64: dividing by a small momentum amplifies rounding error by 1/m
    batch = (new.detach().double() - (1.0 - momentum) * old.detach().double().to(new.device)) / momentum
    return batch.to(new.dtype)


def _check_same_tensors(a: Mapping[str, Tensor], b: Mapping[str, Tensor], a_name: str, b_name: str) -> None:
    mismatches = [f"{k}: not in the {b_name}" for k in a if k not in b]
    mismatches += [
        f"{k}: shape {tuple(v.shape)} in the {a_name}, {tuple(b[k].shape)} in the {b_name}"
        for k, v in a.items()
        if k in b and v.shape != b[k].shape
    ]
    if mismatches:
        raise ShapeMismatchError(
            f"the {a_name} do not match the {b_name} ({len(mismatches)} mismatches, first: {mismatches[0]})",
            mismatches,
        )
