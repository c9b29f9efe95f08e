"""LPIPS: weights read from disk only, networks built once, unavailable with a reason otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lpips as lpips_pkg
import pytest
import torch
import torchvision

from service.data import load_photo
from service.errors import MetricUnavailableError
from service.metrics import backbone_filename, clear_lpips_cache, get_lpips_net, lpips, weight_search_dirs


def _photos(channels: int = 3) -> torch.Tensor:
    return torch.stack([load_photo(n, 32, channels) for n in ("astronaut", "coffee", "coins")])


def test_file_names_are_torchvisions() -> None:
    assert backbone_filename("alex") == "alexnet-owt-7be5be79.pth"
    assert backbone_filename("vgg") == "vgg16-397923af.pth"
    assert backbone_filename("squeeze") == "squeezenet1_1-b8a52dc0.pth"


def test_missing_weights_make_lpips_unavailable_naming_files_and_paths(
    tmp_path: Path, empty_torch_hub: Path
) -> None:
    configured = tmp_path / "configured"
    x = _photos()
    with pytest.raises(MetricUnavailableError) as err:
        lpips(x, x, weights_dir=configured)
    message = str(err.value)
    assert "alexnet-owt-7be5be79.pth" in message
    assert str(configured) in message
    assert str(empty_torch_hub / "hub" / "checkpoints") in message
    assert weight_search_dirs(configured) == [configured, empty_torch_hub / "hub" / "checkpoints"]


def test_fake_checkpoint_loads_without_any_download(
    fake_weights_dir: Path, alexnet_state: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", no_download)

    x = _photos()
    y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    same = lpips(x, x, weights_dir=fake_weights_dir)
    different = lpips(x, y, weights_dir=fake_weights_dir)
    assert same.shape == (3,) and same.dtype == torch.float64
    assert float(same.abs().max()) < 1e-6
    assert bool((different > 0).all())

    net: Any = get_lpips_net("alex", "cpu", fake_weights_dir)
    assert torch.equal(net.net.slice1[0].weight, alexnet_state["features.0.weight"])
    assert torch.equal(getattr(net.net.slice5, "10").bias, alexnet_state["features.10.bias"])
    shipped = Path(lpips_pkg.__file__).parent / "weights" / "v0.1" / "alex.pth"
    linear = torch.load(shipped, map_location="cpu", weights_only=True)
    assert torch.equal(net.lin0.model[1].weight, linear["lin0.model.1.weight"])
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_inputs_are_mapped_to_minus_one_one(fake_weights_dir: Path) -> None:
    x = _photos()
    y = x.roll(1, 0)
    net = get_lpips_net("alex", "cpu", fake_weights_dir)
    with torch.no_grad():
        expected = net(x, y, normalize=True).flatten().double()  # lpips' own [0, 1] -> [-1, 1]
    assert torch.allclose(lpips(x, y, weights_dir=fake_weights_dir), expected, atol=1e-6)


def test_network_is_built_once(fake_weights_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[Any] = []
    real_load = torch.load

    def counting_load(*args: Any, **kwargs: Any) -> Any:
        loads.append(args[0])
        assert kwargs.get("weights_only") is True
        return real_load(*args, **kwargs)

    clear_lpips_cache()
    monkeypatch.setattr(torch, "load", counting_load)
    x = _photos()
    lpips(x, x, weights_dir=fake_weights_dir)
    assert len(loads) == 2  # the backbone checkpoint and the package's linear layers
    lpips(x, x.roll(1, 0), weights_dir=fake_weights_dir)
    assert get_lpips_net("alex", "cpu", fake_weights_dir) is get_lpips_net("alex", "cpu", fake_weights_dir)
    assert len(loads) == 2


def test_torch_home_cache_is_searched(fake_weights_dir: Path, empty_torch_hub: Path) -> None:
    checkpoints = empty_torch_hub / "hub" / "checkpoints"
    x = _photos()
    with pytest.raises(MetricUnavailableError):
        lpips(x, x)
    checkpoints.mkdir(parents=True)
    (checkpoints / backbone_filename("alex")).symlink_to(fake_weights_dir / backbone_filename("alex"))
    assert float(lpips(x, x.roll(1, 0)).min()) > 0  # a failure earlier is not remembered


def test_grayscale_and_small_images(fake_weights_dir: Path) -> None:
    gray = _photos(channels=1)
    assert float(lpips(gray, gray, weights_dir=fake_weights_dir).abs().max()) < 1e-6
    tiny = torch.rand(2, 3, 16, 16)
    with pytest.raises(MetricUnavailableError, match="at least 31"):
        lpips(tiny, tiny, weights_dir=fake_weights_dir)


def test_wrong_checkpoint_is_unavailable_with_reason(tmp_path: Path) -> None:
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / backbone_filename("alex"))
    x = _photos()
    with pytest.raises(MetricUnavailableError, match="not a torchvision alex checkpoint"):
        lpips(x, x, weights_dir=tmp_path)
    (tmp_path / backbone_filename("alex")).write_bytes(b"garbage")
    with pytest.raises(MetricUnavailableError, match="cannot read"):
        lpips(x, x, weights_dir=tmp_path)


def test_unknown_network() -> None:
    x = _photos()
    with pytest.raises(ValueError, match="alex"):
        lpips(x, x, net="resnet")
