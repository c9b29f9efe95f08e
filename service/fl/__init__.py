"""Client local training (FedSGD, FedAvg), its differentiable unrolling, and update conversions."""

from service.fl.client import (
    BNMode,
    UpdateKind,
    client_loss,
    fedavg_local_training,
    fedsgd_gradient,
    float_state,
    minibatch_indices,
    simulate_client,
    training_mode,
)
from service.fl.unroll import unroll_fedavg
from service.fl.updates import (
    BatchNormStatistics,
    Update,
    batch_bn_statistics_from_update,
    delta_to_pseudo_gradient,
    fedavg_num_steps,
    gradient_to_delta,
    split_buffers,
    weights_to_delta,
)

__all__ = [
    "BNMode",
    "BatchNormStatistics",
    "Update",
    "UpdateKind",
    "batch_bn_statistics_from_update",
    "client_loss",
    "delta_to_pseudo_gradient",
    "fedavg_local_training",
    "fedavg_num_steps",
    "fedsgd_gradient",
    "float_state",
    "gradient_to_delta",
    "minibatch_indices",
    "simulate_client",
    "split_buffers",
    "training_mode",
    "unroll_fedavg",
    "weights_to_delta",
]
