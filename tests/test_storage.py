"""One suite for both artifact stores: LocalStore on a temporary folder and S3Store on moto's S3 server.

The S3 side goes through the real minio SDK over HTTP, so request signing, streaming and error
codes are exercised, not mocked.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from minio.deleteobjects import DeleteError
from moto.server import ThreadedMotoServer

from service.errors import NotFoundError
from service.settings import Settings
from service.storage import ArtifactStore, LocalStore
from service.storage_s3 import S3Store, make_store, parse_endpoint

ACCESS_KEY = "gradleak-test-access"
SECRET_KEY = "gradleak-test-secret-do-not-leak"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    # get_host_and_port (for port=0) is in moto releases since August 2024, getmoto/moto#7894;
    # constraints.txt pins moto 5.2.5.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def new_bucket() -> str:
    # moto keeps state for the whole session; a bucket per test keeps the tests independent.
    return f"gradleak-test-{uuid.uuid4().hex[:12]}"


def s3_store(endpoint: str, bucket: str | None = None, region: str | None = "us-east-1") -> S3Store:
    return S3Store(endpoint, ACCESS_KEY, SECRET_KEY, bucket or new_bucket(), region=region)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "artifacts")
    return s3_store(request.getfixturevalue("s3_endpoint"))


@pytest.fixture
def closed_port() -> Iterator[int]:
    # Bound but not listening: connections are refused, and no other process can take the port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def expires_param(url: str) -> int:
    return int(parse_qs(urlsplit(url).query)["X-Amz-Expires"][0])


# ---- the shared contract -------------------------------------------------------------------------


def test_satisfies_protocol(store: ArtifactStore) -> None:
    assert isinstance(store, ArtifactStore)


def test_round_trip(store: ArtifactStore) -> None:
    data = bytes(range(256)) * 3
    store.put_bytes("tenant-a/uploads/u1/update.safetensors", data)
    assert store.get_bytes("tenant-a/uploads/u1/update.safetensors") == data
    assert store.exists("tenant-a/uploads/u1/update.safetensors")
    assert store.size("tenant-a/uploads/u1/update.safetensors") == len(data)


def test_large_object_round_trip(store: ArtifactStore) -> None:
    # Above minio's 5 MiB part size, so S3 takes the multipart upload path.
    data = bytes(range(256)) * (24 * 1024 + 7)
    store.put_bytes("t/big.safetensors", data)
    assert store.size("t/big.safetensors") == len(data)
    assert store.get_bytes("t/big.safetensors") == data


def test_empty_object(store: ArtifactStore) -> None:
    store.put_bytes("t/empty", b"")
    assert store.get_bytes("t/empty") == b""
    assert store.size("t/empty") == 0
    assert store.exists("t/empty")


def test_overwrite_replaces_content(store: ArtifactStore) -> None:
    store.put_bytes("t/report.html", b"first version, longer")
    store.put_bytes("t/report.html", b"second")
    assert store.get_bytes("t/report.html") == b"second"
    assert store.size("t/report.html") == len(b"second")
    assert store.list("t") == ["t/report.html"]


def test_missing_key_is_not_found(store: ArtifactStore) -> None:
    store.put_bytes("t/present", b"x")
    assert not store.exists("t/absent")
    with pytest.raises(NotFoundError, match="t/absent"):
        store.get_bytes("t/absent")
    with pytest.raises(NotFoundError):
        store.size("t/absent")
    with pytest.raises(NotFoundError):
        list(store.iter_bytes("t/absent"))


def test_list_modified_gives_each_key_its_time(store: ArtifactStore) -> None:
    before = time.time() - 5  # S3 keeps whole seconds
    store.put_bytes("t/a/x", b"1")
    store.put_bytes("t/b", b"2")
    listed = store.list_modified("t")
    assert [k for k, _ in listed] == ["t/a/x", "t/b"] == store.list("t")
    assert all(before <= modified <= time.time() + 5 for _, modified in listed)


def test_list_and_delete_prefix(store: ArtifactStore) -> None:
    keys = ["t1/jobs/j1/grid.png", "t1/jobs/j1/recon/x.safetensors", "t1/jobs/j10/grid.png", "t2/jobs/j1/a"]
    for k in keys:
        store.put_bytes(k, k.encode())
    assert store.list("") == sorted(keys)
    # A prefix is a folder: "t1/jobs/j1" must not catch "t1/jobs/j10".
    assert store.list("t1/jobs/j1") == ["t1/jobs/j1/grid.png", "t1/jobs/j1/recon/x.safetensors"]
    assert store.list("t1/jobs/j1/") == store.list("t1/jobs/j1")
    assert store.list("t3") == []

    assert store.delete_prefix("t1/jobs/j1") == 2
    assert store.list("") == ["t1/jobs/j10/grid.png", "t2/jobs/j1/a"]
    assert not store.exists("t1/jobs/j1/grid.png")
    assert store.delete_prefix("t1/jobs/j1") == 0
    assert store.get_bytes("t1/jobs/j10/grid.png") == b"t1/jobs/j10/grid.png"


def test_iter_bytes_in_chunks(store: ArtifactStore) -> None:
    data = b"0123456789"
    store.put_bytes("t/blob", data)
    chunks = list(store.iter_bytes("t/blob", chunk_size=4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    assert b"".join(chunks) == data


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/../b", "./a", ""])
def test_invalid_keys_refused(store: ArtifactStore, key: str) -> None:
    with pytest.raises(ValueError, match="invalid storage key"):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError, match="invalid storage key"):
        store.get_bytes(key)
    with pytest.raises(ValueError, match="invalid storage key"):
        list(store.iter_bytes(key))
    with pytest.raises(ValueError, match="invalid storage key"):
        store.exists(key)
    with pytest.raises(ValueError, match="invalid storage key"):
        store.size(key)
    with pytest.raises(ValueError, match="invalid storage key"):
        store.delete_prefix(key)


def test_ping_ok(store: ArtifactStore) -> None:
    store.ping()


# ---- presigned URLs ------------------------------------------------------------------------------


def test_presigned_url_is_none_for_local(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("t/a", b"x")
    assert store.presigned_url("t/a", timedelta(minutes=5)) is None


def test_presigned_url_fetches_object(s3_endpoint: str) -> None:
    store = s3_store(s3_endpoint)
    store.put_bytes("t/recon.png", b"\x89PNG fake image", content_type="image/png")
    url = store.presigned_url("t/recon.png", timedelta(minutes=5))
    assert url is not None
    assert expires_param(url) == 300
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == b"\x89PNG fake image"
    assert SECRET_KEY not in url


@pytest.mark.parametrize(
    ("asked", "granted_s"),
    [
        (timedelta(seconds=1), 60),
        (timedelta(seconds=61), 120),
        (timedelta(minutes=60), 3600),
        (timedelta(hours=5), 3600),
        (timedelta(days=7), 3600),
    ],
)
def test_presigned_expiry_whole_minutes_at_most_one_hour(
    s3_endpoint: str, asked: timedelta, granted_s: int
) -> None:
    store = s3_store(s3_endpoint)
    store.put_bytes("t/a", b"x")
    url = store.presigned_url("t/a", asked)
    assert url is not None
    assert expires_param(url) == granted_s


@pytest.mark.parametrize("asked", [timedelta(0), timedelta(seconds=-5)])
def test_presigned_expiry_must_be_positive(s3_endpoint: str, asked: timedelta) -> None:
    with pytest.raises(ValueError, match="positive"):
        s3_store(s3_endpoint).presigned_url("t/a", asked)


# ---- S3 specifics ----------------------------------------------------------------------------------


def test_content_type_is_stored(s3_endpoint: str) -> None:
    store = s3_store(s3_endpoint)
    store.put_bytes("t/report.html", b"<html></html>", content_type="text/html")
    store.put_bytes("t/blob", b"x")
    assert store.client.stat_object(store.bucket, "t/report.html").content_type == "text/html"
    assert store.client.stat_object(store.bucket, "t/blob").content_type == "application/octet-stream"


def test_bucket_created_on_first_use(s3_endpoint: str) -> None:
    store = s3_store(s3_endpoint)
    assert not store.client.bucket_exists(store.bucket)
    store.put_bytes("t/a", b"x")
    assert store.client.bucket_exists(store.bucket)
    # A second store on the same bucket (another replica) finds it and shares its objects.
    assert s3_store(s3_endpoint, bucket=store.bucket).get_bytes("t/a") == b"x"


def test_ping_creates_missing_bucket(s3_endpoint: str) -> None:
    store = s3_store(s3_endpoint)
    store.ping()
    assert store.client.bucket_exists(store.bucket)


def test_bucket_creation_race_tolerated(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Outside us-east-1 S3 (and moto) answer BucketAlreadyOwnedByYou when a replica loses the race.
    bucket = new_bucket()
    winner = s3_store(s3_endpoint, bucket=bucket, region="eu-west-1")
    loser = s3_store(s3_endpoint, bucket=bucket, region="eu-west-1")
    winner.ping()
    monkeypatch.setattr(loser.client, "bucket_exists", lambda name: False)
    loser.put_bytes("t/a", b"from the loser")
    assert winner.get_bytes("t/a") == b"from the loser"


def test_region_looked_up_when_not_given(s3_endpoint: str) -> None:
    store = s3_store(s3_endpoint, region=None)
    store.put_bytes("t/a", b"x")
    assert store.get_bytes("t/a") == b"x"


def test_iter_bytes_releases_connection_when_abandoned(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = s3_store(s3_endpoint)
    store.put_bytes("t/big", b"z" * 10_000)
    responses: list[Any] = []
    real_get = store.client.get_object

    def recording_get(*args: Any, **kwargs: Any) -> Any:
        responses.append(real_get(*args, **kwargs))
        return responses[-1]

    monkeypatch.setattr(store.client, "get_object", recording_get)
    chunks = store.iter_bytes("t/big", chunk_size=100)
    assert next(chunks) == b"z" * 100
    assert not responses[0].closed
    chunks.close()  # type: ignore[attr-defined]
    assert responses[0].closed


def test_delete_failures_are_reported(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = s3_store(s3_endpoint)
    store.put_bytes("t/a", b"x")
    store.put_bytes("t/b", b"y")
    monkeypatch.setattr(
        store.client,
        "remove_objects",
        lambda bucket, objects: iter([DeleteError("AccessDenied", "no", "t/b", None)]),
    )
    with pytest.raises(OSError, match=r"1 of 2 objects.*t/b: AccessDenied"):
        store.delete_prefix("t")


def test_ping_unreachable_names_endpoint_not_secret(closed_port: int) -> None:
    store = S3Store(f"127.0.0.1:{closed_port}", ACCESS_KEY, SECRET_KEY, new_bucket(), secure=False)
    with pytest.raises(OSError) as info:
        store.ping()
    message = str(info.value)
    assert f"127.0.0.1:{closed_port}" in message
    assert "unreachable" in message
    assert SECRET_KEY not in message
    assert SECRET_KEY not in repr(store)


def test_operations_on_unreachable_endpoint_raise_oserror(closed_port: int) -> None:
    store = S3Store(f"http://127.0.0.1:{closed_port}", ACCESS_KEY, SECRET_KEY, new_bucket())
    with pytest.raises(OSError, match=f"127.0.0.1:{closed_port}") as info:
        store.put_bytes("t/a", b"x")
    assert SECRET_KEY not in str(info.value)


@pytest.mark.parametrize(
    ("endpoint", "secure", "expected"),
    [
        ("minio:9000", True, ("minio:9000", True)),
        ("minio:9000", False, ("minio:9000", False)),
        ("http://minio:9000", True, ("minio:9000", False)),
        ("https://s3.example.com", False, ("s3.example.com", True)),
        ("https://s3.example.com/", False, ("s3.example.com", True)),
    ],
)
def test_parse_endpoint(endpoint: str, secure: bool, expected: tuple[str, bool]) -> None:
    assert parse_endpoint(endpoint, secure) == expected


@pytest.mark.parametrize(
    "endpoint", ["", "ftp://minio:9000", "http://minio:9000/bucket", "http://user:pw@minio:9000", "minio/x"]
)
def test_parse_endpoint_refuses_bad_forms(endpoint: str) -> None:
    with pytest.raises(ValueError, match="S3 endpoint"):
        parse_endpoint(endpoint, True)


def test_invalid_bucket_name_refused() -> None:
    with pytest.raises(ValueError, match="invalid S3 bucket name"):
        S3Store("minio:9000", ACCESS_KEY, SECRET_KEY, "B_")


# ---- make_store -----------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings see only the values a test passes, not this machine's GRADLEAK_ variables."""
    for name in list(os.environ):
        if name.startswith("GRADLEAK_"):
            monkeypatch.delenv(name)


