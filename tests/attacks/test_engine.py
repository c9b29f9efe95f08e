"""The attack engine end to end through the one runner, on small real problems."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kernels import total_variation
from service.attacks import ATTACKS
from service.attacks.base import AttackProblem, Control, coarse_projection, lr_factor
from service.attacks.fedavg import unroll_objective
from service.attacks.inverting import attack_model, inverting_objective, matching_objective
from service.attacks.optimize import OptimState, optimise
from service.jobs.runner import run_job
from service.jobs.types import GRID_PNG, METRICS_JSON, RECONSTRUCTION, REPORT_HTML, JobContext
from service.specs import (
    NORMALIZATIONS,
    Budget,
    ClientTraining,
    FedAvgParams,
    InvertingGradientsParams,
    JobSpec,
    Knowledge,
)
from service.storage import LocalStore


def job(tmp_path, **spec) -> tuple[dict, LocalStore]:
    store = LocalStore(tmp_path / "store")
    ctx = JobContext(job_id="t", store=store, prefix="jobs/t", resolve=lambda ref: Path(ref).read_bytes())
    result = run_job(JobSpec.model_validate(spec), ctx)
    return result.manifest, store


def test_dlg_recovers_lenet_image(tmp_path):
    """DLG's own setting: sigmoid LeNet, one 32x32 image, FedSGD; iDLG infers the label."""
    manifest, store = job(
        tmp_path,
        model={"arch": "lenet"},
        update={"simulate": {"images": ["astronaut"], "labels": [3]}},
        data={"shape": [3, 32, 32], "num_classes": 10, "num_images": 1},
        knowledge=0,
        attack={"name": "dlg"},
        budget={"iterations": 100},
    )
    assert manifest["attack"]["label_source"] == "inferred (iDLG)"
    assert manifest["attack"]["labels"] == [3]
    assert manifest["metrics"]["mean"]["psnr"] >= 30.0, manifest["metrics"]
    keys = set(store.list("jobs/t"))
    assert {f"jobs/t/{n}" for n in (METRICS_JSON, RECONSTRUCTION, GRID_PNG, REPORT_HTML)} <= keys


def test_inverting_gradients_improves_on_its_start_and_reports_provenance(tmp_path):
    manifest, _ = job(
        tmp_path,
        model={"arch": "convnet", "knobs": {"width": 16}},
        update={"simulate": {"images": ["astronaut", "coffee"], "labels": [1, 3]}},
        data={"shape": [3, 16, 16], "num_images": 2, "labels": [1, 3]},
        attack={"name": "inverting_gradients", "tv_weight": 1e-3},
        budget={"iterations": 40, "restarts": 2},
        seed=5,
    )
    a = manifest["attack"]
    assert a["iterations"] == 40 and len(a["restart_losses"]) == 2
    assert a["best_loss"] == min(v for v in a["restart_losses"] if v is not None)
    assert a["label_source"] == "given"
    assert manifest["seed"] == 5 and manifest["versions"]["torch"] == torch.__version__
    assert manifest["spec"]["attack"]["name"] == "inverting_gradients"
    assert {"setup_s", "attack_s", "total_s"} <= set(manifest["timings"])
    assert manifest["metrics"]["worst_case"]["psnr"] >= manifest["metrics"]["mean"]["psnr"]


def test_stop_request_returns_best_so_far(tmp_path):
    # the runner also checks for a stop during the setup: count the checks once the attack runs
    calls = {"n": 0, "attacking": False}

    def progress(p) -> None:
        calls["attacking"] |= p.stage == "attack"

    def should_stop() -> bool:
        calls["n"] += calls["attacking"]
        return calls["n"] > 5

    store = LocalStore(tmp_path)
    spec = JobSpec.model_validate(
        {
            "model": {"arch": "lenet"},
            "update": {"simulate": {"images": ["coffee"]}},
            "data": {"shape": [3, 16, 16], "num_images": 1},
            "budget": {"iterations": 1000},
        }
    )
    ctx = JobContext(
        job_id="s", store=store, prefix="s", resolve=bytes, progress=progress, should_stop=should_stop
    )
    result = run_job(spec, ctx)
    assert result.status == "cancelled"
    assert result.manifest["attack"]["stop_reason"] == "stopped"
    assert result.manifest["attack"]["iterations"] < 10
    assert store.exists("s/metrics.json")


