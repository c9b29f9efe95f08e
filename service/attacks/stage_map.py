"""Train-mode batch norm, a batch of one: a ResNet's stage-2 output read from stage 3's gradients.

A client that normalises with its own batch statistics shares a gradient that is a rough function
of the image (bench/ATTACKS.md, "Train-mode batch norm"): gradient matching from afar stalls.
Part of that gradient is not rough at all. The first convolution of a torchvision ResNet's
third stage (3x3, stride 2, padding 1) sees the second stage's output map at P positions and
has more output channels than P, so its weight gradient, a sum over positions of
delta_p patch_p^T, has low rank; train-mode BN after it makes the deltas sum to zero, so the rank
is P - 1 and the row space holds every centred patch of the map. Patches overlap, so "every
centred patch lies in that subspace" (and every centred pixel the 1x1 stride-2 shortcut samples
lies in its gradient's row space) is a homogeneous linear system in the map, solved here in
float64: the patches are parametrised as their mean plus the row space's basis times
coefficients (so the unknowns are few), the normal matrix is assembled column by column through
the system's own adjoint, and its null space holds the client's map.

That null space is the map times any scale plus any per-channel constant on the even-even pixels
(C + 1 dimensions for C channels, checked before anything is used): the next convolution's centre
tap and the shortcut see only those pixels, and train-mode BN removes per-channel constants and
scales, so nothing downstream, the gradient included, can tell them apart. They are projected out
(`deoffset`); the sign is the one a ReLU's output has (most pixels off the even grid positive).

The attack then matches, instead of the whole gradient, the parameters below the map, with the
network above it replaced by the linear head <c, map(x)>, c = dLoss/dmap at the recovered map and
the known label: for the client's image that head's gradient equals the client's exactly. The
objective adds the cosine distance between the candidate's map and the recovered one. Measured
in bench/results/attacks-cpu-trainbn.json (`stage_map` section).

Only where it holds: a gradient (FedSGD) of one image with a known label, BN in train mode, a
torchvision-style ResNet whose third stage opens with that geometry, a rank gap in both gradients
(noise, quantisation and sparsification close it: then the path is not taken and `why` says so),
and an unknown count within `MAX_UNKNOWNS`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from kernels import gradient_matching_loss, total_variation
from service.attacks.base import AttackProblem, Control
from service.attacks.optimize import Objective

# the null-space solve holds a square matrix of this side in float64 (8000: 0.5 GB); a 32x32
# CIFAR ResNet has 5121 unknowns, a 64x64 one 66177 (beyond it: not applicable)
MAX_UNKNOWNS = 8000
RANK_GAP = 1e3  # the last singular value kept over the first dropped, at least
BELOW = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2")  # a torchvision ResNet's modules
# the recovered map, at its chosen scale, must give the client's gradient above it to this cosine
# distance (the client's own map gives ~1e-5 in float32; a wrong one far more)
MAX_ABOVE_DISTANCE = 1e-2


@dataclass
class StageMap:
    """The recovered map (unit norm, even-grid offsets projected out), the head's signal at it,
    and the parameters below it whose gradients the attack matches."""

    target: torch.Tensor
    head: torch.Tensor
    names: list[str]
    details: dict[str, Any] = field(default_factory=dict)


def even_mask(f: torch.Tensor) -> torch.Tensor:
    """1 on the map's even-even pixels, 0 elsewhere (H, W), in the map's dtype and device."""
    mask = torch.zeros(f.shape[-2:], dtype=f.dtype, device=f.device)
    mask[::2, ::2] = 1
    return mask


def deoffset(f: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The map with each channel's mean over the even-even pixels taken off those pixels (the
    directions no gradient sees); `mask`: `even_mask` of such a map, made once by a caller that
    calls this every iteration."""
    mask = even_mask(f) if mask is None else mask
    even_mean = (f * mask).sum((-2, -1), keepdim=True) / mask.sum()
    return f - even_mean * mask


