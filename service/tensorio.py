"""Safe tensor I/O: the only way gradleak reads weights and updates.

Uploads are untrusted, so they are read as safetensors only, and the header is parsed and checked
here before a single tensor is allocated: a hostile header cannot make gradleak allocate more
than the file holds, and nothing is ever unpickled. Files in other formats (pickle, torch.save
archives, numpy, HDF5, ONNX) are recognised and refused with a message that says what to send.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Literal, cast

import safetensors.torch
import torch
from torch import nn

from service.errors import ArtifactError, ShapeMismatchError, UnsupportedFormatError

DEFAULT_MAX_HEADER_BYTES = 16 * 2**20
# torch's own limits: a tensor has at most 64 dimensions, and its size arithmetic (the running
# product of the dimensions, times the element size) must fit in an int64 even when a zero
# dimension makes the tensor empty.
MAX_DIMS = 64
MAX_EXTENT_BYTES = 2**63 - 1
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# A full state dict: floats plus the int64 num_batches_tracked of batch-norm layers.
STATE_DTYPES = (*FLOAT_DTYPES, "I64")

# The safetensors dtype names gradleak can turn into torch tensors.
_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
_SAVE_HINT = "gradleak reads only safetensors (see safetensors.torch.save_file)"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# Protobuf tags (field number << 3 | wire type) of the fields an ONNX ModelProto starts with
# after ir_version: producer_name, producer_version, domain, model_version, doc_string, graph,
# opset_import.
_ONNX_SECOND_TAGS = frozenset({0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42})

UpdateKind = Literal["weights", "gradient", "delta"]


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def load_safetensors(
    data: bytes,
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    allowed_dtypes: Collection[str] = FLOAT_DTYPES,
    check_finite: bool = True,
    name: str | None = None,
) -> dict[str, torch.Tensor]:
    """Parse untrusted safetensors bytes into tensors of their stored dtype, in header order.

    Raises UnsupportedFormatError for files in another format and ArtifactError for corrupt
    files, dtypes outside `allowed_dtypes` and (with `check_finite`) NaN or Inf values. `name`
    (e.g. "model.weights") prefixes every message so that the user knows which file is meant.
    """
    unknown = sorted(set(allowed_dtypes) - set(_DTYPES))
    if unknown:
        raise ValueError(f"unknown safetensors dtypes {unknown}; known: {', '.join(_DTYPES)}")
    prefix = f"{name}: " if name else ""
    try:
        header_len, entries = _parse_header(data, max_header_bytes, allowed_dtypes)
    except ArtifactError as e:
        raise type(e)(prefix + str(e)) from None

    start = 8 + header_len
    tensors: dict[str, torch.Tensor] = {}
    for key, (dtype, shape, begin, end) in entries.items():
        if begin == end:
            tensor = torch.empty(shape, dtype=dtype)
        else:
            # bytearray: a writable private copy, so the tensor owns its memory.
            buffer = bytearray(data[start + begin : start + end])
            tensor = torch.frombuffer(buffer, dtype=dtype).reshape(shape)
        if check_finite and tensor.is_floating_point():
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                bad = int(finite.numel() - finite.sum())
                raise ArtifactError(
                    f"{prefix}tensor {_brief(key)} contains NaN or Inf values ({bad} of {tensor.numel()})"
                )
        tensors[key] = tensor
    return tensors


def load_safetensors_file(
    path: str | Path,
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    allowed_dtypes: Collection[str] = FLOAT_DTYPES,
    check_finite: bool = True,
) -> dict[str, torch.Tensor]:
    """`load_safetensors` on a local file; messages name the file."""
    return load_safetensors(
        read_local(path),
        max_header_bytes=max_header_bytes,
        allowed_dtypes=allowed_dtypes,
        check_finite=check_finite,
        name=str(path),
    )


def read_local(path: str | Path) -> bytes:
    """A local file's bytes; a missing or unreadable file is an ArtifactError that names it."""
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"no such file: {p}") from None
    except OSError as e:
        raise ArtifactError(f"cannot read {p}: {e.strerror or e}") from None