def _problem(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw) -> AttackProblem:
    loss = nn.functional.cross_entropy(model(x), y)
    names = [n for n, _ in model.named_parameters()]
    target = [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]
    return AttackProblem(
        model=model,
        target=target,
        target_kind="gradient",
        param_names=names,
        num_images=x.shape[0],
        image_shape=tuple(x.shape[1:]),
        num_classes=10,
        normalization=NORMALIZATIONS["none"],
        knowledge=Knowledge.PRIORS,
        labels=y,
        **kw,
    )


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    ).eval()


def test_batched_restarts_equal_sequential_restarts():
    model = _small_model()
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([1, 4])
    params = InvertingGradientsParams(tv_weight=1e-2, lr=0.05)
    start = torch.randn(3, 2, 3, 8, 8)

    def run(init: torch.Tensor):
        problem = _problem(model, x, y)
        objective = matching_objective(
            problem, attack_model(problem), functional=init.shape[0] > 1, cost="cosine", tv_weight=1e-2
        )
        state = OptimState(init.clone(), y.expand(init.shape[0], 2).clone(), joint_labels=False)
        control = Control(Budget(iterations=15, restarts=init.shape[0]))
        return optimise(problem, params, control, torch.Generator(), objective, init=state)

    batched = run(start)
    sequential = [run(start[r : r + 1]) for r in range(3)]
    for r, seq in enumerate(sequential):
        assert math.isclose(batched.restart_losses[r], seq.restart_losses[0], rel_tol=1e-4, abs_tol=1e-6)
    best = min(range(3), key=lambda r: sequential[r].best_loss)
    assert torch.allclose(batched.images, sequential[best].images, atol=1e-5)


def test_relative_l2_is_the_l2_cost_over_the_targets_squared_norm():
    model = _small_model()
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([1, 4])
    problem = _problem(model, x, y)
    norm = float(sum(t.double().pow(2).sum() for t in problem.target))
    start, aux = torch.randn(2, 3, 8, 8), torch.zeros(())
    relative = matching_objective(
        problem, attack_model(problem), functional=False, cost="l2", tv_weight=1e-2, relative_l2=True
    )
    absolute = matching_objective(
        problem, attack_model(problem), functional=False, cost="l2", tv_weight=1e-2 * norm
    )
    assert norm > 10  # a real rescaling, not a no-op
    assert float(relative(start, y, aux).detach()) * norm == pytest.approx(
        float(absolute(start, y, aux).detach()), rel=1e-5
    )
    # cosine costs are scale-free already and left alone
    cos_rel = matching_objective(
        problem, attack_model(problem), functional=False, cost="cosine", relative_l2=True
    )
    cos_abs = matching_objective(problem, attack_model(problem), functional=False, cost="cosine")
    assert float(cos_rel(start, y, aux).detach()) == pytest.approx(
        float(cos_abs(start, y, aux).detach()), rel=1e-6
    )


def test_tv_per_image_sums_the_images_means_and_the_default_l2_attack_uses_it():
    model = _small_model()
    start, aux = torch.randn(3, 3, 8, 8), torch.zeros(())
    x, y = torch.rand(3, 3, 8, 8), torch.tensor([1, 4, 6])
    problem = _problem(model, x, y)
    tv = float(total_variation(start))

    def value(problem: AttackProblem = problem, n: int = 3, **kw) -> float:
        objective = matching_objective(
            problem, attack_model(problem), functional=False, relative_l2=True, **kw
        )
        return float(objective(start[:n], y[:n], aux).detach())

    match = value(cost="l2")
    assert value(cost="l2", tv_weight=0.1) == pytest.approx(match + 0.1 * tv, rel=1e-5)
    assert value(cost="l2", tv_weight=0.1, tv_per_image=True) == pytest.approx(match + 0.3 * tv, rel=1e-5)
    # one image: per-image and batch-mean TV are the same prior
    single = _problem(model, x[:1], y[:1])
    one = [value(single, 1, cost="l2", tv_weight=0.1, tv_per_image=p) for p in (False, True)]
    assert one[0] == one[1]

    control = Control(Budget(iterations=1))
    for cost, images in (("l2", 3), ("cosine", 1)):
        params = InvertingGradientsParams(cost=cost, tv_weight=0.1)
        got = float(inverting_objective(problem, params, control)(start, y, aux).detach())
        assert got == pytest.approx(value(cost=cost) + 0.1 * images * tv, rel=1e-5)


