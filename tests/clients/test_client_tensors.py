"""The upload helpers: torch state_dicts, Flower's arrays and parameters, deltas, ground truth."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors.numpy import load

from gradleak_client import tensors
from gradleak_client.flower import ndarrays_from_parameters


def test_a_state_dict_of_any_torch_tensors() -> None:
    w = torch.randn(3, 4, requires_grad=True)
    state = {"w": w, "wt": w.detach().t(), "half": torch.ones(2, dtype=torch.bfloat16), "n": torch.tensor(7)}
    out = load(tensors.from_state_dict(state))
    assert sorted(out) == ["half", "n", "w", "wt"]
    np.testing.assert_array_equal(out["wt"], w.detach().numpy().T)
    assert out["half"].dtype == np.float32 and out["n"].dtype == np.int64


def test_arrays_in_state_dict_order_get_their_names() -> None:
    arrays = [np.zeros((2, 2), np.float32), np.arange(3, dtype=np.float32)]
    out = load(tensors.from_arrays(arrays, ["a.weight", "a.bias"]))
    np.testing.assert_array_equal(out["a.bias"], arrays[1])
    with pytest.raises(tensors.TensorInputError, match="2 arrays but 1 names"):
        tensors.from_arrays(arrays, ["a.weight"])


def test_delta_of_two_states() -> None:
    before = {"w": np.ones(3, np.float32), "steps": np.array(4)}
    after = {"w": np.array([1.5, 1.0, 0.0], np.float32), "steps": np.array(6)}
    out = load(tensors.delta_from_states(before, after))
    np.testing.assert_array_equal(out["w"], [0.5, 0.0, -1.0])
    assert out["steps"] == 2
    names = ["w", "steps"]
    assert load(tensors.delta_from_arrays(list(before.values()), list(after.values()), names))["w"][0] == 0.5
    with pytest.raises(tensors.TensorInputError, match="names differ: x"):
        tensors.delta(before, {**after, "x": np.ones(1)})
    with pytest.raises(tensors.TensorInputError, match=r"w: shape \[3\] before but \[2\] after"):
        tensors.delta(before, {**after, "w": np.ones(2, np.float32)})


def test_ground_truth() -> None:
    images, labels = torch.rand(2, 3, 8, 8), torch.tensor([1, 4])
    out = load(tensors.ground_truth(images, labels))
    assert out["images"].shape == (2, 3, 8, 8) and out["labels"].tolist() == [1, 4]
    with pytest.raises(tensors.TensorInputError, match="3 labels for 2 images"):
        tensors.ground_truth(images, [1, 2, 3])
    with pytest.raises(tensors.TensorInputError, match="N x C x H x W"):
        tensors.ground_truth(images[0])


@dataclass
class Parameters:
    """Flower's `flwr.common.Parameters`: arrays serialised with np.save."""

    tensors: list[bytes]
    tensor_type: str


def flower_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def test_flower_parameters_are_decoded_without_pickle() -> None:
    arrays: list[np.ndarray] = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], np.int64)]
    decoded = ndarrays_from_parameters(Parameters([flower_bytes(a) for a in arrays], "numpy.ndarray"))
    for got, want in zip(decoded, arrays, strict=True):
        np.testing.assert_array_equal(got, want)
    pickled = Parameters(
        [flower_bytes(np.array([{"a": 1}], dtype=object), allow_pickle=True)], "numpy.ndarray"
    )
    with pytest.raises(ValueError, match="pickle"):
        ndarrays_from_parameters(pickled)
    with pytest.raises(tensors.TensorInputError, match=r"torch\.Tensor"):
        ndarrays_from_parameters(Parameters([], "torch.Tensor"))