def _row_space(g: torch.Tensor, rank: int) -> tuple[torch.Tensor | None, float]:
    """The first `rank` right singular vectors of the flattened gradient, and the gap after them
    (None where the gradient has no such rank)."""
    _, s_all, vh = torch.linalg.svd(g.reshape(g.shape[0], -1).double(), full_matrices=False)
    if rank >= s_all.numel() or s_all[0] == 0:
        return None, 0.0
    gap = float(s_all[rank - 1] / s_all[rank].clamp_min(1e-300))
    return vh[:rank].T.contiguous(), gap


def _geometry(model: nn.Module) -> tuple[nn.Conv2d, nn.Conv2d] | str:
    layer3 = getattr(model, "layer3", None)
    parts = (*BELOW, "layer3", "layer4", "avgpool", "fc")
    if not all(hasattr(model, n) for n in parts) or not isinstance(layer3, nn.Sequential) or not layer3:
        return "the model is not a torchvision-style ResNet"
    block = layer3[0]
    conv, down = getattr(block, "conv1", None), getattr(block, "downsample", None)
    short = down[0] if isinstance(down, nn.Sequential) and len(down) > 1 else None
    # batch norm right after both convolutions is what centres their deltas (train mode)
    normed = isinstance(getattr(block, "bn1", None), nn.BatchNorm2d) and (
        isinstance(down, nn.Sequential) and len(down) > 1 and isinstance(down[1], nn.BatchNorm2d)
    )
    ok = (
        normed
        and isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.stride == (2, 2)
        and conv.padding == (1, 1)
        and conv.bias is None
        and isinstance(short, nn.Conv2d)
        and short.kernel_size == (1, 1)
        and short.stride == (2, 2)
        and short.bias is None
    )
    if not ok:
        return (
            "the third stage does not open with a 3x3 stride-2 convolution and a 1x1 stride-2 shortcut, "
            "each followed by batch norm"
        )
    assert isinstance(conv, nn.Conv2d) and isinstance(short, nn.Conv2d)
    return conv, short


