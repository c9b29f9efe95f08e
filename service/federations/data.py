"""A federation's data: the training pool, the held-out test set, and each client's shard.

The partition depends on the labels only, so for the patch task it is computed (and checked)
before a pixel is loaded: the API refuses a federation that would leave a client with nothing to
train on without building anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from service.errors import SpecError
from service.federations.spec import FederatedData, FederationSpec, Partition


@dataclass(frozen=True)
class FederatedDataset:
    train_images: torch.Tensor  # (N, C, H, W) in [0, 1]
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]


def _patch_labels(data: FederatedData) -> torch.Tensor:
    photos = data.patch_photos()
    return torch.arange(len(photos)).repeat_interleave(data.per_class)


def _split(
    images: torch.Tensor, labels: torch.Tensor, data: FederatedData, seed: int
) -> tuple[torch.Tensor, ...]:
    from service.data.patches import train_test_split

    return train_test_split(images, labels, data.test_fraction, seed=seed)


def train_labels(spec: FederationSpec) -> torch.Tensor | None:
    """The training pool's labels in pool order when they are known without reading pixels (the
    patch task); None otherwise."""
    if spec.data.source != "patches":
        return None
    labels = _patch_labels(spec.data)
    _, train_y, _, _ = _split(torch.empty(len(labels), 0), labels, spec.data, spec.seed)
    return train_y


def load_dataset(spec: FederationSpec) -> FederatedDataset:
    """Load the data set the spec names and split it (seeded by the spec's seed)."""
    data = spec.data
    if data.source == "patches":
        from service.data.patches import photo_patches

        photos = data.patch_photos()
        images, labels = photo_patches(
            data.size, photos, data.per_class, seed=spec.seed, channels=data.channels
        )
        classes = photos
    elif data.source in ("cifar10", "cifar100"):
        images, labels, classes = _load_cifar(data, spec.seed)
    else:
        images, labels, classes = _load_folder(data, spec.seed)
    train_x, train_y, test_x, test_y = _split(images, labels, data, spec.seed)
    return FederatedDataset(train_x, train_y, test_x, test_y, classes)


def _subsample(count: int, data: FederatedData, seed: int) -> list[int]:
    if data.max_samples is None or data.max_samples >= count:
        return list(range(count))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(count, size=data.max_samples, replace=False).tolist())


def _load_cifar(data: FederatedData, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from service.data.cifar import cifar_classes, load_cifar

    which = 10 if data.source == "cifar10" else 100
    assert data.path is not None
    classes = cifar_classes(data.path, which)
    count = 50_000  # the train split of both CIFARs
    images, labels = load_cifar(
        data.path, which, _subsample(count, data, seed), "train", data.size, data.channels
    )
    return images, torch.tensor(labels, dtype=torch.long), classes


def _load_folder(data: FederatedData, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from service.data.folder import index_folder, load_folder

    assert data.path is not None
    index = index_folder(data.path)
    if index.labels is None or index.classes is None:
        raise SpecError(
            f"{data.path} holds no class sub-folders: a federation trains a classifier, so give an "
            "ImageFolder (one sub-folder of images per class)"
        )
    if len(index.classes) < 2:
        raise SpecError(f"{data.path} has one class; a classifier needs at least two")
    chosen = [index.files[i] for i in _subsample(len(index.files), data, seed)]
    images, labels = load_folder(data.path, chosen, data.size, data.channels)
    assert labels is not None
    return images, torch.tensor(labels, dtype=torch.long), list(index.classes)


def partition(labels: torch.Tensor, num_clients: int, part: Partition, seed: int) -> list[torch.Tensor]:
    """Each client's indices into the training pool (seeded).

    iid: a shuffle dealt round-robin, so shard sizes differ by at most one. dirichlet: for every
    class, proportions p ~ Dir(alpha, ..., alpha) over the clients split that class's samples
    (Hsu et al. 2019). `samples_per_client` then keeps each shard's first samples.
    """
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    if part.kind == "iid":
        order = rng.permutation(len(y))
        shards = [order[c::num_clients] for c in range(num_clients)]
    else:
        pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for cls in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == cls))
            shares = rng.dirichlet(np.full(num_clients, part.alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).round().astype(int)
            for c, chunk in enumerate(np.split(idx, cuts)):
                pieces[c].append(chunk)
        shards = [rng.permutation(np.concatenate(p)) for p in pieces]
    if part.samples_per_client is not None:
        shards = [s[: part.samples_per_client] for s in shards]
    return [torch.from_numpy(np.sort(s).astype(np.int64)) for s in shards]


def check_shards(shards: list[torch.Tensor], spec: FederationSpec) -> None:
    """Refuse a partition a client cannot train on, naming the client."""
    sizes = [len(s) for s in shards]
    empty = [c for c, n in enumerate(sizes) if n == 0]
    if empty:
        hint = (
            "raise partition.alpha, or use fewer clients"
            if spec.partition.kind == "dirichlet"
            else ("use fewer clients or more data")
        )
        raise SpecError(
            f"the {spec.partition.kind} partition leaves client(s) {empty[:10]} with no sample "
            f"({sum(sizes)} training samples over {spec.num_clients} clients): {hint}"
        )
    batch = spec.client.batch_size
    if spec.client.protocol == "fedavg" and batch is not None:
        smallest = min(range(len(sizes)), key=sizes.__getitem__)
        if sizes[smallest] < batch:
            raise SpecError(
                f"client.batch_size={batch} is above client {smallest}'s {sizes[smallest]} samples: "
                "lower the batch size, or give clients more samples"
            )
