"""From a request to a stored job: build the JobSpec from uploads, check it against the
registries, the tenant's limits and its uploads, and make the job record.

Everything here runs before a job is queued, so that a spec the runner would refuse is refused
with a 4xx instead of becoming a failed job. The registry checks import the engine (torch)
lazily; the architecture is checked on torch's meta device (service/jobs/budget.py), so a large
model costs the API no memory and no arithmetic, and its memory estimate is checked against the
worker memory setting.
"""

from __future__ import annotations

import time

from service.errors import NotFoundError, SpecError
from service.federations.spec import FederationSpec
from service.generators.spec import GeneratorTrainingSpec
from service.jobs.budget import ProfileFn
from service.jobs.records import (
    FEDERATION_PREFIX,
    JOB_PREFIX,
    TRAINING_PREFIX,
    UPLOAD_PREFIXES,
    JobRecord,
    UploadRecord,
    new_id,
)
from service.jobs.state import StateStore
from service.jobs.uploads import Limits, ModelUpload, UpdateUpload
from service.settings import Settings
from service.specs import AttackParams, Budget, DefenseSpec, JobSpec, Knowledge, UpdateSpec, VerdictSpec

# (where in the spec, which kind of upload it must name)
REFERENCES = (
    ("model.weights", "model"),
    ("model.source", "model"),
    ("update.artifact", "update"),
    ("ground_truth", "ground_truth"),
    ("verdict.proxy_data", "ground_truth"),  # an image set named as proxy data
    ("attack.generator", "generator"),  # the generator of a latent-space attack (level 2)
)


def spec_from_uploads(
    *,
    model: UploadRecord,
    update: UploadRecord,
    ground_truth: UploadRecord | None = None,
    attack: AttackParams | None = None,
    knowledge: Knowledge | None = None,
    defenses: list[DefenseSpec] | None = None,
    budget: Budget | None = None,
    seed: int = 0,
    verdict: VerdictSpec | None = None,
) -> JobSpec:
    """The JobSpec the uploads' metadata describe, with the attack and verdict settings of the request."""
    model_meta = ModelUpload.model_validate(model.metadata)
    update_meta = UpdateUpload.model_validate(update.metadata)
    if update_meta.model_id != model.id:
        raise SpecError(f"update {update.id} was uploaded for model {update_meta.model_id}, not {model.id}")
    fields: dict = {
        "model": model_meta.model_spec(model.id),
        "update": UpdateSpec(kind=update_meta.kind, artifact=update.id, client=update_meta.client),
        "data": update_meta.data_spec(model_meta),
        "ground_truth": None if ground_truth is None else ground_truth.id,
        "defenses": defenses or [],
        "seed": seed,
    }
    if attack is not None:
        fields["attack"] = attack
    if knowledge is not None:
        fields["knowledge"] = knowledge
    if budget is not None:
        fields["budget"] = budget
    if verdict is not None:
        fields["verdict"] = verdict
    return JobSpec(**fields)


