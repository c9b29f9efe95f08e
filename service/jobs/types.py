"""What the runner takes and gives: plain dataclasses shared by the CLI, the workers and the API."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from service.storage import ArtifactStore

Stage = Literal["setup", "training", "attack", "scoring", "done"]

# Names of the artifacts a job writes under its prefix.
METRICS_JSON = "metrics.json"
RECONSTRUCTION = "reconstruction.safetensors"
GRID_PNG = "grid.png"
REPORT_HTML = "report.html"
ARTIFACT_NAMES = (METRICS_JSON, RECONSTRUCTION, GRID_PNG, REPORT_HTML)
CONTENT_TYPES = {
    METRICS_JSON: "application/json",
    RECONSTRUCTION: "application/octet-stream",
    GRID_PNG: "image/png",
    REPORT_HTML: "text/html; charset=utf-8",
}
# A report shows only what it holds: no script, nothing loaded from elsewhere. The report carries
# this policy in a <meta> tag, so any copy of it keeps it; the API adds `sandbox` (which only a
# header can set) when it serves one.
REPORT_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass(frozen=True)
class Progress:
    stage: Stage
    iteration: int = 0
    total: int = 0
    loss: float | None = None
    elapsed_s: float = 0.0
    restart: int | None = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class JobContext:
    """How a run reaches the outside world.

    `resolve` turns an artifact reference in the spec (a local path for the CLI, an upload id
    for the service) into bytes; `prefix` is where outputs go in `store` (e.g.
    ``tenant/jobs/<id>``); `should_stop` is polled between iterations: when it answers True
    the attack stops and the run finishes with its best result so far.
    """

    job_id: str
    store: ArtifactStore
    prefix: str
    resolve: Callable[[str], bytes]
    progress: Callable[[Progress], None] | None = None
    should_stop: Callable[[], bool] | None = None
    device: str | None = None
    lpips_weights_dir: str | None = None
    # service workers: the memory a job may use; the runner refuses, before the attack, a job whose
    # estimate with the image count it found (service/jobs/budget.py) exceeds it
    memory_limit_bytes: int | None = None
    # runs the attack: attack(problem, params, control, generator) -> AttackResult; None: the
    # registered attack. A study that batches points sharing one model sets it (studies/batch.py)
    attack: Callable[..., Any] | None = None


@dataclass(frozen=True)
class JobResult:
    status: Literal["succeeded", "cancelled"]
    manifest: dict[str, Any]
    artifacts: dict[str, str] = field(default_factory=dict)  # artifact name -> store key
