"""Generator files: safetensors weights with the manifest in the metadata, nothing else.

`load_generator` is the one way a generator comes to life from bytes: the header is checked by
tensorio (a pickle, a torch.save archive or a corrupt file is refused before anything is
allocated), the manifest is validated, the architecture is built from it and the tensors must
match it exactly (names, shapes, floating-point dtypes), as model weights must.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from service.errors import ShapeMismatchError
from service.generators.archs import build_generator
from service.generators.manifest import GeneratorManifest
from service.tensorio import (
    STATE_DTYPES,
    load_safetensors,
    match_state,
    read_local,
    safetensors_metadata,
    save_safetensors,
    scan_safetensors,
)


@dataclass(frozen=True)
class LoadedGenerator:
    module: nn.Module  # in eval mode, on the CPU
    manifest: GeneratorManifest

    def sample_latents(self, n: int, seed: int = 0) -> torch.Tensor:
        """n latents from the generator's prior N(0, I), seeded."""
        return sample_latents(self.manifest, n, seed)


def sample_latents(manifest: GeneratorManifest, n: int, seed: int = 0) -> torch.Tensor:
    """n latents (n, latent_dim) from N(0, I), from a private generator seeded with `seed`."""
    return torch.randn(n, manifest.latent_dim, generator=torch.Generator().manual_seed(seed))


def generator_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """What a generator file holds: every floating-point state-dict entry (integer buffers such
    as batch norm's num_batches_tracked are left out)."""
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


def save_generator(module: nn.Module, manifest: GeneratorManifest, target: str | Path | BinaryIO) -> None:
    """Write `module`'s weights and `manifest` as a generator file (a path or a writable buffer).

    The module must be the architecture the manifest describes (checked, so that the file loads)."""
    tensors = generator_tensors(module)
    match_state(_meta_generator(manifest), tensors, what="weights")
    data = save_safetensors(tensors, manifest.to_metadata())
    if isinstance(target, str | Path):
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    else:
        target.write(data)


def generator_bytes(module: nn.Module, manifest: GeneratorManifest) -> bytes:
    buffer = io.BytesIO()
    save_generator(module, manifest, buffer)
    return buffer.getvalue()


def read_manifest(
    data: bytes | BinaryIO, size: int | None = None, name: str = "generator"
) -> GeneratorManifest:
    """The manifest of a generator file (bytes, or a seekable file of `size` bytes), after the
    safetensors header checks; reads the header only."""
    return GeneratorManifest.from_metadata(safetensors_metadata(data, size, name=name), name)


def load_generator(data: bytes, name: str = "generator") -> LoadedGenerator:
    """The generator in untrusted safetensors bytes, in eval mode on the CPU.

    UnsupportedFormatError for pickles, torch.save archives and other formats; ArtifactError for
    a corrupt file, a missing or invalid manifest, non-float tensors or NaN/Inf values;
    SpecError for an unknown architecture or a shape it does not support; ShapeMismatchError
    when the tensors do not fit the architecture exactly."""
    manifest = read_manifest(data, name=name)
    tensors = load_safetensors(data, allowed_dtypes=STATE_DTYPES, name=name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = build_generator(manifest)
    state = _matched(module, tensors, name)
    module.load_state_dict(state, strict=False)  # match_state is strict; integer buffers may be absent
    return LoadedGenerator(module.eval(), manifest)


def load_generator_file(path: str | Path) -> LoadedGenerator:
    return load_generator(read_local(path), name=str(path))


def check_generator_file(f: BinaryIO, size: int) -> tuple[GeneratorManifest, int, str]:
    """`load_generator`'s checks on a seekable file in one streamed pass (the architecture built
    on the meta device): the manifest, the tensor count and the sha256."""
    manifest = read_manifest(f, size)
    tensors, sha256 = scan_safetensors(f, size, allowed_dtypes=STATE_DTYPES, name="generator")
    _matched(_meta_generator(manifest), tensors, "generator")
    return manifest, len(tensors), sha256


def _meta_generator(manifest: GeneratorManifest) -> nn.Module:
    with torch.device("meta"):
        return build_generator(manifest)


def _matched(module: nn.Module, tensors: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    try:
        return match_state(module, tensors, what="weights")
    except ShapeMismatchError as e:
        raise ShapeMismatchError(f"{name}: {e}", e.mismatches) from None
