"""`gradleak assets fetch`: downloads from a file server on loopback (never the real host), the
checksum refusal, the offline error, and the file landing where the LPIPS metric looks."""

from __future__ import annotations

import functools
import hashlib
import socket
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from typer.testing import CliRunner

from service.assets import Asset, AssetError, fetch, get_asset
from service.cli import app
from service.metrics.perceptual import find_backbone_checkpoint


class CountingHandler(SimpleHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # keep the test output clean
        pass


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on a free loopback port serving a folder; yields (base URL, folder)."""
    served = tmp_path / "served"
    served.mkdir()
    CountingHandler.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CountingHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_a_download_is_verified_stored_where_the_metric_looks_and_fetched_once(
    file_server: tuple[str, Path], tmp_path: Path
) -> None:
    base, served = file_server
    content = b"backbone weights" * 100_000
    (served / "alex.pth").write_bytes(content)
    lpips = get_asset("lpips")
    asset = Asset("test", lpips.filename, f"{base}/alex.pth", hashlib.sha256(content).hexdigest(), "test")
    weights = tmp_path / "weights"
    path, downloaded = fetch(asset, weights)
    assert downloaded and path.read_bytes() == content
    assert find_backbone_checkpoint("alex", weights) == path.resolve()
    again, downloaded_again = fetch(asset, weights)
    assert again == path and not downloaded_again and CountingHandler.requests == ["/alex.pth"]
    assert [p.name for p in weights.iterdir()] == [lpips.filename]  # no partial file left


def test_the_cli_refuses_a_file_whose_checksum_is_not_the_pinned_one(
    file_server: tuple[str, Path], tmp_path: Path
) -> None:
    base, served = file_server
    (served / "alexnet.pth").write_bytes(b"not the weights")
    weights = tmp_path / "weights"
    result = CliRunner().invoke(
        app, ["assets", "fetch", "lpips", "--url", f"{base}/alexnet.pth", "--dir", str(weights)]
    )
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()
    assert line.startswith("gradleak: error: refused") and get_asset("lpips").sha256 in line
    assert "nothing was stored" in line and not any(weights.iterdir())


def test_offline_or_missing_the_cli_fails_in_one_clear_line(
    file_server: tuple[str, Path], tmp_path: Path
) -> None:
    base, _ = file_server
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    for url, says in (
        (f"http://127.0.0.1:{closed}/a.pth", "cannot download lpips"),
        (f"{base}/gone", "HTTP 404"),
    ):
        result = CliRunner().invoke(app, ["assets", "fetch", "lpips", "--url", url, "--dir", str(tmp_path)])
        assert result.exit_code == 2
        [line] = result.output.strip().splitlines()
        assert line.startswith("gradleak: error:") and says in line, line
    assert not list(tmp_path.glob("*.pth")) and not list(tmp_path.glob(".*.part"))
    unknown = CliRunner().invoke(app, ["assets", "fetch", "resnet"])
    assert unknown.exit_code == 2 and "unknown asset 'resnet'; valid: lpips" in unknown.output


def test_the_pinned_lpips_asset_is_torchvisions_alexnet() -> None:
    from torchvision.models import AlexNet_Weights

    asset = get_asset("lpips")
    assert asset.url == AlexNet_Weights.IMAGENET1K_V1.url
    # torchvision's file names end in the first hex digits of the file's sha256
    assert asset.filename == "alexnet-owt-7be5be79.pth" and asset.sha256.startswith("7be5be79")
    with pytest.raises(AssetError, match="unknown asset"):
        get_asset("vgg")
