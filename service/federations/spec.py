"""The federation spec: one frozen, torch-free object that says which federation to train and
which of its rounds to audit.

A federation is FedAvg over rounds: the server sends the global model to a sample of clients,
each trains on its own shard of the data exactly as `service.fl` simulates a client, applies the
post-processing defenses before sharing, and the server averages what they share, weighted by
their sample counts. At chosen rounds one client's real update (the very one it shared) is
attacked through the one job runner. The CLI reads this spec from YAML, the API takes it as JSON.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from service.specs import (
    AttackSpec,
    Budget,
    DefenseSpec,
    Frozen,
    InvertingGradientsParams,
    Knowledge,
    ModelSpec,
    Normalization,
    VerdictSpec,
    YamlSpec,
    check_knowledge,
)

MAX_ROUNDS = 10_000


class FederatedData(Frozen):
    """The data the federation trains on, split into a training pool and a held-out test set."""

    source: Literal["patches", "cifar10", "cifar100", "folder"] = Field(
        default="patches",
        description="patches: the offline photo-patch task (crops of shipped photos, labelled by "
        "photo); cifar10/cifar100: a local CIFAR copy; folder: a local ImageFolder",
    )
    path: str | None = Field(default=None, description="dataset directory for cifar and folder")
    photos: list[str] | None = Field(
        default=None,
        min_length=2,
        max_length=100,
        description="photo names of the patch task, one class each; default: ten distinct photos",
    )
    per_class: Annotated[int, Field(ge=2, le=5000)] = Field(
        default=60, description="patches per photo (patch task)"
    )
    max_samples: Annotated[int, Field(ge=2)] | None = Field(
        default=None, description="use at most this many images of a CIFAR or folder data set (seeded)"
    )
    size: Annotated[int, Field(ge=8, le=256)] = 32
    channels: Literal[1, 3] = 3
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    normalization: Literal["cifar10", "cifar100", "imagenet", "none"] | Normalization = "cifar10"

    @model_validator(mode="after")
    def _check(self) -> FederatedData:
        if self.source in ("cifar10", "cifar100", "folder") and self.path is None:
            raise ValueError(f"data.source {self.source!r} needs data.path")
        if self.source == "patches" and self.path is not None:
            raise ValueError("the patch task is made from shipped photos and takes no path")
        return self

    def patch_photos(self) -> list[str]:
        """The patch task's classes, one photo each (known without loading a pixel)."""
        from service.data.patches import DEFAULT_PATCH_PHOTOS

        return list(self.photos or DEFAULT_PATCH_PHOTOS)


class Partition(Frozen):
    """How the training pool is dealt to the clients."""

    kind: Literal["iid", "dirichlet"] = Field(
        default="iid",
        description="iid: a seeded shuffle dealt evenly; dirichlet: per class, shares drawn from "
        "Dir(alpha) over the clients (small alpha: each client sees few classes)",
    )
    alpha: Annotated[float, Field(gt=0, le=1000)] = 0.5
    samples_per_client: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="cap each client's shard at this many samples; none: the whole pool"
    )


class LocalTraining(Frozen):
    """What every client does locally each round (service.fl's client, exactly)."""

    protocol: Literal["fedsgd", "fedavg"] = "fedavg"
    lr: Annotated[float, Field(gt=0)] = 0.05
    local_epochs: Annotated[int, Field(ge=1, le=100)] = 1
    batch_size: Annotated[int, Field(ge=1)] | None = Field(
        default=8, description="FedAvg mini-batch size; FedSGD always uses the client's whole shard"
    )
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    bn_mode: Literal["train", "eval"] = "train"


