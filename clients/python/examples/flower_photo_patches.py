"""A Flower client training LeNet on gradleak's shipped photo patches, with a sampled fraction of
its rounds audited by gradleak. What the clients share is not changed by the audit.

Needs torch and the server package `gradleak` (for the photo patches and the LeNet the service
attacks), numpy and safetensors (`pip install 'gradleak-client[flower]'`), and optionally flwr:
with flwr installed the clients are real `flwr.client.NumPyClient`s and every fit goes through
Flower's own client (`to_client()`, FitIns/FitRes, Flower's parameter serialisation); without it
the same clients are driven with Flower's NumPy parameter format directly.

    gradleak serve &                                   # or: --embedded
    python clients/python/examples/flower_photo_patches.py --rounds 3 --fraction 0.5

A small FedAvg loop stands in for Flower's server here, so that the example needs no simulation
engine; in a real deployment the wrapped client is what `client_fn` returns.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from gradleak_client import Client
from gradleak_client.flower import AuditedNumPyClient, AuditRecord, FlowerAuditor

try:
    from flwr.client import NumPyClient as _FlowerBase
    from flwr.common import Code, FitIns, ndarrays_to_parameters, parameters_to_ndarrays

    HAVE_FLWR = True
except ImportError:
    _FlowerBase = object
    HAVE_FLWR = False

ARCH = "lenet"
NUM_CLASSES = 10


def build_lenet(size: int) -> nn.Module:
    """The LeNet gradleak's registry builds, so that the service attacks the same network."""
    from service.models import build_model
    from service.specs import DataSpec, ModelSpec

    return build_model(ModelSpec(arch=ARCH), DataSpec(shape=(3, size, size), num_classes=NUM_CLASSES))


class PatchClient(_FlowerBase):  # type: ignore[misc,valid-type]
    """A Flower NumPyClient: plain SGD on its shard of photo patches."""

    def __init__(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
        self.net, self.images, self.labels, self.seed = net, images, labels, seed

    def get_parameters(self, config: Mapping[str, Any]) -> list[np.ndarray]:
        return [v.detach().cpu().numpy() for v in self.net.state_dict().values()]

    def _set(self, parameters: Sequence[np.ndarray]) -> None:
        keys = list(self.net.state_dict())
        self.net.load_state_dict(
            {k: torch.from_numpy(np.array(v)) for k, v in zip(keys, parameters, strict=True)}
        )

    def fit(
        self, parameters: list[np.ndarray], config: Mapping[str, Any]
    ) -> tuple[list[np.ndarray], int, dict]:
        self._set(parameters)
        lr, epochs, batch = float(config["lr"]), int(config["local-epochs"]), int(config["batch-size"])
        optimizer = torch.optim.SGD(self.net.parameters(), lr=lr)
        self.net.train()
        n = len(self.images)
        for _ in range(epochs):
            for start in range(0, n, batch):
                x, y = self.images[start : start + batch], self.labels[start : start + batch]
                optimizer.zero_grad()
                nn.functional.cross_entropy(self.net(x), y).backward()
                optimizer.step()
        return self.get_parameters(config), n, {}

    def evaluate(self, parameters: list[np.ndarray], config: Mapping[str, Any]) -> tuple[float, int, dict]:
        self._set(parameters)
        with torch.no_grad():
            logits = self.net(self.images)
            loss = float(nn.functional.cross_entropy(logits, self.labels))
            accuracy = float((logits.argmax(1) == self.labels).float().mean())
        return loss, len(self.images), {"accuracy": accuracy}


def _fit(client: Any, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[Any, int]:
    """One fit, through Flower's own client and parameter serialisation when flwr is installed."""
    if not HAVE_FLWR:
        new, n, _ = client.fit(parameters, config)
        return new, n
    res = client.to_client().fit(FitIns(ndarrays_to_parameters(parameters), config))
    if res.status.code != Code.OK:
        raise RuntimeError(f"fit failed: {res.status.message}")
    return parameters_to_ndarrays(res.parameters), res.num_examples


def run(
    client: Client,
    *,
    rounds: int = 3,
    num_clients: int = 2,
    per_client: int = 8,
    size: int = 16,
    lr: float = 0.05,
    local_epochs: int = 1,
    batch_size: int = 4,
    fraction: float = 0.5,
    audited_rounds: Sequence[int] | None = None,
    budget: Mapping[str, Any] | None = None,
    seed: int = 0,
    log_path: str | None = None,
) -> tuple[list[AuditRecord], list[list[np.ndarray]]]:
    """FedAvg over `num_clients` clients for `rounds` rounds; client 0 is audited. Returns the
    audit records and, per round, the parameters client 0 shared (to check they are unchanged)."""
    from service.data.patches import photo_patches

    torch.manual_seed(seed)
    images, labels = photo_patches(
        size=size, per_class=max(1, (per_client * num_clients) // NUM_CLASSES + 1), seed=seed
    )
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    shards = [order[i * per_client : (i + 1) * per_client] for i in range(num_clients)]
    net = build_lenet(size)
    names = list(net.state_dict())
    auditor = FlowerAuditor(
        client,
        arch=ARCH,
        image_shape=(3, size, size),
        num_classes=NUM_CLASSES,
        names=names,
        fraction=fraction,
        rounds=audited_rounds,
        seed=seed,
        normalization="none",
        budget=budget,
        # client 0 trains on its whole shard each round: that is the batch the attack reconstructs
        ground_truth=lambda _round, _config: (images[shards[0]], labels[shards[0]]),
        log_path=log_path,
    )
    clients = [
        PatchClient(build_lenet(size), images[shard], labels[shard], seed + i)
        for i, shard in enumerate(shards)
    ]
    wrapped: list[Any] = [AuditedNumPyClient(clients[0], auditor), *clients[1:]]  # client 0 is audited
    global_parameters = [v.detach().numpy() for v in net.state_dict().values()]
    shared: list[list[np.ndarray]] = []
    for server_round in range(1, rounds + 1):
        config = {
            "server-round": server_round,
            "lr": lr,
            "local-epochs": local_epochs,
            "batch-size": batch_size,
        }
        results = [_fit(c, [p.copy() for p in global_parameters], config) for c in wrapped]
        shared.append([np.array(p, copy=True) for p in results[0][0]])
        total = sum(n for _, n in results)
        global_parameters = [
            sum(params[i] * (n / total) for params, n in results).astype(global_parameters[i].dtype)
            for i in range(len(global_parameters))
        ]
    records = auditor.flush()
    auditor.close()
    return records, shared


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="the gradleak API (default $GRADLEAK_URL)")
    parser.add_argument("--embedded", action="store_true", help="run gradleak in this process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.5, help="fraction of rounds to audit")
    parser.add_argument("--iterations", type=int, default=200, help="attack iterations per audit")
    args = parser.parse_args(argv)
    budget = {"iterations": args.iterations}
    if args.embedded:
        from gradleak_client.embedded import EmbeddedService

        with EmbeddedService() as service, service.client() as client:
            records, _ = run(client, rounds=args.rounds, fraction=args.fraction, budget=budget)
    else:
        with Client(base_url=args.url) as client:
            records, _ = run(client, rounds=args.rounds, fraction=args.fraction, budget=budget)
    for record in records:
        psnr = (record.metrics or {}).get("worst_case", {}).get("psnr")
        error = f"  ({record.error})" if record.error else ""
        print(f"round {record.round}: {record.verdict}  job {record.job_id}  worst-case PSNR {psnr}{error}")
    print(f"flwr installed: {HAVE_FLWR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
