"""The job spec: one frozen, torch-free object that says what to attack and how.

The CLI builds one from flags or YAML, the API receives one as JSON, the queue carries only its
id and the worker hands it to the one runner. Artifacts are referred to by string references
(a local path for the CLI, an upload id for the service); the runner resolves them.
"""

from __future__ import annotations

import json
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from service.errors import KnowledgeError, SpecError

MAX_IMAGE_SIDE = 512
JsonScalar = str | int | float | bool | None


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class YamlSpec(Frozen):
    """A spec that reads and writes itself as JSON or YAML (JSON is YAML)."""

    what: ClassVar[str] = "spec"

    def to_json(self) -> str:
        return self.model_dump_json()

    def to_yaml(self) -> str:
        return yaml.safe_dump(json.loads(self.to_json()), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Self:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SpecError(f"not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise SpecError(f"a {cls.what} is a mapping")
        return cls.model_validate(data)

    @classmethod
    def from_file(cls, path: str | Path) -> Self:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise SpecError(f"cannot read spec {p}: {e.strerror}") from None
        return cls.from_yaml(text)


class Knowledge(IntEnum):
    """The SoK's assumption levels: each level grants everything below it."""

    BASIC = 0  # architecture, weights, the shared update
    PRIORS = 1  # natural-image priors (total variation, boxed pixels)
    DATA_DISTRIBUTION = 2  # the client's data distribution (a generator trained on similar data)
    TRAINING_DETAILS = 3  # the client's lr, local epochs, batch size, sample count
    BN_STATISTICS = 4  # the batch-norm statistics of the client's batch
    MALICIOUS_SERVER = 5  # the server may modify the model it sends

    @property
    def describe(self) -> str:
        return _KNOWLEDGE_TEXT[self]


_KNOWLEDGE_TEXT = {
    Knowledge.BASIC: "basic information (architecture, weights, the update)",
    Knowledge.PRIORS: "image priors",
    Knowledge.DATA_DISTRIBUTION: "the client's data distribution (a generator trained on similar data)",
    Knowledge.TRAINING_DETAILS: "the client's training details (lr, epochs, batch size, sample count)",
    Knowledge.BN_STATISTICS: "the batch-norm statistics of the client's data",
    Knowledge.MALICIOUS_SERVER: "a malicious server that may modify the model",
}


# ---------------------------------------------------------------------------------------------
# model, update, data
# ---------------------------------------------------------------------------------------------


# Model sources that are not registered architectures: the graph comes from `ModelSpec.source`.
SOURCE_ARCHS = ("onnx", "module")


class ModelSpec(Frozen):
    arch: str = Field(
        description="registered architecture name (see the catalog), or 'onnx' (an uploaded ONNX graph "
        "in `source`) or 'module' (a torch module given to this process, named by `source`)"
    )
    knobs: dict[str, JsonScalar | list[int]] = Field(
        default_factory=dict, description="constructor knobs of the architecture"
    )
    weights: str | None = Field(
        default=None,
        description="safetensors artifact with the weights the server sent; none: a fresh "
        "initialisation seeded by init_seed (an untrained model), or the weights the ONNX graph or "
        "the module holds",
    )
    init_seed: int = 0
    source: str | None = Field(
        default=None,
        description="arch 'onnx': the ONNX artifact (graph and weights); arch 'module': an import path "
        "'package.module:factory' (CLI) or the handle of a module object (embedded SDK); only local "
        "runs resolve modules, a server takes models as ONNX",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.arch in SOURCE_ARCHS:
            if self.source is None:
                raise ValueError(f"arch {self.arch!r} needs model.source")
            if self.knobs:
                raise ValueError(f"arch {self.arch!r} takes no knobs")
        elif self.source is not None:
            raise ValueError(f"model.source is for arch 'onnx' or 'module', not {self.arch!r}")
        return self


MAX_CANDIDATES_PER_FACT = 16
# Plausible values of a fact the attacker was told nothing about, searched by the FedAvg-aware
# attack (batch sizes: the powers of two below the image count, and the count itself).
SEARCH_LRS = (1e-3, 1e-2, 1e-1)
SEARCH_EPOCHS = (1, 2, 4, 8)


class LrRange(Frozen):
    """A learning rate known only to lie in [min, max]: searched at `points` log-spaced values."""

    min: float = Field(gt=0, description="smallest plausible learning rate")
    max: float = Field(gt=0, description="largest plausible learning rate")
    points: int = Field(
        default=4, ge=2, le=MAX_CANDIDATES_PER_FACT, description="log-spaced values tried, both ends included"
    )

    @model_validator(mode="after")
    def _check(self) -> LrRange:
        if self.min > self.max:
            raise ValueError(f"lr range: min {self.min} is above max {self.max}")
        return self

    def values(self) -> list[float]:
        if self.min == self.max:
            return [self.min]
        ratio = self.max / self.min
        return [self.min * ratio ** (i / (self.points - 1)) for i in range(self.points)]


def _distinct(values: list[Any], what: str) -> list[Any]:
    if len(set(values)) != len(values):
        raise ValueError(f"{what} candidates repeat a value: {values}")
    return values


class TrainingCandidates(Frozen):
    """Plausible values of client facts the attacker knows only roughly. The FedAvg-aware attack
    screens every combination and keeps the one its own matching loss prefers."""

    lr: (
        Annotated[
            Annotated[LrRange, Tag("range")]
            | Annotated[
                list[Annotated[float, Field(gt=0)]],
                Field(min_length=1, max_length=MAX_CANDIDATES_PER_FACT),
                Tag("list"),
            ],
            Discriminator(lambda v: "list" if isinstance(v, list) else "range"),
        ]
        | None
    ) = Field(default=None, description="a range {min, max[, points]} or a list of learning rates")
    local_epochs: (
        Annotated[
            list[Annotated[int, Field(ge=1, le=1000)]],
            Field(min_length=1, max_length=MAX_CANDIDATES_PER_FACT),
        ]
        | None
    ) = Field(default=None, description="plausible local epoch counts")
    batch_size: (
        Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1, max_length=MAX_CANDIDATES_PER_FACT)]
        | None
    ) = Field(default=None, description="plausible batch sizes")
    shuffle_seed: (
        Annotated[list[int | None], Field(min_length=1, max_length=MAX_CANDIDATES_PER_FACT)] | None
    ) = Field(default=None, description="plausible shuffling seeds (null: the samples' given order)")

    @field_validator("lr", "local_epochs", "batch_size", "shuffle_seed")
    @classmethod
    def _no_repeats(cls, v: Any, info: Any) -> Any:
        return _distinct(v, info.field_name) if isinstance(v, list) else v

    def lr_values(self) -> list[float] | None:
        if isinstance(self.lr, LrRange):
            return self.lr.values()
        return self.lr


# the facts a spec may give as candidates (a list, or for lr also a range) instead of one value
SEARCHABLE_FACTS = ("lr", "local_epochs", "batch_size", "shuffle_seed")


class ClientTraining(Frozen):
    """What the client did locally. Every field may be unknown (None): that is a legitimate value.

    What the attacker is told (`update.client`) may give lr, local_epochs, batch_size and
    shuffle_seed as candidates instead: `lr: {min: 0.01, max: 0.1}` or a list, `local_epochs:
    [1, 2, 4]`, `batch_size: [1, 2, 4, 8]`, `shuffle_seed: [0, 1, null]`. They are stored under
    `candidates` (the fact itself is then unknown), and the FedAvg-aware attack searches them.
    """

    protocol: Literal["fedsgd", "fedavg"] | None = None
    lr: Annotated[float, Field(gt=0)] | None = None
    local_epochs: Annotated[int, Field(ge=1, le=1000)] | None = None
    batch_size: Annotated[int, Field(ge=1)] | None = None
    num_samples: Annotated[int, Field(ge=1)] | None = None
    optimizer: Literal["sgd"] | None = None
    momentum: Annotated[float, Field(ge=0, lt=1)] | None = None
    bn_mode: Literal["train", "eval"] | None = Field(
        default=None,
        description="batch norm on the batch's statistics (train) or on the model's running statistics "
        "(eval, when the server sends public BN buffers); a protocol fact the attacker knows at every "
        "knowledge level; unknown: train",
    )
    shuffle_seed: int | None = None
    candidates: TrainingCandidates | None = Field(
        default=None,
        description="plausible values of facts known only roughly (lr, local_epochs, batch_size, "
        "shuffle_seed), searched by the FedAvg-aware attack; a list or range given for the fact "
        "itself lands here",
    )

    @model_validator(mode="before")
    @classmethod
    def _candidates_shorthand(cls, data: Any) -> Any:
        """`lr: {min, max}` or `local_epochs: [1, 2]` moves the candidates under `candidates`."""
        if not isinstance(data, dict):
            return data
        moved = {k: data[k] for k in SEARCHABLE_FACTS if isinstance(data.get(k), (list, dict))}
        if not moved:
            return data
        given = data.get("candidates") or {}
        if isinstance(given, BaseModel):
            given = given.model_dump(exclude_none=True)
        if not isinstance(given, dict):
            return data  # let the field's own validation name the problem
        both = sorted(set(moved) & {k for k, v in given.items() if v is not None})
        if both:
            raise ValueError(f"{', '.join(both)} given both as candidates and under candidates")
        return {**data, **dict.fromkeys(moved), "candidates": {**given, **moved}}

    @model_validator(mode="after")
    def _check_candidates(self) -> ClientTraining:
        if self.candidates is None:
            return self
        exact = [
            k
            for k in SEARCHABLE_FACTS
            if getattr(self, k) is not None and getattr(self.candidates, k) is not None
        ]
        if exact:
            raise ValueError(
                f"{', '.join(exact)} given both exactly and as candidates; give one value or candidates"
            )
        return self

    def known(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class SimulatedClient(Frozen):
    """A victim gradleak simulates: it trains on these images and shares the update."""

    source: Literal["photos", "folder", "cifar10", "cifar100"] = "photos"
    images: list[str] = Field(
        default_factory=lambda: ["astronaut"],
        description="photo names for source=photos; indices for cifar; file names for folder",
        min_length=1,
        max_length=256,
    )
    labels: list[int] | None = Field(default=None, description="one label per image; default 0, 1, ...")
    path: str | None = Field(default=None, description="dataset directory for folder/cifar sources")
    training: ClientTraining = Field(default_factory=lambda: ClientTraining(protocol="fedsgd"))

    @model_validator(mode="after")
    def _check(self) -> SimulatedClient:
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.labels)} labels for {len(self.images)} images")
        if self.source != "photos" and self.path is None:
            raise ValueError(f"source {self.source!r} needs a dataset path")
        if self.training.candidates is not None:
            raise ValueError(
                "a simulated client trains with one value of each fact: give candidates (lists, "
                "ranges) in update.client, what the attacker is told, not in simulate.training"
            )
        return self


