"""Files gradleak's metrics need but does not ship, fetched once by `gradleak assets fetch NAME`.

Each asset is pinned by its sha256: a download is stored (atomically, under the file name the
metric looks for) only when its digest matches, so a truncated, tampered or different file never
reaches the metric. Nothing is downloaded at run time; without the file the metric reports itself
unavailable (see service/metrics/perceptual.py).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import httpx

from service.errors import GradleakError


class AssetError(GradleakError):
    """An asset could not be fetched or failed its checksum; nothing was stored."""


@dataclass(frozen=True)
class Asset:
    name: str
    filename: str
    url: str
    sha256: str
    description: str


def _lpips_backbone() -> Asset:
    from service.metrics.perceptual import backbone_filename

    filename = backbone_filename("alex")
    return Asset(
        name="lpips",
        filename=filename,
        url=f"https://download.pytorch.org/models/{filename}",
        # torchvision checks only the first 8 hex digits (the file name's suffix); the full digest
        sha256="7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02",
        description="torchvision's ImageNet AlexNet weights, LPIPS's backbone (233 MiB)",
    )


ASSETS = {"lpips": _lpips_backbone}


def get_asset(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; valid: {', '.join(sorted(ASSETS))}")
    return ASSETS[name]()


def default_dir(lpips_weights_dir: Path | None) -> Path:
    """Where the LPIPS metric looks first: GRADLEAK_LPIPS_WEIGHTS_DIR, else the torch hub cache."""
    from service.metrics.perceptual import weight_search_dirs

    return weight_search_dirs(lpips_weights_dir)[0]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(asset: Asset, directory: Path, url: str | None = None, timeout: float = 60.0) -> tuple[Path, bool]:
    """Download `asset` into `directory` unless a verified copy is there; returns the path and
    whether it was downloaded. Raises AssetError (one line) when the download fails or its
    sha256 is not the pinned one."""
    target = directory / asset.filename
    if target.is_file() and sha256_of(target) == asset.sha256:
        return target, False
    source = url or asset.url
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AssetError(f"cannot create {directory}: {e.strerror}") from None
    partial = directory / f".{asset.filename}.part"
    digest = hashlib.sha256()
    try:
        with (
            httpx.stream("GET", source, follow_redirects=True, timeout=timeout) as response,
            partial.open("wb") as f,
        ):
            if response.status_code != 200:
                raise AssetError(f"cannot download {asset.name} from {source}: HTTP {response.status_code}")
            for chunk in response.iter_bytes(1 << 20):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != asset.sha256:
            raise AssetError(
                f"refused {source}: its sha256 is {digest.hexdigest()}, not the pinned {asset.sha256}; "
                "nothing was stored"
            )
        os.replace(partial, target)
    except httpx.HTTPError as e:
        raise AssetError(
            f"cannot download {asset.name} from {source} ({type(e).__name__}: {e}); offline, copy "
            f"{asset.filename} into {directory} or pass --url"
        ) from None
    finally:
        partial.unlink(missing_ok=True)
    return target, True
