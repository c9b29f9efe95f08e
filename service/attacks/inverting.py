"""Inverting Gradients (Geiping et al., 2020) and GradInversion (Yin et al., 2021).

Inverting Gradients: cosine gradient matching + total variation, Adam on signed gradients with
step decay, pixels boxed to the valid range, several restarts. GradInversion adds a prior that
pulls the batch-norm statistics of the reconstruction to the client's (level 4 knowledge) and a
group-consistency term across restarts.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from kernels import gradient_matching_loss, pack_targets, total_variation
from service.attacks.base import AttackProblem, AttackResult, Control, GradientTransform, layer_weights
from service.attacks.bn_invariance import scale_invariant
from service.attacks.conv_grads import ConvTaps
from service.attacks.gauss_newton import apply_finish
from service.attacks.optimize import FixedScale, Objective, batched, optimise
from service.attacks.stage_map import StageMap, stage_map_for, stage_objective
from service.errors import SpecError
from service.specs import GradInversionParams, InvertingGradientsParams, Knowledge


def attack_model(problem: AttackProblem) -> nn.Module:
    """The model as the attacker runs it: BN in the client's mode, dropout off.

    BN in train mode uses batch statistics without tracking running ones, which is what the
    client's forward pass computed and what torch.func.vmap can batch. BN in eval mode is an
    affine map per channel and runs as one (`_eval_batch_norm_as_affine`).
    """
    model = problem.model
    model.eval()
    if problem.bn_mode == "train":
        torch.func.replace_all_batch_norm_modules_(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if problem.bn_mode == "train":
                m.train()
            elif m.running_mean is not None and m.running_var is not None:
                m.forward = types.MethodType(_eval_batch_norm_as_affine, m)  # type: ignore[method-assign]
    return model


def _eval_batch_norm_as_affine(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Batch norm in eval mode written as x * scale + shift, with scale and shift built from the
    weight, bias and running statistics. It has the same value and the same gradients w.r.t. x,
    weight and bias as batch norm's kernel, but its second-order graph is two elementwise ops
    instead of batch norm's generic double backward (about 5 % of a ResNet-18 iteration on a CPU).
    """
    if self.training:  # only the attacker's eval-mode copy is patched; never rewrite training
        return type(self).forward(self, x)
    assert self.running_mean is not None and self.running_var is not None
    scale = torch.rsqrt(self.running_var + self.eps)
    if self.weight is not None:
        scale = scale * self.weight
    shift = -self.running_mean * scale
    if self.bias is not None:
        shift = shift + self.bias
    view = (1, -1) + (1,) * (x.dim() - 2)
    return x * scale.view(view) + shift.view(view)


def soft_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with int labels, or with label logits optimised jointly (DLG)."""
    if labels.dtype.is_floating_point:
        return torch.sum(-F.softmax(labels, -1) * F.log_softmax(logits, -1), -1).mean()
    return F.cross_entropy(logits, labels)


class BNStatsRecorder:
    """Collects (mean, var) of every BN layer's input during one forward pass."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        for m in self.layers:
            m.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0]
        dims = [0, *range(2, x.dim())]
        self.stats.append((x.mean(dims), x.var(dims)))  # unbiased, as running_var keeps it


