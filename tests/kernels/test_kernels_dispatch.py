"""Backend choice (auto, explicit, overrides) and argument checking of the public ops."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

import kernels
from kernels import gradmatch
from kernels.targets import ALIGN_ELEMENTS


class _Called(Exception):
    """Raised by the spy that replaces the fused op: proves which path a call took."""


@pytest.fixture
def spy_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    def fused(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise _Called

    monkeypatch.setattr(gradmatch, "gradient_matching", fused)


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    kernels.set_backend(None)
    yield
    kernels.set_backend(None)


def _lists() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    targets = [torch.randn(3, 2), torch.randn(5)]
    return [torch.randn(3, 2), torch.randn(5)], targets


def test_triton_imports_here() -> None:
    assert kernels.triton_available()


def test_auto_uses_the_reference_for_cpu_tensors(spy_fused: None) -> None:
    cands, targets = _lists()
    loss = kernels.gradient_matching_loss(cands, targets)  # the spy raises if Triton were called
    want = kernels.gradient_matching_loss(cands, targets, backend="reference")
    # auto computes the reference's statistics in closed form: equal up to summation order
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0.0)
    with pytest.raises(_Called):
        kernels.gradient_matching_loss(cands, targets, backend="triton")


def test_environment_variable_is_read_at_call_time(spy_fused: None, monkeypatch: pytest.MonkeyPatch) -> None:
    cands, targets = _lists()
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    with pytest.raises(_Called):
        kernels.gradient_matching_loss(cands, targets)
    monkeypatch.setenv(kernels.BACKEND_ENV, "reference")
    kernels.gradient_matching_loss(cands, targets)
    with pytest.raises(_Called):  # an explicit backend wins over the override
        kernels.gradient_matching_loss(cands, targets, backend="triton")
    monkeypatch.setenv(kernels.BACKEND_ENV, "fastest")
    with pytest.raises(kernels.KernelInputError, match="GRADLEAK_KERNELS"):
        kernels.gradient_matching_loss(cands, targets)


def test_set_backend_overrides_the_environment(spy_fused: None, monkeypatch: pytest.MonkeyPatch) -> None:
    cands, targets = _lists()
    monkeypatch.setenv(kernels.BACKEND_ENV, "reference")
    kernels.set_backend("triton")
    assert kernels.get_backend() == "triton"
    with pytest.raises(_Called):
        kernels.gradient_matching_loss(cands, targets)
    kernels.set_backend(None)
    assert kernels.get_backend() == "reference"
    kernels.gradient_matching_loss(cands, targets)
    with pytest.raises(kernels.KernelInputError, match="unknown kernel backend"):
        kernels.set_backend("cuda")  # type: ignore[arg-type]


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gradmatch, "INTERPRETED", False)
    cands, targets = _lists()
    with pytest.raises(kernels.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        kernels.gradient_matching_loss(cands, targets, backend="triton")
    with pytest.raises(kernels.BackendUnavailableError):
        kernels.total_variation(torch.randn(1, 1, 4, 4), backend="triton")
    kernels.gradient_matching_loss(cands, targets)  # auto still works, on the reference


def test_mixed_dtypes_are_refused_by_triton_and_accepted_by_auto() -> None:
    cands, targets = _lists()
    cands[1] = cands[1].double()
    with pytest.raises(kernels.KernelInputError, match="one dtype"):
        kernels.gradient_matching_loss(cands, targets, backend="triton")
    assert torch.isfinite(kernels.gradient_matching_loss(cands, targets))


def test_pack_targets_layout(seed: int) -> None:
    targets = [torch.randn(3, 7), torch.randn(1), torch.randn(20), torch.randn(2, 2)]
    packed = kernels.pack_targets(targets, layers=[2, 0, 3])
    assert packed.layers == (2, 0, 3)
    assert packed.num_tensors == 4
    assert all(off % ALIGN_ELEMENTS == 0 for off in packed.offsets)
    for view, index in zip(packed.views(), packed.layers, strict=True):
        assert torch.equal(view, targets[index])
    want = torch.stack([targets[i].double().square().sum() for i in packed.layers]).float()
    torch.testing.assert_close(packed.sq_norms, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cost": "l1"}, "unknown matching cost"),
        ({"eps": 0.0}, "eps must be"),
        ({"eps": float("nan")}, "eps must be"),
        ({"backend": "cuda"}, "unknown kernel backend"),
        ({"layer_weights": [1.0]}, "1 layer weights for 2 layers"),
        ({"layer_weights": [1.0, -1.0]}, "non-negative"),
        ({"layer_weights": [1.0, float("inf")]}, "finite"),
        ({"layer_weights": torch.ones(3)}, r"expected \(2,\)"),
        ({"layer_weights": torch.ones(2, requires_grad=True)}, "constants"),
        ({"layers": [0, 2]}, "out of range"),
        ({"layers": [1, 1]}, "distinct"),
        ({"layers": []}, "at least one"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, Any], message: str) -> None:
    cands, targets = _lists()
    with pytest.raises(kernels.KernelInputError, match=message):
        kernels.gradient_matching_loss(cands, targets, **kwargs)


def test_mismatched_candidates_are_refused() -> None:
    cands, targets = _lists()
    with pytest.raises(kernels.KernelInputError, match="1 candidate gradients but 2 target"):
        kernels.gradient_matching_loss(cands[:1], targets)
    with pytest.raises(kernels.KernelInputError, match=r"shape \(2, 3\), expected \(3, 2\)"):
        kernels.gradient_matching_loss([cands[0].T, cands[1]], targets)
    packed = kernels.pack_targets(targets, layers=[1])
    with pytest.raises(kernels.KernelInputError, match="packed for layers"):
        kernels.gradient_matching_loss(cands, packed, layers=[0])
    with pytest.raises(kernels.KernelInputError, match="1 candidate gradients for 2 target"):
        kernels.gradient_matching_loss(cands[1:], packed)
    batched = [torch.randn(4, 3, 2), torch.randn(3, 5)]
    with pytest.raises(kernels.KernelInputError, match="R=4"):
        kernels.batched_gradient_matching_loss(batched, targets)
    with pytest.raises(kernels.KernelInputError, match="floating"):
        kernels.gradient_matching_loss([cands[0].long(), cands[1]], targets)
    with pytest.raises(kernels.KernelInputError, match=r"torch\.Tensor"):
        kernels.gradient_matching_loss([cands[0], [1.0]], targets)  # type: ignore[list-item]


def test_bad_targets_are_refused() -> None:
    with pytest.raises(kernels.KernelInputError, match="empty"):
        kernels.pack_targets([])
    with pytest.raises(kernels.KernelInputError, match="one floating dtype"):
        kernels.pack_targets([torch.randn(2), torch.randn(2).double()])
    with pytest.raises(kernels.KernelInputError, match="no elements"):
        kernels.pack_targets([torch.randn(0)])


@pytest.mark.parametrize(
    "x", [torch.randn(3, 4, 4), torch.randn(1, 1, 0, 4), torch.ones(1, 1, 2, 2, dtype=torch.long)]
)
def test_total_variation_refuses_bad_images(x: torch.Tensor) -> None:
    with pytest.raises(kernels.KernelInputError, match="total_variation"):
        kernels.total_variation(x)
