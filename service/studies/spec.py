"""The study spec: a base JobSpec or FederationSpec, axes over its fields, and seeds.

An axis names a field of the base spec by its dotted path (`update.simulate.training.local_epochs`,
`model.knobs.kernel_size`, `defenses`) and the values it takes. Axes combine as a grid (every
combination) or zipped (the i-th value of every axis together); every combination runs once per
seed. Expansion validates every point as a JobSpec or FederationSpec before anything is queued,
so a bad value is refused up front with the axis and the field that refused it. Torch-free.
"""

from __future__ import annotations

import itertools
import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from service.errors import SpecError
from service.federations.spec import FederationSpec
from service.specs import Frozen, JobSpec, YamlSpec

MAX_AXES = 8
# dict-valued fields whose keys are free (architecture knobs): an axis may add a key there
FREE_KEYS = ("model.knobs",)


class Axis(Frozen):
    path: str = Field(description="dotted path of a field of the base spec, e.g. model.knobs.kernel_size")
    values: list[Any] = Field(min_length=1, max_length=1000, description="the values the field takes")
    name: str | None = Field(default=None, description="the axis' column name; default: the path")
    labels: list[str] | None = Field(default=None, description="a label per value for tables and plots")
    also: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="linked fields: path -> values, the i-th set together with the axis' i-th value "
        "(e.g. what the attacker is told alongside what the client did)",
    )

    @model_validator(mode="after")
    def _check(self) -> Axis:
        if not self.path or any(not part for part in self.path.split(".")):
            raise ValueError(f"axis path {self.path!r} is not a dotted field path")
        if self.labels is not None and len(self.labels) != len(self.values):
            raise ValueError(f"axis {self.path}: {len(self.labels)} labels for {len(self.values)} values")
        for path, values in self.also.items():
            if len(values) != len(self.values):
                raise ValueError(
                    f"axis {self.path}: linked field {path} has {len(values)} values for {len(self.values)}"
                )
        return self

    def assign(self, data: dict[str, Any], i: int) -> None:
        """Set the axis' i-th value (and its linked fields' i-th values) in a spec mapping."""
        set_field(data, self.path, self.values[i])
        for path, values in self.also.items():
            set_field(data, path, values[i])

    @property
    def column(self) -> str:
        return self.name or self.path

    @property
    def numeric(self) -> bool:
        return all(isinstance(v, int | float) and not isinstance(v, bool) for v in self.values)

    def label(self, i: int) -> Any:
        """A value as a table cell: the label, a number, or compact text for lists and mappings."""
        if self.labels is not None:
            return self.labels[i]
        return cell(self.values[i])


def cell(value: Any) -> Any:
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return "x".join(map(str, value)) if value else "none"
    if isinstance(value, list) and all(isinstance(v, dict) and "name" in v for v in value):
        return "+".join(_defense_label(v) for v in value) if value else "none"
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return value


def _defense_label(d: dict[str, Any]) -> str:
    args = ",".join(f"{k}={v}" for k, v in d.items() if k != "name")
    return f"{d['name']}({args})" if args else str(d["name"])