class UpdateSpec(Frozen):
    kind: Literal["gradient", "delta", "weights"] = Field(
        default="gradient",
        description="gradient (FedSGD), delta = w_new - w_old, or weights = w_new",
    )
    artifact: str | None = Field(default=None, description="safetensors file of the shared update")
    simulate: SimulatedClient | None = Field(
        default=None, description="simulate a client instead of reading an uploaded update"
    )
    client: ClientTraining = Field(
        default_factory=ClientTraining, description="what the server was told the client did"
    )

    @model_validator(mode="after")
    def _check(self) -> UpdateSpec:
        if (self.artifact is None) == (self.simulate is None):
            raise ValueError("give exactly one of update.artifact and update.simulate")
        return self


class Normalization(Frozen):
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @field_validator("std")
    @classmethod
    def _positive(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(s <= 0 for s in v):
            raise ValueError("std must be positive")
        return v


NORMALIZATIONS: dict[str, Normalization] = {
    "cifar10": Normalization(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": Normalization(mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
    "imagenet": Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "none": Normalization(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
}


class DataSpec(Frozen):
    shape: tuple[int, int, int] = Field(default=(3, 32, 32), description="C, H, W of one image")
    num_classes: Annotated[int, Field(ge=2, le=100_000)] = 10
    normalization: Literal["cifar10", "cifar100", "imagenet", "none"] | Normalization = "cifar10"
    num_images: Annotated[int, Field(ge=1, le=256)] | None = Field(
        default=None, description="how many images the update covers; unknown: inferred"
    )
    labels: list[int] | None = Field(default=None, description="the client's labels, if the server has them")

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        c, h, w = v
        if c not in (1, 3):
            raise ValueError("images have 1 or 3 channels")
        if not (8 <= h <= MAX_IMAGE_SIDE and 8 <= w <= MAX_IMAGE_SIDE):
            raise ValueError(f"image sides must lie in 8..{MAX_IMAGE_SIDE}")
        return v

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        if self.labels is not None:
            bad = [y for y in self.labels if not 0 <= y < self.num_classes]
            if bad:
                raise ValueError(f"labels {bad[:5]} outside 0..{self.num_classes - 1}")
            if self.num_images is not None and len(self.labels) != self.num_images:
                raise ValueError(f"{len(self.labels)} labels for num_images={self.num_images}")
        return self

    def resolved_normalization(self) -> Normalization:
        n = self.normalization
        n = NORMALIZATIONS[n] if isinstance(n, str) else n
        c = self.shape[0]
        if len(n.mean) == c:
            return n
        if c == 1:
            return Normalization(mean=(sum(n.mean) / len(n.mean),), std=(sum(n.std) / len(n.std),))
        raise ValueError(f"normalization has {len(n.mean)} channels, images have {c}")


# ---------------------------------------------------------------------------------------------
# attacks: a discriminated union on `name`; each declares the knowledge it needs
# ---------------------------------------------------------------------------------------------


class AttackParams(Frozen):
    required_knowledge: ClassVar[Knowledge] = Knowledge.BASIC
    label_strategy: Literal["auto", "known", "infer", "joint"] = Field(
        default="auto",
        description="auto: the server's labels if given, else inferred from the last layer",
    )
    match_layers: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="match only the gradients of these parameters: each entry a parameter name or a "
        "module name that prefixes some (a block such as GoogLeNet's inception3a); checked against "
        "the model; default: every trainable parameter",
    )

    @field_validator("match_layers")
    @classmethod
    def _distinct_layers(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"match_layers repeats a name: {value}")
        return value


class DLGParams(AttackParams):
    """Deep Leakage from Gradients: L2 gradient matching with L-BFGS."""

    name: Literal["dlg"] = "dlg"
    lr: float = Field(default=1.0, gt=0, description="L-BFGS step size")
    history_size: int = Field(default=100, ge=1, le=1000, description="L-BFGS curvature pairs kept")
    max_eval: int = Field(
        default=20, ge=1, le=1000, description="objective evaluations per L-BFGS step (one iteration)"
    )
    init_scale: float = Field(default=1.0, gt=0, description="standard deviation of the random start")


class InvertingGradientsParams(AttackParams):
    """Inverting Gradients (Geiping et al.): gradient matching, TV prior, signed Adam.

    The defaults were picked by iteration-matched sweeps over the benchmark's cases and seeds
    (bench/sweep.py): a cosine learning-rate schedule, a low-contrast uniform start, and the L2
    cost taken relative to the target's squared norm so one TV weight suits every model.
    """

    required_knowledge: ClassVar[Knowledge] = Knowledge.PRIORS
    name: Literal["inverting_gradients"] = "inverting_gradients"
    lr: float = Field(default=0.1, gt=0, description="Adam's peak learning rate")
    tv_weight: float = Field(
        default=2e-4,
        ge=0,
        description="weight of total variation against the matching cost (the L2 cost is divided "
        "by the target's squared norm and the TV counted per image; the cosines are scale-free "
        "and take the batch's mean TV)",
    )
    signed: bool = Field(default=True, description="step on the sign of the gradient (signed Adam)")
    boxed: bool = Field(default=True, description="keep pixels inside the valid [0, 1] range")
    cost: Literal["auto", "cosine", "cosine_global", "l2"] = Field(
        default="auto",
        description="auto: l2 (relative to the target's squared norm) when the target is a gradient "
        "of known scale, else cosine (scale-free)",
    )
    layer_weights: Literal["uniform", "linear", "exp"] = Field(
        default="uniform", description="how layers are weighted in the matching cost, first to last"
    )
    init: Literal["randn", "rand", "zeros"] = Field(
        default="rand",
        description="start images in the normalised space: rand uniform in [-1, 1], randn standard "
        "normal, zeros the dataset mean",
    )
    warmup_iterations: int = Field(default=0, ge=0, description="iterations of linear learning-rate warm-up")
    schedule: Literal["step", "cosine"] = Field(
        default="cosine", description="learning-rate schedule over the budget: cosine or step decay"
    )
    coarse_fraction: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="share of the budget spent on a coarse image (blocks of coarse_block pixels) "
        "before refining at full resolution; 0 starts at full resolution",
    )
    coarse_block: int = Field(
        default=2, ge=2, le=16, description="block side in pixels of the coarse phase's image"
    )
    finish_steps: int = Field(
        default=0,
        ge=0,
        le=50,
        description="after the iterations, at most this many damped Gauss-Newton steps on the matching "
        "residual, each kept only if the residual falls (FedSGD gradients of fixed labels, noise or top-k "
        "at most; elsewhere none): an attack that already stands in the basin of the client's images "
        "gets there. 0: none",
    )
    scale_invariance: Literal["auto", "off"] = Field(
        default="auto",
        description="inverting_gradients, and gradinversion with bn_weight 0: auto: when the client's "
        "gradient is blind to the images' scale (BN in train "
        "mode right after a bias-free first convolution, checked numerically), keep every iterate at "
        "one RMS and choose the scale at the end from the valid pixel range (clip_fraction); off: "
        "optimise the plain boxed image",
    )
    stage_map: Literal["auto", "off"] = Field(
        default="auto",
        description="inverting_gradients: auto: for one image of known label whose ResNet client runs BN "
        "in train mode, read the second stage's output map from the third stage's low-rank weight "
        "gradients (a linear solve) and match it and the gradients below it instead of the whole "
        "gradient (the details say whether it applied and why not); off: match the whole gradient",
    )
    scale_rms: float = Field(
        default=1.0,
        gt=0,
        le=10,
        description="scale-blind path: root-mean-square of the iterates in the normalised space "
        "(1 is the dataset's own spread)",
    )
    clip_fraction: float = Field(
        default=0.01,
        ge=0,
        lt=0.5,
        description="scale-blind path: the final scale is the largest that pushes at most this share "
        "of the pixels outside [0, 1]",
    )


class GradInversionParams(InvertingGradientsParams):
    """GradInversion (Yin et al.): Inverting Gradients + the client's BN statistics + group consistency."""

    required_knowledge: ClassVar[Knowledge] = Knowledge.BN_STATISTICS
    name: Literal["gradinversion"] = "gradinversion"  # type: ignore[assignment]
    bn_weight: float = Field(
        default=1e-3, ge=0, description="weight of the distance to the client's batch-norm statistics"
    )
    group_size: int = Field(
        default=1, ge=1, le=16, description="restarts pulled towards their mean (group consistency)"
    )
    group_weight: float = Field(default=1e-2, ge=0, description="weight of group consistency")


class FedAvgParams(InvertingGradientsParams):
    """The FedAvg-aware attack: unrolls the client's local training differentiably.

    It shares the default attack's cost and prior choices: with lr and step count known (or
    hypothesised by the search) the weight change's scale is known, and `auto` takes the L2 cost
    relative to its squared norm with the total variation counted per image; at one local step
    this is the default attack's objective on the FedSGD gradient.
    """

    required_knowledge: ClassVar[Knowledge] = Knowledge.TRAINING_DETAILS
    name: Literal["fedavg_unroll"] = "fedavg_unroll"  # type: ignore[assignment]
    unknown_facts: Literal["search", "single_step"] = Field(
        default="search",
        description="a fact (lr, local epochs, batch size) neither known nor given as candidates: "
        "search its plausible values (lr 1e-3, 1e-2, 1e-1; epochs 1, 2, 4, 8; batch sizes the "
        "powers of two below N and N), or single_step: SoK Case 2, one step on the whole batch "
        "matched by a scale-free cost",
    )
    search_fraction: float = Field(
        default=0.3,
        gt=0,
        lt=1,
        description="share of the budget spent screening the hypotheses of the client's training when "
        "facts are searched; the winner runs on the rest",
    )
    search_finalists: int = Field(
        default=3, ge=1, le=16, description="hypotheses kept after the first screening for a longer one"
    )
    finish_steps: Literal[0] = Field(  # type: ignore[assignment]
        default=0,
        description="not for this attack: the Gauss-Newton finish steps on one gradient, and a FedAvg "
        "update's unrolled training is not one",
    )


class GenerativeParams(AttackParams):
    """What the latent-space attacks (GIA-L) share: the generator the attacker holds (knowledge
    level 2, the client's data distribution), the matching cost, and a prior on the latents."""

    required_knowledge: ClassVar[Knowledge] = Knowledge.DATA_DISTRIBUTION
    generator: str = Field(
        description="the generator the attacker holds, trained on data like the client's: a generator "
        "artifact (safetensors with its manifest; a local path for the CLI, an upload id gen_... for the "
        "service). Its image shape (and, for a class-conditional one, class count) must match data"
    )
    cost: Literal["auto", "cosine", "cosine_global", "l2"] = Field(
        default="auto",
        description="matching cost, as Inverting Gradients': auto is l2 (relative to the target's squared "
        "norm) when the target is a gradient of known scale, else cosine",
    )
    layer_weights: Literal["uniform", "linear", "exp"] = Field(
        default="uniform", description="how layers are weighted in the matching cost, first to last"
    )
    tv_weight: float = Field(
        default=0.0,
        ge=0,
        description="weight of total variation on the generated images (the generator is the prior)",
    )
    latent_prior_weight: float = Field(
        default=1e-2,
        ge=0,
        description="weight of the latent-norm prior: the mean over images of "
        "(|z| / sqrt(latent_dim) - 1)^2, which keeps latents on the shell where a Gaussian "
        "latent's mass lies",
    )


class GiasParams(GenerativeParams):
    """GIAS (Jeon et al. 2021): gradient matching over the generator's latents, then over the latents
    and a per-restart copy of the generator's weights."""

    name: Literal["gias"] = "gias"
    latent_lr: float = Field(default=0.05, gt=0, description="Adam's peak learning rate for the latents")
    latent_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="share of the budget (iterations or time) for stage 1, the latents alone; the rest "
        "fine-tunes the generator with the latents (stage 2); 1 skips stage 2",
    )
    generator_lr: float = Field(
        default=1e-4, gt=0, description="Adam's peak learning rate for the generator's weights in stage 2"
    )


