"""The privacy-gate policy: which attacks to run on an update, under which what-if defenses, and
the thresholds every result must meet. Torch-free; read from YAML (extra `cli`) or JSON.

    model: {arch: lenet, image_shape: [3, 32, 32], num_classes: 10}
    update: {kind: gradient, normalization: cifar10, num_images: 1}
    knowledge: 1
    attacks:
      - attack: {name: dlg}
        budget: {iterations: 300}
      - inverting_gradients              # an attack with its defaults
    scenarios:                           # default: the update as shared, gated
      - name: as-shared
      - name: int8
        defenses: [{name: quantize, bits: 8}]
        gate: false                      # reported, not gated
    thresholds:
      - {metric: psnr, max: 20}          # worst case (the most leaked image) by default
      - {metric: ssim, max: 0.5, over: per_image}
      - {metric: lpips, min: 0.3, required: false}
      - {metric: label_accuracy, max: 1.0}
    convergence: {on_unconverged: error} # an attack still improving at the end fails the gate (exit 2)
    verdict:                             # the leakage estimate of jobs without ground truth
      shadows: 5                         # K shadow audits (default 3)
      budget: {iterations: 500}          # each shadow attack's budget (default: the attack's)
      proxy_data: proxy.safetensors      # the platform's own sample images (default: shipped photos)

`thresholds` may also be a mapping of shorthands: ``{max_psnr: 20, min_lpips: 0.3}`` (worst case).

Without the client's images (no ground truth) a job carries a leakage estimate instead of
metrics; thresholds on psnr, ssim and lpips (mean or worst case) then apply to the estimate, by
default to the leaky end of its interval (`estimate: value` for the point estimate).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gradleak_client._exceptions import GradleakError

MetricName = Literal["psnr", "ssim", "lpips", "mse", "label_accuracy", "label_accuracy_positional"]
Over = Literal["worst_case", "mean", "per_image"]
EstimateSide = Literal["leaky_end", "value"]
ESTIMATED_METRICS = frozenset({"psnr", "ssim", "lpips"})

# Which way each metric means more leakage: a threshold must bound it from the leaking side.
MORE_LEAK_WHEN_HIGHER: dict[str, bool] = {
    "psnr": True,
    "ssim": True,
    "label_accuracy": True,
    "label_accuracy_positional": True,
    "lpips": False,
    "mse": False,
}
LABEL_METRICS = frozenset({"label_accuracy", "label_accuracy_positional"})
UNITS = {"psnr": " dB"}
SHORTHAND_PREFIXES = ("max_", "min_")


class PolicyError(GradleakError):
    """The policy file cannot be read or is not a valid policy."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelInfo(_Strict):
    """The architecture the checkpoint belongs to (see the catalog's architectures)."""

    arch: str
    image_shape: tuple[int, int, int]
    num_classes: int = 10
    knobs: dict[str, Any] = Field(default_factory=dict)


class UpdateInfo(_Strict):
    """What the update is and what the server knows of how the client made it."""

    kind: Literal["gradient", "delta", "weights"] = "gradient"
    normalization: str | dict[str, list[float]] = "cifar10"
    num_images: int | None = None
    labels: list[int] | None = None
    client: dict[str, Any] = Field(default_factory=dict)