def test_learning_rate_schedules():
    # Inverting Gradients' step decay: x0.1 at 3/8, 5/8 and 7/8 of the budget
    assert [lr_factor("step", f) for f in (0.0, 0.374, 0.375, 0.625, 0.875)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.01, 0.001]
    )
    cosine = [lr_factor("cosine", i / 100) for i in range(101)]
    assert cosine[0] == pytest.approx(1.0) and cosine[-1] == pytest.approx(1e-3)
    assert cosine[50] == pytest.approx(0.5, abs=1e-3)
    assert all(a > b for a, b in itertools.pairwise(cosine))
    with pytest.raises(ValueError, match="schedule"):
        lr_factor("exponential", 0.5)


def test_coarse_projection_is_the_tile_mean_and_idempotent():
    x = torch.randn(2, 3, 7, 9)
    p = coarse_projection(x, 2)
    assert torch.allclose(p[..., 0, 0], x[..., :2, :2].mean((-2, -1)))
    assert torch.allclose(p[..., 6, 8], x[..., 6, 8])  # a 1x1 edge tile
    assert torch.allclose(coarse_projection(p, 2), p)
    # an orthogonal projection: the residual is orthogonal to every block-constant image
    assert abs(float(((x - p) * coarse_projection(torch.randn_like(x), 2)).sum())) < 1e-4