def parameter_gradients(
    loss_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    params: dict[str, torch.Tensor],
    *args: torch.Tensor,
    functional: bool,
    taps: ConvTaps | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """d loss / d params, differentiable w.r.t. `args`; `loss_fn` returns (loss, aux).

    `functional` uses torch.func.grad, which composes with vmap (batched restarts); otherwise
    plain autograd with create_graph, which is faster for a single restart. In plain mode
    `params` must be leaves that require grad, and `taps` (installed on the model that `loss_fn`
    runs) give the convolutions' gradients a leaner second-order graph.
    """
    if functional:
        return grad(loss_fn, has_aux=True)(params, *args)  # type: ignore[no-any-return]
    if taps is not None:
        with taps.recording():
            loss, aux = loss_fn(params, *args)
        return taps.gradients(loss, params), aux
    loss, aux = loss_fn(params, *args)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    return dict(zip(params, grads, strict=True)), aux


def attack_parameters(model: nn.Module, functional: bool) -> dict[str, torch.Tensor]:
    """The server's weights as the inputs of the client's loss (leaves with grad in plain mode)."""
    return {n: p.detach().requires_grad_(not functional) for n, p in model.named_parameters()}


def matching_objective(
    problem: AttackProblem,
    model: nn.Module,
    *,
    functional: bool,
    cost: str,
    weighting: str = "uniform",
    tv_weight: float = 0.0,
    bn_weight: float = 0.0,
    group_weight: float = 0.0,
    relative_l2: bool = False,
    tv_per_image: bool = False,
    transform: GradientTransform | None = None,
) -> Objective:
    """The attack objective of one restart: gradient matching plus the chosen priors.

    `relative_l2` divides the L2 cost by the target's squared norm, so that the priors' weights
    mean the same whatever the model (a ResNet-18's gradient of one image has a squared norm of
    ~1e3, a small ConvNet's ~1). `tv_per_image` sums the images' total variations (N times their
    mean), so each image of a batch keeps the prior it would have alone. Its matching term does
    not: the target of a batch is the mean of its images' gradients, in which each image weighs
    1/N, and its squared norm falls by less than N^2 (~1450 for one ResNet-18 image, ~220 for the
    mean of four), so under the relative cost an error in one image's gradient costs about
    1450 / (16 * 220) = 0.41 times what it costs alone. A batch-mean TV would cut each image's
    prior to 1/N on top of that. A batch is the less determined problem, and measurements favour
    the stronger prior (batch 4: bench/results/attacks-cpu-*-b4-tv.json; the weight itself:
    attacks-cpu-sweep-tv.json).
    """
    names, targets = problem.matched()
    chosen = set(names)
    model_params = {n: p for n, p in attack_parameters(model, functional).items() if n in chosen}
    # parameters whose gradients are not matched are constants of the client's loss
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in model_params}
    taps = None if functional else ConvTaps(model, model_params)
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    packed = pack_targets(targets)
    weights = layer_weights(weighting, len(names))
    recorder = BNStatsRecorder(model) if bn_weight > 0 else None
    bn_targets = problem.bn_targets or []
    match_scale = 1.0
    if relative_l2 and cost == "l2":
        norm = float(sum(t.double().pow(2).sum() for t in targets))
        match_scale = 1.0 / norm if norm > 0 else 1.0
    tv_scale = tv_weight * (problem.num_images if tv_per_image else 1)

    def client_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
        if recorder is not None:
            recorder.stats.clear()
        out = functional_call(model, ({**fixed, **p} if fixed else p, buffers), (x,))
        loss = soft_cross_entropy(out, y)
        bn = x.new_zeros(())
        if recorder is not None:
            for (mu, var), (t_mu, t_var) in zip(recorder.stats, bn_targets, strict=True):
                bn = bn + torch.linalg.vector_norm(mu - t_mu) + torch.linalg.vector_norm(var - t_var)
        return loss, bn

    def objective(x: torch.Tensor, y: torch.Tensor, consensus: torch.Tensor) -> torch.Tensor:
        g, bn = parameter_gradients(client_loss, model_params, x, y, functional=functional, taps=taps)
        trial = [g[n] for n in names]
        if transform is not None:
            trial = transform(trial)
        loss = gradient_matching_loss(trial, packed, cost=cost, layer_weights=weights)  # type: ignore[arg-type]
        if match_scale != 1.0:
            loss = loss * match_scale
        if tv_scale > 0:
            loss = loss + tv_scale * total_variation(x)
        if bn_weight > 0:
            loss = loss + bn_weight * bn
        if group_weight > 0:
            loss = loss + group_weight * (x - consensus).pow(2).mean()
        return loss

    return objective


def inverting_objective(
    problem: AttackProblem,
    params: InvertingGradientsParams,
    control: Control,
    *,
    bn_weight: float = 0.0,
    group_weight: float = 0.0,
) -> Objective:
    """The Inverting Gradients objective built from the attack's parameters (and GradInversion's
    extra priors), batched over restarts when the budget asks for several. With the (relative)
    L2 cost the TV weight counts per image; the cosine costs keep breaching's batch mean."""
    cost = problem.matching_cost(params.cost)
    return matching_objective(
        problem,
        attack_model(problem),
        functional=batched(control),
        cost=cost,
        weighting=params.layer_weights,
        tv_weight=params.tv_weight,
        bn_weight=bn_weight,
        group_weight=group_weight,
        relative_l2=True,
        tv_per_image=cost == "l2",
    )


