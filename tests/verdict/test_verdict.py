"""The leakage verdict: shadow audits, the estimate, the label histogram and the no-leak floor."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch

from service.data import normalize
from service.fl import simulate_client
from service.fl.client import float_state
from service.jobs.runner import problem_for, run_job, simulated_victim
from service.jobs.types import JobContext
from service.models import build_model
from service.specs import ClientTraining, DataSpec, JobSpec, ModelSpec
from service.storage import LocalStore
from service.tensorio import save_safetensors
from service.verdict import summary
from service.verdict.estimate import (
    EXACT_DB,
    HALF_WIDTH_FLOOR,
    SLOPE_EXACT,
    SLOPE_PARTIAL,
    SPREAD_C,
    extrapolate_psnr,
    psnr_spread_multiple,
    refine,
    spread_factor,
)
from service.verdict.histogram import label_histogram
from service.verdict.shadows import (
    attack_shadows,
    draw_images,
    make_shadow,
    proxy_pool,
    shadow_training,
)

SIZE = 16
DATA = DataSpec(shape=(3, SIZE, SIZE), num_classes=10)


def images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(base, size=SIZE, mode="bilinear", align_corners=False)


def make_job(
    tmp: Path, kind: str, training: ClientTraining, labels: list[int], truth: bool = False, **extra: Any
) -> tuple[JobSpec, JobContext, torch.Tensor]:
    """A real-update job: files on disk, the update made by a client on known images."""
    model_spec = ModelSpec(arch="lenet")
    model = build_model(model_spec, DATA)
    x = images(len(labels), 1)
    update = simulate_client(
        model, normalize(x, DATA.resolved_normalization()), torch.tensor(labels), training, kind
    )
    (tmp / "w.safetensors").write_bytes(save_safetensors(float_state(model)))
    (tmp / "u.safetensors").write_bytes(save_safetensors(update))
    (tmp / "proxy.safetensors").write_bytes(save_safetensors({"images": images(12, 7).contiguous()}))
    (tmp / "truth.safetensors").write_bytes(save_safetensors({"images": x.contiguous()}))
    spec = JobSpec.model_validate(
        {
            "model": {"arch": "lenet", "weights": str(tmp / "w.safetensors")},
            "update": {"kind": kind, "artifact": str(tmp / "u.safetensors"), "client": training.model_dump()},
            "data": DATA.model_dump(),
            "budget": {"iterations": 4},
            "ground_truth": str(tmp / "truth.safetensors") if truth else None,
            **extra,
        }
        | {
            "verdict": {
                "shadows": 3,
                "proxy_data": str(tmp / "proxy.safetensors"),
                **extra.get("verdict", {}),
            }
        }
    )
    ctx = JobContext("t", LocalStore(tmp / "store"), "t", lambda ref: Path(ref).read_bytes())
    return spec, ctx, x


def test_shadows_reproduce_the_declared_protocol_and_defenses(tmp_path: Path) -> None:
    declared = ClientTraining(protocol="fedavg", lr=0.05, local_epochs=2, batch_size=1, num_samples=2)
    spec, ctx, _ = make_job(
        tmp_path, "delta", declared, [1, 4], knowledge=3, defenses=[{"name": "topk", "ratio": 0.2}]
    )
    training, assumed = shadow_training(spec, 2)
    assert training == declared and assumed == []
    model = build_model(spec.model, spec.data, resolve=ctx.resolve)
    pool, source = proxy_pool(spec, ctx.resolve)
    assert source == "uploaded proxy data" and pool.shape == (12, 3, SIZE, SIZE)
    x = draw_images(pool, 2, torch.Generator().manual_seed(0))
    y = torch.tensor([1, 4])
    cpu = torch.device("cpu")
    (shadow,), _ = attack_shadows([make_shadow(spec, model, x, y, training, 0, ctx, cpu)], ctx, cpu)
    problem = shadow.problem
    # the attacker of the shadow is told what the real one is told, and sees a pseudo-gradient
    assert problem.client == declared and problem.target_scale_known
    # the shadow's update is the declared local training (2 epochs of batch 1: 4 SGD steps) ...
    delta = simulate_client(model, normalize(x, spec.data.resolved_normalization()), y, declared, "delta")
    names = problem.param_names
    undefended = torch.cat([(-delta[n] / (0.05 * 4)).flatten() for n in names])
    shared = torch.cat([t.flatten() for t in problem.target])
    # ... after the same top-k defense: 20 % of each tensor kept, unchanged
    kept = shared != 0
    assert 0.15 < kept.float().mean() < 0.25
    assert torch.allclose(shared[kept], undefended[kept], rtol=1e-4, atol=1e-7)
    assert set(shadow.metrics["mean"]) >= {"psnr", "ssim"}


@pytest.mark.parametrize("kind", ["gradient", "delta"])
def test_batched_shadows_get_the_results_they_get_one_by_one(tmp_path: Path, kind: str) -> None:
    training = (
        ClientTraining(protocol="fedsgd")
        if kind == "gradient"
        else ClientTraining(protocol="fedavg", lr=0.05, local_epochs=1, batch_size=1, num_samples=2)
    )
    spec, ctx, _ = make_job(tmp_path, kind, training, [2, 6], knowledge=3 if kind == "delta" else 1)
    model = build_model(spec.model, spec.data, resolve=ctx.resolve)
    pool, _ = proxy_pool(spec, ctx.resolve)
    told, _ = shadow_training(spec, 2)
    cpu = torch.device("cpu")

    def clients() -> list:
        draw = torch.Generator().manual_seed(0)
        y = torch.tensor([2, 6])
        return [make_shadow(spec, model, draw_images(pool, 2, draw), y, told, k, ctx, cpu) for k in range(3)]

    alone, one_by_one = attack_shadows(clients(), ctx, cpu, batch=False)
    together, batched = attack_shadows(clients(), ctx, cpu)
    assert batched.startswith("batched (3 shadows") and one_by_one.startswith("sequential")
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert math.isclose(a.loss, b.loss, rel_tol=1e-3, abs_tol=1e-9)
        assert a.metrics["mean"]["psnr"] == pytest.approx(b.metrics["mean"]["psnr"], abs=1e-3)
    # the shadows differ from one another: each was matched against its own target
    assert len({round(s.loss, 9) for s in together}) == 3


def test_the_manifest_says_how_the_shadows_ran(tmp_path: Path) -> None:
    spec, ctx, _ = make_job(tmp_path, "gradient", ClientTraining(protocol="fedsgd"), [3])
    assert run_job(spec, ctx).manifest["estimate"]["execution"].startswith("batched (3 shadows")
    dlg = JobSpec.model_validate({**spec.model_dump(mode="json"), "attack": {"name": "dlg"}, "knowledge": 0})
    assert run_job(dlg, ctx).manifest["estimate"]["execution"].startswith("sequential")


def test_shadows_batch_only_as_many_as_the_workers_memory_allows(tmp_path: Path) -> None:
    import dataclasses

    from service.jobs.budget import estimate_memory

    spec, ctx, _ = make_job(tmp_path, "gradient", ClientTraining(protocol="fedsgd"), [3])
    two = spec.model_copy(update={"budget": spec.budget.model_copy(update={"restarts": 2})})
    limit = estimate_memory(two, 1).total_bytes  # room for two shadows' attacks at once, not three
    manifest = run_job(spec, dataclasses.replace(ctx, memory_limit_bytes=limit)).manifest
    est = manifest["estimate"]
    assert est["execution"].startswith("batched in groups of at most 2") and est["shadows_run"] == 3
    unlimited = run_job(spec, ctx).manifest["estimate"]
    assert unlimited["execution"].startswith("batched (3 shadows")
    # the same shadows, grouped otherwise: the same estimate up to float rounding
    assert est["psnr"]["mean"]["value"] == pytest.approx(unlimited["psnr"]["mean"]["value"], abs=1e-3)
    one = estimate_memory(spec, 1).total_bytes  # room for one at a time: one after another
    alone = run_job(spec, dataclasses.replace(ctx, memory_limit_bytes=one)).manifest["estimate"]
    assert alone["execution"].startswith("sequential")


def test_the_shadow_audits_show_their_progress(tmp_path: Path) -> None:
    import dataclasses

    spec, ctx, _ = make_job(
        tmp_path, "gradient", ClientTraining(protocol="fedsgd"), [3], budget={"iterations": 6}
    )
    events: list = []
    run_job(spec, dataclasses.replace(ctx, progress=events.append))
    shadows = [e for e in events if e.stage == "scoring" and "shadow audits" in e.message]
    assert shadows and shadows[0].message == "3 shadow audits, batched"
    assert shadows[-1].iteration == shadows[-1].total == 6  # the last iteration is always heard
    dlg = JobSpec.model_validate({**spec.model_dump(mode="json"), "attack": {"name": "dlg"}, "knowledge": 0})
    events.clear()
    run_job(dlg, dataclasses.replace(ctx, progress=events.append))
    heard = {e.message for e in events if e.stage == "scoring" and "shadow audit" in e.message}
    assert heard == {f"shadow audit {k} of 3" for k in (1, 2, 3)}


def test_a_missing_declared_fact_is_assumed_and_said(tmp_path: Path) -> None:
    spec, _, _ = make_job(
        tmp_path, "delta", ClientTraining(protocol="fedavg", lr=0.1, local_epochs=1, batch_size=1), [2]
    )
    told = ClientTraining(protocol="fedavg", lr=0.1, local_epochs=1)
    spec = spec.model_copy(update={"update": spec.update.model_copy(update={"client": told})})
    training, assumed = shadow_training(spec, 3)
    assert training.batch_size == 3 and training.num_samples == 3 and training.lr == 0.1
    assert assumed == ["one batch per epoch"]


def problem_of(tmp: Path, labels: list[int], **extra: Any):
    spec, ctx, x = make_job(
        tmp,
        "gradient",
        ClientTraining(protocol="fedsgd"),
        labels,
        data={**DATA.model_dump(), "num_images": len(labels)},
        **extra,
    )
    model = build_model(spec.model, spec.data, resolve=ctx.resolve)
    victim = simulated_victim(spec, model, x, torch.tensor(labels), ClientTraining(protocol="fedsgd"))
    return spec, problem_for(spec, model, victim, torch.Generator().manual_seed(0), torch.device("cpu"))


@pytest.mark.parametrize("labels", [[7], [0, 3, 9]])
def test_distinct_labels_of_a_known_count_are_exact(tmp_path: Path, labels: list[int]) -> None:
    spec, problem = problem_of(tmp_path, labels)
    h = label_histogram(spec, problem)
    assert h["certainty"] == "exact", h["why"]
    assert h["counts"] == {str(y): 1 for y in sorted(labels)}
    assert h["proven_present"] == sorted(labels)


@pytest.mark.parametrize("labels", [[1, 2, 5, 8], [4, 4, 0, 9], [3, 6], [5, 5]])
def test_a_claimed_exact_histogram_is_right_and_proven_classes_are_present(
    tmp_path: Path, labels: list[int]
) -> None:
    spec, problem = problem_of(tmp_path, labels)
    h = label_histogram(spec, problem)
    assert set(h["proven_present"]) <= set(labels)
    if h["certainty"] == "exact":
        assert sorted(int(k) for k, c in h["counts"].items() for _ in range(c)) == sorted(labels)
    else:
        assert (
            h["certainty"] == "proven classes, estimated counts"
            and len(set(labels)) > len(h["proven_present"])
        ) or len(set(labels)) < len(labels)


def test_repeated_labels_or_sign_flipping_defenses_are_not_claimed_exact(tmp_path: Path) -> None:
    spec, problem = problem_of(tmp_path, [2, 2, 6])
    h = label_histogram(spec, problem)
    assert h["certainty"] == "proven classes, estimated counts"
    assert set(h["proven_present"]) == {2, 6}
    spec, problem = problem_of(tmp_path, [0, 3, 9], defenses=[{"name": "noise", "scale": 1e-2}])
    h = label_histogram(spec, problem)
    assert h["certainty"] == "estimated" and h["proven_present"] == [] and "noise" in h["why"]


TIMINGS = ("elapsed_s", "seconds", "seconds_needed")


def untimed(value: Any) -> Any:
    """A manifest part without its timings (elapsed_s, seconds, seconds_needed), which no seed fixes."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def test_the_estimate_is_deterministic_for_a_seed_and_has_a_floor_without_truth(tmp_path: Path) -> None:
    spec, ctx, _ = make_job(tmp_path, "gradient", ClientTraining(protocol="fedsgd"), [3, 5])
    first = run_job(spec, ctx).manifest
    assert first["metrics"] is None  # no ground truth: the estimate is the answer
    est = first["estimate"]
    again = run_job(spec, ctx).manifest["estimate"]
    assert untimed(est) == untimed(again)
    other = run_job(spec.model_copy(update={"verdict": spec.verdict.model_copy(update={"seed": 1})}), ctx)
    assert other.manifest["estimate"]["psnr"] != est["psnr"]

    assert est["shadows_run"] == 3 and est["proxy_data"] == "uploaded proxy data"
    ig = est["igsa"]  # around the shadows' images, their reconstructions and the real reconstruction
    assert len(ig["shadows"]) == len(ig["shadow_reconstructions"]) == 3 and ig["score"] == ig["shadows"][0]
    assert all(0 < x <= 1 for x in [*ig["shadows"], *ig["shadow_reconstructions"], ig["real_reconstruction"]])
    floor = est["floor"]
    assert est["floor_truth"] is None and set(floor["baselines"]) == {"proxy mean image", "attack start"}
    for metric in ("psnr", "ssim"):
        for scope in ("mean", "worst_case"):
            e = est[metric][scope]
            lo, hi = e["interval"]
            assert (lo <= e["value"] <= hi and hi - lo >= 2 * HALF_WIDTH_FLOOR[metric] - 1e-9) or lo == -1.0
            assert math.isclose(e["gain_over_floor"], e["value"] - floor[metric][scope])
            assert floor[metric][scope] == max(b[metric][scope] for b in floor["baselines"].values())
    assert "estimated worst-case PSNR" in est["summary"]


