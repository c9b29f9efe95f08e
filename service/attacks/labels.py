"""Label inference from the gradient of the model's last fully connected layer.

For the mean cross-entropy over N images with softmax outputs p_i and one-hot labels y_i, the
last layer z_i = W a_i + b has the gradients

    dL/db_j = 1/N * sum_i (p_ij - y_ij)          dL/dW_j = 1/N * sum_i (p_ij - y_ij) a_i

Batch of one (iDLG, Zhao et al. 2020): only the true class has p - y < 0, so with non-negative
activations a (after a ReLU) its weight row is the only one with a negative sum; the bias entry
tells it without any assumption on a.

Batches (label counts): write g_j for the bias gradient, or for the weight row's sum when there
is no bias (then the per-image "impact" c_i = sum_d a_id >= 0 weighs each image, as in LLG,
Wainakh et al. 2022, "User-level label leakage from gradients in federated learning"). Then

    g_j = q_j - 1/N * sum_{i: y_i = j} c_i,     q_j = 1/N * sum_i p_ij c_i >= 0,

so a negative g_j proves class j present. Taking p_ij ~ pi_j, a prior over the mean softmax
output (uniform, or measured on random inputs when the model is given, as breaching's white-box
variant does), and c_i ~ c, the mean impact, gives q_j ~ pi_j c and the real-valued counts
x_j = N * (pi_j - g_j / c), which sum to N (sum_j g_j = 0 exactly). For the bias c = 1 (times
the gradient's scale, when known); otherwise c is calibrated on the classes with no image,
where g_j = q_j ~ pi_j c (c = sum_absent g_j / sum_absent pi_j), and the absent set is
re-estimated from the counts until it stops changing. The integer counts minimise
sum_j (n_j - x_j)^2 subject to sum n_j = N and n_j >= 1 for every class with g_j < 0 (a greedy
allocation, optimal for this separable convex cost).

What it achieves (measured on untrained 10-class models and photo crops, N known, 20 random
batches each): bias gradient and model, exact counts in 19-20 of 20 up to N = 16 for plain
ConvNets, MLPs and LeNet, but only up to N ~ 8 with train-mode batch norm, whose outputs vary
more from image to image; the uniform prior (no model) is as good up to N = 8; weight rows
only, exact in 17-20 of 20 at N = 4, degrading beyond as images differ in activation mass.
Trained models, larger batches and defended updates break p_ij ~ pi_j: the result is then the
least-squares estimate under this model, not a certainty.

When N is unknown it is estimated as the smallest N, at least the number of classes proven
present, whose real-valued counts lie within 0.2 (RMS over the classes given a sample) of
integers: right in 55-57 of 60 random batches for N = 2..4 and 51 of 60 for N = 8 (bias and
model). Like every method that reads only the last layer, it cannot tell N images of one class
from a single one (their gradients differ only by per-image variation) and then reports the
smallest N.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from service.errors import ShapeMismatchError, SpecError
from service.fl.client import BNMode, training_mode

_INTEGER_TOLERANCE = 0.2  # RMS distance of the active classes' counts to integers
_MAX_REFINEMENTS = 10


def find_last_linear(model: nn.Module, num_classes: int | None = None) -> tuple[str, nn.Linear]:
    """The last nn.Linear in model.modules() order (with out_features == num_classes when given)."""
    found: tuple[str, nn.Linear] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (num_classes is None or module.out_features == num_classes):
            found = (name, module)
    if found is None:
        wanted = f" with {num_classes} outputs" if num_classes is not None else ""
        raise SpecError(f"label inference needs a final fully connected layer{wanted}; the model has none")
    return found


def last_layer_grads(
    named_grads: Mapping[str, Tensor], model: nn.Module, num_classes: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """The (weight, bias or None) gradients of the model's final Linear layer, looked up by name."""
    name, layer = find_last_linear(model, num_classes)
    prefix = f"{name}." if name else ""
    weight_key, bias_key = prefix + "weight", prefix + "bias"
    if weight_key not in named_grads:
        raise ShapeMismatchError(
            f"the update has no {weight_key} (the last layer)", [f"{weight_key}: missing"]
        )
    weight = named_grads[weight_key]
    if tuple(weight.shape) != tuple(layer.weight.shape):
        raise ShapeMismatchError(
            f"{weight_key} has shape {tuple(weight.shape)}, the model's is {tuple(layer.weight.shape)}",
            [f"{weight_key}: shape {tuple(weight.shape)}"],
        )
    bias = named_grads.get(bias_key) if layer.bias is not None else None
    return weight, bias


