"""What leaks with certainty: the label histogram an update carries, and how sure its inference is.

A negative entry of the last layer's bias gradient proves its class present (dL/db_j is the
batch's mean of p_ij - y_ij, negative only if some image has y_ij = 1); summed over local steps
(FedAvg) it still does, since a step without the class adds p_ij >= 0. So the inference is:
- exact: one image (iDLG), or a known image count N with exactly N proven classes (each then
  holds one image);
- proven classes, estimated counts: the other cases with a bias (counts are infer_label_counts'
  least-squares estimate);
- estimated: no bias (weight-row sums prove a class only for non-negative inputs to the last
  layer), or a defense that can flip signs (noise, quantization).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from service.attacks import AttackProblem
from service.attacks.labels import infer_label_counts, last_layer_grads
from service.specs import JobSpec

SIGN_FLIPPING_DEFENSES = frozenset({"noise", "quantize"})
KNOWN_COUNT_SOURCES = ("given", "client training details")


def gradient_view(problem: AttackProblem) -> dict[str, torch.Tensor]:
    """The attack's target as a gradient (a weight change points the other way)."""
    sign = 1.0 if problem.target_kind == "gradient" else -1.0
    return {n: sign * t for n, t in zip(problem.param_names, problem.target, strict=True)}


def label_histogram(spec: JobSpec, problem: AttackProblem) -> dict[str, Any]:
    """The label counts the update reveals, the classes it proves present, and the certainty."""
    grads = gradient_view(problem)
    weight, bias = last_layer_grads(grads, problem.model, problem.num_classes)
    n = problem.num_images
    if problem.labels is not None:
        labels = [int(y) for y in problem.labels.tolist()]
    else:
        labels, _ = infer_label_counts(
            weight,
            bias,
            n,
            model=problem.model,
            input_shape=problem.image_shape,
            bn_mode=problem.bn_mode,  # type: ignore[arg-type]
            scale=None if problem.target_kind != "gradient" or not problem.target_scale_known else 1.0,
        )
    signal = bias if bias is not None else weight.sum(dim=1)
    proven = [int(j) for j in torch.nonzero(signal < 0).flatten().tolist()]
    flipping = sorted({d.name for d in spec.defenses} & SIGN_FLIPPING_DEFENSES)
    count_known = problem.num_images_source in KNOWN_COUNT_SOURCES
    if problem.label_source == "given":
        certainty, why = "given", "the server was given the labels"
    elif flipping:
        certainty = "estimated"
        why = f"{', '.join(flipping)} can flip the gradient's signs, so no class is proven present"
    elif bias is None:
        certainty = "estimated"
        why = "the last layer has no bias; weight-row signs prove a class only for non-negative inputs"
    elif count_known and (n == 1 or len(proven) == n) and len(set(labels)) == n:
        certainty = "exact"
        why = f"{n} image(s) and {len(proven)} classes with a negative bias gradient: one image each"
    else:
        certainty = "proven classes, estimated counts"
        why = (
            "a negative bias gradient proves each listed class present; the counts are a least-squares "
            "estimate" + ("" if count_known else " and the image count itself was estimated")
        )
    counts = Counter(labels)
    return {
        "counts": {str(c): counts[c] for c in sorted(counts)},
        "num_images": n,
        "num_images_source": problem.num_images_source,
        "label_source": problem.label_source,
        "proven_present": proven if certainty not in ("estimated", "given") else [],
        "certainty": certainty,
        "why": why,
        "labels": labels,
    }
