"""The FedAvg-aware attack: the attacker replays the client's local training differentiably.

SoK Case 1 (lr, local epochs, batch size and sample count known, level 3): the reconstruction is
trained exactly as the client trained, E epochs of ceil(N/B) SGD steps, and the resulting weight
change is matched to the client's. With lr and step count known the change's scale is known too,
so the attack uses the default attack's choices for a target of known scale: the L2 cost relative
to the target's squared norm, and the total variation counted per image. At one local step the
shared change is -lr times the FedSGD gradient and the objective equals the default attack's on
that gradient.

Facts known only roughly (candidates in the spec: an lr range, lists of epochs, batch sizes or
shuffling seeds) or not at all are searched: every combination is screened by a short run, the
best few by the attack's own objective (never the ground truth) get a second, longer screening,
and the winner gets the rest of the budget (`FedAvgParams.search_fraction`). Each hypothesis's
replayed change is rescaled to fit within the sizes (lr x steps) the candidates allow, so that a
short screen does not favour the hypothesis predicting the smallest change. With
`unknown_facts: single_step`, a fact neither known nor given as candidates falls back to Case 2
instead: the update is treated as one step on the whole batch, and the negated change is matched
as a gradient of unknown scale (cosine cost).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

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
from service.specs import SEARCH_EPOCHS, SEARCH_LRS, Budget, ClientTraining, FedAvgParams, Knowledge

MAX_SEARCH_CANDIDATES = 64


@dataclass(frozen=True)
class Facts:
    """One hypothesis of how the client trained: what the unrolled objective replays."""

    lr: float
    local_epochs: int
    batch_size: int
    shuffle_seed: int | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "local_epochs": self.local_epochs,
            "batch_size": self.batch_size,
            "shuffle_seed": self.shuffle_seed,
        }


def default_batch_sizes(num_images: int) -> list[int]:
    """Powers of two below N, and N itself (one full batch)."""
    sizes = [b for b in (2**i for i in range(12)) if b < num_images]
    return [*sizes, num_images]


def candidate_facts(client: ClientTraining, num_images: int, search_unknown: bool) -> list[Facts] | None:
    """Every hypothesis of the client's training the attack should try, exact facts first.

    A fact known exactly has one value; candidates in the spec give several; a fact neither known
    nor given takes its default plausible values when `search_unknown`, else there is no
    hypothesis to replay (None: Case 2). The shuffling seed, unknown, keeps the given order: the
    first epoch's order is arbitrary anyway (the dummy images are a set), and a real client's
    generator state is no small seed worth guessing.
    """
    cand = client.candidates
    lrs: list[float] | None = [client.lr] if client.lr is not None else None
    if lrs is None and cand is not None:
        lrs = cand.lr_values()
    epochs = [client.local_epochs] if client.local_epochs is not None else None
    if epochs is None and cand is not None:
        epochs = cand.local_epochs
    sizes = [client.batch_size] if client.batch_size is not None else None
    if sizes is None and cand is not None:
        sizes = cand.batch_size
    if sizes is None and num_images == 1:
        sizes = [1]  # one image is one batch whatever the client's batch size
    seeds: list[int | None] = [client.shuffle_seed]
    if client.shuffle_seed is None and cand is not None and cand.shuffle_seed is not None:
        seeds = cand.shuffle_seed
    if lrs is None or epochs is None or sizes is None:
        if not search_unknown:
            return None
        lrs = lrs or list(SEARCH_LRS)
        epochs = epochs or list(SEARCH_EPOCHS)
        sizes = sizes or default_batch_sizes(num_images)
    # a batch size of N or more is one full batch: keep one of them; seeds only order batches,
    # so a full batch needs one
    sizes = sorted({min(b, num_images) for b in sizes})
    combos = itertools.product(lrs, epochs, sizes, seeds)
    out = list(dict.fromkeys(Facts(lr, e, b, s if b < num_images else seeds[0]) for lr, e, b, s in combos))
    if len(out) > MAX_SEARCH_CANDIDATES:
        raise SpecError(
            f"the client's facts give {len(out)} combinations to search, more than "
            f"{MAX_SEARCH_CANDIDATES}: narrow the candidates (fewer lr points, epochs or batch sizes)"
        )
    return out


def unroll_objective(
    problem: AttackProblem,
    params: MatchingParams,
    functional: bool,
    facts: Facts | None = None,
    scale_range: tuple[float, float] | None = None,
    transform: GradientTransform | None = None,
) -> Objective:
    """Match the weight change of the client's replayed local training to the shared one.

    `facts`: the hypothesis replayed; by default the client's exact facts. With the L2 cost (the
    default where the update's scale is known), the cost is relative to the target's squared
    norm and the total variation counts per image, as in the default attack's objective.

    `scale_range` (lo, hi): the replayed change is first rescaled by the factor in [lo, hi] that
    fits the target best (least squares, clamped), for a search whose hypotheses leave the
    change's size (lr x steps) only known to a range: every hypothesis can then reach the same
    sizes, so their costs compare shapes fairly. The factor is held constant in the gradient
    (the envelope theorem: at the optimal factor its own derivative is zero).

    `transform`: the defense-adaptive attacks' replay of the update's defenses, applied to the
    replayed change before matching.
    """
    if facts is None:
        c = problem.client
        assert c.lr is not None and c.local_epochs is not None and c.batch_size is not None
        facts = Facts(c.lr, c.local_epochs, c.batch_size, c.shuffle_seed)
    model = attack_model(problem)
    names, targets = problem.matched()  # the client trains every parameter; some are matched
    start = attack_parameters(model, functional)
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    packed = pack_targets(targets)
    weights = layer_weights(params.layer_weights, len(names))
    cost = problem.matching_cost(params.cost)
    match_scale = 1.0
    if cost == "l2":
        norm = float(sum(t.double().pow(2).sum() for t in targets))
        match_scale = 1.0 / norm if norm > 0 else 1.0
    tv_scale = params.tv_weight * (problem.num_images if cost == "l2" else 1)
    # the shuffling seed is a training detail: with it the client's exact order is replayed
    batches = minibatch_indices(problem.num_images, facts.batch_size, facts.local_epochs, facts.shuffle_seed)
    momentum = problem.client.momentum or 0.0

    def objective(x: torch.Tensor, y: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        delta = unroll_fedavg(
            model,
            start,
            buffers,
            x,
            y,
            lr=facts.lr,
            local_epochs=facts.local_epochs,
            batch_size=facts.batch_size,
            shuffle_seed=facts.shuffle_seed,
            bn_mode=problem.bn_mode,  # type: ignore[arg-type]
            momentum=momentum,
            label_logits=y.is_floating_point(),
            functional=functional,
            batches=batches,
        )
        replayed = [delta[k] for k in names]
        if scale_range is not None:
            ab = sum((a * b).sum() for a, b in zip(replayed, targets, strict=True))
            aa = sum(a.pow(2).sum() for a in replayed)
            factor = (ab / aa.clamp_min(1e-30)).clamp(*scale_range).detach()  # type: ignore[union-attr]
            replayed = [factor * a for a in replayed]
        if transform is not None:
            replayed = transform(replayed)
        loss = gradient_matching_loss(replayed, packed, cost=cost, layer_weights=weights)  # type: ignore[arg-type]
        if match_scale != 1.0:
            loss = loss * match_scale
        if tv_scale > 0:
            loss = loss + tv_scale * total_variation(x)
        return loss

    return objective


def _stage_control(control: Control, iterations: int, time_s: float | None, done: int) -> Control:
    """A sub-run's control: its own iterations (and seconds, under a time limit), the job's stop
    requests, and progress reported on the job's iteration count."""
    budget = Budget(
        iterations=max(1, iterations),
        restarts=control.budget.restarts,
        time_limit_s=None if time_s is None else max(time_s, 1e-3),
    )

    def progress(iteration: int, _total: int, loss: float, restart: int | None) -> None:
        control.report(done + iteration, loss, restart)

    return Control(budget, progress=progress, should_stop=control.should_stop, started=time.monotonic())


