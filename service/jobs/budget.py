"""A job's memory budget, estimated from its spec before it is queued.

The model is built on torch's `meta` device (shapes only: no memory, no arithmetic) and run
forward once on a meta image, which gives its parameter count and the number of activation
values one image produces. A gradient-inversion attack differentiates through the gradient of
the model (a second-order graph), so its peak grows with activations x images x restarts, plus a
fixed number of copies of the parameters (the model, the client's copy, the update, the target,
the gradients and their own graph) and the process itself. The coefficients are calibrated by
`python -m bench.memory_estimate` against the peak RSS of real runs on the registry's models
(bench/results/memory-estimate-cpu.json), so that the estimate is an upper bound within a
factor stated there.

Building on the meta device costs well under a second for the largest registered model; the API
does it in a child process (`Profiler`), so that the build never holds up its other requests, and
caches the profile per (architecture, knobs, image shape, classes).
"""

from __future__ import annotations

import copy
import json
import math
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from service.errors import GradleakError, SpecError
from service.specs import SEARCH_EPOCHS, SOURCE_ARCHS, DataSpec, JobSpec, ModelSpec

FLOAT_BYTES = 4
# Calibrated upper-bound coefficients (see the module docstring and bench/memory_estimate.py).
# A least-squares fit over 14 runs gave 1000 MiB, 5.3 and 4.0; these leave a margin above each.
PROCESS_BYTES = 1100 * 2**20  # the interpreter, torch, torchvision, the runner's imports
PARAM_COPIES = 8.0  # float32 copies of the parameters alive at the peak
ACTIVATION_COPIES = 6.0  # float32 activation-sized tensors per image (x restarts) at the peak


@dataclass(frozen=True)
class ModelProfile:
    parameters: int
    activations_per_image: int  # values the leaf modules output for one image


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimated peak memory of one job, with what it is made of."""

    total_bytes: int
    process_bytes: int
    parameter_bytes: int
    activation_bytes: int
    parameters: int
    activations_per_image: int
    images: int  # images the attack differentiates through at once (batch x restarts x steps)
    images_assumed: bool  # the spec does not say how many images the update covers

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_bytes": self.total_bytes,
            "process_bytes": self.process_bytes,
            "parameter_bytes": self.parameter_bytes,
            "activation_bytes": self.activation_bytes,
            "parameters": self.parameters,
            "activations_per_image": self.activations_per_image,
            "images": self.images,
            "images_assumed": self.images_assumed,
        }


class BudgetError(SpecError):
    """The job's estimated memory exceeds what a worker may use; carries the estimate."""

    def __init__(self, message: str, estimate: MemoryEstimate, limit_bytes: int) -> None:
        self.estimate, self.limit_bytes = estimate, limit_bytes
        super().__init__(message)


ProfileFn = Callable[[ModelSpec, DataSpec], ModelProfile]


def model_profile(model: ModelSpec, data: DataSpec, module: Any = None) -> ModelProfile:
    """Parameters and activations per image of the spec's architecture (knobs and image size
    checked as the runner checks them), from a build on the meta device; of `module` itself when
    given (the user's own model, known once the runner has built it)."""
    if module is not None:
        return _count(copy.deepcopy(module), data.shape, module_device(module), "the model")
    return _profile(*_profile_key(model, data))


def module_device(module: Any) -> Any:
    return next((p.device for p in module.parameters()), "cpu")


def _profile_key(model: ModelSpec, data: DataSpec) -> tuple[str, str, int, tuple[int, int, int], int]:
    return model.arch, json.dumps(model.knobs, sort_keys=True), model.init_seed, data.shape, data.num_classes


def _profile_or_message(*key: Any) -> ModelProfile | str:
    """`_profile` in the profiler's process; a refusal comes back as its message."""
    try:
        return _profile(*key)
    except GradleakError as e:
        return str(e)


