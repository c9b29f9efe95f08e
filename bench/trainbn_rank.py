"""A probe of the train-mode-BN client (bench/ATTACKS.md, "Train-mode batch norm"): what the
low-rank weight gradients of ResNet-18's third stage say about the image, outside the engine.

ResNet-18 (CIFAR stem, untrained, init seed 0), batch 1, 32x32, label known, BN in train mode.
The first convolution of layer3 (3x3, stride 2) sees layer2's output map (128x16x16) at 64
positions and has 256 output channels, so its weight gradient is a sum of 64 outer products:
sum_p delta_p patch_p^T. Train-mode BN makes the deltas sum to zero, so the gradient has rank 63
and its row space holds every centred patch of the map. The patches overlap, so "every centred
patch in a 63-dimensional subspace" (and the same for the 1x1 shortcut, which samples the
even-even pixels) is a homogeneous linear system in the map. Its null space, computed in
float64 (patches parametrised as mean + basis x coefficients, then the eigenvectors of the normal
matrix), holds the map up to scale and a per-channel constant on the even-even pixels; neither
reaches the loss, since the next convolution's centre tap and the shortcut see only those pixels
and train-mode BN removes per-channel constants and scales. Those directions are projected out.

The solve is now the engine's (service/attacks/stage_map.py); the rows in the results file came
from this probe's own copy of it, before the engine had one. Stage two attacks the image with
the map known: the network above the map is replaced by the linear head <c, map(x)>, c =
dLoss/dmap at the recovered map scaled to unit norm (the engine later found that BN's eps makes
that scale matter, and sets it by the gradient above) and the known label, whose gradient with
respect to stem, layer1 and layer2 equals the client's (exactly, for the true image). The loop:
cosine distance over those gradients + cosine distance between the maps (offsets projected out)
+ 1e-4 TV, Adam (signed), step decay at 3/8, 5/8, 7/8, the valid range kept. Nothing here reads
the image except the scoring: `map_cosine` (the recovered map against the client's, offsets
projected out) and the PSNR/SSIM columns; `fit` rows also fit the best global scale and offset
to the truth, a diagnostic of what the scale-blind gradient leaves free.

  python -m bench.trainbn_rank astronaut face00 --iterations 1500

Prints one JSON line per image; --out appends them to a file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.attacks import append_row
from service.attacks.stage_map import deoffset, recover_map
from service.data import denormalize, load_images, normalize
from service.metrics import psnr, ssim
from service.models import build_model
from service.specs import DataSpec, ModelSpec

DATA = DataSpec(shape=(3, 32, 32), num_classes=10, normalization="cifar10")


def _f2(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    m: Any = model
    return m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))


def _head(model: torch.nn.Module, f2: torch.Tensor) -> torch.Tensor:
    m: Any = model
    return m.fc(torch.flatten(m.avgpool(m.layer4(m.layer3(f2))), 1))


def attack(image: str, label: int, iterations: int, seed: int, lr: float, tv: float) -> dict[str, Any]:
    truth, _ = load_images("photos", [image], size=32, channels=3)
    norm = DATA.resolved_normalization()
    x = normalize(truth, norm)
    y = torch.tensor([label])
    model = build_model(ModelSpec(arch="resnet18", knobs={"stem": "cifar"}, init_seed=0), DATA).train()
    named = dict(model.named_parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(named.values()))
    client = dict(zip(named, grads, strict=True))
    t0 = time.time()
    found, rec = recover_map(
        client["layer3.0.conv1.weight"], client["layer3.0.downsample.0.weight"], (128, 16, 16)
    )
    if found is None:
        raise SystemExit(f"{image}: {rec['why']}")
    target = found.float()
    recover_s = time.time() - t0
    with torch.no_grad():
        truth_map = _f2(model, x)
    map_cos = float(F.cosine_similarity(deoffset(target).flatten(), deoffset(truth_map).flatten(), dim=0))
    head_in = target.clone().requires_grad_(True)
    c = torch.autograd.grad(F.cross_entropy(_head(model, head_in), y), head_in)[0].detach()
    below = [n for n in named if n.split(".")[0] in ("conv1", "bn1", "layer1", "layer2")]
    params = [named[n] for n in below]
    want = [client[n] for n in below]
    want_norm = torch.stack([(t * t).sum() for t in want]).sum().sqrt()
    target_flat = deoffset(target).flatten()

    def tv_loss(z: torch.Tensor) -> torch.Tensor:
        return (z[..., 1:, :] - z[..., :-1, :]).abs().mean() + (z[..., :, 1:] - z[..., :, :-1]).abs().mean()

    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, 0.1)
    lo, hi = normalize(torch.zeros_like(truth), norm), normalize(torch.ones_like(truth), norm)
    trace = []
    t1 = time.time()
    for it in range(1, iterations + 1):
        opt.zero_grad()
        f = _f2(model, z)
        got = torch.autograd.grad((c * f).sum(), params, create_graph=True)
        dot = torch.stack([(a * b).sum() for a, b in zip(got, want, strict=True)]).sum()
        got_norm = torch.stack([(a * a).sum() for a in got]).sum().sqrt()
        l_grad = 1 - dot / (got_norm * want_norm)
        l_map = 1 - F.cosine_similarity(deoffset(f).flatten(), target_flat, dim=0)
        loss = l_grad + l_map + tv * tv_loss(z)
        (zg,) = torch.autograd.grad(loss, z)
        z.grad = zg.sign()
        opt.step()
        sched.step()
        with torch.no_grad():
            z.copy_(torch.max(torch.min(z, hi), lo))
        if it in (300, 600, 1000, 1500, iterations):
            with torch.no_grad():
                out = denormalize(z, norm).clamp(0, 1)
                zz, xx = z.flatten(), x.flatten()
                zc, xc = zz - zz.mean(), xx - xx.mean()
                fit = denormalize((zc * (zc @ xc) / (zc @ zc) + xx.mean()).reshape(x.shape), norm).clamp(0, 1)
            trace.append(
                {
                    "iteration": it,
                    "gradient_distance": round(float(l_grad.detach()), 4),
                    "map_distance": round(float(l_map.detach()), 4),
                    "psnr": round(float(psnr(out, truth)), 2),
                    "ssim": round(float(ssim(out, truth)), 3),
                    "fit_psnr": round(float(psnr(fit, truth)), 2),
                    "fit_ssim": round(float(ssim(fit, truth)), 3),
                    "seconds": round(time.time() - t1, 1),
                }
            )
    return {
        "image": image,
        "label": label,
        "seed": seed,
        "null_dim": rec["null_dim"],
        "rank": rec["rank"],
        "map_cosine": round(map_cos, 6),
        "recover_seconds": round(recover_s, 1),
        "lr": lr,
        "tv": tv,
        "trace": trace,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+")
    ap.add_argument("--label", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--tv", type=float, default=1e-4)
    ap.add_argument("--out", type=Path, default=None, help="append each JSON line to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for image in args.images:
        row = attack(image, args.label, args.iterations, args.seed, args.lr, args.tv)
        print(json.dumps(row), flush=True)
        if args.out:
            append_row(args.out, row)


if __name__ == "__main__":
    main()
