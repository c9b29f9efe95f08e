"""The API's resources, each in a sync and an async flavour with the same methods.

What a call sends is built once, by the `_*_options` functions; the flavours only differ in how
they send it and wait.
"""

from __future__ import annotations

import builtins
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Generic, TypeVar

import httpx

from gradleak_client._base import RequestOptions, Timeout
from gradleak_client._exceptions import APIResponseValidationError, WaitTimeoutError
from gradleak_client._progress import ProgressBar
from gradleak_client._sse import SSEDecoder
from gradleak_client.types import (
    Artifact,
    ArtifactList,
    Attack,
    Budget,
    Catalog,
    ClientTraining,
    Defense,
    Federation,
    FederationList,
    GeneratorList,
    GeneratorTraining,
    GeneratorTrainingList,
    GeneratorUpload,
    GroundTruthUpload,
    Job,
    JobEvent,
    JobList,
    JobStatus,
    ModelUpload,
    Normalization,
    Run,
    Study,
    StudyList,
    UpdateKind,
    UpdateUpload,
)

if TYPE_CHECKING:
    from gradleak_client._client import AsyncClient, Client

FileInput = str | os.PathLike[str] | bytes | IO[bytes]
"""A safetensors file: a path, its bytes, or a binary file object."""
Progress = bool | Callable[[Any], None]
DEFAULT_POLL_INTERVAL_S = 1.0
DEFAULT_PATCH_CLASSES = 10  # the service's patch task: ten photos unless a federation names its own
SAFETENSORS = "application/octet-stream"
R = TypeVar("R", bound=Run)


def _file_part(file: FileInput, default_name: str) -> tuple[str, bytes, str]:
    """The multipart `file` part. The bytes are read once, so that every retry sends the same."""
    if isinstance(file, bytes | bytearray):
        return default_name, bytes(file), SAFETENSORS
    if isinstance(file, str | os.PathLike):
        path = Path(file)
        return path.name, path.read_bytes(), SAFETENSORS
    name = Path(str(getattr(file, "name", default_name))).name
    return name, file.read(), SAFETENSORS


def _metadata(values: Mapping[str, Any]) -> dict[str, str]:
    return {"metadata": json.dumps({k: v for k, v in values.items() if v is not None})}


def _model_options(
    file: FileInput,
    arch: str | None,
    image_shape: Sequence[int],
    num_classes: int,
    knobs: Mapping[str, Any] | None,
    timeout: Timeout,
    source: str | None = None,
) -> RequestOptions:
    # No architecture: the file is the model itself, as ONNX.
    onnx = arch in (None, "onnx")
    meta = {
        "format": "onnx" if onnx else "safetensors",
        "arch": None if onnx else arch,
        "image_shape": list(image_shape),
        "num_classes": num_classes,
        "knobs": knobs,
        "source": source,
    }
    return RequestOptions(
        "POST",
        "/v1/models",
        files={"file": _file_part(file, "model.onnx" if onnx else "model.safetensors")},
        data=_metadata(meta),
        timeout=timeout,
    )


def _update_options(
    file: FileInput,
    model_id: str,
    kind: UpdateKind,
    client: ClientTraining | Mapping[str, Any] | None,
    normalization: Normalization | Mapping[str, Sequence[float]],
    num_images: int | None,
    labels: Sequence[int] | None,
    timeout: Timeout,
) -> RequestOptions:
    meta = {
        "model_id": model_id,
        "kind": kind,
        "client": None if client is None else {k: v for k, v in client.items() if v is not None},
        "normalization": normalization if isinstance(normalization, str) else dict(normalization),
        "num_images": num_images,
        "labels": None if labels is None else [int(y) for y in labels],
    }
    return RequestOptions(
        "POST",
        "/v1/updates",
        files={"file": _file_part(file, "update.safetensors")},
        data=_metadata(meta),
        timeout=timeout,
    )


def _ground_truth_options(file: FileInput, image_set: bool, timeout: Timeout) -> RequestOptions:
    return RequestOptions(
        "POST",
        "/v1/ground-truth",
        files={"file": _file_part(file, "ground_truth.safetensors")},
        data=_metadata({"purpose": "image_set"} if image_set else {}),
        timeout=timeout,
    )


