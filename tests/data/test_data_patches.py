from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from service.data import DEFAULT_PATCH_PHOTOS, photo_patches, train_test_split
from service.errors import SpecError, UnknownNameError


def test_shapes_labels_and_range() -> None:
    x, y = photo_patches(size=24, photos=["astronaut", "camera", "brick"], per_class=7, channels=1)
    assert x.shape == (21, 1, 24, 24) and x.dtype == torch.float32
    assert y.tolist() == [0] * 7 + [1] * 7 + [2] * 7
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert len({tuple(p.flatten()[:50].tolist()) for p in x}) == 21  # no two crops alike


def test_deterministic_given_seed() -> None:
    a = photo_patches(size=16, per_class=5, seed=3)
    b = photo_patches(size=16, per_class=5, seed=3)
    c = photo_patches(size=16, per_class=5, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape[0] == 5 * len(DEFAULT_PATCH_PHOTOS)


def test_bad_arguments() -> None:
    with pytest.raises(SpecError):
        photo_patches(photos=["astronaut"])
    with pytest.raises(SpecError):
        photo_patches(photos=["cat", "chelsea"])  # the same picture twice
    with pytest.raises(SpecError):
        photo_patches(per_class=0)
    with pytest.raises(UnknownNameError):
        photo_patches(photos=["astronaut", "unicorn"])


def test_split_is_stratified_disjoint_and_seeded() -> None:
    x = torch.arange(60, dtype=torch.float32).view(60, 1, 1, 1)
    y = torch.arange(3).repeat_interleave(20)
    xtr, ytr, xte, yte = train_test_split(x, y, test_fraction=0.25, seed=1)
    assert torch.bincount(yte).tolist() == [5, 5, 5]
    assert torch.bincount(ytr).tolist() == [15, 15, 15]
    ids = torch.cat([xtr, xte]).flatten().long().sort().values
    assert torch.equal(ids, torch.arange(60))
    assert torch.equal(y[xte.flatten().long()], yte)  # labels follow their images
    again = train_test_split(x, y, test_fraction=0.25, seed=1)
    assert torch.equal(again[2], xte)
    with pytest.raises(SpecError):
        train_test_split(x, y, test_fraction=1.0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    # tiny convolutions run far slower with intra-op threads fighting for a busy CPU
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_a_small_convnet_learns_the_task_well_above_chance() -> None:
    x, y = photo_patches(size=16, per_class=40, seed=0)
    xtr, ytr, xte, yte = train_test_split(x, y, test_fraction=0.25, seed=0)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    epochs, batch = 8, 32
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=1e-2, total_steps=epochs * ((len(ytr) + batch - 1) // batch)
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(ytr), generator=gen).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xtr[idx]), ytr[idx]).backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(xte).argmax(1) == yte).float().mean())
    assert accuracy > 0.5, f"test accuracy {accuracy:.2f} (chance 0.10)"
