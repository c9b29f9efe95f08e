"""Attack problems that share one model (its weights, matched parameters, cost, image shape) but
not their targets, run as one batched computation where they can.

Used by a study's batched points (service.studies.batch) and by the verdict's shadow audits
(service.verdict): `run_points` stacks the problems' restarts like restarts and vectorises them
(`optimise_points`, each problem matched against its own target, each starting where it would
alone), so each gets the result it gets alone up to float rounding; problems that cannot share a
computation run one after another, each as it would alone.
"""

from __future__ import annotations

from typing import Any

import torch

from service.attacks import ATTACKS, AttackProblem, AttackResult, Control

BATCHED_ATTACKS = ("inverting_gradients",)

Entry = tuple[AttackProblem, Any, Control, torch.Generator]  # problem, attack params, control, generator


def share_a_computation(entries: list[Entry]) -> bool:
    """Whether these problems can run as one batched computation (one model, one attack, one budget)."""
    from service.attacks.inverting import fixed_scale_for

    first, params = entries[0][0], entries[0][1]
    if params.name not in BATCHED_ATTACKS:
        return False
    if fixed_scale_for(first, params) is not None:  # the scale-blind path runs each problem alone
        return False
    for problem, p, control, _ in entries:
        same = (
            p == params
            and control.budget == entries[0][2].budget
            and problem.labels is not None
            and problem.param_names == first.param_names
            and problem.match_names == first.match_names
            and problem.num_images == first.num_images
            and problem.image_shape == first.image_shape
            and problem.normalization == first.normalization
            and problem.bn_mode == first.bn_mode
            and problem.device == first.device
            and problem.matching_cost(p.cost) == first.matching_cost(params.cost)
        )
        if not same:
            return False
        mine, theirs = dict(problem.model.named_parameters()), dict(first.model.named_parameters())
        if problem is not first and not all(torch.equal(mine[n], theirs[n]) for n in first.param_names):
            return False
    return True


def run_points(
    entries: list[Entry], batch: bool = True
) -> tuple[list[AttackResult | None], list[BaseException | None], bool]:
    """Each entry's attack result (or the error it raised, in the same position), and whether they
    ran as one batched computation (never with batch=False: one after another, for comparison)."""
    from service.attacks.gauss_newton import apply_finish
    from service.attacks.inverting import points_objective
    from service.attacks.optimize import optimise_points

    n = len(entries)
    if batch and n > 1 and share_a_computation(entries):
        problems = [e[0] for e in entries]
        params = entries[0][1]
        try:
            controls = [e[2] for e in entries]
            out = optimise_points(
                problems, params, controls, [e[3] for e in entries], points_objective(problems, params)
            )
            # each problem's finish, as it would have alone (it runs per problem: its own gradient)
            out = [
                apply_finish(p, params.finish_steps, c, r)
                for p, c, r in zip(problems, controls, out, strict=True)
            ]
        except Exception as e:  # every problem fails as it would alone
            return [None] * n, [e] * n, True
        return list(out), [None] * n, True
    results: list[AttackResult | None] = []
    errors: list[BaseException | None] = []
    for problem, p, control, generator in entries:  # one after another, each as it would run alone
        try:
            results.append(ATTACKS.get(p.name).run(problem, p, control, generator))
            errors.append(None)
        except Exception as e:
            results.append(None)
            errors.append(e)
    return results, errors, False