def _generator_options(file: FileInput, timeout: Timeout) -> RequestOptions:
    return RequestOptions(
        "POST",
        "/v1/generators",
        files={"file": _file_part(file, "generator.safetensors")},
        data=_metadata({}),
        timeout=timeout,
    )


def _job_body(
    update_id: str | None,
    model_id: str | None,
    ground_truth_id: str | None,
    attack: Attack | Mapping[str, Any] | None,
    knowledge: int | None,
    defenses: Sequence[Defense | Mapping[str, Any]] | None,
    budget: Budget | Mapping[str, Any] | None,
    seed: int | None,
    spec: Mapping[str, Any] | None,
    verdict: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "spec": None if spec is None else dict(spec),
        "update_id": update_id,
        "model_id": model_id,
        "ground_truth_id": ground_truth_id,
        "attack": None if attack is None else dict(attack),
        "knowledge": knowledge,
        "defenses": None if defenses is None else [dict(d) for d in defenses],
        "budget": None if budget is None else dict(budget),
        "seed": seed,
        "verdict": None if verdict is None else dict(verdict),
    }
    # Fields left out stay unset: the API refuses a spec together with any of the others.
    return {k: v for k, v in body.items() if v is not None}


def _parse_event(event: str, data: str, event_id: str | None, model: type[Any] = Job) -> JobEvent:
    try:
        return JobEvent(event=event, id=event_id, job=model.model_validate_json(data))
    except ValueError:
        raise APIResponseValidationError(
            f"the job event stream sent an event that is not a job: {data[:200]!r}"
        ) from None


def _progress_sink(progress: Progress) -> tuple[Callable[[Run], None] | None, ProgressBar | None]:
    if progress is True:
        bar = ProgressBar()
        return bar.update, bar
    if callable(progress):
        return progress, None
    return None, None


def _checkpoint_model(fed: Federation) -> dict[str, Any]:
    """The model upload's metadata of a federation's checkpoint: its architecture and data."""
    data = fed.spec["data"]
    return {
        "arch": fed.spec["model"]["arch"],
        "knobs": fed.spec["model"].get("knobs") or None,
        "image_shape": (data["channels"], data["size"], data["size"]),
        "num_classes": len(data["photos"]) if data.get("photos") else DEFAULT_PATCH_CLASSES,
    }


def _artifact_target(to: str | os.PathLike[str], name: str) -> Path:
    """A trailing separator or an existing directory names a folder (created when missing);
    anything else names the file itself."""
    text = os.fspath(to)
    path = Path(text)
    if path.is_dir() or text.endswith((os.sep, "/")):
        path.mkdir(parents=True, exist_ok=True)
        return path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


class _Resource:
    def __init__(self, client: Client) -> None:
        self._client = client


class _AsyncResource:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client


# ---------------------------------------------------------------------------------------------
# uploads
# ---------------------------------------------------------------------------------------------


class Models(_Resource):
    """The model the server sent to the client: its weights and architecture."""

    def upload(
        self,
        file: FileInput,
        *,
        arch: str | None = None,
        image_shape: Sequence[int],
        num_classes: int = 10,
        knobs: Mapping[str, Any] | None = None,
        timeout: Timeout = None,
    ) -> ModelUpload:
        """Upload a model's weights (safetensors) and say which architecture they belong to, or,
        without `arch`, your own model as an ONNX file (see `gradleak_client.prepare`); its
        update's tensors are then named like the ONNX initializers (your `state_dict()` names).

        >>> model = client.models.upload("lenet.safetensors", arch="lenet", image_shape=(3, 32, 32))
        >>> model.id
        'mdl_...'
        >>> mine = client.models.upload("model.onnx", image_shape=(3, 32, 32), num_classes=10)
        """
        options = _model_options(file, arch, image_shape, num_classes, knobs, timeout)
        return self._client._call(options, ModelUpload)

    def get(self, model_id: str) -> ModelUpload:
        return self._client._call(RequestOptions("GET", f"/v1/models/{model_id}"), ModelUpload)

    def delete(self, model_id: str) -> None:
        self._client._call(RequestOptions("DELETE", f"/v1/models/{model_id}"), None)


