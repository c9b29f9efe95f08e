"""The stage-map path: a train-mode ResNet's second-stage output read from the third stage's
low-rank weight gradients, and the attack that matches it (service/attacks/stage_map.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.attacks.base import Control
from service.attacks.inverting import InvertingGradients, attack_model
from service.attacks.stage_map import deoffset, recover_map, stage_map_for, stage_objective
from service.models import build_model
from service.specs import Budget, DataSpec, InvertingGradientsParams, ModelSpec

SIZE = 16  # layer2's output is 128 x 8 x 8: 1377 unknowns, a second's solve


def _resnet() -> nn.Module:
    data = DataSpec(shape=(3, SIZE, SIZE), num_classes=10, normalization="cifar10")
    return build_model(ModelSpec(arch="resnet18", knobs={"stem": "cifar"}, init_seed=0), data)


def _image(n: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _layer2_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    m = model
    with torch.no_grad():
        return m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))  # type: ignore[operator]


def _client_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    named = dict(model.named_parameters())
    g = torch.autograd.grad(F.cross_entropy(model(x), y), list(named.values()))
    return dict(zip(named, g, strict=True))


def test_the_map_is_read_from_the_gradient_without_the_image():
    model, x, y = _resnet(), _image(), torch.tensor([3])
    g = _client_grads(model, x, y)
    f, info = recover_map(g["layer3.0.conv1.weight"], g["layer3.0.downsample.0.weight"], (128, 8, 8))
    assert f is not None, info
    assert info["rank"] == 15 and info["null_dim"] == 129  # the map, its scale, 128 even-grid offsets
    truth = deoffset(_layer2_output(model, x)).flatten().double()
    assert float(F.cosine_similarity(deoffset(f).flatten(), truth, dim=0)) > 0.9999


def test_the_directions_it_leaves_free_are_invisible_to_the_gradient():
    """Scaling the map or adding a per-channel constant on its even-even pixels changes no
    gradient above it; a change of the same size elsewhere does. (BN's eps is made negligible to
    show the invariance exact; at the default 1e-5 it holds to ~1e-4.)"""
    model, x, y = _resnet().double(), _image().double(), torch.tensor([3])
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-12
    above = [p for n, p in model.named_parameters() if n.split(".")[0] in ("layer3", "layer4", "fc")]

    def grads_above(change: torch.Tensor | None, scale: float = 1.0) -> list[torch.Tensor]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            return out * scale + (change if change is not None else 0)

        handle = model.layer2.register_forward_hook(hook)
        try:
            return list(torch.autograd.grad(F.cross_entropy(model(x), y), above))
        finally:
            handle.remove()

    def moved(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        num = sum(float((u - v).pow(2).sum()) for u, v in zip(a, b, strict=True))
        return (num / sum(float(u.pow(2).sum()) for u in a)) ** 0.5

    base = grads_above(None)
    offsets = torch.zeros(1, 128, 8, 8, dtype=torch.float64)
    offsets[:, :, ::2, ::2] = torch.randn(1, 128, 1, 1, dtype=torch.float64)
    assert moved(base, grads_above(offsets)) < 1e-8
    assert moved(base, grads_above(None, scale=1.7)) < 1e-8
    elsewhere = offsets.roll(1, dims=-1)  # the same constants on odd columns
    assert moved(base, grads_above(elsewhere)) > 1e-2


@pytest.mark.parametrize(("noise", "why"), [(1e-2, "no rank gap"), (1e-3, "128 dimensions, not 129")])
def test_a_noised_gradient_is_refused(noise, why):
    """Noise closes the rank gap; less of it leaves a gap but no exact solution."""
    model, x, y = _resnet(), _image(), torch.tensor([3])
    g = _client_grads(model, x, y)
    conv, short = g["layer3.0.conv1.weight"], g["layer3.0.downsample.0.weight"]
    draw = torch.randn(conv.shape, generator=torch.Generator().manual_seed(0))
    f, info = recover_map(conv + noise * conv.norm() / conv.numel() ** 0.5 * draw, short, (128, 8, 8))
    assert f is None and why in info["why"]


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("eval", "eval mode"),
        ("batch", "more than one image"),
        ("label", "label is not known"),
        ("off", "off"),
    ],
)
def test_the_path_is_taken_only_where_it_holds(case, why, fedsgd_problem):
    model = _resnet()
    x, y = _image(2 if case == "batch" else 1), torch.tensor([3, 4] if case == "batch" else [3])
    problem = fedsgd_problem(model, x, y, "eval" if case == "eval" else "train")
    if case == "label":
        problem.labels = None
    control = Control(Budget(iterations=1))
    result = stage_map_for(problem, attack_model(problem), "off" if case == "off" else "auto", control)
    assert isinstance(result, str) and why in result


def test_the_objective_is_zero_at_the_client_image_and_not_elsewhere(fedsgd_problem):
    """At the client's image the linear head's gradients equal the client's and the maps agree."""
    model, x, y = _resnet(), _image(), torch.tensor([3])
    problem = fedsgd_problem(model, x, y)
    m = attack_model(problem)
    stage = stage_map_for(problem, m, "auto", Control(Budget(iterations=1)))
    assert not isinstance(stage, str), stage
    objective = stage_objective(problem, m, stage, tv_weight=0.0)
    zero = torch.zeros(())
    assert float(objective(x[0:1], y, zero)) < 1e-4
    assert float(objective(2.5 * x[0:1], y, zero)) < 1e-4  # blind to the image's scale
    assert float(objective(_image().roll(3, dims=-1), y, zero)) > 0.05