def test_coarse_to_fine_steps_within_block_images_then_refines():
    model = _small_model()
    x, y = torch.rand(1, 3, 8, 8), torch.tensor([3])
    problem = _problem(model, x, y)
    model = attack_model(problem)
    inner = matching_objective(problem, model, functional=False, cost="cosine", tv_weight=1e-2)
    seen: list[torch.Tensor] = []

    def objective(images: torch.Tensor, labels: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        seen.append(images.detach().clone())
        return inner(images, labels, aux)

    params = InvertingGradientsParams(coarse_fraction=0.5, coarse_block=2, lr=0.05)
    optimise(problem, params, Control(Budget(iterations=12)), torch.Generator().manual_seed(0), objective)
    assert len(seen) == 12
    coarse = [torch.allclose(coarse_projection(s, 2), s, atol=1e-6) for s in seen]
    assert all(coarse[:7])  # iterations 0..5 step in the coarse space; the 7th image is their result
    assert not any(coarse[8:])  # full-resolution steps leave it


def test_fedavg_unroll_matches_client_training_at_the_true_images():
    """The unrolled objective is ~0 at the client's own images: it replays local training exactly."""
    from service.fl import simulate_client

    model = _small_model()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([1, 4, 4, 7])
    facts = ClientTraining(
        protocol="fedavg", lr=0.1, local_epochs=2, batch_size=2, num_samples=4, shuffle_seed=3
    )
    delta = simulate_client(model, x, y, facts, "delta")
    names = [n for n, _ in model.named_parameters()]
    problem = AttackProblem(
        model=model,
        target=[delta[n] for n in names],
        target_kind="delta",
        param_names=names,
        num_images=4,
        image_shape=(3, 8, 8),
        num_classes=10,
        normalization=NORMALIZATIONS["none"],
        knowledge=Knowledge.TRAINING_DETAILS,
        labels=y,
        client=facts,
        bn_mode="eval",
    )
    objective = unroll_objective(problem, FedAvgParams(cost="cosine", tv_weight=0.0), functional=True)
    at_truth = float(objective(x, y, torch.zeros(())))
    at_noise = float(objective(torch.rand_like(x), y, torch.zeros(())))
    assert at_truth < 1e-5 < at_noise


@pytest.mark.parametrize(
    ("told", "params", "case"),
    [
        ({"protocol": "fedavg", "lr": 0.05, "local_epochs": 1, "batch_size": 1}, {}, "case1_unrolled"),
        ({"protocol": "fedavg", "lr": 0.05, "local_epochs": 1}, {}, "case1_searched"),
        (
            {"protocol": "fedavg", "lr": 0.05, "local_epochs": 1},
            {"unknown_facts": "single_step"},
            "case2_single_step",
        ),
    ],
)
def test_fedavg_attack_unrolls_searches_or_falls_back_without_batch_size(tmp_path, told, params, case):
    training = {"protocol": "fedavg", "lr": 0.05, "local_epochs": 1, "batch_size": 1}
    manifest, _ = job(
        tmp_path,
        model={"arch": "convnet", "knobs": {"width": 8}},
        update={
            "kind": "delta",
            "simulate": {"images": ["astronaut", "coffee"], "labels": [0, 1], "training": training},
            "client": told,
        },
        data={"shape": [3, 16, 16], "labels": [0, 1]},
        knowledge=3,
        attack={"name": "fedavg_unroll", **params},
        budget={"iterations": 6},
    )
    details = manifest["attack"]["details"]
    assert details["fedavg_case"] == case
    if case == "case1_searched":  # batch size unknown: 1 and 2 (one full batch) are searched
        search = details["search"]
        assert [c["batch_size"] for c in search["candidates"]] == [1, 2]
        assert search["chosen"] == details["facts"] and search["chosen"]["lr"] == 0.05
        assert manifest["attack"]["iterations"] == 6  # screening and the winner share the budget
    else:
        assert "search" not in details  # exact facts (or Case 2): nothing is searched


def test_registry_lists_every_attack_with_its_knowledge():
    assert {"dlg", "inverting_gradients", "gradinversion", "fedavg_unroll"} <= set(ATTACKS.names())
    assert int(ATTACKS.get("gradinversion").required_knowledge) == 4


@pytest.mark.parametrize("strategy", ["joint"])
def test_dlg_joint_labels_run(tmp_path, strategy):
    manifest, _ = job(
        tmp_path,
        model={"arch": "lenet"},
        update={"simulate": {"images": ["chelsea"], "labels": [2]}},
        data={"shape": [3, 16, 16], "num_images": 1},
        knowledge=0,
        attack={"name": "dlg", "label_strategy": strategy, "max_eval": 4},
        budget={"iterations": 3},
    )
    assert manifest["attack"]["label_source"] == "joint optimisation"
    assert len(manifest["attack"]["labels"]) == 1
    # every L-BFGS step evaluates the objective at least once and at most 1.25 * max_eval times
    evaluations = manifest["attack"]["details"]["evaluations"]
    assert manifest["attack"]["iterations"] <= evaluations <= 3 * 5


def test_single_value_per_channel_batch_norm_is_a_clear_spec_error(tmp_path):
    from service.errors import SpecError

    with pytest.raises(SpecError, match="one value per channel"):
        job(
            tmp_path,
            model={"arch": "resnet18", "knobs": {"stem": "imagenet"}},
            update={"simulate": {"images": ["coffee"]}},
            data={"shape": [3, 16, 16], "num_images": 1},
            budget={"iterations": 1},
        )


def test_fedavg_attack_with_batched_restarts(tmp_path):
    """The unrolled local training runs under vmap when restarts are batched."""
    training = {"protocol": "fedavg", "lr": 0.05, "local_epochs": 2, "batch_size": 1, "shuffle_seed": 1}
    manifest, _ = job(
        tmp_path,
        model={"arch": "convnet", "knobs": {"width": 8, "batchnorm": True}},
        update={
            "kind": "weights",
            "simulate": {"images": ["astronaut", "coffee"], "labels": [0, 1], "training": training},
            "client": training,
        },
        data={"shape": [3, 16, 16], "labels": [0, 1]},
        knowledge=3,
        attack={"name": "fedavg_unroll"},
        budget={"iterations": 3, "restarts": 2},
    )
    assert manifest["attack"]["details"]["fedavg_case"] == "case1_unrolled"
    assert len(manifest["attack"]["restart_losses"]) == 2
    assert all(v is not None for v in manifest["attack"]["restart_losses"])


def test_gradinversion_uses_the_clients_bn_statistics_at_level_four(tmp_path):
    manifest, _ = job(
        tmp_path,
        model={"arch": "convnet", "knobs": {"width": 8, "batchnorm": True}},
        update={"simulate": {"images": ["astronaut", "coffee"], "labels": [2, 5]}},
        data={"shape": [3, 16, 16], "labels": [2, 5]},
        knowledge=4,
        attack={"name": "gradinversion", "bn_weight": 0.01, "group_size": 2},
        budget={"iterations": 4, "restarts": 2},
    )
    a = manifest["attack"]
    assert a["details"]["bn_statistics"] == "the client's batch (simulated client)"
    assert a["iterations"] == 4 and len(a["restart_losses"]) == 2


def test_gradinversion_refuses_a_model_without_batch_norm(tmp_path):
    from service.errors import SpecError

    with pytest.raises(SpecError, match="batch-norm"):
        job(
            tmp_path,
            model={"arch": "lenet"},
            update={"simulate": {"images": ["astronaut"]}},
            data={"shape": [3, 16, 16], "num_images": 1},
            knowledge=4,
            attack={"name": "gradinversion"},
            budget={"iterations": 2},
        )


@pytest.mark.parametrize("knowledge", [1, 3])
def test_the_clients_batch_norm_mode_is_known_at_every_level(tmp_path, knowledge):
    """A client normalising with the server's public BN buffers (eval mode) is attacked in eval
    mode at every knowledge level: the mode is part of the protocol, not a training detail."""
    manifest, _ = job(
        tmp_path,
        model={"arch": "convnet", "knobs": {"width": 8, "batchnorm": True}},
        update={
            "simulate": {"images": ["astronaut"], "labels": [2], "training": {"bn_mode": "eval", "lr": 0.1}},
            "client": {"bn_mode": "eval", "lr": 0.1},
        },
        data={"shape": [3, 16, 16], "labels": [2]},
        knowledge=knowledge,
        attack={"name": "inverting_gradients"},
        budget={"iterations": 2},
    )
    assert manifest["attack"]["bn_mode"] == "eval"


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1),
        nn.BatchNorm2d(4, affine=False), nn.Flatten(), nn.Linear(4 * 8 * 8, 10),
    ).double()  # fmt: skip
    for m in model.modules():  # the server's running statistics, far from the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.2, 3)
            if m.weight is not None:
                nn.init.uniform_(m.weight, 0.5, 2)
                nn.init.uniform_(m.bias, -1, 1)
    return model.eval()


