"""attack.match_layers: matching restricted to a subset of the parameters' gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from service.attacks.base import AttackProblem, select_parameters
from service.attacks.fedavg import unroll_objective
from service.attacks.inverting import attack_model, matching_objective
from service.errors import SpecError
from service.jobs.runner import run_job
from service.jobs.types import JobContext
from service.models import build_model
from service.specs import (
    NORMALIZATIONS,
    ClientTraining,
    DataSpec,
    FedAvgParams,
    JobSpec,
    Knowledge,
    ModelSpec,
)
from service.storage import LocalStore


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Sigmoid(), nn.Conv2d(4, 4, 3, padding=1), nn.Sigmoid(),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 10),
    ).eval()  # fmt: skip


def _problem(match: list[str] | None, **kw: object) -> AttackProblem:
    model = _model()
    x, y = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 4])
    loss = nn.functional.cross_entropy(model(x), y)
    names = [n for n, _ in model.named_parameters()]
    target = [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]
    return AttackProblem(
        model=model,
        target=target,
        param_names=names,
        num_images=2,
        image_shape=(3, 8, 8),
        num_classes=10,
        normalization=NORMALIZATIONS["none"],
        knowledge=Knowledge.TRAINING_DETAILS,
        labels=y,
        match_names=None if match is None else select_parameters(names, match),
        **{"target_kind": "gradient", **kw},  # type: ignore[arg-type]
    )


def _perturbed(problem: AttackProblem, index: int) -> AttackProblem:
    target = [t.clone() for t in problem.target]
    target[index] = target[index] + torch.randn_like(target[index])
    return AttackProblem(**{**problem.__dict__, "target": target})


@pytest.mark.parametrize("functional", [False, True])
def test_the_loss_depends_only_on_the_chosen_tensors(functional: bool) -> None:
    problem = _problem(["2"])  # the second convolution: parameters 2.weight and 2.bias (indices 2, 3)
    assert problem.matched()[0] == ["2.weight", "2.bias"]
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    y, aux = torch.tensor([1, 4]), torch.zeros(())

    def loss(p: AttackProblem) -> float:
        objective = matching_objective(p, attack_model(p), functional=functional, cost="l2")
        return float(objective(x, y, aux).detach())

    base = loss(problem)
    for outside in (0, 1, 4, 5):
        assert loss(_perturbed(problem, outside)) == pytest.approx(base, rel=1e-6, abs=1e-9)
    for inside in (2, 3):
        assert abs(loss(_perturbed(problem, inside)) - base) > 1e-3 * max(abs(base), 1e-6)
    # and it is the loss on those tensors alone: the full problem's differs
    assert abs(loss(_problem(None)) - base) > 1e-6


def test_the_unrolled_attack_matches_the_chosen_tensors_only() -> None:
    client = ClientTraining(lr=0.1, local_epochs=1, batch_size=2, num_samples=2)
    problem = _problem(["5.weight"], client=client, target_kind="delta")
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    y, aux = torch.tensor([1, 4]), torch.zeros(())

    def loss(p: AttackProblem) -> float:
        return float(unroll_objective(p, FedAvgParams(tv_weight=0.0), functional=False)(x, y, aux).detach())

    base = loss(problem)
    assert loss(_perturbed(problem, 0)) == pytest.approx(base, rel=1e-6)
    assert loss(_perturbed(problem, 4)) != pytest.approx(base, rel=1e-3)


def test_names_and_prefixes_pick_parameters_in_model_order() -> None:
    names = [
        "conv1.weight",
        "inception3a.b1.conv.weight",
        "inception3a.b2.conv.weight",
        "inception3b.x",
        "fc.weight",
    ]
    assert select_parameters(names, ["fc.weight", "inception3a"]) == [*names[1:3], "fc.weight"]
    # a prefix stops at a dot: "inception3" is not a module of this model
    with pytest.raises(SpecError, match=r"'inception3' names no trainable parameter of the model"):
        select_parameters(names, ["inception3"])


def test_an_unknown_block_is_refused_naming_the_models_blocks() -> None:
    model = build_model(ModelSpec(arch="googlenet"), DataSpec(shape=(3, 32, 32)))
    names = [n for n, _ in model.named_parameters()]
    assert len(select_parameters(names, ["inception3a"])) == 18
    with pytest.raises(SpecError) as e:
        select_parameters(names, ["inception9z", "Mixed_5b"])
    message = str(e.value)
    assert "'inception9z', 'Mixed_5b' name no trainable parameter" in message
    assert "inception3a" in message and "inception5b" in message and "fc" in message


def test_a_container_model_shows_the_level_below() -> None:
    model = build_model(ModelSpec(arch="densenet121", knobs={"growth_rate": 4}), DataSpec(shape=(3, 32, 32)))
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(SpecError, match=r"features.conv0, features.norm0, features.denseblock1"):
        select_parameters(names, ["denseblock1"])
    assert select_parameters(names, ["features.denseblock1.denselayer1"])


def test_the_spec_refuses_an_empty_or_repeated_subset() -> None:
    base = {"update": {"simulate": {"images": ["coffee"]}}, "attack": {"name": "inverting_gradients"}}
    for bad, message in (
        (["a", "a"], "repeats a name"),
        ([], "at least 1 item"),
        ([""], "at least 1 character"),
    ):
        with pytest.raises(ValidationError, match=message):
            JobSpec.model_validate({**base, "attack": {**base["attack"], "match_layers": bad}})


def test_a_job_with_an_unknown_layer_fails_with_the_message(tmp_path: Path) -> None:
    spec = JobSpec.model_validate(
        {
            "model": {"arch": "lenet"},
            "update": {"simulate": {"images": ["coffee"]}},
            "data": {"shape": [3, 16, 16], "labels": [0]},
            "attack": {"name": "inverting_gradients", "match_layers": ["body.9"]},
            "budget": {"iterations": 2},
        }
    )
    ctx = JobContext(job_id="m", store=LocalStore(tmp_path), prefix="m", resolve=bytes)
    with pytest.raises(SpecError, match=r"attack.match_layers: 'body.9' names no trainable parameter"):
        run_job(spec, ctx)


def test_a_job_matching_one_layer_reports_it(tmp_path: Path) -> None:
    model = build_model(ModelSpec(arch="lenet"), DataSpec(shape=(3, 16, 16)))
    first = next(n for n, _ in model.named_parameters()).rsplit(".", 1)[0]
    spec = JobSpec.model_validate(
        {
            "model": {"arch": "lenet"},
            "update": {"simulate": {"images": ["coffee"]}},
            "data": {"shape": [3, 16, 16], "labels": [0]},
            "attack": {"name": "inverting_gradients", "match_layers": [first]},
            "budget": {"iterations": 3},
        }
    )
    ctx = JobContext(job_id="m", store=LocalStore(tmp_path), prefix="m", resolve=bytes)
    manifest = run_job(spec, ctx).manifest
    assert manifest["attack"]["matched_parameters"] == 2
    assert manifest["attack"]["iterations"] == 3
