"""The Flower integration against the live service (uvicorn on loopback). Most tests drive it with
Flower's formats but without flwr in this process (flwr needs its own environment, see flowerkit):
lists of numpy arrays (NumPyClient), `Parameters` of np.save bytes in FitIns/FitRes (Client), and
the Message API's messages and records (the strategy wrapper and the Mod) as flwr 1.42 builds them;
one runs flwr's own types in a subprocess (flower_types_check.py). Flower's runtime drives the
example app in test_client_flower_runtime.py (slow)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from gradleak_client import Client
from gradleak_client.flower import (
    AuditedClient,
    AuditedNumPyClient,
    AuditedStrategy,
    FlowerAuditor,
    gradleak_mod,
    read_records,
)
from gradleak_client.policy import Threshold

SIZE = 16
UNROLL_BUDGET = {"iterations": 10}


def build_lenet(size: int) -> torch.nn.Module:
    from service.models import build_model
    from service.specs import DataSpec, ModelSpec

    return build_model(ModelSpec(arch="lenet"), DataSpec(shape=(3, size, size), num_classes=10))


def tiny_round() -> tuple[list[str], list[np.ndarray], list[np.ndarray], torch.Tensor, torch.Tensor]:
    """A LeNet, two photo patches and one SGD step: names, weights before and after, the batch."""
    from service.data.patches import photo_patches

    net = build_lenet(SIZE)
    images, labels = photo_patches(size=SIZE, per_class=1)
    x, y = images[:2], labels[:2]
    before = [v.detach().numpy().copy() for v in net.state_dict().values()]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    optimizer.step()
    after = [v.detach().numpy().copy() for v in net.state_dict().values()]
    return list(net.state_dict()), before, after, x, y


def auditor_for(
    client: Client, names: list[str] | None, x: torch.Tensor, y: torch.Tensor, **kw: Any
) -> FlowerAuditor:
    settings: dict[str, Any] = {
        "arch": "lenet",
        "image_shape": (3, SIZE, SIZE),
        "names": names,
        "rounds": [1],
        "lr": 0.1,
        "local_epochs": 1,
        "batch_size": 2,
        "normalization": "none",
        "budget": UNROLL_BUDGET,
        "ground_truth": lambda _round, _config: (x, y),
        "wait": True,
    }
    return FlowerAuditor(client, **{**settings, **kw})


def assert_scored(record: Any, threshold: float = 20.0) -> None:
    assert record.status == "succeeded" and record.job_id and record.metrics is not None
    psnr = record.metrics["worst_case"]["psnr"]
    assert record.verdict == ("pass" if psnr <= threshold else "fail")


# ---------------------------------------------------------------------------------------------
# sampling and training facts (no service)
# ---------------------------------------------------------------------------------------------


def offline_auditor(**kw: Any) -> FlowerAuditor:
    return FlowerAuditor(
        Client(base_url="http://127.0.0.1:9"), arch="lenet", image_shape=(3, SIZE, SIZE), **kw
    )


def test_a_fraction_of_rounds_is_sampled_reproducibly() -> None:
    rounds = range(1, 2001)

    def sampled(**kw: Any) -> list[int]:
        auditor = offline_auditor(**kw)
        return [r for r in rounds if auditor.should_audit(r)]

    picked = sampled(fraction=0.3, seed=1)
    assert 0.25 < len(picked) / len(rounds) < 0.35
    assert picked == sampled(fraction=0.3, seed=1)
    assert picked != sampled(fraction=0.3, seed=2)
    assert sampled(fraction=0.0) == [] and sampled(fraction=1.0) == list(rounds)
    assert sampled(rounds=[3, 7]) == [3, 7]
    auditor = offline_auditor(fraction=0.5, seed=1)
    per_node = [[auditor.should_audit(r, node) for r in rounds] for node in (11, 12)]
    assert per_node[0] != per_node[1]  # each node's updates are drawn on their own


def test_training_facts_come_from_the_client_then_the_round_config() -> None:
    auditor = offline_auditor(lr=0.01, local_epochs=5, batch_size=32)
    facts = auditor.training_facts({"learning-rate": 0.2, "batch-size": 8}, num_examples=16)
    assert facts == {"lr": 0.2, "local_epochs": 5, "batch_size": 8, "num_samples": 16, "protocol": "fedavg"}
    declared = auditor.training_facts({"lr": 0.2, "batch-size": 8}, 16, declared={"lr": 0.3, "loss": "x"})
    assert declared["lr"] == 0.3 and declared["batch_size"] == 8  # what the client says it did wins
    one_step = auditor.training_facts({"local-epochs": 1}, num_examples=20)
    assert one_step["protocol"] == "fedsgd"  # one epoch of one batch is FedSGD
    assert auditor.round_of({"server-round": 12}) == 12 and auditor.round_of({}) == 2  # second call


def test_the_wrapped_numpy_client_returns_exactly_what_it_would() -> None:
    result = ([np.ones(2)], 4, {"loss": 0.5})

    class Inner:
        def fit(self, parameters: Any, config: Any) -> Any:
            return result

        def evaluate(self, parameters: Any, config: Any) -> Any:
            return 0.1, 4, {}

    wrapped = AuditedNumPyClient(Inner(), offline_auditor(rounds=[]))
    assert wrapped.fit([np.zeros(2)], {"server-round": 1}) is result
    assert wrapped.evaluate([np.zeros(2)], {}) == (0.1, 4, {})


# ---------------------------------------------------------------------------------------------
# against the live service
# ---------------------------------------------------------------------------------------------


@dataclass
class Parameters:
    tensors: list[bytes]
    tensor_type: str = "numpy.ndarray"


@dataclass
class Status:
    code: int = 0  # flwr.common.Code.OK
    message: str = "Success"


@dataclass
class FitIns:
    parameters: Parameters
    config: dict[str, Any]


@dataclass
class FitRes:
    status: Status
    parameters: Parameters
    num_examples: int
    metrics: dict[str, Any] = field(default_factory=dict)


def to_parameters(arrays: list[np.ndarray]) -> Parameters:
    """Flower's ndarrays_to_parameters: np.save of each array, without pickle."""
    blobs = []
    for a in arrays:
        buffer = io.BytesIO()
        np.save(buffer, a, allow_pickle=False)
        blobs.append(buffer.getvalue())
    return Parameters(blobs)