class GglParams(GenerativeParams):
    """GGL (Li et al. 2022): latent-only search through the generator, gradient-free or with Adam,
    adapted to the defenses applied to the update."""

    name: Literal["ggl"] = "ggl"
    optimizer: Literal["cma", "adam"] = Field(
        default="cma",
        description="cma: separable CMA-ES (diagonal covariance; gradient-free, one generation per "
        "iteration); adam: first-order on the latents",
    )
    population: int = Field(
        default=16, ge=4, le=256, description="CMA-ES candidates per generation (per restart)"
    )
    sigma: float = Field(default=0.5, gt=0, description="CMA-ES initial step size in latent units")
    latent_lr: float = Field(default=0.05, gt=0, description="Adam's peak learning rate (optimizer adam)")
    adaptive_defenses: bool = Field(
        default=True,
        description="replay the update's defenses on every trial gradient before matching: clipping, "
        "top-k sparsification, quantisation and sign from the spec's defenses (or top-k seen in the "
        "update's zero pattern); noise is not replayed (zero-mean noise adds a constant to the expected "
        "L2 cost)",
    )


AttackSpec = Annotated[
    DLGParams | InvertingGradientsParams | GradInversionParams | FedAvgParams | GiasParams | GglParams,
    Field(discriminator="name"),
]
ATTACK_PARAMS: dict[str, type[AttackParams]] = {
    p.model_fields["name"].default: p
    for p in (DLGParams, InvertingGradientsParams, GradInversionParams, FedAvgParams, GiasParams, GglParams)
}


