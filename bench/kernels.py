"""Benchmark gradleak's fused gradient matching kernels (kernels/) against the plain-torch reference.

On an NVIDIA GPU (H100/H200), one call measures everything and writes one JSON file:

    python bench/kernels.py --out bench/results/kernels-h100.json

- machine: GPU, SM count, memory, torch / triton / CUDA / cuDNN versions;
- DRAM bandwidth: a 1 GiB device-to-device copy (read + write bytes / time);
- matching: the loss alone, fused vs reference, forward and forward+backward, for the gradient
  lists of a width-64 ConvNet and of ResNet-18 with a CIFAR stem, fp32 and bf16, every cost;
  the kernels alone (launchers without autograd); the concatenation the pointer table avoids;
  the analytic floor (bytes that must move, at the measured bandwidth) and the fraction of it
  achieved; CUDA kernel launches counted by the profiler;
- iteration: one whole attack iteration on ResNet-18 at 32x32, batch 1, 8 and 32 (model forward,
  parameter gradients with create_graph, matching loss, total variation, gradient to the images);
- restarts: restarts per second for 8 restarts batched (torch.func.vmap over restarts, one batched
  loss) against the same 8 run one after another.

GPU times come from triton.testing.do_bench (warm-up, L2 flushed before every run) as the 20th,
50th and 80th percentiles in milliseconds; ratios use the medians. Without CUDA the script stops
with a message: it never writes a GPU figure it did not measure.

`--cpu` measures, on the CPU, an attack iteration of a small ConvNet with 8 restarts batched by
torch.func.vmap against 8 sequential ones (the reference backend: CPU tensors), and writes
bench/results/kernels-cpu.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

ROOT = Path(__file__).resolve().parents[1]
# `python bench/kernels.py` puts bench/ first on the path, where this file would shadow the
# kernels package; the repository root takes its place.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import kernels  # noqa: E402

SCHEMA = "gradleak.bench.kernels/1"
BACKENDS: tuple[kernels.Backend, ...] = ("triton", "reference")
NUM_CLASSES = 10
IMAGE = (3, 32, 32)
TV_WEIGHT = 1e-4
RESTARTS = 8
EPS = 1e-8


# ---------------------------------------------------------------------------------------------
# models and gradient lists
# ---------------------------------------------------------------------------------------------


class InlineConvNet(nn.Sequential):
    """Inverting Gradients' ConvNet: eight 3x3 conv-BN-ReLU blocks (widths w, 2w, 2w, 4w x5) with
    two 3x3 max pools, then a linear head; used when service.models has no "convnet"."""

    def __init__(self, width: int, num_classes: int = NUM_CLASSES, in_channels: int = 3) -> None:
        widths = [width, 2 * width, 2 * width, 4 * width, 4 * width, 4 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        previous = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(previous, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
            if i in (5, 7):
                layers.append(nn.MaxPool2d(3))
            previous = w
        layers += [nn.Flatten(), nn.Linear(previous * 3 * 3, num_classes)]
        super().__init__(*layers)


def convnet(width: int) -> tuple[nn.Module, str]:
    """The registered "convnet" of service.models at this width if that registry is there, else
    the inline definition; returns the model and where it came from."""
    try:
        from service.errors import GradleakError
        from service.models import MODELS

        entry = MODELS.get("convnet")
        knobs = entry.resolve_knobs("convnet", {"width": width})
        return entry.builder(NUM_CLASSES, IMAGE, **knobs), f"service.models convnet {knobs}"
    except (ImportError, GradleakError, TypeError) as error:
        return InlineConvNet(width), f"inline ConvNet (service.models unusable: {type(error).__name__})"


def resnet18_cifar() -> nn.Module:
    """torchvision's ResNet-18 with a CIFAR stem: 3x3 stride-1 conv1 and no max pool."""
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()  # type: ignore[assignment]
    return model