def test_a_low_level_client_with_flower_parameters(live_url: str) -> None:
    names, before, after, x, y = tiny_round()
    res = FitRes(Status(), to_parameters(after), num_examples=2)

    class Inner:
        def fit(self, ins: FitIns) -> FitRes:
            return res

    with Client(base_url=live_url) as client:
        auditor = auditor_for(client, names, x, y)
        wrapped = AuditedClient(Inner(), auditor)
        assert wrapped.fit(FitIns(to_parameters(before), {"server-round": 1})) is res
    [record] = auditor.records
    assert record.training["protocol"] == "fedsgd"  # one step on the whole batch
    assert_scored(record)


class FakeArrayRecord(dict):  # type: ignore[type-arg]
    """The parts of flwr's ArrayRecord the mod uses: named arrays, to_numpy_ndarrays()."""

    def to_numpy_ndarrays(self) -> list[np.ndarray]:
        return list(self.values())


def message(kind: str, content: dict[str, Any], src: int = 0, dst: int = 0, error: str | None = None) -> Any:
    """A Message as flwr builds it: metadata (type, source and destination node), content."""
    return SimpleNamespace(
        metadata=SimpleNamespace(message_type=kind, src_node_id=src, dst_node_id=dst),
        content=content,
        has_error=lambda: error is not None,
        error=SimpleNamespace(reason=error),
    )


def records_of(names: list[str], arrays: list[np.ndarray]) -> FakeArrayRecord:
    return FakeArrayRecord(zip(names, arrays, strict=True))


