"""Typed settings from the environment (prefix GRADLEAK_), built once by `get_settings()` and
injected; nothing reads the environment at import time."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRADLEAK_", extra="ignore", frozen=True)

    # where the embedded default keeps job state (SQLite) and artifacts
    data_dir: Path = Field(default=Path(".gradleak"))

    # production queue: arq on Redis; unset -> in-process worker with SQLite job state
    redis_url: str | None = None
    redis_prefix: str = "gradleak"
    queue_name: str = "gradleak:queue"

    # artifacts on S3/MinIO; unset endpoint -> local directory under data_dir
    s3_endpoint: str | None = None
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_bucket: str = "gradleak"
    s3_region: str | None = None
    s3_secure: bool = True

    # HTTP server
    host: str = "127.0.0.1"
    port: int = 8731
    # None: keys required unless the server is bound to a loopback address
    auth_required: bool | None = None

    # limits on what a tenant may ask for
    max_upload_bytes: int = 512 * 1024 * 1024
    # an uploaded ONNX model: its size, node count and the time its conversion and checks may take
    max_onnx_bytes: int = 256 * 1024 * 1024
    max_onnx_nodes: int = 2000
    onnx_check_timeout_s: float = 60.0
    max_batch_size: int = 64
    max_iterations: int = 20_000
    max_restarts: int = 16
    max_time_limit_s: float = 6 * 3600.0
    default_time_limit_s: float = 3600.0
    # federations: local trainings (clients per round x rounds), clients, and wall-clock
    max_federation_client_rounds: int = 5_000
    max_federation_clients: int = 10_000
    max_federation_time_limit_s: float = 24 * 3600.0
    default_federation_time_limit_s: float = 6 * 3600.0
    max_federation_parameter_rounds: float = 1e11  # parameters x local trainings
    # the memory one job may use on a worker (RAM on a CPU worker, device memory on a GPU worker);
    # specs whose estimated peak (service/jobs/budget.py) exceeds it are refused before queueing
    worker_memory_bytes: int = Field(default=8 * 2**30, gt=0)

    # per-tenant quotas and rate limits; an API key may override each (`gradleak keys create --quota`)
    rate_read_per_s: float = Field(default=50.0, gt=0)  # GET/HEAD requests
    rate_read_burst: int = Field(default=200, ge=1)
    rate_write_per_s: float = Field(default=2.0, gt=0)  # POST/DELETE: submissions, uploads, cancels
    rate_write_burst: int = Field(default=30, ge=1)
    max_running_jobs: int = Field(default=2, ge=1)
    max_queued_jobs: int = Field(default=20, ge=1)
    max_stored_bytes: int = Field(default=10 * 2**30, ge=0)  # the tenant's uploads
    # studies: points (axis combinations x seeds), each within the limits above, and wall-clock
    max_study_points: int = 500
    max_study_time_limit_s: float = 7 * 24 * 3600.0
    default_study_time_limit_s: float = 2 * 24 * 3600.0
    # generator training runs (POST /v1/generator-trainings): wall-clock, and the images an
    # uploaded image set may hold when it is meant for training (or as a verdict's proxy data)
    max_training_time_limit_s: float = 24 * 3600.0
    default_training_time_limit_s: float = 4 * 3600.0
    max_image_set_images: int = Field(default=20_000, ge=1)

    # privacy: uploads, reconstructions and reports are private data
    retention_hours: float = 7 * 24.0
    presign_minutes: int = 10

    # engine
    device: str | None = None  # "cuda", "cpu"; None picks cuda when available
    lpips_weights_dir: Path | None = None
    # keep freed memory in the process (glibc): fewer page faults per attack iteration
    malloc_tuning: bool = True
    worker_concurrency: int = 1

    log_level: str = "INFO"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