def idlg_label(last_weight_grad: Tensor, last_bias_grad: Tensor | None = None) -> int:
    """The label of a single image (iDLG): the class whose bias gradient, or weight row sum, is lowest.

    The weight rule assumes non-negative activations into the last layer (a ReLU before it); the
    bias rule holds for any activations.
    """
    signal = _class_signal(last_weight_grad, last_bias_grad)
    return int(signal.argmin().item())


def infer_label_counts(
    last_weight_grad: Tensor,
    last_bias_grad: Tensor | None,
    num_images: int | None,
    *,
    model: nn.Module | None = None,
    input_shape: tuple[int, ...] | None = None,
    bn_mode: BNMode = "train",
    num_dummy: int = 64,
    generator: torch.Generator | None = None,
    max_images: int = 256,
    scale: float | None = 1.0,
) -> tuple[list[int], int]:
    """The labels of the batch behind a last-layer gradient, as a sorted multiset, and its size.

    The gradients must point the gradient's way (pass -delta for a weight delta, never the delta).
    `scale` says what multiple of the mean-loss gradient they are: 1 for a FedSGD gradient or a
    pseudo-gradient of known lr and steps, None when unknown (a FedAvg delta of unknown lr or
    steps): the mean impact c is then calibrated on the absent classes for the bias as well,
    which is as accurate up to N ~ 8 and worse beyond. `num_images` None estimates the batch
    size (see the module docstring). With `model` and `input_shape` the mean softmax output is
    measured on `num_dummy` standard-normal inputs (drawn from `generator`, BN in `bn_mode`)
    instead of assumed uniform, and the model's mean activation sum is the fallback impact for
    weight rows of known scale when no class looks absent.
    """
    signal = _class_signal(last_weight_grad, last_bias_grad).double()
    num_classes = signal.numel()
    if num_images is not None and num_images < 1:
        raise SpecError(f"num_images must be at least 1, got {num_images}")
    if num_dummy < 1 or max_images < 1:
        raise SpecError(f"num_dummy and max_images must be at least 1, got {num_dummy}, {max_images}")
    if scale is not None and scale <= 0:
        raise SpecError(f"the gradient scale must be positive, got {scale}")
    if not torch.any(signal != 0):
        raise SpecError("the last layer's gradient is zero: it carries no label information")
    prior = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    dummy_impact: float | None = None
    if model is not None:
        if input_shape is None:
            raise SpecError("label inference with a model needs the input shape for its dummy inputs")
        prior, dummy_impact = _dummy_statistics(
            model, num_classes, input_shape, bn_mode, num_dummy, num_images or num_dummy, generator
        )
    use_bias = last_bias_grad is not None
    estimator = _CountEstimator(
        signal,
        prior,
        impact=scale if use_bias else None,
        fallback_impact=None if use_bias or dummy_impact is None or scale is None else dummy_impact * scale,
    )
    n = num_images if num_images is not None else estimator.estimate_num_images(max_images)
    counts = estimator.counts(n)
    labels = [j for j, c in enumerate(counts.tolist()) for _ in range(c)]
    return labels, n


def _class_signal(weight_grad: Tensor, bias_grad: Tensor | None) -> Tensor:
    if weight_grad.ndim != 2:
        raise ShapeMismatchError(
            f"the last layer's weight gradient is (classes, features); got {tuple(weight_grad.shape)}",
            [f"weight: shape {tuple(weight_grad.shape)}"],
        )
    if bias_grad is None:
        return weight_grad.detach().sum(dim=1)
    if tuple(bias_grad.shape) != (weight_grad.shape[0],):
        raise ShapeMismatchError(
            f"the bias gradient has shape {tuple(bias_grad.shape)}, expected ({weight_grad.shape[0]},)",
            [f"bias: shape {tuple(bias_grad.shape)}"],
        )
    return bias_grad.detach().flatten()


