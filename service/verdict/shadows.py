"""Shadow audits: clients made like the real one on proxy images, attacked like it, scored.

A shadow is the real job's spec with a simulated victim: the same model, declared training
(update.client), defenses, attack, knowledge and image count, its labels the histogram inferred
from the real update, its images drawn from the proxy data by a seeded generator. It goes through
the runner's own code (simulated_victim, problem_for, the registered attack), so there is no
second engine. The shadows share the model, so where the attack allows (Inverting Gradients with
the labels fixed) they run as one batched computation (service.attacks.points: their restarts
stacked, each matched against its own target); otherwise one after another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from service.attacks import AttackProblem, Control
from service.data.patches import photo_patches
from service.data.photos import photo_names
from service.errors import ArtifactError
from service.jobs.types import JobContext
from service.metrics import score
from service.specs import ClientTraining, DataSpec, JobSpec
from service.tensorio import STATE_DTYPES, load_safetensors

DEFAULT_LR = 0.01  # assumed for a shadow whose update needs an lr the server was not told


PROXY_CROPS_PER_PHOTO = 8


@lru_cache(maxsize=8)
def _photo_pool(size: int, channels: int) -> torch.Tensor:
    """Random crops (fixed seed) of every shipped photo but the faces: 100 near-identical
    low-contrast face crops would make most draws far easier to invert than natural images."""
    names = [n for n in photo_names() if not n.startswith("face")]
    images, _ = photo_patches(
        size=size, photos=names, per_class=PROXY_CROPS_PER_PHOTO, seed=0, channels=channels
    )
    return images


def proxy_pool(spec: JobSpec, resolve: Callable[[str], Any]) -> tuple[torch.Tensor, str]:
    """The proxy images (M, C, H, W) in [0, 1], and what they are."""
    c, h, w = spec.data.shape
    ref = spec.verdict.proxy_data
    if ref is None:
        if h != w:
            raise ArtifactError("the shipped photos are square: give verdict.proxy_data for other shapes")
        return _photo_pool(h, c), "crops of the shipped photos"
    tensors = load_safetensors(resolve(ref), allowed_dtypes=STATE_DTYPES, name="proxy_data")
    images = tensors.get("images")
    if images is None or images.dim() != 4 or tuple(images.shape[1:]) != spec.data.shape:
        raise ArtifactError(f"proxy data needs a tensor named 'images' of shape [M, {c}, {h}, {w}]")
    images = images.float()
    if images.min() < 0 or images.max() > 1:
        raise ArtifactError("proxy images must have values in [0, 1] (before normalisation)")
    return images, "uploaded proxy data"


def shadow_training(spec: JobSpec, num_images: int) -> tuple[ClientTraining, list[str]]:
    """The declared client training, completed where simulating needs a fact the server lacks."""
    told = spec.update.client
    kind = spec.update.kind
    fill: dict[str, Any] = {"num_samples": num_images}
    assumed = []
    protocol = told.protocol or ("fedsgd" if kind == "gradient" else "fedavg")
    if told.protocol is None:
        fill["protocol"] = protocol
        assumed.append(f"protocol {protocol} (from the update kind)")
    if kind != "gradient" and told.lr is None:
        fill["lr"] = DEFAULT_LR
        assumed.append(f"lr {DEFAULT_LR}")
    if protocol == "fedavg":
        if told.local_epochs is None:
            fill["local_epochs"] = 1
            assumed.append("1 local epoch")
        if told.batch_size is None:
            fill["batch_size"] = num_images
            assumed.append("one batch per epoch")
    if told.num_samples is not None and told.num_samples != num_images:
        assumed.append(f"{num_images} images, not the declared {told.num_samples}")
    return told.model_copy(update=fill), assumed


@dataclass
class Shadow:
    images: torch.Tensor  # (N, C, H, W) in [0, 1]
    labels: torch.Tensor
    problem: AttackProblem
    loss: float
    metrics: dict[str, Any]
    reconstruction: torch.Tensor  # the attack's images, (N, C, H, W) in [0, 1], on the CPU
    reconstructed_labels: torch.Tensor


def shadow_spec(spec: JobSpec, num_images: int, k: int) -> JobSpec:
    """The real spec as a shadow attack sees it: its own budget and seed, no ground truth."""
    v = spec.verdict
    data: DataSpec = spec.data.model_copy(update={"num_images": num_images})
    return spec.model_copy(
        update={
            "budget": v.budget or spec.budget,
            "seed": v.seed * 1000 + k,
            "ground_truth": None,
            "data": data,
        }
    )


@dataclass
class ShadowClient:
    """A shadow client made and its attack set up, not yet run."""

    images: torch.Tensor  # (N, C, H, W) in [0, 1], on the CPU
    labels: torch.Tensor
    spec: JobSpec
    problem: AttackProblem
    control: Control
    generator: torch.Generator


def make_shadow(
    spec: JobSpec,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    training: ClientTraining,
    k: int,
    ctx: JobContext,
    device: torch.device,
) -> ShadowClient:
    """Simulate shadow k's client and set up its attack exactly as the real update's was."""
    from service.jobs.runner import attack_generator, problem_for, simulated_victim

    s = shadow_spec(spec, len(images), k)
    generator = torch.Generator().manual_seed(s.seed)
    victim = simulated_victim(s, model, images.to(device), labels.to(device), training)
    problem = problem_for(s, model, victim, generator, device, image_generator=attack_generator(s, ctx))
    control = Control(s.budget, should_stop=ctx.should_stop)
    return ShadowClient(images.cpu(), labels.cpu(), s, problem, control, generator)


ShadowProgress = Callable[[int, int, str], None]  # iteration, total, which shadows


def _which(group: list[int], n: int) -> str:
    """What a batch's progress says it is running."""
    if len(group) == n:
        return f"{n} shadow audits, batched"
    return f"shadows {group[0] + 1}-{group[-1] + 1} of {n}, batched"


