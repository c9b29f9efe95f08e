"""Generator training as a service job: `service.generators.train` on a worker (a GPU worker's
device when it has one), with progress, cancel, crash-safe checkpoints and, when it succeeds, the
generator stored as the tenant's generator upload.

The run trains in a scratch folder and copies every checkpoint (the training state, the exported
generator and its sample grid) to its artifact prefix as soon as it is written. A run whose worker
died, or was shut down, is tried again: the next try finds the last stored checkpoint and
continues from it bit for bit (train.py's resume), so at most `checkpoint_every` steps are redone.
A cancelled run keeps its artifacts (generator.safetensors is the generator so far) and makes no
upload. A succeeded run registers `generator.safetensors` as the upload `gen_<the run's id
digits>`: the id is fixed by the run, so a retry after a crash between the upload and the
record finds the upload there instead of making a second one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from service.errors import ArtifactError, NotFoundError, SpecError
from service.generators.spec import GeneratorTrainingSpec
from service.generators.train import (
    CHECKPOINT_DIR,
    GENERATOR_FILE,
    SAMPLES_FILE,
    SNAPSHOT_DIR,
    STATE_FILE,
    TENSORS_FILE,
    TrainConfig,
    TrainData,
    train_generator,
    training_data,
)
from service.jobs.records import UPLOAD_PREFIXES, UploadRecord
from service.jobs.types import JobContext, JobResult, Progress
from service.storage import ArtifactStore

log = logging.getLogger("gradleak.generators")

HISTORY_JSON = "history.json"
TRAINING_JSON = "training.json"  # the run's summary: steps, timings, device, the upload made
# the artifacts a run writes, besides samples/step-NNNNNNN.png (one grid per checkpoint)
CHECKPOINT_STATE = f"{CHECKPOINT_DIR}/{STATE_FILE}"
CHECKPOINT_TENSORS = f"{CHECKPOINT_DIR}/{TENSORS_FILE}"

# register(tenant-free): (upload id, generator bytes) -> the upload record
Register = Callable[[str, bytes], UploadRecord]


def train_config(spec: GeneratorTrainingSpec) -> TrainConfig:
    return TrainConfig(
        data=spec.data.source if spec.data.source != "images" else "upload",
        steps=spec.steps,
        batch_size=spec.batch_size,
        seed=spec.seed,
        image_size=spec.image_size,
        channels=spec.channels,
        conditional=spec.conditional,
        latent_dim=spec.latent_dim,
        width=spec.width,
        lr=spec.lr,
        loss=spec.loss,
        augment=spec.augment,
        ema=spec.ema,
        per_class=spec.data.per_class,
    )


def generator_upload_id(run_id: str) -> str:
    """The generator upload a training run makes: `gen_` and the run's id digits."""
    return f"{UPLOAD_PREFIXES['generator']}_{run_id.split('_', 1)[1]}"


def image_set(data: dict[str, torch.Tensor], spec: GeneratorTrainingSpec, ref: str) -> TrainData:
    """An uploaded image set as training data: resized to the generator's side (area averaging
    when shrinking) and to its channels (luma for grey, repeated for colour)."""
    images = data.get("images")
    if images is None or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ArtifactError(f"image set {ref} needs a tensor 'images' (N, C, H, W) with C 1 or 3")
    x = images.float()
    side = spec.image_size
    if tuple(x.shape[-2:]) != (side, side):
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    if x.shape[1] == 3 and spec.channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif x.shape[1] == 1 and spec.channels == 3:
        x = x.repeat(1, 3, 1, 1)
    x = x.clamp(0, 1)
    labels = data.get("labels")
    classes = None
    if labels is not None:
        labels = labels.long().flatten()
        if len(labels) != len(x) or bool((labels < 0).any()):
            raise ArtifactError(f"image set {ref}: 'labels' must be {len(x)} class indices (0 or more)")
        classes = int(labels.max()) + 1
    if spec.conditional and labels is None:
        raise SpecError(
            f"conditional is true but image set {ref} has no labels: upload it with 'labels', or train "
            "an unconditional generator"
        )
    return TrainData(x, labels, classes, f"upload:{ref}")


def load_training_images(spec: GeneratorTrainingSpec, resolve: Callable[[str], bytes]) -> TrainData:
    if spec.data.source == "images":
        from service.tensorio import load_safetensors

        assert spec.data.images is not None
        raw = load_safetensors(
            resolve(spec.data.images),
            allowed_dtypes=("F16", "BF16", "F32", "F64", "I64", "I32"),
            name="images",
        )
        return image_set(raw, spec, spec.data.images)
    return training_data(train_config(spec))