class Profiler:
    """`model_profile` in a child process, one at a time, with a time bound and a cache: building
    even on the meta device holds the interpreter's lock for a while (about a second for a
    ResNet-152 on a loaded machine), which would stall every other request of the API process.
    Unknown architectures are refused here, with the list of valid ones."""

    TIMEOUT_S = 60.0
    CACHE_ENTRIES = 1024

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._cache: dict[tuple[Any, ...], ModelProfile] = {}

    def __call__(self, model: ModelSpec, data: DataSpec) -> ModelProfile:
        from service.models import MODELS

        MODELS.get(model.arch)
        key = _profile_key(model, data)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        try:
            result = self._executor().submit(_profile_or_message, *key).result(self.TIMEOUT_S)
        except FutureTimeout:
            raise SpecError(
                f"checking {model.arch} took over {self.TIMEOUT_S:g} s; the server is busy, retry later"
            ) from None
        except BrokenProcessPool:
            with self._lock:
                self._pool = None  # the next call starts a new one
            raise SpecError(f"checking {model.arch} failed; retry") from None
        if isinstance(result, str):
            raise SpecError(result)
        if len(self._cache) >= self.CACHE_ENTRIES:
            self._cache.clear()
        self._cache[key] = result
        return result

    def warm(self) -> None:
        """Start the child process and its imports now, rather than on the first submission."""
        self._executor().submit(_profile_or_message, *_profile_key(ModelSpec(arch="lenet"), DataSpec()))

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn")
                )
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


@lru_cache(maxsize=256)
def _profile(
    arch: str, knobs_json: str, init_seed: int, shape: tuple[int, int, int], num_classes: int
) -> ModelProfile:
    import torch

    from service.models import build_model

    spec = ModelSpec(arch=arch, knobs=json.loads(knobs_json), init_seed=init_seed)
    with torch.device("meta"):
        net = build_model(spec, DataSpec(shape=shape, num_classes=num_classes))
    return _count(net, shape, "meta", arch)