class Updates(_Resource):
    """What a client shared, and what the server knows of how it was made."""

    def upload(
        self,
        file: FileInput,
        *,
        model_id: str,
        kind: UpdateKind = "gradient",
        client: ClientTraining | Mapping[str, Any] | None = None,
        normalization: Normalization | Mapping[str, Sequence[float]] = "cifar10",
        num_images: int | None = None,
        labels: Sequence[int] | None = None,
        timeout: Timeout = None,
    ) -> UpdateUpload:
        """Upload an update (safetensors): a gradient (FedSGD), a delta (new - old weights) or
        the new weights, for an uploaded model. `client` holds the training facts the server
        knows (lr, local_epochs, batch_size, num_samples, ...); leave out what is unknown.

        >>> update = client.updates.upload(
        ...     "delta.safetensors", model_id=model.id, kind="delta",
        ...     client={"protocol": "fedavg", "lr": 0.01, "local_epochs": 1, "batch_size": 8,
        ...             "num_samples": 32},
        ... )
        """
        options = _update_options(file, model_id, kind, client, normalization, num_images, labels, timeout)
        return self._client._call(options, UpdateUpload)

    def get(self, update_id: str) -> UpdateUpload:
        return self._client._call(RequestOptions("GET", f"/v1/updates/{update_id}"), UpdateUpload)

    def delete(self, update_id: str) -> None:
        self._client._call(RequestOptions("DELETE", f"/v1/updates/{update_id}"), None)


class GroundTruth(_Resource):
    """The client's own images (and labels), used only to score a reconstruction."""

    def upload(
        self, file: FileInput, *, image_set: bool = False, timeout: Timeout = None
    ) -> GroundTruthUpload:
        """Upload `images` (N, C, H, W in [0, 1]) and optional `labels` (N) as safetensors.
        `image_set=True`: many images of your domain (a verdict's proxy data, a generator
        training run's images), up to the server's image-set limit instead of a job's batch.

        >>> truth = client.ground_truth.upload("batch.safetensors")
        >>> truth.metadata.num_images
        8
        """
        return self._client._call(_ground_truth_options(file, image_set, timeout), GroundTruthUpload)

    def get(self, ground_truth_id: str) -> GroundTruthUpload:
        return self._client._call(
            RequestOptions("GET", f"/v1/ground-truth/{ground_truth_id}"), GroundTruthUpload
        )

    def delete(self, ground_truth_id: str) -> None:
        self._client._call(RequestOptions("DELETE", f"/v1/ground-truth/{ground_truth_id}"), None)


class Generators(_Resource):
    """Generators for the generative attacks (knowledge level 2): safetensors weights with
    their manifest in the file's metadata, e.g. what `gradleak generator train` writes."""

    def upload(self, file: FileInput, *, timeout: Timeout = None) -> GeneratorUpload:
        """Upload a generator file; a job names it by the returned id.

        >>> gen = client.generators.upload("runs/generator/generator.safetensors")
        >>> gen.id, gen.metadata.trained_on
        ('gen_...', 'faces')
        """
        return self._client._call(_generator_options(file, timeout), GeneratorUpload)

    def list(self) -> builtins.list[GeneratorUpload]:
        """Your generators, newest first (at most 100)."""
        return self._client._call(RequestOptions("GET", "/v1/generators"), GeneratorList).generators

    def get(self, generator_id: str) -> GeneratorUpload:
        return self._client._call(RequestOptions("GET", f"/v1/generators/{generator_id}"), GeneratorUpload)

    def delete(self, generator_id: str) -> None:
        self._client._call(RequestOptions("DELETE", f"/v1/generators/{generator_id}"), None)


