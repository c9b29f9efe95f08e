"""Build uploads (safetensors bytes) from what an FL stack has at hand: a torch state_dict, the
list of numpy arrays in state_dict order that Flower passes around, or the model states before
and after local training. Needs the extra `tensors` (numpy, safetensors); torch tensors are
accepted without importing torch here.

    >>> from gradleak_client import tensors
    >>> weights = tensors.from_state_dict(model.state_dict())                 # kind "weights"
    >>> update = tensors.delta_from_states(global_state, model.state_dict())  # kind "delta"
    >>> update = tensors.from_arrays(parameters, names=list(model.state_dict()))  # Flower
    >>> truth = tensors.ground_truth(images, labels)                          # for scoring
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradleak_client._exceptions import GradleakError

try:
    import numpy as np
    from safetensors.numpy import save as _save_numpy
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "gradleak_client.tensors needs numpy and safetensors: pip install numpy safetensors, "
        f"or the client's [tensors] extra ({e})"
    ) from None

ArrayLike = Any  # a numpy array or a torch tensor (any device, with or without grad)
_KEEP_DTYPES = frozenset(
    {"float16", "float32", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"}
)


class TensorInputError(GradleakError, ValueError):
    """Tensors that cannot make an upload: names or shapes that do not line up, unsupported dtypes."""


def to_numpy(value: ArrayLike) -> np.ndarray:
    """A contiguous numpy copy of a numpy array or a torch tensor (bfloat16 becomes float32,
    which numpy and the service both read)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            tensor = tensor.float()
        value = tensor.numpy()
    array = np.ascontiguousarray(np.asarray(value))
    if array.dtype.name not in _KEEP_DTYPES:
        raise TensorInputError(f"unsupported dtype {array.dtype}; use floating point or integer tensors")
    return array


def to_safetensors(tensors: Mapping[str, ArrayLike]) -> bytes:
    """Safetensors bytes of named tensors (the file keeps names, not their order)."""
    if not tensors:
        raise TensorInputError("no tensors to save")
    return bytes(_save_numpy({str(name): to_numpy(t) for name, t in tensors.items()}))


def save(tensors: Mapping[str, ArrayLike], path: str | Path) -> Path:
    """Write named tensors to a safetensors file."""
    target = Path(path)
    target.write_bytes(to_safetensors(tensors))
    return target


def from_state_dict(state_dict: Mapping[str, ArrayLike]) -> bytes:
    """A torch state_dict (or any name -> tensor mapping) as an upload: a model's weights, or an
    update of kind "weights"."""
    return to_safetensors(state_dict)


def name_arrays(arrays: Sequence[ArrayLike], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Pair a list of arrays in state_dict order (Flower's parameters) with the state_dict's
    names, e.g. ``names=list(model.state_dict())``."""
    if len(arrays) != len(names):
        raise TensorInputError(
            f"{len(arrays)} arrays but {len(names)} names: "
            "pass the names of the state_dict the arrays came from"
        )
    return {name: to_numpy(a) for name, a in zip(names, arrays, strict=True)}


def from_arrays(arrays: Sequence[ArrayLike], names: Sequence[str]) -> bytes:
    """Arrays in state_dict order (what Flower passes around) as an upload."""
    return to_safetensors(name_arrays(arrays, names))


def delta(before: Mapping[str, ArrayLike], after: Mapping[str, ArrayLike]) -> dict[str, np.ndarray]:
    """after - before for every entry: the update of kind "delta" a FedAvg client shares."""
    if list(before) != list(after):
        missing = sorted(set(before) ^ set(after))
        detail = f"names differ: {', '.join(missing[:5])}" if missing else "the same names in another order"
        raise TensorInputError(f"the two model states do not line up ({detail})")
    out = {}
    for name in before:
        a, b = to_numpy(before[name]), to_numpy(after[name])
        if a.shape != b.shape:
            raise TensorInputError(f"{name}: shape {list(a.shape)} before but {list(b.shape)} after")
        out[name] = np.ascontiguousarray(b - a)
    return out


def delta_from_states(before: Mapping[str, ArrayLike], after: Mapping[str, ArrayLike]) -> bytes:
    """An upload of kind "delta" from the model states before and after local training."""
    return to_safetensors(delta(before, after))


def delta_from_arrays(before: Sequence[ArrayLike], after: Sequence[ArrayLike], names: Sequence[str]) -> bytes:
    """An upload of kind "delta" from Flower's parameters before and after `fit`."""
    return to_safetensors(delta(name_arrays(before, names), name_arrays(after, names)))


def ground_truth(images: ArrayLike, labels: ArrayLike | None = None) -> bytes:
    """The client's images (N, C, H, W, values in [0, 1]) and labels (N) as a ground-truth upload."""
    x = to_numpy(images).astype(np.float32, copy=False)
    if x.ndim != 4:
        raise TensorInputError(f"images must be N x C x H x W, got shape {list(x.shape)}")
    tensors: dict[str, np.ndarray] = {"images": x}
    if labels is not None:
        y = to_numpy(labels).astype(np.int64, copy=False).reshape(-1)
        if len(y) != len(x):
            raise TensorInputError(f"{len(y)} labels for {len(x)} images")
        tensors["labels"] = y
    return to_safetensors(tensors)
