"""Gauss-Newton steps on the client's gradient (service.attacks.gauss_newton): the verdict's direct
estimate (service.verdict.newton) and the attack's finish (InvertingGradientsParams.finish_steps)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.attacks import Control
from service.attacks.gauss_newton import finish
from service.attacks.points import run_points
from service.data import normalize
from service.fl import simulate_client
from service.fl.client import float_state
from service.jobs.runner import problem_for, run_job, simulated_victim
from service.jobs.types import JobContext
from service.metrics.image import psnr
from service.models import build_model
from service.specs import Budget, ClientTraining, DataSpec, InvertingGradientsParams, JobSpec
from service.storage import LocalStore
from service.tensorio import save_safetensors
from service.verdict.estimate import DIRECT_FLOOR, apply_direct
from service.verdict.newton import NOISE_DRAWS, local_estimate, trusted

SIZE = 8
DATA = DataSpec(shape=(3, SIZE, SIZE), num_classes=10)


def smooth_images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 3, 3, generator=g) * 0.8 + 0.1
    return torch.nn.functional.interpolate(base, size=SIZE, mode="bilinear", align_corners=False)


def job(tmp: Path, labels: list[int], kind: str = "gradient", defenses: list | None = None, **client):
    """An MLP client's update on known images, written as a job's files."""
    model_spec = {"arch": "mlp", "knobs": {"width": 64}}
    data = {**DATA.model_dump(), "num_images": len(labels)}
    spec = JobSpec.model_validate(
        {
            "model": {**model_spec, "weights": str(tmp / "w.safetensors")},
            "update": {
                "kind": kind,
                "artifact": str(tmp / "u.safetensors"),
                "client": client or {"protocol": "fedsgd"},
            },
            "data": data,
            "defenses": defenses or [],
            "budget": {"iterations": 3},
        }
    )
    model = build_model(spec.model.model_copy(update={"weights": None}), spec.data)
    x = smooth_images(len(labels), 1)
    training = ClientTraining.model_validate(
        {"num_samples": len(labels), **(client or {"protocol": "fedsgd"})}
    )
    (tmp / "w.safetensors").write_bytes(save_safetensors(float_state(model)))
    update = simulate_client(
        model, normalize(x, DATA.resolved_normalization()), torch.tensor(labels), training, kind
    )
    (tmp / "u.safetensors").write_bytes(save_safetensors(update))
    ctx = JobContext("t", LocalStore(tmp / "store"), "t", lambda ref: Path(ref).read_bytes())
    victim = simulated_victim(spec, model, x, torch.tensor(labels), training)
    problem = problem_for(spec, model, victim, torch.Generator().manual_seed(0), torch.device("cpu"))
    return spec, ctx, problem, x


def nudged(x: torch.Tensor, rms: float, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + rms * torch.randn(x.shape, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("labels", [[4], [2, 7]])
def test_the_step_estimates_a_near_reconstructions_error_without_the_images(tmp_path: Path, labels) -> None:
    _, _, problem, x = job(tmp_path, labels)
    recon = nudged(x, 1e-3)
    local = local_estimate(problem, recon, torch.tensor(labels))
    assert local.applicable and local.valid, local.record()
    assert local.images is not None
    true_db = psnr(recon, x).mean().item()
    estimated_db = psnr(recon, local.images).mean().item()
    assert abs(estimated_db - true_db) < 1.0
    # the implied images are far nearer the client's than the reconstruction is
    assert psnr(local.images, x).mean().item() > true_db + 10


def test_a_step_out_of_time_is_not_trusted(tmp_path: Path) -> None:
    _, _, problem, x = job(tmp_path, [4])
    local = local_estimate(problem, nudged(x, 1e-3), torch.tensor([4]), seconds_left=lambda: 0.0)
    assert local.applicable and not local.valid and "would take about" in local.why
    clock = iter([1e9, *[1.0] * 20, *[0.0] * 1000])  # room at first, then none mid-solve
    local = local_estimate(problem, nudged(x, 1e-3), torch.tensor([4]), seconds_left=lambda: next(clock))
    assert local.applicable and not local.valid and "ran out of the time" in local.why
    plenty = local_estimate(problem, nudged(x, 1e-3), torch.tensor([4]), seconds_left=lambda: 1e9)
    assert plenty.valid and plenty.numbers["seconds_needed"] > 0


def test_a_reconstruction_far_from_matching_is_not_trusted(tmp_path: Path) -> None:
    _, _, problem, x = job(tmp_path, [4])
    far = torch.rand(x.shape, generator=torch.Generator().manual_seed(9))
    local = local_estimate(problem, far, torch.tensor([4]))
    assert local.applicable and not local.valid
    assert "far from matching" in local.why or "cannot explain" in local.why


def test_wrong_labels_leave_a_residual_the_images_cannot_explain(tmp_path: Path) -> None:
    _, _, problem, x = job(tmp_path, [4])
    local = local_estimate(problem, x, torch.tensor([6]))
    assert local.applicable and not local.valid, local.record()


def test_declared_noise_may_stay_unexplained(tmp_path: Path) -> None:
    _, _, problem, x = job(tmp_path, [4], defenses=[{"name": "noise", "scale": 1e-4}])
    local = local_estimate(problem, nudged(x, 1e-3), torch.tensor([4]))
    assert local.valid, local.record()
    assert local.numbers["noise_share"] > 0
    # the error the noise leaves is drawn, so the implied images are farther than the step's alone
    assert len(local.noisy_images) == NOISE_DRAWS and local.images is not None
    alone = psnr(x, local.images).mean().item()
    assert all(psnr(x, d).mean().item() < alone for d in local.noisy_images)
    again = local_estimate(problem, nudged(x, 1e-3), torch.tensor([4]))
    assert all(torch.equal(a, b) for a, b in zip(again.noisy_images, local.noisy_images, strict=True))


@pytest.mark.parametrize(
    ("kind", "client", "defenses", "why"),
    [
        ("delta", {"protocol": "fedavg", "lr": 0.1, "local_epochs": 2, "batch_size": 1}, [], "weight change"),
        ("gradient", {"protocol": "fedsgd"}, [{"name": "quantize", "bits": 4}], "quantize"),
        ("gradient", {"protocol": "fedsgd"}, [{"name": "clip", "max_norm": 0.1}], "clip"),
    ],
)
def test_updates_that_are_not_one_differentiable_gradient_are_not_applicable(
    tmp_path: Path, kind: str, client: dict, defenses: list, why: str
) -> None:
    _, _, problem, x = job(tmp_path, [1], kind=kind, defenses=defenses, **client)
    local = local_estimate(problem, x, torch.tensor([1]))
    assert not local.applicable and not local.valid and why in local.why
    assert local_estimate(problem, x, torch.tensor([[0.0] * 10])).applicable is False


def test_a_direct_estimate_replaces_the_shadows_and_keeps_them_beside_it() -> None:
    estimates = {
        "psnr": {"mean": {"value": 20.0, "interval": [15.0, 25.0], "source": "shadows"}},
        "ssim": {"mean": {"value": 0.5, "interval": [0.3, 0.7], "source": "shadows"}},
    }
    direct = {"psnr": {"mean": 61.0}, "ssim": {"mean": 0.999}}
    apply_direct(estimates, direct, {"psnr": {"mean": [0.2, -0.1, 0.1]}, "ssim": {"mean": [0.0]}})
    p = estimates["psnr"]["mean"]
    assert p["source"] == "direct" and p["value"] == 61.0 and p["exact"] is True
    assert p["shadow_value"] == 20.0 and p["shadow_interval"] == [15.0, 25.0]
    assert p["interval"] == [61.0 - DIRECT_FLOOR["psnr"], 61.0 + DIRECT_FLOOR["psnr"]]
    s = estimates["ssim"]["mean"]  # one shadow error: the floor alone, clipped to SSIM's range
    assert s["interval"] == [0.999 - DIRECT_FLOOR["ssim"], 1.0]
    wide = {"psnr": {"mean": {"value": 30.0, "interval": [0, 1], "source": "shadows"}}}
    apply_direct(wide, {"psnr": {"mean": 30.0}}, {"psnr": {"mean": [3.0, -3.0]}})
    lo, hi = wide["psnr"]["mean"]["interval"]
    assert hi - 30.0 > 3.0 and lo < 27.0  # the shadows' errors widen it past the floor


def test_an_audit_that_matched_exactly_gets_a_direct_verdict(tmp_path: Path) -> None:
    spec, ctx, _, _ = job(tmp_path, [3])
    (tmp_path / "proxy.safetensors").write_bytes(
        save_safetensors({"images": smooth_images(8, 3).contiguous()})
    )
    spec = JobSpec.model_validate(
        {
            **spec.model_dump(mode="json"),
            "budget": {"iterations": 300},
            "verdict": {"when": "always", "shadows": 2, "proxy_data": str(tmp_path / "proxy.safetensors")},
        }
    )
    est = run_job(spec, ctx).manifest["estimate"]
    real = est["direct"]["real"]
    assert real["applicable"] and real["valid"], real
    assert "psnr" in est  # (SSIM needs larger images than these)
    for metric in [m for m in ("psnr", "ssim", "lpips") if m in est]:
        e = est[metric]["worst_case"]
        assert e["source"] == "direct" and e["value"] == pytest.approx(real["estimate"][metric]["worst_case"])
        assert e["shadow_value"] is not None
    assert len(est["direct"]["shadows"]) == 2  # the shadows check a trusted step
    assert "direct: a Gauss-Newton step" in est["summary"]
    html = (tmp_path / "store" / "t" / "report.html").read_text()
    assert "direct (the shadows alone" in html and 'alt="worst-case PSNR of the shadow audits' in html


def test_the_finish_walks_a_reconstruction_in_the_basin_to_the_images(tmp_path: Path) -> None:
    _, _, problem, x = job(tmp_path, [4])
    start = nudged(x, 0.03)
    out, record = finish(problem, start, torch.tensor([4]), steps=6)
    assert record["applied"] >= 1 and record["residual_after"] < record["residual_before"]
    assert psnr(out, x).item() > psnr(start, x).item() + 10
    assert out.shape == start.shape and out.dtype == start.dtype and out.min() >= 0 and out.max() <= 1


def test_the_finish_leaves_what_it_cannot_improve_alone(tmp_path: Path) -> None:
    _, _, problem, x = job(tmp_path, [4])
    far = torch.rand(x.shape, generator=torch.Generator().manual_seed(9))
    out, record = finish(problem, far, torch.tensor([4]), steps=3)
    assert torch.equal(out, far) and record["applied"] == 0 and "far from matching" in record["why"]
    kept, record = finish(problem, nudged(x, 0.03), torch.tensor([4]), steps=3, time_left=lambda: False)
    assert record["applied"] == 0 and record["why"] == "the time limit" and kept.shape == x.shape
    # time that runs out inside a solve stops it there, keeping the last step that was kept
    calls = iter(range(1000))
    start = nudged(x, 0.03)
    kept, record = finish(problem, start, torch.tensor([4]), steps=5, time_left=lambda: next(calls) < 40)
    assert record["why"] == "the time limit" and record["applied"] <= 1
    assert torch.equal(kept, start) == (record["applied"] == 0)
    _, _, fedavg, _ = job(
        tmp_path, [4], kind="delta", protocol="fedavg", lr=0.1, local_epochs=1, batch_size=1
    )
    out, record = finish(fedavg, x, torch.tensor([4]), steps=3)
    assert torch.equal(out, x) and "weight change" in record["why"]


def test_an_attack_with_a_finish_reconstructs_better_and_says_so(tmp_path: Path) -> None:
    _, _, problem, x = job(tmp_path, [5])
    budget = Budget(iterations=150)

    def attack(steps: int, batched: bool):
        params = InvertingGradientsParams(finish_steps=steps)
        entries = [(problem, params, Control(budget), torch.Generator().manual_seed(s)) for s in (0, 1)]
        results, errors, _ = run_points(entries, batch=batched)
        assert errors == [None, None]
        return results

    plain = attack(0, batched=False)
    finished = attack(4, batched=False)
    together = attack(4, batched=True)
    for p, f, t in zip(plain, finished, together, strict=True):
        assert "finish" not in p.details and f.details["finish"]["applied"] >= 1
        assert psnr(f.images, x).item() > psnr(p.images, x).item()
        assert torch.allclose(f.images, t.images, atol=1e-5)  # batched points get the same finish


def test_the_finish_is_refused_where_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="finish_steps"):
        InvertingGradientsParams(finish_steps=51)
    from service.specs import FedAvgParams

    with pytest.raises(ValueError, match="finish_steps"):
        FedAvgParams(finish_steps=2)


def test_a_reconstruction_exact_to_the_updates_own_rounding_is_trusted(tmp_path: Path) -> None:
    # the update was computed in float32: the client's own images leave only its rounding, which no
    # image explains; that is the update's precision, not a wrong local solution
    _, _, problem, x = job(tmp_path, [4])
    local = local_estimate(problem, x, torch.tensor([4]))
    assert local.valid, local.record()
    assert local.images is not None and psnr(x, local.images).item() > 80
    assert trusted({"residual": 1.5e-7, "unexplained": 0.97, "after_step": 0.97, "noise_share": 0.0})[0]
    far = {"residual": 1e-3, "unexplained": 0.97, "after_step": 0.97, "noise_share": 0.0}
    assert trusted(far) == (
        False,
        "the images cannot explain the residual: the attack sits at a wrong local solution",
    )
