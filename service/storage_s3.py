"""Artifacts on S3 or MinIO through the minio SDK, and the factory that picks the configured store.

The store talks to the server lazily: building one never blocks on the network, so the API and
the workers start (and report "not ready" through `ping`) while MinIO is still coming up.
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import BinaryIO
from urllib.parse import urlsplit

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import MinioException, S3Error
from minio.helpers import check_bucket_name

from service.errors import NotFoundError
from service.settings import Settings
from service.storage import ArtifactStore, LocalStore, check_key

# Uploads go to S3 in parts of this size: the most of an upload held in memory at once.
PART_BYTES = 8 * 2**20
# Presigned links hand private data (uploads, reconstructions) to whoever holds them.
MAX_PRESIGN = timedelta(hours=1)

_MISSING_KEY_CODES = frozenset({"NoSuchKey", "NoSuchObject", "ResourceNotFound"})


def parse_endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """Split ``host:port`` or ``http(s)://host:port`` into what minio wants; a scheme decides TLS."""
    if "://" not in endpoint:
        host, use_tls = endpoint, secure
    else:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"S3 endpoint {endpoint!r}: scheme must be http or https")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"S3 endpoint {endpoint!r} must not contain a path or query")
        host, use_tls = parts.netloc, parts.scheme == "https"
    if not host or "/" in host or "@" in host:
        raise ValueError(f"S3 endpoint {endpoint!r} must be host[:port] or http(s)://host[:port]")
    return host, use_tls


