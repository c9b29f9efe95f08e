"""The architecture registry: name -> builder(num_classes, image_shape, **knobs), with typed knobs.

`build_model` is the one way a model comes to life: it checks the knobs and the image size,
initialises deterministically from the spec's seed and loads the weights the server sent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from service.errors import SpecError
from service.registry import Registry
from service.specs import DataSpec, ModelSpec
from service.tensorio import STATE_DTYPES, load_safetensors, match_state

_BUILD_LOCK = threading.Lock()  # see build_model

KnobType = Literal["int", "float", "bool", "str", "list[int]", "int|str"]
Builder = Callable[..., nn.Module]  # builder(num_classes, image_shape, **knobs) -> nn.Module

# torch.Generator.manual_seed accepts exactly this range.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


@dataclass(frozen=True)
class Knob:
    """One constructor knob of an architecture, as the catalog shows it and build_model checks it.

    `choices` restricts string values; `minimum` and `maximum` bound numbers (and, for
    "int|str", the int form). Constraints that depend on the architecture or on other knobs
    are checked by the builder, which raises SpecError.
    """

    name: str
    type: KnobType
    default: Any
    description: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    def check(self, arch: str, value: Any) -> Any:
        """Return `value` in canonical form (floats as float, lists as list) or raise SpecError."""
        where = f"knob {self.name!r} of {arch}"
        if self.type == "bool":
            if not isinstance(value, bool):
                raise SpecError(f"{where} must be true or false, got {value!r}")
            return value
        if self.type == "float":
            if not _is_number(value):
                raise SpecError(f"{where} must be a number, got {value!r}")
            return self._bounded(where, float(value))
        if self.type == "int":
            if not _is_int(value):
                raise SpecError(f"{where} must be an integer, got {value!r}")
            return self._bounded(where, value)
        if self.type == "list[int]":
            if not isinstance(value, list | tuple) or not all(_is_int(v) for v in value):
                raise SpecError(f"{where} must be a list of integers, got {value!r}")
            return list(value)
        if self.type == "int|str" and _is_int(value):
            return self._bounded(where, value)
        if not isinstance(value, str):
            expected = "an integer or a string" if self.type == "int|str" else "a string"
            raise SpecError(f"{where} must be {expected}, got {value!r}")
        if self.choices and value not in self.choices:
            raise SpecError(f"{where} must be one of {', '.join(map(repr, self.choices))}, got {value!r}")
        return value

    def _bounded(self, where: str, value: float) -> Any:
        if self.minimum is not None and value < self.minimum:
            raise SpecError(f"{where} must be >= {self.minimum:g}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise SpecError(f"{where} must be <= {self.maximum:g}, got {value!r}")
        return value

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "default": list(self.default) if isinstance(self.default, tuple) else self.default,
            "description": self.description,
        }
        if self.choices:
            out["choices"] = list(self.choices)
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture.

    `min_size` is the smallest image height and width the architecture accepts with its default
    knobs (the builder refuses knob choices that need more).
    """

    builder: Builder
    description: str
    knobs: tuple[Knob, ...] = ()
    min_size: int = 8

    def resolve_knobs(self, arch: str, given: Mapping[str, Any]) -> dict[str, Any]:
        """The full knob set: the given values checked, defaults for the rest."""
        known = {k.name: k for k in self.knobs}
        unknown = [name for name in given if name not in known]
        if unknown:
            raise SpecError(
                f"unknown knob{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for {arch}; "
                f"valid knobs: {self.knob_summary()}"
            )
        out: dict[str, Any] = {}
        for knob in self.knobs:
            if knob.name not in given:
                out[knob.name] = list(knob.default) if isinstance(knob.default, tuple) else knob.default
                continue
            try:
                out[knob.name] = knob.check(arch, given[knob.name])
            except SpecError as e:
                raise SpecError(f"{e}; valid knobs: {self.knob_summary()}") from None
        return out

    def knob_summary(self) -> str:
        return ", ".join(f"{k.name} ({k.type})" for k in self.knobs) or "none"


MODELS: Registry[ModelEntry] = Registry("architecture")


def build_model(spec: ModelSpec, data: DataSpec, resolve: Callable[[str], bytes] | None = None) -> nn.Module:
    """Build the model of `spec` for `data` on the CPU, in training mode: a registered
    architecture, an ONNX graph (`arch="onnx"`) or a module of this process (`arch="module"`).

    A registered architecture's initialisation depends only on `spec.init_seed` (not on the global
    RNG, which is left untouched). With `spec.weights`, the bytes `resolve(spec.weights)` returns
    must be a safetensors file holding every floating-point state-dict entry of the model.
    """
    source = MODEL_SOURCES.get(spec.arch, _registered)
    model = source(spec, data, resolve)
    if spec.weights is not None:
        tensors = load_safetensors(
            _resolver(resolve)(spec.weights), allowed_dtypes=STATE_DTYPES, name="model.weights"
        )
        state = match_state(model, tensors, what="weights")
        # Strictness is match_state's job: only integer buffers (num_batches_tracked) may be absent.
        model.load_state_dict(state, strict=False)
    return model


def _resolver(resolve: Callable[[str], bytes] | None) -> Callable[[str], bytes]:
    if resolve is None:
        raise ValueError("the model spec names an artifact but build_model was given no resolve callback")
    return resolve