def search(
    problem: AttackProblem,
    params: FedAvgParams,
    control: Control,
    generator: torch.Generator,
    candidates: list[Facts],
    run: Any = None,
) -> AttackResult:
    """Screen every hypothesis briefly, screen the best few longer, spend the rest on the winner.

    `search_fraction` of the budget goes to screening: half to a short run of every hypothesis
    (skipped when there are no more than `search_finalists`), half to the finalists; the winner
    then runs on what is left. All start from the same images. Hypotheses are ranked by their
    best objective value against the same target, never by the ground truth. Every hypothesis
    is screened at least once, so a budget below their number runs over it.

    The hypotheses differ in the size of the change they predict (lr x steps), and from a random
    start the relative L2 cost of one predicting too small a change stays near 1 while the right
    one starts above 1 and needs many iterations to fall below it: a short screen would favour
    the smallest. So each hypothesis's change is rescaled to fit, within the sizes the candidates
    allow (`scale_ranges`): the costs then compare how well each explains the update's course,
    and the size is only constrained as far as the candidates constrain it.
    `run(facts, control)` runs one attack; by default `optimise` on the unrolled objective.
    """
    functional = batched(control)
    ranges = scale_ranges(candidates)
    start = generator.get_state()

    def attack(facts: Facts, ctl: Control) -> AttackResult:
        generator.set_state(start)  # every hypothesis starts from the same images
        objective = unroll_objective(problem, params, functional, facts, ranges[facts])
        return optimise(problem, params, ctl, generator, objective)

    run = run or attack
    total = control.budget.iterations
    limit = control.budget.time_limit_s
    screening = params.search_fraction * total
    finalists = min(params.search_finalists, len(candidates))
    pools = [len(candidates), finalists] if len(candidates) > finalists else [finalists]
    per_stage = screening / len(pools)
    done = 0
    tried: list[dict[str, Any]] = []
    pool = list(candidates)
    latest: dict[Facts, AttackResult] = {}
    for stage, size in enumerate(pools, start=1):
        if stage > 1 and done + size > total:
            break  # a budget too small for another screening: the ranking so far stands
        iterations = max(1, int(per_stage / size))
        seconds = None if limit is None else limit * iterations / total
        scores = []
        for facts in pool:
            ctl = _stage_control(control, iterations, seconds, done)
            latest[facts] = result = run(facts, ctl)
            done += result.iterations
            scores.append(result.best_loss)
            tried.append(
                {"stage": stage, **facts.as_dict(), "iterations": result.iterations, "loss": result.best_loss}
            )
            if ctl.stop_reason == "stopped":
                control.stop_reason = "stopped"
                break
        ranked = sorted(range(len(scores)), key=lambda i: (not math.isfinite(scores[i]), scores[i]))
        pool = [pool[i] for i in ranked[: 1 if stage == len(pools) else finalists]]
        if control.stop_reason == "stopped":
            break
    winner = pool[0]
    out_of_time = limit is not None and control.elapsed >= limit
    if control.stop_reason == "stopped" or out_of_time or done >= total:
        # nothing left for a final run: the winner's screening result stands
        result, final = latest[winner], 0
        result.stop_reason = control.stop_reason or ("time_limit" if out_of_time else "iterations")
    else:
        ctl = _stage_control(control, total - done, None if limit is None else limit - control.elapsed, done)
        result = run(winner, ctl)
        final = result.iterations
        result.stop_reason = ctl.stop_reason
    result.iterations = done + final
    result.stopped_early = result.stop_reason == "stopped"
    result.details["search"] = {
        "candidates": [f.as_dict() for f in candidates],
        "screened": tried,
        "chosen": winner.as_dict(),
        "chosen_by": "the attack's own objective (matching cost and prior), never the ground truth",
        "final_iterations": final,
    }
    return result