def client_gradients(model: nn.Module, batch: int, device: torch.device) -> list[torch.Tensor]:
    """The parameter gradients of one FedSGD step on a random labelled batch."""
    x = torch.randn(batch, *IMAGE, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    loss = nn.functional.cross_entropy(model(x), labels)
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def gpu_time(fn: Callable[[], object]) -> dict[str, float]:
    """p20 / median / p80 in ms from triton.testing.do_bench (warm-up, L2 flushed before every
    run), over at least ~300 ms and 15 runs."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    estimate_ms = (time.perf_counter() - start) * 1e3
    rep = max(300, int(15 * estimate_ms) + 1)
    p20, p50, p80 = do_bench(fn, warmup=max(50, int(3 * estimate_ms) + 1), rep=rep, quantiles=[0.2, 0.5, 0.8])
    return {"p20_ms": p20, "median_ms": p50, "p80_ms": p80}


def cpu_time(fn: Callable[[], object], warmup: int, repeats: int) -> dict[str, float]:
    """p20 / median / p80 in ms of `repeats` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    quantiles = statistics.quantiles(samples, n=10, method="inclusive")
    return {"p20_ms": quantiles[1], "median_ms": statistics.median(samples), "p80_ms": quantiles[7]}


def host_time_per_call(fn: Callable[[], object], calls: int = 50) -> dict[str, float]:
    """Microseconds per call the host spends issuing `fn` (no synchronisation inside the loop),
    and per call until the GPU has finished them all: equal when the GPU waits on the host."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    return {"issue_us": (issued - start) * 1e6 / calls, "complete_us": (done - start) * 1e6 / calls}


def count_cuda_kernels(fn: Callable[[], object]) -> dict[str, Any]:
    """CUDA kernels (and copies/sets) one call of `fn` issues, as recorded by the torch profiler;
    an error entry instead when the profiler cannot record here."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    except RuntimeError as error:
        return {"error": f"profiler unavailable: {error}"}
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = sum(1 for name in names if name.startswith(("Memcpy", "Memset")))
    return {"kernels": len(names) - copies, "memcpy_memset": copies}


def ratio(slow: dict[str, float], fast: dict[str, float]) -> float:
    return slow["median_ms"] / fast["median_ms"]


# ---------------------------------------------------------------------------------------------
# GPU sections
# ---------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def dram_bandwidth(device: torch.device) -> dict[str, float]:
    """Device-to-device copy of 1 GiB: bytes read + written per second."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = gpu_time(lambda: dst.copy_(src))
    return {"bytes_moved": 2 * 2**30, **timing, "gb_per_s": 2 * 2**30 / (timing["median_ms"] * 1e-3) / 1e9}


def backend_timings(
    cands: list[torch.Tensor], packed: kernels.PackedTargets, cost: kernels.Cost, backend: kernels.Backend
) -> dict[str, Any]:
    """The public op on one backend: forward alone (candidates without grad) and forward plus
    backward w.r.t. the candidates."""
    leaves = [c.detach().requires_grad_() for c in cands]

    def forward() -> torch.Tensor:
        return kernels.gradient_matching_loss(cands, packed, cost=cost, backend=backend)

    def forward_backward() -> object:
        loss = kernels.gradient_matching_loss(leaves, packed, cost=cost, backend=backend)
        return torch.autograd.grad(loss, leaves)

    return {
        "forward": gpu_time(forward),
        "forward_backward": gpu_time(forward_backward),
        "host_forward_backward": host_time_per_call(forward_backward),
        "cuda_launches_forward_backward": count_cuda_kernels(forward_backward),
    }


def kernels_alone(
    cands: list[torch.Tensor], packed: kernels.PackedTargets, cost: kernels.Cost
) -> dict[str, Any]:
    """The launchers without autograd or argument checks: the two forward kernels, the backward one."""
    from kernels import gradmatch

    weights = torch.ones(packed.num_layers, device=packed.device)
    loss, coef = gradmatch._launch_forward(packed, cost, EPS, weights, cands, 1)
    upstream = torch.ones(1, dtype=loss.dtype, device=loss.device)
    return {
        "forward": gpu_time(lambda: gradmatch._launch_forward(packed, cost, EPS, weights, cands, 1)),
        "backward": gpu_time(lambda: gradmatch._launch_backward(packed, cands, coef, upstream, 1)),
    }


def concatenate(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def matching_section(
    name: str, grads: Sequence[torch.Tensor], noise: Sequence[torch.Tensor], bandwidth: float
) -> list[dict[str, Any]]:
    """The loss alone on a model's gradient list: targets from one batch, candidates from another."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        targets = [g.to(dtype) for g in grads]
        cands = [n.to(dtype) for n in noise]
        packed = kernels.pack_targets(targets)
        numel = sum(t.numel() for t in targets)
        size = torch.finfo(dtype).bits // 8
        forward_bytes = 2 * numel * size  # read candidate and target once
        backward_bytes = 3 * numel * size  # read both again, write dLoss/dcandidate
        floor: dict[str, Any] = {
            "forward_bytes": forward_bytes,
            "backward_bytes": backward_bytes,
            "forward_ms": forward_bytes / bandwidth * 1e3,
            "backward_ms": backward_bytes / bandwidth * 1e3,
            "forward_backward_ms": (forward_bytes + backward_bytes) / bandwidth * 1e3,
            "fused_launches": {"forward": 2, "backward": 1},
        }
        # what packing the candidates into one buffer per call would cost, and the pointer table avoids
        concat = gpu_time(functools.partial(concatenate, cands))
        for cost in kernels.COSTS:
            row: dict[str, Any] = {
                "model": name,
                "dtype": str(dtype).removeprefix("torch."),
                "cost": cost,
                "tensors": len(targets),
                "elements": numel,
                "floor_at_measured_bandwidth": floor,
                "candidate_concat_copy": concat,
            }
            for backend in BACKENDS:
                row[backend] = backend_timings(cands, packed, cost, backend)
            alone = kernels_alone(cands, packed, cost)
            alone["forward_fraction_of_floor"] = floor["forward_ms"] / alone["forward"]["median_ms"]
            alone["backward_fraction_of_floor"] = floor["backward_ms"] / alone["backward"]["median_ms"]
            row["kernels_alone"] = alone
            fused, ref = row["triton"], row["reference"]
            row["speedup_forward"] = ratio(ref["forward"], fused["forward"])
            row["speedup_forward_backward"] = ratio(ref["forward_backward"], fused["forward_backward"])
            row["fused_forward_backward_fraction_of_floor"] = (
                floor["forward_backward_ms"] / fused["forward_backward"]["median_ms"]
            )
            rows.append(row)
            print(
                f"  {name} {row['dtype']} {cost}: forward+backward fused "
                f"{fused['forward_backward']['median_ms']:.3f} ms, reference "
                f"{ref['forward_backward']['median_ms']:.3f} ms ({row['speedup_forward_backward']:.1f}x)",
                flush=True,
            )
    return rows


def attack_step(
    model: nn.Module,
    packed: kernels.PackedTargets,
    x: torch.Tensor,
    labels: torch.Tensor,
    backend: kernels.Backend,
) -> Callable[[], object]:
    """One attack iteration: forward, parameter gradients with create_graph, matching loss plus
    total variation, gradient to the images."""
    params = list(model.parameters())

    def step() -> object:
        loss = nn.functional.cross_entropy(model(x), labels)
        cands = torch.autograd.grad(loss, params, create_graph=True)
        objective = kernels.gradient_matching_loss(cands, packed, backend=backend)
        objective = objective + TV_WEIGHT * kernels.total_variation(x, backend=backend)
        return torch.autograd.grad(objective, x)

    return step


def iteration_section(device: torch.device) -> list[dict[str, Any]]:
    model = resnet18_cifar().to(device).train()
    rows = []
    for batch in (1, 8, 32):
        packed = kernels.pack_targets(client_gradients(model, batch, device))
        x = torch.randn(batch, *IMAGE, device=device, requires_grad=True)
        labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
        row: dict[str, Any] = {
            "model": "resnet18_cifar",
            "image": list(IMAGE),
            "batch": batch,
            "cost": "cosine",
        }
        for backend in BACKENDS:
            row[backend] = gpu_time(attack_step(model, packed, x, labels, backend))
        row["speedup"] = ratio(row["reference"], row["triton"])
        rows.append(row)
        print(
            f"  iteration batch {batch}: fused {row['triton']['median_ms']:.2f} ms, "
            f"reference {row['reference']['median_ms']:.2f} ms",
            flush=True,
        )
    return rows


def restart_iterations(
    model: nn.Module,
    packed: kernels.PackedTargets,
    x: torch.Tensor,
    labels: torch.Tensor,
    backend: kernels.Backend,
) -> tuple[Callable[[], object], Callable[[], object]]:
    """(batched, sequential) attack iterations over the restarts x[r] of x (R, N, C, H, W)."""
    frozen = {name: p.detach() for name, p in model.named_parameters()}

    def client_loss(p: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (images,)), labels)

    def batched() -> object:
        per_restart = vmap(grad(client_loss), in_dims=(None, 0))(frozen, x)
        losses = kernels.batched_gradient_matching_loss(list(per_restart.values()), packed, backend=backend)
        tv = vmap(lambda xi: kernels.total_variation(xi, backend=backend))(x)
        return torch.autograd.grad((losses + TV_WEIGHT * tv).sum(), x)

    steps = [
        attack_step(model, packed, x[r].detach().requires_grad_(), labels, backend) for r in range(x.shape[0])
    ]

    def sequential() -> object:
        return [step() for step in steps]

    return batched, sequential


