"""The FedAvg-aware attack: its objective where the update's scale is known, and the search over
client facts known only roughly (candidates) or not at all."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.attacks.base import AttackProblem, AttackResult, Control
from service.attacks.fedavg import (
    Facts,
    FedAvgUnroll,
    candidate_facts,
    scale_ranges,
    search,
    unroll_objective,
)
from service.attacks.inverting import inverting_objective
from service.errors import SpecError
from service.fl import fedsgd_gradient, simulate_client
from service.specs import (
    NORMALIZATIONS,
    SEARCH_EPOCHS,
    SEARCH_LRS,
    Budget,
    ClientTraining,
    FedAvgParams,
    InvertingGradientsParams,
    Knowledge,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    ).eval()


def _problem(model: nn.Module, target: dict[str, torch.Tensor], kind: str, client: ClientTraining, n: int):
    names = [k for k, _ in model.named_parameters()]
    return AttackProblem(
        model=model,
        target=[target[k] for k in names],
        target_kind=kind,
        param_names=names,
        num_images=n,
        image_shape=(3, 8, 8),
        num_classes=10,
        normalization=NORMALIZATIONS["none"],
        knowledge=Knowledge.TRAINING_DETAILS,
        labels=torch.arange(n),
        client=client,
        bn_mode="eval",
    )


# ---------------------------------------------------------------------------------------------
# the objective with the update's scale known
# ---------------------------------------------------------------------------------------------


def test_one_local_step_shares_minus_lr_times_the_fedsgd_gradient():
    model, x, y = _model(), torch.rand(2, 3, 8, 8), torch.tensor([1, 7])
    one_step = ClientTraining(protocol="fedavg", lr=0.05, local_epochs=1, batch_size=2, num_samples=2)
    delta = simulate_client(model, x, y, one_step, "delta")
    for k, g in fedsgd_gradient(model, x, y).items():
        torch.testing.assert_close(delta[k], -0.05 * g)


def test_defaults_take_the_relative_l2_cost_and_equal_the_default_attack_at_one_step():
    """With lr and steps known the change's scale is known: `auto` is L2, relative to the
    target's norm, TV per image, so one unrolled step scores exactly what the default attack
    scores on the FedSGD gradient."""
    model, x, y = _model(), torch.rand(2, 3, 8, 8), torch.tensor([1, 7])
    facts = ClientTraining(protocol="fedavg", lr=0.05, local_epochs=1, batch_size=2, num_samples=2)
    delta = simulate_client(model, x, y, facts, "delta")
    unrolled = _problem(model, delta, "delta", facts, 2)
    assert FedAvgParams().cost == "auto" and unrolled.matching_cost(FedAvgParams().cost) == "l2"
    assert FedAvgParams().tv_weight == InvertingGradientsParams().tv_weight
    fedsgd = _problem(_model(), fedsgd_gradient(model, x, y), "gradient", ClientTraining(), 2)
    ours = unroll_objective(unrolled, FedAvgParams(), functional=False)
    default = inverting_objective(fedsgd, InvertingGradientsParams(), Control(Budget()))
    for probe in (torch.rand_like(x), torch.rand_like(x) * 2 - 1):
        torch.testing.assert_close(ours(probe, y, torch.zeros(())), default(probe, y, torch.zeros(())))


# ---------------------------------------------------------------------------------------------
# which hypotheses are searched
# ---------------------------------------------------------------------------------------------


def test_exact_facts_give_one_hypothesis_and_candidates_their_product():
    exact = ClientTraining(lr=0.1, local_epochs=2, batch_size=2, shuffle_seed=5)
    assert candidate_facts(exact, 4, search_unknown=True) == [Facts(0.1, 2, 2, 5)]
    rough = ClientTraining(lr={"min": 0.01, "max": 0.1, "points": 2}, local_epochs=[1, 3], batch_size=2)
    got = candidate_facts(rough, 4, search_unknown=True)
    assert got == [Facts(lr, e, 2, None) for lr in (0.01, 0.1) for e in (1, 3)]
    seeds = ClientTraining(lr=0.1, local_epochs=2, batch_size=2, shuffle_seed=[0, None])
    assert [f.shuffle_seed for f in candidate_facts(seeds, 4, search_unknown=True) or []] == [0, None]


def test_unknown_facts_take_plausible_values_or_case_2():
    told = ClientTraining(protocol="fedavg", lr=0.1)
    got = candidate_facts(told, 4, search_unknown=True) or []
    assert {f.local_epochs for f in got} == set(SEARCH_EPOCHS)
    assert {f.batch_size for f in got} == {1, 2, 4}  # powers of two below N, and N
    assert candidate_facts(told, 4, search_unknown=False) is None  # Case 2 (single step)
    nothing = candidate_facts(ClientTraining(), 1, search_unknown=True) or []
    assert {f.lr for f in nothing} == set(SEARCH_LRS) and {f.batch_size for f in nothing} == {1}


def test_full_batch_candidates_collapse_and_too_many_are_refused():
    told = ClientTraining(lr=0.1, local_epochs=1, batch_size=[4, 8, 16], shuffle_seed=[0, 1])
    assert candidate_facts(told, 4, search_unknown=True) == [Facts(0.1, 1, 4, 0)]  # one full batch
    many = ClientTraining(lr=list(range(1, 17)), local_epochs=list(range(1, 6)))
    with pytest.raises(SpecError, match="narrow the candidates"):
        candidate_facts(many, 1, search_unknown=True)


# ---------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------


def _fake_result(loss: float, iterations: int) -> AttackResult:
    return AttackResult(
        images=torch.zeros(1, 3, 8, 8),
        labels=torch.zeros(1, dtype=torch.long),
        loss_history=[loss] * iterations,
        best_loss=loss,
        iterations=iterations,
        restart_losses=[loss],
        stopped_early=False,
        stop_reason="iterations",
    )


def test_search_keeps_the_hypothesis_with_the_lowest_own_loss_and_reports_it():
    candidates = [Facts(lr, e, 1, None) for lr in (0.01, 0.05, 0.2) for e in (1, 2)]
    # best (0.05, 1): 1.1, then (0.01, 1): 1.14, then (0.05, 2): 1.2
    losses = {f: 1.0 + abs(f.lr - 0.05) + 0.1 * f.local_epochs for f in candidates}
    runs: list[tuple[Facts, int]] = []

    def run(facts: Facts, ctl: Control) -> AttackResult:
        runs.append((facts, ctl.budget.iterations))
        return _fake_result(losses[facts], ctl.budget.iterations)

    problem = _problem(
        _model(), {k: p.detach() for k, p in _model().named_parameters()}, "delta", ClientTraining(), 1
    )
    params = FedAvgParams(search_fraction=0.4, search_finalists=2)
    result = search(problem, params, Control(Budget(iterations=120)), torch.Generator(), candidates, run=run)
    s = result.details["search"]
    assert s["chosen"] == Facts(0.05, 1, 1, None).as_dict()  # type: ignore[index]
    assert [r["stage"] for r in s["screened"]] == [1] * 6 + [2] * 2  # type: ignore[index]
    assert {(r["lr"], r["local_epochs"]) for r in s["screened"][6:]} == {(0.05, 1), (0.01, 1)}  # type: ignore[index]
    assert runs[-1][0] == Facts(0.05, 1, 1, None)  # the winner runs last, on the rest of the budget
    assert result.iterations == 120 == sum(n for _, n in runs)
    assert runs[-1][1] == s["final_iterations"] > 120 / 2  # type: ignore[index]


def test_scale_ranges_let_every_hypothesis_reach_the_same_sizes():
    candidates = [Facts(0.01, 1, 1, None), Facts(0.1, 2, 1, None)]
    ranges = scale_ranges(candidates)
    assert ranges[candidates[0]] == pytest.approx((1.0, 20.0))  # sizes lr x epochs: 0.01 .. 0.2
    assert ranges[candidates[1]] == pytest.approx((0.05, 1.0))


def test_a_rescaled_hypothesis_fits_an_update_of_another_lr_within_its_range():
    model, x, y = _model(), torch.rand(1, 3, 8, 8), torch.tensor([3])
    truth = ClientTraining(protocol="fedavg", lr=0.1, local_epochs=1, batch_size=1, num_samples=1)
    problem = _problem(model, simulate_client(model, x, y, truth, "delta"), "delta", truth, 1)
    params, low = FedAvgParams(tv_weight=0.0), Facts(0.01, 1, 1, None)
    zero = torch.zeros(())
    assert float(unroll_objective(problem, params, False, low, (1.0, 20.0))(x, y, zero).detach()) < 1e-6
    capped = float(unroll_objective(problem, params, False, low, (1.0, 5.0))(x, y, zero).detach())
    assert capped == pytest.approx(0.5**2, rel=1e-4)  # at most 5 x 0.01: half the true change left
    plain = float(unroll_objective(problem, params, False, low)(x, y, zero).detach())
    assert plain == pytest.approx(0.9**2, rel=1e-4)


def test_a_real_search_reports_what_it_tried_and_spends_the_budget():
    model, x, y = _model(), torch.rand(1, 3, 8, 8), torch.tensor([3])
    truth = ClientTraining(protocol="fedavg", lr=0.1, local_epochs=2, batch_size=1, num_samples=1)
    told = ClientTraining(protocol="fedavg", lr=[0.01, 0.1], local_epochs=[1, 2, 3], batch_size=1)
    problem = _problem(model, simulate_client(model, x, y, truth, "delta"), "delta", told, 1)
    params = FedAvgParams(search_fraction=0.5, search_finalists=2)
    result = FedAvgUnroll().run(
        problem, params, Control(Budget(iterations=40)), torch.Generator().manual_seed(0)
    )
    s = result.details["search"]
    assert result.details["fedavg_case"] == "case1_searched" and len(s["candidates"]) == 6  # type: ignore[index]
    last = [r for r in s["screened"] if r["stage"] == 2]  # type: ignore[index]
    best = min(last, key=lambda r: r["loss"])
    assert s["chosen"] == {k: best[k] for k in ("lr", "local_epochs", "batch_size", "shuffle_seed")}  # type: ignore[index]
    assert result.details["facts"] == s["chosen"]  # type: ignore[index]
    assert result.iterations == 40 and s["final_iterations"] == 40 - sum(
        r["iterations"] for r in s["screened"]
    )  # type: ignore[index]


def test_exact_facts_run_no_search():
    model, x, y = _model(), torch.rand(1, 3, 8, 8), torch.tensor([3])
    truth = ClientTraining(protocol="fedavg", lr=0.1, local_epochs=2, batch_size=1, num_samples=1)
    problem = _problem(model, simulate_client(model, x, y, truth, "delta"), "delta", truth, 1)
    result = FedAvgUnroll().run(problem, FedAvgParams(), Control(Budget(iterations=3)), torch.Generator())
    assert result.details["fedavg_case"] == "case1_unrolled" and "search" not in result.details
    assert result.details["facts"] == Facts(0.1, 2, 1, None).as_dict()
