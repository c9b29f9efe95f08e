"""Generator training as a service job (`execute_job` on a gtr_ record): it trains, checkpoints to
the store, registers its generator as the tenant's upload; a run stopped by a worker shutdown
resumes from its stored checkpoint and ends with the very generator an unbroken run makes; a
cancelled run keeps its artifacts and makes no upload; the submit checks refuse what the run
would refuse."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from service.errors import NotFoundError, SpecError
from service.generators import load_generator
from service.generators.job import generator_upload_id, image_set
from service.generators.spec import GeneratorTrainingSpec
from service.jobs.execute import Outcome, Stopper, StopReason, execute_job
from service.jobs.records import JobStatus, UploadRecord, new_id
from service.jobs.state_sqlite import SQLiteStateStore
from service.jobs.submit import check_generator_training, new_job
from service.settings import Settings
from service.storage import LocalStore
from service.tensorio import save_safetensors

TINY: dict[str, Any] = {
    "data": {"source": "faces"},
    "steps": 12,
    "batch_size": 4,
    "width": 4,
    "latent_dim": 8,
    "checkpoint_every": 10,
    "seed": 5,
}


class StopAfter(Stopper):
    """Answers True from the n-th poll on (the training polls once per step), for `reason`."""

    def __init__(self, n: int, reason: StopReason) -> None:
        super().__init__()
        self.n, self.polls, self.why = n, 0, reason

    def __call__(self) -> bool:
        self.polls += 1
        if self.polls > self.n:
            self.stop(self.why)
        return super().__call__()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", redis_url=None, s3_endpoint=None)


@pytest.fixture
def state(tmp_path: Path) -> Any:
    s = SQLiteStateStore(tmp_path / "state.db")
    yield s
    s.close()


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "artifacts")


def submit(state: Any, settings: Settings, **changes: Any) -> str:
    spec = check_generator_training(
        GeneratorTrainingSpec.model_validate({**TINY, **changes}), "acme", state, settings
    )
    record, _ = state.create_job(new_job(spec, "acme", settings))
    assert record.id.startswith("gtr_") and record.kind == "generator_training"
    return str(record.id)


def run(state: Any, store: LocalStore, run_id: str, stopper: Stopper | None = None) -> Outcome:
    return execute_job(run_id, state=state, store=store, worker_id="w", stopper=stopper)


def test_a_training_run_registers_its_generator_as_the_tenants_upload(
    state: Any, store: LocalStore, settings: Settings
) -> None:
    run_id = submit(state, settings)
    assert run(state, store, run_id) == Outcome.FINISHED
    done = state.get_job("acme", run_id)
    assert done.status == JobStatus.SUCCEEDED, done.error
    manifest = done.manifest
    assert manifest["steps"] == 12 and manifest["ended"] == "all steps" and manifest["trained_on"] == "faces"
    assert manifest["generator_id"] == generator_upload_id(run_id)
    upload = state.get_upload("acme", manifest["generator_id"])
    assert upload.kind == "generator" and upload.metadata["steps"] == 12
    loaded = load_generator(store.get_bytes(upload.key))
    assert loaded.manifest.image_shape == (3, 32, 32) and loaded.manifest.trained_on == "faces"
    # the artifacts: a grid per checkpoint (10 and the end), the training state, history, summary
    for name in (
        "samples/step-0000010.png",
        "samples/step-0000012.png",
        "samples.png",
        "generator.safetensors",
        "checkpoint/state.json",
        "history.json",
        "training.json",
    ):
        assert name in done.artifacts, name
        assert store.exists(done.artifacts[name])
    assert store.get_bytes(done.artifacts["generator.safetensors"]) == store.get_bytes(upload.key)
    assert done.progress.stage == "done" and done.progress.iteration == 12
    with pytest.raises(NotFoundError):  # another tenant does not see it
        state.get_upload("other", upload.id)


def test_a_run_stopped_by_a_shutdown_resumes_from_its_stored_checkpoint_bit_for_bit(
    state: Any, store: LocalStore, settings: Settings
) -> None:
    unbroken = submit(state, settings)
    assert run(state, store, unbroken) == Outcome.FINISHED
    broken = submit(state, settings)
    assert run(state, store, broken, StopAfter(7, StopReason.SHUTDOWN)) == Outcome.RELEASED
    back = state.get_job("acme", broken)
    assert back.status == JobStatus.INTERRUPTED
    stored = json.loads(store.get_bytes(f"acme/generator-trainings/{broken}/checkpoint/state.json"))
    assert stored["step"] == 7
    assert run(state, store, broken) == Outcome.FINISHED
    done = state.get_job("acme", broken)
    assert done.status == JobStatus.SUCCEEDED and done.attempts == 2
    assert done.manifest["resumed_from_step"] == 7 and done.manifest["steps"] == 12
    a = store.get_bytes(state.get_upload("acme", generator_upload_id(unbroken)).key)
    b = store.get_bytes(state.get_upload("acme", generator_upload_id(broken)).key)
    assert load_generator(a).module.state_dict().keys() == load_generator(b).module.state_dict().keys()
    for (name, x), y in zip(
        load_generator(a).module.state_dict().items(),
        load_generator(b).module.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(x, y), name


def test_a_cancelled_run_keeps_its_artifacts_and_makes_no_upload(
    state: Any, store: LocalStore, settings: Settings
) -> None:
    run_id = submit(state, settings)
    assert run(state, store, run_id, StopAfter(3, StopReason.CANCEL)) == Outcome.FINISHED
    done = state.get_job("acme", run_id)
    assert done.status == JobStatus.CANCELLED
    assert done.manifest["ended"] == "cancelled" and done.manifest["steps"] == 3
    assert done.manifest["generator_id"] is None
    assert store.exists(done.artifacts["generator.safetensors"])
    with pytest.raises(NotFoundError):
        state.get_upload("acme", generator_upload_id(run_id))


def _image_set(state: Any, store: LocalStore, n: int, labels: bool, side: int = 40) -> str:
    tensors = {"images": torch.rand(n, 3, side, side)}
    if labels:
        tensors["labels"] = torch.arange(n) % 3
    data = save_safetensors(tensors)
    upload_id = new_id("gt")
    record = UploadRecord(
        id=upload_id,
        tenant="acme",
        kind="ground_truth",
        key=f"acme/uploads/{upload_id}/data.safetensors",
        size=len(data),
        sha256="0" * 64,
        metadata={
            "num_images": n,
            "image_shape": [3, side, side],
            "has_labels": labels,
            "purpose": "image_set",
        },
        tensors=len(tensors),
        created_at=0.0,
        expires_at=1e12,
    )
    store.put_bytes(record.key, data)
    state.add_upload(record)
    return upload_id


def test_an_uploaded_labelled_image_set_trains_a_conditional_generator(
    state: Any, store: LocalStore, settings: Settings
) -> None:
    images = _image_set(state, store, 12, labels=True)
    run_id = submit(state, settings, data={"source": "images", "images": images}, conditional=True, steps=3)
    assert run(state, store, run_id) == Outcome.FINISHED
    done = state.get_job("acme", run_id)
    assert done.status == JobStatus.SUCCEEDED, done.error
    g = load_generator(store.get_bytes(state.get_upload("acme", done.manifest["generator_id"]).key))
    assert g.manifest.arch == "dcgan_cond" and g.manifest.num_classes == 3
    assert g.manifest.trained_on == f"upload:{images}"


def test_the_submit_checks_refuse_what_the_run_would_refuse(
    state: Any, store: LocalStore, settings: Settings
) -> None:
    def check(**changes: Any) -> GeneratorTrainingSpec:
        spec = GeneratorTrainingSpec.model_validate({**TINY, **changes})
        return check_generator_training(spec, "acme", state, settings)

    assert check().time_limit_s == settings.default_training_time_limit_s
    with pytest.raises(SpecError, match="faces have no labels"):
        check(conditional=True)
    unlabelled = _image_set(state, store, 4, labels=False)
    with pytest.raises(SpecError, match="has no labels"):
        check(data={"source": "images", "images": unlabelled}, conditional=True)
    with pytest.raises(NotFoundError):
        check(data={"source": "images", "images": new_id("gt")})
    with pytest.raises(SpecError, match="this server's limit"):
        check(time_limit_s=settings.max_training_time_limit_s + 1)
    with pytest.raises(ValueError, match=r"data\.images"):
        GeneratorTrainingSpec.model_validate({"data": {"source": "images"}})
    with pytest.raises(ValueError, match=r"data\.images"):
        GeneratorTrainingSpec.model_validate({"data": {"source": "faces", "images": unlabelled}})


def test_an_image_set_is_resized_and_recoloured_to_the_generators_shape() -> None:
    spec = GeneratorTrainingSpec.model_validate({**TINY, "channels": 1})
    data = image_set({"images": torch.rand(5, 3, 50, 50)}, spec, "gt_x")
    assert data.images.shape == (5, 1, 32, 32) and data.labels is None and data.num_classes is None
    assert float(data.images.min()) >= 0 and float(data.images.max()) <= 1
    grey = image_set(
        {"images": torch.full((2, 1, 32, 32), 0.25)}, GeneratorTrainingSpec.model_validate(TINY), "gt_x"
    )
    assert grey.images.shape == (2, 3, 32, 32) and torch.allclose(grey.images, torch.tensor(0.25))
    with pytest.raises(SpecError, match="no labels"):
        image_set(
            {"images": torch.rand(2, 3, 32, 32)},
            GeneratorTrainingSpec.model_validate({**TINY, "conditional": True}),
            "gt_x",
        )
