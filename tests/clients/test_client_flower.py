"""The Flower integration against the live service (uvicorn on loopback). flwr does not install
beside this project's pinned stack, so the clients are driven with Flower's own formats: lists of
numpy arrays (NumPyClient), `Parameters` of np.save bytes in FitIns/FitRes (Client), and the
Message API's records (Mod) as flwr 1.4x builds them. The example's clients subclass flwr's
NumPyClient and go through `to_client()` whenever flwr is installed."""

from __future__ import annotations

import importlib.util
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import torch

from gradleak_client import Client
from gradleak_client.flower import AuditedClient, AuditedNumPyClient, FlowerAuditor, gradleak_mod
from gradleak_client.policy import Threshold

EXAMPLE = Path(__file__).resolve().parents[2] / "clients" / "python" / "examples" / "flower_photo_patches.py"
SIZE = 16
UNROLL_BUDGET = {"iterations": 10}


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("flower_photo_patches", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_round() -> tuple[list[str], list[np.ndarray], list[np.ndarray], torch.Tensor, torch.Tensor]:
    """A LeNet, two photo patches and one SGD step: names, weights before and after, the batch."""
    from service.data.patches import photo_patches

    net = load_example().build_lenet(SIZE)
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
        "background": False,
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


def test_training_facts_come_from_the_round_config_first() -> None:
    auditor = offline_auditor(lr=0.01, local_epochs=5, batch_size=32)
    facts = auditor.training_facts({"learning-rate": 0.2, "batch-size": 8}, num_examples=16)
    assert facts == {"lr": 0.2, "local_epochs": 5, "batch_size": 8, "num_samples": 16, "protocol": "fedavg"}
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


def test_the_example_audits_sampled_rounds_without_changing_the_update(live_url: str, tmp_path: Path) -> None:
    example = load_example()
    log = tmp_path / "audits.jsonl"
    settings: dict[str, Any] = {
        "rounds": 2,
        "per_client": 4,
        "batch_size": 2,
        "size": SIZE,
        "budget": UNROLL_BUDGET,
    }
    with Client(base_url=live_url) as client:
        records, shared = example.run(client, audited_rounds=[2], log_path=str(log), **settings)
        quiet_records, quiet_shared = example.run(client, audited_rounds=[], **settings)
    assert [r.round for r in records] == [2] and quiet_records == []
    record = records[0]
    assert record.training == {
        "lr": 0.05,
        "local_epochs": 1,
        "batch_size": 2,
        "num_samples": 4,
        "protocol": "fedavg",
    }
    assert_scored(record)
    assert record.metrics is not None and record.metrics["num_images"] == 4
    assert json.loads(log.read_text().splitlines()[0])["job_id"] == record.job_id
    for audited, plain in zip(shared, quiet_shared, strict=True):  # what client 0 sent, audit or not
        for a, b in zip(audited, plain, strict=True):
            np.testing.assert_array_equal(a, b)


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


def message(kind: str, content: dict[str, Any]) -> SimpleNamespace:
    return SimpleNamespace(
        metadata=SimpleNamespace(message_type=kind), content=content, has_error=lambda: False
    )


def test_the_mod_audits_train_replies(live_url: str, tmp_path: Path) -> None:
    names, before, after, x, y = tiny_round()
    incoming = message(
        "train", {"arrays": FakeArrayRecord(zip(names, before, strict=True)), "config": {"server-round": 1}}
    )
    reply = message(
        "train", {"arrays": FakeArrayRecord(zip(names, after, strict=True)), "metrics": {"num-examples": 2}}
    )
    with Client(base_url=live_url) as client:
        auditor = auditor_for(client, None, x, y, thresholds=[Threshold(metric="ssim", max=0.9)])
        mod = gradleak_mod(auditor)
        assert mod(incoming, None, lambda _m, _c: reply) is reply
        assert mod(message("evaluate", incoming.content), None, lambda _m, _c: reply) is reply
    [record] = auditor.records  # the evaluate message was not audited
    assert record.round == 1 and record.status == "succeeded"
    ssim = record.metrics["worst_case"]["ssim"] if record.metrics else None
    assert ssim is not None and record.verdict == ("pass" if ssim <= 0.9 else "fail")


def test_audit_failures_are_recorded_not_raised(tmp_path: Path) -> None:
    names, before, after, x, y = tiny_round()
    client = Client(base_url="http://127.0.0.1:9", max_retries=0)
    auditor = auditor_for(client, names, x, y, log_path=tmp_path / "audits.jsonl")
    record = auditor.observe(before, after, 2, {"server-round": 1})
    assert record is not None and record.verdict == "error" and "cannot reach" in (record.error or "")
    assert json.loads((tmp_path / "audits.jsonl").read_text())["verdict"] == "error"
    bad_names = auditor_for(client, ["only-one"], x, y).observe(before, after, 2, {"server-round": 1})
    assert bad_names is not None and bad_names.verdict == "error" and "names" in (bad_names.error or "")


def test_background_audits_are_flushed(live_url: str) -> None:
    names, before, after, x, y = tiny_round()
    with Client(base_url=live_url) as client:
        auditor = auditor_for(client, names, x, y, background=True)
        pending = auditor.observe(before, after, 2, {"server-round": 1})
        assert pending is not None
        [record] = auditor.flush(timeout=120)
        auditor.close()
    assert record is pending
    assert_scored(record)
