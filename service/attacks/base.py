"""The attack protocol and what every attack shares: the problem as the attacker sees it, the
result, and the budget/stop/progress bookkeeping.

An attack sees only what the spec grants: the model the server sent, the client's update turned
into its target form, and the facts of `AttackProblem`. It never sees the ground truth; the best
iterate is chosen by the attack's own objective.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from service.errors import SpecError
from service.specs import Budget, ClientTraining, DefenseSpec, Knowledge, Normalization

# maps trial gradients (one tensor per parameter, in param_names order) before matching
GradientTransform = Callable[[list[torch.Tensor]], list[torch.Tensor]]


class MatchingParams(Protocol):
    """The matching settings an objective reads from an attack's parameters."""

    @property
    def cost(self) -> str: ...
    @property
    def layer_weights(self) -> str: ...
    @property
    def tv_weight(self) -> float: ...


@dataclass
class AttackProblem:
    model: nn.Module  # the server's model (weights loaded), on the attack device
    target: list[torch.Tensor]  # one tensor per trainable parameter, in named_parameters order
    target_kind: str  # "gradient" (FedSGD or a pseudo-gradient) or "delta" (FedAvg, unrolled)
    param_names: list[str]
    num_images: int
    image_shape: tuple[int, int, int]
    num_classes: int
    normalization: Normalization
    knowledge: Knowledge
    labels: torch.Tensor | None = None  # known or inferred labels, one per image
    label_source: str = "unknown"
    num_images_source: str = "given"
    client: ClientTraining = field(default_factory=ClientTraining)  # only what the attacker was granted
    bn_mode: str = "train"
    bn_targets: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per BN layer (mean, var)
    bn_source: str | None = None
    # False when the update's scale is unknown (a weight change without lr and step count)
    target_scale_known: bool = True
    # the parameters whose gradients are matched (attack.match_layers); None: all of param_names
    match_names: list[str] | None = None

    def matched(self) -> tuple[list[str], list[torch.Tensor]]:
        """The names and targets the attack matches: every parameter, or the chosen subset."""
        if self.match_names is None:
            return self.param_names, self.target
        chosen = set(self.match_names)
        pairs = [(n, t) for n, t in zip(self.param_names, self.target, strict=True) if n in chosen]
        return [n for n, _ in pairs], [t for _, t in pairs]

    # the shared update is update_scale times the target (lr x steps for a weight change turned
    # into a pseudo-gradient; 1 for a gradient or an unrolled delta); None when unknown
    update_scale: float | None = 1.0
    update_kind: str = "gradient"  # what the client shared: "gradient", "delta" or "weights"
    defenses: list[DefenseSpec] = field(default_factory=list)  # post-processing of the update (what-if)
    # the generator the attacker holds (knowledge level 2): a service.generators.LoadedGenerator
    image_generator: Any = None

    def matching_cost(self, requested: str) -> str:
        """The cost an attack uses: `auto` is L2 where the target's scale is known, else cosine."""
        if requested != "auto":
            return requested
        return "l2" if self.target_scale_known else "cosine"

    @property
    def device(self) -> torch.device:
        return self.target[0].device

    def pixel_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds of valid pixels in the normalised space, shaped (C, 1, 1)."""
        mean = torch.tensor(self.normalization.mean, device=self.device).view(-1, 1, 1)
        std = torch.tensor(self.normalization.std, device=self.device).view(-1, 1, 1)
        return (0 - mean) / std, (1 - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.normalization.mean, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.normalization.std, device=x.device).view(-1, 1, 1)
        return (x * std + mean).clamp(0, 1)


@dataclass
class AttackResult:
    images: torch.Tensor  # (N, C, H, W) in [0, 1]
    labels: torch.Tensor  # (N,)
    loss_history: list[float]  # best restart's objective per iteration
    best_loss: float
    iterations: int
    restart_losses: list[float]
    stopped_early: bool
    stop_reason: str
    details: dict[str, object] = field(default_factory=dict)


ProgressFn = Callable[[int, int, float, int | None], None]  # iteration, total, loss, restart


@dataclass
class Control:
    """Budget, stop requests and progress reporting for one attack run."""

    budget: Budget
    progress: ProgressFn | None = None
    should_stop: Callable[[], bool] | None = None
    started: float = field(default_factory=time.monotonic)
    stop_reason: str = ""

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def fraction(self, iteration: int) -> float:
        """How much of the budget is spent: iterations or wall-clock, whichever is further.

        Schedules (step decay) follow this, so a time-limited run still anneals before the
        clock runs out instead of being cut off at a high learning rate.
        """
        frac = iteration / self.budget.iterations
        if self.budget.time_limit_s is not None:
            frac = max(frac, self.elapsed / self.budget.time_limit_s)
        return min(frac, 1.0)

    def stop(self, iteration: int) -> bool:
        if iteration >= self.budget.iterations:
            self.stop_reason = "iterations"
        elif self.budget.time_limit_s is not None and self.elapsed >= self.budget.time_limit_s:
            self.stop_reason = "time_limit"
        elif self.should_stop is not None and self.should_stop():
            self.stop_reason = "stopped"
        return bool(self.stop_reason)

    def report(self, iteration: int, loss: float, restart: int | None = None) -> None:
        if self.progress is not None:
            self.progress(iteration, self.budget.iterations, loss, restart)


class Attack(Protocol):
    name: ClassVar[str]
    required_knowledge: ClassVar[Knowledge]
    description: ClassVar[str]

    # `params` is the attack's own parameter model (a subclass of AttackParams)
    def run(
        self, problem: AttackProblem, params: Any, control: Control, generator: torch.Generator
    ) -> AttackResult: ...


def select_parameters(names: list[str], layers: list[str]) -> list[str]:
    """The parameters of `names` (in their order) that `layers` picks: an entry picks the
    parameter of that name, or every parameter of the module of that name (a name prefix up to a
    dot). SpecError, naming the model's blocks, when an entry picks nothing."""

    def picks(layer: str, name: str) -> bool:
        return name == layer or name.startswith(layer + ".")

    unmatched = [layer for layer in layers if not any(picks(layer, n) for n in names)]
    if unmatched:
        blocks = list(dict.fromkeys(n.split(".")[0] for n in names))
        if len(blocks) < 4:  # a few containers (features, classifier): show the level below
            blocks = list(dict.fromkeys(".".join(n.split(".")[:2]) for n in names))
        shown = ", ".join(blocks[:40]) + (", ..." if len(blocks) > 40 else "")
        raise SpecError(
            f"attack.match_layers: {', '.join(map(repr, unmatched))} "
            f"{'names' if len(unmatched) == 1 else 'name'} no trainable parameter of the model; give "
            f"parameter names or module names that prefix them, e.g. one of its blocks: {shown}"
        )
    return [n for n in names if any(picks(layer, n) for layer in layers)]


