"""What the job state store holds: jobs, uploads and API keys, as plain torch-free records.

A job's life: queued -> running -> succeeded | failed | cancelled. A job whose worker stopped
mid-run (killed, crashed, shut down) becomes `interrupted` and waits for another try; when its
tries are used up it fails with a reason. Records are frozen; stores return fresh copies.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Kinds of uploads and the prefix of their ids.
UploadKind = Literal["model", "update", "ground_truth", "generator"]
UPLOAD_PREFIXES: dict[str, str] = {"model": "mdl", "update": "upd", "ground_truth": "gt", "generator": "gen"}
JOB_PREFIX = "job"
FEDERATION_PREFIX = "fed"
STUDY_PREFIX = "std"
TRAINING_PREFIX = "gtr"  # a generator training run
KEY_PREFIX = "key"

# Ids sort by creation time: 12 hex digits of milliseconds, then 80 random bits.
_ID_RE = re.compile(r"^(job|fed|std|gtr|mdl|upd|gt|gen|key)_[0-9a-f]{32}$")
TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
LOCAL_TENANT = "local"

# How often a job may start before it fails for good (worker deaths and transient errors).
MAX_ATTEMPTS = 3


class _IdClock:
    """Monotonic ids (as ULIDs do it): within one millisecond the random part counts up, so ids
    made by one process sort in creation order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = (0, 0)

    def __call__(self, prefix: str) -> str:
        with self._lock:
            ms, rand = time.time_ns() // 1_000_000, secrets.randbits(79)
            if ms <= self._last[0]:
                ms, rand = self._last[0], self._last[1] + 1
            self._last = (ms, rand)
        return f"{prefix}_{ms:012x}{rand:020x}"


new_id = _IdClock()


def is_id(value: str, prefix: str) -> bool:
    return bool(_ID_RE.match(value)) and value.startswith(prefix + "_")


def error_code(exc: BaseException) -> str:
    """ShapeMismatchError -> shape_mismatch: stable codes for programs, derived from the class."""
    name = type(exc).__name__.removesuffix("Error") or "error"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def check_tenant(tenant: str) -> str:
    if not TENANT_RE.match(tenant):
        raise ValueError(
            f"invalid tenant name {tenant!r}: use 1-63 lower-case letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return tenant


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
RUNNABLE = frozenset({JobStatus.QUEUED, JobStatus.INTERRUPTED})


class JobProgress(Record):
    stage: Literal["setup", "training", "attack", "scoring", "done"]
    iteration: int = 0
    total: int = 0
    loss: float | None = None
    best_loss: float | None = None
    elapsed_s: float = 0.0
    restart: int | None = None
    message: str = ""
    updated_at: float = 0.0


class JobError(Record):
    """Why a job failed, in words a user can act on; `code` is stable for programs."""

    code: str
    message: str


class JobRecord(Record):
    id: str
    tenant: str
    status: JobStatus = JobStatus.QUEUED
    spec_json: str
    created_at: float
    updated_at: float
    expires_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    max_attempts: int = MAX_ATTEMPTS
    worker_id: str | None = None
    lease_expires_at: float | None = None
    cancel_requested: bool = False
    progress: JobProgress | None = None
    error: JobError | None = None
    manifest: dict[str, Any] | None = None
    artifacts: dict[str, str] = Field(default_factory=dict)
    queue_ref: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    # the submitting key's quota of running jobs: a worker leaves the job waiting while the
    # tenant has this many running
    max_running_jobs: int | None = None

    @property
    def kind(self) -> RunKind:
        """What the record runs, told by its id: an attack job, a federation, a study, or a
        generator training run."""
        return _KINDS.get(self.id.split("_", 1)[0], "job")


RunKind = Literal["job", "federation", "study", "generator_training"]
_KINDS: dict[str, RunKind] = {
    FEDERATION_PREFIX: "federation",
    STUDY_PREFIX: "study",
    TRAINING_PREFIX: "generator_training",
}


class UploadRecord(Record):
    id: str
    tenant: str
    kind: UploadKind
    key: str  # where the bytes are in the artifact store
    size: int
    sha256: str
    metadata: dict[str, Any]
    tensors: int
    created_at: float
    expires_at: float


class ApiKeyRecord(Record):
    id: str
    tenant: str
    name: str
    digest: str  # sha256 of the key; the key itself is never stored
    prefix: str  # the first characters, so a person can tell keys apart
    created_at: float
    revoked_at: float | None = None
    quotas: dict[str, float | int] | None = None  # overrides of the server's quotas (service/jobs/quotas.py)


class Heartbeat(Record):
    """A worker's lease renewal: whether it still owns the job and whether to stop."""

    owned: bool
    cancel_requested: bool = False
