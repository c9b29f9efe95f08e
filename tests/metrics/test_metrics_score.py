"""Matching, label accuracy, score() and the metrics registry."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from service.data import load_photo
from service.metrics import (
    METRICS,
    PSNR_CAP_DB,
    label_accuracy,
    label_multiset_accuracy,
    label_positional_accuracy,
    match_reconstructions,
    metric_catalog,
    mse,
    pairwise_mse,
    psnr,
    score,
    ssim,
)

NAMES = ("astronaut", "coffee", "camera", "coins", "chelsea", "rocket")


def _truth(size: int = 32) -> torch.Tensor:
    return torch.stack([load_photo(n, size) for n in NAMES])


def _noisy(x: torch.Tensor, scales: list[float], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    s = torch.tensor(scales).view(-1, 1, 1, 1)
    return (x + s * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def test_pairwise_mse_matches_direct_computation() -> None:
    a, b = torch.rand(4, 3, 9, 7, dtype=torch.float64), torch.rand(4, 3, 9, 7, dtype=torch.float64)
    cost = pairwise_mse(a, b)
    for i in range(4):
        for j in range(4):
            assert float(cost[i, j]) == pytest.approx(float(((b[i] - a[j]) ** 2).mean()), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hungarian_matching_recovers_a_shuffle(seed: int) -> None:
    truth = _truth()
    shuffle = torch.randperm(len(NAMES), generator=torch.Generator().manual_seed(seed))
    recon = _noisy(truth, [0.15] * len(NAMES), seed)[shuffle]
    perm = match_reconstructions(recon, truth)
    # recon[j] is truth[shuffle[j]], so truth i is found at the j where shuffle[j] == i
    assert perm == shuffle.argsort().tolist()
    assert torch.equal(recon[perm], _noisy(truth, [0.15] * len(NAMES), seed))


def test_matching_minimises_total_cost_not_greedy() -> None:
    # greedy would pair truth 0 with recon 0 (cost 0) and force truth 1 onto recon 1 (cost 1)
    truth = torch.tensor([0.5, 0.6]).view(2, 1, 1, 1).expand(2, 1, 4, 4).contiguous()
    recon = torch.tensor([0.5, 0.0]).view(2, 1, 1, 1).expand(2, 1, 4, 4).contiguous()
    perm = match_reconstructions(recon, truth)
    total = float(pairwise_mse(recon, truth)[torch.arange(2), torch.tensor(perm)].sum())
    assert total == pytest.approx(min(0.0**2 + 0.6**2, 0.5**2 + 0.1**2))
    assert perm == [1, 0]


def test_label_accuracy() -> None:
    assert label_multiset_accuracy([3, 5, 5], [3, 3, 5]) == pytest.approx(2 / 3)
    assert label_multiset_accuracy([1, 2], [2, 1]) == 1.0
    assert label_positional_accuracy([1, 2], [2, 1]) == 0.0
    assert label_positional_accuracy([1, 2], [2, 1], permutation=[1, 0]) == 1.0
    both = label_accuracy([7, 1, 1], [1, 1, 2], [1, 2, 0])
    assert both == {"multiset": pytest.approx(2 / 3), "positional": pytest.approx(2 / 3)}
    assert label_multiset_accuracy(torch.tensor([4, 4]), [4, 1]) == 0.5  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="integers"):
        label_multiset_accuracy([1.5], [1])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="non-negative"):
        label_multiset_accuracy([-1], [1])
    with pytest.raises(ValueError, match="permutation"):
        label_positional_accuracy([1, 2], [1, 2], permutation=[0, 0])
    with pytest.raises(ValueError, match="3 predicted labels for 2"):
        label_positional_accuracy([1, 2, 3], [1, 2])


def test_score_matches_once_and_reports_in_truth_order(tmp_path: Path) -> None:
    truth = _truth()
    # image 3 is reconstructed almost perfectly: it is the most leaked
    clean = _noisy(truth, [0.2, 0.15, 0.25, 0.01, 0.3, 0.2])
    shuffle = [2, 5, 0, 4, 3, 1]
    recon = clean[shuffle]
    labels = [7, 1, 2, 3, 4, 5]
    recon_labels = [labels[i] for i in shuffle]
    recon_labels[shuffle.index(0)] = 9  # truth 0's reconstruction gets a wrong label
    result = score(recon, truth, recon_labels, labels, lpips_weights_dir=tmp_path / "none")

    json.dumps(result, allow_nan=False)  # plain JSON, no inf or NaN
    perm = result["permutation"]
    assert perm == [shuffle.index(i) for i in range(6)]
    assert result["per_image"]["psnr"] == pytest.approx(psnr(clean, truth).tolist())
    assert result["per_image"]["ssim"] == pytest.approx(ssim(clean, truth).tolist())
    assert result["per_image"]["mse"] == pytest.approx(mse(clean, truth).tolist())
    assert result["mean"]["psnr"] == pytest.approx(sum(result["per_image"]["psnr"]) / 6)

    worst = result["worst_case"]
    assert worst["image"] == 3 and worst["reconstruction"] == perm[3]
    assert worst["psnr"] == max(result["per_image"]["psnr"])
    assert worst["ssim"] == max(result["per_image"]["ssim"])
    assert worst["mse"] == min(result["per_image"]["mse"])
    assert worst["image_by_metric"]["psnr"] == 3 and worst["image_by_metric"]["ssim"] == 3
    assert "highest psnr" in worst["rule"] and "lowest lpips" in worst["rule"]

    assert result["label_accuracy"] == {"multiset": pytest.approx(5 / 6), "positional": pytest.approx(5 / 6)}
    assert result["per_image"]["lpips"] is None and result["mean"]["lpips"] is None
    assert worst["lpips"] is None
    assert "alexnet-owt-7be5be79.pth" in result["lpips_unavailable"]
    assert "ssim_unavailable" not in result


def test_score_with_lpips_weights(fake_weights_dir: Path) -> None:
    truth = _truth()
    recon = _noisy(truth, [0.3, 0.3, 0.3, 0.0, 0.3, 0.3])
    result = score(recon, truth, lpips_weights_dir=fake_weights_dir)
    values = result["per_image"]["lpips"]
    assert len(values) == 6 and all(v >= 0 for v in values)
    assert result["worst_case"]["lpips"] == min(values)
    assert result["worst_case"]["image_by_metric"]["lpips"] == 3
    assert result["worst_case"]["psnr"] == PSNR_CAP_DB  # an exact copy, capped
    assert "lpips_unavailable" not in result and result["label_accuracy"] is None
    json.dumps(result, allow_nan=False)


def test_score_on_tiny_images_says_what_is_unavailable() -> None:
    truth = torch.rand(3, 1, 8, 8)
    result = score(truth.flip(0), truth)
    assert result["per_image"]["ssim"] is None and "11x11" in result["ssim_unavailable"]
    assert result["per_image"]["lpips"] is None and "lpips_unavailable" in result
    assert result["permutation"] == [2, 1, 0]
    assert all(math.isfinite(v) for v in result["per_image"]["psnr"])


def test_score_checks_inputs() -> None:
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="differs"):
        score(x, x[:1])
    with pytest.raises(ValueError, match="labels"):
        score(x, x, [1], [1, 2])


def test_registry_and_catalog() -> None:
    assert METRICS.names() == ["label_accuracy", "lpips", "mse", "psnr", "ssim"]
    leak_up = {name: m.higher_is_more_leak for name, m in METRICS.items()}
    assert leak_up == {"label_accuracy": True, "lpips": False, "mse": False, "psnr": True, "ssim": True}
    catalog = metric_catalog()
    assert [c["name"] for c in catalog] == METRICS.names()
    assert all(c["description"] for c in catalog)
    assert {c["name"]: c["kind"] for c in catalog}["label_accuracy"] == "label"
    json.dumps(catalog)


@pytest.mark.gpu
def test_score_on_cuda_matches_cpu(fake_weights_dir: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    truth = _truth()
    recon = _noisy(truth, [0.1, 0.2, 0.05, 0.3, 0.1, 0.2])[[1, 0, 3, 2, 5, 4]]
    on_cpu = score(recon, truth, lpips_weights_dir=fake_weights_dir)
    on_gpu = score(recon.cuda(), truth.cuda(), lpips_weights_dir=fake_weights_dir)
    assert on_gpu["permutation"] == on_cpu["permutation"]
    for name in ("mse", "psnr", "ssim", "lpips"):
        assert on_gpu["per_image"][name] == pytest.approx(on_cpu["per_image"][name], rel=1e-4, abs=1e-6)