def _count(net: Any, shape: tuple[int, int, int], device: Any, name: str) -> ModelProfile:
    import torch

    count = [0]

    def hook(_m: torch.nn.Module, _inputs: Any, output: Any) -> None:
        for t in output if isinstance(output, tuple | list) else (output,):
            if isinstance(t, torch.Tensor):
                count[0] += t.numel()

    leaves = [m for m in net.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        # Two images: batch-norm layers in train mode refuse one value per channel.
        net.train()
        with torch.no_grad():
            net(torch.zeros((2, *shape), device=device))
    except (RuntimeError, ValueError) as e:
        raise SpecError(f"{name} cannot take {'x'.join(map(str, shape))} images: {e}") from None
    finally:
        for h in handles:
            h.remove()
    parameters = sum(p.numel() for p in net.parameters())
    return ModelProfile(parameters=parameters, activations_per_image=count[0] // 2)


# candidates a CMA-ES generation (ggl) scores per vmapped chunk: bounds its memory
EVAL_CHUNK = 16


def unrolled_epochs(spec: JobSpec) -> int:
    """The most local epochs the FedAvg-aware attack may replay for this spec."""
    client = spec.update.client
    if client.local_epochs is not None:
        return client.local_epochs
    if client.candidates is not None and client.candidates.local_epochs is not None:
        return max(client.candidates.local_epochs)
    if getattr(spec.attack, "unknown_facts", "search") == "search":
        return max(SEARCH_EPOCHS)
    return 1


def attack_images(spec: JobSpec, num_images: int | None = None) -> tuple[int, bool]:
    """How many images the attack differentiates through at once, and whether the count of the
    client's images had to be assumed (unknown until the runner reads the update)."""
    assumed = False
    if num_images is None:
        sim = spec.update.simulate
        data, client = spec.data, spec.update.client
        num_images = (
            data.num_images
            or (len(sim.images) if sim is not None else None)
            or (len(data.labels) if data.labels is not None else None)
            or client.num_samples
        )
    if num_images is None:
        num_images, assumed = 1, True
    unrolled = 1
    if spec.attack.name in ("fedavg_unroll", "gias", "ggl") and spec.update.kind != "gradient":
        # the client's local epochs are replayed differentiably: every step's graph is kept
        # (the FedAvg-aware attack's search: its longest hypothesis)
        fedavg = spec.attack.name == "fedavg_unroll"
        epochs = unrolled_epochs(spec) if fedavg else spec.update.client.local_epochs
        unrolled = max(1, epochs or 1)
    batch = spec.budget.restarts
    if spec.attack.name == "ggl" and getattr(spec.attack, "optimizer", None) == "cma":
        # a CMA-ES generation scores its candidates (population x restarts) in vmapped chunks
        batch = min(spec.attack.population * spec.budget.restarts, EVAL_CHUNK)  # type: ignore[union-attr]
    return num_images * batch * unrolled, assumed


def estimate_memory(
    spec: JobSpec, num_images: int | None = None, profile_fn: ProfileFn = model_profile, module: Any = None
) -> MemoryEstimate:
    """The peak memory the runner is expected to reach on `spec` (an upper bound, see above).
    `num_images`: the image count when the runner knows it (inferred from the update);
    `profile_fn`: how the model is profiled (the API uses a Profiler); `module`: the built model,
    for a user's own model (ONNX, a module) that the registry cannot build."""
    profile = (
        model_profile(spec.model, spec.data, module)
        if module is not None
        else profile_fn(spec.model, spec.data)
    )
    images, assumed = attack_images(spec, num_images)
    parameter_bytes = math.ceil(profile.parameters * FLOAT_BYTES * PARAM_COPIES)
    activation_bytes = math.ceil(images * profile.activations_per_image * ACTIVATION_COPIES * FLOAT_BYTES)
    return MemoryEstimate(
        total_bytes=PROCESS_BYTES + parameter_bytes + activation_bytes,
        process_bytes=PROCESS_BYTES,
        parameter_bytes=parameter_bytes,
        activation_bytes=activation_bytes,
        parameters=profile.parameters,
        activations_per_image=profile.activations_per_image,
        images=images,
        images_assumed=assumed,
    )


def batch_within_memory(
    spec: JobSpec,
    count: int,
    limit_bytes: int | None,
    num_images: int | None = None,
    module: Any = None,
) -> int:
    """How many attacks of `spec` (a study's points, the verdict's shadows) fit one batched
    computation, their restarts stacked, within `limit_bytes` by this module's estimate: at most
    `count`, at least 1. Without a limit, or for a user's own model not built yet, `count`."""
    if limit_bytes is None or count <= 1 or (spec.model.arch in SOURCE_ARCHS and module is None):
        return max(count, 1)
    profile = model_profile(spec.model, spec.data, module)  # once: only the restarts change below
    for size in range(count, 1, -1):
        budget = spec.budget.model_copy(update={"restarts": spec.budget.restarts * size})
        probe = spec.model_copy(update={"budget": budget})
        if estimate_memory(probe, num_images, profile_fn=lambda *_: profile).total_bytes <= limit_bytes:
            return size
    return 1


def check_memory(
    spec: JobSpec,
    limit_bytes: int,
    num_images: int | None = None,
    profile_fn: ProfileFn = model_profile,
    module: Any = None,
) -> MemoryEstimate | None:
    """The estimate, or BudgetError when it exceeds `limit_bytes` (the worker memory setting).
    None for a user's own model before it is built: the runner checks it once it has it (an ONNX
    upload's size and node count are bounded when it is uploaded)."""
    if spec.model.arch == "module" and module is None and spec.model.source is not None:
        from service.models.local import local_module

        module = local_module(spec.model.source)  # refused where no such module lives (a server)
    if spec.model.arch in SOURCE_ARCHS and module is None:
        return None
    estimate = estimate_memory(spec, num_images, profile_fn, module)
    if estimate.total_bytes > limit_bytes:
        c, h, w = spec.data.shape
        raise BudgetError(
            f"this job needs an estimated {_gib(estimate.total_bytes)} of memory "
            f"({spec.model.arch}, {c}x{h}x{w} images, {estimate.images} image(s) x restarts in the "
            f"attack's second-order graph); a worker may use {_gib(limit_bytes)}. Use smaller images, "
            "fewer images or restarts, or a smaller architecture",
            estimate,
            limit_bytes,
        )
    return estimate


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
