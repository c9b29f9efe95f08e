"""LPIPS (Zhang et al. 2018) from the ``lpips`` package, without any download.

The ``lpips`` package ships its calibrated linear layers; the ImageNet backbone (AlexNet, VGG-16
or SqueezeNet 1.1) comes from torchvision's checkpoint file, which gradleak only reads: from the
configured directory (GRADLEAK_LPIPS_WEIGHTS_DIR, passed in as ``weights_dir``) or the standard
torch hub cache (``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``),
under torchvision's own file name. When it is missing, LPIPS is unavailable and the error says
which files were looked for where. Each network is built once per (net, device, checkpoint file).
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lpips as lpips_pkg
import torch
from torchvision.models import AlexNet_Weights, SqueezeNet1_1_Weights, VGG16_Weights

from service.errors import MetricUnavailableError
from service.metrics.checks import check_pair

LPIPS_VERSION = "0.1"
_BACKBONES = {
    "alex": AlexNet_Weights.IMAGENET1K_V1,
    "vgg": VGG16_Weights.IMAGENET1K_V1,
    "squeeze": SqueezeNet1_1_Weights.IMAGENET1K_V1,
}
LPIPS_NETS = tuple(_BACKBONES)
# Smallest image side each backbone's pooling stack accepts.
LPIPS_MIN_SIDE = {"alex": 31, "vgg": 16, "squeeze": 17}
_BATCH = 32

_lock = threading.Lock()
_nets: dict[tuple[str, str, Path], torch.nn.Module] = {}


def _check_net(net: str) -> None:
    if net not in _BACKBONES:
        raise ValueError(f"unknown LPIPS network {net!r}; valid: {', '.join(LPIPS_NETS)}")


def backbone_filename(net: str) -> str:
    """torchvision's file name for the backbone checkpoint, e.g. alexnet-owt-7be5be79.pth."""
    _check_net(net)
    return Path(urlparse(_BACKBONES[net].url).path).name


def weight_search_dirs(weights_dir: str | Path | None = None) -> list[Path]:
    """Where backbone checkpoints are looked for, in order."""
    dirs = [Path(weights_dir).expanduser()] if weights_dir is not None else []
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    return dirs


def find_backbone_checkpoint(net: str = "alex", weights_dir: str | Path | None = None) -> Path:
    """The backbone checkpoint file, or MetricUnavailableError naming the file and the paths."""
    name = backbone_filename(net)
    dirs = weight_search_dirs(weights_dir)
    for d in dirs:
        if (d / name).is_file():
            return (d / name).resolve()
    raise MetricUnavailableError(
        f"LPIPS ({net}) needs the torchvision ImageNet checkpoint {name}; it is not in "
        + " nor ".join(str(d) for d in dirs)
        + " (a job never downloads weights: run `gradleak assets fetch lpips` once, or copy the file "
        "there, or set GRADLEAK_LPIPS_WEIGHTS_DIR)"
    )


def _load_state(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        raise MetricUnavailableError(f"cannot read {what} {path}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MetricUnavailableError(f"{what} {path} is not a state dict of tensors")
    return state


def _build(net: str, device: str, checkpoint: Path) -> torch.nn.Module:
    backbone = _load_state(checkpoint, "LPIPS backbone checkpoint")
    with warnings.catch_warnings():
        # lpips calls torchvision's deprecated `pretrained=` argument; with pnet_rand=True it
        # builds a randomly initialised backbone, so nothing is downloaded.
        warnings.simplefilter("ignore", UserWarning)
        model = lpips_pkg.LPIPS(
            pretrained=False, net=net, version=LPIPS_VERSION, pnet_rand=True, verbose=False
        )
    mapped = {}
    # lpips keeps torchvision's `features` modules under their original indices, split in slices
    for key, target in model.net.state_dict().items():
        source = "features." + key.split(".", 1)[1]
        if source not in backbone or backbone[source].shape != target.shape:
            raise MetricUnavailableError(
                f"{checkpoint} is not a torchvision {net} checkpoint: {source} missing or mis-shaped"
            )
        mapped[key] = backbone[source]
    model.net.load_state_dict(mapped)

    linear_path = Path(lpips_pkg.__file__).parent / "weights" / f"v{LPIPS_VERSION}" / f"{net}.pth"
    linear = _load_state(linear_path, "LPIPS linear-layer weights")
    # lin0..linK; the same layers appear again under `lins.` (a ModuleList of them)
    expected = {k for k in model.state_dict() if k.startswith("lin") and not k.startswith("lins.")}
    if set(linear) != expected:
        raise MetricUnavailableError(f"{linear_path} does not hold the LPIPS {net} linear layers")
    model.load_state_dict(linear, strict=False)

    model.eval().requires_grad_(False)
    return model.to(device)


def get_lpips_net(
    net: str = "alex", device: str | torch.device = "cpu", weights_dir: str | Path | None = None
) -> torch.nn.Module:
    """The LPIPS network on ``device``, built on first use and cached; MetricUnavailableError
    when the backbone checkpoint is missing or unreadable (nothing is cached then)."""
    _check_net(net)
    dev = str(torch.device(device))
    checkpoint = find_backbone_checkpoint(net, weights_dir)
    key = (net, dev, checkpoint)
    with _lock:
        if key not in _nets:
            _nets[key] = _build(net, dev, checkpoint)
        return _nets[key]


def clear_lpips_cache() -> None:
    """Drop the cached networks (frees their memory; the next call rebuilds them)."""
    with _lock:
        _nets.clear()


def lpips(
    recon: torch.Tensor,
    truth: torch.Tensor,
    net: str = "alex",
    weights_dir: str | Path | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """LPIPS distance of each image pair, an (N,) float64 tensor (lower = more similar).

    Images are [0, 1] pixels, mapped to the [-1, 1] the network expects; grayscale images are
    replicated to RGB. ``device`` defaults to the inputs' device.
    """
    _check_net(net)
    r, t = check_pair(recon, truth)
    h, w = r.shape[-2:]
    if min(h, w) < LPIPS_MIN_SIDE[net]:
        raise MetricUnavailableError(
            f"LPIPS ({net}) needs images of at least {LPIPS_MIN_SIDE[net]} pixels a side, got {h}x{w}"
        )
    dev = torch.device(device) if device is not None else r.device
    model = get_lpips_net(net, dev, weights_dir)
    out = []
    with torch.no_grad():
        for start in range(0, r.shape[0], _BATCH):
            a = r[start : start + _BATCH].to(dev, torch.float32).expand(-1, 3, -1, -1) * 2 - 1
            b = t[start : start + _BATCH].to(dev, torch.float32).expand(-1, 3, -1, -1) * 2 - 1
            out.append(model(a, b).flatten().to(torch.float64))
    return torch.cat(out).to(r.device)