def points_objective(problems: list[AttackProblem], params: InvertingGradientsParams) -> Objective:
    """Inverting Gradients' objective for points that share one model (same weights, matched
    parameters, cost and image shape) but not their targets: `objective(x, y, index)` is point
    `index`'s objective at x, as `inverting_objective` builds it for that point alone (batched
    form), for `optimise_points` to vectorise over the points' restarts."""
    first = problems[0]
    cost = first.matching_cost(params.cost)
    model = attack_model(first)
    names = first.matched()[0]
    chosen = set(names)
    model_params = {n: p for n, p in attack_parameters(model, True).items() if n in chosen}
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in model_params}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    weights = layer_weights(params.layer_weights, len(names))
    # per layer, the points' targets stacked: (P, *shape)
    targets = [torch.stack(list(layer)) for layer in zip(*(p.matched()[1] for p in problems), strict=True)]
    scales = torch.ones(len(problems), device=first.device)
    if cost == "l2":  # relative L2: each point's target's squared norm
        norms = [float(sum(t.double().pow(2).sum() for t in p.matched()[1])) for p in problems]
        scales = torch.tensor([1.0 / n if n > 0 else 1.0 for n in norms], device=first.device)
    tv_scale = params.tv_weight * (first.num_images if cost == "l2" else 1)

    def client_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, ({**fixed, **p} if fixed else p, buffers), (x,))
        return soft_cross_entropy(out, y)

    def objective(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        g = grad(client_loss)(model_params, x, y)
        target = [t.index_select(0, index.reshape(1)).squeeze(0) for t in targets]
        # the plain-torch kernels: vmap batches them over the points (their targets included)
        loss = gradient_matching_loss(
            [g[n] for n in names],
            target,
            cost=cost,  # type: ignore[arg-type]
            layer_weights=weights,
            backend="reference",
        )
        loss = loss * scales.index_select(0, index.reshape(1)).squeeze(0)
        if tv_scale > 0:
            loss = loss + tv_scale * total_variation(x, backend="reference")
        return loss

    return objective


def fixed_scale_for(problem: AttackProblem, params: InvertingGradientsParams) -> FixedScale | None:
    """The scale-blind path's settings when the spec allows it and the client's gradient is
    blind to the images' scale (service/attacks/bn_invariance.py), else None. The check's probe
    images come from a fixed seed of their own, so the attack's random draws stay as they were."""
    if params.scale_invariance == "off":
        return None
    if not scale_invariant(problem, attack_model(problem), torch.Generator().manual_seed(0)):
        return None
    return FixedScale(rms=params.scale_rms, clip_fraction=params.clip_fraction)


class InvertingGradients:
    name: ClassVar[str] = "inverting_gradients"
    required_knowledge: ClassVar[Knowledge] = InvertingGradientsParams.required_knowledge
    description: ClassVar[str] = (
        "Inverting Gradients (Geiping et al. 2020): gradient matching with a total-variation prior, "
        "signed Adam, boxed pixels, batched restarts (cost and schedule: see its parameters)"
    )

    def run(
        self,
        problem: AttackProblem,
        params: InvertingGradientsParams,
        control: Control,
        generator: torch.Generator,
    ) -> AttackResult:
        fixed = fixed_scale_for(problem, params)  # before the objective installs its taps
        model = attack_model(problem)
        stage = stage_map_for(problem, model, params.stage_map, control)
        if isinstance(stage, StageMap):
            objective = stage_objective(problem, model, stage, params.tv_weight)
        else:
            objective = inverting_objective(problem, params, control)
        result = optimise(problem, params, control, generator, objective, fixed_scale=fixed)
        if isinstance(stage, StageMap):
            result.details["stage_map"] = stage.details
        elif problem.bn_mode == "train" and stage != "off":
            result.details["stage_map"] = {"applied": False, "why": stage}
        return apply_finish(problem, params.finish_steps, control, result)


class GradInversion:
    name: ClassVar[str] = "gradinversion"
    required_knowledge: ClassVar[Knowledge] = GradInversionParams.required_knowledge
    description: ClassVar[str] = (
        "GradInversion (Yin et al. 2021): Inverting Gradients plus the client's batch-norm "
        "statistics as a prior and group consistency across restarts"
    )

    def run(
        self,
        problem: AttackProblem,
        params: GradInversionParams,
        control: Control,
        generator: torch.Generator,
    ) -> AttackResult:
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in problem.model.modules())
        if not has_bn or not problem.bn_targets:
            raise SpecError(
                "gradinversion needs a model with batch-norm layers and the client's BN statistics"
            )
        # the client's BN statistics pin the scale (the first BN's input statistics scale with the
        # images), so the scale-blind path is for a run without that prior only
        fixed = fixed_scale_for(problem, params) if params.bn_weight == 0 else None
        objective = inverting_objective(
            problem, params, control, bn_weight=params.bn_weight, group_weight=params.group_weight
        )
        result = optimise(
            problem, params, control, generator, objective, group_size=params.group_size, fixed_scale=fixed
        )
        result.details["bn_statistics"] = problem.bn_source
        return apply_finish(problem, params.finish_steps, control, result)
