"""Uploads: a model's weights, a client's update, the client's own images (for scoring only).

Each is one multipart/form-data request with a `file` part (the safetensors bytes, or for a
model the ONNX file) and a `metadata` part (a JSON object), e.g.

    curl -H "Authorization: Bearer $KEY" -F file=@weights.safetensors \\
         -F 'metadata={"arch": "lenet", "image_shape": [3, 32, 32], "num_classes": 10}' \\
         http://127.0.0.1:8731/v1/models

A file is checked the way a job would use it before anything is stored; a refused upload
leaves nothing behind. The file part is spooled to a temporary file as it arrives, checked in
one streamed pass and streamed to the artifact store, so the API's memory does not grow with an
upload's size; the tenant's stored bytes are checked against its quota first. Uploads are
private data: they are never logged and are deleted after the retention period.
"""

from __future__ import annotations

import os
import time
from typing import Annotated, Any, BinaryIO, TypeVar

from fastapi import APIRouter, File, Form, Response, UploadFile, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from api.deps import Caller, CallerDep, RuntimeDep, Tenant
from api.errors import ApiError, validation_errors
from api.runtime import Runtime
from api.schemas import (
    GeneratorList,
    GeneratorOut,
    GroundTruthOut,
    ModelOut,
    UpdateOut,
    UploadOut,
    upload_out,
)
from service.errors import NotFoundError
from service.jobs.quotas import check_storage_quota
from service.jobs.records import UPLOAD_PREFIXES, UploadKind, UploadRecord, is_id, new_id
from service.jobs.submit import get_upload_of_kind
from service.jobs.uploads import (
    GeneratorUpload,
    GroundTruthUpload,
    ModelUpload,
    UpdateUpload,
    check_generator_upload,
    check_ground_truth_upload,
    check_model_upload,
    check_update_upload,
)

router = APIRouter(prefix="/v1", tags=["uploads"])

UPLOAD_PATHS = ("/v1/models", "/v1/updates", "/v1/ground-truth", "/v1/generators")
FileField = Annotated[UploadFile, File(description="the safetensors file")]


M = TypeVar("M", bound=BaseModel)


def _metadata(cls: type[M], text: str | None) -> M:
    try:
        return cls.model_validate_json(text or "{}")
    except ValidationError as e:
        raise RequestValidationError(validation_errors(list(e.errors()), ("body", "metadata"))) from None


def _spooled(file: UploadFile, rt: Runtime, caller: Caller) -> tuple[BinaryIO, int]:
    """The uploaded file (spooled to disk by the multipart parser) and its size, within the
    upload limit and the tenant's storage quota."""
    f = file.file
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    limit = rt.settings.max_upload_bytes
    if size > limit:
        raise ApiError(
            413, f"the file exceeds this server's upload limit of {limit} bytes", code="payload_too_large"
        )
    check_storage_quota(rt.state, caller.tenant, caller.quotas, size)
    return f, size


def _store(
    rt: Runtime,
    tenant: str,
    kind: UploadKind,
    file: tuple[BinaryIO, int, str],
    metadata: dict[str, Any],
    tensors: int,
    suffix: str = "safetensors",
) -> UploadRecord:
    f, size, sha256 = file
    upload_id = new_id(UPLOAD_PREFIXES[kind])
    folder = f"{tenant}/uploads/{upload_id}"
    now = time.time()
    record = UploadRecord(
        id=upload_id,
        tenant=tenant,
        kind=kind,
        key=f"{folder}/data.{suffix}",
        size=size,
        sha256=sha256,
        metadata=metadata,
        tensors=tensors,
        created_at=now,
        expires_at=now + rt.settings.retention_hours * 3600.0,
    )
    rt.store.put_file(record.key, f, size)
    try:
        rt.state.add_upload(record)
    except BaseException:
        rt.store.delete_prefix(folder)
        raise
    rt.metrics.uploads.labels(kind).inc()
    rt.metrics.upload_bytes.labels(kind).inc(size)
    return record


