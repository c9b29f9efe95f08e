"""What the service checks before it queues a federation: everything the loop would refuse, and
the tenant's limits, so that a bad spec is a 422 instead of a failed federation. For the patch
task the partition is checked from the labels alone, without loading a pixel."""

from __future__ import annotations

from service.errors import SpecError
from service.federations.spec import FederationSpec
from service.jobs.budget import ProfileFn
from service.jobs.state import StateStore
from service.jobs.uploads import Limits, ModelUpload


def check_federation(
    spec: FederationSpec, limits: Limits, profile_fn: ProfileFn | None = None
) -> FederationSpec:
    """Refuse what the loop would refuse or the tenant may not ask for; return the spec with the
    server's default time limit filled in. `profile_fn` profiles the model off the request's
    thread (the API's Profiler); by default here."""
    from service.attacks import ATTACKS
    from service.data.photos import resolve_photo_name
    from service.defenses import DEFENSES
    from service.federations.data import check_shards, partition, train_labels
    from service.federations.loop import audit_job, client_training, data_spec
    from service.jobs.budget import check_memory, model_profile

    if spec.data.source != "patches":
        raise SpecError(
            "the service trains federations on the bundled photo-patch task (data.source 'patches'); "
            "train on CIFAR or an image folder with `gradleak federation run` on a machine that has them"
        )
    photos = spec.data.patch_photos()
    for name in photos:
        resolve_photo_name(name)
    spec.check_knowledge()
    ATTACKS.get(spec.audit.attack.name)
    for defense in spec.defenses:
        DEFENSES.get(defense.name)
    profile = (profile_fn or model_profile)(spec.model, data_spec(spec, len(photos)))

    if spec.num_clients > limits.max_federation_clients:
        raise SpecError(
            f"num_clients is {spec.num_clients}; this server's limit is {limits.max_federation_clients}"
        )
    if spec.client_rounds() > limits.max_federation_client_rounds:
        raise SpecError(
            f"clients_per_round x rounds is {spec.client_rounds()} local trainings; this server's limit is "
            f"{limits.max_federation_client_rounds}"
        )
    parameters = profile.parameters
    if parameters * spec.client_rounds() > limits.max_federation_parameter_rounds:
        raise SpecError(
            f"{spec.model.arch} has {parameters:,} parameters; trained {spec.client_rounds()} times that is "
            f"{parameters * spec.client_rounds():.3g} parameter-trainings, over this server's limit of "
            f"{limits.max_federation_parameter_rounds:.3g}: use fewer rounds or clients, or a smaller model"
        )
    shards = partition(train_labels(spec), spec.num_clients, spec.partition, spec.seed)  # type: ignore[arg-type]
    check_shards(shards, spec)
    if spec.audit.rounds:
        audited = [shards[spec.audit.client]] if spec.audit.client is not None else shards
        largest = max(len(s) for s in audited)
        limits.check_batch("the audited client's samples", largest)
        job = audit_job(spec, client_training(spec, largest, 0, 1), data_spec(spec, len(photos)), 1)
        check_memory(job, limits.worker_memory_bytes, profile_fn=profile_fn or model_profile)
    limits.check_budget(spec.audit.budget, "audit.budget")
    if spec.audit.verdict.budget is not None:
        limits.check_budget(spec.audit.verdict.budget, "audit.verdict.budget")

    time_limit = spec.time_limit_s
    if time_limit is not None and time_limit > limits.max_federation_time_limit_s:
        raise SpecError(
            f"time_limit_s is {time_limit:g}; this server's limit for a federation is "
            f"{limits.max_federation_time_limit_s:g} s"
        )
    if time_limit is None:
        spec = spec.model_copy(update={"time_limit_s": limits.default_federation_time_limit_s})
    return spec


def check_initial_weights(spec: FederationSpec, tenant: str, state: StateStore) -> None:
    """model.weights, when given, must be one of the tenant's model uploads for this architecture."""
    from service.jobs.submit import get_upload_of_kind

    if spec.model.weights is None:
        return
    upload = get_upload_of_kind(state, tenant, spec.model.weights, "model", "model.weights")
    meta = ModelUpload.model_validate(upload.metadata)
    data = spec.data
    ours = (
        spec.model.arch,
        spec.model.knobs,
        (data.channels, data.size, data.size),
        len(data.patch_photos()),
    )
    theirs = (meta.arch, meta.knobs, tuple(meta.image_shape), meta.num_classes)
    if ours != theirs:
        raise SpecError(
            f"model.weights {spec.model.weights} is a {meta.arch} (knobs {meta.knobs}) for "
            f"{list(meta.image_shape)} images and {meta.num_classes} classes; the federation trains a "
            f"{spec.model.arch} (knobs {spec.model.knobs}) on {list(ours[2])} images of {ours[3]} classes"
        )