class AsyncModels(_AsyncResource):
    """The model the server sent to the client: its weights and architecture."""

    async def upload(
        self,
        file: FileInput,
        *,
        arch: str | None = None,
        image_shape: Sequence[int],
        num_classes: int = 10,
        knobs: Mapping[str, Any] | None = None,
        timeout: Timeout = None,
    ) -> ModelUpload:
        """See `Models.upload`."""
        options = _model_options(file, arch, image_shape, num_classes, knobs, timeout)
        return await self._client._call(options, ModelUpload)

    async def get(self, model_id: str) -> ModelUpload:
        return await self._client._call(RequestOptions("GET", f"/v1/models/{model_id}"), ModelUpload)

    async def delete(self, model_id: str) -> None:
        await self._client._call(RequestOptions("DELETE", f"/v1/models/{model_id}"), None)


class AsyncUpdates(_AsyncResource):
    """What a client shared, and what the server knows of how it was made."""

    async def upload(
        self,
        file: FileInput,
        *,
        model_id: str,
        kind: UpdateKind = "gradient",
        client: ClientTraining | Mapping[str, Any] | None = None,
        normalization: Normalization | Mapping[str, Sequence[float]] = "cifar10",
        num_images: int | None = None,
        labels: Sequence[int] | None = None,
        timeout: Timeout = None,
    ) -> UpdateUpload:
        """See `Updates.upload`."""
        options = _update_options(file, model_id, kind, client, normalization, num_images, labels, timeout)
        return await self._client._call(options, UpdateUpload)

    async def get(self, update_id: str) -> UpdateUpload:
        return await self._client._call(RequestOptions("GET", f"/v1/updates/{update_id}"), UpdateUpload)

    async def delete(self, update_id: str) -> None:
        await self._client._call(RequestOptions("DELETE", f"/v1/updates/{update_id}"), None)


class AsyncGroundTruth(_AsyncResource):
    """The client's own images (and labels), used only to score a reconstruction."""

    async def upload(
        self, file: FileInput, *, image_set: bool = False, timeout: Timeout = None
    ) -> GroundTruthUpload:
        """See `GroundTruth.upload`."""
        return await self._client._call(_ground_truth_options(file, image_set, timeout), GroundTruthUpload)

    async def get(self, ground_truth_id: str) -> GroundTruthUpload:
        options = RequestOptions("GET", f"/v1/ground-truth/{ground_truth_id}")
        return await self._client._call(options, GroundTruthUpload)

    async def delete(self, ground_truth_id: str) -> None:
        await self._client._call(RequestOptions("DELETE", f"/v1/ground-truth/{ground_truth_id}"), None)


class AsyncGenerators(_AsyncResource):
    """Generators for the generative attacks (knowledge level 2)."""

    async def upload(self, file: FileInput, *, timeout: Timeout = None) -> GeneratorUpload:
        """See `Generators.upload`."""
        return await self._client._call(_generator_options(file, timeout), GeneratorUpload)

    async def list(self) -> builtins.list[GeneratorUpload]:
        """Your generators, newest first (at most 100)."""
        return (await self._client._call(RequestOptions("GET", "/v1/generators"), GeneratorList)).generators

    async def get(self, generator_id: str) -> GeneratorUpload:
        options = RequestOptions("GET", f"/v1/generators/{generator_id}")
        return await self._client._call(options, GeneratorUpload)

    async def delete(self, generator_id: str) -> None:
        await self._client._call(RequestOptions("DELETE", f"/v1/generators/{generator_id}"), None)


# ---------------------------------------------------------------------------------------------
# jobs
# ---------------------------------------------------------------------------------------------


def _create_options(
    path: str, body: dict[str, Any], idempotency_key: str | None, timeout: Timeout
) -> RequestOptions:
    return RequestOptions("POST", path, json=body, idempotency_key=idempotency_key, timeout=timeout)


def _list_options(
    path: str, status: JobStatus | None, limit: int | None, cursor: str | None
) -> RequestOptions:
    return RequestOptions("GET", path, params={"status": status, "limit": limit, "cursor": cursor})


def _events_options(path: str, job_id: str) -> RequestOptions:
    # No read timeout: a running job may go quiet between events for longer than any default.
    timeout = httpx.Timeout(None, connect=10.0)
    return RequestOptions(
        "GET",
        f"{path}/{job_id}/events",
        headers={"Accept": "text/event-stream"},
        timeout=timeout,
        stream=True,
    )