def layer_weights(kind: str, count: int) -> list[float] | None:
    """Per-tensor weights of the matching loss: uniform, or favouring the first layers."""
    if kind == "uniform":
        return None
    if kind == "linear":
        return [(count - i) / count for i in range(count)]
    if kind == "exp":
        return [math.exp(-4.0 * i / max(count - 1, 1)) for i in range(count)]
    raise ValueError(f"unknown layer weighting {kind!r}")


def step_decay(fraction: float) -> float:
    """Inverting Gradients' schedule: x0.1 at 3/8, 5/8 and 7/8 of the budget."""
    return 0.1 ** sum(fraction >= m for m in (3 / 8, 5 / 8, 7 / 8))


def lr_factor(schedule: str, fraction: float) -> float:
    """The learning-rate multiplier at `fraction` of the budget.

    step: Inverting Gradients' step decay. cosine: half a cosine from 1 down to 1e-3, which
    keeps a usable step size for longer than step decay (whose last eighth runs at 1e-3).
    """
    if schedule == "step":
        return step_decay(fraction)
    if schedule == "cosine":
        floor = 1e-3
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(max(fraction, 0.0), 1.0)))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def coarse_projection(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (..., H, W) projected onto images constant on block x block tiles: each tile replaced by
    its mean (edge tiles of a size not divisible by `block` are smaller). Idempotent."""
    lead, (h, w) = x.shape[:-2], x.shape[-2:]
    flat = x.reshape(-1, 1, h, w)
    pooled = F.avg_pool2d(flat, block, stride=block, ceil_mode=True)
    up = pooled.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :h, :w]
    return up.reshape(*lead, h, w)


def random_images(
    shape: tuple[int, ...], init: str, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    if init == "randn":
        x = torch.randn(shape, generator=generator)
    elif init == "rand":
        x = torch.rand(shape, generator=generator) * 2 - 1
    elif init == "zeros":
        x = torch.zeros(shape)
    else:
        raise ValueError(f"unknown initialisation {init!r}")
    return x.to(device)