def test_eval_batch_norm_runs_as_an_affine_map_with_the_same_derivatives():
    """The attacker's eval-mode BN is rewritten as x * scale + shift: value, parameter gradients
    and the second-order gradient an attack takes w.r.t. the images all equal batch norm's."""
    import copy

    native = _bn_model()
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([1, 4])
    patched = attack_model(_problem(copy.deepcopy(native), x, y, bn_mode="eval"))
    assert all("forward" in vars(m) for m in patched.modules() if isinstance(m, nn.BatchNorm2d)), (
        "eval-mode BN layers run as affine maps"
    )

    def second_order(model: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        xr = x.clone().requires_grad_()
        out = model(xr)
        grads = torch.autograd.grad(
            nn.functional.cross_entropy(out, y), list(model.parameters()), create_graph=True
        )
        (gx,) = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), xr)
        return out, [g.detach() for g in grads], gx

    out_n, grads_n, gx_n = second_order(native)
    out_p, grads_p, gx_p = second_order(patched)
    torch.testing.assert_close(out_p, out_n, rtol=1e-12, atol=1e-12)
    for gp, gn in zip(grads_p, grads_n, strict=True):
        torch.testing.assert_close(gp, gn, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx_p, gx_n, rtol=1e-10, atol=1e-12)

    # put back in training mode, the layer is batch norm again (batch statistics, running update)
    patched.train()
    bn = patched[1]
    before = bn.running_mean.clone()
    torch.testing.assert_close(patched(x), native.train()(x))
    assert not torch.equal(bn.running_mean, before)