def attack_shadows(
    clients: list[ShadowClient],
    ctx: JobContext,
    device: torch.device,
    batch: bool = True,
    progress: ShadowProgress | None = None,
    per_batch: int | None = None,
) -> tuple[list[Shadow], str]:
    """Attack every shadow and score each against its own images; and how they ran. Shadows that
    share a computation (service.attacks.points) run batched, at most `per_batch` at once (what
    the worker's memory allows; None: all), the rest one after another. `progress` hears each
    iteration of each batch or shadow. A shadow's attack that fails fails the verdict, as it
    would have alone."""
    from service.attacks.points import run_points, share_a_computation

    n = len(clients)
    entries = [(c.problem, c.spec.attack, c.control, c.generator) for c in clients]
    size = max(1, min(per_batch or n, n)) if batch else 1
    results: list = [None] * n
    errors: list = [None] * n
    groups_batched = 0
    for first in range(0, n, size):
        group = list(range(first, min(first + size, n)))
        together = len(group) > 1 and share_a_computation([entries[i] for i in group])
        if progress is not None:
            for i in group:
                if together and i != group[0]:
                    continue  # a batch reports the same iteration to every shadow: hear it once
                which = _which(group, n) if together else f"shadow audit {i + 1} of {n}"

                def report(
                    iteration: int, total: int, _loss: float, _restart: int | None, which: str = which
                ) -> None:
                    progress(iteration, total, which)

                clients[i].control.progress = report
        out, failed, ran_batched = run_points([entries[i] for i in group], batch=together)
        groups_batched += ran_batched
        for i, r, e in zip(group, out, failed, strict=True):
            results[i], errors[i] = r, e
    if groups_batched == 0:
        execution = "sequential (one attack per shadow; restarts batch within each)"
    elif size >= n:
        execution = f"batched ({n} shadows' attacks as one vectorised computation)"
    else:
        execution = f"batched in groups of at most {size} (what the worker's memory allows), {n} shadows"
    shadows = []
    for c, result, error in zip(clients, results, errors, strict=True):
        if error is not None:
            raise error
        assert result is not None
        metrics = score(
            result.images.cpu(),
            c.images,
            recon_labels=result.labels.tolist(),
            true_labels=c.labels.tolist(),
            lpips_weights_dir=ctx.lpips_weights_dir,
            device=device,
        )
        shadows.append(
            Shadow(
                c.images,
                c.labels,
                c.problem,
                float(result.best_loss),
                metrics,
                result.images.detach().cpu(),
                result.labels.detach().cpu(),
            )
        )
    return shadows, execution


def draw_images(pool: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n proxy images, without replacement while the pool lasts."""
    m = len(pool)
    if n <= m:
        return pool[torch.randperm(m, generator=generator)[:n]].clone()
    return pool[torch.randint(m, (n,), generator=generator)].clone()