class _Runs(_Resource, Generic[R]):
    """What jobs and federations share: get, list, iterate, cancel, wait for and follow a run.
    `_path` is the collection's route, `_model` the run's type."""

    _path = "/v1/jobs"
    _model: type[Any] = Job
    _list_model: type[Any] = JobList

    def get(self, job_id: str) -> R:
        """The job's status, progress, and when it is done, its metrics and result."""
        return self._client._call(RequestOptions("GET", f"{self._path}/{job_id}"), self._model)

    def list(
        self, *, status: JobStatus | None = None, limit: int | None = None, cursor: str | None = None
    ) -> Any:
        """One page of jobs, newest first; pass `next_cursor` as `cursor` for the next page."""
        return self._client._call(_list_options(self._path, status, limit, cursor), self._list_model)

    def iter(self, *, status: JobStatus | None = None, page_size: int = 50) -> Iterator[R]:
        """Every job, newest first, fetching pages as needed."""
        cursor: str | None = None
        while True:
            page = self.list(status=status, limit=page_size, cursor=cursor)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def cancel(self, job_id: str) -> R:
        """Cancel a job: a waiting one at once, a running one at its next iteration. A finished
        job cannot be cancelled (ConflictError)."""
        return self._client._call(RequestOptions("DELETE", f"{self._path}/{job_id}"), self._model)

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        progress: Progress = False,
    ) -> R:
        """Poll the job until it has finished and return it (check `job.status`, or call
        `job.raise_for_status()`). `progress=True` shows a progress bar on stderr; a callable
        receives each state seen. Raises WaitTimeoutError after `timeout` seconds; the job
        itself goes on.

        >>> job = client.jobs.wait(job.id, timeout=600, progress=True).raise_for_status()
        >>> job.scores.worst_case["psnr"]
        17.2
        """
        sink, bar = _progress_sink(progress)
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.get(job_id)
        try:
            while True:
                if sink is not None:
                    sink(job)
                if job.done:
                    return job
                if deadline is not None and time.monotonic() >= deadline:
                    assert timeout is not None
                    raise WaitTimeoutError(job, timeout)
                pause = (
                    poll_interval
                    if deadline is None
                    else min(poll_interval, max(0.0, deadline - time.monotonic()))
                )
                self._client._sleep(pause)
                job = self.get(job_id)
        finally:
            if bar is not None:
                bar.close()

    def events(self, job_id: str) -> Iterator[JobEvent]:
        """Follow the job as server-sent events: one each time its status or progress changes,
        ending after the final status. A dropped connection is reopened (the current state
        is then sent again).

        >>> for event in client.jobs.events(job.id):
        ...     print(event.event, event.job.progress)
        """
        failures = 0
        last: Run | None = None
        while True:
            try:
                with self._client._stream(_events_options(self._path, job_id)) as response:
                    decoder = SSEDecoder()
                    for line in response.iter_lines():
                        sse = decoder.decode(line)
                        if sse is None:
                            continue
                        event = _parse_event(sse.event, sse.data, sse.id, self._model)
                        last, failures = event.job, 0
                        yield event
                return
            except (httpx.NetworkError, httpx.RemoteProtocolError, httpx.TimeoutException):
                if last is not None and last.done:
                    return
                failures += 1
                if failures > self._client.max_retries:
                    raise
                self._client._sleep(min(2.0**failures, 8.0))


class Jobs(_Runs[Job]):
    """Attack jobs: submit, follow, list, cancel."""

    def create(
        self,
        *,
        update_id: str | None = None,
        model_id: str | None = None,
        ground_truth_id: str | None = None,
        attack: Attack | Mapping[str, Any] | None = None,
        knowledge: int | None = None,
        defenses: Sequence[Defense | Mapping[str, Any]] | None = None,
        budget: Budget | Mapping[str, Any] | None = None,
        seed: int | None = None,
        verdict: Mapping[str, Any] | None = None,
        spec: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        timeout: Timeout = None,
    ) -> Job:
        """Queue an attack on an uploaded update (or give a full JobSpec as `spec`). Retries of
        this call reuse one idempotency key, so a lost response never makes a second job.

        >>> job = client.jobs.create(
        ...     update_id=update.id, ground_truth_id=truth.id,
        ...     attack={"name": "inverting_gradients"}, budget={"iterations": 2000},
        ...     defenses=[{"name": "quantize", "bits": 8}],
        ... )
        >>> job.status
        'queued'

        Without `ground_truth_id` the job makes a leakage estimate from shadow audits; `verdict`
        sets it: ``{"shadows": 5, "budget": {"iterations": 500}, "proxy_data": proxy.id}`` (an
        uploaded ground-truth set of the platform's own images), ``{"when": "never"}`` to skip it.
        """
        body = _job_body(
            update_id, model_id, ground_truth_id, attack, knowledge, defenses, budget, seed, spec, verdict
        )
        return self._client._call(_create_options(self._path, body, idempotency_key, timeout), Job)


