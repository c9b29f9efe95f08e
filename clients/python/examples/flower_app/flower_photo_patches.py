"""A Flower app (Message API): FedAvg on LeNet over gradleak's shipped photo patches, with a sampled
fraction of the updates audited by gradleak on both sides, without changing what is aggregated:

- the ServerApp wraps FedAvg in `AuditedStrategy`: the curious server's view, each sampled reply
  against the global model it sent (unscored: the server has no client data);
- the ClientApp carries `gradleak_mod`: the client's own view, scored against the batch it
  trained on. The mod submits the job and returns, so the audit outlives the ClientApp process.

Each side appends its records to <audit-records>/server.jsonl and client.jsonl; the ServerApp
waits for every audit's verdict at the end (`audit-wait`). Needs flwr, torch, numpy,
gradleak-client[flower] and the server package `gradleak` (patches, LeNet). With a SuperLink and
two SuperNodes (see clients/python/README.md):

    gradleak serve &
    flwr run clients/python/examples/flower_app local --run-config "audit-fraction=1.0"

or in Flower's simulation engine (needs flwr[simulation]):

    python clients/python/examples/flower_app/flower_photo_patches.py --fraction 0.5
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn

from gradleak_client import Client
from gradleak_client.flower import AuditedStrategy, FlowerAuditor, gradleak_mod

ARCH = "lenet"
NUM_CLASSES = 10
# The run config's defaults (pyproject.toml's [tool.flwr.app.config] says the same): Flower's
# simulation engine runs apps without a pyproject.toml.
DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 3,
    "lr": 0.05,
    "local-epochs": 1,
    "batch-size": 4,
    "per-client": 4,
    "image-size": 16,
    "gradleak-url": "",
    "audit-fraction": 0.5,
    "audit-rounds": "",
    "audit-seed": 0,
    "audit-iterations": 200,
    "audit-time-limit-s": 0.0,
    "audit-records": "gradleak-audits",
    "audit-wait": True,
}


def settings(context: Context, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {**DEFAULTS, **dict(context.run_config), **dict(overrides or {})}


def build_lenet(size: int) -> nn.Module:
    """The LeNet gradleak's registry builds, so that the service attacks the same network."""
    from service.models import build_model
    from service.specs import DataSpec, ModelSpec

    return build_model(ModelSpec(arch=ARCH), DataSpec(shape=(3, size, size), num_classes=NUM_CLASSES))