class AttackRun(_Strict):
    """One attack of the policy: its parameters, budget, and the knowledge granted to it."""

    id: str | None = None
    attack: dict[str, Any]
    budget: dict[str, Any] | None = None
    knowledge: int | None = Field(default=None, ge=0, le=5)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"attack": {"name": data}}
        if isinstance(data, dict) and "attack" not in data and "name" in data:
            reserved = {"id", "budget", "knowledge"}
            params = {k: v for k, v in data.items() if k not in reserved}
            return {**{k: v for k, v in data.items() if k in reserved}, "attack": params}
        return data

    @field_validator("attack")
    @classmethod
    def _named(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(v.get("name"), str):
            raise ValueError(
                "an attack needs a name (dlg, inverting_gradients, gradinversion, fedavg_unroll)"
            )
        return v


class Scenario(_Strict):
    """The update as shared (no defenses) or a what-if: defenses applied to it before the attack."""

    name: str = Field(min_length=1, max_length=80)
    defenses: list[dict[str, Any]] = Field(default_factory=list, max_length=8)
    gate: bool = Field(default=True, description="false: reported, but never fails the gate")


class Threshold(_Strict):
    """A bound the results must meet: `max` for metrics where higher means more leakage (PSNR,
    SSIM, label accuracy), `min` for the others (LPIPS, MSE)."""

    metric: MetricName
    max: float | None = None
    min: float | None = None
    over: Over = Field(default="worst_case", description="worst_case, mean, or per_image (each image)")
    required: bool = Field(default=True, description="false: skipped (with the reason) when unavailable")
    estimate: EstimateSide = Field(
        default="leaky_end",
        description="a job with no ground truth is checked on its leakage estimate: the leaky end of "
        "its interval (the upper end for PSNR/SSIM, the lower for LPIPS), or its value",
    )

    @model_validator(mode="after")
    def _check(self) -> Threshold:
        if (self.max is None) == (self.min is None):
            raise ValueError(f"threshold on {self.metric}: give exactly one of max and min")
        higher = MORE_LEAK_WHEN_HIGHER[self.metric]
        if higher and self.max is None:
            raise ValueError(f"a higher {self.metric} means more leakage: bound it with max, not min")
        if not higher and self.min is None:
            raise ValueError(f"a lower {self.metric} means more leakage: bound it with min, not max")
        if self.metric in LABEL_METRICS and self.over == "per_image":
            raise ValueError(f"{self.metric} is one value per job; use over: worst_case")
        return self

    @property
    def bound(self) -> float:
        value = self.max if self.max is not None else self.min
        assert value is not None
        return value

    def passes(self, value: float) -> bool:
        return value <= self.bound if self.max is not None else value >= self.bound

    def subject(self) -> str:
        """What is bounded, e.g. "worst-case psnr"."""
        if self.metric in LABEL_METRICS:
            return self.metric
        scope = {"worst_case": "worst-case", "mean": "mean", "per_image": "per-image"}[self.over]
        return f"{scope} {self.metric}"

    def describe(self) -> str:
        """E.g. "worst-case psnr <= 20 dB"."""
        op = "<=" if self.max is not None else ">="
        return f"{self.subject()} {op} {self.bound:g}{UNITS.get(self.metric, '')}"


class Convergence(_Strict):
    """When an attack's answer is weak: it ran fewer iterations than it needs to converge on the
    model, so a larger budget may leak more and a pass says little. The service reports how many
    iterations the attack was measured to need on the architecture (`attack.convergence`)."""

    min_iterations: int | None = Field(
        default=None,
        ge=1,
        description="the iterations every attack must run; default: the service's measurement for "
        "the attack and architecture (bench/results/convergence-cpu.json), where it has one",
    )
    on_unconverged: Literal["warn", "error"] = Field(
        default="warn",
        description="warn: said in the report, the verdict stands; error: the gate does not pass (exit 2)",
    )


class VerdictOptions(_Strict):
    """The leakage estimate each job makes when no ground truth is given (the server's
    `verdict`): K shadow clients like the real one, on proxy images, attacked and scored."""

    when: Literal["auto", "always", "never"] | None = Field(
        default=None, description="auto (the server's default): only without ground truth; always; never"
    )
    shadows: int | None = Field(default=None, ge=2, le=16, description="K, the shadow audits per job")
    budget: dict[str, Any] | None = Field(
        default=None, description="each shadow attack's budget, e.g. {iterations: 500}; default: the attack's"
    )
    proxy_data: str | None = Field(
        default=None,
        description="proxy images of the platform's own domain: a safetensors file (`images`, N x C x H x "
        "W in [0, 1]; relative paths from the policy's folder) the gate uploads, or an uploaded set's "
        "id (gt_...); default: the service's shipped photos",
    )
    seed: int | None = Field(default=None, ge=0)
    igsa: bool | None = None

    def request(self, proxy_data_id: str | None) -> dict[str, Any]:
        """The job request's `verdict`, with the proxy data as an upload id."""
        out = self.model_dump(exclude_none=True, exclude={"proxy_data"})
        if proxy_data_id is not None:
            out["proxy_data"] = proxy_data_id
        return out

    def proxy_file(self, base: Path | None) -> Path | None:
        """The proxy data as a local file to upload (None when it is an upload id or not given)."""
        if self.proxy_data is None or self.proxy_data.startswith("gt_"):
            return None
        path = Path(self.proxy_data)
        return path if path.is_absolute() or base is None else base / path


class Policy(_Strict):
    version: Literal[1] = 1
    model: ModelInfo | None = Field(default=None, description="needed when a model file is uploaded")
    update: UpdateInfo = Field(default_factory=UpdateInfo)
    knowledge: int | None = Field(default=None, ge=0, le=5, description="default: the server's (1)")
    seed: int = Field(default=0, ge=0)
    attacks: list[AttackRun] = Field(min_length=1, max_length=32)
    scenarios: list[Scenario] = Field(default_factory=lambda: [Scenario(name="as-shared")], min_length=1)
    thresholds: list[Threshold] = Field(min_length=1)
    convergence: Convergence = Field(default_factory=Convergence)
    verdict: VerdictOptions = Field(
        default_factory=VerdictOptions,
        description="the leakage estimate of jobs without ground truth (shadows, budget, proxy_data)",
    )

    @field_validator("thresholds", mode="before")
    @classmethod
    def _shorthands(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        rules = []
        for key, bound in v.items():
            if not (isinstance(key, str) and key.startswith(SHORTHAND_PREFIXES)):
                raise ValueError(
                    f"unknown threshold {key!r}: use e.g. max_psnr, min_lpips, max_label_accuracy"
                )
            side, metric = key[:3], key[4:]
            rules.append({"metric": metric, side: bound})
        return rules

    @model_validator(mode="after")
    def _unique_names(self) -> Policy:
        names = Counter(s.name for s in self.scenarios)
        repeated = [n for n, c in names.items() if c > 1]
        if repeated:
            raise ValueError(f"scenario names repeat: {', '.join(repeated)}")
        ids = Counter(a.id for a in self.attacks if a.id is not None)
        repeated = [n for n, c in ids.items() if c > 1]
        if repeated:
            raise ValueError(f"attack ids repeat: {', '.join(repeated)}")
        return self

    def attack_ids(self) -> list[str]:
        """Each attack's id: its `id`, else its name (numbered when a name repeats)."""
        names = Counter(a.attack["name"] for a in self.attacks if a.id is None)
        seen: Counter[str] = Counter()
        out = []
        for a in self.attacks:
            if a.id is not None:
                out.append(a.id)
                continue
            name = a.attack["name"]
            seen[name] += 1
            out.append(name if names[name] == 1 else f"{name}-{seen[name]}")
        return out

    # --- reading --------------------------------------------------------------------------

    @classmethod
    def from_data(cls, data: Any, source: str = "policy") -> Policy:
        if not isinstance(data, dict):
            raise PolicyError(
                f"{source}: a policy is a mapping (model, update, attacks, scenarios, thresholds)"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
            raise PolicyError(f"{source}: {where + ': ' if where else ''}{first['msg']}{more}") from None

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a policy from a YAML or JSON file."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise PolicyError(f"cannot read the policy {p}: {e.strerror}") from None
        return cls.from_data(parse_yaml_or_json(text, str(p)), str(p))


def parse_yaml_or_json(text: str, source: str) -> Any:
    """YAML when PyYAML is installed (extra `cli`); JSON (which is YAML) always."""
    try:
        import yaml
    except ImportError:
        try:
            return json.loads(text)
        except ValueError:
            raise PolicyError(
                f"{source}: reading YAML needs PyYAML (pip install pyyaml, or the client's [cli] extra); "
                "or write the file as JSON"
            ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PolicyError(f"{source}: not valid YAML: {e}") from None