def batch_norm_free_of_running_stats(model: nn.Module) -> nn.Module:
    """A copy whose BatchNorms use batch statistics and keep no running ones: vmap over restarts
    then gives each restart its own statistics, and the sequential run is the same model."""
    twin = copy.deepcopy(model)
    replace_all_batch_norm_modules_(twin)
    return twin


def restarts_section(device: torch.device) -> list[dict[str, Any]]:
    model = batch_norm_free_of_running_stats(resnet18_cifar().to(device).train())
    rows = []
    for batch in (1, 8):
        packed = kernels.pack_targets(client_gradients(model, batch, device))
        x = torch.randn(RESTARTS, batch, *IMAGE, device=device, requires_grad=True)
        labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
        row: dict[str, Any] = {
            "model": "resnet18_cifar",
            "batch": batch,
            "restarts": RESTARTS,
            "cost": "cosine",
        }
        for backend in BACKENDS:
            batched, sequential = restart_iterations(model, packed, x, labels, backend)
            timing = {"batched_vmap": gpu_time(batched), "sequential": gpu_time(sequential)}
            row[backend] = {
                **timing,
                "restarts_per_s_batched": RESTARTS / (timing["batched_vmap"]["median_ms"] * 1e-3),
                "restarts_per_s_sequential": RESTARTS / (timing["sequential"]["median_ms"] * 1e-3),
                "batched_speedup": ratio(timing["sequential"], timing["batched_vmap"]),
            }
        rows.append(row)
        print(f"  restarts batch {batch}: fused {row['triton']['restarts_per_s_batched']:.0f}/s batched, "
              f"{row['triton']['restarts_per_s_sequential']:.0f}/s sequential", flush=True)  # fmt: skip
    return rows