def _restore_checkpoint(store: ArtifactStore, prefix: str, scratch: Path) -> Path | None:
    """The last stored checkpoint of an earlier try, copied into the scratch folder; None when
    there is none (a first try, or one that died before its first checkpoint)."""
    if not store.exists(f"{prefix}/{CHECKPOINT_STATE}") or not store.exists(f"{prefix}/{CHECKPOINT_TENSORS}"):
        return None
    folder = scratch / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TENSORS_FILE).write_bytes(store.get_bytes(f"{prefix}/{CHECKPOINT_TENSORS}"))
    (folder / STATE_FILE).write_bytes(store.get_bytes(f"{prefix}/{CHECKPOINT_STATE}"))
    return folder


class _Mirror:
    """Copies each checkpoint from the scratch folder to the artifact store, the training state
    last: a stored state.json always names tensors that are there in full."""

    def __init__(self, store: ArtifactStore, prefix: str, scratch: Path) -> None:
        self.store, self.prefix, self.scratch = store, prefix, scratch
        self.artifacts: dict[str, str] = {}

    def put(self, name: str, content_type: str) -> None:
        key = f"{self.prefix}/{name}"
        self.store.put_bytes(key, (self.scratch / name).read_bytes(), content_type)
        self.artifacts[name] = key

    def __call__(self, step: int) -> None:
        self.put(f"{SNAPSHOT_DIR}/step-{step:07d}.png", "image/png")
        self.put(SAMPLES_FILE, "image/png")
        self.put(GENERATOR_FILE, "application/octet-stream")
        self.put(CHECKPOINT_TENSORS, "application/octet-stream")
        self.put(CHECKPOINT_STATE, "application/json")

    def known(self) -> None:
        """Artifacts of earlier tries (their sample grids) count as this run's too."""
        for key in self.store.list(self.prefix + "/"):
            self.artifacts.setdefault(key[len(self.prefix) + 1 :], key)


