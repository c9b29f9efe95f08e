"""A direct error estimate of a reconstruction: one Gauss-Newton step on the attack's residual.

Near a solution, the client's gradient is close to linear in the images: g(x) ~ g(x^) + J (x - x^),
J the Jacobian of the gradient with respect to the images at the attack's reconstruction x^. The
least-squares solution d of J d = g(x^) - t (t the shared gradient) is then the reconstruction's
own error, x^ - x, and x^ - d estimates the client's images without them: scoring x^ against it
estimates every metric directly. It is only trusted where its own numbers say the linear model
holds, never by looking at any truth:

- the update is one gradient of fixed labels (FedSGD), post-processed at most by noise or top-k
  sparsification (the entries top-k dropped are left out of the residual); a weight change after
  local steps, clipping of unknown factor, quantisation and sign compression are not one
  differentiable gradient, so there the estimate is not applicable;
- the reconstruction already matches the gradient closely (residual at most MAX_RESIDUAL of the
  gradient's norm);
- the step explains the residual: what remains of it under the linear model is at most
  UNEXPLAINED_MAX of it, or no more than the declared noise and the update's own float32 rounding
  (ROUNDING of its norm) account for (NOISE_SLACK times their expected norm); a residual the
  images cannot explain means the attack sits at a wrong local solution, where a small step says
  nothing about the error;
- the linear model holds: the residual actually left after the step is within LINEARITY_TOL of
  the residual's norm of what the model predicted.

Under declared noise the attack converges to the images whose gradient is nearest the noisy one:
x^ - x ~ J+ n, which the residual cannot show (it is what the images cannot explain). So the
step's images come with NOISE_DRAWS draws of that error, J+ n' for fresh noise n' of the declared
distribution, and the metrics are averaged over x^ - d - J+ n' (the images a client could have
had, given the update).

The solve is matrix-free (service.attacks.gauss_newton: scipy's LSQR on Jacobian-vector products
of the gradient, forward over reverse, and their transposes, in float64), at most ITERATIONS
products each way, for the real reconstruction and, only where its step is trusted, for
each shadow's (bench/verdict.py reports the seconds it takes). The verdict gives all these steps as
long as the shadow audits took (at least 30 s): a step one timed Jacobian product says would not fit
is not begun, and one that runs out is not trusted (the shadows' estimate stands).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from service.attacks import AttackProblem
from service.attacks.gauss_newton import GradientMap, OutOfTime, not_applicable
from service.specs import NoiseDefense

MAX_RESIDUAL = 0.5  # of the gradient's norm: farther from matching, no local model is tried
UNEXPLAINED_MAX = 0.1  # of the residual: what the step may leave unexplained (beyond the noise)
NOISE_SLACK = 1.5  # times the declared noise's expected norm: what noise may leave unexplained
ROUNDING = 1e-6  # of the update's norm: its float32 rounding (about 8 machine epsilons), noise too
LINEARITY_TOL = 0.2  # of the residual: how far the residual after the step may be from the prediction
ITERATIONS = 50  # LSQR iterations per solve (one Jacobian-vector product and one transpose each)
NOISE_DRAWS = 2  # draws of the error declared noise leaves (each one more solve)


@dataclass
class LocalEstimate:
    """What one Gauss-Newton step says of a reconstruction's error."""

    applicable: bool
    valid: bool
    why: str  # why it is not applicable or not trusted; "the linear model holds" when valid
    images: torch.Tensor | None = None  # x^ - d in [0, 1] (N, C, H, W) on the CPU: the images estimated
    # with declared noise: x^ - d - J+ n' for each draw n' (the images a client could have had)
    noisy_images: list[torch.Tensor] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)  # residual, unexplained, after_step, ...

    def record(self) -> dict[str, Any]:
        return {"applicable": self.applicable, "valid": self.valid, "why": self.why, **self.numbers}


def _noise_draw(problem: AttackProblem, entries: int, generator: torch.Generator) -> torch.Tensor:
    """Noise of the declared noise defenses on `entries` gradient entries (zeros without)."""
    out = torch.zeros(entries, dtype=torch.float64)
    for d in problem.defenses:
        if isinstance(d, NoiseDefense) and d.scale > 0:
            if d.distribution == "gaussian":
                draw = torch.randn(entries, generator=generator, dtype=torch.float64)
            else:
                e = torch.empty(2, entries, dtype=torch.float64).exponential_(generator=generator)
                draw = e[0] - e[1]
            out += d.scale * draw
    return out


def _expected_noise_norm(problem: AttackProblem, entries: int) -> float:
    """The norm the declared noise adds to `entries` gradient entries (0 without noise)."""
    var = 0.0
    for d in problem.defenses:
        if isinstance(d, NoiseDefense):
            var += (2.0 if d.distribution == "laplace" else 1.0) * d.scale * d.scale
    return math.sqrt(var * entries)


