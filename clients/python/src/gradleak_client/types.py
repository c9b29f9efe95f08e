"""Typed models of every API response, and typed dicts for the request parameters.

Responses are pydantic models that keep fields a newer server adds (`extra="allow"`), so an
older client keeps working. Request parameters are plain dicts with a `TypedDict` for editors
and type checkers; the server validates them and answers 422 with the reason.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, Self, TypedDict

from pydantic import BaseModel, ConfigDict, Field

from gradleak_client._exceptions import JobFailedError

__all__ = [
    "Artifact",
    "Attack",
    "Budget",
    "Catalog",
    "ClientTraining",
    "ClientTrainingInfo",
    "Defense",
    "Estimate",
    "EstimateValue",
    "Federation",
    "FederationList",
    "GeneratorList",
    "GeneratorManifest",
    "GeneratorTraining",
    "GeneratorTrainingList",
    "GeneratorUpload",
    "GroundTruthInfo",
    "GroundTruthUpload",
    "Job",
    "JobError",
    "JobEvent",
    "JobLinks",
    "JobList",
    "JobProgress",
    "JobStatus",
    "KnowledgeLevel",
    "LabelAccuracy",
    "LabelHistogram",
    "Metrics",
    "ModelMetadata",
    "ModelUpload",
    "Problem",
    "UpdateKind",
    "UpdateMetadata",
    "UpdateUpload",
    "Upload",
]

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
UpdateKind = Literal["gradient", "delta", "weights"]
Normalization = Literal["cifar10", "cifar100", "imagenet", "none"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


# ---------------------------------------------------------------------------------------------
# request parameters
# ---------------------------------------------------------------------------------------------


class ClientTraining(TypedDict, total=False):
    """What the client did locally; leave out what is unknown."""

    protocol: Literal["fedsgd", "fedavg"]
    lr: float
    local_epochs: int
    batch_size: int
    num_samples: int
    optimizer: Literal["sgd"]
    momentum: float
    bn_mode: Literal["train", "eval"]
    shuffle_seed: int


class Attack(TypedDict, total=False):
    """An attack and its parameters, e.g. ``{"name": "inverting_gradients", "tv_weight": 0.001}``;
    `GET /v1/catalog` lists every attack's parameters."""

    name: Literal["dlg", "inverting_gradients", "gradinversion", "fedavg_unroll"]
    label_strategy: Literal["auto", "known", "infer", "joint"]
    lr: float
    max_eval: int
    tv_weight: float


class _DefenseName(TypedDict):
    name: Literal["quantize", "topk", "clip", "noise", "sign"]


class Defense(_DefenseName, total=False):
    """A post-processing defense to apply to the update first ("what-if"), e.g.
    ``{"name": "quantize", "bits": 4}`` or ``{"name": "noise", "scale": 0.01}``."""

    bits: int
    stochastic: bool
    ratio: float
    max_norm: float
    distribution: Literal["gaussian", "laplace"]
    scale: float


class Budget(TypedDict, total=False):
    iterations: int
    restarts: int
    time_limit_s: float


# ---------------------------------------------------------------------------------------------
# uploads
# ---------------------------------------------------------------------------------------------


class ModelMetadata(_Model):
    format: Literal["safetensors", "onnx"] = "safetensors"
    arch: str | None = None  # None for an ONNX model
    knobs: dict[str, Any] = Field(default_factory=dict)
    source: str | None = None
    image_shape: tuple[int, int, int]
    num_classes: int


class ClientTrainingInfo(_Model):
    """What the server was told the client did; None where unknown."""

    protocol: Literal["fedsgd", "fedavg"] | None = None
    lr: float | None = None
    local_epochs: int | None = None
    batch_size: int | None = None
    num_samples: int | None = None
    optimizer: str | None = None
    momentum: float | None = None
    bn_mode: Literal["train", "eval"] | None = None
    shuffle_seed: int | None = None


class UpdateMetadata(_Model):
    model_id: str
    kind: UpdateKind
    client: ClientTrainingInfo = Field(default_factory=ClientTrainingInfo)
    normalization: str | dict[str, Any] = "cifar10"
    num_images: int | None = None
    labels: list[int] | None = None


class GroundTruthInfo(_Model):
    num_images: int
    image_shape: tuple[int, int, int]
    has_labels: bool
    purpose: Literal["scoring", "image_set"] = "scoring"  # image_set: proxy data or training images