class _SpecRuns(_Runs[R]):
    """A run submitted as a spec (`{"spec": ...}`), with its own artifacts resource."""

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.artifacts = Artifacts(client, self._path)

    def create(
        self, spec: Mapping[str, Any], *, idempotency_key: str | None = None, timeout: Timeout = None
    ) -> R:
        """Queue the run its spec (a mapping) describes; the server checks it all before queueing."""
        options = _create_options(self._path, {"spec": dict(spec)}, idempotency_key, timeout)
        return self._client._call(options, self._model)  # type: ignore[no-any-return]


class Federations(_SpecRuns[Federation]):
    """Federations: a model trained over FL rounds by simulated clients, with test accuracy and
    IGSA per round and attacks on chosen rounds; follow, list, cancel like jobs.

    >>> fed = client.federations.create({
    ...     "model": {"arch": "lenet"}, "num_clients": 10, "rounds": 20,
    ...     "client": {"protocol": "fedavg", "lr": 0.05, "batch_size": 8},
    ...     "audit": {"rounds": [1, 5, 20], "budget": {"iterations": 500}},
    ... })
    >>> fed = client.federations.wait(fed.id, progress=True).raise_for_status()
    >>> [r["test_accuracy"] for r in fed.rounds]
    """

    _path = "/v1/federations"
    _model = Federation
    _list_model = FederationList

    def checkpoint_as_model(self, federation_id: str, round: int) -> ModelUpload:
        """Upload the global model of a round (a stored checkpoint) as a model, for attack jobs."""
        fed = self.get(federation_id)
        weights = self.artifacts.read(federation_id, f"checkpoints/round-{round:03d}.safetensors")
        return self._client.models.upload(weights, **_checkpoint_model(fed))


class GeneratorTrainings(_SpecRuns[GeneratorTraining]):
    """Generator training runs on the service's workers (a GPU worker's device when it has one):
    the DCGAN recipe of `gradleak generator train` on the shipped faces, the photo-patch task or an
    image set you uploaded (`client.ground_truth.upload(..., image_set=True)`); a run that succeeds
    stores its generator as your generator upload.

    >>> run = client.generator_trainings.create({"data": {"source": "faces"}, "steps": 3000})
    >>> run = client.generator_trainings.wait(run.id, progress=True).raise_for_status()
    >>> grid = client.generator_trainings.artifacts.read(run.id, "samples.png")
    >>> job_spec["attack"] = {"name": "gias", "generator": run.generator_id}
    """

    _path = "/v1/generator-trainings"
    _model = GeneratorTraining
    _list_model = GeneratorTrainingList


class Studies(_SpecRuns[Study]):
    """Studies: a job or federation spec swept over axes (grid or zipped) and seeds, run as
    ordinary jobs on the service's workers and aggregated into a table, plots and a report;
    every point is checked before any is queued.

    >>> study = client.studies.create({
    ...     "job": job_spec, "seeds": [0, 1, 2],
    ...     "axes": [{"path": "update.simulate.training.local_epochs", "values": [1, 2, 4]}],
    ... })
    >>> study = client.studies.wait(study.id, progress=True).raise_for_status()
    >>> table = client.studies.artifacts.read(study.id, "table.csv")
    """

    _path = "/v1/studies"
    _model = Study
    _list_model = StudyList


