"""The optimisation loop shared by the first-order attacks (Inverting Gradients, GradInversion,
the FedAvg-aware attack).

Restarts run as one batched computation: the images of all restarts are stacked, a per-restart
objective is vectorised with torch.func.vmap and differentiated with torch.func.grad, and one
Adam over the stacked tensor is exactly R independent Adams (Adam is elementwise). The best
iterate of each restart is kept by its own objective, never by the ground truth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import grad_and_value, vmap

from service.attacks.base import (
    AttackProblem,
    AttackResult,
    Control,
    coarse_projection,
    lr_factor,
    random_images,
)
from service.attacks.bn_invariance import choose_scale, fix_scale
from service.specs import InvertingGradientsParams

# objective(images (N,C,H,W), label_logits_or_labels, aux (per restart)) -> scalar loss
Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class FixedScale:
    """The scale-blind path: iterates kept at root-mean-square `rms` (normalised space), the final
    scale the largest that clips at most `clip_fraction` of the pixels."""

    rms: float
    clip_fraction: float


@dataclass
class OptimState:
    images: torch.Tensor  # (R, N, C, H, W), normalised space
    labels: torch.Tensor  # (R, N) int labels, or (R, N, K) label logits when optimised jointly
    joint_labels: bool


def initial_state(
    problem: AttackProblem, params: InvertingGradientsParams, restarts: int, generator: torch.Generator
) -> OptimState:
    n, (c, h, w) = problem.num_images, problem.image_shape
    images = random_images((restarts, n, c, h, w), params.init, generator, problem.device)
    if problem.labels is not None:
        labels = problem.labels.to(problem.device).expand(restarts, n).clone()
        return OptimState(images, labels, joint_labels=False)
    logits = torch.randn((restarts, n, problem.num_classes), generator=generator).to(problem.device)
    return OptimState(images, logits, joint_labels=True)


def optimise(
    problem: AttackProblem,
    params: InvertingGradientsParams,
    control: Control,
    generator: torch.Generator,
    objective: Objective,
    group_size: int = 1,
    init: OptimState | None = None,
    fixed_scale: FixedScale | None = None,
) -> AttackResult:
    """`fixed_scale`: the gradient is blind to the images' scale (train-mode BN after the first
    convolution, service/attacks/bn_invariance.py); every iterate is kept at one RMS and the
    winner's scale is chosen from the valid pixel range at the end."""
    restarts = control.budget.restarts
    state = init if init is not None else initial_state(problem, params, restarts, generator)
    step_fn = _batched_step(objective, state.joint_labels) if batched(control) else _single_step(objective)

    def aux(images: torch.Tensor) -> torch.Tensor:
        return _group_consensus(images, group_size)

    def report(iteration: int, best_loss: torch.Tensor) -> None:
        control.report(iteration, float(best_loss.min()))

    run = _loop(problem, params, control, state, step_fn, aux, report, fixed_scale)
    return _result(problem, control, state, run, slice(0, restarts), fixed_scale)


@dataclass
class _Run:
    best_loss: torch.Tensor
    best_images: torch.Tensor
    best_labels: torch.Tensor
    history: list[list[float]]  # per iteration: the best loss of every restart so far
    iterations: int


def _loop(
    problem: AttackProblem,
    params: InvertingGradientsParams,
    control: Control,
    state: OptimState,
    step_fn: Step,
    aux_of: Callable[[torch.Tensor], torch.Tensor],
    report: Callable[[int, torch.Tensor], None],
    fixed_scale: FixedScale | None = None,
) -> _Run:
    restarts = state.images.shape[0]
    if fixed_scale is not None:
        state.images = fix_scale(state.images, fixed_scale.rms)
    lo, hi = problem.pixel_bounds()
    coarse = params.coarse_fraction > 0
    if coarse:  # coarse-to-fine: start in (and step within) the block-constant images
        state.images = coarse_projection(state.images, params.coarse_block)
    variables = [state.images.requires_grad_(False)]
    if state.joint_labels:
        variables.append(state.labels)
    opt = torch.optim.Adam(variables, lr=params.lr)
    base_lrs = [g["lr"] for g in opt.param_groups]

    best_loss = torch.full((restarts,), float("inf"), device=problem.device)
    best_images = state.images.detach().clone()
    best_labels = state.labels.detach().clone()
    history: list[list[float]] = []
    iteration = 0
    while not control.stop(iteration):
        frac = control.fraction(iteration)
        warm = 1.0
        if params.warmup_iterations and iteration < params.warmup_iterations:
            warm = (iteration + 1) / params.warmup_iterations
        for g, base in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = base * lr_factor(params.schedule, frac) * warm

        grads, losses = step_fn(state.images, state.labels, aux_of(state.images))
        losses = losses.detach()
        if not torch.isfinite(losses).all():
            # a diverged restart restarts from its best iterate rather than poisoning the batch
            bad = ~torch.isfinite(losses)
            state.images.data[bad] = best_images[bad]
            losses = torch.where(bad, torch.full_like(losses, float("inf")), losses)
            grads = tuple(torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in grads)

        improved = losses < best_loss
        if improved.any():
            best_loss = torch.where(improved, losses, best_loss)
            best_images[improved] = state.images.detach()[improved]
            best_labels[improved] = state.labels.detach()[improved]

        if coarse and frac < params.coarse_fraction:
            # Adam is elementwise: a block-constant gradient keeps the images block-constant
            grads = (coarse_projection(grads[0], params.coarse_block), *grads[1:])
        for var, step in zip(variables, grads, strict=True):
            var.grad = step.sign() if (params.signed and var is state.images) else step
        opt.step()
        with torch.no_grad():
            if fixed_scale is not None:
                state.images.data = fix_scale(state.images, fixed_scale.rms)
            if params.boxed:
                state.images.data = torch.maximum(torch.minimum(state.images, hi), lo)

        iteration += 1
        history.append(best_loss.tolist())
        report(iteration, best_loss)
    return _Run(best_loss, best_images, best_labels, history, iteration)


