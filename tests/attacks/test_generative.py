"""The latent-space attacks (gias, ggl) on a tiny generator whose truth lies on its manifold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from service.attacks import ATTACKS
from service.attacks.base import AttackProblem, Control
from service.attacks.es import SepCMA
from service.attacks.generative import LatentModel, image_objective, latent_loss
from service.defenses import DEFENSES
from service.defenses import replay as replay_module
from service.defenses.replay import (
    detect_topk,
    plan_replay,
    replay_clip,
    replay_quantize,
    replay_sign,
    replay_topk,
)
from service.errors import SpecError
from service.generators import GeneratorManifest, build_generator, generator_bytes, load_generator
from service.jobs.runner import run_job
from service.jobs.types import JobContext
from service.metrics.image import psnr
from service.specs import (
    NORMALIZATIONS,
    Budget,
    ClipDefense,
    GglParams,
    GiasParams,
    JobSpec,
    Knowledge,
    NoiseDefense,
    QuantizeDefense,
    SignDefense,
    TopKDefense,
)
from service.storage import LocalStore

SHAPE = (3, 8, 8)
LATENT = 8


def _generator(seed: int = 0, shape: tuple[int, int, int] = SHAPE, classes: int | None = None):
    torch.manual_seed(seed)
    manifest = GeneratorManifest(
        arch="mlp", latent_dim=LATENT, image_shape=shape, width=32, trained_on="test", num_classes=classes
    )
    return load_generator(generator_bytes(build_generator(manifest), manifest))


def _classifier() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.Tanh(), nn.Linear(16, 4))


def _problem(num_images: int = 1, seed: int = 7, defenses=(), perturb: float = 0.0):
    """A FedSGD problem whose client images are G(z*) (or, with `perturb`, made by a generator
    whose weights differ a little: just off G's manifold)."""
    loaded = _generator()
    model = _classifier()
    g = torch.Generator().manual_seed(seed)
    z_true = torch.randn((num_images, LATENT), generator=g)
    maker = loaded.module
    if perturb:
        maker = _generator().module
        with torch.no_grad():
            for p in maker.parameters():
                p.add_(perturb * torch.randn(p.shape, generator=g) * p.abs().mean())
    with torch.no_grad():
        truth = maker(z_true)
    labels = torch.arange(num_images) % 4
    norm = NORMALIZATIONS["none"]
    x = truth  # normalisation "none": mean 0, std 1
    loss = nn.functional.cross_entropy(model(x), labels)
    target = [t.detach() for t in torch.autograd.grad(loss, list(model.parameters()))]
    if defenses:
        named = dict(zip([n for n, _ in model.named_parameters()], target, strict=True))
        for d in defenses:
            named = DEFENSES.get(d.name).apply(named, d, torch.Generator().manual_seed(0))
        target = list(named.values())
    problem = AttackProblem(
        model=model,
        target=target,
        target_kind="gradient",
        param_names=[n for n, _ in model.named_parameters()],
        num_images=num_images,
        image_shape=SHAPE,
        num_classes=4,
        normalization=norm,
        knowledge=Knowledge.DATA_DISTRIBUTION,
        labels=labels,
        label_source="given",
        defenses=list(defenses),
        image_generator=loaded,
    )
    return problem, truth, labels


def _loss_at(problem: AttackProblem, params, z: torch.Tensor) -> float:
    """The attack's own objective at latents z (one restart)."""
    gen = LatentModel(problem)
    objective, _ = image_objective(problem, params, functional=True)
    loss = latent_loss(gen, objective, params.latent_prior_weight, problem.device)
    with torch.no_grad():
        return float(loss(z, problem.labels, None))


def _run(problem, params, iterations: int, restarts: int = 1, seed: int = 0):
    control = Control(Budget(iterations=iterations, restarts=restarts))
    return ATTACKS.get(params.name).run(problem, params, control, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("restarts", [1, 2])
def test_latent_optimisation_lowers_the_loss_and_beats_a_random_latent(restarts):
    problem, truth, _ = _problem(num_images=2)
    params = GiasParams(generator="g", latent_share=1.0, latent_lr=0.1)
    random_z = torch.randn((2, LATENT), generator=torch.Generator().manual_seed(123))
    random_loss = _loss_at(problem, params, random_z)
    result = _run(problem, params, iterations=150, restarts=restarts)
    assert result.iterations == 150 and len(result.restart_losses) == restarts
    assert result.details["stage_iterations"] == {"latent": 150, "generator_finetune": 0}
    assert result.best_loss < 0.1 * random_loss, (result.best_loss, random_loss)
    assert result.loss_history[-1] < result.loss_history[0]
    # scoring only: the reconstruction is closer to the truth than a random point of the manifold
    with torch.no_grad():
        random_images = problem.image_generator.module(random_z)
    assert float(psnr(result.images, truth).mean()) > float(psnr(random_images, truth).mean()) + 3


def test_generator_finetuning_lowers_the_loss_further():
    """Truth just off G's manifold: with the same iterations, stage 2 (latents and weights) ends
    below latents alone, and below where its own stage 1 stopped."""
    problem, _, _ = _problem(num_images=2, perturb=0.3)
    latent_only = _run(problem, GiasParams(generator="g", latent_share=1.0, latent_lr=0.1), 160)
    stage_1 = _run(problem, GiasParams(generator="g", latent_share=1.0, latent_lr=0.1), 80)
    both = _run(problem, GiasParams(generator="g", latent_share=0.5, latent_lr=0.1, generator_lr=3e-3), 160)
    assert both.details["stage_iterations"] == {"latent": 80, "generator_finetune": 80}
    assert both.loss_history[79] == pytest.approx(stage_1.best_loss)
    assert both.best_loss < 0.7 * stage_1.best_loss, (both.best_loss, stage_1.best_loss)
    assert both.best_loss < latent_only.best_loss, (both.best_loss, latent_only.best_loss)


def test_ggl_cma_and_adam_lower_the_loss_below_a_random_latent():
    problem, _, _ = _problem(num_images=1)
    random_z = torch.randn((1, LATENT), generator=torch.Generator().manual_seed(123))
    for optimizer in ("cma", "adam"):
        params = GglParams(generator="g", optimizer=optimizer, population=12, latent_lr=0.1)
        random_loss = _loss_at(problem, params, random_z)
        result = _run(problem, params, iterations=60, restarts=2)
        assert result.best_loss < 0.2 * random_loss, (optimizer, result.best_loss, random_loss)
        assert result.details["optimizer"] == optimizer
    assert result.details["adaptive_defenses"]["replayed"] == []


def test_separable_cma_es_minimises_a_stretched_sphere():
    g = torch.Generator().manual_seed(0)
    es = SepCMA(torch.full((2, 10), 3.0), 1.0, 12, g)
    scales = torch.logspace(0, 2, 10)
    for _ in range(300):
        x = es.ask()
        es.tell(((x * scales) ** 2).sum(-1))
    assert float(((es.mean * scales) ** 2).sum(-1).max()) < 1e-6


def test_ggl_replays_top_k_on_its_trial_gradients(monkeypatch):
    seen: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
    original = replay_module.replay_topk

    def spy(trial, ratio):
        out = original(trial, ratio)
        seen.append(([t.detach() for t in trial], [t.detach() for t in out]))
        return out

    monkeypatch.setattr(replay_module, "replay_topk", spy)
    problem, _, _ = _problem(defenses=[TopKDefense(ratio=0.2)])
    result = _run(problem, GglParams(generator="g", optimizer="adam"), iterations=3)
    assert result.details["adaptive_defenses"]["replayed"] == ["topk"]
    assert len(seen) == 3
    for trial, out in seen:
        for before, after in zip(trial, out, strict=True):
            k = max(1, round(0.2 * before.numel()))
            top = set(before.flatten().abs().topk(k).indices.tolist())
            assert set(after.flatten().nonzero().flatten().tolist()) == top
    # without adaptation the trial gradients are not sparsified
    seen.clear()
    _run(problem, GglParams(generator="g", optimizer="adam", adaptive_defenses=False), iterations=2)
    assert seen == []


def test_ggl_sees_top_k_in_the_updates_zero_pattern_when_the_spec_does_not_say():
    problem, _, _ = _problem(defenses=[TopKDefense(ratio=0.25)])
    problem.defenses = []
    result = _run(problem, GglParams(generator="g", optimizer="cma", population=8), iterations=2)
    adaptive = result.details["adaptive_defenses"]
    assert adaptive["replayed"] == ["topk"] and "top-k" in adaptive["detected"]
    plain, _, _ = _problem()
    assert detect_topk(plain.target) is None


def test_replays_compute_what_the_defenses_compute():
    torch.manual_seed(0)
    update = {"a": torch.randn(40, 30), "b": torch.randn(50)}
    trial = list(update.values())
    g = torch.Generator().manual_seed(0)

    def registered(spec):
        return list(DEFENSES.get(spec.name).apply(update, spec, g).values())

    for got, want in [
        (replay_topk(trial, 0.1), registered(TopKDefense(ratio=0.1))),
        (replay_quantize(trial, 3), registered(QuantizeDefense(bits=3, stochastic=False))),
        (replay_sign(trial), registered(SignDefense())),
        (replay_clip(trial, 2.0, 1.0), registered(ClipDefense(max_norm=2.0))),
        # the update is 4x the trial gradient: clipping it to 2 scales the trial to norm 0.5
        ([4 * t for t in replay_clip(trial, 2.0, 4.0)], registered(ClipDefense(max_norm=2.0))),
    ]:
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
    x = [t.clone().requires_grad_() for t in trial]
    sum(t.sum() for t in replay_quantize(x, 2)).backward()  # straight through: the identity's gradient
    assert all(torch.equal(t.grad, torch.ones_like(t)) for t in x)


def test_replay_plan_skips_noise_and_stochastic_rounding():
    plan = plan_replay(
        [ClipDefense(), NoiseDefense(), QuantizeDefense(stochastic=True), TopKDefense()], update_scale=None
    )
    assert plan.describe() == ["topk"]
    assert len(plan.skipped) == 3 and any("noise" in s for s in plan.skipped)


# --------------------------------------------------------------------------------------------
# through the runner, the CLI and the API
# --------------------------------------------------------------------------------------------


def _generator_file(tmp_path: Path, shape=(3, 16, 16), classes=None) -> str:
    torch.manual_seed(0)
    manifest = GeneratorManifest(
        arch="mlp", latent_dim=LATENT, image_shape=shape, width=32, trained_on="faces", num_classes=classes
    )
    path = tmp_path / "gen.safetensors"
    path.write_bytes(generator_bytes(build_generator(manifest), manifest))
    return str(path)


def _job(tmp_path: Path, **spec):
    store = LocalStore(tmp_path / "store")
    ctx = JobContext(job_id="t", store=store, prefix="jobs/t", resolve=lambda ref: Path(ref).read_bytes())
    return run_job(JobSpec.model_validate(spec), ctx).manifest


@pytest.mark.parametrize("name", ["gias", "ggl"])
def test_a_generative_job_runs_end_to_end_and_records_the_generators_data(tmp_path, name):
    manifest = _job(
        tmp_path,
        model={"arch": "convnet", "knobs": {"width": 8}},
        update={"simulate": {"images": ["astronaut", "coffee"], "labels": [1, 3]}},
        data={"shape": [3, 16, 16], "num_images": 2, "labels": [1, 3]},
        knowledge=2,
        attack={"name": name, "generator": _generator_file(tmp_path)},
        budget={"iterations": 4, "restarts": 2},
    )
    a = manifest["attack"]
    assert manifest["status"] == "succeeded" and a["iterations"] == 4
    assert a["generator"]["trained_on"] == "faces" and a["details"]["generator"]["trained_on"] == "faces"
    assert manifest["metrics"]["mean"]["psnr"] > 0


def test_generative_attacks_unroll_fedavg_with_level_three(tmp_path):
    training = {"protocol": "fedavg", "lr": 0.05, "local_epochs": 1, "batch_size": 1}
    common = dict(
        model={"arch": "convnet", "knobs": {"width": 8}},
        data={"shape": [3, 16, 16], "labels": [0, 1]},
        attack={"name": "gias", "generator": _generator_file(tmp_path)},
        budget={"iterations": 2},
    )
    update = {"kind": "delta", "simulate": {"images": ["astronaut", "coffee"], "training": training}}
    unrolled = _job(tmp_path, update={**update, "client": training}, knowledge=3, **common)
    assert unrolled["attack"]["details"]["objective"] == "fedavg_unrolled"
    assert unrolled["attack"]["target_kind"] == "delta"
    single = _job(tmp_path, update={**update, "client": training}, knowledge=2, **common)
    assert single["attack"]["details"]["objective"] == "gradient"


@pytest.mark.parametrize(
    ("shape", "classes", "fragment"),
    [
        ((3, 8, 8), None, "makes images of shape 3x8x8 but data.shape is 3x16x16"),
        ((3, 16, 16), 5, "5 classes"),
    ],
)
def test_the_runner_refuses_a_generator_that_does_not_fit_the_data(tmp_path, shape, classes, fragment):
    with pytest.raises(SpecError, match=fragment):
        _job(
            tmp_path,
            model={"arch": "convnet", "knobs": {"width": 8}},
            update={"simulate": {"images": ["astronaut"], "labels": [1]}},
            data={"shape": [3, 16, 16], "num_images": 1, "labels": [1]},
            knowledge=2,
            attack={"name": "gias", "generator": _generator_file(tmp_path, shape, classes)},
            budget={"iterations": 1},
        )


def test_a_conditional_generator_is_given_the_labels(tmp_path):
    manifest = _job(
        tmp_path,
        model={"arch": "convnet", "knobs": {"width": 8}},
        update={"simulate": {"images": ["astronaut"], "labels": [3]}},
        data={"shape": [3, 16, 16], "num_images": 1, "labels": [3]},
        knowledge=2,
        attack={"name": "ggl", "optimizer": "adam", "generator": _generator_file(tmp_path, classes=10)},
        budget={"iterations": 2},
    )
    assert manifest["attack"]["generator"]["num_classes"] == 10


def test_the_cli_refuses_level_one_with_a_clear_message(tmp_path):
    from typer.testing import CliRunner

    from service.cli import app

    args = [
        "attack", "--arch", "lenet", "--images", "astronaut", "--labels", "1", "--size", "16",
        "--attack", "gias", "--param", f"generator={json.dumps(_generator_file(tmp_path))}",
        "--iterations", "1", "--out", str(tmp_path), "--knowledge",
    ]  # fmt: skip
    refused = CliRunner().invoke(app, [*args, "1"])
    assert refused.exit_code == 2, refused.output
    assert "needs knowledge level 2" in refused.output and "Traceback" not in refused.output
    ok = CliRunner().invoke(app, [*args, "2", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["attack"]["generator"]["trained_on"] == "faces"


def test_the_catalog_lists_the_latent_space_attacks():
    from service.catalog import full_catalog

    attacks = {a["name"]: a for a in full_catalog()["attacks"]}
    for name in ("gias", "ggl"):
        assert attacks[name]["required_knowledge"] == 2
        fields = {f["name"] for f in attacks[name]["fields"]}
        assert {"generator", "cost", "latent_prior_weight"} <= fields
    assert {"latent_share", "generator_lr", "latent_lr"} <= {f["name"] for f in attacks["gias"]["fields"]}
    assert {"optimizer", "population", "adaptive_defenses"} <= {f["name"] for f in attacks["ggl"]["fields"]}


@pytest.mark.parametrize("restarts", [1, 2])
def test_gias_optimises_labels_jointly_when_none_are_known(restarts):
    problem, _, labels = _problem(num_images=2)
    problem.labels, problem.label_source = None, "joint optimisation"
    result = _run(problem, GiasParams(generator="g", latent_lr=0.1), iterations=6, restarts=restarts)
    assert result.details["joint_labels"] is True
    assert result.labels.shape == labels.shape and result.labels.dtype == torch.long
    with pytest.raises(SpecError, match="needs labels"):
        _run(problem, GglParams(generator="g", optimizer="cma"), iterations=2)