class Artifacts(_Resource):
    """A finished job's outputs: metrics.json, grid.png, reconstruction.safetensors, report.html
    (a federation's: `client.federations.artifacts`)."""

    def __init__(self, client: Client, path: str = "/v1/jobs") -> None:
        super().__init__(client)
        self._path = path

    def list(self, job_id: str) -> builtins.list[Artifact]:
        return self._client._call(
            RequestOptions("GET", f"{self._path}/{job_id}/artifacts"), ArtifactList
        ).items

    def read(self, job_id: str, name: str) -> bytes:
        """An artifact's bytes.

        >>> png = client.artifacts.read(job.id, "grid.png")
        """
        options = RequestOptions("GET", f"{self._path}/{job_id}/artifacts/{name}", follow_redirects=True)
        with self._client._stream(options) as response:
            return response.read()

    def download(self, job_id: str, name: str, to: str | os.PathLike[str]) -> Path:
        """Save an artifact to `to` (a file path, or a directory to save it in under its own
        name) and return the path. The file appears complete or not at all.

        >>> client.artifacts.download(job.id, "report.html", "out/")
        PosixPath('out/report.html')
        """
        target = _artifact_target(to, name)
        partial = target.with_name(target.name + ".part")
        options = RequestOptions("GET", f"{self._path}/{job_id}/artifacts/{name}", follow_redirects=True)
        try:
            with self._client._stream(options) as response, partial.open("wb") as f:
                for chunk in response.iter_bytes():
                    f.write(chunk)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
        return target


class _AsyncRuns(_AsyncResource, Generic[R]):
    """See `_Runs`."""

    _path = "/v1/jobs"
    _model: type[Any] = Job
    _list_model: type[Any] = JobList

    async def get(self, job_id: str) -> R:
        return await self._client._call(RequestOptions("GET", f"{self._path}/{job_id}"), self._model)

    async def list(
        self, *, status: JobStatus | None = None, limit: int | None = None, cursor: str | None = None
    ) -> Any:
        return await self._client._call(_list_options(self._path, status, limit, cursor), self._list_model)

    async def iter(self, *, status: JobStatus | None = None, page_size: int = 50) -> AsyncIterator[R]:
        cursor: str | None = None
        while True:
            page = await self.list(status=status, limit=page_size, cursor=cursor)
            for job in page.items:
                yield job
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def cancel(self, job_id: str) -> R:
        return await self._client._call(RequestOptions("DELETE", f"{self._path}/{job_id}"), self._model)

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        progress: Progress = False,
    ) -> R:
        """See `Jobs.wait`."""
        sink, bar = _progress_sink(progress)
        deadline = None if timeout is None else time.monotonic() + timeout
        job = await self.get(job_id)
        try:
            while True:
                if sink is not None:
                    sink(job)
                if job.done:
                    return job
                if deadline is not None and time.monotonic() >= deadline:
                    assert timeout is not None
                    raise WaitTimeoutError(job, timeout)
                pause = (
                    poll_interval
                    if deadline is None
                    else min(poll_interval, max(0.0, deadline - time.monotonic()))
                )
                await self._client._sleep(pause)
                job = await self.get(job_id)
        finally:
            if bar is not None:
                bar.close()

    async def events(self, job_id: str) -> AsyncIterator[JobEvent]:
        """See `Jobs.events`."""
        failures = 0
        last: Run | None = None
        while True:
            try:
                async with self._client._stream(_events_options(self._path, job_id)) as response:
                    decoder = SSEDecoder()
                    async for line in response.aiter_lines():
                        sse = decoder.decode(line)
                        if sse is None:
                            continue
                        event = _parse_event(sse.event, sse.data, sse.id, self._model)
                        last, failures = event.job, 0
                        yield event
                return
            except (httpx.NetworkError, httpx.RemoteProtocolError, httpx.TimeoutException):
                if last is not None and last.done:
                    return
                failures += 1
                if failures > self._client.max_retries:
                    raise
                await self._client._sleep(min(2.0**failures, 8.0))


