"""Request and response bodies. Inputs are strict (extra fields refused); outputs are built from
the stored records by the `*_out` functions, never by dumping records (which hold internals)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.federations.spec import FederationSpec
from service.generators.manifest import GeneratorManifest
from service.generators.spec import GeneratorTrainingSpec
from service.jobs.records import JobRecord, JobStatus, UploadRecord
from service.jobs.uploads import (
    GeneratorUpload,
    GroundTruthUpload,
    ModelUpload,
    UpdateUpload,
    refuse_non_finite,
)
from service.specs import AttackSpec, Budget, DefenseSpec, JobSpec, Knowledge, VerdictSpec


class Input(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Output(BaseModel):
    model_config = ConfigDict(frozen=True)


def at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def when(ts: float | None) -> datetime | None:
    return None if ts is None else at(ts)


# ---------------------------------------------------------------------------------------------
# uploads
# ---------------------------------------------------------------------------------------------


class UploadOut(Output):
    id: str
    kind: Literal["model", "update", "ground_truth", "generator"]
    size: int = Field(description="bytes")
    sha256: str
    tensors: int = Field(description="number of tensors in the file")
    created_at: datetime
    expires_at: datetime = Field(description="the upload is deleted then (retention)")


class ModelOut(UploadOut):
    kind: Literal["model"] = "model"
    metadata: ModelUpload


class UpdateOut(UploadOut):
    kind: Literal["update"] = "update"
    metadata: UpdateUpload


class GroundTruthInfo(Output):
    num_images: int
    image_shape: tuple[int, int, int]
    has_labels: bool
    purpose: Literal["scoring", "image_set"] = Field(
        default="scoring", description="scoring: a client's batch; image_set: proxy data or training images"
    )


class GroundTruthOut(UploadOut):
    kind: Literal["ground_truth"] = "ground_truth"
    metadata: GroundTruthInfo


class GeneratorOut(UploadOut):
    kind: Literal["generator"] = "generator"
    metadata: GeneratorManifest = Field(description="the manifest the file carries")


class GeneratorList(Output):
    generators: list[GeneratorOut]


_UPLOAD_OUT: dict[str, type[UploadOut]] = {
    "model": ModelOut,
    "update": UpdateOut,
    "ground_truth": GroundTruthOut,
    "generator": GeneratorOut,
}


def upload_out(upload: UploadRecord) -> UploadOut:
    return _UPLOAD_OUT[upload.kind].model_validate(
        {
            "id": upload.id,
            "size": upload.size,
            "sha256": upload.sha256,
            "tensors": upload.tensors,
            "created_at": at(upload.created_at),
            "expires_at": at(upload.expires_at),
            "metadata": upload.metadata,
        }
    )


# Re-exported so the routes document every upload's metadata in one place.
UPLOAD_META: dict[str, type[BaseModel]] = {
    "model": ModelUpload,
    "update": UpdateUpload,
    "ground_truth": GroundTruthUpload,
    "generator": GeneratorUpload,
}


# ---------------------------------------------------------------------------------------------
# jobs
# ---------------------------------------------------------------------------------------------


class JobCreate(Input):
    """A job, in one of two forms.

    From uploads (friendly): `update_id` (and optionally `model_id`, which must be the update's
    model, and `ground_truth_id`) plus the attack settings; the model, the client's training
    facts and the data description come from the uploads' metadata.

    A full JobSpec: `spec`, whose `model.weights`, `update.artifact` and `ground_truth` hold
    upload ids (mdl_..., upd_..., gt_...). The attack-setting fields must then be left out.
    """

    spec: JobSpec | None = Field(default=None, description="a full JobSpec; excludes the fields below")
    update_id: str | None = Field(default=None, description="the client's update (upd_...)")
    model_id: str | None = Field(default=None, description="the update's model (mdl_...); optional")
    ground_truth_id: str | None = Field(default=None, description="the client's images (gt_...), for scoring")
    attack: AttackSpec | None = Field(default=None, description="default: inverting_gradients")
    knowledge: Knowledge | None = Field(default=None, description="knowledge level granted, 0-5 (default 1)")
    defenses: list[DefenseSpec] = Field(default_factory=list, max_length=8)
    budget: Budget | None = None
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    verdict: VerdictSpec | None = Field(
        default=None,
        description="the leakage estimate without ground truth: when, shadows (K), budget, proxy_data "
        "(a gt_... upload of proxy images), seed, igsa; default: the spec's defaults",
    )

    @model_validator(mode="before")
    @classmethod
    def _finite(cls, data: Any) -> Any:
        return refuse_non_finite(data)

    @model_validator(mode="after")
    def _one_form(self) -> JobCreate:
        friendly = {
            "update_id",
            "model_id",
            "ground_truth_id",
            "attack",
            "knowledge",
            "defenses",
            "budget",
            "seed",
            "verdict",
        }
        given = friendly & self.model_fields_set
        if self.spec is not None and given:
            raise ValueError(
                f"give either spec or the upload fields, not both (also given: {', '.join(sorted(given))})"
            )
        if self.spec is None and self.update_id is None:
            raise ValueError("give update_id (and optionally model_id, ground_truth_id), or a full spec")
        return self


class ProgressOut(Output):
    stage: Literal["setup", "training", "attack", "scoring", "done"]
    iteration: int
    total: int
    loss: float | None
    best_loss: float | None = Field(description="the lowest attack loss so far")
    elapsed_s: float
    restart: int | None
    message: str
    updated_at: datetime | None


class JobErrorOut(Output):
    code: str = Field(description="stable: invalid_artifact, shape_mismatch, time_limit, worker_lost, ...")
    message: str = Field(description="what went wrong and what to do about it")


class JobLinks(Output):
    self: str
    events: str
    artifacts: str


class RunOut(Output):
    """What a job and a federation share: their life, progress and error."""

    id: str
    status: JobStatus
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime = Field(description="the job and its artifacts are deleted then (retention)")
    attempts: int = Field(description="how often the job has started (a retry after a lost worker counts)")
    max_attempts: int
    cancel_requested: bool
    progress: ProgressOut | None
    error: JobErrorOut | None = Field(description="why it failed, or why it was interrupted")
    links: JobLinks


class JobOut(RunOut):
    metrics: dict[str, Any] | None = Field(description="the result's metrics (PSNR, SSIM, ...), when scored")
    estimate: dict[str, Any] | None = Field(
        default=None, description="the leakage estimate from shadow audits, when the job made one"
    )
    result: dict[str, Any] | None = Field(
        description="the result manifest without the spec: attack summary, versions, timings, device"
    )
    spec: JobSpec


def job_out(job: JobRecord) -> JobOut:
    manifest = job.manifest
    result = None if manifest is None else {k: v for k, v in manifest.items() if k != "spec"}
    return JobOut(
        **_run_fields(job, f"/v1/jobs/{job.id}"),
        metrics=None if manifest is None else manifest.get("metrics"),
        estimate=None if manifest is None else manifest.get("estimate"),
        result=result,
        spec=JobSpec.model_validate_json(job.spec_json),
    )


def _run_fields(job: JobRecord, base: str) -> dict[str, Any]:
    return dict(
        id=job.id,
        status=job.status,
        created_at=at(job.created_at),
        updated_at=at(job.updated_at),
        started_at=when(job.started_at),
        finished_at=when(job.finished_at),
        expires_at=at(job.expires_at),
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        cancel_requested=job.cancel_requested,
        progress=None
        if job.progress is None
        else ProgressOut(
            **job.progress.model_dump(exclude={"updated_at"}), updated_at=when(job.progress.updated_at)
        ),
        error=None if job.error is None else JobErrorOut(code=job.error.code, message=job.error.message),
        links=JobLinks(self=base, events=f"{base}/events", artifacts=f"{base}/artifacts"),
    )


class JobList(Output):
    items: list[JobOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next (older) page; null at the end")


class FederationCreate(Input):
    spec: FederationSpec


class FederationOut(RunOut):
    rounds: list[dict[str, Any]] | None = Field(
        description="per round: test accuracy and loss, train loss, IGSA, and at audited rounds the "
        "attack's PSNR/SSIM/LPIPS and label accuracy (when finished; progress tells the round meanwhile)"
    )
    result: dict[str, Any] | None = Field(
        description="the manifest without the spec and rounds: initial and final accuracy, data, "
        "versions, timings, device"
    )
    spec: FederationSpec


def federation_out(job: JobRecord) -> FederationOut:
    manifest = job.manifest
    result = None if manifest is None else {k: v for k, v in manifest.items() if k not in ("spec", "rounds")}
    return FederationOut(
        **_run_fields(job, f"/v1/federations/{job.id}"),
        rounds=None if manifest is None else manifest.get("rounds"),
        result=result,
        spec=FederationSpec.model_validate_json(job.spec_json),
    )


class FederationList(Output):
    items: list[FederationOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next (older) page; null at the end")


class GeneratorTrainingCreate(Input):
    spec: GeneratorTrainingSpec


class GeneratorTrainingOut(RunOut):
    generator_id: str | None = Field(
        description="when it succeeded: the generator upload (gen_...) it made, for gias/ggl jobs"
    )
    result: dict[str, Any] | None = Field(
        description="the summary without the spec: steps done and requested, how it ended (all steps, "
        "time limit, cancelled), the generator's manifest, images, timings, device, versions"
    )
    spec: GeneratorTrainingSpec


def training_out(job: JobRecord) -> GeneratorTrainingOut:
    manifest = job.manifest
    result = None if manifest is None else {k: v for k, v in manifest.items() if k != "spec"}
    return GeneratorTrainingOut(
        **_run_fields(job, f"/v1/generator-trainings/{job.id}"),
        generator_id=None if manifest is None else manifest.get("generator_id"),
        result=result,
        spec=GeneratorTrainingSpec.model_validate_json(job.spec_json),
    )


class GeneratorTrainingList(Output):
    items: list[GeneratorTrainingOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next (older) page; null at the end")


class ArtifactOut(Output):
    name: str
    size: int
    content_type: str
    url: str = Field(description="download through the API")
    presigned_url: str | None = Field(description="a direct, short-lived download link (S3 stores only)")
    presigned_expires_at: datetime | None


class ArtifactList(Output):
    items: list[ArtifactOut]


# ---------------------------------------------------------------------------------------------
# catalog, health, problems
# ---------------------------------------------------------------------------------------------


class KnowledgeLevel(Output):
    level: int
    name: str
    description: str


class Catalog(Output):
    attacks: list[dict[str, Any]] = Field(
        description="name, description, required_knowledge, knowledge, fields (each parameter's default, "
        "description, type and bounds, from the parameter model), parameters (its JSON schema)"
    )
    architectures: list[dict[str, Any]] = Field(description="name, description, min_size, knobs")
    defenses: list[dict[str, Any]] = Field(description="name, description, fields, parameters")
    metrics: list[dict[str, Any]]
    photos: dict[str, list[str]] = Field(description="the shipped photo names, by category")
    generators: list[dict[str, Any]] = Field(
        default_factory=list,
        description="generator architectures (knowledge level 2): name, description, conditional, "
        "default_width, sizes",
    )
    knowledge_levels: list[KnowledgeLevel]


class Health(Output):
    status: Literal["ok"]


class Ready(Output):
    status: Literal["ready"]
    checks: dict[str, str]


class Problem(Output):
    """Every error response (application/problem+json)."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    request_id: str | None
    instance: str | None = None
    errors: list[dict[str, Any]] | None = Field(default=None, description="validation errors: loc, msg, type")
    valid: list[str] | None = Field(default=None, description="the valid names, for an unknown name")
    mismatches: list[str] | None = Field(default=None, description="the first tensors that do not fit")
    estimate: dict[str, Any] | None = Field(
        default=None, description="a job over the memory budget: its estimated peak and the limit (bytes)"
    )
    quota: str | None = Field(default=None, description="429: the quota or rate limit that was hit")
    limit: float | None = Field(default=None, description="429: that quota's value for this tenant")