def check_spec(spec: JobSpec, limits: Limits, profile_fn: ProfileFn | None = None) -> JobSpec:
    """Refuse what the runner would refuse or the tenant may not ask for; return the spec with the
    server's defaults filled in (the time limit). `profile_fn` profiles the model (default: here,
    on the meta device; the API passes its Profiler)."""
    from service.attacks import ATTACKS
    from service.data.photos import resolve_photo_name
    from service.defenses import DEFENSES
    from service.jobs.budget import check_memory, model_profile

    spec.check_knowledge()
    ATTACKS.get(spec.attack.name)
    for defense in spec.defenses:
        DEFENSES.get(defense.name)

    sim = spec.update.simulate
    if sim is not None:
        if sim.source != "photos" or sim.path is not None:
            raise SpecError(
                "the service simulates clients on the bundled sample photos only (update.simulate.source "
                "'photos', no path); to audit real data, upload the client's update"
            )
        limits.check_batch("the number of simulated images", len(sim.images))
        for name in sim.images:
            resolve_photo_name(name)
    data, client = spec.data, spec.update.client
    limits.check_batch("data.num_images", data.num_images)
    limits.check_batch("the number of data.labels", None if data.labels is None else len(data.labels))
    limits.check_batch("update.client.batch_size", client.batch_size)
    limits.check_batch("update.client.num_samples", client.num_samples)

    budget = spec.budget.time_bound(limits.max_iterations)
    limits.check_budget(budget)
    verdict = spec.verdict
    if verdict.budget is not None:
        # a shadow time limit alone also runs until its time is up (capped like the attack's)
        shadow_budget = verdict.budget.time_bound(limits.max_iterations)
        limits.check_budget(shadow_budget)
        verdict = verdict.model_copy(update={"budget": shadow_budget})
    if not 0 <= spec.seed < 2**63:
        raise SpecError(f"seed must lie in 0..{2**63 - 1}")
    # Architecture, knobs and image size as the runner will build them (on the meta device), and
    # the job's estimated peak memory against what a worker may use.
    check_memory(spec, limits.worker_memory_bytes, profile_fn=profile_fn or model_profile)
    if budget.time_limit_s is None:
        budget = budget.model_copy(update={"time_limit_s": limits.default_time_limit_s})
    return spec.model_copy(update={"budget": budget, "verdict": verdict})


def check_references(spec: JobSpec, tenant: str, state: StateStore) -> None:
    """Every upload the spec names must be the tenant's, of the right kind, and agree with the spec."""
    refs = {
        "model.weights": spec.model.weights,
        # an ONNX model's graph is a model upload; a module's source is a key of this process
        "model.source": spec.model.source if spec.model.arch == "onnx" else None,
        "update.artifact": spec.update.artifact,
        "ground_truth": spec.ground_truth,
        "verdict.proxy_data": spec.verdict.proxy_data,
        "attack.generator": getattr(spec.attack, "generator", None),
    }
    for where, kind in REFERENCES:
        ref = refs[where]
        if ref is None:
            continue
        upload = get_upload_of_kind(state, tenant, ref, kind, where)
        if kind == "model":
            _check_model(spec, where, ModelUpload.model_validate(upload.metadata), ref)
        elif kind == "generator":
            _check_generator(spec, where, upload.metadata, ref)
        elif kind == "update":
            meta = UpdateUpload.model_validate(upload.metadata)
            if meta.kind != spec.update.kind:
                raise SpecError(
                    f"{where} {ref} is a {meta.kind} update; the spec says update.kind {spec.update.kind!r}"
                )
            try:
                model = state.get_upload(tenant, meta.model_id)
            except NotFoundError:
                continue  # its model is gone; the runner checks the update against the spec's model
            _check_model(
                spec, f"the model of {where}", ModelUpload.model_validate(model.metadata), meta.model_id
            )
        else:
            shape, count = tuple(upload.metadata["image_shape"]), upload.metadata["num_images"]
            if shape != spec.data.shape:
                raise SpecError(
                    f"{where} {ref} holds images of shape {list(shape)}; "
                    f"data.shape is {list(spec.data.shape)}"
                )
            if where == "ground_truth" and spec.data.num_images is not None and count != spec.data.num_images:
                raise SpecError(
                    f"{where} {ref} holds {count} images; data.num_images is {spec.data.num_images}"
                )


def get_upload_of_kind(state: StateStore, tenant: str, ref: str, kind: str, where: str) -> UploadRecord:
    """The tenant's upload `ref`, which must be of `kind`; `where` names the field that gave it."""
    try:
        upload = state.get_upload(tenant, ref)
    except NotFoundError:
        raise NotFoundError(
            f"{where}: no upload {ref!r} (deleted, past its retention, or never uploaded)"
        ) from None
    if upload.kind != kind:
        raise SpecError(
            f"{where} names a {upload.kind} upload ({ref}); "
            f"it needs a {kind} upload ({UPLOAD_PREFIXES[kind]}_...)"
        )
    return upload