def scale_ranges(candidates: list[Facts]) -> dict[Facts, tuple[float, float]]:
    """For each hypothesis, the factors that take its change's size (lr x local steps, the size
    to first order) to every size the candidates allow: [smallest, largest] / its own."""
    size = {f: f.lr * f.local_epochs for f in candidates}  # steps per epoch scale alike below
    lo, hi = min(size.values()), max(size.values())
    return {f: (lo / size[f], hi / size[f]) for f in candidates}


class FedAvgUnroll:
    name: ClassVar[str] = "fedavg_unroll"
    required_knowledge: ClassVar[Knowledge] = FedAvgParams.required_knowledge
    description: ClassVar[str] = (
        "FedAvg-aware attack: unrolls the client's local epochs differentiably (SoK Case 1), "
        "searching the lr, epochs, batch size or shuffling seed when they are given as candidates "
        "or unknown, by its own matching loss"
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
        candidates = candidate_facts(problem.client, problem.num_images, params.unknown_facts == "search")
        if candidates is None:
            # Case 2: one step on the whole batch; -delta is proportional to the gradient, with
            # a scale the attacker does not know
            problem.target = [-t for t in problem.target]
            problem.target_scale_known = False
            objective = inverting_objective(problem, params, control)
            result = optimise(problem, params, control, generator, objective)
            case = "case2_single_step"
        elif len(candidates) == 1:
            facts = candidates[0]
            if facts.local_epochs == 1 and facts.batch_size >= problem.num_images:
                # one step on the whole batch: the change is exactly -lr x the batch's gradient,
                # and the default attack's objective on that gradient is the unrolled one's
                problem.target = [-t / facts.lr for t in problem.target]
                objective = inverting_objective(problem, params, control)
            else:
                objective = unroll_objective(problem, params, batched(control), facts)
            result = optimise(problem, params, control, generator, objective)
            case = "case1_unrolled"
        else:
            result = search(problem, params, control, generator, candidates)
            case = "case1_searched"
        if candidates is not None:
            result.details["facts"] = (candidates[0] if len(candidates) == 1 else _chosen(result)).as_dict()
        result.details["fedavg_case"] = case
        return result


def _chosen(result: AttackResult) -> Facts:
    chosen = result.details["search"]["chosen"]  # type: ignore[index]
    return Facts(**chosen)
