"""Latent-space attacks (GIA-L): reconstruct through a generator the attacker holds.

Knowledge level 2 (the client's data distribution) means the attacker has a generator G trained on
data like the client's. Instead of optimising pixels, these attacks search G's latent space, so
every candidate is an image G can make:

- GIAS (Jeon et al. 2021): stage 1 optimises the latents z of every image by gradient matching
  through G; stage 2 fine-tunes a per-restart copy of G's weights together with z at a small
  learning rate, which lets the reconstruction leave G's range a little towards the client's image.
- GGL (Li et al. 2022): latent-only search, gradient-free (separable CMA-ES) or with Adam, and
  defense-adaptive: the update's clipping, sparsification, quantisation or sign compression is
  replayed on every trial gradient before matching (service.defenses.replay).

The matching costs, label handling and restarts are Inverting Gradients': the same objective
(service.attacks.inverting.matching_objective) evaluated at the normalised G(z), or, for a FedAvg
weight change with level 3 knowledge, the client's local training unrolled
(service.attacks.fedavg.unroll_objective). Restarts are independent random latents, batched with
torch.func.vmap; each restart keeps its best iterate by its own objective, never the ground truth.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from service.attacks.base import AttackProblem, AttackResult, Control, GradientTransform, lr_factor
from service.attacks.es import SepCMA
from service.attacks.fedavg import unroll_objective
from service.attacks.inverting import attack_model, matching_objective
from service.attacks.optimize import Objective, batched
from service.errors import SpecError
from service.jobs.budget import EVAL_CHUNK
from service.specs import GenerativeParams, GglParams, GiasParams, Knowledge

Params = dict[str, torch.Tensor]


class LatentModel:
    """The attacker's generator: latents (and labels, for a conditional one) -> normalised images.

    G runs in eval mode (batch norm on its running statistics), so a batch's images do not depend
    on each other and restarts vectorise."""

    def __init__(self, problem: AttackProblem) -> None:
        loaded = problem.image_generator
        if loaded is None:
            raise SpecError("this attack needs a generator (knowledge level 2): set attack.generator")
        self.manifest = loaded.manifest
        self.module: nn.Module = copy.deepcopy(loaded.module).to(problem.device).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.params: Params = {n: p.detach() for n, p in self.module.named_parameters()}
        self.buffers: Params = {n: b.detach() for n, b in self.module.named_buffers()}
        self.latent_dim = int(self.manifest.latent_dim)
        self.conditional = self.manifest.num_classes is not None
        mean = torch.tensor(problem.normalization.mean, device=problem.device).view(-1, 1, 1)
        std = torch.tensor(problem.normalization.std, device=problem.device).view(-1, 1, 1)
        self.mean, self.std = mean, std

    def pixels(self, z: torch.Tensor, y: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        """G(z) in [0, 1], (N, C, H, W); `y` the labels or label logits (a conditional G takes the
        most likely class)."""
        labels = None
        if self.conditional:
            labels = y.argmax(-1) if y.is_floating_point() else y
        p = self.params if params is None else params
        return functional_call(self.module, (p, self.buffers), (z, labels))  # type: ignore[no-any-return]

    def images(self, z: torch.Tensor, y: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        """G(z) in the model's normalised space."""
        return (self.pixels(z, y, params) - self.mean) / self.std


def latent_norm_prior(z: torch.Tensor) -> torch.Tensor:
    """Mean over images of (|z| / sqrt(d) - 1)^2: zero on the shell where N(0, I)'s mass lies."""
    d = z.shape[-1]
    return ((z.norm(dim=-1) / math.sqrt(d) - 1) ** 2).mean()


def image_objective(
    problem: AttackProblem,
    params: GenerativeParams,
    functional: bool,
    transform: GradientTransform | None = None,
) -> tuple[Objective, str]:
    """The matching objective on images, and which one: gradient matching (FedSGD or a
    pseudo-gradient), or the FedAvg unrolling when the target is a weight change."""
    if problem.target_kind == "delta":
        c = problem.client
        if c.lr is None or c.local_epochs is None or c.batch_size is None:
            raise SpecError("unrolling FedAvg needs the client's lr, local_epochs and batch_size (level 3)")
        return unroll_objective(problem, params, functional, transform=transform), "fedavg_unrolled"
    cost = problem.matching_cost(params.cost)
    objective = matching_objective(
        problem,
        attack_model(problem),
        functional=functional,
        cost=cost,
        weighting=params.layer_weights,
        tv_weight=params.tv_weight,
        relative_l2=True,
        tv_per_image=cost == "l2",
        transform=transform,
    )
    return objective, "gradient"