def recover_map(
    g_conv: torch.Tensor,
    g_short: torch.Tensor,
    shape: tuple[int, int, int],
    time_left: Callable[[], bool] = lambda: True,
) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """The map (1, C, H, W) whose stride-2 centred patches lie in `g_conv`'s row space and whose
    centred even-even pixels lie in `g_short`'s, up to the directions `deoffset` removes; None
    (and why) where the gradients do not determine it."""
    c, h, w = shape
    positions = ((h + 1) // 2) * ((w + 1) // 2)
    rank = positions - 1
    dim = g_conv[0].numel()
    info: dict[str, Any] = {"positions": positions, "rank": rank}
    unknowns = dim + (positions - 1) * rank
    info["unknowns"] = unknowns
    if rank >= min(g_conv.shape[0], dim) or rank >= min(g_short.shape[0], c):
        return None, {**info, "why": "as many positions as channels: the gradient has full rank"}
    if unknowns > MAX_UNKNOWNS:
        return None, {**info, "why": f"{unknowns} unknowns, more than {MAX_UNKNOWNS} (images too large)"}
    v, gap = _row_space(g_conv, rank)
    vs, gap_short = _row_space(g_short, rank)
    info["rank_gap"] = [gap, gap_short]
    if v is None or vs is None or min(gap, gap_short) < RANK_GAP:
        return None, {**info, "why": "no rank gap in the gradient (noised, quantised or sparsified?)"}
    kw: dict[str, Any] = {"kernel_size": 3, "padding": 1, "stride": 2}
    ones = torch.ones(1, c, h, w, dtype=torch.float64, device=v.device)
    count = F.fold(F.unfold(ones, **kw), (h, w), **kw)

    def maps(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = u.shape[0]
        coef = u[:, dim:].reshape(n, positions - 1, rank)
        coef = torch.cat([coef, -coef.sum(1, keepdim=True)], 1)
        patches = u[:, :dim, None] + torch.einsum("dr,npr->ndp", v, coef)
        return patches, F.fold(patches, (h, w), **kw) / count

    def residual(u: torch.Tensor) -> torch.Tensor:
        patches, f = maps(u)
        off_map = patches - F.unfold(f, **kw)  # patches that no map has
        q = f[:, :, ::2, ::2].reshape(u.shape[0], c, -1)
        q = q - q.mean(2, keepdim=True)
        off_short = q - torch.einsum("cr,nrp->ncp", vs, torch.einsum("cr,ncp->nrp", vs, q))
        return torch.cat([off_map.flatten(1), off_short.flatten(1)], 1)

    normal = torch.empty(unknowns, unknowns, dtype=torch.float64, device=v.device)
    for s in range(0, unknowns, 256):
        if not time_left():  # checked between blocks of the assembly, the solve's bulk
            return None, {**info, "why": "the time limit or a stop request came first"}
        k = min(256, unknowns - s)
        e = torch.zeros(k, unknowns, dtype=torch.float64, device=v.device)
        e[torch.arange(k), torch.arange(s, s + k)] = 1
        e.requires_grad_(True)
        r = residual(e)
        (cols,) = torch.autograd.grad(r, e, grad_outputs=r.detach())  # A^T A e, one column each
        normal[:, s : s + k] = cols.T
    normal = (normal + normal.T) / 2
    ev, vec = torch.linalg.eigh(normal)
    null = int((ev < 1e-9 * ev[-1]).sum())
    info["null_dim"] = null
    if null != c + 1:
        return None, {**info, "why": f"the solution space has {null} dimensions, not {c + 1}"}
    with torch.no_grad():
        _, f_null = maps(vec[:, :null].T)
        _, _, vh = torch.linalg.svd(deoffset(f_null).flatten(1), full_matrices=False)
    f = vh[0].reshape(1, c, h, w)
    odd = torch.ones(h, w, dtype=torch.bool, device=f.device)
    odd[::2, ::2] = False
    if (f[..., odd] < 0).double().mean() > 0.5:  # a ReLU's output: mostly positive off the even grid
        f = -f
    return f, info


def _below(model: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict((n, getattr(model, n)) for n in BELOW))


def _above(model: nn.Module) -> nn.Sequential:
    names = ("layer3", "layer4", "avgpool", "flatten", "fc")
    parts: list[nn.Module] = [nn.Flatten() if n == "flatten" else getattr(model, n) for n in names]
    return nn.Sequential(OrderedDict(zip(names, parts, strict=True)))


def stage_map_for(problem: AttackProblem, model: nn.Module, setting: str, control: Control) -> StageMap | str:
    """The recovered map and what the attack matches below it, or why the path is not taken.
    `model` is the attacker's copy (attack_model: BN in the client's mode). The solve counts
    against the attack's time limit and heeds its stop requests."""
    if setting == "off":
        return "off"
    if problem.bn_mode != "train":
        return "BN in eval mode (the default path leaks there)"
    if problem.target_kind != "gradient" or problem.update_kind != "gradient":
        return "the update is not a gradient (FedSGD)"
    if problem.defenses:
        return "the update was post-processed"
    if problem.num_images != 1:
        return "a batch of more than one image"
    if problem.labels is None or problem.labels.dtype.is_floating_point:
        return "the label is not known"
    geometry = _geometry(model)
    if isinstance(geometry, str):
        return geometry
    conv, short = geometry
    names = problem.param_names
    named = dict(zip(names, problem.target, strict=True))
    conv_name = next((n for n, p in model.named_parameters() if p is conv.weight), None)
    short_name = next((n for n, p in model.named_parameters() if p is short.weight), None)
    if conv_name not in named or short_name not in named:
        return "the third stage's gradients are not in the update"
    below_names = [n for n in names if n.split(".")[0] in BELOW]
    if problem.match_names is not None and not set(below_names) <= set(problem.match_names):
        return "attack.match_layers leaves out layers below the map"
    started = time.perf_counter()
    c, h, w = problem.image_shape
    with torch.no_grad():
        probe = _below(model)(torch.zeros(1, c, h, w, device=problem.device))

    def time_left() -> bool:
        limit = control.budget.time_limit_s
        if limit is not None and control.elapsed >= limit:
            return False
        return not (control.should_stop is not None and control.should_stop())

    g_conv, g_short = named[conv_name].detach(), named[short_name].detach()
    target, info = recover_map(g_conv, g_short, tuple(probe.shape[1:]), time_left)
    info["seconds"] = round(time.perf_counter() - started, 2)
    if target is None:
        return str(info["why"])
    dtype = problem.target[0].dtype
    unit = target.to(dtype) / target.to(dtype).pow(2).mean().sqrt()
    labels = problem.labels.to(unit.device)
    rms, distance = _map_scale(model, unit, labels, named)
    info["map_rms"], info["above_distance"] = rms, distance
    if distance > MAX_ABOVE_DISTANCE:
        return f"the recovered map does not give the gradient above it (cosine distance {distance:.3g})"
    f = (rms * unit).requires_grad_(True)
    head = torch.autograd.grad(F.cross_entropy(_above(model)(f), labels), f)[0]
    flat = deoffset(unit)
    return StageMap(
        target=(flat / flat.norm()).detach(),
        head=head.detach(),
        names=below_names,
        details={"applied": True, "map_shape": list(probe.shape[1:]), **info},
    )


def _map_scale(
    model: nn.Module, unit: torch.Tensor, labels: torch.Tensor, client: dict[str, torch.Tensor]
) -> tuple[float, float]:
    """The map's RMS, found by the gradient above it: the layers above are blind to the map's
    scale but for BN's eps, which makes a map of the wrong scale give a different gradient (at
    a unit norm, 1e-2 RMS, the head's signal was off by a cosine of 0.4 in the tests). A grid in
    log RMS, then a finer one around its best; returns the RMS and its cosine distance between
    the gradient above the map and the client's (near 0 where the map is the client's)."""
    top = _above(model)
    above = {n: p.detach() for n, p in top.named_parameters()}
    want = [client[n] for n in above]
    buffers = {n: b.detach() for n, b in top.named_buffers()}

    def head_loss(p: dict[str, torch.Tensor], f: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(top, (p, buffers), (f,)), labels)

    def distance(log_rms: float) -> float:
        g = grad(head_loss)(above, unit * 10**log_rms)
        got = [g[n] for n in above]
        return float(gradient_matching_loss(got, want, cost="cosine_global", backend="reference"))

    coarse = min((distance(x / 4), x / 4) for x in range(-12, 9))  # RMS 1e-3 .. 1e2
    best, log_rms = min((distance(coarse[1] + x / 40), coarse[1] + x / 40) for x in range(-10, 11))
    return 10**log_rms, best


def stage_objective(problem: AttackProblem, model: nn.Module, stage: StageMap, tv_weight: float) -> Objective:
    """Cosine distance over the gradients below the map (the linear head's) plus the cosine
    distance between the candidate's map and the recovered one, plus TV. torch.func throughout,
    so it batches over restarts."""
    below = _below(model)
    matched = set(stage.names)
    params = {n: p.detach() for n, p in below.named_parameters() if n in matched}
    fixed = {n: p.detach() for n, p in below.named_parameters() if n not in params}
    buffers = {n: b.detach() for n, b in below.named_buffers()}
    target = dict(zip(problem.param_names, problem.target, strict=True))
    wanted = [target[n].detach() for n in stage.names]
    head, goal = stage.head, stage.target.flatten()
    mask = even_mask(stage.target)

    def forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(below, ({**fixed, **p}, buffers), (x,))

    def linear_head(p: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = forward(p, x)
        return (head * f).sum(), f

    def objective(x: torch.Tensor, y: torch.Tensor, consensus: torch.Tensor) -> torch.Tensor:
        g, f = grad(linear_head, has_aux=True)(params, x)
        loss = gradient_matching_loss(
            [g[n] for n in stage.names], wanted, cost="cosine_global", backend="reference"
        )
        m = deoffset(f, mask).flatten()
        loss = loss + 1 - (m @ goal) / m.norm().clamp_min(1e-12)
        if tv_weight > 0:
            loss = loss + tv_weight * total_variation(x, backend="reference")
        return loss

    return objective