def _created(response: Response, path: str, record: UploadRecord) -> UploadOut:
    response.headers["Location"] = f"/v1/{path}/{record.id}"
    return upload_out(record)


def _get(rt: Runtime, tenant: str, upload_id: str, kind: UploadKind) -> UploadRecord:
    # The id's prefix names its kind, so a well-formed id of this kind is the only one to look up.
    if not is_id(upload_id, UPLOAD_PREFIXES[kind]):
        raise NotFoundError(f"no {kind.replace('_', ' ')} upload {upload_id!r}")
    return rt.state.get_upload(tenant, upload_id)


def _delete(rt: Runtime, tenant: str, upload_id: str, kind: UploadKind) -> None:
    record = _get(rt, tenant, upload_id, kind)
    rt.state.delete_upload(tenant, record.id)
    rt.store.delete_prefix(record.key.rsplit("/", 1)[0])


@router.post(
    "/models", status_code=status.HTTP_201_CREATED, response_model=ModelOut, summary="Upload a model"
)
def upload_model(
    rt: RuntimeDep,
    caller: CallerDep,
    response: Response,
    file: FileField,
    metadata: Annotated[
        str, Form(description="JSON: format, arch, knobs, image_shape, num_classes (ModelUpload)")
    ],
) -> UploadOut:
    """The model the server sent to the client: the weights (safetensors) of a registered
    architecture, which must fit it exactly (422 lists the first mismatches), or the model itself
    as ONNX (`format: onnx`), whose operators must be ones the attacks can differentiate twice
    (422 lists the others). An ONNX model's parameters are named like its initializers."""
    meta = _metadata(ModelUpload, metadata)
    f, size = _spooled(file, rt, caller)
    tensors, sha256 = check_model_upload(f, size, meta, rt.settings)
    record = _store(
        rt, caller.tenant, "model", (f, size, sha256), meta.model_dump(mode="json"), tensors, meta.format
    )
    return _created(response, "models", record)


@router.post(
    "/updates",
    status_code=status.HTTP_201_CREATED,
    response_model=UpdateOut,
    summary="Upload a client update",
)
def upload_update(
    rt: RuntimeDep,
    caller: CallerDep,
    response: Response,
    file: FileField,
    metadata: Annotated[
        str,
        Form(description="JSON: model_id, kind, client, normalization, num_images, labels (UpdateUpload)"),
    ],
) -> UploadOut:
    """What a client shared (gradient, delta or new weights) for an uploaded model, and what the
    server knows of the client's training (each fact may be unknown)."""
    meta = _metadata(UpdateUpload, metadata)
    model = get_upload_of_kind(rt.state, caller.tenant, meta.model_id, "model", "metadata.model_id")
    f, size = _spooled(file, rt, caller)
    tensors, sha256 = check_update_upload(
        f,
        size,
        meta,
        ModelUpload.model_validate(model.metadata),
        rt.limits,
        resolve=lambda _: rt.store.get_bytes(model.key),
    )
    record = _store(rt, caller.tenant, "update", (f, size, sha256), meta.model_dump(mode="json"), tensors)
    return _created(response, "updates", record)


@router.post(
    "/ground-truth",
    status_code=status.HTTP_201_CREATED,
    response_model=GroundTruthOut,
    summary="Upload ground truth",
)
def upload_ground_truth(
    rt: RuntimeDep,
    caller: CallerDep,
    response: Response,
    file: FileField,
    metadata: Annotated[
        str | None, Form(description='JSON object; none needed, {"purpose": "image_set"} for an image set')
    ] = None,
) -> UploadOut:
    """The client's own images (`images`, N x C x H x W in [0, 1]) and optional `labels` (N),
    used only to score a reconstruction; attacks never see them. With metadata
    `{"purpose": "image_set"}` it is instead a set of many images from the platform's own domain
    (a verdict's proxy data, a generator training run's images), up to the server's
    `max_image_set_images`."""
    meta = _metadata(GroundTruthUpload, metadata)
    f, size = _spooled(file, rt, caller)
    many = rt.settings.max_image_set_images if meta.purpose == "image_set" else None
    tensors, info, sha256 = check_ground_truth_upload(f, size, rt.limits, many)
    record = _store(rt, caller.tenant, "ground_truth", (f, size, sha256), info, tensors)
    return _created(response, "ground-truth", record)


