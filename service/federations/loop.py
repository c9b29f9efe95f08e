"""FedAvg over rounds, with test accuracy and IGSA per round and attacks on chosen rounds.

Round r (1-based): the server sends the global model w_{r-1} to a seeded sample of clients; each
trains on its shard exactly as `service.fl.simulate_client` does (FedSGD: the gradient of its
whole shard; FedAvg: local epochs of mini-batch SGD), applies the spec's defenses to what it
shares, and shares it. The server turns each update into a weight change (FedSGD: -lr x gradient),
averages the changes weighted by sample counts, and steps w_r = w_{r-1} + server_lr x mean.
Batch-norm running statistics are averaged the same way (a FedSGD client's moved with its forward
pass). After the round: accuracy and loss on the held-out test set, and IGSA of w_{r-1} on a fixed
probe batch of test images.

An audited round attacks the audited client's update of that round, the very tensors it shared
(defenses included), through the one job runner: a JobSpec whose model is w_{r-1}, whose update
is the shared tensors and whose ground truth is the client's shard; the attacker is told the
client's training facts and sample count (a FedAvg server receives sample counts to weight by).
Nothing here is a second attack engine.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from service.defenses import apply_defenses
from service.errors import GradleakError
from service.federations.data import check_shards, load_dataset, partition
from service.federations.outputs import write_outputs
from service.federations.spec import FederationSpec
from service.fl import client_loss, float_state, simulate_client, training_mode
from service.jobs.types import GRID_PNG, METRICS_JSON, JobContext, JobResult, Progress
from service.metrics.igsa import igsa
from service.models import build_model
from service.specs import ClientTraining, DataSpec, JobSpec, ModelSpec, UpdateSpec
from service.tensorio import save_safetensors

PROBE_IMAGES = 8  # test images IGSA is measured on every round
EVAL_CHUNK = 256
# refs an audit's JobSpec uses for tensors the federation holds in memory
SENT_REF, UPDATE_REF, TRUTH_REF = "fed:model-sent", "fed:update", "fed:client-data"


def data_spec(spec: FederationSpec, num_classes: int) -> DataSpec:
    d = spec.data
    return DataSpec(
        shape=(d.channels, d.size, d.size), num_classes=num_classes, normalization=d.normalization
    )


def checkpoint_name(round_: int) -> str:
    return f"checkpoints/round-{round_:03d}.safetensors"


def round_prefix(round_: int) -> str:
    return f"rounds/round-{round_:03d}"


@dataclass
class _Shared:
    """What one client shared in one round, and the facts of how it was made."""

    client: int
    update: dict[str, torch.Tensor]  # parameters (defended) in the update's kind
    buffers: dict[str, torch.Tensor]  # change of the float buffers (BN running statistics)
    training: ClientTraining


@dataclass
class _State:
    rows: list[dict[str, Any]] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)


def run_federation(spec: FederationSpec, ctx: JobContext) -> JobResult:
    from service.jobs.runner import device_info, pick_device, versions

    started = time.monotonic()
    spec.check_knowledge()
    emit = ctx.progress or (lambda _p: None)
    stop = ctx.should_stop or (lambda: False)
    emit(Progress(stage="setup", total=spec.rounds, message="loading the data and dealing it to the clients"))

    device = pick_device(ctx.device)
    dataset = load_dataset(spec)
    shards = partition(dataset.train_labels, spec.num_clients, spec.partition, spec.seed)
    check_shards(shards, spec)
    dspec = data_spec(spec, len(dataset.classes))
    norm = dspec.resolved_normalization()
    model = build_model(spec.model, dspec, resolve=ctx.resolve).to(device)
    mean = torch.tensor(norm.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(norm.std, device=device).view(1, -1, 1, 1)
    train_x = dataset.train_images.to(device)
    train_xn = (train_x - mean) / std
    train_y = dataset.train_labels.to(device)
    test_xn = (dataset.test_images.to(device) - mean) / std
    test_y = dataset.test_labels.to(device)
    probe = slice(0, min(PROBE_IMAGES, len(test_y)))
    rng = np.random.default_rng(spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)
    checkpoints = set(spec.checkpoints())
    audits = set(spec.audit.rounds)
    state = _State()
    chance = float(torch.bincount(test_y).max()) / len(test_y)  # always guessing the commonest class
    setup_s = time.monotonic() - started

    def save(name: str, data: bytes, content_type: str) -> None:
        key = f"{ctx.prefix}/{name}"
        ctx.store.put_bytes(key, data, content_type)
        state.artifacts[name] = key

    def grid_for(round_: int) -> bytes | None:
        key = state.artifacts.get(f"{round_prefix(round_)}/{GRID_PNG}")
        return None if key is None else ctx.store.get_bytes(key)

    if 0 in checkpoints:
        save(
            checkpoint_name(0),
            save_safetensors(float_state(model), {"round": "0"}),
            "application/octet-stream",
        )
    initial = _evaluate(model, test_xn, test_y)
    status: Literal["succeeded", "cancelled"] = "succeeded"
    for r in range(1, spec.rounds + 1):
        if stop():
            status = "cancelled"
            break
        t0 = time.monotonic()
        selected = _sample(rng, spec, r)
        sent = float_state(model)
        sent_model = copy.deepcopy(model)
        shared: list[_Shared] = []
        for c in selected:
            if stop():
                break
            idx = shards[c].to(device)
            shared.append(_client_round(spec, sent_model, train_xn[idx], train_y[idx], c, r, generator))
        if len(shared) < len(selected):
            status = "cancelled"
            break
        train_loss = _mean_train_loss(
            sent_model, spec, [(train_xn[shards[s.client]], train_y[shards[s.client]]) for s in shared]
        )
        _aggregate(model, shared, [len(shards[s.client]) for s in shared], spec.server_lr)
        accuracy, loss = _evaluate(model, test_xn, test_y)
        t_igsa = time.monotonic()
        probe_igsa = igsa(
            sent_model,
            test_xn[probe],
            test_y[probe],
            samples=spec.audit.igsa_samples,
            radius=spec.audit.igsa_radius,
            bn_mode=spec.client.bn_mode,
            generator=torch.Generator().manual_seed(spec.seed + r),
        )
        row: dict[str, Any] = {
            "round": r,
            "clients": selected,
            "test_accuracy": accuracy,
            "test_loss": loss,
            "train_loss": train_loss,
            "update_norm": _mean_norm([s.update for s in shared]),
            "igsa": probe_igsa.score,
            "igsa_sensitivity": probe_igsa.sensitivity,
            "igsa_s": time.monotonic() - t_igsa,
            "train_s": t_igsa - t0,
        }
        if r in checkpoints:
            save(
                checkpoint_name(r),
                save_safetensors(float_state(model), {"round": str(r)}),
                "application/octet-stream",
            )
        if r in audits:
            target = _audited(spec, shared)
            idx = shards[target.client].to(device)
            row.update(
                _audit(
                    spec,
                    ctx,
                    r,
                    sent,
                    sent_model,
                    target,
                    train_x[idx],
                    train_xn[idx],
                    train_y[idx],
                    dspec,
                    state.artifacts,
                )
            )
            if row.get("audit_status") == "cancelled":
                status = "cancelled"
        row["round_s"] = time.monotonic() - t0
        state.rows.append(row)
        message = f"round {r}/{spec.rounds}: test accuracy {accuracy:.3f}, IGSA {probe_igsa.score:.3f}"
        if "psnr_mean" in row:
            message += f", attack PSNR {row['psnr_mean']:.1f} dB"
        emit(Progress(stage="training", iteration=r, total=spec.rounds, loss=train_loss,
                      elapsed_s=time.monotonic() - started, message=message))  # fmt: skip
        write_outputs(spec, state.rows, initial, save, final=False, grid_for=grid_for, chance=chance)
        if status == "cancelled":
            break

    emit(
        Progress(stage="scoring", iteration=len(state.rows), total=spec.rounds, message="writing the report")
    )
    write_outputs(spec, state.rows, initial, save, final=True, grid_for=grid_for, chance=chance)
    last = state.rows[-1] if state.rows else None
    manifest = {
        "job_id": ctx.job_id,
        "kind": "federation",
        "status": status,
        "spec": json.loads(spec.to_json()),
        "seed": spec.seed,
        "versions": versions(),
        "device": device_info(device),
        "timings": {
            "setup_s": setup_s,
            "total_s": time.monotonic() - started,
            "mean_round_s": _mean([row["train_s"] for row in state.rows]),
        },
        "data": {
            "source": spec.data.source,
            "classes": dataset.classes,
            "train_samples": len(dataset.train_labels),
            "test_samples": len(dataset.test_labels),
            "client_samples": [len(s) for s in shards],
        },
        "rounds_completed": len(state.rows),
        "initial": {"test_accuracy": initial[0], "test_loss": initial[1]},
        "final": None if last is None else {k: last[k] for k in ("round", "test_accuracy", "test_loss")},
        "rounds": state.rows,
        "artifacts": dict(state.artifacts),
    }
    save(METRICS_JSON, json.dumps(manifest, indent=2).encode(), "application/json")
    manifest["artifacts"] = dict(state.artifacts)
    emit(
        Progress(
            stage="done", iteration=len(state.rows), total=spec.rounds, elapsed_s=time.monotonic() - started
        )
    )
    return JobResult(status=status, manifest=manifest, artifacts=dict(state.artifacts))


# --------------------------------------------------------------------------------------------
# one round
# --------------------------------------------------------------------------------------------


def _sample(rng: np.random.Generator, spec: FederationSpec, round_: int) -> list[int]:
    """The clients of a round (sorted); the audited client always takes part in an audited round."""
    chosen = sorted(rng.choice(spec.num_clients, size=spec.per_round, replace=False).tolist())
    forced = spec.audit.client
    if forced is not None and round_ in spec.audit.rounds and forced not in chosen:
        chosen[-1] = forced  # replaces the highest-numbered pick: the round's size stays
        chosen.sort()
    return chosen


def client_training(spec: FederationSpec, num_samples: int, client: int, round_: int) -> ClientTraining:
    """The facts of one client's local training in one round (its shuffle seed differs per round)."""
    local = spec.client
    fedsgd = local.protocol == "fedsgd"
    return ClientTraining(
        protocol=local.protocol,
        lr=local.lr,
        local_epochs=1 if fedsgd else local.local_epochs,
        batch_size=num_samples if fedsgd else min(local.batch_size or num_samples, num_samples),
        num_samples=num_samples,
        momentum=local.momentum,
        bn_mode=local.bn_mode,
        shuffle_seed=(spec.seed * 1_000_003 + round_ * 10_007 + client) % 2**31,
    )