class FederationAudit(Frozen):
    """Which rounds to attack, whose update, and how."""

    rounds: list[Annotated[int, Field(ge=1, le=MAX_ROUNDS)]] = Field(
        default_factory=list, max_length=100, description="rounds whose update is attacked"
    )
    client: Annotated[int, Field(ge=0)] | None = Field(
        default=None,
        description="the audited client; it takes part in every audited round. None: the "
        "lowest-numbered client sampled in that round",
    )
    attack: AttackSpec = Field(default_factory=InvertingGradientsParams)
    knowledge: Knowledge = Knowledge.TRAINING_DETAILS
    budget: Budget = Field(default_factory=lambda: Budget(iterations=500))
    igsa_samples: Annotated[int, Field(ge=1, le=64)] = Field(
        default=8, description="perturbations per IGSA estimate"
    )
    igsa_radius: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.05, description="IGSA's perturbation norm relative to each image's norm"
    )
    verdict: VerdictSpec = Field(
        default_factory=VerdictSpec,
        description="the audit jobs' leakage estimate (their client's shard is known, so by default "
        "none); when: always sets it beside the true scores in each audited round, on the shipped photos",
    )

    @field_validator("verdict")
    @classmethod
    def _shipped_proxy(cls, v: VerdictSpec) -> VerdictSpec:
        if v.proxy_data is not None:
            raise ValueError(
                "a federation's audits estimate on the shipped photos: leave verdict.proxy_data out"
            )
        return v

    @field_validator("rounds")
    @classmethod
    def _sorted(cls, v: list[int]) -> list[int]:
        return sorted(set(v))


class FederationSpec(YamlSpec):
    what: ClassVar[str] = "federation spec"

    model: ModelSpec = Field(description="architecture and knobs; weights: the initial global model")
    data: FederatedData = Field(default_factory=FederatedData)
    num_clients: Annotated[int, Field(ge=1, le=100_000)] = 10
    clients_per_round: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="clients sampled each round (seeded); none: all of them"
    )
    rounds: Annotated[int, Field(ge=1, le=MAX_ROUNDS)] = 20
    partition: Partition = Field(default_factory=Partition)
    client: LocalTraining = Field(default_factory=LocalTraining)
    defenses: list[DefenseSpec] = Field(
        default_factory=list, max_length=8, description="post-processing every client applies before sharing"
    )
    server_lr: Annotated[float, Field(gt=0, le=100)] = Field(
        default=1.0, description="the server's step along the sample-weighted mean update"
    )
    checkpoint_rounds: list[Annotated[int, Field(ge=0, le=MAX_ROUNDS)]] | Literal["all"] = Field(
        default="all", description="rounds whose global model is stored (0: the initial model)"
    )
    audit: FederationAudit = Field(default_factory=FederationAudit)
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    time_limit_s: Annotated[float, Field(gt=0, le=7 * 24 * 3600)] | None = Field(
        default=None, description="wall-clock limit of the whole federation; the service sets its default"
    )

    @model_validator(mode="after")
    def _check(self) -> FederationSpec:
        per_round = self.clients_per_round or self.num_clients
        if per_round > self.num_clients:
            raise ValueError(
                f"clients_per_round={per_round} is more than the federation's num_clients={self.num_clients}"
            )
        late = [r for r in self.audit.rounds if r > self.rounds]
        if late:
            raise ValueError(f"audit.rounds {late} lie beyond the federation's {self.rounds} rounds")
        if self.audit.client is not None and self.audit.client >= self.num_clients:
            raise ValueError(
                f"audit.client={self.audit.client} does not exist: clients are 0..{self.num_clients - 1}"
            )
        if isinstance(self.checkpoint_rounds, list):
            late = [r for r in self.checkpoint_rounds if r > self.rounds]
            if late:
                raise ValueError(f"checkpoint_rounds {late} lie beyond the federation's {self.rounds} rounds")
        if self.model.weights is not None and self.model.weights.startswith("fed:"):
            raise ValueError("model.weights names a file or an uploaded model, not a federation's checkpoint")
        return self

    @property
    def per_round(self) -> int:
        return self.clients_per_round or self.num_clients

    def checkpoints(self) -> list[int]:
        """The rounds whose global model is stored; an audited round also keeps the model it was sent."""
        chosen = range(self.rounds + 1) if self.checkpoint_rounds == "all" else self.checkpoint_rounds
        return sorted({*chosen, *(r - 1 for r in self.audit.rounds)})

    def check_knowledge(self) -> None:
        if self.audit.rounds:
            check_knowledge(self.audit.attack, self.audit.knowledge)

    def client_rounds(self) -> int:
        """The work a federation asks for, in local trainings: what the service's limits bound."""
        return self.per_round * self.rounds
