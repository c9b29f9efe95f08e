"""Points that share one model run as one batched computation: the same results as alone."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from service.attacks.base import AttackProblem, Control
from service.attacks.inverting import inverting_objective, points_objective
from service.attacks.optimize import optimise, optimise_points
from service.jobs.execute import Outcome, execute_job
from service.jobs.records import JobStatus
from service.jobs.state_sqlite import SQLiteStateStore
from service.settings import Settings
from service.specs import NORMALIZATIONS, Budget, InvertingGradientsParams, JobSpec, Knowledge
from service.storage import LocalStore
from service.studies.batch import PointBatch, batch_key
from service.studies.spec import StudySpec
from service.studies.submit import create_study

PARAMS = InvertingGradientsParams(tv_weight=1e-3)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(6 * 8 * 8, 10)
    ).eval()  # fmt: skip


def _problems(count: int) -> list[AttackProblem]:
    model = _model()
    out = []
    for i in range(count):
        x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(10 + i))
        y = torch.tensor([i % 10])
        loss = nn.functional.cross_entropy(model(x), y)
        target = [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]
        out.append(
            AttackProblem(
                model=model,
                target=target,
                target_kind="gradient",
                param_names=[n for n, _ in model.named_parameters()],
                num_images=1,
                image_shape=(3, 8, 8),
                num_classes=10,
                normalization=NORMALIZATIONS["none"],
                knowledge=Knowledge.PRIORS,
                labels=y,
            )
        )
    return out


@pytest.mark.parametrize("restarts", [1, 2])
def test_batched_points_get_the_results_they_get_alone(restarts: int) -> None:
    problems = _problems(3)
    budget = Budget(iterations=15, restarts=restarts)
    controls = [Control(budget) for _ in problems]
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    together = optimise_points(problems, PARAMS, controls, generators, points_objective(problems, PARAMS))
    for i, (problem, result) in enumerate(zip(problems, together, strict=True)):
        control = Control(budget)
        alone = optimise(
            problem,
            PARAMS,
            control,
            torch.Generator().manual_seed(i),
            inverting_objective(problem, PARAMS, control),
        )
        assert result.details["batched_points"] == 3 and result.iterations == alone.iterations == 15
        assert result.best_loss == pytest.approx(alone.best_loss, rel=1e-4)
        assert torch.allclose(result.images, alone.images, atol=1e-4)
        assert len(result.restart_losses) == restarts
    # each point was matched against its own target: the reconstructions differ
    assert not torch.allclose(together[0].images, together[1].images, atol=1e-2)


def test_a_point_that_leaves_does_not_hold_the_batch() -> None:
    (problem,) = _problems(1)
    batch = PointBatch(2)
    out: list = []
    control = Control(Budget(iterations=3))
    worker = threading.Thread(
        target=lambda: out.append(batch.attack(0)(problem, PARAMS, control, torch.Generator().manual_seed(0)))
    )
    worker.start()
    batch.leave(1)  # the other point was taken by another worker: nothing to wait for
    worker.join(60)
    assert not worker.is_alive() and out[0].iterations == 3
    assert "batched_points" not in out[0].details  # alone, it ran as a job runs it


def _spec(**changes: object) -> JobSpec:
    base: dict = {
        "model": {"arch": "convnet", "knobs": {"width": 4, "depth": 1}},
        "data": {"shape": [3, 8, 8], "labels": [0]},
        "update": {"simulate": {"images": ["astronaut"], "labels": [0]}},
        "attack": {"name": "inverting_gradients"},
        "budget": {"iterations": 5},
    }
    base.update(changes)
    return JobSpec.model_validate(base)


def test_points_share_a_computation_only_with_the_same_model_and_attack() -> None:
    key = batch_key(_spec())
    assert key is not None
    assert batch_key(_spec(update={"simulate": {"images": ["coffee"], "labels": [3]}}, seed=4)) == key
    assert batch_key(_spec(model={"arch": "convnet", "knobs": {"width": 5, "depth": 1}})) != key
    assert batch_key(_spec(budget={"iterations": 6})) != key
    assert batch_key(_spec(data={"shape": [3, 8, 8]})) is None  # labels to infer
    assert batch_key(_spec(attack={"name": "dlg"}, knowledge=0)) is None


def test_a_study_batches_its_points_with_the_results_of_one_by_one(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", redis_url=None, s3_endpoint=None)
    images = [["astronaut"], ["coffee"], ["chelsea"]]
    base = _spec().model_dump(mode="json")
    results = {}
    for batch in (1, 3):
        state = SQLiteStateStore(tmp_path / f"state{batch}.db")
        study = StudySpec.model_validate(
            {
                "job": base,
                "axes": [{"path": "update.simulate.images", "name": "image", "values": images}],
                "batch_points": batch,
            }
        )
        record, points, _ = create_study(study, "acme", settings, state)
        outcome = execute_job(record.id, state=state, store=LocalStore(tmp_path / f"a{batch}"), worker_id="w")
        assert outcome == Outcome.FINISHED
        done = [state.get_job(None, p.id) for p in points]
        assert all(p.status == JobStatus.SUCCEEDED and p.attempts == 1 for p in done)
        assert state.get_job(None, record.id).status == JobStatus.SUCCEEDED
        details = [(p.manifest or {})["attack"]["details"] for p in done]
        assert all(d.get("batched_points") == (3 if batch == 3 else None) for d in details)
        results[batch] = [(p.manifest or {})["metrics"]["mean"]["psnr"] for p in done]
        state.close()
    assert results[3] == pytest.approx(results[1], abs=1e-3)


def test_the_batch_stops_when_every_point_asks_not_when_one_does() -> None:
    problems = _problems(2)
    objective = points_objective(problems, PARAMS)

    def run(stops: list[bool]) -> list:
        controls = [Control(Budget(iterations=12), should_stop=lambda s=s: s) for s in stops]
        generators = [torch.Generator().manual_seed(i) for i in range(2)]
        return optimise_points(problems, PARAMS, controls, generators, objective)

    one = run([True, False])  # a point cancelled alone: the other runs its whole budget
    assert [r.iterations for r in one] == [12, 12] and one[1].stop_reason == "iterations"
    both = run([True, True])  # the study stopped: the batch stops at once
    assert [r.iterations for r in both] == [0, 0] and both[0].stop_reason == "stopped"


def test_points_run_together_share_the_time_each_would_have_alone() -> None:
    from service.attacks.base import Control
    from service.attacks.optimize import _PointsControl
    from service.specs import Budget

    timed = _PointsControl([Control(Budget(iterations=50, time_limit_s=2.0)) for _ in range(3)])
    assert timed.budget.time_limit_s == 6.0 and timed.budget.iterations == 50
    counted = _PointsControl([Control(Budget(iterations=50)) for _ in range(3)])
    assert counted.budget.time_limit_s is None and counted.budget.iterations == 50
