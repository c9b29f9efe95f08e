"""The FedAvg-aware attack: the attacker replays the client's local training differentiably.

SoK Case 1 (lr, local epochs, batch size and sample count known, level 3): the reconstruction is
trained exactly as the client trained, E epochs of ceil(N/B) SGD steps, and the resulting weight
change is matched to the client's. Case 2 (batch size unknown): the update is treated as one step
on the whole batch, so the negated delta is matched as a (scale-free, cosine) gradient.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kernels import gradient_matching_loss, pack_targets, total_variation
from service.attacks.base import (
    AttackProblem,
    AttackResult,
    Control,
    GradientTransform,
    MatchingParams,
    layer_weights,
)
from service.attacks.inverting import attack_model, attack_parameters, inverting_objective
from service.attacks.optimize import Objective, batched, optimise
from service.errors import SpecError
from service.fl import minibatch_indices, unroll_fedavg
from service.specs import FedAvgParams, Knowledge


def unroll_objective(
    problem: AttackProblem,
    params: MatchingParams,
    functional: bool,
    transform: GradientTransform | None = None,
) -> Objective:
    """Match the weight change of the client's replayed local training to the shared one
    (after `transform`, the defense-adaptive attack's replay of the update's defenses)."""
    client = problem.client
    assert client.lr is not None and client.local_epochs is not None and client.batch_size is not None
    model = attack_model(problem)
    names, targets = problem.matched()  # the client trains every parameter; some are matched
    start = attack_parameters(model, functional)
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    packed = pack_targets(targets)
    weights = layer_weights(params.layer_weights, len(names))
    cost = problem.matching_cost(params.cost)
    # the shuffling seed is a training detail: with it the client's exact order is replayed
    batches = minibatch_indices(
        problem.num_images, client.batch_size, client.local_epochs, client.shuffle_seed
    )

    def objective(x: torch.Tensor, y: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        delta = unroll_fedavg(
            model,
            start,
            buffers,
            x,
            y,
            lr=client.lr,  # type: ignore[arg-type]
            local_epochs=client.local_epochs,  # type: ignore[arg-type]
            batch_size=client.batch_size,  # type: ignore[arg-type]
            shuffle_seed=client.shuffle_seed,
            bn_mode=problem.bn_mode,  # type: ignore[arg-type]
            momentum=client.momentum or 0.0,
            label_logits=y.is_floating_point(),
            functional=functional,
            batches=batches,
        )
        trial = [delta[k] for k in names]
        if transform is not None:
            trial = transform(trial)
        loss = gradient_matching_loss(trial, packed, cost=cost, layer_weights=weights)  # type: ignore[arg-type]
        if params.tv_weight > 0:
            loss = loss + params.tv_weight * total_variation(x)
        return loss

    return objective


class FedAvgUnroll:
    name: ClassVar[str] = "fedavg_unroll"
    required_knowledge: ClassVar[Knowledge] = FedAvgParams.required_knowledge
    description: ClassVar[str] = (
        "FedAvg-aware attack: unrolls the client's local epochs differentiably when lr, epochs and "
        "batch size are known (SoK Case 1), else a single-step approximation (Case 2)"
    )

    def run(
        self,
        problem: AttackProblem,
        params: FedAvgParams,
        control: Control,
        generator: torch.Generator,
    ) -> AttackResult:
        if problem.target_kind != "delta":
            raise SpecError("fedavg_unroll attacks a FedAvg update: give a delta or weights update")
        c = problem.client
        if c.lr is not None and c.local_epochs is not None and c.batch_size is not None:
            objective = unroll_objective(problem, params, batched(control))
            case = "case1_unrolled"
        else:
            # Case 2: one step on the whole batch; -delta is proportional to the gradient, with
            # a scale the attacker does not know
            problem.target = [-t for t in problem.target]
            problem.target_scale_known = False
            objective = inverting_objective(problem, params, control)
            case = "case2_single_step"
        result = optimise(problem, params, control, generator, objective)
        result.details["fedavg_case"] = case
        return result