# ---------------------------------------------------------------------------------------------
# defenses: post-processing the client applies before sharing ("what-if")
# ---------------------------------------------------------------------------------------------


class QuantizeDefense(Frozen):
    name: Literal["quantize"] = "quantize"
    bits: int = Field(default=8, ge=1, le=16, description="bits per value (QSGD levels 2^bits - 1)")
    stochastic: bool = Field(default=True, description="stochastic (unbiased) rounding, else nearest")


class TopKDefense(Frozen):
    name: Literal["topk"] = "topk"
    ratio: float = Field(default=0.1, gt=0, le=1, description="share of values kept (largest magnitude)")


class ClipDefense(Frozen):
    name: Literal["clip"] = "clip"
    max_norm: float = Field(default=1.0, gt=0, description="global L2 norm the update is clipped to")


class NoiseDefense(Frozen):
    name: Literal["noise"] = "noise"
    distribution: Literal["gaussian", "laplace"] = Field(default="gaussian", description="noise distribution")
    scale: float = Field(default=1e-3, ge=0, description="noise standard deviation (Laplace: its scale b)")


class SignDefense(Frozen):
    name: Literal["sign"] = "sign"


DefenseSpec = Annotated[
    QuantizeDefense | TopKDefense | ClipDefense | NoiseDefense | SignDefense,
    Field(discriminator="name"),
]


