"""Was the attack's budget enough? Judged against how many iterations the attack was measured to
need on the same architecture. And does a known limit of the attack apply (`limits`)?

A run's own loss history cannot say it: the learning-rate schedule is stretched over the budget,
so a short run anneals and flattens as a long one does (bench/results/convergence-cpu.json: the
best loss's drop over the last quarter of a run does not separate runs that fell several dB short
of a larger budget from runs that did not). What can be measured is the budget itself:
bench/convergence.py runs the default attack at growing budgets on each architecture and records
the smallest budget that came within SHORT_DB of the largest one. A run with fewer iterations had
not converged; on an architecture not measured the answer is unknown and said so.
"""

from __future__ import annotations

from typing import Any

SHORT_DB = 1.0
RESULTS_FILE = "bench/results/convergence-cpu.json"
# architecture -> iterations the default attack needed (32x32 photos, batches of 1 and 4: the
# larger of the two); from RESULTS_FILE (tests check the two agree). ResNet-18's is a lower bound:
# it is the largest budget run there (at half of it a batch of one ended 5.5 dB short).
NEEDED_ITERATIONS: dict[str, int] = {"lenet": 200, "resnet18": 800}
LOWER_BOUNDS = frozenset({"resnet18"})
# attacks whose optimisation the measurement describes
MEASURED_ATTACKS = frozenset({"inverting_gradients"})


def convergence(attack: str, arch: str, iterations: int) -> dict[str, Any]:
    """The manifest's `attack.convergence`: iterations run, iterations needed, and the verdict."""
    needed = NEEDED_ITERATIONS.get(arch) if attack in MEASURED_ATTACKS else None
    if needed is None:
        return {
            "iterations": iterations,
            "needed_iterations": None,
            "converged": None,
            "basis": f"no measurement of the iterations {attack} needs on {arch}",
        }
    return {
        "iterations": iterations,
        "needed_iterations": needed,
        "converged": iterations >= needed,
        "basis": f"{attack} needed {'at least ' if arch in LOWER_BOUNDS else ''}{needed} iterations "
        f"on {arch} to come within {SHORT_DB:g} dB of its PSNR at the largest budget measured "
        f"({RESULTS_FILE})",
    }


# A client that normalises with its own batch statistics (BN in train mode): measured in
# bench/ATTACKS.md, "Train-mode batch norm" (bench/results/attacks-cpu-trainbn.json,
# attacks-cpu-trained-resnet18.json: 7.5-11.1 dB over both files' whole-gradient batch-1 runs).
TRAIN_MODE_BN = (
    "the client normalises with its own batch statistics (batch norm in train mode); on such "
    "clients matching the whole gradient, gradleak's and breaching's alike, has rebuilt nothing "
    "recognisable in our benchmarks (a ResNet-18 with a batch of one: 7.5 to 11.1 dB untrained or "
    "trained, where the untrained one in eval mode gave 21.6 to 26.7 dB; bench/ATTACKS.md), because "
    "its gradient is a far rougher function of the images than in eval mode; this run could not "
    "take the stage-map path that does better on one image of known label (attack.details.stage_map "
    "says why, where it was tried). A low score here is the attack's limit, not evidence that the "
    "update is safe"
)


# The same client where the attack read a ResNet's second-stage output from the update
# (service/attacks/stage_map.py; bench/ATTACKS.md, "The stage map").
TRAIN_MODE_BN_STAGE_MAP = (
    "the client normalises with its own batch statistics (batch norm in train mode); this run read "
    "the ResNet's second-stage output map from the update and matched it (attack.details.stage_map), "
    "which rebuilt one image at 13.6 to 27.5 dB in our benchmarks (a ResNet-18, 32x32, untrained or "
    "trained, where matching the whole gradient gave 7.5 to 11.1 dB; bench/ATTACKS.md). A low score "
    "here is still the attack's limit on this update, not evidence that the update is safe"
)


def limits(bn_mode: str, model: Any, stage_map: bool = False) -> list[dict[str, str]]:
    """The manifest's `attack.limits`: known limits of the attacks that apply to this run, each a
    `kind` and a `message`; a low score under one says little about the update's safety.
    `stage_map`: the attack took the stage-map path (a different message, same kind)."""
    from torch import nn

    found = []
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if bn_mode == "train" and has_bn:
        message = TRAIN_MODE_BN_STAGE_MAP if stage_map else TRAIN_MODE_BN
        found.append({"kind": "train_mode_batch_norm", "message": message})
    return found