def test_the_mod_audits_train_replies(live_url: str, tmp_path: Path) -> None:
    names, before, after, x, y = tiny_round()
    incoming = message("train", {"arrays": records_of(names, before), "config": {"server-round": 1}})
    reply = message("train", {"arrays": records_of(names, after), "metrics": {"num-examples": 2, "lr": 0.1}})
    context = SimpleNamespace(node_id=7, run_config={}, node_config={})
    with Client(base_url=live_url) as client:
        auditor = auditor_for(client, None, x, y, thresholds=[Threshold(metric="ssim", max=0.9)])
        mod = gradleak_mod(lambda ctx: auditor if ctx.node_id == 7 else None)  # built from the Context
        assert mod(incoming, context, lambda _m, _c: reply) is reply
        assert mod(message("evaluate", incoming.content), context, lambda _m, _c: reply) is reply
    [record] = auditor.records  # the evaluate message was not audited
    assert record.round == 1 and record.node_id == 7 and record.side == "client"
    assert record.status == "succeeded"
    ssim = record.metrics["worst_case"]["ssim"] if record.metrics else None
    assert ssim is not None and record.verdict == ("pass" if ssim <= 0.9 else "fail")


class RecordingStrategy:
    """A Message-API strategy that records what it is asked to aggregate."""

    arrayrecord_key, configrecord_key, weighted_by_key = "arrays", "config", "num-examples"

    def __init__(self, names: list[str], global_arrays: list[np.ndarray]) -> None:
        self.names, self.global_arrays = names, global_arrays
        self.aggregated: list[Any] = []

    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> list[Any]:
        content = {"arrays": records_of(self.names, self.global_arrays), "config": {**config, "lr": 0.1}}
        return [message("train", content, dst=node) for node in grid]

    def aggregate_train(self, server_round: int, replies: Any) -> tuple[str, int]:
        self.aggregated.append(replies)
        return "aggregated", server_round


def test_the_strategy_audits_sampled_replies_and_aggregates_them_unchanged(
    live_url: str, tmp_path: Path
) -> None:
    names, before, after, x, y = tiny_round()
    inner = RecordingStrategy(names, before)
    log = tmp_path / "server.jsonl"
    metrics = {"num-examples": 2, "local-epochs": 1, "batch-size": 2}
    with Client(base_url=live_url) as client:
        auditor = auditor_for(client, None, x, y, fraction=1.0, rounds=None, log_path=log)
        strategy = AuditedStrategy(inner, auditor)
        sent = list(strategy.configure_train(1, None, {}, grid=[1, 2, 3]))
        assert [m.metadata.dst_node_id for m in sent] == [1, 2, 3]
        replies = [
            message("train", {"arrays": records_of(names, after), "metrics": metrics}, src=1),
            message("train", {}, src=2, error="out of memory"),
        ]  # node 3 never replied
        assert strategy.aggregate_train(1, iter(replies)) == ("aggregated", 1)
        assert strategy.weighted_by_key == "num-examples"  # the rest is the strategy's
    [aggregated] = inner.aggregated
    assert len(aggregated) == 2 and all(a is b for a, b in zip(aggregated, replies, strict=True))
    by_node = {r.node_id: r for r in auditor.records}
    assert set(by_node) == {1, 2, 3} and all(r.side == "server" for r in by_node.values())
    assert by_node[1].training["lr"] == 0.1 and by_node[1].training["protocol"] == "fedsgd"
    assert_scored(by_node[1])
    assert by_node[2].verdict == "error" and "out of memory" in (by_node[2].error or "")
    assert by_node[3].verdict == "error" and "did not reply" in (by_node[3].error or "")
    assert {r.id: r.verdict for r in read_records(log)} == {r.id: r.verdict for r in auditor.records}


def test_audit_failures_are_recorded_not_raised(tmp_path: Path) -> None:
    names, before, after, x, y = tiny_round()
    client = Client(base_url="http://127.0.0.1:9", max_retries=0)
    auditor = auditor_for(client, names, x, y, log_path=tmp_path / "audits.jsonl")
    record = auditor.observe(before, after, 2, {"server-round": 1})
    assert record is not None and record.verdict == "error" and "cannot reach" in (record.error or "")
    assert json.loads((tmp_path / "audits.jsonl").read_text())["verdict"] == "error"
    bad_names = auditor_for(client, ["only-one"], x, y).observe(before, after, 2, {"server-round": 1})
    assert bad_names is not None and bad_names.verdict == "error" and "names" in (bad_names.error or "")