def test_make_store_local_by_default(tmp_path: Path, clean_env: None) -> None:
    store = make_store(Settings(data_dir=tmp_path, s3_endpoint=None))
    assert isinstance(store, LocalStore)
    assert store.root == (tmp_path / "artifacts").resolve()


def test_make_store_s3_when_endpoint_set(s3_endpoint: str, tmp_path: Path, clean_env: None) -> None:
    bucket = new_bucket()
    settings = Settings(
        data_dir=tmp_path,
        s3_endpoint=s3_endpoint.removeprefix("http://"),
        s3_access_key=ACCESS_KEY,  # type: ignore[arg-type]
        s3_secret_key=SECRET_KEY,  # type: ignore[arg-type]
        s3_bucket=bucket,
        s3_region="us-east-1",
        s3_secure=False,
    )
    store = make_store(settings)
    assert isinstance(store, S3Store)
    assert store.bucket == bucket
    store.put_bytes("t/a", b"x")
    assert store.client.bucket_exists(bucket)
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize(("access", "secret"), [(None, None), (ACCESS_KEY, None), (None, SECRET_KEY)])
def test_make_store_s3_requires_both_keys(
    tmp_path: Path, access: str | None, secret: str | None, clean_env: None
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        s3_endpoint="minio:9000",
        s3_access_key=access,  # type: ignore[arg-type]
        s3_secret_key=secret,  # type: ignore[arg-type]
    )
    with pytest.raises(ValueError, match="GRADLEAK_S3_ACCESS_KEY and GRADLEAK_S3_SECRET_KEY"):
        make_store(settings)
