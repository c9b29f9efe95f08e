"""What a tenant uploads (a model's weights, a client's update, the client's own images for
scoring), the metadata that comes with each, and the checks each passes before it is stored.

The checks are the runner's own (tensorio's safetensors header checks, the architecture registry,
`match_state`), run at upload time so that a bad file is refused with a clear 4xx instead of
failing a job later. They read the file in one streamed pass (values checked chunk by chunk,
the architecture built on the meta device), so the API's memory does not grow with the upload's
size. They import torch, lazily: importing this module does not.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.errors import ArtifactError, SpecError
from service.settings import Settings
from service.specs import (
    MAX_IMAGE_SIDE,
    Budget,
    ClientTraining,
    DataSpec,
    JsonScalar,
    ModelSpec,
    Normalization,
)

GROUND_TRUTH_DTYPES = ("F16", "BF16", "F32", "F64", "I64", "I32")


def refuse_non_finite(value: Any, where: str = "") -> Any:
    """JSON parsers accept NaN and Infinity, and a bound like `gt=0` lets Infinity through: refuse
    them anywhere in a request (a `mode="before"` validator)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where or 'a number'} must be finite, got {value}")
    if isinstance(value, dict):
        for key, item in value.items():
            refuse_non_finite(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            refuse_non_finite(item, f"{where}[{i}]")
    return value


class UploadMeta(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _finite(cls, data: Any) -> Any:
        return refuse_non_finite(data)


class ModelUpload(UploadMeta):
    """A model as the server sent it to the client, and the data it takes.

    `format` safetensors: the file holds the weights of a registered architecture (`arch`,
    `knobs`). `format` onnx: the file is the model itself, an ONNX graph with its weights
    (converted to torch, never unpickled); the update's tensors are named like its initializers.
    """

    format: Literal["safetensors", "onnx"] = Field(
        default="safetensors",
        description="safetensors (weights of a registered arch) or onnx (graph and weights)",
    )
    arch: str | None = Field(
        default=None,
        description="registered architecture name, see GET /v1/catalog; 'onnx' or left out for onnx",
    )
    knobs: dict[str, JsonScalar | list[int]] = Field(default_factory=dict, description="constructor knobs")
    source: str | None = Field(
        default=None, description="arch 'module' only: the torch module of this process (embedded SDK)"
    )
    image_shape: tuple[int, int, int] = Field(default=(3, 32, 32), description="C, H, W of one input image")
    num_classes: Annotated[int, Field(ge=2, le=100_000)] = 10

    @model_validator(mode="after")
    def _check(self) -> ModelUpload:
        if self.format == "onnx" and (self.arch not in (None, "onnx") or self.knobs or self.source):
            raise ValueError("an onnx model is the graph itself: leave out arch, knobs and source")
        if self.format == "safetensors" and self.arch in (None, "onnx"):
            raise ValueError(
                "give the architecture (arch) the safetensors weights belong to, or format 'onnx'"
            )
        self.model_spec("check")
        self.data_spec()
        return self

    def data_spec(self) -> DataSpec:
        return DataSpec(shape=self.image_shape, num_classes=self.num_classes)

    def model_spec(self, upload: str | None = None) -> ModelSpec:
        """The ModelSpec of this upload; `upload` names its file (None: the architecture alone)."""
        if self.format == "onnx":
            return ModelSpec(arch="onnx", source=upload or "")
        assert self.arch is not None  # _check
        return ModelSpec(arch=self.arch, knobs=self.knobs, weights=upload, source=self.source)


class UpdateUpload(UploadMeta):
    """A client's shared update and what the server knows about how it was made."""

    model_id: str = Field(description="the model upload (mdl_...) the client trained")
    kind: Literal["gradient", "delta", "weights"] = Field(
        description="gradient (FedSGD), delta = w_new - w_old, or weights = w_new"
    )
    client: ClientTraining = Field(
        default_factory=ClientTraining,
        description="the client's training facts; leave out what is unknown",
    )
    image_shape: tuple[int, int, int] | None = Field(
        default=None, description="C, H, W of the client's images; default (and must agree with) the model's"
    )
    num_classes: int | None = Field(default=None, description="default (and must agree with) the model's")
    normalization: Literal["cifar10", "cifar100", "imagenet", "none"] | Normalization = Field(
        default="cifar10", description="how the client normalised its images"
    )
    num_images: Annotated[int, Field(ge=1, le=256)] | None = Field(
        default=None, description="how many images the update covers, if known"
    )
    labels: list[int] | None = Field(
        default=None, description="the client's labels, if the server knows them"
    )

    def data_spec(self, model: ModelUpload) -> DataSpec:
        for name, ours, theirs in (
            ("image_shape", self.image_shape, model.image_shape),
            ("num_classes", self.num_classes, model.num_classes),
        ):
            if ours is not None and ours != theirs:
                raise SpecError(f"update metadata: {name} {ours} disagrees with the model's {theirs}")
        try:
            return DataSpec(
                shape=model.image_shape,
                num_classes=model.num_classes,
                normalization=self.normalization,
                num_images=self.num_images,
                labels=self.labels,
            )
        except ValidationError as e:
            raise SpecError("update metadata: " + "; ".join(err["msg"] for err in e.errors())) from None


class GroundTruthUpload(UploadMeta):
    """No metadata is needed: the file holds `images` (N, C, H, W) in [0, 1] and optional `labels` (N,).
    `purpose` "image_set" marks a set of many images (a verdict's proxy data, a generator's training
    images), which may hold up to the server's `max_image_set_images` instead of a job's batch."""

    purpose: Literal["scoring", "image_set"] = Field(
        default="scoring",
        description="scoring: a client's batch, scored against (at most a job's batch size); image_set: "
        "many images from the platform's domain (proxy data, generator training)",
    )


class GeneratorUpload(UploadMeta):
    """No metadata is needed: a generator file carries its manifest (architecture, latent size,
    image shape, classes, training data) in its safetensors metadata, see service/generators."""


@dataclass(frozen=True)
class Limits:
    """What one job may ask for. Every tenant has the server's limits for now."""

    max_batch_size: int
    max_iterations: int
    max_restarts: int
    max_time_limit_s: float
    default_time_limit_s: float
    worker_memory_bytes: int
    max_federation_client_rounds: int = 5_000
    max_federation_clients: int = 10_000
    max_federation_time_limit_s: float = 24 * 3600.0
    default_federation_time_limit_s: float = 6 * 3600.0
    max_federation_parameter_rounds: float = 1e11

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_batch_size=settings.max_batch_size,
            max_iterations=settings.max_iterations,
            max_restarts=settings.max_restarts,
            max_time_limit_s=settings.max_time_limit_s,
            default_time_limit_s=min(settings.default_time_limit_s, settings.max_time_limit_s),
            worker_memory_bytes=settings.worker_memory_bytes,
            max_federation_client_rounds=settings.max_federation_client_rounds,
            max_federation_clients=settings.max_federation_clients,
            max_federation_time_limit_s=settings.max_federation_time_limit_s,
            default_federation_time_limit_s=min(
                settings.default_federation_time_limit_s, settings.max_federation_time_limit_s
            ),
            max_federation_parameter_rounds=settings.max_federation_parameter_rounds,
        )

    def check_batch(self, what: str, count: int | None) -> None:
        if count is not None and count > self.max_batch_size:
            raise SpecError(f"{what} is {count}; this server's limit is {self.max_batch_size} images per job")

    def check_budget(self, budget: Budget, where: str = "budget") -> None:
        """Refuse an attack budget above the server's iterations, restarts or time limit."""
        if budget.iterations > self.max_iterations:
            raise SpecError(
                f"{where}.iterations is {budget.iterations}; this server's limit is {self.max_iterations}"
            )
        if budget.restarts > self.max_restarts:
            raise SpecError(
                f"{where}.restarts is {budget.restarts}; this server's limit is {self.max_restarts}"
            )
        if budget.time_limit_s is not None and budget.time_limit_s > self.max_time_limit_s:
            raise SpecError(
                f"{where}.time_limit_s is {budget.time_limit_s:g}; "
                f"this server's limit is {self.max_time_limit_s:g} s"
            )


def _meta_model(meta: ModelUpload) -> Any:
    """The architecture on the meta device: names and shapes to check a file against, built
    without memory or arithmetic whatever the model's size."""
    import torch

    from service.models import build_model

    with torch.device("meta"):
        return build_model(meta.model_spec(), meta.data_spec())


def check_model_upload(f: BinaryIO, size: int, meta: ModelUpload, settings: Settings) -> tuple[int, str]:
    """Check weights against the architecture as a job would load them (every floating-point
    state entry, names and shapes exact), in one streamed pass; return the tensor count and sha256.

    An ONNX model is read whole (it is bounded by `settings.max_onnx_bytes`), converted and checked
    for the second-order gradient the attacks take, within `settings.onnx_check_timeout_s`."""
    from service.tensorio import STATE_DTYPES, match_state, scan_safetensors

    if meta.format == "onnx":
        if size > settings.max_onnx_bytes:
            raise ArtifactError(
                f"the ONNX file exceeds this server's limit of {settings.max_onnx_bytes} bytes"
            )
        data = f.read()
        f.seek(0)
        return _check_onnx(data, meta, settings), hashlib.sha256(data).hexdigest()
    model = _meta_model(meta)
    tensors, sha256 = scan_safetensors(f, size, allowed_dtypes=STATE_DTYPES, name="model.weights")
    match_state(model, tensors, what="weights")
    return len(tensors), sha256


def _check_onnx(data: bytes, meta: ModelUpload, settings: Settings) -> int:
    def check() -> int:
        from service.models.onnx import check_second_order, onnx_module

        model = onnx_module(data, meta.data_spec(), max_nodes=settings.max_onnx_nodes)
        check_second_order(model, meta.data_spec())
        return len(model.state_dict())

    # Conversion is bounded by the size and node limits; the deadline bounds the wait. A check
    # that outlives it finishes in its (daemon) thread, and its result is dropped.
    result: list[int | BaseException] = []
    worker = threading.Thread(target=lambda: result.append(_capture(check)), daemon=True, name="onnx-check")
    worker.start()
    worker.join(settings.onnx_check_timeout_s)
    if not result:
        raise ArtifactError(
            f"converting and checking the ONNX model took longer than {settings.onnx_check_timeout_s:g} s"
        )
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _capture(fn: Callable[[], int]) -> int | BaseException:
    try:
        return fn()
    except BaseException as e:  # handed to the request's thread, which raises it
        return e


def check_update_upload(
    f: BinaryIO,
    size: int,
    meta: UpdateUpload,
    model: ModelUpload,
    limits: Limits,
    resolve: Callable[[str], bytes],
) -> tuple[int, str]:
    """Check an update against its model and the batch limits, in one streamed pass; return the
    tensor count and sha256. `resolve` gives the model upload's file (an ONNX model's graph)."""
    from service.models import build_model
    from service.tensorio import STATE_DTYPES, match_state, scan_safetensors

    meta.data_spec(model)
    limits.check_batch("num_images", meta.num_images)
    limits.check_batch("the number of labels", None if meta.labels is None else len(meta.labels))
    limits.check_batch("client.batch_size", meta.client.batch_size)
    limits.check_batch("client.num_samples", meta.client.num_samples)
    # as the runner reads it: a delta or weights may carry integer buffers (num_batches_tracked)
    tensors, sha256 = scan_safetensors(f, size, allowed_dtypes=STATE_DTYPES, name="update")
    if model.format == "onnx":
        built = build_model(model.model_spec(meta.model_id), model.data_spec(), resolve=resolve)
    else:
        built = _meta_model(model)
    match_state(built, tensors, what=meta.kind)
    return len(tensors), sha256


def check_ground_truth_upload(
    f: BinaryIO, size: int, limits: Limits, max_images: int | None = None
) -> tuple[int, dict[str, Any], str]:
    """Check the client's images and labels in one streamed pass; return the tensor count, what a
    job needs to know, and the sha256. `max_images`: an image set's limit instead of a job's batch."""
    from service.tensorio import scan_safetensors

    out_of_range = False

    def in_unit_range(name: str, values: Any) -> None:
        nonlocal out_of_range
        if name == "images" and values.numel() and (bool(values.min() < 0) or bool(values.max() > 1)):
            out_of_range = True

    tensors, sha256 = scan_safetensors(
        f, size, allowed_dtypes=GROUND_TRUTH_DTYPES, name="ground truth", visit=in_unit_range
    )
    images = tensors.get("images")
    if images is None:
        raise ArtifactError("ground truth needs a tensor named 'images' (N, C, H, W) with values in [0, 1]")
    if images.dim() != 4 or images.shape[1] not in (1, 3) or not images.is_floating_point():
        raise ArtifactError(
            "ground truth 'images' must be floating point (N, C, H, W) with C 1 or 3; "
            f"got shape {list(images.shape)}"
        )
    n, c, h, w = images.shape
    if not (8 <= h <= MAX_IMAGE_SIDE and 8 <= w <= MAX_IMAGE_SIDE):
        raise ArtifactError(f"ground truth images are {h}x{w}; image sides must lie in 8..{MAX_IMAGE_SIDE}")
    if max_images is None:
        limits.check_batch("the number of ground-truth images", int(n))
    elif n > max_images:
        raise ArtifactError(f"the image set holds {n} images; this server's limit is {max_images}")
    if n == 0 or out_of_range:
        raise ArtifactError("ground truth 'images' must hold at least one image, with values in [0, 1]")
    labels = tensors.get("labels")
    if labels is not None and (labels.is_floating_point() or labels.dim() != 1 or len(labels) != n):
        raise ArtifactError(
            f"ground truth 'labels' must be integers of shape [{n}]; got {list(labels.shape)}"
        )
    unexpected = sorted(set(tensors) - {"images", "labels"})
    if unexpected:
        raise ArtifactError(
            f"ground truth holds 'images' and 'labels' only; unexpected: {', '.join(unexpected)}"
        )
    info = {
        "num_images": int(n),
        "image_shape": [int(c), int(h), int(w)],
        "has_labels": labels is not None,
        "purpose": "scoring" if max_images is None else "image_set",
    }
    return len(tensors), info, sha256


def check_generator_upload(f: BinaryIO, size: int) -> tuple[int, dict[str, Any], str]:
    """Check a generator file as a job would load it (the manifest, the architecture it names,
    every tensor's name, shape and floating-point dtype), in one streamed pass; return the
    tensor count, the manifest (as the upload's metadata) and the sha256."""
    from service.generators import check_generator_file

    manifest, tensors, sha256 = check_generator_file(f, size)
    return tensors, manifest.model_dump(mode="json"), sha256