SCAN_CHUNK_BYTES = 4 * 2**20


class _FileView:
    """A seekable file seen as the bytes `_parse_header` reads (length, indexing, slicing), so
    that a header is checked by the same code whether the file is in memory or on disk."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f, self.size = f, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, int):
            return self[index : index + 1][0]
        start, stop, _ = index.indices(self.size)
        self.f.seek(start)
        return self.f.read(max(0, stop - start))


def scan_safetensors(
    f: BinaryIO,
    size: int,
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    allowed_dtypes: Collection[str] = FLOAT_DTYPES,
    check_finite: bool = True,
    name: str | None = None,
    visit: Callable[[str, torch.Tensor], None] | None = None,
) -> tuple[dict[str, torch.Tensor], str]:
    """`load_safetensors`'s checks on a seekable file of `size` bytes, in one streamed pass that
    holds at most SCAN_CHUNK_BYTES of it in memory: the header as load_safetensors checks it,
    then every tensor's values (NaN and Inf with `check_finite`), chunk by chunk; `visit(name,
    chunk)` sees each chunk (e.g. to check a value range). Returns the tensors as meta tensors
    (name, shape and dtype; no data), in header order, and the file's sha256."""
    prefix = f"{name}: " if name else ""
    try:
        # the view answers every read _parse_header makes of its bytes
        view = cast(bytes, _FileView(f, size))
        header_len, entries = _parse_header(view, max_header_bytes, allowed_dtypes)
    except ArtifactError as e:
        raise type(e)(prefix + str(e)) from None
    digest = hashlib.sha256()
    f.seek(0)
    digest.update(f.read(8 + header_len))
    # _parse_header has checked that the tensors tile the data section in offset order.
    for key, (dtype, _shape, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2]):
        step = max(dtype.itemsize, SCAN_CHUNK_BYTES - SCAN_CHUNK_BYTES % dtype.itemsize)
        for offset in range(begin, end, step):
            chunk = f.read(min(step, end - offset))
            digest.update(chunk)
            values = torch.frombuffer(bytearray(chunk), dtype=dtype)
            if check_finite and values.is_floating_point() and not bool(torch.isfinite(values).all()):
                raise ArtifactError(f"{prefix}tensor {key!r} contains NaN or Inf values")
            if visit is not None:
                visit(key, values)
    tensors = {
        k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape, _, _) in entries.items()
    }
    return tensors, digest.hexdigest()


def safetensors_metadata(
    data: bytes | BinaryIO,
    size: int | None = None,
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    name: str | None = None,
) -> dict[str, str]:
    """The `__metadata__` of untrusted safetensors bytes (or of a seekable file of `size`
    bytes), after the same header checks as `load_safetensors` (any tensor dtype); {} when the
    file has none. Reads the header only."""
    prefix = f"{name}: " if name else ""
    if isinstance(data, bytes | bytearray | memoryview):
        view = bytes(data)
    else:
        if size is None:
            raise ValueError("give the size of the file")
        view = cast(bytes, _FileView(data, size))
    try:
        header_len, _ = _parse_header(view, max_header_bytes, tuple(_DTYPES))
    except ArtifactError as e:
        raise type(e)(prefix + str(e)) from None
    header = json.loads(bytes(view[8 : 8 + header_len]).decode("utf-8"))
    return dict(header.get("__metadata__", {}))


def _parse_header(
    data: bytes, max_header_bytes: int, allowed_dtypes: Collection[str]
) -> tuple[int, dict[str, tuple[torch.dtype, list[int], int, int]]]:
    """Check the header and the layout of the data section; return the header length and, per
    tensor, (dtype, shape, begin, end) with offsets relative to the data section."""
    size = len(data)
    if size == 0:
        raise ArtifactError("the file is empty; expected a safetensors file")
    header_len = int.from_bytes(data[:8], "little") if size >= 8 else 0
    plausible = size >= 8 and 2 <= header_len <= size - 8 and data[8] == ord("{")
    if not plausible:
        # Only now look for other formats: a valid safetensors file may start with any bytes.
        foreign = _sniff_foreign(data)
        if foreign is not None:
            what, hint = foreign
            raise UnsupportedFormatError(f"this is {what}; {hint}")
    if size < 8:
        raise ArtifactError(
            f"not a safetensors file: {size} bytes, shorter than the 8-byte header length it starts with"
        )
    if header_len > max_header_bytes:
        raise ArtifactError(
            f"not a valid safetensors file: header length {header_len} bytes exceeds the limit of "
            f"{max_header_bytes} bytes"
        )
    if header_len > size - 8:
        raise ArtifactError(
            f"not a valid safetensors file: header length {header_len} bytes runs past the end of the "
            f"file ({size} bytes); truncated?"
        )
    if not plausible:
        raise ArtifactError("not a valid safetensors file: the header is not a JSON object")

    try:
        header = json.loads(bytes(data[8 : 8 + header_len]).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArtifactError(f"not a valid safetensors file: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ArtifactError("not a valid safetensors file: the header is not a JSON object")

    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ArtifactError("not a valid safetensors file: __metadata__ must map strings to strings")

    entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
    for key, info in header.items():
        entries[key] = _check_entry(key, info, allowed_dtypes)

    data_len = size - 8 - header_len
    end_so_far, previous = 0, None
    for key, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < end_so_far:
            raise ArtifactError(
                f"not a valid safetensors file: tensors {_brief(previous)} and {_brief(key)} overlap in the "
                "data section"
            )
        if begin > end_so_far:
            raise ArtifactError(
                f"not a valid safetensors file: {begin - end_so_far} unused bytes before tensor {_brief(key)}"
            )
        end_so_far, previous = end, key
    if end_so_far != data_len:
        raise ArtifactError(
            f"not a valid safetensors file: the tensors cover {end_so_far} bytes but the data section "
            f"has {data_len} bytes"
        )
    return header_len, entries


def _check_entry(
    key: str, info: Any, allowed_dtypes: Collection[str]
) -> tuple[torch.dtype, list[int], int, int]:
    bad = f"not a valid safetensors file: tensor {_brief(key)}"
    if not key:
        raise ArtifactError("not a valid safetensors file: a tensor has an empty name")
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ArtifactError(f"{bad} must have exactly dtype, shape and data_offsets")
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype_name, str):
        raise ArtifactError(f"{bad} has a dtype that is not a string")
    if dtype_name not in allowed_dtypes:
        raise ArtifactError(
            f"tensor {_brief(key)} has dtype {_cut(dtype_name)}; allowed here: {', '.join(allowed_dtypes)}"
        )
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise ArtifactError(f"{bad} has an invalid shape {_brief(shape)}")
    if len(shape) > MAX_DIMS:
        raise ArtifactError(f"{bad} has {len(shape)} dimensions; at most {MAX_DIMS} are supported")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
        raise ArtifactError(f"{bad} has invalid data_offsets {_brief(offsets)}")
    begin, end = offsets
    dtype = _DTYPES[dtype_name]
    if math.prod(max(d, 1) for d in shape) * dtype.itemsize > MAX_EXTENT_BYTES:
        raise ArtifactError(f"{bad} has a shape too large to allocate: {_brief(shape)}")
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise ArtifactError(
            f"{bad}: data_offsets {offsets} span {end - begin} bytes, but a {dtype_name} tensor of "
            f"shape {shape} needs {expected}"
        )
    return dtype, shape, begin, end


def _brief(value: Any) -> str:
    """A value's repr cut short: a hostile header's names and lists can be megabytes long."""
    return _cut(repr(value))


def _cut(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {_brief(key)}")
        out[key] = value
    return out


def _sniff_foreign(data: bytes) -> tuple[str, str] | None:
    """Recognise the formats people send instead of safetensors: (what it is, what to do)."""
    head = bytes(data[:16])
    # Pickle protocol 2-5 starts with PROTO n; byte 0 is never a valid opcode, which tells a
    # pickle from a safetensors header length that happens to start with the same two bytes.
    if len(head) >= 3 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[2] != 0:
        return "a pickle file", _SAVE_HINT
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        if _zip_starts_with_npy(data):
            return "a numpy .npz archive", "gradleak reads only safetensors (see safetensors.numpy.save_file)"
        return "a torch.save/zip archive", _SAVE_HINT
    if head.startswith(b"\x93NUMPY"):
        return "a numpy .npy file", "gradleak reads only safetensors (see safetensors.numpy.save_file)"
    if head.startswith(_HDF5_MAGIC):
        return "an HDF5 file (Keras .h5 weights?)", _SAVE_HINT
    if len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 0x7F and head[2] in _ONNX_SECOND_TAGS:
        return "an ONNX model", _SAVE_HINT
    if head.startswith(b"\x1f\x8b"):
        return "a gzip-compressed file", "decompress it first; " + _SAVE_HINT
    return None


def _zip_starts_with_npy(data: bytes) -> bool:
    """Whether the first entry of a zip archive is a .npy file, as in everything numpy.savez writes."""
    # Local file header: 30 fixed bytes, the name length at offset 26, then the name.
    if len(data) < 30:
        return False
    name_len = int.from_bytes(data[26:28], "little")
    return bytes(data[30 : 30 + name_len]).endswith(b".npy")


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def save_safetensors(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise tensors (any device, views and shared storage allowed) to safetensors bytes."""
    return safetensors.torch.save(_prepare(tensors), metadata=metadata)


def save_safetensors_file(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write `save_safetensors(tensors, metadata)` to `path`, creating parent directories."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(save_safetensors(tensors, metadata))


def _prepare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory (tied weights, views); give those their own.
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        t = value.detach().cpu().contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.nbytes:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


# ---------------------------------------------------------------------------------------------
# matching tensors to a model
# ---------------------------------------------------------------------------------------------

_MAX_LISTED = 10


def match_state(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], *, what: UpdateKind
) -> dict[str, torch.Tensor]:
    """Check names, shapes and dtype kinds of `tensors` against `model`; return them in the
    model's order (dtypes unchanged: callers cast).

    weights: every floating-point entry of the state dict (parameters and float buffers such as
    BN running statistics); integer buffers (num_batches_tracked) may be present or absent.
    gradient: exactly the parameters that require grad.
    delta: the parameters that require grad; every other state-dict entry may be present.
    Raises ShapeMismatchError listing the first mismatches.
    """
    state = model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected: dict[str, tuple[torch.Tensor, bool]] = {}  # name -> (reference, required)
    if what == "gradient":
        params = dict(model.named_parameters())
        expected = {n: (params[n], True) for n in params if n in trainable}
    elif what == "weights":
        expected = {n: (t, t.is_floating_point()) for n, t in state.items()}
    elif what == "delta":
        expected = {n: (t, n in trainable) for n, t in state.items()}
    else:
        raise ValueError(f"unknown update kind {what!r}")

    mismatches: list[str] = []
    for n, (ref, required) in expected.items():
        got = tensors.get(n)
        if got is None:
            if required:
                mismatches.append(f"missing: {n}")
            continue
        if list(got.shape) != list(ref.shape):
            mismatches.append(f"shape of {n}: expected {list(ref.shape)}, got {list(got.shape)}")
        elif got.is_floating_point() != ref.is_floating_point():
            kind = "floating point" if ref.is_floating_point() else "integer"
            mismatches.append(f"dtype of {n}: expected {kind}, got {str(got.dtype).removeprefix('torch.')}")
    mismatches += [f"unexpected: {n}" for n in tensors if n not in expected]
    if mismatches:
        shown = mismatches[:_MAX_LISTED]
        more = f" (first {_MAX_LISTED} of {len(mismatches)})" if len(mismatches) > _MAX_LISTED else ""
        raise ShapeMismatchError(
            f"the {what} tensors do not match the model ({type(model).__name__}){more}: " + "; ".join(shown),
            shown,
        )
    return {n: tensors[n] for n in expected if n in tensors}