def _registered(spec: ModelSpec, data: DataSpec, resolve: Callable[[str], bytes] | None) -> nn.Module:
    entry = MODELS.get(spec.arch)
    knobs = entry.resolve_knobs(spec.arch, spec.knobs)
    channels, height, width = data.shape
    if min(height, width) < entry.min_size:
        raise SpecError(
            f"{spec.arch} needs images of at least {entry.min_size}x{entry.min_size}; "
            f"data.shape is {channels}x{height}x{width}"
        )
    if not _SEED_MIN <= spec.init_seed <= _SEED_MAX:
        raise SpecError(f"model.init_seed {spec.init_seed} is outside {_SEED_MIN}..{_SEED_MAX}")

    # Builders (torchvision's included) draw from the global CPU generator; fork it so that the
    # weights depend on the seed alone and the caller's RNG state is not disturbed. The generator
    # is process-wide: builds in concurrent threads (a batched study's points) take turns, or
    # their draws would interleave and a model would not be the one its seed names.
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(spec.init_seed)
        return entry.builder(data.num_classes, data.shape, **knobs)


def _onnx(spec: ModelSpec, data: DataSpec, resolve: Callable[[str], bytes] | None) -> nn.Module:
    from service.models.onnx import onnx_module
    from service.settings import get_settings

    assert spec.source is not None  # ModelSpec checks it
    return onnx_module(_resolver(resolve)(spec.source), data, max_nodes=get_settings().max_onnx_nodes)


def _module(spec: ModelSpec, data: DataSpec, resolve: Callable[[str], bytes] | None) -> nn.Module:
    from service.models.local import local_module

    assert spec.source is not None  # ModelSpec checks it
    model = local_module(spec.source)
    check_model_output(model, data, f"the module {spec.source}", "")
    return model.train()


def check_model_output(model: nn.Module, data: DataSpec, what: str, hint: str) -> None:
    """Two images of `data.shape` in, (2, num_classes) logits out, so that a model that does not
    fit the data (or takes a fixed batch of one) fails here rather than in the attack. Runs in
    eval mode, which leaves batch-norm statistics alone."""
    x = torch.rand(2, *data.shape, device=next((p.device for p in model.parameters()), None))
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as e:  # the user's model raises whatever torch raises
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SpecError(
            f"{what} does not run on a batch of 2 images of shape {list(data.shape)}: {reason}"
            + (f"; {hint}" if hint else "")
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, data.num_classes):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SpecError(
            f"{what} maps 2 images of shape {list(data.shape)} to {shape}; expected logits of shape "
            f"[2, {data.num_classes}] (data.num_classes {data.num_classes})"
        )


# Model sources other than the architecture registry, by `ModelSpec.arch` (specs.SOURCE_ARCHS).
MODEL_SOURCES: dict[str, Callable[[ModelSpec, DataSpec, Callable[[str], bytes] | None], nn.Module]] = {
    "onnx": _onnx,
    "module": _module,
}


def catalog() -> list[dict[str, Any]]:
    """The registered architectures for the API: name, description, knobs, minimum image size."""
    return [
        {
            "name": name,
            "description": entry.description,
            "min_size": entry.min_size,
            "knobs": [k.describe() for k in entry.knobs],
        }
        for name, entry in MODELS.items()
    ]


# ---------------------------------------------------------------------------------------------
# helpers shared by the builders
# ---------------------------------------------------------------------------------------------


def replace_conv(old: nn.Conv2d, in_channels: int, init: Callable[[torch.Tensor], Any]) -> nn.Conv2d:
    """A copy of `old`'s geometry with `in_channels` inputs, weight initialised by `init`."""
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,  # type: ignore[arg-type]
        stride=old.stride,  # type: ignore[arg-type]
        padding=old.padding,  # type: ignore[arg-type]
        dilation=old.dilation,  # type: ignore[arg-type]
        groups=old.groups,
        bias=old.bias is not None,
    )
    init(new.weight)
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


def kaiming_fan_out(weight: torch.Tensor) -> None:
    """torchvision's conv initialisation for ResNet, VGG and DenseNet."""
    nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")


def conv_out(size: int, kernel: int, padding: int, stride: int = 1) -> int:
    return (size + 2 * padding - kernel) // stride + 1


# ---------------------------------------------------------------------------------------------
# the weight-naming contract
# ---------------------------------------------------------------------------------------------

WEIGHT_CONTRACT = (
    "Uploads are safetensors whose keys are the model's state_dict names, as torch writes them for "
    "the model built with these knobs. weights (w_new, or the model the server sent): every "
    "floating-point entry (parameters and batch-norm running statistics); integer buffers such as "
    "num_batches_tracked may be left out. gradient: exactly the trainable parameters. delta "
    "(w_new - w_old): the trainable parameters, and optionally the other floating-point entries. "
    "Shapes must match; dtypes may be any float. Your own model (ONNX, or a torch module locally) "
    "follows the same rules with its own names: the ONNX initializer names, which "
    "torch.onnx.export takes from your state_dict."
)


def weight_names(spec: ModelSpec, data: DataSpec) -> list[dict[str, Any]]:
    """The tensors an upload for this model holds, in state_dict order: name, shape, dtype kind,
    and in which update kinds each is required, optional or absent (see WEIGHT_CONTRACT)."""
    model = build_model(spec, data)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    rows = []
    for name, tensor in model.state_dict().items():
        floating = tensor.is_floating_point()
        if name in trainable:
            kinds = {"weights": "required", "gradient": "required", "delta": "required"}
        elif floating:
            kinds = {"weights": "required", "gradient": "absent", "delta": "optional"}
        else:
            kinds = {"weights": "optional", "gradient": "absent", "delta": "optional"}
        rows.append(
            {
                "name": name,
                "shape": list(tensor.shape),
                "dtype": "float" if floating else "integer",
                "role": "parameter" if name in trainable else "buffer",
                **kinds,
            }
        )
    return rows
