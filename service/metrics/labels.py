"""Label recovery: how many of the client's labels an attack inferred."""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Sequence


def _as_labels(labels: Sequence[int], name: str) -> list[int]:
    out = []
    for y in labels:
        try:
            # accepts int, numpy integers and one-element integer tensors; refuses floats
            value = operator.index(y)
        except TypeError:
            raise ValueError(f"{name} must be integers, got {y!r}") from None
        if isinstance(y, bool) or value < 0:
            raise ValueError(f"{name} must be non-negative class indices, got {y!r}")
        out.append(value)
    return out


def label_multiset_accuracy(pred_labels: Sequence[int], true_labels: Sequence[int]) -> float:
    """Fraction of the true labels recovered, order-free and counting multiplicity: a batch with
    labels [3, 3, 5] and predictions [3, 5, 5] recovers two of three."""
    pred = _as_labels(pred_labels, "predicted labels")
    true = _as_labels(true_labels, "true labels")
    if not true:
        raise ValueError("no true labels")
    hits = Counter(pred) & Counter(true)
    return sum(hits.values()) / len(true)


def label_positional_accuracy(
    pred_labels: Sequence[int], true_labels: Sequence[int], permutation: Sequence[int] | None = None
) -> float:
    """Fraction of images whose label is right after matching: ``pred_labels[permutation[i]]``
    against ``true_labels[i]`` (the identity when no permutation is given)."""
    pred = _as_labels(pred_labels, "predicted labels")
    true = _as_labels(true_labels, "true labels")
    if not true:
        raise ValueError("no true labels")
    if len(pred) != len(true):
        raise ValueError(f"{len(pred)} predicted labels for {len(true)} true labels")
    perm = list(range(len(true))) if permutation is None else [int(p) for p in permutation]
    if sorted(perm) != list(range(len(true))):
        raise ValueError(f"permutation {perm[:8]} is not a permutation of 0..{len(true) - 1}")
    return sum(pred[p] == y for p, y in zip(perm, true, strict=True)) / len(true)


def label_accuracy(
    pred_labels: Sequence[int], true_labels: Sequence[int], permutation: Sequence[int] | None = None
) -> dict[str, float]:
    """Both label scores: ``multiset`` (order-free) and ``positional`` (after matching)."""
    return {
        "multiset": label_multiset_accuracy(pred_labels, true_labels),
        "positional": label_positional_accuracy(pred_labels, true_labels, permutation),
    }