def run_gpu() -> dict[str, Any]:
    device = torch.device("cuda")
    if kernels.get_backend() != "auto":
        raise SystemExit(f"unset {kernels.BACKEND_ENV}: the benchmark chooses backends itself")
    print(f"gradleak kernel benchmark on {torch.cuda.get_device_name(0)}", flush=True)
    torch.manual_seed(0)
    bandwidth = dram_bandwidth(device)
    print(f"  device-to-device copy: {bandwidth['gb_per_s']:.0f} GB/s", flush=True)
    matching = []
    for name, build in (
        ("convnet64", lambda: convnet(64)),
        ("resnet18_cifar", lambda: (resnet18_cifar(), "torchvision")),
    ):
        model, source = build()
        model = model.to(device).train()
        grads = client_gradients(model, 8, device)
        noise = client_gradients(model, 8, device)
        for row in matching_section(name, grads, noise, bandwidth["gb_per_s"] * 1e9):
            row["model_source"] = source
            matching.append(row)
    return {
        "mode": "gpu",
        "machine": machine_info(),
        "dram_bandwidth": bandwidth,
        "matching": matching,
        "iteration": iteration_section(device),
        "restarts": restarts_section(device),
    }


# ---------------------------------------------------------------------------------------------
# CPU mode
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one, else the architecture."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run_cpu(repeats: int) -> dict[str, Any]:
    device = torch.device("cpu")
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    model = batch_norm_free_of_running_stats(InlineConvNet(width=16).train())
    packed = kernels.pack_targets(client_gradients(model, 1, device))
    x = torch.randn(RESTARTS, 1, *IMAGE, requires_grad=True)
    labels = torch.randint(0, NUM_CLASSES, (1,))
    batched, sequential = restart_iterations(model, packed, x, labels, "auto")
    timing = {
        "batched_vmap": cpu_time(batched, warmup=3, repeats=repeats),
        "sequential": cpu_time(sequential, warmup=3, repeats=repeats),
    }
    print(f"  8 restarts, batched {timing['batched_vmap']['median_ms']:.1f} ms, "
          f"sequential {timing['sequential']['median_ms']:.1f} ms", flush=True)  # fmt: skip
    return {
        "mode": "cpu",
        "machine": {
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            # other processes share the cores: the 1-minute load average around the measurement
            "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "restarts": [
            {
                "model": "inline ConvNet width 16 (BatchNorm without running statistics)",
                "parameters": sum(p.numel() for p in model.parameters()),
                "tensors": len(list(model.parameters())),
                "image": list(IMAGE),
                "batch": 1,
                "restarts": RESTARTS,
                "cost": "cosine",
                "backend": "reference (CPU tensors)",
                "repeats": repeats,
                **timing,
                "restarts_per_s_batched": RESTARTS / (timing["batched_vmap"]["median_ms"] * 1e-3),
                "restarts_per_s_sequential": RESTARTS / (timing["sequential"]["median_ms"] * 1e-3),
                "batched_speedup": ratio(timing["sequential"], timing["batched_vmap"]),
            }
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--out", type=Path, help="JSON result file (--cpu: default bench/results/kernels-cpu.json)"
    )
    parser.add_argument(
        "--cpu", action="store_true", help="measure batched against sequential restarts on the CPU"
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per CPU measurement")
    args = parser.parse_args(argv)
    if args.cpu:
        out = args.out or ROOT / "bench" / "results" / "kernels-cpu.json"
        result = run_cpu(args.repeats)
    else:
        if args.out is None:
            parser.error("--out is required, e.g. --out bench/results/kernels-h100.json")
        if not torch.cuda.is_available():
            print(
                "bench/kernels.py: no CUDA device here, so no GPU figures are measured or written; "
                "run it on an NVIDIA GPU, or pass --cpu for the CPU restart measurement",
                file=sys.stderr,
            )
            return 2
        out = args.out
        result = run_gpu()
    result = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/kernels.py", *(argv if argv is not None else sys.argv[1:])]),
        **result,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
