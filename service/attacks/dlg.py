"""Deep Leakage from Gradients (Zhu et al., 2019) and iDLG (Zhao et al., 2020).

L2 gradient matching optimised with L-BFGS. Labels are optimised jointly (DLG) when unknown and
the spec asks for it, or taken from the analytic iDLG/label-count inference. L-BFGS keeps a
curvature history, so its restarts are not independent elementwise updates: they run one after
another, each with its own generator draw.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from service.attacks.base import AttackProblem, AttackResult, Control
from service.attacks.inverting import attack_model, matching_objective
from service.specs import DLGParams, Knowledge


class DLG:
    name: ClassVar[str] = "dlg"
    required_knowledge: ClassVar[Knowledge] = DLGParams.required_knowledge
    description: ClassVar[str] = (
        "Deep Leakage from Gradients (Zhu et al. 2019): L2 gradient matching with L-BFGS, joint "
        "label optimisation or iDLG's analytic labels"
    )

    def run(
        self,
        problem: AttackProblem,
        params: DLGParams,
        control: Control,
        generator: torch.Generator,
    ) -> AttackResult:
        model = attack_model(problem)
        objective = matching_objective(problem, model, functional=False, cost="l2")
        n, (c, h, w) = problem.num_images, problem.image_shape
        joint = problem.labels is None
        no_aux = torch.zeros((), device=problem.device)

        best: tuple[float, torch.Tensor, torch.Tensor] | None = None
        restart_losses: list[float] = []
        history: list[float] = []
        iteration = 0
        evaluations = 0  # objective evaluations: an L-BFGS step makes up to 1.25 * max_eval
        for restart in range(control.budget.restarts):
            x = (torch.randn((n, c, h, w), generator=generator) * params.init_scale).to(problem.device)
            if joint:
                y = torch.randn((n, problem.num_classes), generator=generator).to(problem.device)
            else:
                assert problem.labels is not None
                y = problem.labels.to(problem.device).clone()
            variables = [x, y] if joint else [x]
            opt = torch.optim.LBFGS(
                variables,
                lr=params.lr,
                history_size=params.history_size,
                max_iter=params.max_eval,
                line_search_fn="strong_wolfe",
                # gradient-matching losses of untrained models are tiny: torch's default tolerances
                # would end every step at once and leave the image where it started
                tolerance_grad=1e-20,
                tolerance_change=1e-20,
            )
            restart_best = float("inf")
            per_restart = max(1, control.budget.iterations // control.budget.restarts)

            def closure(
                x: torch.Tensor = x, y: torch.Tensor = y, variables: list[torch.Tensor] = variables
            ) -> torch.Tensor:
                nonlocal evaluations
                evaluations += 1
                inputs = [v.detach().requires_grad_() for v in variables]
                loss = objective(inputs[0], inputs[1] if joint else y, no_aux)
                for var, g in zip(variables, torch.autograd.grad(loss, inputs), strict=True):
                    var.grad = g
                return loss.detach()

            done_here = 0
            while done_here < per_restart and not control.stop(iteration):
                snapshot = (x.detach().clone(), y.detach().clone())
                loss = float(opt.step(closure))  # type: ignore[arg-type]
                if not torch.isfinite(torch.tensor(loss)) or not torch.isfinite(x).all():
                    x.data, y.data = snapshot  # diverged: keep the last finite iterate
                    break
                if loss < restart_best:
                    restart_best = loss
                    if best is None or loss < best[0]:
                        best = (loss, x.detach().clone(), y.detach().clone())
                iteration += 1
                done_here += 1
                history.append(best[0] if best else loss)
                control.report(iteration, history[-1], restart)
            restart_losses.append(restart_best)
            if control.stop_reason and control.stop_reason != "iterations":
                break

        if best is None:  # not a single finite step: report the initialisation honestly
            best = (float("inf"), x.detach(), y.detach())
        _, images, labels = best
        if joint:
            labels = labels.argmax(-1)
        return AttackResult(
            images=problem.denormalize(images),
            labels=labels.long(),
            loss_history=history,
            best_loss=best[0],
            iterations=iteration,
            restart_losses=restart_losses,
            stopped_early=control.stop_reason == "stopped",
            stop_reason=control.stop_reason or "iterations",
            details={"joint_labels": joint, "optimizer": "lbfgs", "evaluations": evaluations},
        )