MAX_BUDGET_ITERATIONS = 1_000_000


class Budget(Frozen):
    iterations: Annotated[int, Field(ge=1, le=MAX_BUDGET_ITERATIONS)] = Field(
        default=1000,
        description="attack iterations; with only a time limit given, as many as the time allows "
        "(up to the server's limit)",
    )
    restarts: Annotated[int, Field(ge=1, le=64)] = 1
    time_limit_s: Annotated[float, Field(gt=0, le=7 * 24 * 3600)] | None = None

    def time_bound(self, cap: int = MAX_BUDGET_ITERATIONS) -> Budget:
        """A budget that gives a time limit and no iteration count runs until its time is up (at
        most `cap` iterations), instead of stopping at the default count within seconds."""
        if self.time_limit_s is not None and "iterations" not in self.model_fields_set:
            return self.model_copy(update={"iterations": cap})
        return self


class VerdictSpec(Frozen):
    """The leakage estimate for an update without the client's images (service.verdict): K shadow
    clients like the real one, trained on proxy data, attacked like it and scored."""

    when: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="auto: estimate when no ground truth is given (a scored run needs no estimate, "
        "and the K shadow attacks cost K times the attack); always; never",
    )
    shadows: Annotated[int, Field(ge=2, le=16)] = Field(
        default=5,
        description="K, the number of shadow clients (each one attack of the budget; with the default "
        "attack they run as one batched computation)",
    )
    budget: Budget | None = Field(default=None, description="each shadow attack's budget; none: the attack's")
    proxy_data: str | None = Field(
        default=None,
        description="safetensors with proxy `images` (N, C, H, W) in [0, 1], a ground-truth upload "
        "marked as proxy data by naming it here; none: the shipped photos",
    )
    seed: int = Field(default=0, ge=0, description="seeds the proxy images drawn and the shadows' attacks")
    igsa: bool = Field(
        default=True,
        description="report IGSA around the shadows' images, their reconstructions and the real "
        "reconstruction (cheap)",
    )