def test_the_estimate_is_made_only_when_asked_or_without_truth(tmp_path: Path) -> None:
    spec, ctx, _ = make_job(tmp_path, "gradient", ClientTraining(protocol="fedsgd"), [3], truth=True)
    scored = run_job(spec, ctx).manifest
    assert scored["metrics"] is not None and scored["estimate"] is None
    always = spec.model_copy(update={"verdict": spec.verdict.model_copy(update={"when": "always"})})
    both = run_job(always, ctx).manifest
    est = both["estimate"]
    assert est["floor_truth"] is not None
    gain = est["metrics_gain"]["psnr"]["mean"]
    assert math.isclose(gain, both["metrics"]["mean"]["psnr"] - est["floor_truth"]["psnr"]["mean"])
    html = (tmp_path / "store" / "t" / "report.html").read_text()
    assert 'id="estimate"' in html and "Leakage estimate" in html
    # the two pictures: how the estimate was made, and the shadows' images and reconstructions
    assert 'alt="worst-case PSNR of the shadow audits' in html
    assert 'alt="the shadows&#x27; proxy images and their reconstructions"' in html


def test_refine_moves_with_the_real_loss_and_keeps_a_floor_width() -> None:
    values, logs = [14.0, 16.0, 18.0], [0.0, -1.0, -2.0]  # a lower loss, a higher PSNR
    centre = refine(values, logs, -1.0, "psnr")
    assert centre["value"] == pytest.approx(16.0) and centre["loss_r2"] == pytest.approx(1.0)
    lower_loss = refine(values, logs, -2.5, "psnr")
    assert lower_loss["value"] == pytest.approx(19.0)
    far = refine(values, logs, -50.0, "psnr")  # clipped to the range widened by one half-width
    assert far["value"] == pytest.approx(18.0 + HALF_WIDTH_FLOOR["psnr"])
    wrong_way = refine(values, [-2.0, -1.0, 0.0], -3.0, "psnr")  # lower loss, less leakage: ignored
    assert wrong_way["value"] == pytest.approx(16.0) and wrong_way["loss_r2"] == 0.0
    lo, hi = refine([15.0, 15.0], [0.0, 0.0], None, "psnr")["interval"]
    assert hi - lo == pytest.approx(2 * HALF_WIDTH_FLOOR["psnr"])
    # dispersed shadows: the Student quantile (2 degrees of freedom, 90 %) times their spread
    assert spread_factor(3) == pytest.approx(2.92, abs=0.01)
    lo, hi = refine([40.0, 50.0, 60.0], [0.0, 0.0, 0.0], None, "psnr")["interval"]
    assert (hi - lo) / 2 == pytest.approx(spread_factor(3) * 10.0)