def test_submitted_audits_are_collected_by_a_later_process(live_url: str, tmp_path: Path) -> None:
    """A ClientApp process submits and exits; whoever reads its record file later gets the verdict."""
    names, before, after, x, y = tiny_round()
    log = tmp_path / "client.jsonl"
    with Client(base_url=live_url) as client:
        submitter = auditor_for(client, names, x, y, wait=False, log_path=log)
        pending = submitter.observe(before, after, 2, {"server-round": 1})
        assert pending is not None and pending.verdict == "pending" and pending.job_id
        [line] = read_records(log)
        assert line.verdict == "pending" and line.job_id == pending.job_id
        later = FlowerAuditor(client, arch="lenet", image_shape=(3, SIZE, SIZE), log_path=log)
        [record] = later.collect(timeout=120)
    assert record.id == pending.id and record.job_id == pending.job_id
    assert_scored(record)
    assert [r.verdict for r in read_records(log)] == [record.verdict]  # the file's latest state
    assert len(log.read_text().splitlines()) == 2  # submitted, then finished


def test_the_cli_collects_a_record_file(live_url: str, tmp_path: Path, capsys: Any) -> None:
    from gradleak_client.cli import main

    names, before, after, x, y = tiny_round()
    log = tmp_path / "client.jsonl"
    with Client(base_url=live_url) as client:
        submitted = auditor_for(client, names, x, y, wait=False, log_path=log).observe(
            before, after, 2, {"server-round": 1}, node_id=5
        )
    assert submitted is not None and submitted.verdict == "pending"
    # no reconstruction scores a PSNR of 0 dB or less: the audit fails that threshold (exit 1)
    assert main(["collect", str(log), "--url", live_url, "--max", "psnr=0"]) == 1
    [line] = capsys.readouterr().out.strip().splitlines()
    assert line == f"client round 1 node 5: fail  {submitted.job_id}"
    assert main(["collect", str(log), "--url", live_url, "--max", "psnr=1000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "pass"  # read again, checked again
    failed = tmp_path / "failed.jsonl"
    offline = Client(base_url="http://127.0.0.1:9", max_retries=0)
    auditor_for(offline, names, x, y, log_path=failed).observe(before, after, 2, {"server-round": 1})
    assert main(["collect", str(failed), "--url", live_url]) == 2  # an audit that could not run
    assert "error" in capsys.readouterr().out
    assert main(["collect", str(log), "--url", live_url, "--max", "psnr=high"]) == 2
    assert capsys.readouterr().err.startswith("gradleak-client: error: --max psnr=high:")


def test_flowers_own_messages_fedavg_and_clientapp(live_url: str, tmp_path: Path) -> None:
    """flwr 1.42's real types (in a subprocess with .flower-env first, see flowerkit): the audited
    FedAvg aggregates exactly what FedAvg does, and both sides record both nodes' audits."""
    import subprocess
    import sys

    from flowerkit import flower_environ

    script = Path(__file__).with_name("flower_types_check.py")
    run = subprocess.run(
        [sys.executable, str(script), live_url, str(tmp_path / "records")],
        env=flower_environ(tmp_path / "flwr"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["same"] and result["sent_to"] == [11, 22]
    for side in ("server", "client"):
        records = result[side]
        # the server has no client images: its thresholds apply to the job's leakage estimate
        estimated = side == "server"
        assert all(any(("estimated" in c["message"]) == estimated for c in r["checks"]) for r in records)
        assert sorted(r["node_id"] for r in records) == [11, 22]
        assert all(r["status"] == "succeeded" and r["verdict"] in ("pass", "fail") for r in records)
        assert all(r["training"]["lr"] == 0.1 and r["training"]["protocol"] == "fedsgd" for r in records)