def _check_model(spec: JobSpec, where: str, meta: ModelUpload, ref: str) -> None:
    ours = (spec.model.arch, spec.model.knobs, spec.model.source, spec.data.shape, spec.data.num_classes)
    model = meta.model_spec(ref if meta.format == "onnx" else None)
    theirs = (model.arch, model.knobs, model.source, meta.image_shape, meta.num_classes)
    if ours != theirs:
        raise SpecError(
            f"{where} {ref} is a {model.arch} (knobs {meta.knobs}) for {_shape(meta.image_shape)} images and "
            f"{meta.num_classes} classes; the spec asks for a {spec.model.arch} "
            f"(knobs {spec.model.knobs}) for "
            f"{_shape(spec.data.shape)} images and {spec.data.num_classes} classes"
        )


def _check_generator(spec: JobSpec, where: str, manifest: dict, ref: str) -> None:
    """The generator's images must be the data's (and a conditional one's classes), as the runner
    checks again when it loads the file."""
    shape = tuple(manifest["image_shape"])
    if shape != spec.data.shape:
        raise SpecError(
            f"{where} {ref} makes images of shape {_shape(shape)} but data.shape is "
            f"{_shape(spec.data.shape)}: use a generator trained at the client's image size"
        )
    classes = manifest.get("num_classes")
    if classes is not None and classes != spec.data.num_classes:
        raise SpecError(
            f"{where} {ref} is conditioned on {classes} classes but data.num_classes is "
            f"{spec.data.num_classes}"
        )


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def new_job(
    spec: JobSpec | FederationSpec | GeneratorTrainingSpec,
    tenant: str,
    settings: Settings,
    *,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    max_running_jobs: int | None = None,
) -> JobRecord:
    """The stored record of a new job, a federation (id prefix fed_) or a generator training
    run (gtr_)."""
    now = time.time()
    prefix = JOB_PREFIX
    if isinstance(spec, FederationSpec):
        prefix = FEDERATION_PREFIX
    elif isinstance(spec, GeneratorTrainingSpec):
        prefix = TRAINING_PREFIX
    return JobRecord(
        id=new_id(prefix),
        tenant=tenant,
        spec_json=spec.to_json(),
        created_at=now,
        updated_at=now,
        expires_at=now + settings.retention_hours * 3600.0,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        max_running_jobs=max_running_jobs,
    )


def check_generator_training(
    spec: GeneratorTrainingSpec, tenant: str, state: StateStore, settings: Settings
) -> GeneratorTrainingSpec:
    """Refuse a training run the worker would refuse, before it is queued: an image set that is not
    the tenant's ground-truth upload, a conditional generator without labels, a time limit over
    the server's. Return the spec with the server's default time limit filled in."""
    data = spec.data
    if spec.conditional and data.source == "faces":
        raise SpecError(
            "the shipped faces have no labels: a conditional generator needs data.source 'patches' "
            "or a labelled image set"
        )
    if data.images is not None:
        upload = get_upload_of_kind(state, tenant, data.images, "ground_truth", "data.images")
        if spec.conditional and not upload.metadata.get("has_labels"):
            raise SpecError(
                f"data.images {data.images} has no labels: a conditional generator needs them "
                "(upload the set with a 'labels' tensor), or set conditional false"
            )
    limit = spec.time_limit_s
    if limit is None:
        limit = min(settings.default_training_time_limit_s, settings.max_training_time_limit_s)
        return spec.model_copy(update={"time_limit_s": limit})
    if limit > settings.max_training_time_limit_s:
        raise SpecError(
            f"time_limit_s is {limit:g} s; this server's limit is {settings.max_training_time_limit_s:g} s "
            "per training run"
        )
    return spec