def test_the_attack_takes_the_path_and_says_so(fedsgd_problem):
    model, x, y = _resnet(), _image(), torch.tensor([3])
    control = Control(Budget(iterations=4, restarts=2))
    result = InvertingGradients().run(
        fedsgd_problem(model, x, y), InvertingGradientsParams(), control, torch.Generator().manual_seed(0)
    )
    info = result.details["stage_map"]
    assert isinstance(info, dict) and info["applied"] is True and info["map_shape"] == [128, 8, 8]
    assert result.images.shape == (1, 3, SIZE, SIZE) and torch.isfinite(result.images).all()
    assert result.iterations == 4
    # a batch of two: the whole gradient is matched, and the details say why
    x2, y2 = _image(2), torch.tensor([3, 4])
    result = InvertingGradients().run(
        fedsgd_problem(_resnet(), x2, y2),
        InvertingGradientsParams(),
        control,
        torch.Generator().manual_seed(0),
    )
    assert result.details["stage_map"] == {"applied": False, "why": "a batch of more than one image"}


def test_a_stop_request_during_the_solve_leaves_the_path_untaken(fedsgd_problem):
    model, x, y = _resnet(), _image(), torch.tensor([3])
    problem = fedsgd_problem(model, x, y)
    control = Control(Budget(iterations=1), should_stop=lambda: True)
    why = stage_map_for(problem, attack_model(problem), "auto", control)
    assert isinstance(why, str) and "stop request" in why


def test_a_job_that_took_the_path_says_so_in_its_caution(tmp_path):
    from service.jobs.runner import run_job
    from service.jobs.types import JobContext
    from service.specs import JobSpec
    from service.storage import LocalStore

    spec = JobSpec.model_validate(
        {
            "model": {"arch": "resnet18", "knobs": {"stem": "cifar"}, "init_seed": 0},
            "update": {
                "simulate": {"images": ["astronaut"], "labels": [1], "training": {"bn_mode": "train"}},
                "client": {"bn_mode": "train"},
            },
            "data": {"shape": [3, SIZE, SIZE], "num_classes": 10, "normalization": "cifar10", "labels": [1]},
            "budget": {"iterations": 2},
        }
    )
    result = run_job(spec, JobContext(job_id="j", store=LocalStore(tmp_path), prefix="j", resolve=bytes))
    attack = result.manifest["attack"]
    assert attack["details"]["stage_map"]["applied"] is True
    [limit] = attack["limits"]
    assert limit["kind"] == "train_mode_batch_norm" and "second-stage output map" in limit["message"]


def test_a_model_that_is_not_a_resnet_is_refused(fedsgd_problem):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * SIZE * SIZE, 10),
    )  # fmt: skip
    problem = fedsgd_problem(model, _image(), torch.tensor([3]))
    why = stage_map_for(problem, attack_model(problem), "auto", Control(Budget(iterations=1)))
    assert why == "the model is not a torchvision-style ResNet"