class S3Store:
    """Artifacts in one S3/MinIO bucket, created on first use if it does not exist."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        region: str | None = None,
        secure: bool = True,
    ) -> None:
        host, use_tls = parse_endpoint(endpoint, secure)
        try:
            check_bucket_name(bucket)
        except ValueError:
            raise ValueError(f"invalid S3 bucket name {bucket!r}") from None
        self.endpoint = f"{'https' if use_tls else 'http'}://{host}"
        self.bucket = bucket
        # minio's default client waits 5 minutes and retries 5 times; a store behind a readiness
        # probe must fail within seconds when the server is down.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=120.0),
            maxsize=16,
            retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        self.client = Minio(
            host,
            access_key=access_key,
            secret_key=secret_key,
            secure=use_tls,
            region=region,
            http_client=http,
        )
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Store(endpoint={self.endpoint!r}, bucket={self.bucket!r})"

    @contextmanager
    def _errors(self, what: str, key: str | None = None) -> Iterator[None]:
        """Turn minio and transport errors into NotFoundError or an OSError naming the endpoint.

        Messages hold the endpoint, bucket, key, the server's error code and message or the
        transport error. None can contain the secret key: requests are signed with it, never
        carry it, so the server cannot echo it back.
        """
        try:
            yield
        except S3Error as e:
            if key is not None and e.code in _MISSING_KEY_CODES:
                raise NotFoundError(f"no artifact {key!r}") from None
            raise OSError(
                f"S3 {what} failed on {self.endpoint}/{self.bucket}: {e.code}: {e.message}"
            ) from None
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise OSError(f"S3 endpoint {self.endpoint} unreachable during {what}: {reason}") from None

    def _create_bucket(self) -> None:
        try:
            self.client.make_bucket(self.bucket)
        except S3Error as e:
            # Another API replica or worker created it between our check and our request.
            if e.code != "BucketAlreadyOwnedByYou":
                raise

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        with self._bucket_lock, self._errors("bucket check"):
            if not self._bucket_ready:
                if not self.client.bucket_exists(self.bucket):
                    self._create_bucket()
                self._bucket_ready = True

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        check_key(key)
        self._ensure_bucket()
        with self._errors("upload", key):
            self.client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)

    def put_file(
        self, key: str, f: BinaryIO, size: int, content_type: str = "application/octet-stream"
    ) -> None:
        check_key(key)
        self._ensure_bucket()
        f.seek(0)
        with self._errors("upload", key):
            # minio reads the stream a part at a time (multipart above PART_BYTES), one part in flight
            self.client.put_object(
                self.bucket,
                key,
                f,
                size,
                content_type=content_type,
                part_size=PART_BYTES,
                num_parallel_uploads=1,
            )

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.iter_bytes(key))

    def iter_bytes(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        check_key(key)
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        return self._stream(key, chunk_size)

    def _stream(self, key: str, chunk_size: int) -> Iterator[bytes]:
        self._ensure_bucket()
        with self._errors("download", key):
            response = self.client.get_object(self.bucket, key)
        try:
            with self._errors("download", key):
                yield from response.stream(chunk_size)
        finally:
            response.close()
            response.release_conn()

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except NotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        check_key(key)
        self._ensure_bucket()
        with self._errors("stat", key):
            stat = self.client.stat_object(self.bucket, key)
        if stat.size is None:
            raise OSError(f"S3 stat of {key!r} on {self.endpoint}/{self.bucket} returned no size")
        return stat.size

    def list_modified(self, prefix: str) -> list[tuple[str, float]]:
        # A prefix names a folder, as in LocalStore: "a/b" covers "a/b/c" but not "a/bc".
        folder = check_key(prefix.rstrip("/")) + "/" if prefix else None
        self._ensure_bucket()
        with self._errors("list"):
            return sorted(
                (obj.object_name, obj.last_modified.timestamp() if obj.last_modified else 0.0)
                for obj in self.client.list_objects(self.bucket, prefix=folder, recursive=True)
                if obj.object_name is not None and not obj.is_dir
            )

    def list(self, prefix: str) -> list[str]:
        return [key for key, _ in self.list_modified(prefix)]

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(check_key(prefix.rstrip("/")))
        if not keys:
            return 0
        with self._errors("delete"):
            # remove_objects is lazy: nothing is deleted until its error iterator is consumed.
            failures = list(self.client.remove_objects(self.bucket, (DeleteObject(k) for k in keys)))
        if failures:
            first = failures[0]
            raise OSError(
                f"S3 delete failed for {len(failures)} of {len(keys)} objects under {prefix!r} "
                f"on {self.endpoint}/{self.bucket}; first: {first.name}: {first.code}"
            )
        return len(keys)

    def presigned_url(self, key: str, expires: timedelta) -> str | None:
        check_key(key)
        if expires <= timedelta(0):
            raise ValueError(f"presigned URL expiry must be positive, got {expires}")
        minutes = min(math.ceil(expires / timedelta(minutes=1)), int(MAX_PRESIGN / timedelta(minutes=1)))
        self._ensure_bucket()
        with self._errors("presign", key):
            return self.client.presigned_get_object(self.bucket, key, expires=timedelta(minutes=minutes))

    def ping(self) -> None:
        # A live check every time (unlike _ensure_bucket): this backs the readiness probe.
        with self._errors("ping"):
            if not self.client.bucket_exists(self.bucket):
                self._create_bucket()
        self._bucket_ready = True


def make_store(settings: Settings) -> ArtifactStore:
    """The configured artifact store: S3/MinIO when GRADLEAK_S3_ENDPOINT is set, else a local folder."""
    if not settings.s3_endpoint:
        return LocalStore(settings.data_dir / "artifacts")
    if settings.s3_access_key is None or settings.s3_secret_key is None:
        raise ValueError(
            "GRADLEAK_S3_ENDPOINT is set but GRADLEAK_S3_ACCESS_KEY and GRADLEAK_S3_SECRET_KEY "
            "are not both set"
        )
    return S3Store(
        settings.s3_endpoint,
        access_key=settings.s3_access_key.get_secret_value(),
        secret_key=settings.s3_secret_key.get_secret_value(),
        bucket=settings.s3_bucket,
        region=settings.s3_region,
        secure=settings.s3_secure,
    )