def _dummy_statistics(
    model: nn.Module,
    num_classes: int,
    input_shape: tuple[int, ...],
    bn_mode: BNMode,
    num_dummy: int,
    batch_size: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, float]:
    """Mean softmax output and mean activation sum into the last layer, on random inputs."""
    probe = copy.deepcopy(model)
    name, _ = find_last_linear(probe, num_classes)
    layer = probe.get_submodule(name)
    seen: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].detach()))
    device = next((p.device for p in probe.parameters()), torch.device("cpu"))
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    # batches of the client's size: in train mode BN normalises with the statistics of that batch
    chunk = max(2, batch_size)
    total = -(-num_dummy // chunk) * chunk
    dummy = torch.randn((total, *input_shape), generator=gen, device=gen.device).to(device)
    try:
        with training_mode(probe, bn_mode), torch.no_grad():
            probs = torch.cat([probe(x).double().softmax(dim=-1) for x in dummy.split(chunk)])
    finally:
        handle.remove()
    if probs.shape != (total, num_classes):
        raise SpecError(f"the model gives outputs of shape {tuple(probs.shape)}, not (N, {num_classes})")
    impact = torch.cat(seen).double().flatten(1).sum(dim=1).mean().item()
    return probs.mean(dim=0).cpu(), impact


class _CountEstimator:
    """Counts from the class signal g and an output prior pi, as derived in the module docstring."""

    def __init__(
        self, signal: Tensor, prior: Tensor, *, impact: float | None, fallback_impact: float | None
    ) -> None:
        self.g = signal.cpu()
        self.prior = prior / prior.sum()
        self.impact = impact  # known mean impact c, else calibrated on the absent classes
        self.fallback_impact = fallback_impact
        # a negative signal proves the class present; the most negative come first when N is short
        self.proven = [j for j in self.g.argsort().tolist() if self.g[j] < 0]

    def estimate_num_images(self, max_images: int) -> int:
        start = max(1, len(self.proven))
        shares = self._shares(self._absent_from_signal())
        for n in range(start, max(start, max_images) + 1):
            x = shares * n
            counts = self._allocate(x, n)
            active = (counts > 0) | (x > 0.5)
            if (x - counts)[active].square().mean().sqrt().item() <= _INTEGER_TOLERANCE:
                return n
        return start

    def counts(self, n: int) -> Tensor:
        absent = self._absent_from_signal()
        counts = self._allocate(self._shares(absent) * n, n)
        for _ in range(_MAX_REFINEMENTS):
            if self.impact is not None or torch.equal(counts == 0, absent):
                break
            absent = counts == 0
            counts = self._allocate(self._shares(absent) * n, n)
        return counts

    def _absent_from_signal(self) -> Tensor:
        return self.g >= 0

    def _shares(self, absent: Tensor) -> Tensor:
        """x_j / N = pi_j - g_j / c, which sums to one."""
        impact = self.impact if self.impact is not None else self._impact(absent)
        return self.prior - self.g / impact

    def _impact(self, absent: Tensor) -> float:
        """The mean per-image impact c, calibrated on the classes taken as absent."""
        if absent.any() and self.g[absent].sum() > 0:
            return float(self.g[absent].sum() / self.prior[absent].sum())
        if self.fallback_impact is not None and self.fallback_impact > 0:
            return self.fallback_impact
        raise SpecError(
            "cannot calibrate label counts when every class seems present; give the bias gradient at a "
            "known scale, or the weight gradient at a known scale with the model"
        )

    def _allocate(self, x: Tensor, n: int) -> Tensor:
        """The integer counts summing to n nearest to x (least squares), one at least per proven class."""
        counts = torch.zeros(x.numel(), dtype=torch.long)
        for j in self.proven[:n]:
            counts[j] = 1
        for _ in range(n - int(counts.sum().item())):
            counts[int((x - counts).argmax().item())] += 1
        return counts
