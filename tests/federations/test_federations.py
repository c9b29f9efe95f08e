"""Federations: aggregation, the clients inside the loop, partitions, audits, checkpoints, outputs,
cancellation and the errors a user sees before anything runs."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from service.errors import GradleakError, SpecError
from service.federations.data import check_shards, load_dataset, partition, train_labels
from service.federations.loop import _aggregate, _Shared, checkpoint_name, client_training, data_spec
from service.federations.spec import FederationSpec, LocalTraining, Partition
from service.fl import float_state, simulate_client
from service.jobs.runner import run_job
from service.jobs.types import JobContext, Progress
from service.models import build_model
from service.specs import ClientTraining, JobSpec
from service.storage import LocalStore
from service.tensorio import load_safetensors

SMALL = {
    "model": {"arch": "mlp"},
    "data": {"per_class": 6, "size": 16, "photos": ["astronaut", "coffee", "chelsea"]},
    "num_clients": 4,
    "rounds": 2,
    "client": {"protocol": "fedavg", "lr": 0.1, "batch_size": 2},
}


def small(**changes: object) -> FederationSpec:
    return FederationSpec.model_validate({**SMALL, **changes})


def run(spec: FederationSpec, tmp_path: Path, **ctx: object) -> tuple[dict, LocalStore]:
    store = LocalStore(tmp_path)
    context = JobContext(job_id="fed", store=store, prefix="fed", resolve=lambda ref: b"", **ctx)  # type: ignore[arg-type]
    result = run_job(spec, context)
    return {"status": result.status, **result.manifest}, store


# --- aggregation ---------------------------------------------------------------------------------


def test_fedavg_aggregation_equals_the_hand_computed_weighted_average() -> None:
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.fill_(0.5)

    def shared(protocol: str, lr: float, w: list[float], b: float) -> _Shared:
        training = ClientTraining(protocol=protocol, lr=lr)  # type: ignore[arg-type]
        return _Shared(0, {"weight": torch.tensor([w]), "bias": torch.tensor([b])}, {}, training)

    # a FedAvg client shares a weight change; a FedSGD client a gradient, which moves w by -lr x g
    clients = [shared("fedavg", 0.1, [0.3, -0.6], 0.9), shared("fedsgd", 0.5, [2.0, 4.0], -1.0)]
    _aggregate(model, clients, counts=[1, 3], server_lr=2.0)
    # mean change: (1 x [0.3, -0.6] + 3 x (-0.5 x [2, 4])) / 4 = [-0.675, -1.65]; bias (0.9 + 1.5) / 4 = 0.6
    assert torch.allclose(model.weight, torch.tensor([[1.0 - 1.35, 2.0 - 3.3]]))
    assert torch.allclose(model.bias, torch.tensor([0.5 + 1.2]))


@pytest.mark.parametrize(
    "arch",
    [{"arch": "mlp"}, {"arch": "convnet", "knobs": {"width": 4, "depth": 2, "batchnorm": True}}],
    ids=["mlp", "convnet-bn"],
)
def test_the_loop_trains_every_client_as_service_fl_simulates_it(tmp_path: Path, arch: dict) -> None:
    """Round 1's global model is the sample-weighted mean of what service.fl's simulated clients
    share (BN running statistics included), computed here from the same shards, seeds and model,
    outside the loop."""
    spec = small(rounds=1, checkpoint_rounds=[0, 1], model=arch)
    manifest, store = run(spec, tmp_path)
    dataset = load_dataset(spec)
    shards = partition(dataset.train_labels, spec.num_clients, spec.partition, spec.seed)
    dspec = data_spec(spec, len(dataset.classes))
    model = build_model(spec.model, dspec)
    norm = dspec.resolved_normalization()
    mean, std = torch.tensor(norm.mean).view(1, -1, 1, 1), torch.tensor(norm.std).view(1, -1, 1, 1)
    x = (dataset.train_images - mean) / std

    expected = {k: v.clone() for k, v in float_state(model).items()}
    total = sum(len(s) for s in shards)
    for c, idx in enumerate(shards):
        training = client_training(spec, len(idx), c, 1)
        delta = simulate_client(model, x[idx], dataset.train_labels[idx], training, "delta")
        for k in expected:
            expected[k] += len(idx) / total * delta[k]

    stored = load_safetensors(store.path(f"fed/{checkpoint_name(1)}").read_bytes())
    assert stored.keys() == expected.keys()
    assert any("running_mean" in k for k in stored) == (arch["arch"] == "convnet")
    for k in expected:
        assert torch.allclose(stored[k], expected[k], atol=1e-6), k
    assert manifest["rounds"][0]["clients"] == [0, 1, 2, 3]


def test_fedsgd_clients_share_gradients_and_the_server_steps_by_lr(tmp_path: Path) -> None:
    spec = small(rounds=1, client={"protocol": "fedsgd", "lr": 0.5, "batch_size": None})
    _, store = run(spec, tmp_path)
    dataset = load_dataset(spec)
    shards = partition(dataset.train_labels, spec.num_clients, spec.partition, spec.seed)
    dspec = data_spec(spec, len(dataset.classes))
    model = build_model(spec.model, dspec)
    norm = dspec.resolved_normalization()
    mean, std = torch.tensor(norm.mean).view(1, -1, 1, 1), torch.tensor(norm.std).view(1, -1, 1, 1)
    x = (dataset.train_images - mean) / std
    total = sum(len(s) for s in shards)
    expected = {k: v.clone() for k, v in float_state(model).items()}
    for c, idx in enumerate(shards):
        g = simulate_client(
            model, x[idx], dataset.train_labels[idx], client_training(spec, len(idx), c, 1), "gradient"
        )
        for k in g:
            expected[k] -= 0.5 * len(idx) / total * g[k]
    stored = load_safetensors(store.path(f"fed/{checkpoint_name(1)}").read_bytes())
    for k in expected:
        assert torch.allclose(stored[k], expected[k], atol=1e-6), k


# --- partitions and checks -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_a_partition_deals_every_sample_once_and_is_seeded(kind: str) -> None:
    labels = torch.arange(5).repeat_interleave(40)
    part = Partition(kind=kind, alpha=0.3)  # type: ignore[arg-type]
    shards = partition(labels, 7, part, seed=3)
    assert sorted(torch.cat(shards).tolist()) == list(range(200))
    again = partition(labels, 7, part, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(shards, again, strict=True))
    other = partition(labels, 7, part, seed=4)
    assert any(not torch.equal(a, b) for a, b in zip(shards, other, strict=True))
    sizes = [len(s) for s in shards]
    if kind == "iid":
        assert max(sizes) - min(sizes) <= 1
    else:  # small alpha: clients see few classes
        classes_seen = [len(set(labels[s].tolist())) for s in shards if len(s)]
        assert min(classes_seen) < 5


def test_the_patch_task_partition_is_known_without_loading_pixels() -> None:
    spec = small()
    assert torch.equal(train_labels(spec), load_dataset(spec).train_labels)  # type: ignore[arg-type]


def test_a_partition_that_leaves_a_client_empty_is_refused_naming_it() -> None:
    spec = small(num_clients=20, client={"protocol": "fedsgd", "batch_size": None})
    shards = partition(train_labels(spec), spec.num_clients, spec.partition, spec.seed)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match=r"leaves client\(s\) \[15, 16, 17, 18, 19\] with no sample"):
        check_shards(shards, spec)


def test_a_batch_size_above_a_clients_samples_is_refused() -> None:
    spec = small(client={"protocol": "fedavg", "lr": 0.1, "batch_size": 8})
    shards = partition(train_labels(spec), spec.num_clients, spec.partition, spec.seed)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="batch_size=8 is above client 3's 3 samples"):
        check_shards(shards, spec)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"clients_per_round": 5}, "clients_per_round=5 is more than"),
        ({"audit": {"rounds": [3]}}, r"audit.rounds \[3\] lie beyond"),
        ({"audit": {"client": 4}}, "audit.client=4 does not exist"),
        ({"data": {"source": "cifar10"}}, "needs data.path"),
        ({"data": {"source": "patches", "path": "/x"}}, "takes no path"),
    ],
)
def test_contradictory_specs_are_refused_by_the_spec(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        small(**changes)


def test_an_unknown_dataset_path_is_a_clear_error(tmp_path: Path) -> None:
    spec = small(data={"source": "cifar10", "path": str(tmp_path / "nowhere")})
    with pytest.raises(GradleakError, match=r"CIFAR-10 not found: looked in .*nowhere"):
        run(spec, tmp_path)


# --- audits, checkpoints, outputs ----------------------------------------------------------------


def test_audited_rounds_attack_the_audited_clients_real_update(tmp_path: Path) -> None:
    spec = small(
        rounds=3,
        clients_per_round=2,
        audit={"rounds": [1, 3], "client": 3, "budget": {"iterations": 5}},
    )
    manifest, store = run(spec, tmp_path)
    rows = manifest["rounds"]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in (rows[0], rows[2]):
        assert 3 in r["clients"] and r["audited_client"] == 3
        assert r["audit_images"] == 3  # 15 training patches dealt to 4 clients: 4, 4, 4, 3
        assert 0 < r["igsa_client"] <= 1 and r["psnr_mean"] > 0
        audit = json.loads(store.path(f"fed/rounds/round-{r['round']:03d}/metrics.json").read_text())
        assert audit["attack"]["target_kind"] == "gradient"  # a delta turned into a pseudo-gradient
        assert audit["spec"]["update"]["client"]["num_samples"] == 3
        assert audit["spec"]["knowledge"] == 3
    assert "psnr_mean" not in rows[1]
    for name in ("rounds.json", "rounds.csv", "rounds.png", "report.html", "metrics.json"):
        assert name in manifest["artifacts"]
    table = list(csv.DictReader(io.StringIO(store.path("fed/rounds.csv").read_text())))
    assert [row["round"] for row in table] == ["1", "2", "3"]
    assert table[0]["psnr_mean"] and not table[1]["psnr_mean"]
    assert store.path("fed/rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = store.path("fed/report.html").read_text()
    assert "Round 3: client 3" in report and report.count("data:image/png;base64,") == 3


def test_a_checkpoint_is_the_model_weights_of_an_ordinary_attack_job(tmp_path: Path) -> None:
    spec = small(rounds=2, checkpoint_rounds=[2])
    _, store = run(spec, tmp_path / "fed")
    path = store.path(f"fed/{checkpoint_name(2)}")
    job = JobSpec.model_validate(
        {
            "model": {"arch": "mlp", "weights": str(path)},
            "data": {"shape": [3, 16, 16], "num_classes": 3},
            "update": {"kind": "gradient", "simulate": {"images": ["astronaut"]}},
            "budget": {"iterations": 3},
        }
    )
    loaded = build_model(job.model, job.data, resolve=lambda ref: Path(ref).read_bytes())
    stored = load_safetensors(path.read_bytes())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in stored.items())
    out = run_job(job, JobContext("j", LocalStore(tmp_path / "job"), "j", lambda ref: Path(ref).read_bytes()))
    assert out.status == "succeeded" and out.manifest["spec"]["model"]["weights"] == str(path)


def test_cancel_stops_within_the_round_and_keeps_the_finished_rounds(tmp_path: Path) -> None:
    seen: list[Progress] = []
    spec = small(rounds=5)

    def stop() -> bool:
        return any(p.stage == "training" and p.iteration == 2 for p in seen)

    manifest, store = run(spec, tmp_path, progress=seen.append, should_stop=stop)
    assert manifest["status"] == "cancelled"
    assert manifest["rounds_completed"] == 2
    assert len(json.loads(store.path("fed/rounds.json").read_text())) == 2


def test_cancel_during_a_round_stops_before_its_remaining_clients(tmp_path: Path) -> None:
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 3  # the round's first check, then two clients

    manifest, _ = run(small(rounds=3), tmp_path, should_stop=stop)
    assert manifest["status"] == "cancelled" and manifest["rounds_completed"] == 0


def test_a_federation_learns_the_patch_task_far_above_chance(tmp_path: Path) -> None:
    spec = FederationSpec.model_validate(
        {
            "model": {"arch": "mlp"},
            "data": {"per_class": 30, "size": 16},
            "num_clients": 5,
            "rounds": 8,
            "client": {"protocol": "fedavg", "lr": 0.05, "batch_size": 8, "local_epochs": 2},
        }
    )
    manifest, _ = run(spec, tmp_path)
    accuracy = [r["test_accuracy"] for r in manifest["rounds"]]
    assert manifest["initial"]["test_accuracy"] < 0.25
    assert accuracy[-1] > 0.4  # ten classes: chance is 0.1


def test_defenses_are_applied_to_what_clients_share(tmp_path: Path) -> None:
    plain, _ = run(small(rounds=1), tmp_path / "a")
    clipped, _ = run(small(rounds=1, defenses=[{"name": "clip", "max_norm": 1e-3}]), tmp_path / "b")
    assert plain["rounds"][0]["update_norm"] > 1e-2
    assert clipped["rounds"][0]["update_norm"] == pytest.approx(1e-3, rel=1e-3)


def test_local_training_defaults_are_sane() -> None:
    assert LocalTraining().protocol == "fedavg" and small().checkpoints() == [0, 1, 2]
    assert small(audit={"rounds": [2]}, checkpoint_rounds=[]).checkpoints() == [1]


def test_an_audited_round_can_carry_the_leakage_estimate_beside_its_truth(tmp_path: Path) -> None:
    verdict = {"when": "always", "shadows": 2, "budget": {"iterations": 2}}
    spec = small(
        rounds=1, audit={"rounds": [1], "client": 0, "budget": {"iterations": 3}, "verdict": verdict}
    )
    manifest, store = run(spec, tmp_path)
    [row] = manifest["rounds"]
    lo, hi = row["estimate_psnr_worst_interval"]
    assert lo <= row["estimate_psnr_worst"] <= hi and "psnr_worst" in row  # the estimate and the truth
    audit = json.loads(store.path("fed/rounds/round-001/metrics.json").read_text())
    assert audit["estimate"]["shadows_run"] == 2 and audit["metrics"] is not None
    assert (
        "estimate_psnr_worst"
        not in run(small(rounds=1, audit={"rounds": [1]}), tmp_path / "b")[0]["rounds"][0]
    )
    with pytest.raises(ValueError, match="shipped photos"):
        small(audit={"verdict": {"proxy_data": "gt_1"}})
