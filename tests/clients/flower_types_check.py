"""Run by test_client_flower.py where flwr is importable (.flower-env, see flowerkit): Flower 1.42's
own Message, ArrayRecord, Context, FedAvg and ClientApp (its mod chain) through AuditedStrategy and
gradleak_mod, against the gradleak service at argv[1], with records under argv[2]. Prints, as JSON,
whether the audited FedAvg aggregated exactly what a plain FedAvg aggregates from the same replies,
and the collected records of both sides."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from gradleak_client import Client
from gradleak_client.flower import AuditedStrategy, AuditLog, FlowerAuditor, gradleak_mod
from service.models import build_model
from service.specs import DataSpec, ModelSpec

SIZE = 16
NODES = [11, 22]


def lenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelSpec(arch="lenet"), DataSpec(shape=(3, SIZE, SIZE), num_classes=10))


def batch(node_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(node_id)
    return torch.rand(2, 3, SIZE, SIZE, generator=generator), torch.tensor([node_id % 10, 3])


class Grid:
    """The part of flwr's Grid that FedAvg.configure_train uses."""

    def get_node_ids(self) -> list[int]:
        return list(NODES)


def auditor(client: Client, path: Path, **kw: Any) -> FlowerAuditor:
    settings: dict[str, Any] = {
        "arch": "lenet",
        "image_shape": (3, SIZE, SIZE),
        "fraction": 1.0,
        "normalization": "none",
        "budget": {"iterations": 2},
        "log_path": path,
    }
    return FlowerAuditor(client, **{**settings, **kw})


def main() -> None:
    url, folder = sys.argv[1], Path(sys.argv[2])
    client = Client(base_url=url)
    # what Flower's runtime sets in the process that runs an app
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0

    def client_auditor(context: Context) -> FlowerAuditor:
        images, labels = batch(context.node_id)
        return auditor(client, folder / "client.jsonl", ground_truth=lambda _r, _c: (images, labels))

    app = ClientApp(mods=[gradleak_mod(client_auditor)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = msg.content["config"]
        net = lenet()
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        optimizer = torch.optim.SGD(net.parameters(), lr=float(config["lr"]))
        images, labels = batch(context.node_id)
        torch.nn.functional.cross_entropy(net(images), labels).backward()
        optimizer.step()
        metrics = {"num-examples": 2, "lr": float(config["lr"]), "local-epochs": 1, "batch-size": 2}
        content = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    server_audits = auditor(client, folder / "server.jsonl")
    audited = AuditedStrategy(FedAvg(), server_audits)
    config = ConfigRecord({"lr": 0.1, "local-epochs": 1, "batch-size": 2})
    messages = list(audited.configure_train(1, ArrayRecord(lenet().state_dict()), config, Grid()))
    replies = [
        app(
            m,
            Context(
                run_id=1, node_id=m.metadata.dst_node_id, node_config={}, state=RecordDict(), run_config={}
            ),
        )
        for m in messages
    ]
    got_arrays, got_metrics = audited.aggregate_train(1, replies)
    want_arrays, want_metrics = FedAvg().aggregate_train(1, replies)
    same = dict(got_metrics) == dict(want_metrics) and all(
        np.array_equal(a, b)
        for a, b in zip(got_arrays.to_numpy_ndarrays(), want_arrays.to_numpy_ndarrays(), strict=True)
    )
    server = server_audits.collect(timeout=300)
    clients = AuditLog(client, path=folder / "client.jsonl").collect(timeout=300)
    print(
        json.dumps(
            {
                "same": same,
                "sent_to": sorted(int(m.metadata.dst_node_id) for m in messages),
                "server": [json.loads(r.to_json()) for r in server],
                "client": [json.loads(r.to_json()) for r in clients],
            }
        )
    )


if __name__ == "__main__":
    main()