def local_estimate(
    problem: AttackProblem,
    images: torch.Tensor,
    labels: torch.Tensor,
    iterations: int = ITERATIONS,
    seed: int = 0,
    seconds_left: Callable[[], float] | None = None,
) -> LocalEstimate:
    """One Gauss-Newton step from the reconstruction `images` ((N, C, H, W) in [0, 1]) with its
    `labels`, and whether to trust it (module docstring); `seed` draws the noise's error.
    `seconds_left()` is the time the step may still take: it is not begun when a Jacobian
    product, timed after a first one, says the solves would not fit, and abandoned (untrusted)
    when it runs out."""
    try:
        return _local_estimate(problem, images, labels, iterations, seed, seconds_left)
    except OutOfTime:
        return LocalEstimate(True, False, "the step ran out of the time it may take")


def _local_estimate(
    problem: AttackProblem,
    images: torch.Tensor,
    labels: torch.Tensor,
    iterations: int,
    seed: int,
    seconds_left: Callable[[], float] | None,
) -> LocalEstimate:
    why = not_applicable(problem, labels)
    if why is not None:
        return LocalEstimate(False, False, why)
    started = time.monotonic()
    gmap = GradientMap(problem, labels)
    target = gmap.target
    x0 = images.detach().to(gmap.device, torch.float64)
    r, model = gmap.linearise(x0)
    t_norm, r_norm = float(target.norm()), float(r.norm())
    numbers: dict[str, Any] = {"residual": r_norm / t_norm if t_norm > 0 else None}
    if t_norm == 0 or not math.isfinite(r_norm):
        why = "the shared gradient is zero or the residual is not finite"
        return LocalEstimate(True, False, why, numbers=numbers)
    if r_norm / t_norm > MAX_RESIDUAL:
        return LocalEstimate(
            True, False, "the reconstruction is far from matching the update", numbers=numbers
        )

    noise = _expected_noise_norm(problem, int(target.numel()))
    time_left = None
    if seconds_left is not None:
        model.apply(torch.zeros_like(x0))  # the first product pays one-off set-up: time the second
        timed = time.monotonic()
        model.apply(torch.zeros_like(x0))
        solves = 1 + (NOISE_DRAWS if noise > 0 else 0)
        needed = (time.monotonic() - timed) * 2 * iterations * solves
        numbers["seconds_needed"] = needed
        if needed > seconds_left():
            why = f"the step would take about {needed:.0f} s, more than the time it may take"
            return LocalEstimate(True, False, why, numbers=numbers)

        def time_left() -> bool:
            return seconds_left() > 0

    step, used = model.solve(r, iterations, time_left=time_left)
    predicted = float((r - model.apply(step)).norm())
    after = float(gmap.residual(x0 - step).norm())
    numbers.update(
        unexplained=predicted / r_norm if r_norm > 0 else 0.0,
        after_step=after / r_norm if r_norm > 0 else 0.0,
        noise_share=noise / r_norm if r_norm > 0 else None,
        lsqr_iterations=used,
    )
    estimated = (x0 - step).clamp(0, 1).float().cpu()
    draws = []
    if noise > 0:
        generator = torch.Generator().manual_seed(seed)
        for _ in range(NOISE_DRAWS):
            error, _ = model.solve(
                _noise_draw(problem, int(target.numel()), generator).to(gmap.device),
                iterations,
                time_left=time_left,
            )
            draws.append((x0 - step - error).clamp(0, 1).float().cpu())
    numbers["seconds"] = time.monotonic() - started
    valid, why = trusted(numbers)
    return LocalEstimate(True, valid, why, images=estimated, numbers=numbers, noisy_images=draws)


def trusted(numbers: dict[str, Any]) -> tuple[bool, str]:
    """Whether a step's numbers (each relative to the residual's norm) say the linear model holds,
    and why not (module docstring). The update's own float32 rounding (ROUNDING of its norm) counts
    as noise: a reconstruction that matches the update to that precision leaves a residual no image
    can explain."""
    unexplained, after = numbers["unexplained"], numbers["after_step"]
    rounding = ROUNDING / numbers["residual"] if numbers.get("residual") else 0.0
    noise = math.hypot(numbers.get("noise_share") or 0.0, rounding)
    if unexplained > max(UNEXPLAINED_MAX, NOISE_SLACK * noise):
        return False, "the images cannot explain the residual: the attack sits at a wrong local solution"
    if abs(after - unexplained) > LINEARITY_TOL:
        return False, "the gradient is not linear over the step"
    return True, "the linear model holds"
