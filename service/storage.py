"""Where uploads, reconstructions and reports live: a local directory or S3/MinIO.

Keys are POSIX-style paths such as ``tenant/kind/id/name``; both stores implement the same
protocol and pass the same tests.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol, runtime_checkable

from service.errors import NotFoundError


def check_key(key: str) -> str:
    """Refuse keys that could escape the store's root."""
    p = PurePosixPath(key)
    if not key or p.is_absolute() or any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"invalid storage key {key!r}")
    return key


COPY_CHUNK_BYTES = 1 << 20


def _copy(src: BinaryIO, dst: BinaryIO, size: int) -> int:
    copied = 0
    while copied < size and (chunk := src.read(min(COPY_CHUNK_BYTES, size - copied))):
        dst.write(chunk)
        copied += len(chunk)
    return copied


@runtime_checkable
class ArtifactStore(Protocol):
    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    def put_file(
        self, key: str, f: BinaryIO, size: int, content_type: str = "application/octet-stream"
    ) -> None:
        """Store `size` bytes read from `f` (from its start), streamed: never all in memory."""
        ...

    def get_bytes(self, key: str) -> bytes: ...

    def iter_bytes(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]: ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def list_modified(self, prefix: str) -> list[tuple[str, float]]:
        """The keys under `prefix` with their last-modified time (epoch seconds)."""
        ...

    def list(self, prefix: str) -> list[str]: ...

    def delete_prefix(self, prefix: str) -> int: ...

    def presigned_url(self, key: str, expires: timedelta) -> str | None:
        """A short-lived download URL, or None when the store cannot make one (local)."""
        ...

    def ping(self) -> None:
        """Raise if the store is unreachable."""
        ...


class LocalStore:
    """Artifacts in a local directory; writes are atomic (temporary file, then rename)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(
        self, key: str, f: BinaryIO, size: int, content_type: str = "application/octet-stream"
    ) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            f.seek(0)
            with os.fdopen(fd, "wb") as out:
                copied = _copy(f, out, size)
            if copied != size:
                raise OSError(f"stored {copied} of {size} bytes for {key!r}: the source ended early")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"no artifact {key!r}") from None

    def iter_bytes(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        try:
            f = self.path(key).open("rb")
        except FileNotFoundError:
            raise NotFoundError(f"no artifact {key!r}") from None
        with f:
            while chunk := f.read(chunk_size):
                yield chunk

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"no artifact {key!r}") from None

    def list_modified(self, prefix: str) -> list[tuple[str, float]]:
        out = []
        for key in self.list(prefix):
            try:
                out.append((key, self.path(key).stat().st_mtime))
            except FileNotFoundError:  # deleted meanwhile
                continue
        return out

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        )

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(check_key(prefix.rstrip("/")))
        for k in keys:
            self.path(k).unlink(missing_ok=True)
        return len(keys)

    def presigned_url(self, key: str, expires: timedelta) -> str | None:
        return None

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise OSError(f"artifact directory {self.root} is not writable")
