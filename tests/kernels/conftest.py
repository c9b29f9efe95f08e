"""Kernel tests run the Triton kernels on CPU tensors through Triton's interpreter.

TRITON_INTERPRET is read when a function is decorated with @triton.jit, which includes triton's
own library (tl.sum, ...) when triton.language is first imported. It is set here, before this
directory's tests import anything; if another test module imported triton earlier in the same
process, the kernels cannot be interpreted and test_kernels_run_in_the_interpreter says so (set
TRITON_INTERPRET=1 in the environment, or run tests/kernels on its own).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
import torchvision


@pytest.fixture
def seed() -> Iterator[int]:
    """A fresh seed per test, printed so that a failure can be replayed."""
    value = random.randrange(2**31)
    print(f"torch seed: {value}")
    torch.manual_seed(value)
    yield value


@pytest.fixture(scope="session")
def resnet18_shapes() -> list[torch.Size]:
    """ResNet-18 (CIFAR stem) parameter shapes with channels divided by 8: all 62 tensors, with
    their odd sizes (3-channel stem, 10-way head), small enough for the interpreter."""
    return resnet18_cifar_shapes(divide=8)


@pytest.fixture(scope="session")
def resnet18_full_shapes() -> list[torch.Size]:
    """The 62 parameter shapes of ResNet-18 with a CIFAR stem at full width (11.2M elements)."""
    return resnet18_cifar_shapes(divide=1)


def resnet18_cifar_shapes(divide: int = 1) -> list[torch.Size]:
    """Parameter shapes of torchvision's resnet18 with a CIFAR stem (3x3 stride-1 conv1, no max
    pool) and 10 classes, channel counts divided by `divide` (the image channels stay 3)."""
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = torch.nn.Identity()  # type: ignore[assignment]
    shapes = []
    for name, p in model.named_parameters():
        dims = list(p.shape)
        if name != "fc.bias":
            dims[0] = max(1, dims[0] // divide) if name != "fc.weight" else dims[0]
        if len(dims) > 1 and name != "conv1.weight":
            dims[1] = max(1, dims[1] // divide)
        shapes.append(torch.Size(dims))
    return shapes
