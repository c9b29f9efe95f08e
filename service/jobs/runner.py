"""The one runner: JobSpec -> result manifest + artifacts. The CLI, the in-process worker and the
arq worker all call `run_job`; there is no second code path."""

from __future__ import annotations

import copy
import json
import math
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import torch
from torch import nn

from service import __version__
from service.attacks import ATTACKS, AttackProblem, AttackResult, Control
from service.attacks.base import select_parameters
from service.attacks.labels import idlg_label, infer_label_counts, last_layer_grads
from service.data import load_images, normalize
from service.defenses import apply_defenses
from service.errors import ArtifactError, SpecError
from service.federations.spec import FederationSpec
from service.fl import batch_bn_statistics_from_update, delta_to_pseudo_gradient, simulate_client
from service.jobs.allocator import keep_freed_memory
from service.jobs.convergence import convergence, limits
from service.jobs.report import render_grid_png, render_report_html
from service.jobs.types import (
    CONTENT_TYPES,
    GRID_PNG,
    METRICS_JSON,
    RECONSTRUCTION,
    REPORT_HTML,
    JobContext,
    JobResult,
    Progress,
)
from service.metrics import score
from service.models import build_model
from service.settings import get_settings
from service.specs import SOURCE_ARCHS, ClientTraining, JobSpec, Knowledge
from service.tensorio import STATE_DTYPES, load_safetensors, match_state, save_safetensors

PROGRESS_INTERVAL_S = 0.25


@dataclass
class Victim:
    """What the client shared, and (for scoring only) what it trained on."""

    update: dict[str, torch.Tensor]  # parameter part, in the spec's update kind
    buffers: dict[str, torch.Tensor]  # float buffers the update carried (BN running statistics)
    truth_images: torch.Tensor | None  # (N, C, H, W) in [0, 1]
    truth_labels: torch.Tensor | None
    client_bn_stats: list[tuple[torch.Tensor, torch.Tensor]] | None  # measured on the client's batch


def pick_device(requested: str | None) -> torch.device:
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise SpecError(f"device {requested!r} requested but CUDA is not available here")
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_job(spec: JobSpec | FederationSpec, ctx: JobContext) -> JobResult:
    """Run a job, or a federation (FedAvg over rounds whose audits are jobs run through here)."""
    if isinstance(spec, FederationSpec):
        from service.federations.loop import run_federation

        return run_federation(spec, ctx)
    try:
        return _run(spec, ctx)
    except ValueError as e:
        # torch's own words for a BN layer that sees one value per channel in train mode
        if "Expected more than 1 value per channel" in str(e):
            raise SpecError(
                f"{spec.model.arch} at {spec.data.shape[1]}x{spec.data.shape[2]} reduces a batch of "
                "this size to one value per channel before a batch-norm layer, which train mode "
                "cannot normalise: use more images, larger images, or the client's bn_mode 'eval'"
            ) from None
        raise


def _run(spec: JobSpec, ctx: JobContext) -> JobResult:
    try:
        return _run_stages(spec, ctx)
    except _Stopped as stop:
        # Stopped before the attack had a result (or while scoring it): nothing worth keeping.
        manifest = {"job_id": ctx.job_id, "status": "cancelled", "stopped_in": stop.stage}
        return JobResult(status="cancelled", manifest=manifest, artifacts={})