# ---------------------------------------------------------------------------------------------
# the job spec
# ---------------------------------------------------------------------------------------------


class JobSpec(YamlSpec):
    what: ClassVar[str] = "job spec"
    model: ModelSpec
    update: UpdateSpec
    data: DataSpec = Field(default_factory=DataSpec)
    knowledge: Knowledge = Knowledge.PRIORS
    attack: AttackSpec = Field(default_factory=InvertingGradientsParams)
    defenses: list[DefenseSpec] = Field(default_factory=list, max_length=8)
    budget: Budget = Field(default_factory=Budget)
    seed: int = 0
    ground_truth: str | None = Field(
        default=None, description="safetensors with the client's images and labels, for scoring only"
    )
    verdict: VerdictSpec = Field(
        default_factory=VerdictSpec, description="the leakage estimate without ground truth (shadow audits)"
    )

    @model_validator(mode="after")
    def _check(self) -> JobSpec:
        sim = self.update.simulate
        if sim is not None:
            n = len(sim.images)
            if self.data.num_images is not None and self.data.num_images != n:
                raise ValueError(f"data.num_images={self.data.num_images} but {n} simulated images")
            if sim.labels is not None and any(not 0 <= y < self.data.num_classes for y in sim.labels):
                raise ValueError(f"simulated labels outside 0..{self.data.num_classes - 1}")
        return self

    def client_training(self) -> ClientTraining:
        """What the server was told the client did (for a simulated client, the simulation's
        `training` is what it really did; `update.client` is what the attacker may be told)."""
        return self.update.client

    def check_knowledge(self) -> None:
        """Refuse a spec whose attack needs knowledge not granted, naming what is missing."""
        check_knowledge(self.attack, self.knowledge)


def check_knowledge(attack: AttackParams, granted: Knowledge) -> None:
    if granted >= Knowledge.MALICIOUS_SERVER:
        raise KnowledgeError(
            "knowledge level 5 (a malicious server that may modify the model) is granted, but no attack "
            "here uses it: the audit would run exactly as at level 4 while claiming more. Grant level 4 "
            "or lower"
        )
    need = attack.required_knowledge
    if granted < need:
        missing = [k for k in Knowledge if granted < k <= need]
        raise KnowledgeError(
            f"attack {attack.name!r} needs knowledge level {int(need)} ({need.describe}); "  # type: ignore[attr-defined]
            f"the spec grants level {int(granted)}. Missing: "
            + "; ".join(f"level {int(k)}: {k.describe}" for k in missing)
        )