class AsyncJobs(_AsyncRuns[Job]):
    """Attack jobs: submit, follow, list, cancel."""

    async def create(
        self,
        *,
        update_id: str | None = None,
        model_id: str | None = None,
        ground_truth_id: str | None = None,
        attack: Attack | Mapping[str, Any] | None = None,
        knowledge: int | None = None,
        defenses: Sequence[Defense | Mapping[str, Any]] | None = None,
        budget: Budget | Mapping[str, Any] | None = None,
        seed: int | None = None,
        verdict: Mapping[str, Any] | None = None,
        spec: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        timeout: Timeout = None,
    ) -> Job:
        """See `Jobs.create`."""
        body = _job_body(
            update_id, model_id, ground_truth_id, attack, knowledge, defenses, budget, seed, spec, verdict
        )
        return await self._client._call(_create_options(self._path, body, idempotency_key, timeout), Job)


class _AsyncSpecRuns(_AsyncRuns[R]):
    """See `_SpecRuns`."""

    def __init__(self, client: AsyncClient) -> None:
        super().__init__(client)
        self.artifacts = AsyncArtifacts(client, self._path)

    async def create(
        self, spec: Mapping[str, Any], *, idempotency_key: str | None = None, timeout: Timeout = None
    ) -> R:
        """See `_SpecRuns.create`."""
        options = _create_options(self._path, {"spec": dict(spec)}, idempotency_key, timeout)
        return await self._client._call(options, self._model)  # type: ignore[no-any-return]


class AsyncFederations(_AsyncSpecRuns[Federation]):
    """See `Federations`."""

    _path = "/v1/federations"
    _model = Federation
    _list_model = FederationList

    async def checkpoint_as_model(self, federation_id: str, round: int) -> ModelUpload:
        """See `Federations.checkpoint_as_model`."""
        fed = await self.get(federation_id)
        weights = await self.artifacts.read(federation_id, f"checkpoints/round-{round:03d}.safetensors")
        return await self._client.models.upload(weights, **_checkpoint_model(fed))


class AsyncGeneratorTrainings(_AsyncSpecRuns[GeneratorTraining]):
    """See `GeneratorTrainings`."""

    _path = "/v1/generator-trainings"
    _model = GeneratorTraining
    _list_model = GeneratorTrainingList


class AsyncStudies(_AsyncSpecRuns[Study]):
    """See `Studies`."""

    _path = "/v1/studies"
    _model = Study
    _list_model = StudyList


class AsyncArtifacts(_AsyncResource):
    """See `Artifacts`."""

    def __init__(self, client: AsyncClient, path: str = "/v1/jobs") -> None:
        super().__init__(client)
        self._path = path

    async def list(self, job_id: str) -> builtins.list[Artifact]:
        options = RequestOptions("GET", f"{self._path}/{job_id}/artifacts")
        return (await self._client._call(options, ArtifactList)).items

    async def read(self, job_id: str, name: str) -> bytes:
        options = RequestOptions("GET", f"{self._path}/{job_id}/artifacts/{name}", follow_redirects=True)
        async with self._client._stream(options) as response:
            return await response.aread()

    async def download(self, job_id: str, name: str, to: str | os.PathLike[str]) -> Path:
        """See `Artifacts.download`."""
        target = _artifact_target(to, name)
        partial = target.with_name(target.name + ".part")
        options = RequestOptions("GET", f"{self._path}/{job_id}/artifacts/{name}", follow_redirects=True)
        try:
            async with self._client._stream(options) as response:
                with partial.open("wb") as f:
                    async for chunk in response.aiter_bytes():
                        f.write(chunk)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
        return target


# ---------------------------------------------------------------------------------------------
# catalog
# ---------------------------------------------------------------------------------------------


class CatalogResource(_Resource):
    def get(self) -> Catalog:
        """What the service offers: attacks (with the knowledge each needs), architectures,
        defenses, metrics and the knowledge levels.

        >>> [a["name"] for a in client.catalog.get().attacks]
        ['dlg', 'fedavg_unroll', 'gradinversion', 'inverting_gradients']
        """
        return self._client._call(RequestOptions("GET", "/v1/catalog"), Catalog)


class AsyncCatalogResource(_AsyncResource):
    async def get(self) -> Catalog:
        return await self._client._call(RequestOptions("GET", "/v1/catalog"), Catalog)