LatentLoss = Callable[[torch.Tensor, torch.Tensor, Params | None], torch.Tensor]


def latent_loss(
    gen: LatentModel, objective: Objective, prior_weight: float, device: torch.device
) -> LatentLoss:
    """loss(z, labels, generator weights or None) for one restart."""
    aux = torch.zeros((), device=device)

    def loss(z: torch.Tensor, y: torch.Tensor, gparams: Params | None) -> torch.Tensor:
        value = objective(gen.images(z, y, gparams), y, aux)
        if prior_weight > 0:
            value = value + prior_weight * latent_norm_prior(z)
        return value

    return loss


class _Best:
    """Each restart's best iterate by its own objective."""

    def __init__(self, restarts: int, z: torch.Tensor, y: torch.Tensor, pixels: torch.Tensor) -> None:
        self.loss = torch.full((restarts,), float("inf"), device=z.device)
        self.z, self.y, self.pixels = z.detach().clone(), y.detach().clone(), pixels.detach().clone()

    def update(
        self,
        losses: torch.Tensor,
        z: torch.Tensor,
        y: torch.Tensor,
        render: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        losses = torch.where(torch.isfinite(losses), losses, torch.full_like(losses, float("inf")))
        improved = losses < self.loss
        if improved.any():
            self.loss = torch.where(improved, losses, self.loss)
            self.z[improved] = z.detach()[improved]
            self.y[improved] = y.detach()[improved]
            with torch.no_grad():
                self.pixels[improved] = render(improved)


def _initial(
    problem: AttackProblem, gen: LatentModel, restarts: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    n = problem.num_images
    z = torch.randn((restarts, n, gen.latent_dim), generator=generator).to(problem.device)
    if problem.labels is not None:
        return z, problem.labels.to(problem.device).expand(restarts, n).clone(), False
    logits = torch.randn((restarts, n, problem.num_classes), generator=generator).to(problem.device)
    return z, logits, True


def _render_all(gen: LatentModel, z: torch.Tensor, y: torch.Tensor, gparams: Params | None) -> torch.Tensor:
    """G(z) in pixels for every restart (R, N, C, H, W); `gparams` stacked per restart or None."""
    with torch.no_grad():
        if gparams is None:
            flat = gen.pixels(z.flatten(0, 1), y.flatten(0, 1))
            return flat.view(*z.shape[:2], *flat.shape[1:])
        return vmap(gen.pixels)(z, y, gparams)  # type: ignore[no-any-return]


def _render_masked(
    gen: LatentModel, z: torch.Tensor, y: torch.Tensor, gparams: Params | None, mask: torch.Tensor
) -> torch.Tensor:
    return _render_all(gen, z, y, gparams)[mask]


def adam_stages(
    problem: AttackProblem,
    gen: LatentModel,
    loss: LatentLoss,
    control: Control,
    generator: torch.Generator,
    *,
    latent_lr: float,
    latent_share: float,
    generator_lr: float,
    history: list[float],
) -> tuple[_Best, int, dict[str, Any]]:
    """Stage 1: Adam on the latents (and label logits) until `latent_share` of the budget; stage 2
    (if any budget is left): Adam on the latents and a per-restart copy of G's weights."""
    restarts = control.budget.restarts
    z, y, joint = _initial(problem, gen, restarts, generator)
    best = _Best(restarts, z, y, _render_all(gen, z, y, None))
    is_batched = batched(control)
    iteration = 0
    iterations_in = [0, 0]
    for stage in (1, 2):
        if stage == 2:
            if latent_share >= 1 or control.stop(iteration):
                break
            z, y = best.z.clone(), best.y.clone()  # stage 2 starts from stage 1's best latents
        tune = stage == 2
        gparams: Params | None = None
        if tune:  # a copy of G per restart
            gparams = {
                k: v.detach().unsqueeze(0).repeat(restarts, *([1] * v.dim())) for k, v in gen.params.items()
            }
        variables: list[torch.Tensor] = [z] + ([y] if joint else [])
        groups: list[dict[str, Any]] = [{"params": variables, "lr": latent_lr}]
        if gparams is not None:
            groups.append({"params": list(gparams.values()), "lr": generator_lr})
        opt = torch.optim.Adam(groups)
        base = [g["lr"] for g in opt.param_groups]
        step = _batched_step(loss, joint, tune) if is_batched else _single_step(loss, joint, tune)
        start, end = (0.0, latent_share) if stage == 1 else (latent_share, 1.0)
        while not control.stop(iteration):
            frac = control.fraction(iteration)
            if stage == 1 and frac >= end:
                break
            local = (frac - start) / max(end - start, 1e-9)
            for group, b in zip(opt.param_groups, base, strict=True):
                group["lr"] = b * lr_factor("cosine", local)
            grads, losses = step(z, y, gparams)
            losses = losses.detach()
            if not torch.isfinite(losses).all():
                bad = ~torch.isfinite(losses)
                z.data[bad] = best.z[bad]
                grads = [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in grads]
            best.update(losses, z, y, partial(_render_masked, gen, z, y, gparams))
            tensors = variables + ([] if gparams is None else list(gparams.values()))
            for var, step_grad in zip(tensors, grads, strict=True):
                var.grad = step_grad
            opt.step()
            iteration += 1
            iterations_in[stage - 1] += 1
            value = float(best.loss.min())
            history.append(value)
            control.report(iteration, value)
    details = {
        "stage_iterations": {"latent": iterations_in[0], "generator_finetune": iterations_in[1]},
        "joint_labels": joint,
    }
    return best, iteration, details


StepFn = Callable[[torch.Tensor, torch.Tensor, Params | None], tuple[list[torch.Tensor], torch.Tensor]]


def _batched_step(loss: LatentLoss, joint: bool, tune: bool) -> StepFn:
    argnums: tuple[int, ...] = (0,) + ((1,) if joint else ()) + ((2,) if tune else ())
    fn = vmap(grad_and_value(loss, argnums=argnums), in_dims=(0, 0, 0 if tune else None))

    def step(
        z: torch.Tensor, y: torch.Tensor, gparams: Params | None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        grads, losses = fn(z, y, gparams)
        out: list[torch.Tensor] = [grads[0]] + ([grads[1]] if joint else [])
        if tune:
            out += list(grads[-1].values())
        return out, losses

    return step


def _single_step(loss: LatentLoss, joint: bool, tune: bool) -> StepFn:
    def step(
        z: torch.Tensor, y: torch.Tensor, gparams: Params | None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        zi = z[0].detach().requires_grad_()
        yi = y[0].detach().requires_grad_() if joint else y[0]
        gp = None if gparams is None else {k: v[0].detach().requires_grad_() for k, v in gparams.items()}
        value = loss(zi, yi, gp)
        inputs = [zi] + ([yi] if joint else []) + ([] if gp is None else list(gp.values()))
        grads = torch.autograd.grad(value, inputs, allow_unused=True)
        out = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs, strict=True)]
        return [g.unsqueeze(0) for g in out], value.detach().unsqueeze(0)

    return step


def cma_search(
    problem: AttackProblem,
    gen: LatentModel,
    loss: LatentLoss,
    control: Control,
    generator: torch.Generator,
    *,
    population: int,
    sigma: float,
    history: list[float],
) -> tuple[_Best, int, dict[str, Any]]:
    """Separable CMA-ES over each restart's latents (N x latent_dim), one generation per
    iteration; candidates are scored by the objective alone (no gradient w.r.t. the latents)."""
    if problem.labels is None:
        raise SpecError(
            "ggl with optimizer 'cma' searches latents only: it needs labels (label_strategy auto, "
            "known or infer), or use optimizer 'adam' for joint label optimisation"
        )
    restarts, n, d = control.budget.restarts, problem.num_images, gen.latent_dim
    z0 = torch.randn((restarts, n, d), generator=generator).to(problem.device)
    labels = problem.labels.to(problem.device)
    y = labels.expand(restarts, n).clone()
    best = _Best(restarts, z0, y, _render_all(gen, z0, y, None))
    es = SepCMA(z0.flatten(1), sigma, population, generator)
    evaluate = vmap(lambda zz: loss(zz, labels, None), chunk_size=EVAL_CHUNK)
    iteration = 0
    while not control.stop(iteration):
        candidates = es.ask()  # (R, lam, n*d)
        with torch.no_grad():
            values = evaluate(candidates.reshape(-1, n, d)).view(restarts, population)
        values = torch.where(torch.isfinite(values), values, torch.full_like(values, float("inf")))
        es.tell(values)
        gen_best, idx = values.min(1)
        z_best = candidates[torch.arange(restarts), idx].view(restarts, n, d)
        best.update(gen_best, z_best, y, partial(_render_masked, gen, z_best, y, None))
        iteration += 1
        value = float(best.loss.min())
        history.append(value)
        control.report(iteration, value)
    details = {
        "es": "separable CMA-ES (diagonal covariance)",
        "population": population,
        "evaluations": iteration * population * restarts,
        "final_sigma": [float(s) for s in es.sigma],
        "joint_labels": False,
    }
    return best, iteration, details


def _result(
    problem: AttackProblem,
    best: _Best,
    iterations: int,
    history: list[float],
    control: Control,
    details: dict,
) -> AttackResult:
    winner = int(torch.argmin(best.loss))
    labels = best.y[winner]
    if labels.is_floating_point():
        labels = labels.argmax(-1)
    manifest = problem.image_generator.manifest
    details = {
        "best_restart": winner,
        "generator": {
            "arch": manifest.arch,
            "latent_dim": manifest.latent_dim,
            "trained_on": manifest.trained_on,
        },
        **details,
    }
    return AttackResult(
        images=best.pixels[winner].clamp(0, 1),
        labels=labels.long(),
        loss_history=history,
        best_loss=float(best.loss[winner]),
        iterations=iterations,
        restart_losses=[float(v) for v in best.loss],
        stopped_early=control.stop_reason == "stopped",
        stop_reason=control.stop_reason,
        details=details,
    )


class Gias:
    name: ClassVar[str] = "gias"
    required_knowledge: ClassVar[Knowledge] = GiasParams.required_knowledge
    description: ClassVar[str] = (
        "GIAS (Jeon et al. 2021), a latent-space attack (GIA-L): gradient matching over a generator's "
        "latents, then over the latents and a per-restart copy of the generator's weights; needs a "
        "generator trained on data like the client's (level 2). FedSGD, or FedAvg unrolled at level 3. "
        "Measured (bench/results/generative-cpu.json, ConvNet 32x32, equal CPU budget): above "
        "inverting_gradients from batch 4 and on an early-round model, not at batch 1 untrained"
    )

    def run(
        self, problem: AttackProblem, params: GiasParams, control: Control, generator: torch.Generator
    ) -> AttackResult:
        gen = LatentModel(problem)
        objective, kind = image_objective(problem, params, batched(control))
        loss = latent_loss(gen, objective, params.latent_prior_weight, problem.device)
        history: list[float] = []
        best, iterations, details = adam_stages(
            problem,
            gen,
            loss,
            control,
            generator,
            latent_lr=params.latent_lr,
            latent_share=params.latent_share,
            generator_lr=params.generator_lr,
            history=history,
        )
        details["objective"] = kind
        return _result(problem, best, iterations, history, control, details)


class Ggl:
    name: ClassVar[str] = "ggl"
    required_knowledge: ClassVar[Knowledge] = GglParams.required_knowledge
    description: ClassVar[str] = (
        "GGL (Li et al. 2022), a latent-space attack (GIA-L): latent-only search through a generator "
        "trained on data like the client's (level 2), gradient-free (separable CMA-ES) or with Adam; "
        "replays the update's clipping, top-k, quantisation or sign on its trial gradients. FedSGD, or "
        "FedAvg unrolled at level 3. Measured (bench/results/generative-cpu.json): its CMA-ES trails gias "
        "at an equal CPU budget"
    )

    def run(
        self, problem: AttackProblem, params: GglParams, control: Control, generator: torch.Generator
    ) -> AttackResult:
        from service.defenses.replay import detect_topk, plan_replay
        from service.specs import TopKDefense

        gen = LatentModel(problem)
        replay = None
        adaptive: dict[str, Any] = {"enabled": params.adaptive_defenses}
        if params.adaptive_defenses:
            defenses = list(problem.defenses)
            if not any(isinstance(d, TopKDefense) for d in defenses):
                seen = detect_topk(problem.target)
                if seen is not None:
                    defenses.insert(0, TopKDefense(ratio=seen))
                    adaptive["detected"] = f"top-k with ratio {seen:.4g} in the update's zero pattern"
            replay = plan_replay(defenses, problem.update_scale)
            adaptive["replayed"] = replay.describe()
            adaptive["not_replayed"] = replay.skipped
            if not replay.steps:
                replay = None
        functional = params.optimizer == "cma" or batched(control)
        objective, kind = image_objective(problem, params, functional, replay)
        loss = latent_loss(gen, objective, params.latent_prior_weight, problem.device)
        history: list[float] = []
        if params.optimizer == "cma":
            best, iterations, details = cma_search(
                problem,
                gen,
                loss,
                control,
                generator,
                population=params.population,
                sigma=params.sigma,
                history=history,
            )
        else:
            best, iterations, details = adam_stages(
                problem,
                gen,
                loss,
                control,
                generator,
                latent_lr=params.latent_lr,
                latent_share=1.0,
                generator_lr=0.0,
                history=history,
            )
        details["objective"] = kind
        details["adaptive_defenses"] = adaptive
        details["optimizer"] = params.optimizer
        return _result(problem, best, iterations, history, control, details)