class GeneratorManifest(_Model):
    """What a generator file says about itself (stored in its safetensors metadata under
    `gradleak.generator`); images come out in [0, 1] with shape `image_shape`."""

    arch: str
    latent_dim: int
    image_shape: tuple[int, int, int]
    num_classes: int | None = None
    width: int | None = None
    trained_on: str
    steps: int | None = None
    notes: str | None = None


class Upload(_Model):
    id: str
    kind: Literal["model", "update", "ground_truth", "generator"]
    size: int
    sha256: str
    tensors: int
    created_at: datetime
    expires_at: datetime


class ModelUpload(Upload):
    kind: Literal["model"] = "model"
    metadata: ModelMetadata


class UpdateUpload(Upload):
    kind: Literal["update"] = "update"
    metadata: UpdateMetadata


class GroundTruthUpload(Upload):
    kind: Literal["ground_truth"] = "ground_truth"
    metadata: GroundTruthInfo


class GeneratorUpload(Upload):
    kind: Literal["generator"] = "generator"
    metadata: GeneratorManifest


class GeneratorList(_Model):
    generators: list[GeneratorUpload]


# ---------------------------------------------------------------------------------------------
# jobs
# ---------------------------------------------------------------------------------------------


class JobProgress(_Model):
    stage: Literal["setup", "training", "attack", "scoring", "done"]
    iteration: int
    total: int
    loss: float | None = None
    best_loss: float | None = None
    elapsed_s: float
    restart: int | None = None
    message: str = ""
    updated_at: datetime | None = None


class JobError(_Model):
    code: str
    message: str


class JobLinks(_Model):
    self: str
    events: str
    artifacts: str


class LabelAccuracy(_Model):
    multiset: float
    positional: float


class Metrics(_Model):
    """A scored result: per image (in ground-truth order), mean, and worst case (the most
    leaked value of each metric). A metric that could not be computed is None here and
    `unavailable[name]` says why (e.g. LPIPS without its weights, or on images too small)."""

    num_images: int
    per_image: dict[str, list[float] | None]
    mean: dict[str, float | None]
    worst_case: dict[str, Any]
    label_accuracy: LabelAccuracy | None = None
    permutation: list[int] = Field(default_factory=list)

    @property
    def unavailable(self) -> dict[str, str]:
        extra = self.model_extra or {}
        return {
            k.removesuffix("_unavailable"): str(v)
            for k, v in extra.items()
            if k.endswith("_unavailable") and v
        }


class EstimateValue(_Model):
    """One estimated score: the value, its interval, and its gain over the no-leak floor."""

    value: float
    interval: tuple[float, float]
    gain_over_floor: float | None = None
    shadows: list[float] = Field(default_factory=list)
    exact: bool | None = Field(
        default=None,
        description="PSNR only: at least 40 dB, an exact reconstruction (the dB figure is then indicative)",
    )
    source: str = Field(
        default="shadows",
        description="shadows: from the shadow audits; direct: from a Gauss-Newton step on the real "
        "attack's residual, where it holds (docs/verdict.md)",
    )
    shadow_value: float | None = Field(default=None, description="direct only: what the shadows alone said")


class LabelHistogram(_Model):
    """The label counts the update reveals (class -> images) and how sure the inference is:
    `exact`, `proven classes, estimated counts`, `estimated` or `given`."""

    counts: dict[str, int]
    num_images: int
    certainty: str
    why: str
    proven_present: list[int] = Field(default_factory=list)


class Estimate(_Model):
    """What the update leaks, estimated without the client's images from shadow audits on proxy
    data (see docs/verdict.md): per metric (psnr, ssim, lpips) and scope (mean,
    worst_case) a value with an interval; the label histogram; the no-leak floor."""

    summary: str
    shadows_run: int
    proxy_data: str
    psnr: dict[str, EstimateValue] | None = None
    ssim: dict[str, EstimateValue] | None = None
    lpips: dict[str, EstimateValue] | None = None
    labels: LabelHistogram
    floor: dict[str, Any] = Field(default_factory=dict)
    unavailable: dict[str, str] = Field(default_factory=dict)
    direct: dict[str, Any] | None = Field(
        default=None, description="the Gauss-Newton step's numbers: whether it applied and held, and why"
    )

    def get(self, metric: str, scope: str = "worst_case") -> EstimateValue | None:
        """The estimate of `metric` over `scope`, or None when it was not estimated."""
        per_scope = getattr(self, metric, None) if metric in ("psnr", "ssim", "lpips") else None
        return None if per_scope is None else per_scope.get(scope)