@router.post(
    "/generators",
    status_code=status.HTTP_201_CREATED,
    response_model=GeneratorOut,
    summary="Upload a generator",
)
def upload_generator(
    rt: RuntimeDep,
    caller: CallerDep,
    response: Response,
    file: FileField,
    metadata: Annotated[str | None, Form(description="JSON object; none needed (GeneratorUpload)")] = None,
) -> UploadOut:
    """A generator for the generative attacks (knowledge level 2): safetensors weights of a
    registered generator architecture with its manifest in the safetensors metadata (key
    `gradleak.generator`), e.g. the OUT/generator.safetensors of `gradleak generator train`.
    The weights must fit the architecture the manifest names exactly (422 lists the first
    mismatches). A job names it by its id (gen_...)."""
    _metadata(GeneratorUpload, metadata)
    f, size = _spooled(file, rt, caller)
    tensors, manifest, sha256 = check_generator_upload(f, size)
    record = _store(rt, caller.tenant, "generator", (f, size, sha256), manifest, tensors)
    return _created(response, "generators", record)


@router.get("/generators", response_model=GeneratorList, summary="The tenant's generators")
def list_generators(rt: RuntimeDep, tenant: Tenant) -> GeneratorList:
    """The tenant's generator uploads, newest first (at most 100), each with its manifest."""
    records = rt.state.list_uploads(tenant, "generator", limit=100)
    return GeneratorList(
        generators=[GeneratorOut.model_validate(upload_out(r).model_dump()) for r in records]
    )


@router.get("/generators/{generator_id}", response_model=GeneratorOut, summary="A generator upload")
def get_generator(generator_id: str, rt: RuntimeDep, tenant: Tenant) -> UploadOut:
    return upload_out(_get(rt, tenant, generator_id, "generator"))


@router.delete(
    "/generators/{generator_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a generator upload"
)
def delete_generator(generator_id: str, rt: RuntimeDep, tenant: Tenant) -> None:
    _delete(rt, tenant, generator_id, "generator")


@router.get("/models/{model_id}", response_model=ModelOut, summary="A model upload")
def get_model(model_id: str, rt: RuntimeDep, tenant: Tenant) -> UploadOut:
    return upload_out(_get(rt, tenant, model_id, "model"))


@router.get("/updates/{update_id}", response_model=UpdateOut, summary="An update upload")
def get_update(update_id: str, rt: RuntimeDep, tenant: Tenant) -> UploadOut:
    return upload_out(_get(rt, tenant, update_id, "update"))


@router.get("/ground-truth/{ground_truth_id}", response_model=GroundTruthOut, summary="A ground-truth upload")
def get_ground_truth(ground_truth_id: str, rt: RuntimeDep, tenant: Tenant) -> UploadOut:
    return upload_out(_get(rt, tenant, ground_truth_id, "ground_truth"))


@router.delete("/models/{model_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a model upload")
def delete_model(model_id: str, rt: RuntimeDep, tenant: Tenant) -> None:
    _delete(rt, tenant, model_id, "model")


@router.delete(
    "/updates/{update_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete an update upload"
)
def delete_update(update_id: str, rt: RuntimeDep, tenant: Tenant) -> None:
    _delete(rt, tenant, update_id, "update")


@router.delete(
    "/ground-truth/{ground_truth_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a ground-truth upload",
)
def delete_ground_truth(ground_truth_id: str, rt: RuntimeDep, tenant: Tenant) -> None:
    _delete(rt, tenant, ground_truth_id, "ground_truth")