def _client_round(
    spec: FederationSpec,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    client: int,
    round_: int,
    generator: torch.Generator,
) -> _Shared:
    training = client_training(spec, len(y), client, round_)
    kind: Literal["gradient", "delta"] = "gradient" if training.protocol == "fedsgd" else "delta"
    out = simulate_client(model, x, y, training, kind)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    params = {n: v for n, v in out.items() if n in trainable}
    if kind == "gradient":
        buffers = _bn_buffer_change(model, x, training.bn_mode or "train")
    else:
        buffers = {n: v for n, v in out.items() if n not in trainable}
    if spec.defenses:
        params = apply_defenses(params, list(spec.defenses), generator)
    return _Shared(client, params, buffers, training)


def _bn_buffer_change(model: nn.Module, x: torch.Tensor, bn_mode: str) -> dict[str, torch.Tensor]:
    """How a FedSGD client's forward pass moves the float buffers (BN running statistics)."""
    if not any(b.is_floating_point() for b in model.buffers()):
        return {}
    work = copy.deepcopy(model)
    before = {n: b.detach().clone() for n, b in work.named_buffers() if b.is_floating_point()}
    with torch.no_grad(), training_mode(work, bn_mode):  # type: ignore[arg-type]
        work(x)
    after = dict(work.named_buffers())
    return {n: after[n].detach() - v for n, v in before.items()}