def run_generator_training(
    spec: GeneratorTrainingSpec, ctx: JobContext, register: Register | None = None
) -> JobResult:
    """Train, checkpointing to the store; on success register the generator (see the module)."""
    t0 = time.monotonic()
    stop = ctx.should_stop or (lambda: False)
    config = train_config(spec)

    def report(p: Progress) -> None:
        if ctx.progress is not None:
            ctx.progress(p)

    report(Progress("setup", total=spec.steps, message="loading the training images"))
    data = load_training_images(spec, ctx.resolve)
    if spec.conditional and data.num_classes is None:
        raise SpecError(f"training data {data.trained_on} has no labels: a conditional generator needs them")

    def on_log(row: dict[str, float]) -> None:
        eta = row["eta_s"]
        eta_text = "" if not eta < float("inf") else f", ETA {eta:.0f} s"
        report(
            Progress(
                "training",
                iteration=int(row["step"]),
                total=spec.steps,
                elapsed_s=row["elapsed_s"],
                message=f"step {int(row['step'])}/{spec.steps}: D loss {row['d_loss']:.3f}, "
                f"G loss {row['g_loss']:.3f}, {row['steps_per_s']:.2f} steps/s{eta_text}",
            )
        )

    with tempfile.TemporaryDirectory(prefix="gradleak-gen-") as tmp:
        scratch = Path(tmp)
        mirror = _Mirror(ctx.store, ctx.prefix, scratch)
        resume = _restore_checkpoint(ctx.store, ctx.prefix, scratch)
        resumed_from = None if resume is None else _step_of(resume)
        mirror.known()
        remaining = (
            None if spec.time_limit_s is None else max(spec.time_limit_s - (time.monotonic() - t0), 0.0)
        )
        lines: list[str] = []
        result = train_generator(
            config,
            scratch,
            resume=resume,
            checkpoint_every=spec.checkpoint_every,
            log_every=max(1, min(50, spec.steps // 20)),
            device=ctx.device,
            time_limit_s=remaining,
            log=lines.append,
            data=data,
            should_stop=stop,
            on_log=on_log,
            on_checkpoint=mirror,
        )
        generator = (scratch / GENERATOR_FILE).read_bytes()
    history = json.dumps(result.history, indent=1).encode()
    ctx.store.put_bytes(f"{ctx.prefix}/{HISTORY_JSON}", history, "application/json")
    mirror.artifacts[HISTORY_JSON] = f"{ctx.prefix}/{HISTORY_JSON}"
    manifest: dict[str, Any] = {
        "kind": "generator_training",
        "spec": json.loads(spec.to_json()),
        "generator": result.manifest.model_dump(mode="json"),
        "steps": result.steps,
        "steps_requested": spec.steps,
        "ended": "cancelled"
        if result.stopped
        else ("all steps" if result.steps >= spec.steps else "time limit"),
        "resumed_from_step": resumed_from,
        "images": len(data.images),
        "trained_on": data.trained_on,
        "timings": {
            "this_try_s": round(time.monotonic() - t0, 3),
            "training_s": round(result.total_elapsed_s, 3),
            "cpu_s": round(result.total_cpu_s, 3),
        },
        "device": str(ctx.device or ("cuda" if torch.cuda.is_available() else "cpu")),
        "versions": {"torch": torch.__version__},
        "generator_sha256": hashlib.sha256(generator).hexdigest(),
        "generator_id": None,
        "log_tail": lines[-5:],
    }
    if result.stopped:
        report(Progress("done", iteration=result.steps, total=spec.steps, message="stopped"))
        return _result("cancelled", manifest, ctx, mirror.artifacts)
    if register is not None:
        record = register(generator_upload_id(ctx.job_id), generator)
        manifest["generator_id"] = record.id
    report(
        Progress(
            "done",
            iteration=result.steps,
            total=spec.steps,
            elapsed_s=result.total_elapsed_s,
            message=f"{result.steps} steps; generator {manifest['generator_id'] or GENERATOR_FILE}",
        )
    )
    return _result("succeeded", manifest, ctx, mirror.artifacts)


def _step_of(folder: Path) -> int:
    return int(json.loads((folder / STATE_FILE).read_text())["step"])


def _result(status: Any, manifest: dict[str, Any], ctx: JobContext, artifacts: dict[str, str]) -> JobResult:
    body = json.dumps(manifest, indent=1).encode()
    ctx.store.put_bytes(f"{ctx.prefix}/{TRAINING_JSON}", body, "application/json")
    return JobResult(status, manifest, {**artifacts, TRAINING_JSON: f"{ctx.prefix}/{TRAINING_JSON}"})


def store_generator(
    state: Any, store: ArtifactStore, tenant: str, upload_id: str, data: bytes, retention_s: float
) -> UploadRecord:
    """Store generator bytes as the tenant's upload `upload_id`, checked as an uploaded generator
    is (a refused file leaves nothing behind)."""
    from service.jobs.uploads import check_generator_upload

    tensors, metadata, sha256 = check_generator_upload(io.BytesIO(data), len(data))
    folder = f"{tenant}/uploads/{upload_id}"
    now = time.time()
    record = UploadRecord(
        id=upload_id,
        tenant=tenant,
        kind="generator",
        key=f"{folder}/data.safetensors",
        size=len(data),
        sha256=sha256,
        metadata=metadata,
        tensors=tensors,
        created_at=now,
        expires_at=now + retention_s,
    )
    store.put_bytes(record.key, data)
    try:
        state.add_upload(record)
    except BaseException:
        store.delete_prefix(folder)
        raise
    return record


def registrar(state: Any, store: ArtifactStore, tenant: str, retention_s: float) -> Register:
    """`register` for a service run: stores the generator as the tenant's upload `upload_id`, or
    returns that upload when an earlier try of the run made it."""

    def register(upload_id: str, data: bytes) -> UploadRecord:
        try:
            existing: UploadRecord = state.get_upload(tenant, upload_id)
            return existing
        except NotFoundError:
            pass
        record = store_generator(state, store, tenant, upload_id, data, retention_s)
        log.info("generator upload %s made by a training run", upload_id)
        return record

    return register


def training_runner(
    state: Any, store: ArtifactStore, tenant: str, retention_s: float
) -> Callable[..., JobResult]:
    """The runner `execute_job` uses for a training record: `run_generator_training` that
    registers its generator as the tenant's upload."""
    register = registrar(state, store, tenant, retention_s)

    def run(spec: object, ctx: JobContext) -> JobResult:
        assert isinstance(spec, GeneratorTrainingSpec)
        return run_generator_training(spec, ctx, register)

    return run