def shard(partition: int, partitions: int, per_client: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This node's photo patches: a disjoint slice of one shuffled set."""
    from service.data.patches import photo_patches

    images, labels = photo_patches(size=size, per_class=max(1, per_client * partitions // NUM_CLASSES + 1))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    index = order[partition * per_client : (partition + 1) * per_client]
    return images[index], labels[index]


def node_shard(context: Context, cfg: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    partition = int(context.node_config.get("partition-id", 0))
    partitions = int(context.node_config.get("num-partitions", 2))
    return shard(partition, partitions, int(cfg["per-client"]), int(cfg["image-size"]))


def auditor(cfg: Mapping[str, Any], side: str, ground_truth: Any = None) -> FlowerAuditor:
    budget: dict[str, Any] = {"iterations": int(cfg["audit-iterations"])}
    if float(cfg["audit-time-limit-s"]) > 0:
        budget["time_limit_s"] = float(cfg["audit-time-limit-s"])
    size = int(cfg["image-size"])
    return FlowerAuditor(
        Client(base_url=str(cfg["gradleak-url"]) or None),
        arch=ARCH,
        image_shape=(3, size, size),
        num_classes=NUM_CLASSES,
        fraction=float(cfg["audit-fraction"]),
        rounds=[int(r) for r in str(cfg["audit-rounds"]).split(",") if r.strip()] or None,
        seed=int(cfg["audit-seed"]),
        normalization="none",  # the patches are fed to the network in [0, 1]
        budget=budget,
        ground_truth=ground_truth,
        log_path=Path(str(cfg["audit-records"])) / f"{side}.jsonl",
    )


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    def client_auditor(context: Context) -> FlowerAuditor:
        cfg = settings(context, overrides)
        # the client trains on its whole shard each round: the batch the attack reconstructs
        images, labels = node_shard(context, cfg)
        return auditor(cfg, "client", ground_truth=lambda _round, _config: (images, labels))

    app = ClientApp(mods=[gradleak_mod(client_auditor)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = settings(context, overrides)
        train_cfg = msg.content["config"]
        lr, epochs, batch = (
            float(train_cfg["lr"]),
            int(train_cfg["local-epochs"]),
            int(train_cfg["batch-size"]),
        )
        net = build_lenet(int(cfg["image-size"]))
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        images, labels = node_shard(context, cfg)
        optimizer = torch.optim.SGD(net.parameters(), lr=lr)
        net.train()
        loss = torch.zeros(())
        for _ in range(epochs):
            for start in range(0, len(images), batch):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(
                    net(images[start : start + batch]), labels[start : start + batch]
                )
                loss.backward()
                optimizer.step()
        metrics = {
            "num-examples": len(images),
            "train-loss": loss.item(),
            # the client's declared facts, which the server-side audit reads
            "lr": lr,
            "local-epochs": epochs,
            "batch-size": batch,
        }
        content = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg = settings(context, overrides)
        net = build_lenet(int(cfg["image-size"]))
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        images, labels = node_shard(context, cfg)
        with torch.no_grad():
            logits = net(images)
        metrics = {
            "num-examples": len(images),
            "eval-loss": float(nn.functional.cross_entropy(logits, labels)),
            "eval-acc": float((logits.argmax(1) == labels).float().mean()),
        }
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = settings(context, overrides)
        audits = auditor(cfg, "server")
        strategy = AuditedStrategy(FedAvg(), audits)
        net = build_lenet(int(cfg["image-size"]))
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(net.state_dict()),
            num_rounds=int(cfg["num-server-rounds"]),
            train_config=ConfigRecord(
                {"lr": cfg["lr"], "local-epochs": cfg["local-epochs"], "batch-size": cfg["batch-size"]}
            ),
        )
        if cfg["audit-wait"]:
            for record in audits.collect():
                print(json.dumps({"round": record.round, "node": record.node_id, "verdict": record.verdict}))

    return app


client_app = make_client_app()
server_app = make_server_app()


def main(argv: list[str] | None = None) -> int:
    """Run the app in Flower's simulation engine (Ray) with two virtual SuperNodes."""
    from flwr.simulation import run_simulation

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=DEFAULTS["num-server-rounds"])
    parser.add_argument("--fraction", type=float, default=DEFAULTS["audit-fraction"])
    parser.add_argument("--audit-rounds", default="", help="rounds to audit, e.g. 2,3 (not --fraction)")
    parser.add_argument("--iterations", type=int, default=DEFAULTS["audit-iterations"])
    parser.add_argument("--time-limit-s", type=float, default=0.0, help="per audit (0: none)")
    parser.add_argument("--records", default=DEFAULTS["audit-records"], help="folder for the audit records")
    parser.add_argument("--url", default="", help="the gradleak API (default $GRADLEAK_URL)")
    args = parser.parse_args(argv)
    overrides = {
        "num-server-rounds": args.rounds,
        "audit-fraction": args.fraction,
        "audit-rounds": args.audit_rounds,
        "audit-iterations": args.iterations,
        "audit-time-limit-s": args.time_limit_s,
        "audit-records": str(Path(args.records).resolve()),
        "gradleak-url": args.url,
    }
    Path(overrides["audit-records"]).mkdir(parents=True, exist_ok=True)
    run_simulation(
        server_app=make_server_app(overrides),
        client_app=make_client_app(overrides),
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