def _aggregate(model: nn.Module, shared: list[_Shared], counts: list[int], server_lr: float) -> None:
    """w <- w + server_lr x sum_k n_k change_k / sum_k n_k, over parameters and float buffers."""
    total = float(sum(counts))
    state = model.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            if not value.is_floating_point():
                continue
            mean = torch.zeros_like(value)
            for s, n in zip(shared, counts, strict=True):
                mean += (n / total) * _weight_change(s, name)
            value += server_lr * mean


def _weight_change(s: _Shared, name: str) -> torch.Tensor:
    if name in s.update:
        v = s.update[name]
        return -s.training.lr * v if s.training.protocol == "fedsgd" else v  # type: ignore[operator]
    return s.buffers[name]


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of the model in eval mode."""
    was = model.training
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(y), EVAL_CHUNK):
            logits = model(x[i : i + EVAL_CHUNK])
            target = y[i : i + EVAL_CHUNK]
            correct += int((logits.argmax(1) == target).sum())
            loss += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
    model.train(was)
    return correct / len(y), loss / len(y)


def _mean_train_loss(
    model: nn.Module, spec: FederationSpec, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> float:
    """The clients' loss on their own shards under the model they were sent (their local objective
    at the start of the round), weighted by sample count."""
    work = copy.deepcopy(model)
    total, n = 0.0, 0
    with torch.no_grad(), training_mode(work, spec.client.bn_mode):
        for x, y in batches:
            total += float(client_loss(work(x), y)) * len(y)
            n += len(y)
    return total / n


def _mean_norm(updates: list[dict[str, torch.Tensor]]) -> float | None:
    return _mean([math.sqrt(sum(float(v.double().square().sum()) for v in u.values())) for u in updates])


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# --------------------------------------------------------------------------------------------
# the audit of one round
# --------------------------------------------------------------------------------------------


def audit_job(spec: FederationSpec, training: ClientTraining, dspec: DataSpec, round_: int) -> JobSpec:
    """The attack job of an audited round: the model the server sent, the update the client
    shared (kind by its protocol) with its training facts told, scored against its shard."""
    return JobSpec(
        model=ModelSpec(arch=spec.model.arch, knobs=spec.model.knobs, weights=SENT_REF),
        update=UpdateSpec(
            kind="gradient" if training.protocol == "fedsgd" else "delta",
            artifact=UPDATE_REF,
            client=training,
        ),
        data=dspec.model_copy(update={"num_images": training.num_samples}),
        knowledge=spec.audit.knowledge,
        attack=spec.audit.attack,
        budget=spec.audit.budget,
        seed=spec.seed + round_,
        ground_truth=TRUTH_REF,
        verdict=spec.audit.verdict,
    )


def _audited(spec: FederationSpec, shared: list[_Shared]) -> _Shared:
    want = spec.audit.client
    return next(s for s in shared if want is None or s.client == want)


def _audit(
    spec: FederationSpec,
    ctx: JobContext,
    round_: int,
    sent: dict[str, torch.Tensor],
    sent_model: nn.Module,
    target: _Shared,
    images: torch.Tensor,
    images_normalised: torch.Tensor,
    labels: torch.Tensor,
    dspec: DataSpec,
    artifacts: dict[str, str],
) -> dict[str, Any]:
    from service.jobs.runner import run_job

    audit = spec.audit
    t = time.monotonic()
    client_igsa = igsa(
        sent_model,
        images_normalised,
        labels,
        samples=audit.igsa_samples,
        radius=audit.igsa_radius,
        bn_mode=spec.client.bn_mode,
        generator=torch.Generator().manual_seed(spec.seed + round_),
    )
    igsa_s = time.monotonic() - t
    kind: Literal["gradient", "delta"] = "gradient" if target.training.protocol == "fedsgd" else "delta"
    shared = dict(target.update)
    if kind == "delta":
        shared.update(target.buffers)
    blobs = {
        SENT_REF: save_safetensors({k: v.cpu() for k, v in sent.items()}),
        UPDATE_REF: save_safetensors({k: v.detach().cpu().contiguous() for k, v in shared.items()}),
        TRUTH_REF: save_safetensors(
            {"images": images.cpu().contiguous(), "labels": labels.cpu().contiguous()}
        ),
    }
    job = audit_job(spec, target.training, dspec, round_)
    prefix = round_prefix(round_)
    emit = ctx.progress

    def progress(p: Progress) -> None:
        if emit is not None and p.stage in ("attack", "scoring"):
            emit(Progress(p.stage, p.iteration, p.total, p.loss, p.elapsed_s, p.restart,
                          f"round {round_}: attacking client {target.client}'s update"))  # fmt: skip

    def resolve(ref: str) -> bytes:
        if ref in blobs:
            return blobs[ref]
        raise GradleakError(f"a federation's audit cannot read {ref!r}")

    sub = JobContext(
        job_id=f"{ctx.job_id}/{prefix}",
        store=ctx.store,
        prefix=f"{ctx.prefix}/{prefix}",
        resolve=resolve,
        progress=progress,
        should_stop=ctx.should_stop,
        device=ctx.device,
        lpips_weights_dir=ctx.lpips_weights_dir,
        memory_limit_bytes=ctx.memory_limit_bytes,
    )
    t = time.monotonic()
    result = run_job(job, sub)
    for name, key in result.artifacts.items():
        artifacts[f"{prefix}/{name}"] = key
    if "attack" not in result.manifest:  # stopped before the attack had a result
        return {"audited_client": target.client, "audit_status": result.status}
    iterations = result.manifest["attack"]["iterations"]
    out: dict[str, Any] = {
        "audited_client": target.client,
        "audit_status": result.status,
        "audit_images": len(labels),
        "audit_s": time.monotonic() - t,
        "attack_iterations": iterations,
        "igsa_client": client_igsa.score,
        "igsa_client_sensitivity": client_igsa.sensitivity,
        "igsa_client_s": igsa_s,
        "attack_s_per_iteration": result.manifest["timings"]["attack_s"] / max(1, iterations),
    }
    metrics = result.manifest.get("metrics")
    if metrics:
        mean, worst = metrics["mean"], metrics["worst_case"]
        out.update(
            psnr_mean=mean["psnr"],
            psnr_worst=worst["psnr"],
            ssim_mean=mean["ssim"],
            ssim_worst=worst["ssim"],
            lpips_mean=mean.get("lpips"),
            label_accuracy=(metrics.get("label_accuracy") or {}).get("multiset"),
        )
    estimate = result.manifest.get("estimate")
    if estimate and "psnr" in estimate:  # verdict.when: always; the estimate beside the truth
        worst, mean = estimate["psnr"]["worst_case"], estimate["psnr"]["mean"]
        out.update(
            estimate_psnr_worst=worst["value"],
            estimate_psnr_worst_interval=worst["interval"],
            estimate_psnr_mean=mean["value"],
            estimate_exact=worst.get("exact"),
        )
    return out