class StudySpec(YamlSpec):
    what: ClassVar[str] = "study spec"

    title: str = Field(default="study", max_length=200)
    job: JobSpec | None = Field(default=None, description="the base job every point changes")
    federation: FederationSpec | None = Field(default=None, description="the base federation instead")
    axes: list[Axis] = Field(default_factory=list, max_length=MAX_AXES)
    combine: Literal["grid", "zip"] = "grid"
    seeds: list[Annotated[int, Field(ge=0, lt=2**63)]] = Field(
        default_factory=lambda: [0],
        min_length=1,
        max_length=100,
        description="every point runs once per seed",
    )
    metric: str = Field(default="psnr", description="the metric the plots show (psnr, ssim, lpips, ...)")
    batch_points: int = Field(
        default=1,
        ge=1,
        le=16,
        description="points that share one model (Inverting Gradients with the labels given, the same "
        "model, image shape, image count, attack and budget) run as one batched computation, up to this "
        "many at once, as restarts are batched; each keeps its own record and results (1: one by one)",
    )
    time_limit_s: Annotated[float, Field(gt=0, le=30 * 24 * 3600)] | None = Field(
        default=None, description="wall-clock limit of the whole study; the service sets its default"
    )

    @model_validator(mode="after")
    def _check(self) -> StudySpec:
        if (self.job is None) == (self.federation is None):
            raise ValueError("give exactly one base: job or federation")
        names = [a.column for a in self.axes]
        if len(set(names)) != len(names):
            raise ValueError(f"axis names repeat: {names}")
        if "seed" in names or any(a.path == "seed" for a in self.axes):
            raise ValueError("vary the seed with `seeds`, not an axis")
        if self.combine == "zip" and len({len(a.values) for a in self.axes}) > 1:
            lengths = ", ".join(f"{a.column}: {len(a.values)}" for a in self.axes)
            raise ValueError(f"zipped axes need as many values each; they have {lengths}")
        base = self.base_dict()
        for axis in self.axes:
            for path in (axis.path, *axis.also):
                check_path(base, path)
        return self

    @property
    def kind(self) -> Literal["job", "federation"]:
        return "job" if self.job is not None else "federation"

    @property
    def spec_class(self) -> type[JobSpec] | type[FederationSpec]:
        return JobSpec if self.job is not None else FederationSpec

    def base_dict(self) -> dict[str, Any]:
        base = self.job if self.job is not None else self.federation
        assert base is not None
        return json.loads(base.to_json())

    def combinations(self) -> list[tuple[int, ...]]:
        """Value indices per axis, one tuple per combination (before seeds)."""
        if not self.axes:
            return [()]
        if self.combine == "zip":
            return [(i,) * len(self.axes) for i in range(len(self.axes[0].values))]
        return list(itertools.product(*(range(len(a.values)) for a in self.axes)))

    def count(self) -> int:
        return len(self.combinations()) * len(self.seeds)

    def describe_count(self) -> str:
        sizes = [str(len(a.values)) for a in self.axes]
        shape = (" x ".join(sizes) if self.combine == "grid" else f"{sizes[0]} zipped") if sizes else "1"
        return f"{self.count()} points ({shape} values x {len(self.seeds)} seeds)"


class StudyPoint(BaseModel):
    """One run of a study: which axis values, which seed, and its spec."""

    index: int
    values: dict[str, Any]  # axis column -> table cell
    seed: int
    spec: JobSpec | FederationSpec


def expand(study: StudySpec) -> list[StudyPoint]:
    """Every point of the study, validated; SpecError naming the axis values and the field."""
    points: list[StudyPoint] = []
    cls = study.spec_class
    for combo in study.combinations():
        for seed in study.seeds:
            data = study.base_dict()
            for axis, i in zip(study.axes, combo, strict=True):
                axis.assign(data, i)
            data["seed"] = seed
            where = ", ".join(f"{a.column}={a.values[i]!r}" for a, i in zip(study.axes, combo, strict=True))
            try:
                spec = cls.model_validate(data)
            except ValidationError as e:
                raise SpecError(
                    f"study point {where or 'base'} (seed {seed}) is not a valid "
                    f"{cls.what}: {validation_text(e)}"
                ) from None
            values = {a.column: a.label(i) for a, i in zip(study.axes, combo, strict=True)}
            points.append(StudyPoint(index=len(points), values=values, seed=seed, spec=spec))
    return points


def validation_text(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)


def check_path(base: dict[str, Any], path: str) -> None:
    """Refuse a path that names no field of the base spec, saying which part is wrong."""
    node: Any = base
    parts = path.split(".")
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth]) or "the spec"
        if isinstance(node, dict) and part in node:
            node = node[part]
            continue
        if isinstance(node, dict) and ".".join(parts[:depth]) in FREE_KEYS and depth == len(parts) - 1:
            return
        if node is None:
            raise ValueError(f"axis path {path!r}: {here} is not set in the base spec; set it there first")
        if isinstance(node, dict):
            fields = ", ".join(sorted(node)) or "none"
            raise ValueError(f"axis path {path!r}: {here} has no field {part!r} (fields: {fields})")
        raise ValueError(f"axis path {path!r}: {here} is a value, not a group of fields")


def set_field(data: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node = data
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


class PlannedPoint(Frozen):
    """A point as the study record keeps it: the id of its ordinary job or federation record."""

    index: int
    id: str
    values: dict[str, Any]
    seed: int


class StudyPlan(Frozen):
    """What a study record stores: the spec, and its points' record ids (made when it is submitted)."""

    study: StudySpec
    points: list[PlannedPoint]

    def to_json(self) -> str:
        return self.model_dump_json()