def test_the_shipped_photos_are_the_default_proxy() -> None:
    spec = JobSpec.model_validate(
        {"model": {"arch": "lenet"}, "update": {"artifact": "u"}, "data": {"shape": [1, 8, 8]}}
    )
    pool, source = proxy_pool(spec, lambda ref: b"")
    assert source == "crops of the shipped photos" and pool.shape[1:] == (1, 8, 8) and len(pool) > 100
    a = draw_images(pool, 4, torch.Generator().manual_seed(3))
    b = draw_images(pool, 4, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_psnr_moves_each_shadow_to_the_real_loss_along_its_regimes_line() -> None:
    # two partial shadows and one exact one, all one e-fold above the real loss: each moves by its slope
    e = extrapolate_psnr([14.0, 16.0, 50.0], [1.0, 1.0, 1.0], 0.0)
    assert e["shadows_moved"] == pytest.approx(
        [14.0 - SLOPE_PARTIAL, 16.0 - SLOPE_PARTIAL, 50.0 - SLOPE_EXACT]
    )
    assert e["value"] == pytest.approx(sum(e["shadows_moved"]) / 3)  # equally near: equal weights
    # a Student prediction half-width: SPREAD_C x t(90 %, K - 1) x sqrt(1 + 1/K) x the moved scores' sd
    multiple = SPREAD_C * 2.919986 * math.sqrt(1 + 1 / 3)
    assert psnr_spread_multiple(3) == pytest.approx(multiple, rel=1e-5)
    half = max(HALF_WIDTH_FLOOR["psnr"], multiple * statistics.stdev(e["shadows_moved"]))
    assert e["interval"] == pytest.approx([max(0.0, e["value"] - half), e["value"] + half])  # PSNR >= 0
    # a lower real loss than every shadow's: more leakage, beyond the shadows' own range
    lower = extrapolate_psnr([20.0, 21.0, 22.0], [0.0, 0.0, 0.0], -3.0)
    assert lower["value"] == pytest.approx(21.0 - 3.0 * SLOPE_PARTIAL) and not lower["exact"]
    # the shadow whose loss is nearest the real one weighs most
    near = extrapolate_psnr([10.0, 30.0], [0.0, 6.0], 0.0)
    assert near["shadow_weights"][0] > 0.95 and near["value"] < 11.0
    # no real loss: the shadows' plain mean and the floor width
    plain = extrapolate_psnr([15.0, 15.0], [0.0, 1.0], None)
    assert plain["value"] == 15.0 and plain["interval"] == [12.0, 18.0]


def test_an_exact_estimate_says_at_least_40_db() -> None:
    e = extrapolate_psnr([55.0, 60.0, 65.0], [-10.0, -10.0, -10.0], -10.0)
    assert e["exact"] and e["value"] == pytest.approx(60.0) and e["value"] >= EXACT_DB
    line = summary({"psnr": {"worst_case": {**e, "gain_over_floor": 48.0}}})
    assert line.startswith("estimated worst-case PSNR at least 40 dB: exact reconstruction")
    assert "indicative" in line
    below = extrapolate_psnr([20.0, 21.0, 22.0], [0.0, 0.0, 0.0], 0.0)
    assert "exact" not in summary({"psnr": {"worst_case": below}})


def test_the_report_says_an_exact_estimate_is_at_least_40_db() -> None:
    from service.verdict.render import render_estimate_html

    exact = extrapolate_psnr([55.0, 60.0, 65.0], [-10.0, -10.0, -10.0], -10.0)
    partial = extrapolate_psnr([20.0, 21.0, 22.0], [0.0, 0.0, 0.0], 0.0)
    estimate = {
        "psnr": {"worst_case": exact, "mean": partial},
        "floor": {"psnr": {"worst_case": 12.0, "mean": 12.0}},
        "labels": {"counts": {"3": 1}, "certainty": "exact", "why": "one image"},
        "shadows_run": 3,
        "proxy_data": "crops of the shipped photos",
        "method": "m",
        "summary": "s",
    }
    html = render_estimate_html(estimate)
    assert html.count("at least 40 dB: exact") == 1 and "21 dB" in html


def test_the_estimate_plot_is_drawn_from_the_manifest_alone() -> None:
    from service.verdict.render import render_estimate_png

    losses = [1e-3, 1e-2, 5e-3]
    e = extrapolate_psnr([20.0, 14.0, 17.0], [math.log(x) for x in losses], math.log(2e-3))
    estimate = {"psnr": {"worst_case": e}, "shadow_losses": losses, "real_loss": 2e-3, "floor": {}}
    png = render_estimate_png(estimate)
    assert png is not None and png.startswith(b"\x89PNG")
    import io

    from PIL import Image

    assert Image.open(io.BytesIO(png)).size == (640, 340)
    # no real loss: drawn at the shadows' geometric mean; no PSNR estimate or losses: nothing
    assert render_estimate_png({**estimate, "real_loss": None}) is not None
    assert render_estimate_png({"shadow_losses": losses}) is None
    assert render_estimate_png({**estimate, "shadow_losses": [1e-3]}) is None


def test_a_shadow_time_limit_alone_runs_until_it_is_up_capped_by_the_server() -> None:
    from service.jobs.submit import check_spec
    from service.jobs.uploads import Limits

    limits = Limits(
        max_batch_size=64, max_iterations=5000, max_restarts=8, max_time_limit_s=600.0,
        default_time_limit_s=60.0, worker_memory_bytes=8 << 30,
    )  # fmt: skip
    body: dict[str, Any] = {
        "model": {"arch": "lenet"},
        "update": {"kind": "gradient", "artifact": "upd_x"},
        "data": {"shape": [3, 16, 16]},
        "verdict": {"budget": {"time_limit_s": 30}},
    }
    shadow = check_spec(JobSpec.model_validate(body), limits).verdict.budget
    assert shadow is not None and (shadow.iterations, shadow.time_limit_s) == (5000, 30)
    body["verdict"] = {"budget": {"iterations": 7}}
    shadow = check_spec(JobSpec.model_validate(body), limits).verdict.budget
    assert shadow is not None and shadow.iterations == 7 and shadow.time_limit_s is None