class Run(_Model):
    """What a job and a federation share: their life, progress and error."""

    id: str
    status: JobStatus
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    expires_at: datetime
    attempts: int
    max_attempts: int
    cancel_requested: bool = False
    progress: JobProgress | None = None
    error: JobError | None = None
    result: dict[str, Any] | None = None
    spec: dict[str, Any]
    links: JobLinks

    @property
    def done(self) -> bool:
        """Whether it has finished (succeeded, failed or cancelled)."""
        return self.status in TERMINAL_STATUSES

    def raise_for_status(self) -> Self:
        """Return it if it succeeded; raise JobFailedError if it failed or was cancelled."""
        if self.status in ("failed", "cancelled"):
            raise JobFailedError(self)
        return self


class Job(Run):
    metrics: dict[str, Any] | None = None
    estimate: dict[str, Any] | None = None

    @property
    def scores(self) -> Metrics | None:
        """The typed metrics, when the job was scored against ground truth."""
        return None if self.metrics is None else Metrics.model_validate(self.metrics)

    @property
    def verdict(self) -> Estimate | None:
        """The typed leakage estimate, when the job made one (by default: no ground truth given)."""
        return None if self.estimate is None else Estimate.model_validate(self.estimate)


class Federation(Run):
    """A federation: `rounds` holds, per round, test accuracy and loss, train loss, IGSA and, at
    audited rounds, the attack's PSNR/SSIM/LPIPS (when finished); `progress.iteration` is the
    round it is in meanwhile."""

    rounds: list[dict[str, Any]] | None = None


class GeneratorTraining(Run):
    """A generator training run: `progress.iteration` is the step it is at (of `progress.total`),
    `progress.message` its losses, rate and ETA; when it succeeded, `generator_id` names the
    generator upload it made (for gias/ggl jobs) and `result` says how it ended and what it took."""

    generator_id: str | None = None


class StudyPoints(_Model):
    """A study's points by state: `done` counts those finished (succeeded, failed or cancelled)."""

    total: int
    done: int
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    running: int = 0
    waiting: int = 0


class StudyPoint(_Model):
    """One point of a study: its axis values, seed, and the job (or federation) that runs it."""

    index: int
    id: str
    values: dict[str, Any]
    seed: int
    status: JobStatus


class Study(Run):
    """A study: a job or federation spec swept over axes and seeds. `points` counts its points
    (done of total), `eta_s` estimates the time left; when done, `result` and the artifacts
    (table.csv, table.json, plots/<axis>.png|svg, report.html) hold the aggregate."""

    kind: str = "job"
    points: StudyPoints
    eta_s: float | None = None
    items: list[StudyPoint] = Field(default_factory=list)


class StudyList(_Model):
    items: list[Study]
    next_cursor: str | None = None


class GeneratorTrainingList(_Model):
    items: list[GeneratorTraining]
    next_cursor: str | None = None


class FederationList(_Model):
    items: list[Federation]
    next_cursor: str | None = None


class JobList(_Model):
    items: list[Job]
    next_cursor: str | None = None


class JobEvent(_Model):
    """One server-sent event of a job's stream: `event` is "status" or "progress"."""

    event: str
    id: str | None = None
    job: Job | Federation | Study = Field(
        description="the job (or, for a federation's or a study's stream, the federation or study)"
    )


class Artifact(_Model):
    name: str
    size: int
    content_type: str
    url: str
    presigned_url: str | None = None
    presigned_expires_at: datetime | None = None


class ArtifactList(_Model):
    items: list[Artifact]


# ---------------------------------------------------------------------------------------------
# catalog, problems
# ---------------------------------------------------------------------------------------------


class KnowledgeLevel(_Model):
    level: int
    name: str
    description: str


class Catalog(_Model):
    attacks: list[dict[str, Any]]
    architectures: list[dict[str, Any]]
    defenses: list[dict[str, Any]]
    metrics: list[dict[str, Any]]
    knowledge_levels: list[KnowledgeLevel]
    photos: dict[str, list[str]] = Field(default_factory=dict)
    generators: list[dict[str, Any]] = Field(default_factory=list)


class Problem(_Model):
    """An error body (application/problem+json)."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    request_id: str | None = None
    instance: str | None = None
