"""The SDK against the real API and runner, in this process through httpx's ASGI transport
(EmbeddedService): uploads, jobs (create, get, list, cancel, wait, events), artifacts, catalog,
idempotency, errors from the real service, and the async client."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from clientkit import DLG, DLG_BUDGET, LEAK_PSNR_DB, MODEL_META, SHAPE, UPDATE_META, lenet_files
from safetensors.numpy import load as load_safetensors

import gradleak_client as gl
from gradleak_client import tensors
from gradleak_client.embedded import EmbeddedService

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def uploads(service: EmbeddedService) -> dict[str, Any]:
    files = lenet_files()
    with service.client() as client:
        model = client.models.upload(files["weights"], **MODEL_META)
        update = client.updates.upload(files["gradient"], model_id=model.id, **UPDATE_META)
        truth = client.ground_truth.upload(io.BytesIO(files["truth"]))
        return {"model": model, "update": update, "truth": truth}


@pytest.fixture(scope="module")
def finished(service: EmbeddedService, uploads: dict[str, Any]) -> gl.Job:
    """A DLG job on the leaking update, waited for with a progress callback."""
    seen: list[gl.Job] = []
    with service.client() as client:
        job = client.jobs.create(
            update_id=uploads["update"].id, ground_truth_id=uploads["truth"].id, attack=DLG, budget=DLG_BUDGET
        )
        assert job.status == "queued" and not job.done
        done = client.jobs.wait(job.id, timeout=120, poll_interval=0.05, progress=seen.append)
    assert seen[-1] == done and all(s.id == job.id for s in seen)
    return done


def test_uploads_are_typed_and_can_be_read_back_and_deleted(
    client: gl.Client, uploads: dict[str, Any]
) -> None:
    model, update, truth = uploads["model"], uploads["update"], uploads["truth"]
    assert isinstance(model, gl.ModelUpload) and model.id.startswith("mdl_")
    assert model.metadata.arch == "lenet" and model.metadata.image_shape == SHAPE
    assert model.tensors == len(load_safetensors(lenet_files()["weights"]))
    assert update.metadata.model_id == model.id and update.metadata.kind == "gradient"
    assert truth.metadata.num_images == 1 and truth.metadata.has_labels
    assert client.models.get(model.id) == model
    assert client.updates.get(update.id).sha256 == update.sha256
    extra = client.ground_truth.upload(lenet_files()["truth"])
    client.ground_truth.delete(extra.id)
    with pytest.raises(gl.NotFoundError) as info:
        client.ground_truth.get(extra.id)
    assert info.value.status == 404 and info.value.request_id and info.value.code == "not_found"


def test_upload_from_a_path(client: gl.Client, uploads: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "grad.safetensors"
    path.write_bytes(lenet_files()["gradient"])
    update = client.updates.upload(
        path, model_id=uploads["model"].id, client={"protocol": "fedsgd", "batch_size": 1}, **UPDATE_META
    )
    facts = update.metadata.client
    assert (facts.protocol, facts.batch_size, facts.lr) == ("fedsgd", 1, None)


def test_a_job_runs_to_a_scored_result(finished: gl.Job) -> None:
    assert finished.status == "succeeded" and finished.done
    assert finished.raise_for_status() is finished
    scores = finished.scores
    assert scores is not None and scores.num_images == 1
    # an untrained LeNet and one image: DLG recovers the client's image
    assert scores.worst_case["psnr"] > LEAK_PSNR_DB
    assert scores.label_accuracy is not None and scores.label_accuracy.multiset == 1.0
    assert "lpips" in scores.unavailable  # 16x16 is too small for LPIPS, and the reason is given
    assert finished.result is not None and finished.result["attack"]["name"] == "dlg"
    assert finished.progress is not None and finished.progress.stage == "done"


def test_list_iter_and_get(client: gl.Client, finished: gl.Job) -> None:
    page = client.jobs.list(status="succeeded", limit=1)
    assert len(page.items) == 1 and page.items[0].status == "succeeded"
    assert finished.id in [j.id for j in client.jobs.iter(page_size=1)]
    assert client.jobs.get(finished.id).scores == finished.scores


def test_events_end_with_the_final_status(client: gl.Client, finished: gl.Job) -> None:
    events = list(client.jobs.events(finished.id))
    assert events and events[-1].job.status == "succeeded" and events[-1].event == "status"
    assert all(isinstance(e, gl.JobEvent) and e.job.id == finished.id for e in events)


def test_artifacts_read_and_download(client: gl.Client, finished: gl.Job, tmp_path: Path) -> None:
    names = {a.name: a for a in client.artifacts.list(finished.id)}
    assert {"grid.png", "metrics.json", "reconstruction.safetensors", "report.html"} <= set(names)
    png = client.artifacts.read(finished.id, "grid.png")
    assert png.startswith(PNG_SIGNATURE) and len(png) == names["grid.png"].size
    path = client.artifacts.download(finished.id, "metrics.json", tmp_path)
    assert path == tmp_path / "metrics.json"
    assert json.loads(path.read_text())["metrics"] == finished.metrics
    recon = client.artifacts.download(finished.id, "reconstruction.safetensors", tmp_path / "r.safetensors")
    assert load_safetensors(recon.read_bytes())["images"].shape == (1, *SHAPE)
    assert not list(tmp_path.glob("*.part"))
    # a trailing slash names a folder, created when missing (not a file called "out")
    grid = client.artifacts.download(finished.id, "grid.png", f"{tmp_path}/out/")
    assert grid == tmp_path / "out" / "grid.png" and grid.read_bytes().startswith(PNG_SIGNATURE)
    nested = client.artifacts.download(finished.id, "grid.png", tmp_path / "a" / "b.png")
    assert nested.is_file() and nested.parent.is_dir()
    with pytest.raises(gl.NotFoundError, match="no artifact"):
        client.artifacts.read(finished.id, "nothing.bin")


def test_cancelling_a_finished_job_is_a_conflict(client: gl.Client, finished: gl.Job) -> None:
    with pytest.raises(gl.ConflictError) as info:
        client.jobs.cancel(finished.id)
    assert info.value.status == 409 and "already succeeded" in info.value.detail


def test_idempotent_submission_against_the_service(client: gl.Client, uploads: dict[str, Any]) -> None:
    body = {"update_id": uploads["update"].id, "attack": DLG, "budget": {"iterations": 1}}
    first = client.jobs.create(**body, idempotency_key="sdk-test-key")
    again = client.jobs.create(**body, idempotency_key="sdk-test-key")
    assert again.id == first.id
    with pytest.raises(gl.ConflictError) as info:
        client.jobs.create(**{**body, "seed": 7}, idempotency_key="sdk-test-key")
    assert info.value.code == "idempotency_conflict"
    client.jobs.wait(first.id, timeout=60, poll_interval=0.05)


def test_wait_times_out_and_a_queued_job_can_be_cancelled(client: gl.Client, uploads: dict[str, Any]) -> None:
    job = client.jobs.create(update_id=uploads["update"].id, attack=DLG, budget={"iterations": 1000})
    with pytest.raises(gl.WaitTimeoutError) as info:
        client.jobs.wait(job.id, timeout=0)
    assert info.value.job.id == job.id and not info.value.job.done
    client.jobs.cancel(job.id)
    ended = client.jobs.wait(job.id, timeout=60, poll_interval=0.05)
    assert ended.status == "cancelled"
    with pytest.raises(gl.JobFailedError, match="cancelled"):
        ended.raise_for_status()


def test_refusals_of_the_real_service_map_to_exceptions(client: gl.Client, uploads: dict[str, Any]) -> None:
    with pytest.raises(gl.UnprocessableEntityError) as info:
        client.jobs.create(update_id=uploads["update"].id, attack={"name": "no_such_attack"})
    assert info.value.status == 422 and info.value.request_id
    with pytest.raises(gl.UnprocessableEntityError) as shape:
        wrong = tensors.to_safetensors({"conv9.weight": np.zeros((2, 2), np.float32)})
        client.updates.upload(wrong, model_id=uploads["model"].id, **UPDATE_META)
    assert "unexpected: conv9.weight" in shape.value.mismatches  # what does not fit LeNet is listed
    with pytest.raises(gl.BadRequestError) as not_safetensors:
        client.models.upload(b"PK\x03\x04 a zip, not safetensors", **MODEL_META)
    assert not_safetensors.value.status == 415
    with pytest.raises(gl.NotFoundError):
        client.jobs.get("job_00000000000000000000000000000000")


def test_catalog(client: gl.Client) -> None:
    catalog = client.catalog.get()
    assert {"dlg", "inverting_gradients"} <= {a["name"] for a in catalog.attacks}
    assert "lenet" in {a["name"] for a in catalog.architectures}
    assert [k.level for k in catalog.knowledge_levels] == list(range(6))


def test_audit_in_one_call(client: gl.Client) -> None:
    files = lenet_files()
    job = client.audit(
        model=files["weights"],
        update=files["noised"],
        ground_truth=files["truth"],
        attack=DLG,
        budget=DLG_BUDGET,
        **MODEL_META,
        **UPDATE_META,
    )
    assert job.status == "succeeded" and job.scores is not None


def test_the_async_client(service: EmbeddedService) -> None:
    files = lenet_files()

    async def run() -> tuple[gl.Job, list[gl.JobEvent], bytes]:
        async with service.async_client() as client:
            model = await client.models.upload(files["weights"], **MODEL_META)
            update = await client.updates.upload(files["gradient"], model_id=model.id, **UPDATE_META)
            job = await client.jobs.create(update_id=update.id, attack=DLG, budget={"iterations": 3})
            events = [e async for e in client.jobs.events(job.id)]
            done = await client.jobs.wait(job.id, timeout=60, poll_interval=0.05)
            listed = [j.id async for j in client.jobs.iter(status="succeeded")]
            assert done.id in listed
            return done, events, await client.artifacts.read(job.id, "grid.png")

    done, events, png = asyncio.run(run())
    assert done.status == "succeeded" and done.scores is None  # no ground truth: not scored
    assert events[-1].job.status == "succeeded"
    assert png.startswith(PNG_SIGNATURE)


def test_api_keys_through_the_sdk(tmp_path: Path) -> None:
    """The async client on the app itself (httpx.ASGITransport, the app's lifespan run around it)
    with keys required."""
    from clientkit import server_settings, thread_queue

    from api.app import create_app
    from gradleak_client.embedded import _Lifespan
    from service.jobs.keys import create_key
    from service.jobs.state_sqlite import SQLiteStateStore

    settings = server_settings(tmp_path, auth_required=True)
    state = SQLiteStateStore(settings.data_dir / "gradleak.db")
    try:
        key = create_key(state, "acme")[0]
    finally:
        state.close()
    app = create_app(settings, queue_factory=thread_queue)

    def sdk(api_key: str) -> gl.AsyncClient:
        return gl.AsyncClient(
            base_url="http://testserver", api_key=api_key, transport=httpx.ASGITransport(app=app)
        )

    async def run() -> tuple[object, object, gl.Catalog]:
        lifespan = _Lifespan(app)
        await lifespan.startup()
        try:
            async with sdk("") as anonymous, sdk("glk_wrong") as wrong, sdk(key) as good:
                missing = await asyncio.gather(anonymous.catalog.get(), return_exceptions=True)
                invalid = await asyncio.gather(wrong.catalog.get(), return_exceptions=True)
                return missing[0], invalid[0], await good.catalog.get()
        finally:
            await lifespan.shutdown()

    missing, invalid, catalog = asyncio.run(run())
    assert (
        isinstance(missing, gl.UnauthorizedError) and missing.status == 401 and missing.code == "unauthorized"
    )
    assert isinstance(invalid, gl.UnauthorizedError) and "invalid or revoked" in invalid.detail
    assert catalog.attacks
