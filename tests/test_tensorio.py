"""service.tensorio: safetensors only, checked before allocation, foreign formats refused unread."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from service.errors import ArtifactError, ShapeMismatchError, UnsupportedFormatError
from service.tensorio import (
    load_safetensors,
    load_safetensors_file,
    match_state,
    save_safetensors,
    save_safetensors_file,
)


def raw_file(header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> bytes:
    """A safetensors file written by hand, so that headers can be made wrong on purpose."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(text) if header_len is None else header_len
    return struct.pack("<Q", n) + text + data


def f32_entry(begin: int, end: int, shape: list[int]) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


class FileCreator:
    """Unpickling this creates a file: the proof that nothing was unpickled is its absence."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.path,))


def forbid_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("gradleak tried to unpickle an upload")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------


def test_round_trip_keeps_values_dtypes_and_shapes() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(3, 4, generator=g),
        "half": torch.randn(5, generator=g).half(),
        "brain": torch.randn(2, 2, generator=g).bfloat16(),
        "double": torch.randn(1, 2, 3, generator=g, dtype=torch.float64),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    loaded = load_safetensors(save_safetensors(tensors, metadata={"by": "gradleak"}))
    assert set(loaded) == set(tensors)
    for key, t in tensors.items():
        assert loaded[key].dtype == t.dtype
        assert loaded[key].shape == t.shape
        assert torch.equal(loaded[key], t)


def test_loaded_tensors_are_writable_copies() -> None:
    data = save_safetensors({"w": torch.ones(4)})
    t = load_safetensors(data)["w"]
    t.add_(1)
    assert torch.equal(load_safetensors(data)["w"], torch.ones(4))


def test_reads_files_written_by_the_safetensors_library() -> None:
    tensors = {
        "x": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "y": torch.ones(1, dtype=torch.float16),
    }
    loaded = load_safetensors(safetensors.torch.save(tensors))
    assert torch.equal(loaded["x"], tensors["x"])
    assert torch.equal(loaded["y"], tensors["y"])


def test_save_accepts_views_shared_storage_and_non_contiguous_tensors() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"base": base, "row": base[1], "t": base.t(), "alias": base}
    loaded = load_safetensors(save_safetensors(tensors))
    for key, t in tensors.items():
        assert torch.equal(loaded[key], t)


def test_file_round_trip_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "w.safetensors"
    save_safetensors_file({"w": torch.full((2,), 3.0)}, path)
    assert torch.equal(load_safetensors_file(path)["w"], torch.full((2,), 3.0))
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ArtifactError, match=f"no such file: {missing}"):
        load_safetensors_file(missing)


def test_header_length_that_looks_like_a_pickle_is_still_read() -> None:
    # A 640-byte header starts the file with 0x80 0x02, the bytes of a protocol-2 pickle.
    header = json.dumps({"w": f32_entry(0, 4, [1])}).encode()
    header += b" " * (640 - len(header))
    data = raw_file(header, struct.pack("<f", 1.5))
    assert data[:2] == b"\x80\x02"
    assert load_safetensors(data)["w"].item() == 1.5


# ---------------------------------------------------------------------------------------------
# corrupt files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"\x10\x00\x00", "shorter than the 8-byte header length"),
        (raw_file({"w": f32_entry(0, 4, [1])}, b"\0" * 4, header_len=10_000), "runs past the end"),
        (raw_file(b"{not json at all}"), "not valid JSON"),
        (raw_file(b'{"w": ' + b"[" * 5000 + b"]" * 5000 + b"}"), "not valid JSON"),
        (raw_file(b"[1, 2, 3]"), "not a JSON object"),
        (raw_file(b'{"a": 1, "a": 2}'), "duplicate key"),
        (raw_file({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "exactly dtype, shape and data_offsets"),
        (raw_file({"w": f32_entry(0, 4, [-1])}, b"\0" * 4), "invalid shape"),
        (raw_file({"w": f32_entry(0, 4, [True])}, b"\0" * 4), "invalid shape"),
        (raw_file({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4), "data_offsets"),
        (raw_file({"w": f32_entry(0, 8, [1])}, b"\0" * 8), "needs 4"),
        (
            raw_file({"a": f32_entry(0, 8, [2]), "b": f32_entry(4, 12, [2])}, b"\0" * 12),
            "'a' and 'b' overlap",
        ),
        (raw_file({"a": f32_entry(0, 4, [1]), "b": f32_entry(8, 12, [1])}, b"\0" * 12), "4 unused bytes"),
        (raw_file({"a": f32_entry(0, 4, [1])}, b"\0" * 8), "cover 4 bytes but the data section has 8"),
        (raw_file({"__metadata__": {"k": 1}}), "__metadata__"),
        (raw_file({"": f32_entry(0, 4, [1])}, b"\0" * 4), "empty name"),
    ],
    ids=[
        "empty",
        "shorter-than-length",
        "header-past-end",
        "bad-json",
        "deeply-nested-json",
        "json-array",
        "duplicate-keys",
        "missing-field",
        "negative-dim",
        "bool-dim",
        "one-offset",
        "size-mismatch",
        "overlap",
        "gap",
        "trailing-bytes",
        "bad-metadata",
        "empty-name",
    ],
)
def test_corrupt_files_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ArtifactError, match=message) as info:
        load_safetensors(data)
    assert not isinstance(info.value, UnsupportedFormatError)


def test_truncated_file_is_refused() -> None:
    data = save_safetensors({"w": torch.ones(16)})
    with pytest.raises(ArtifactError, match="data section has 60 bytes"):
        load_safetensors(data[:-4])
    with pytest.raises(ArtifactError, match="runs past the end"):
        load_safetensors(data[:20])


def test_header_over_the_limit_is_refused_before_parsing() -> None:
    data = save_safetensors({"w": torch.ones(1)})
    with pytest.raises(ArtifactError, match="exceeds the limit of 16 bytes"):
        load_safetensors(data, max_header_bytes=16)


def test_dtypes_outside_the_allowed_set_are_refused_with_the_list() -> None:
    data = save_safetensors({"labels": torch.arange(3)})
    with pytest.raises(ArtifactError, match=r"'labels' has dtype I64; allowed here: F16, BF16, F32, F64"):
        load_safetensors(data)
    assert torch.equal(load_safetensors(data, allowed_dtypes=("F32", "I64"))["labels"], torch.arange(3))
    with pytest.raises(ValueError, match="unknown safetensors dtypes"):
        load_safetensors(data, allowed_dtypes=("F32", "Q4"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused_naming_the_tensor(bad: float) -> None:
    data = save_safetensors({"fine": torch.ones(3), "layer.bias": torch.tensor([1.0, bad, 2.0]).half()})
    with pytest.raises(ArtifactError, match=r"tensor 'layer.bias' contains NaN or Inf values \(1 of 3\)"):
        load_safetensors(data)
    assert load_safetensors(data, check_finite=False)["layer.bias"].shape == (3,)


def test_messages_name_the_artifact() -> None:
    with pytest.raises(ArtifactError, match=r"^model.weights: the file is empty"):
        load_safetensors(b"", name="model.weights")
    with pytest.raises(UnsupportedFormatError, match=r"^update: this is a pickle file"):
        load_safetensors(pickle.dumps({"w": 1}), name="update")


# ---------------------------------------------------------------------------------------------
# other formats: recognised, refused, never unpickled
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_raw_pickle_is_refused_and_never_unpickled(
    tmp_path: Path, protocol: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    control, target = tmp_path / "control", tmp_path / "target"
    pickle.loads(pickle.dumps(FileCreator(control), protocol=protocol))
    assert control.exists(), "the payload must create its file when unpickled"

    payload = pickle.dumps({"w": FileCreator(target)}, protocol=protocol)
    forbid_unpickling(monkeypatch)
    with pytest.raises(
        UnsupportedFormatError,
        match=r"this is a pickle file; gradleak reads only safetensors \(see safetensors.torch.save_file\)",
    ):
        load_safetensors(payload)
    assert not target.exists()


@pytest.mark.parametrize("zipfile_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_is_refused_and_never_unpickled(
    tmp_path: Path, zipfile_format: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "target"
    buffer = io.BytesIO()
    state = {**nn.Linear(2, 2).state_dict(), "evil": FileCreator(target)}
    torch.save(state, buffer, _use_new_zipfile_serialization=zipfile_format)
    payload = buffer.getvalue()
    forbid_unpickling(monkeypatch)
    expected = "a torch.save/zip archive" if zipfile_format else "a pickle file"
    with pytest.raises(UnsupportedFormatError, match=f"this is {expected}; gradleak reads only safetensors"):
        load_safetensors(payload)
    assert not target.exists()


def test_plain_state_dict_torch_save_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(UnsupportedFormatError, match=r"torch\.save/zip archive"):
        load_safetensors_file(path)


def _npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, w=np.ones(3, dtype=np.float32))
    return buffer.getvalue()


def _npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ones(3, dtype=np.float32))
    return buffer.getvalue()


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("weights.bin", b"\0" * 16)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (_npy(), "a numpy .npy file"),
        (_npz(), "a numpy .npz archive"),
        (_zip(), "a torch.save/zip archive"),
        (b"\x89HDF\r\n\x1a\n" + b"\0" * 64, "an HDF5 file"),
        (b"\x08\x07\x12\x07pytorch\x1a\x032.4:\x00", "an ONNX model"),
        (gzip.compress(b"anything"), "a gzip-compressed file"),
    ],
    ids=["npy", "npz", "zip", "hdf5", "onnx", "gzip"],
)
def test_other_formats_are_named(data: bytes, what: str) -> None:
    with pytest.raises(UnsupportedFormatError, match=f"^this is {what}.*; .*gradleak reads only safetensors"):
        load_safetensors(data)


# ---------------------------------------------------------------------------------------------
# match_state
# ---------------------------------------------------------------------------------------------


def small_bn_model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


PARAMS = ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
FLOAT_BUFFERS = ["1.running_mean", "1.running_var"]


def test_weights_need_every_float_entry_and_may_carry_num_batches_tracked() -> None:
    model = small_bn_model()
    state = model.state_dict()
    floats = {k: v for k, v in state.items() if k != "1.num_batches_tracked"}
    reversed_floats = dict(reversed(list(floats.items())))
    matched = match_state(model, reversed_floats, what="weights")
    assert list(matched) == [k for k in state if k in floats]
    assert list(match_state(model, state, what="weights")) == list(state)

    without_stats = {k: v for k, v in floats.items() if k not in FLOAT_BUFFERS}
    with pytest.raises(ShapeMismatchError) as info:
        match_state(model, without_stats, what="weights")
    assert info.value.mismatches == ["missing: 1.running_mean", "missing: 1.running_var"]


def test_gradient_is_exactly_the_trainable_parameters() -> None:
    model = small_bn_model()
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    assert list(match_state(model, grads, what="gradient")) == PARAMS

    with pytest.raises(ShapeMismatchError) as info:
        match_state(model, {**grads, "1.running_mean": torch.zeros(4)}, what="gradient")
    assert info.value.mismatches == ["unexpected: 1.running_mean"]

    model[0].bias.requires_grad_(False)
    with pytest.raises(ShapeMismatchError, match=r"unexpected: 0.bias"):
        match_state(model, grads, what="gradient")


def test_delta_needs_parameters_and_accepts_buffers() -> None:
    model = small_bn_model()
    params = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    assert list(match_state(model, params, what="delta")) == PARAMS
    full = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    assert list(match_state(model, full, what="delta")) == list(model.state_dict())
    with pytest.raises(ShapeMismatchError, match=r"missing: 3\.weight"):
        match_state(model, {k: v for k, v in params.items() if k != "3.weight"}, what="delta")


def test_mismatch_lines_name_missing_unexpected_shapes_and_dtypes() -> None:
    model = small_bn_model()
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    grads["3.weight"] = torch.zeros(2, 8)
    grads["0.bias"] = torch.zeros(4, dtype=torch.int64)
    del grads["1.weight"]
    grads["foo"] = torch.zeros(1)
    with pytest.raises(ShapeMismatchError) as info:
        match_state(model, grads, what="gradient")
    assert info.value.mismatches == [
        "dtype of 0.bias: expected floating point, got int64",
        "missing: 1.weight",
        "shape of 3.weight: expected [2, 4], got [2, 8]",
        "unexpected: foo",
    ]
    assert str(info.value) == (
        "the gradient tensors do not match the model (Sequential): " + "; ".join(info.value.mismatches)
    )


def test_many_mismatches_list_the_first_ten() -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(8)])
    with pytest.raises(ShapeMismatchError, match=r"\(first 10 of 17\)") as info:
        match_state(model, {"extra": torch.zeros(1)}, what="gradient")
    assert info.value.mismatches == [f"missing: {n}" for n, _ in model.named_parameters()][:10]


@pytest.mark.parametrize(
    ("shape", "accepted"),
    [
        ([1] * 64, True),
        ([1] * 65, False),
        ([2**60, 0], True),  # 2**62 bytes of extent: torch's size arithmetic still fits an int64
        ([2**61, 0], False),  # 2**63 bytes: it would not
        ([2**70, 0], False),
        ([2**40, 2**40, 0], False),
    ],
)
def test_every_accepted_shape_can_be_allocated(shape: list[int], accepted: bool) -> None:
    size = 4 * int(np.prod(shape, dtype=object))
    data = raw_file({"w": f32_entry(0, size, shape)}, bytes(size))
    if accepted:
        assert list(load_safetensors(data)["w"].shape) == shape
    else:
        with pytest.raises(ArtifactError, match=r"dimensions|too large to allocate"):
            load_safetensors(data)