def _result(
    problem: AttackProblem,
    control: Control,
    state: OptimState,
    run: _Run,
    restarts: slice,
    fixed_scale: FixedScale | None = None,
) -> AttackResult:
    """The result of the restarts `restarts` of a run: the best of them by its own loss."""
    best_loss = run.best_loss[restarts]
    winner = int(torch.argmin(best_loss))
    labels = run.best_labels[restarts][winner]
    if state.joint_labels:
        labels = labels.argmax(-1)
    images = run.best_images[restarts][winner]
    details: dict[str, object] = {"best_restart": winner, "joint_labels": state.joint_labels}
    if fixed_scale is not None:
        lo, hi = problem.pixel_bounds()
        scale = choose_scale(images, lo, hi, fixed_scale.clip_fraction)
        images = images * scale
        details["scale_invariance"] = {
            "rms": fixed_scale.rms,
            "clip_fraction": fixed_scale.clip_fraction,
            "scale": scale,
        }
    return AttackResult(
        images=problem.denormalize(images),
        labels=labels.long(),
        loss_history=[min(h[restarts]) for h in run.history],
        best_loss=float(best_loss[winner]),
        iterations=run.iterations,
        restart_losses=[float(v) for v in best_loss],
        stopped_early=control.stop_reason == "stopped",
        stop_reason=control.stop_reason,
        details=details,
    )


class _PointsControl(Control):
    """The control of points run together: their common budget, a time limit multiplied by the
    number of points (each would have had the whole limit alone, so together none gets less
    computation than alone and the total stays what one after another could take); they stop
    together once every point has asked to stop (a study's cancel or shutdown asks them all; a
    point cancelled alone runs on with the others and is then recorded as cancelled, unscored);
    progress goes to each point's own control."""

    def __init__(self, controls: list[Control]) -> None:
        budget = controls[0].budget
        if budget.time_limit_s is not None:
            budget = budget.model_copy(update={"time_limit_s": budget.time_limit_s * len(controls)})
        super().__init__(
            budget,
            should_stop=lambda: all(c.should_stop is not None and c.should_stop() for c in controls),
        )
        self.controls = controls


def optimise_points(
    problems: list[AttackProblem],
    params: InvertingGradientsParams,
    controls: list[Control],
    generators: list[torch.Generator],
    objective: Objective,
) -> list[AttackResult]:
    """Several points' attacks (one model, their own targets) as one batched computation: each
    point's restarts start where they would alone (its own generator), the points' restarts are
    stacked like restarts and vmapped together, and `objective(x, y, index)` matches restart r
    against the target of point index[r]. One Adam over the stack is independent Adams; each point
    keeps the best of its own restarts."""
    restarts = controls[0].budget.restarts
    states = [initial_state(p, params, restarts, g) for p, g in zip(problems, generators, strict=True)]
    state = OptimState(
        torch.cat([s.images for s in states]), torch.cat([s.labels for s in states]), joint_labels=False
    )
    index = torch.arange(len(problems), device=state.images.device).repeat_interleave(restarts)
    step_fn = _batched_step(objective, joint_labels=False)
    control = _PointsControl(controls)

    def report(iteration: int, best_loss: torch.Tensor) -> None:
        for i, c in enumerate(controls):
            c.report(iteration, float(best_loss[i * restarts : (i + 1) * restarts].min()))

    run = _loop(problems[0], params, control, state, step_fn, lambda _images: index, report)
    results = []
    for i, (problem, c) in enumerate(zip(problems, controls, strict=True)):
        c.stop_reason = control.stop_reason
        result = _result(problem, control, state, run, slice(i * restarts, (i + 1) * restarts))
        result.details["batched_points"] = len(problems)
        results.append(result)
    return results


def batched(control: Control) -> bool:
    """Several restarts run as one vmapped computation; a single one runs on plain autograd."""
    return control.budget.restarts > 1


Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[tuple[torch.Tensor, ...], torch.Tensor]]


def _batched_step(objective: Objective, joint_labels: bool) -> Step:
    argnums = (0, 1) if joint_labels else 0
    vectorised = vmap(grad_and_value(objective, argnums=argnums))

    def step(
        images: torch.Tensor, labels: torch.Tensor, aux: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        grads, losses = vectorised(images, labels, aux)
        return (grads if isinstance(grads, tuple) else (grads,)), losses

    return step


def _single_step(objective: Objective) -> Step:
    def step(
        images: torch.Tensor, labels: torch.Tensor, aux: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        x = images[0].detach().requires_grad_()
        joint = labels.dtype.is_floating_point
        y = labels[0].detach().requires_grad_() if joint else labels[0]
        loss = objective(x, y, aux[0])
        grads = torch.autograd.grad(loss, [x, y] if joint else [x])
        return tuple(g.unsqueeze(0) for g in grads), loss.detach().unsqueeze(0)

    return step


def _group_consensus(images: torch.Tensor, group_size: int) -> torch.Tensor:
    """GradInversion's group consistency target: the mean image of each group of restarts."""
    if group_size <= 1:
        return torch.zeros(images.shape[0], device=images.device)
    r = images.shape[0]
    consensus = torch.empty_like(images)
    for start in range(0, r, group_size):
        block = images[start : start + group_size].detach()
        consensus[start : start + group_size] = block.mean(0, keepdim=True)
    return consensus
