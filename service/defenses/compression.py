"""Compression defenses: QSGD quantisation, top-k sparsification, scaled sign."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from service.defenses.base import DEFENSES, Defense, Update, map_floating, random_uniform
from service.specs import QuantizeDefense, SignDefense, TopKDefense


def quantize(update: Mapping[str, Tensor], spec: QuantizeDefense, generator: torch.Generator) -> Update:
    """QSGD (Alistarh et al. 2017) per tensor with s = 2^bits - 1 levels.

    Each entry becomes ||x||_2 * sign(x) * l / s with l an integer in 0..s: |x| / ||x||_2 * s is
    rounded to a neighbouring level stochastically (up with probability equal to the fractional
    part, which makes the result unbiased: E[q(x)] = x) or to the nearest level. A quantised entry
    costs one sign bit and `bits` bits for its level, plus one float per tensor for the norm.
    """
    levels = 2**spec.bits - 1

    def one(x: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(x)
        if norm == 0:
            return torch.zeros_like(x)
        scaled = (x.abs() / norm * levels).clamp(0, levels)
        if spec.stochastic:
            lower = scaled.floor()
            level = lower + (random_uniform(x, generator) < scaled - lower).to(x.dtype)
        else:
            level = scaled.round()
        return norm * x.sign() * level / levels

    return map_floating(update, one)


def topk(update: Mapping[str, Tensor], spec: TopKDefense, generator: torch.Generator) -> Update:
    """Keep the round(ratio * n) largest-magnitude entries of each tensor (at least one); zero the rest."""

    def one(x: Tensor) -> Tensor:
        flat = x.flatten()
        k = max(1, round(spec.ratio * flat.numel()))
        kept = torch.zeros_like(flat)
        idx = flat.abs().topk(k, sorted=False).indices
        kept[idx] = flat[idx]
        return kept.view_as(x)

    return map_floating(update, one)


def sign(update: Mapping[str, Tensor], spec: SignDefense, generator: torch.Generator) -> Update:
    """Scaled signSGD: sign(x) * mean(|x|) per tensor.

    Plain signSGD shares sign(x) only; scaling by the tensor's mean magnitude (as error-feedback
    signSGD does) keeps each tensor's L1 norm, so the update stays on the scale of the original
    and FedAvg-style aggregation and scale-sensitive attacks still see comparable magnitudes.
    """
    return map_floating(update, lambda x: x.sign() * x.abs().mean())


DEFENSES.add(
    "quantize",
    Defense(
        "QSGD quantisation per tensor to 2^bits - 1 norm-scaled levels, stochastic or nearest",
        QuantizeDefense,
        quantize,
    ),
)
DEFENSES.add(
    "topk",
    Defense("keep the largest-magnitude fraction `ratio` of each tensor, zero the rest", TopKDefense, topk),
)
DEFENSES.add("sign", Defense("scaled signSGD: sign(x) times the tensor's mean |x|", SignDefense, sign))
