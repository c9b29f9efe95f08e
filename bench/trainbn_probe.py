"""Probes of the train-mode-BN failure (bench/ATTACKS.md, "Train-mode batch norm"): a plain
gradient-matching loop on ResNet-18 (CIFAR stem, untrained, init seed 0), batch 1, 32x32, the
client's BN in train mode, label known, outside the engine so that one thing changes at a time.

The loop: start N(0, 1) in normalised space (seed 0), cosine distance over the matched
parameters' gradients + 1e-4 TV, Adam (signed gradients unless --plain), step decay at 3/8, 5/8
and 7/8, pixels kept in the valid range. Options: --lr, --layers (match only the gradients of
parameters whose names start with these prefixes), --features W (add W x the relative squared
error between the network's penultimate features and those recovered exactly from the fc
gradient: at batch 1 the fc weight gradient's row i is (p_i - y_i) times the features, so
features = row / bias gradient), --features-only (match those features alone, no gradient: a
feature inversion), --tv, --start-near EPS (start at the truth plus noise of RMS EPS instead of
far away: does the loop stay there?). Prints one JSON line: PSNR/SSIM of the reconstruction and
the final cosine distance (0 = matched).

  python -m bench.trainbn_probe astronaut --iterations 300 --lr 0.1 --features 1

`--sensitivity` runs no attack: it measures how far the client's gradient moves when its image
moves a little (noise of RMS eps in the normalised space, three noise draws), as the cosine
distance between the two gradients over all parameters and per stage (stem, layer1..4, fc), and
its IGSA (service.metrics.igsa: 8 moves of 5 % of the image's norm, higher = smoother), with
the model's BN in train mode and in eval mode; `--steps N` takes the ResNet-18 trained N SGD steps
on the photo-patch task (bench.trained's checkpoints, 0 = the initialisation). An attack descends
from afar only if small moves of the image make small moves of the gradient.

  python -m bench.trainbn_probe astronaut --sensitivity 0.001,0.01,0.03,0.1 --steps 0,100,300
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from service.data import load_images, normalize
from service.metrics import score
from service.models import build_model
from service.specs import DataSpec, ModelSpec

STAGES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")


def _gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    g = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    return [t.detach() for t in g]


def _cosine_distance(u: list[torch.Tensor], v: list[torch.Tensor]) -> float:
    dot = sum(float((a * b).sum()) for a, b in zip(u, v, strict=True))
    nu = sum(float((a * a).sum()) for a in u) ** 0.5
    nv = sum(float((b * b).sum()) for b in v) ** 0.5
    return 1 - dot / (nu * nv)


def sensitivity(image: str, eps_list: list[float], steps: list[int]) -> dict[str, Any]:
    """Cosine distance between the gradient at the image and at the image plus noise of RMS eps."""
    from bench.trained import train
    from service.metrics.igsa import igsa

    data = DataSpec(shape=(3, 32, 32), num_classes=10, normalization="cifar10")
    truth, _ = load_images("photos", [image], size=32, channels=3)
    x = normalize(truth, data.resolved_normalization())
    y = torch.tensor([1])
    weights = {c["steps"]: c for c in train(steps, "resnet18")}
    out: dict[str, Any] = {}
    for step in steps:
        path = weights[step]["weights"]
        spec = ModelSpec(arch="resnet18", knobs={"stem": "cifar"}, init_seed=0, weights=path)
        for mode in ("train", "eval"):
            # a fresh copy per mode: train-mode passes move the running statistics eval mode uses
            model = build_model(spec, data, lambda p: Path(p).read_bytes()).train(mode == "train")
            stage_of = [n.split(".")[0] for n, _ in model.named_parameters()]
            g0 = _gradient(model, x, y)
            total = sum(float((t * t).sum()) for t in g0)
            share = {
                st: sum(float((t * t).sum()) for s, t in zip(stage_of, g0, strict=True) if s == st) / total
                for st in STAGES
            }
            rows = []
            for eps in eps_list:
                draws: dict[str, list[float]] = {k: [] for k in ("all", *STAGES)}
                for draw in range(3):
                    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(draw))
                    g1 = _gradient(model, x + eps * noise, y)
                    draws["all"].append(_cosine_distance(g0, g1))
                    for st in STAGES:
                        pick = [k for k, s in enumerate(stage_of) if s == st]
                        draws[st].append(_cosine_distance([g0[k] for k in pick], [g1[k] for k in pick]))
                rows.append({"eps": eps, **{k: statistics.median(v) for k, v in draws.items()}})
            smooth = igsa(model, x, y, bn_mode=mode, generator=torch.Generator().manual_seed(0))
            out[f"steps {step}, bn {mode}"] = {
                "test_accuracy": weights[step]["test_accuracy"],
                "igsa": smooth.score,
                "gradient_share": share,
                "cosine_distance": rows,
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image")
    ap.add_argument(
        "--sensitivity", default=None, help="comma-separated noise RMS values: measure, no attack"
    )
    ap.add_argument("--steps", default="0", help="with --sensitivity: checkpoints (SGD steps)")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--features", type=float, default=0.0)
    ap.add_argument("--layers", default=None, help="comma-separated parameter-name prefixes")
    ap.add_argument("--plain", action="store_true", help="Adam on the raw gradient, not its sign")
    ap.add_argument(
        "--features-only", action="store_true", help="match the recovered features alone (no gradient)"
    )
    ap.add_argument("--tv", type=float, default=1e-4, help="TV weight")
    ap.add_argument(
        "--start-near",
        type=float,
        default=None,
        help="start at the truth plus noise of this RMS",
    )
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.sensitivity:
        eps = [float(e) for e in a.sensitivity.split(",")]
        steps = [int(t) for t in a.steps.split(",")]
        print(json.dumps({"image": a.image, "sensitivity": sensitivity(a.image, eps, steps)}))
        return
    data = DataSpec(shape=(3, 32, 32), num_classes=10, normalization="cifar10")
    model = build_model(ModelSpec(arch="resnet18", knobs={"stem": "cifar"}, init_seed=0), data).train()
    norm = data.resolved_normalization()
    truth, _ = load_images("photos", [a.image], size=32, channels=3)
    y = torch.tensor([1])
    feats: dict[str, torch.Tensor] = {}
    model.fc.register_forward_hook(lambda m, i, o: feats.__setitem__("h", i[0]))
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    prefixes = a.layers.split(",") if a.layers else None
    keep = [k for k, n in enumerate(names) if prefixes is None or any(n.startswith(q) for q in prefixes)]

    def grads(x: torch.Tensor, create: bool) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=create)

    target = [g.detach() for g in grads(normalize(truth, norm), False)]
    g_w, g_b = target[names.index("fc.weight")], target[names.index("fc.bias")]
    row = int(g_b.abs().argmax())
    h_star = g_w[row] / g_b[row]
    t_keep = [target[k] for k in keep]
    t_norm = torch.sqrt(sum((t * t).sum() for t in t_keep))
    lo, hi = normalize(torch.zeros(1, 3, 1, 1), norm), normalize(torch.ones(1, 3, 1, 1), norm)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    if a.start_near is not None:
        x = normalize(truth, norm) + a.start_near * x
    x = x.clamp(lo, hi).requires_grad_(True)
    mean = torch.tensor(norm.mean).view(1, -1, 1, 1)
    std = torch.tensor(norm.std).view(1, -1, 1, 1)
    start_psnr = score((x.detach() * std + mean).clamp(0, 1), truth)["mean"]["psnr"]
    opt = torch.optim.Adam([x], lr=a.lr)
    its = a.iterations
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [its * 3 // 8, its * 5 // 8, its * 7 // 8], 0.1)
    t0 = time.perf_counter()
    cos = torch.tensor(1.0)
    for _ in range(its):
        opt.zero_grad()
        tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
        if a.features_only:
            model(x)
            loss = ((feats["h"][0] - h_star) ** 2).sum() / (h_star**2).sum() + a.tv * tv
        else:
            g = grads(x, True)
            g_keep = [g[k] for k in keep]
            dot = sum((u * v).sum() for u, v in zip(g_keep, t_keep, strict=True))
            cos = 1 - dot / (torch.sqrt(sum((u * u).sum() for u in g_keep)) * t_norm)
            loss = cos + a.tv * tv
            if a.features > 0:
                loss = loss + a.features * ((feats["h"][0] - h_star) ** 2).sum() / (h_star**2).sum()
        loss.backward()
        assert x.grad is not None
        if not a.plain:
            x.grad.sign_()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.copy_(torch.max(torch.min(x, hi), lo))
    m = score((x.detach() * std + mean).clamp(0, 1), truth)
    if a.features_only:  # the gradient's distance at the end, for the record
        g = grads(x.detach(), False)
        g_keep = [g[k] for k in keep]
        dot = sum((u * v).sum() for u, v in zip(g_keep, t_keep, strict=True))
        cos = 1 - dot / (torch.sqrt(sum((u * u).sum() for u in g_keep)) * t_norm)
    print(
        json.dumps(
            {
                "image": a.image,
                "iterations": its,
                "lr": a.lr,
                "features": "only" if a.features_only else a.features,
                "tv": a.tv,
                "start_near": a.start_near,
                "start_psnr": start_psnr,
                "layers": prefixes,
                "signed": not a.plain,
                "psnr": m["mean"]["psnr"],
                "ssim": m["mean"]["ssim"],
                "final_cosine_distance": float(cos.detach()),
                "seconds": time.perf_counter() - t0,
            }
        )
    )


if __name__ == "__main__":
    main()