class _Stopped(Exception):
    """`ctx.should_stop` answered True outside the attack loop."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        super().__init__(stage)


def _checkpoint(ctx: JobContext, stage: str) -> None:
    if ctx.should_stop is not None and ctx.should_stop():
        raise _Stopped(stage)


@contextmanager
def _interruptible(model: nn.Module, ctx: JobContext) -> Iterator[Callable[[nn.Module], None]]:
    """While open, every forward pass through `model`, or a copy of it made meanwhile (the
    simulated client's, label inference's), checks for a stop before each layer, so a cancel
    during a long setup step lands within one layer's time. Yields a function that removes the
    checks from a copy that lives on (the attack's model)."""
    if ctx.should_stop is None:
        yield lambda _copy: None
        return

    def check(_module: nn.Module, _inputs: Any) -> None:
        _checkpoint(ctx, "setup")

    handles = [m.register_forward_pre_hook(check) for m in model.modules()]
    ids = {h.id for h in handles}

    def strip(copy: nn.Module) -> None:
        for m in copy.modules():
            for hook_id in ids:
                m._forward_pre_hooks.pop(hook_id, None)

    try:
        yield strip
    finally:
        for h in handles:
            h.remove()


def _run_stages(spec: JobSpec, ctx: JobContext) -> JobResult:
    if get_settings().malloc_tuning:
        keep_freed_memory()
    started = time.monotonic()
    timings: dict[str, float] = {}
    emit = _Emitter(ctx, started)
    spec.check_knowledge()
    emit(Progress(stage="setup", message="building the model and the client's update"))

    device = pick_device(ctx.device)
    generator = torch.Generator().manual_seed(spec.seed)
    _checkpoint(ctx, "setup")
    model = build_model(spec.model, spec.data, resolve=ctx.resolve).to(device)
    if spec.attack.match_layers:  # refused before the client's update is simulated
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        select_parameters(trainable, spec.attack.match_layers)
    _checkpoint(ctx, "setup")
    image_generator = attack_generator(spec, ctx)
    with _interruptible(model, ctx) as strip:
        victim = _victim(spec, model, ctx, generator, device)
        _checkpoint(ctx, "setup")
        problem = problem_for(spec, model, victim, generator, device, image_generator=image_generator)
        strip(problem.model)
    if ctx.memory_limit_bytes is not None:
        _check_budget(spec, problem, ctx.memory_limit_bytes)
    _checkpoint(ctx, "setup")
    timings["setup_s"] = time.monotonic() - started

    control = Control(spec.budget, progress=emit.attack_progress, should_stop=ctx.should_stop)
    t = time.monotonic()
    attack = ctx.attack or ATTACKS.get(spec.attack.name).run
    result = attack(problem, spec.attack, control, generator)
    timings["attack_s"] = time.monotonic() - t
    timings["iterations_per_s"] = result.iterations / max(timings["attack_s"], 1e-9)

    emit(Progress(stage="scoring", iteration=result.iterations, total=spec.budget.iterations))
    t = time.monotonic()
    metrics: dict | None = None
    unavailable: str | None = "no ground truth was given"
    stopped = result.stop_reason == "stopped" or (ctx.should_stop is not None and ctx.should_stop())
    if stopped:
        # a stopped run is not scored: its worker is wanted elsewhere
        unavailable = "the run was stopped before scoring"
    elif victim.truth_images is not None and len(victim.truth_images) != len(result.images):
        unavailable = (
            f"the attack reconstructed {len(result.images)} images (count {problem.num_images_source}) "
            f"but the ground truth has {len(victim.truth_images)}: give data.num_images to score"
        )
    elif victim.truth_images is not None:
        metrics = score(
            result.images.cpu(),
            victim.truth_images.cpu(),
            recon_labels=result.labels.tolist(),
            true_labels=None if victim.truth_labels is None else victim.truth_labels.tolist(),
            lpips_weights_dir=ctx.lpips_weights_dir,
            device=device,
        )
        unavailable = None
    timings["scoring_s"] = time.monotonic() - t

    estimate, shadows_png = None, None
    wanted = spec.verdict.when == "always" or (spec.verdict.when == "auto" and victim.truth_images is None)
    if wanted and not stopped:
        from service.verdict import estimate_leakage

        t = time.monotonic()
        estimate, shadows_png = estimate_leakage(
            spec, model, problem, result, victim.truth_images, metrics, ctx, device, progress=emit.throttled
        )
        timings["estimate_s"] = time.monotonic() - t
    status: Literal["succeeded", "cancelled"] = "cancelled" if stopped else "succeeded"
    manifest = {
        "job_id": ctx.job_id,
        "status": status,
        "spec": json.loads(spec.to_json()),
        "seed": spec.seed,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": versions(),
        "device": device_info(device),
        "timings": timings,
        "attack": {
            "name": spec.attack.name,
            "iterations": result.iterations,
            "stop_reason": result.stop_reason,
            "best_loss": _finite(result.best_loss),
            "restart_losses": [_finite(v) for v in result.restart_losses],
            "convergence": convergence(spec.attack.name, spec.model.arch, result.iterations),
            "limits": limits(problem.bn_mode, model, _stage_map_applied(result.details)),
            "num_images": problem.num_images,
            "num_images_source": problem.num_images_source,
            "labels": result.labels.tolist(),
            "label_source": problem.label_source,
            "bn_mode": problem.bn_mode,
            "target_kind": problem.target_kind,
            "matching_cost": problem.matching_cost(getattr(spec.attack, "cost", "l2")),
            "defenses": [d.model_dump() for d in spec.defenses],
            "matched_parameters": len(problem.matched()[0]),
            "generator": generator_record(image_generator),
            "details": result.details,
        },
        "metrics": metrics,
        "metrics_unavailable": unavailable,
        "estimate": estimate,
    }
    artifacts = _write_artifacts(spec, ctx, result, victim, manifest, shadows_png)
    timings["total_s"] = time.monotonic() - started
    manifest["artifacts"] = artifacts
    key = f"{ctx.prefix}/{METRICS_JSON}"
    ctx.store.put_bytes(key, json.dumps(manifest, indent=2).encode(), CONTENT_TYPES[METRICS_JSON])
    artifacts[METRICS_JSON] = key
    emit(
        Progress(
            stage="done",
            iteration=result.iterations,
            total=spec.budget.iterations,
            elapsed_s=time.monotonic() - started,
        )
    )
    return JobResult(status=status, manifest=manifest, artifacts=artifacts)


# --------------------------------------------------------------------------------------------
# the victim: a simulated client, or an uploaded update
# --------------------------------------------------------------------------------------------


def _stage_map_applied(details: dict[str, Any]) -> bool:
    info = details.get("stage_map")
    return isinstance(info, dict) and info.get("applied") is True


def _check_budget(spec: JobSpec, problem: AttackProblem, limit_bytes: int) -> None:
    """The memory estimate again, now that the image count is known (inferred from the update
    when the spec did not say): refuse before the attack allocates its graph."""
    from service.jobs.budget import check_memory

    module = problem.model if spec.model.arch in SOURCE_ARCHS else None
    check_memory(spec, limit_bytes, num_images=problem.num_images, module=module)


def _victim(
    spec: JobSpec, model: nn.Module, ctx: JobContext, generator: torch.Generator, device: torch.device
) -> Victim:
    sim = spec.update.simulate
    if sim is not None:
        c, h, w = spec.data.shape
        if h != w:
            raise SpecError("simulated clients use square images")
        images, dataset_labels = load_images(sim.source, sim.images, size=h, channels=c, path=sim.path)
        if sim.labels is not None:
            labels = torch.tensor(sim.labels, dtype=torch.long)
        elif dataset_labels is not None:
            labels = torch.as_tensor(dataset_labels, dtype=torch.long) % spec.data.num_classes
        else:
            labels = torch.arange(len(sim.images)) % spec.data.num_classes
        return simulated_victim(spec, model, images.to(device), labels.to(device), sim.training)

    assert spec.update.artifact is not None
    tensors = load_safetensors(ctx.resolve(spec.update.artifact), allowed_dtypes=STATE_DTYPES, name="update")
    matched = match_state(model, tensors, what=spec.update.kind)
    params, buffers = _split(model, {k: v.to(device) for k, v in matched.items()}, spec.update.kind)
    truth_images = truth_labels = None
    if spec.ground_truth is not None:
        truth = load_safetensors(
            ctx.resolve(spec.ground_truth), allowed_dtypes=(*STATE_DTYPES, "I32"), name="ground_truth"
        )
        truth_images, truth_labels = _ground_truth(truth, spec)
    return Victim(params, buffers, truth_images, truth_labels, None)


def simulated_victim(
    spec: JobSpec, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, training: ClientTraining
) -> Victim:
    """A client that trains on `images` (in [0, 1]) as `training` says and shares spec.update.kind."""
    x = normalize(images, spec.data.resolved_normalization())
    bn_stats = _client_bn_stats(model, x) if training.bn_mode != "eval" else None
    shared = simulate_client(copy.deepcopy(model), x, labels, training, spec.update.kind)
    params, buffers = _split(model, shared, spec.update.kind)
    return Victim(params, buffers, images, labels, bn_stats)


def problem_for(
    spec: JobSpec,
    model: nn.Module,
    victim: Victim,
    generator: torch.Generator,
    device: torch.device,
    image_generator: Any = None,
) -> AttackProblem:
    """The attack's problem for a victim's update, after the spec's defenses (drawn from `generator`);
    `image_generator` is the loaded generator of a latent-space attack (`attack_generator`)."""
    update = victim.update
    if spec.defenses:
        update = apply_defenses(_as_delta_or_gradient(spec, model, update), list(spec.defenses), generator)
    problem = _problem(spec, model, update, victim, device)
    problem.image_generator = image_generator
    return problem


def attack_generator(spec: JobSpec, ctx: JobContext) -> Any:
    """The generator a latent-space attack holds (knowledge level 2), loaded from its artifact and
    checked against the spec's data: None for an attack without one."""
    ref = getattr(spec.attack, "generator", None)
    if ref is None:
        return None
    from service.generators import load_generator

    loaded = load_generator(ctx.resolve(ref))
    m = loaded.manifest
    if tuple(m.image_shape) != tuple(spec.data.shape):
        raise SpecError(
            f"attack.generator makes images of shape {_dims(m.image_shape)} but data.shape is "
            f"{_dims(spec.data.shape)}: use a generator trained at the client's image size"
        )
    if m.num_classes is not None and m.num_classes != spec.data.num_classes:
        raise SpecError(
            f"attack.generator is conditioned on {m.num_classes} classes but data.num_classes is "
            f"{spec.data.num_classes}"
        )
    return loaded


def generator_record(loaded: Any) -> dict[str, Any] | None:
    """What a job's manifest says about the attacker's generator: its architecture and the data it
    was trained on (in-distribution or not is judged against the client's data)."""
    if loaded is None:
        return None
    m = loaded.manifest
    return {
        "arch": m.arch,
        "latent_dim": m.latent_dim,
        "image_shape": list(m.image_shape),
        "num_classes": m.num_classes,
        "trained_on": m.trained_on,
    }


def _dims(shape: Any) -> str:
    return "x".join(str(v) for v in shape)


def _split(
    model: nn.Module, shared: dict[str, torch.Tensor], kind: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: shared[n].float() for n in names}
    buffers = {n: v.float() for n, v in shared.items() if n not in params and v.is_floating_point()}
    return params, buffers


def _ground_truth(truth: dict[str, torch.Tensor], spec: JobSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    if "images" not in truth:
        raise ArtifactError("ground truth needs a tensor named 'images' (N, C, H, W) with values in [0, 1]")
    images = truth["images"].float()
    if images.dim() != 4 or tuple(images.shape[1:]) != spec.data.shape:
        raise ArtifactError(
            f"ground-truth images have shape {list(images.shape)}; "
            f"expected [N, {', '.join(map(str, spec.data.shape))}]"
        )
    if images.min() < 0 or images.max() > 1:
        raise ArtifactError("ground-truth images must have values in [0, 1] (before normalisation)")
    labels = truth.get("labels")
    if labels is not None:
        labels = labels.long().flatten()
        if len(labels) != len(images):
            raise ArtifactError(f"{len(labels)} ground-truth labels for {len(images)} images")
    return images, labels


def _client_bn_stats(model: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The batch-norm statistics of the client's batch (level 4 knowledge in a simulation)."""
    probe = copy.deepcopy(model).train()
    layers = [m for m in probe.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return None
    stats: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        t = inputs[0]
        dims = [0, *range(2, t.dim())]
        stats.append((t.mean(dims), t.var(dims)))  # unbiased, as running_var keeps it

    for m in layers:
        m.register_forward_hook(hook)
    with torch.no_grad():
        probe(x)
    return stats


# --------------------------------------------------------------------------------------------
# the problem as the attacker sees it
# --------------------------------------------------------------------------------------------


def _as_delta_or_gradient(
    spec: JobSpec, model: nn.Module, update: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Post-processing acts on what is shared: a gradient, or a weight change (for w_new: w_new - w_old)."""
    if spec.update.kind != "weights":
        return update
    return {n: update[n] - p.detach() for n, p in model.named_parameters() if n in update}


def _problem(
    spec: JobSpec, model: nn.Module, update: dict[str, torch.Tensor], victim: Victim, device: torch.device
) -> AttackProblem:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    kind = spec.update.kind
    if kind == "weights" and not spec.defenses:
        update = _as_delta_or_gradient(spec, model, update)
    delta_like = kind != "gradient"
    told = spec.client_training()
    # The batch-norm mode is set by the protocol the server runs (it sends public BN buffers to
    # normalise with, or not), so the server knows it at every level; lr, epochs, batch size and
    # sample count are level-3 knowledge.
    client = told if spec.knowledge >= Knowledge.TRAINING_DETAILS else ClientTraining(bn_mode=told.bn_mode)

    scale_known = True
    update_scale: float | None = 1.0
    # the latent-space attacks unroll FedAvg, as fedavg_unroll does, when level 3 tells them how
    unrolls = spec.attack.name in GENERATIVE_ATTACKS and delta_like and _can_unroll(client)
    if spec.attack.name == "fedavg_unroll" or unrolls:
        target, target_kind = [update[n] for n in names], "delta"
    elif delta_like:
        steps = None
        if client.local_epochs and client.batch_size and client.num_samples:
            steps = client.local_epochs * math.ceil(client.num_samples / client.batch_size)
        pseudo = delta_to_pseudo_gradient(update, client.lr, steps)
        target, target_kind = [pseudo[n] for n in names], "gradient"
        scale_known = client.lr is not None and steps is not None
        update_scale = client.lr * steps if client.lr is not None and steps is not None else None
    else:
        target, target_kind = [update[n] for n in names], "gradient"
    grad_view = {n: (-update[n] if delta_like else update[n]) for n in names}  # gradient direction

    labels, label_source, num_images, num_source = _labels(spec, model, grad_view, client, delta_like)
    bn_targets, bn_source = None, None
    if spec.knowledge >= Knowledge.BN_STATISTICS:
        bn_targets, bn_source = _bn_targets(model, victim, spec.update.kind)
    return AttackProblem(
        model=copy.deepcopy(model),
        target=[t.detach().to(device) for t in target],
        target_kind=target_kind,
        param_names=names,
        num_images=num_images,
        image_shape=spec.data.shape,
        num_classes=spec.data.num_classes,
        normalization=spec.data.resolved_normalization(),
        knowledge=spec.knowledge,
        labels=labels,
        label_source=label_source,
        num_images_source=num_source,
        client=client,
        bn_mode=client.bn_mode or "train",
        bn_targets=bn_targets,
        bn_source=bn_source,
        target_scale_known=scale_known,
        match_names=select_parameters(names, spec.attack.match_layers) if spec.attack.match_layers else None,
        update_scale=update_scale,
        update_kind=kind,
        defenses=list(spec.defenses),
    )


GENERATIVE_ATTACKS = ("gias", "ggl")


def _can_unroll(client: ClientTraining) -> bool:
    return client.lr is not None and client.local_epochs is not None and client.batch_size is not None


def _labels(
    spec: JobSpec, model: nn.Module, grads: dict[str, torch.Tensor], client: ClientTraining, delta_like: bool
) -> tuple[torch.Tensor | None, str, int, str]:
    """Labels and image count as the attacker can know them: given, inferred, or optimised."""
    data, strategy = spec.data, spec.attack.label_strategy
    num_images, num_source = data.num_images, "given"
    if num_images is None and data.labels is not None:
        num_images = len(data.labels)
    if num_images is None and client.num_samples is not None:
        num_images, num_source = client.num_samples, "client training details"

    if strategy in ("auto", "known") and data.labels is not None:
        return torch.tensor(data.labels, dtype=torch.long), "given", len(data.labels), num_source
    if strategy == "known":
        raise SpecError("label_strategy 'known' needs data.labels")

    weight_grad, bias_grad = last_layer_grads(grads, model, spec.data.num_classes)

    def counts(n: int | None) -> tuple[list[int], int]:
        # a weight change is a gradient of unknown scale (lr, steps): let the inference calibrate it
        return infer_label_counts(
            weight_grad,
            bias_grad,
            n,
            model=model,
            input_shape=spec.data.shape,
            bn_mode=client.bn_mode or "train",
            scale=None if delta_like else 1.0,
        )

    if strategy == "joint":
        if num_images is None:
            _, num_images = counts(None)
            num_source = "estimated from the last layer's gradient"
        return None, "joint optimisation", num_images, num_source
    if num_images == 1:
        return torch.tensor([idlg_label(weight_grad, bias_grad)]), "inferred (iDLG)", 1, num_source
    inferred, estimated = counts(num_images)
    if num_images is None:
        num_images, num_source = estimated, "estimated from the last layer's gradient"
    return torch.tensor(inferred, dtype=torch.long), "inferred (label counts)", num_images, num_source


def _bn_targets(
    model: nn.Module, victim: Victim, kind: str
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]] | None, str | None]:
    """The BN statistics GradInversion pulls towards, from the best source the update allows."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return None, None
    if victim.client_bn_stats is not None:
        return victim.client_bn_stats, "the client's batch (simulated client)"
    if victim.buffers:
        old = {n: b.detach() for n, b in model.named_buffers() if b.is_floating_point()}
        new = (
            victim.buffers
            if kind == "weights"
            else {k: old[k] + v for k, v in victim.buffers.items() if k in old}
        )
        try:
            recovered = batch_bn_statistics_from_update(old, new)
            return [
                (recovered[n].mean, recovered[n].var) for n, _ in layers
            ], "recovered from the running statistics in the update"
        except SpecError:
            pass  # several local steps mix batches: fall back to the model's statistics, as stated
    return [
        (m.running_mean.detach().clone(), m.running_var.detach().clone())  # type: ignore[union-attr]
        for _, m in layers
    ], "the model's running statistics"


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------


def _write_artifacts(
    spec: JobSpec,
    ctx: JobContext,
    result: AttackResult,
    victim: Victim,
    manifest: dict,
    shadows_png: bytes | None = None,
) -> dict[str, str]:
    images = result.images.detach().float().cpu().contiguous()
    tensors = {
        "images": images,
        "labels": result.labels.cpu().long().contiguous(),
        "loss_history": torch.tensor(result.loss_history, dtype=torch.float32),
    }
    metrics = manifest["metrics"]
    truth = None if victim.truth_images is None else victim.truth_images.detach().float().cpu()
    truth_labels = None if victim.truth_labels is None else victim.truth_labels.tolist()
    grid = render_grid_png(
        images, truth, metrics, recon_labels=result.labels.tolist(), true_labels=truth_labels
    )
    outputs = {
        RECONSTRUCTION: save_safetensors(tensors, {"job_id": ctx.job_id, "attack": spec.attack.name}),
        GRID_PNG: grid,
        REPORT_HTML: render_report_html(
            spec,
            result,
            manifest,
            grid,
            true_labels=truth_labels,
            estimate=manifest.get("estimate"),
            shadows_png=shadows_png,
        ).encode(),
    }
    keys = {}
    for name, data in outputs.items():
        key = f"{ctx.prefix}/{name}"
        ctx.store.put_bytes(key, data, CONTENT_TYPES[name])
        keys[name] = key
    return keys


class _Emitter:
    """Forwards progress to the context, throttled so a fast attack does not flood listeners."""

    def __init__(self, ctx: JobContext, started: float) -> None:
        self.ctx, self.started, self.last = ctx, started, -math.inf

    def __call__(self, p: Progress) -> None:
        if self.ctx.progress is not None:
            self.ctx.progress(p)

    def throttled(self, p: Progress) -> None:
        """`p` unless the last throttled event went out under PROGRESS_INTERVAL_S ago (the last
        iteration always goes out)."""
        now = time.monotonic()
        if now - self.last < PROGRESS_INTERVAL_S and p.iteration < p.total:
            return
        self.last = now
        self(p)

    def attack_progress(self, iteration: int, total: int, loss: float, restart: int | None) -> None:
        elapsed = time.monotonic() - self.started
        self.throttled(Progress("attack", iteration, total, _finite(loss), elapsed, restart))


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def versions() -> dict[str, str]:
    import numpy

    out = {
        "gradleak": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import torchvision

        out["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return out


def device_info(device: torch.device) -> dict[str, str | int]:
    info: dict[str, str | int] = {"type": device.type, "machine": platform.machine()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    else:
        info["threads"] = torch.get_num_threads()
        info["processor"] = platform.processor() or platform.machine()
    return info
