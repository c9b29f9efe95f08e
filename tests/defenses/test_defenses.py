"""Each defense's defining property, determinism by seed, no mutation, and ordered application."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from service.defenses import DEFENSES, apply_defenses, catalog, clip, noise, quantize, sign, topk
from service.specs import (
    ClipDefense,
    DefenseSpec,
    NoiseDefense,
    QuantizeDefense,
    SignDefense,
    TopKDefense,
)

ALL_SPECS: list[DefenseSpec] = [
    QuantizeDefense(bits=3, stochastic=True),
    QuantizeDefense(bits=2, stochastic=False),
    TopKDefense(ratio=0.2),
    ClipDefense(max_norm=0.5),
    NoiseDefense(distribution="gaussian", scale=0.1),
    NoiseDefense(distribution="laplace", scale=0.1),
    SignDefense(),
]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def update() -> dict[str, Tensor]:
    g = _gen(42)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "conv.bias": torch.randn(4, generator=g) * 5,
        "fc.weight": torch.randn(10, 20, generator=g) * 0.01,
        "bn.num_batches_tracked": torch.tensor(3),
    }


def _norm(update: dict[str, Tensor]) -> float:
    return math.sqrt(sum(v.double().square().sum().item() for v in update.values() if v.is_floating_point()))


def test_registry_names_every_spec() -> None:
    assert DEFENSES.names() == ["clip", "noise", "quantize", "sign", "topk"]
    for name, defense in DEFENSES.items():
        assert defense.spec_type.model_fields["name"].default == name
        assert defense.description
    entries = {e["name"]: e for e in catalog()}
    assert entries.keys() == set(DEFENSES.names())
    assert "ratio" in entries["topk"]["parameters"]["properties"]


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: f"{s.name}")
def test_no_mutation_no_aliasing_and_counters_pass_through(update, spec) -> None:
    saved = {k: v.clone() for k, v in update.items()}
    out = apply_defenses(update, [spec], _gen())
    assert out.keys() == update.keys()
    for k, v in update.items():
        assert torch.equal(v, saved[k])
        assert out[k].data_ptr() != v.data_ptr()
        assert out[k].shape == v.shape and out[k].dtype == v.dtype
    assert torch.equal(out["bn.num_batches_tracked"], saved["bn.num_batches_tracked"])


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: f"{s.name}")
def test_same_seed_same_result(update, spec) -> None:
    a = apply_defenses(update, [spec], _gen(1))
    b = apply_defenses(update, [spec], _gen(1))
    for k in a:
        assert torch.equal(a[k], b[k])


@pytest.mark.parametrize("spec", [ALL_SPECS[0], ALL_SPECS[4], ALL_SPECS[5]], ids=lambda s: f"{s.name}")
def test_random_defenses_differ_across_seeds(update, spec) -> None:
    a = apply_defenses(update, [spec], _gen(1))
    b = apply_defenses(update, [spec], _gen(2))
    assert not torch.equal(a["conv.weight"], b["conv.weight"])


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("stochastic", [True, False])
def test_quantize_uses_norm_scaled_levels(update, bits, stochastic) -> None:
    levels = 2**bits - 1
    out = quantize(update, QuantizeDefense(bits=bits, stochastic=stochastic), _gen())
    for k in ("conv.weight", "conv.bias", "fc.weight"):
        x, q = update[k], out[k]
        index = q.abs() / torch.linalg.vector_norm(x) * levels
        torch.testing.assert_close(index, index.round(), atol=1e-4, rtol=0)
        assert index.round().unique().numel() <= levels + 1
        assert index.max() <= levels + 1e-4
        assert torch.all((q == 0) | (q.sign() == x.sign()))
        if not stochastic:
            err = (q - x).abs().max()
            assert err <= torch.linalg.vector_norm(x) / (2 * levels) + 1e-5


def test_stochastic_quantize_is_unbiased() -> None:
    x = torch.randn(64, generator=_gen(3))
    gen = _gen(4)
    draws = torch.stack([quantize({"x": x}, QuantizeDefense(bits=2), gen)["x"] for _ in range(4000)])
    step = torch.linalg.vector_norm(x) / 3
    # an entry's standard deviation is at most step / 2: the mean of 4000 draws is within 5 standard errors
    assert (draws.mean(0) - x).abs().max() < 5 * step / 2 / math.sqrt(4000)
    nearest = quantize({"x": x}, QuantizeDefense(bits=2, stochastic=False), gen)["x"]
    assert (nearest - x).abs().mean() > 10 * (draws.mean(0) - x).abs().mean()


def test_quantize_of_zeros_is_zeros() -> None:
    assert torch.count_nonzero(quantize({"z": torch.zeros(5)}, QuantizeDefense(), _gen())["z"]) == 0


@pytest.mark.parametrize(
    ("ratio", "kept"), [(0.2, {"conv.weight": 22, "conv.bias": 1, "fc.weight": 40}), (1.0, None)]
)
def test_topk_keeps_exactly_the_largest(update, ratio, kept) -> None:
    out = topk(update, TopKDefense(ratio=ratio), _gen())
    for k in ("conv.weight", "conv.bias", "fc.weight"):
        x, y = update[k].flatten(), out[k].flatten()
        k_expected = x.numel() if kept is None else kept[k]
        assert torch.count_nonzero(y) == k_expected
        nz = y != 0
        assert torch.equal(y[nz], x[nz])
        if (~nz).any():
            assert x[nz].abs().min() >= x[~nz].abs().max()


def test_topk_keeps_at_least_one_entry() -> None:
    out = topk({"v": torch.tensor([0.1, -3.0, 2.0])}, TopKDefense(ratio=0.01), _gen())
    assert out["v"].tolist() == [0.0, -3.0, 0.0]


def test_clip_scales_to_the_global_norm(update) -> None:
    norm = _norm(update)
    out = clip(update, ClipDefense(max_norm=norm / 4), _gen())
    assert _norm(out) == pytest.approx(norm / 4, rel=1e-6)
    for k in ("conv.weight", "conv.bias", "fc.weight"):
        torch.testing.assert_close(out[k], update[k] / 4)
    below = clip(update, ClipDefense(max_norm=norm * 2), _gen())
    for k in update:
        assert torch.equal(below[k], update[k])


@pytest.mark.parametrize("distribution", ["gaussian", "laplace"])
def test_noise_statistics(distribution) -> None:
    scale = 0.3
    x = torch.linspace(-1, 1, 200_000)
    n = noise({"x": x}, NoiseDefense(distribution=distribution, scale=scale), _gen())["x"] - x
    assert abs(n.mean().item()) < 0.01
    if distribution == "gaussian":
        assert n.std().item() == pytest.approx(scale, rel=0.01)
        assert (n.abs() < scale).float().mean().item() == pytest.approx(0.6827, abs=0.01)
    else:
        assert n.abs().mean().item() == pytest.approx(scale, rel=0.01)
        assert n.var().item() == pytest.approx(2 * scale**2, rel=0.03)


def test_zero_noise_changes_nothing(update) -> None:
    out = noise(update, NoiseDefense(scale=0.0), _gen())
    for k in update:
        assert torch.equal(out[k], update[k])


def test_sign_is_scaled_sign(update) -> None:
    x = torch.tensor([0.5, -2.0, 0.0, 1.5])
    assert sign({"x": x}, SignDefense(), _gen())["x"].tolist() == [1.0, -1.0, 0.0, 1.0]
    out = sign(update, SignDefense(), _gen())
    for k in ("conv.weight", "conv.bias", "fc.weight"):
        assert torch.equal(out[k].sign(), update[k].sign())
        assert out[k].abs().unique().numel() == 1
        torch.testing.assert_close(out[k].abs().sum(), update[k].abs().sum())


def test_defenses_apply_in_order(update) -> None:
    clip_spec, noise_spec = ClipDefense(max_norm=0.1), NoiseDefense(scale=1.0)
    chained = apply_defenses(update, [clip_spec, noise_spec], _gen(5))
    by_hand = noise(clip(update, clip_spec, _gen()), noise_spec, _gen(5))
    for k in update:
        assert torch.equal(chained[k], by_hand[k])
    assert _norm(apply_defenses(update, [noise_spec, clip_spec], _gen(5))) == pytest.approx(0.1, rel=1e-6)
    assert _norm(chained) > 1.0


def test_no_defenses_returns_a_new_dict_of_the_same_update(update) -> None:
    out = apply_defenses(update, [], _gen())
    assert out is not update and all(out[k] is update[k] for k in update)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_seed_gives_the_same_defended_update_on_cuda(update) -> None:
    on_cuda = {k: v.cuda() for k, v in update.items()}
    for spec in ALL_SPECS:
        cpu = apply_defenses(update, [spec], _gen(9))
        gpu = apply_defenses(on_cuda, [spec], _gen(9))
        for k, v in cpu.items():
            assert gpu[k].device.type == "cuda"
            torch.testing.assert_close(gpu[k].cpu(), v)
