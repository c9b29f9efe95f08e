"""The memory estimate: built on the meta device, growing with what makes a job big, refused
above the worker memory setting with the estimate attached."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import SpecError, UnknownNameError
from service.jobs.budget import BudgetError, Profiler, check_memory, estimate_memory, model_profile
from service.specs import DataSpec, JobSpec, ModelSpec


def spec(arch: str = "resnet18", side: int = 32, n: int = 1, restarts: int = 1, **extra: object) -> JobSpec:
    return JobSpec.model_validate(
        {
            "model": {"arch": arch},
            "update": {"kind": "gradient", "simulate": {"images": ["astronaut"] * n}},
            "data": {"shape": [3, side, side]},
            "budget": {"restarts": restarts},
            **extra,
        }
    )


def test_the_profile_matches_the_real_model() -> None:
    from service.models import build_model

    model, data = ModelSpec(arch="lenet"), DataSpec(shape=(3, 32, 32))
    real = sum(p.numel() for p in build_model(model, data).parameters())
    profile = model_profile(model, data)
    assert profile.parameters == real
    assert profile.activations_per_image > 0


def test_the_estimate_grows_with_images_restarts_size_and_model() -> None:
    base = estimate_memory(spec()).total_bytes
    assert estimate_memory(spec(n=4)).total_bytes > base
    assert estimate_memory(spec(restarts=4)).total_bytes > base
    assert estimate_memory(spec(side=64)).total_bytes > base
    assert estimate_memory(spec(arch="resnet50")).total_bytes > base
    # the activations scale with the image area (a CIFAR-stem ResNet keeps the resolution)
    small, large = estimate_memory(spec(side=32)), estimate_memory(spec(side=64))
    assert large.activation_bytes == pytest.approx(4 * small.activation_bytes, rel=0.05)


def test_unknown_image_counts_are_assumed_and_said_so() -> None:
    job = JobSpec.model_validate({"model": {"arch": "lenet"}, "update": {"artifact": "upd_x"}})
    estimate = estimate_memory(job)
    assert estimate.images == 1 and estimate.images_assumed
    assert estimate_memory(job, num_images=8).images == 8


def test_hostile_spec_is_refused_with_its_estimate() -> None:
    hostile = JobSpec.model_validate(
        {
            "model": {"arch": "resnet152"},
            "update": {"kind": "gradient", "simulate": {"source": "photos"}},
            "data": {"shape": [3, 512, 512]},
        }
    )
    with pytest.raises(BudgetError) as refused:
        check_memory(hostile, 8 * 2**30)
    assert refused.value.estimate.total_bytes > 8 * 2**30
    assert refused.value.limit_bytes == 8 * 2**30
    assert "GiB" in str(refused.value)
    assert check_memory(spec(arch="lenet"), 8 * 2**30).total_bytes < 2 * 2**30


def test_bad_architectures_are_refused_as_before() -> None:
    with pytest.raises(UnknownNameError):
        estimate_memory(spec(arch="resnet9000"))
    with pytest.raises(SpecError):
        estimate_memory(
            spec(arch="lenet").model_copy(update={"model": ModelSpec(arch="lenet", knobs={"nope": 1})})
        )


def test_the_runner_refuses_a_job_over_its_workers_memory_before_the_attack(tmp_path: Path) -> None:
    from service.jobs.runner import run_job
    from service.jobs.types import JobContext
    from service.storage import LocalStore

    stages: list[str] = []
    ctx = JobContext(
        job_id="job",
        store=LocalStore(tmp_path),
        prefix="t/jobs/job",
        resolve=bytes,
        progress=lambda p: stages.append(p.stage),
        memory_limit_bytes=2**20,
    )
    with pytest.raises(BudgetError):
        run_job(spec(arch="lenet", side=16), ctx)
    assert "attack" not in stages


def test_the_profiler_process_gives_the_same_profile_and_refusals() -> None:
    profiler = Profiler()
    try:
        model, data = ModelSpec(arch="resnet18"), DataSpec(shape=(3, 32, 32))
        assert profiler(model, data) == model_profile(model, data)
        assert profiler(model, data) == model_profile(model, data)  # cached
        with pytest.raises(UnknownNameError) as unknown:
            profiler(ModelSpec(arch="resnet9000"), data)
        assert "resnet18" in unknown.value.valid
        with pytest.raises(SpecError, match="nope"):
            profiler(ModelSpec(arch="lenet", knobs={"nope": 1}), data)
    finally:
        profiler.close()


def test_a_batch_holds_only_as_many_attacks_as_the_memory_allows() -> None:
    from service.jobs.budget import batch_within_memory

    spec = JobSpec.model_validate(
        {
            "model": {"arch": "lenet"},
            "update": {"kind": "gradient", "artifact": "u"},
            "data": {"shape": [3, 32, 32]},
        }
    )
    three = spec.model_copy(update={"budget": spec.budget.model_copy(update={"restarts": 3})})
    room = estimate_memory(three, 2).total_bytes
    assert batch_within_memory(spec, 8, room, 2) == 3  # three attacks' restarts stacked fit, four do not
    assert batch_within_memory(spec, 2, room, 2) == 2  # never more than asked
    assert batch_within_memory(spec, 8, None, 2) == 8  # no limit
    assert batch_within_memory(spec, 8, estimate_memory(spec, 2).total_bytes - 1, 2) == 1
