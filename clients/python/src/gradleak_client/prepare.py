"""Make an audit's inputs from your own torch model and a batch of your data (needs torch).

Import it explicitly (`from gradleak_client import prepare`); `import gradleak_client` never
imports torch. From a model and a batch it writes the three files an audit takes:

- the model: `model.onnx` (your architecture and weights, for any model; upload it without
  `arch`) or `model.safetensors` (the weights of a registered architecture, e.g. `lenet`);
- the update a client of this model would share after training on the batch: the gradient
  (FedSGD), or the weight delta or new weights (FedAvg), computed by gradleak's own FL client
  code when the server package is installed, on the batch normalised as you declare it;
- the ground truth: the batch itself (`images` in [0, 1], `labels`), for scoring only.

    >>> from gradleak_client import prepare
    >>> files = prepare.write_inputs(model, images, labels, "inputs", normalization="cifar10")
    >>> job = Client().audit(**files.audit_kwargs(), budget={"iterations": 500})

Tensor names: the update's tensors are named like the model's `named_parameters()`; the ONNX
export keeps these names on its initializers, which is how gradleak matches them.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

try:
    import torch
    from torch import nn
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(
        "gradleak_client.prepare needs torch (pip install torch); the rest of gradleak_client does not"
    ) from e

from safetensors.torch import save as _save_safetensors

UpdateKind = Literal["gradient", "delta", "weights"]
ModelFormat = Literal["onnx", "safetensors"]

# The server's normalisations (service/specs.py NORMALIZATIONS); a test keeps them equal.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
ONNX_OPSET = 17  # the newest opset whose every supported operator onnx2torch converts
IMAGES, LOGITS = "images", "logits"


@dataclass(frozen=True)
class Inputs:
    """The files `write_inputs` wrote and the facts an audit needs with them."""

    model: Path
    update: Path
    ground_truth: Path
    image_shape: tuple[int, int, int]
    num_classes: int
    kind: UpdateKind
    normalization: str | Mapping[str, Sequence[float]]
    client: dict[str, Any] = field(default_factory=dict)
    arch: str | None = None  # None: the model file is ONNX

    def audit_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `Client.audit` for these files."""
        out: dict[str, Any] = {
            "model": str(self.model),
            "update": str(self.update),
            "ground_truth": str(self.ground_truth),
            "image_shape": self.image_shape,
            "num_classes": self.num_classes,
            "kind": self.kind,
            "normalization": self.normalization,
            "client": self.client or None,
            "num_images": None,
        }
        if self.arch is not None:
            out["arch"] = self.arch
        return out


def write_inputs(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    out: str | Path,
    *,
    format: ModelFormat = "onnx",
    arch: str | None = None,
    kind: UpdateKind = "gradient",
    normalization: str | Mapping[str, Sequence[float]] = "cifar10",
    lr: float | None = None,
    local_epochs: int | None = None,
    batch_size: int | None = None,
    bn_mode: Literal["train", "eval"] | None = None,
) -> Inputs:
    """Write `out/model.onnx` (or `model.safetensors` for a registered `arch`), `out/update.safetensors`
    and `out/ground_truth.safetensors` for `model` and the batch `images` (N, C, H, W in [0, 1])
    with `labels` (N). `kind` delta or weights trains like a FedAvg client (`lr`, `local_epochs`,
    `batch_size`; the server is told these facts). The model itself is left untouched."""
    images, labels_t = _batch(images, labels)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    shape = (int(images.shape[1]), int(images.shape[2]), int(images.shape[3]))
    with torch.no_grad():
        num_classes = int(_eval_copy(model)(images[:1].to(_device(model))).shape[-1])

    if format == "onnx":
        model_path = export_onnx(model, folder / "model.onnx", shape)
    else:
        if arch is None:
            raise ValueError(
                "format 'safetensors' writes the weights of a registered architecture: give arch"
            )
        model_path = save_weights(model, folder / "model.safetensors")

    client: dict[str, Any] = {"protocol": "fedsgd" if kind == "gradient" else "fedavg"}
    client.update(
        {k: v for k, v in {"lr": lr, "local_epochs": local_epochs, "batch_size": batch_size}.items() if v}
    )
    if bn_mode is not None:
        client["bn_mode"] = bn_mode
    update = client_update(model, images, labels_t, kind=kind, normalization=normalization, **client)
    update_path = folder / "update.safetensors"
    update_path.write_bytes(_save_safetensors(_contiguous(update)))
    truth_path = save_ground_truth(images, labels_t, folder / "ground_truth.safetensors")
    return Inputs(
        model=model_path,
        update=update_path,
        ground_truth=truth_path,
        image_shape=shape,
        num_classes=num_classes,
        kind=kind,
        normalization=normalization,
        client=client,
        arch=None if format == "onnx" else arch,
    )


def export_onnx(model: nn.Module, path: str | Path, image_shape: Sequence[int]) -> Path:
    """Write `model` as ONNX the way gradleak reads it: opset 17, a dynamic batch axis, the
    weights inside the file under their `state_dict()` names, batch norm kept as its own layer
    (exported in eval mode, without constant folding, so nothing is fused or renamed)."""
    work = _eval_copy(model).cpu().float()
    example = torch.zeros(1, *image_shape)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch points at its newer exporter; this one writes the initializer names gradleak matches
        warnings.simplefilter("ignore")
        torch.onnx.export(
            work,
            (example,),
            buffer,  # type: ignore[arg-type]  # torch writes to file objects too
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=[IMAGES],
            output_names=[LOGITS],
            dynamic_axes={IMAGES: {0: "batch"}, LOGITS: {0: "batch"}},
            training=torch.onnx.TrainingMode.EVAL,
            do_constant_folding=False,
        )
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(buffer.getvalue())
    return p


def onnx_with_weights(onnx_model: bytes, state: Mapping[str, Any]) -> bytes:
    """An exported ONNX model with other weights (a later round's): each initializer named in
    `state` (a state_dict of tensors or numpy arrays) takes that value; integer entries the graph
    does not hold (num_batches_tracked) are skipped, any other unknown name is an error."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_model_from_string(onnx_model)
    graph = proto.graph
    tensors = {t.name: t for t in graph.initializer}
    # the exporter names equal tensors once, the others through Identity nodes: give each its own
    for node in [n for n in graph.node if n.op_type == "Identity" and n.input and n.input[0] in tensors]:
        if node.output[0] in state:
            graph.initializer.append(
                numpy_helper.from_array(numpy_helper.to_array(tensors[node.input[0]]), node.output[0])
            )
            graph.node.remove(node)
    tensors = {t.name: t for t in graph.initializer}
    unknown = []
    for name, value in state.items():
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if name not in tensors:
            if np.issubdtype(array.dtype, np.floating):
                unknown.append(name)
            continue
        old = numpy_helper.to_array(tensors[name])
        if old.shape != array.shape:
            raise ValueError(
                f"{name}: the graph holds shape {list(old.shape)}, the state {list(array.shape)}"
            )
        tensors[name].CopyFrom(numpy_helper.from_array(array.astype(old.dtype), name))
    if unknown:
        raise ValueError(f"the ONNX model has no initializers named {', '.join(unknown[:10])}")
    return proto.SerializeToString()


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """The model's `state_dict()` as safetensors (the weights the server sent)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(_save_safetensors(_contiguous(model.state_dict())))
    return p


def save_ground_truth(images: torch.Tensor, labels: torch.Tensor | Sequence[int], path: str | Path) -> Path:
    """The client's batch (`images` N x C x H x W in [0, 1], `labels` N) as safetensors."""
    images, labels_t = _batch(images, labels)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(_save_safetensors({"images": images.contiguous(), "labels": labels_t.contiguous()}))
    return p


def normalize(images: torch.Tensor, normalization: str | Mapping[str, Sequence[float]]) -> torch.Tensor:
    """What the client feeds its model: (images - mean) / std per channel, as declared."""
    if isinstance(normalization, str):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}; valid: {', '.join(NORMALIZATIONS)}")
        mean, std = NORMALIZATIONS[normalization]
    else:
        mean, std = tuple(normalization["mean"]), tuple(normalization["std"])
    c = images.shape[1]
    if len(mean) != c:  # one channel: the mean of the statistics, as the server does
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def client_update(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    kind: UpdateKind = "gradient",
    normalization: str | Mapping[str, Sequence[float]] = "cifar10",
    **training: Any,
) -> dict[str, torch.Tensor]:
    """The update a client of `model` shares after training on the batch (images in [0, 1],
    normalised here as declared). Uses gradleak's own FL client (service.fl) when the server
    package is installed; without it, only a FedSGD gradient (plain torch) is available."""
    x = normalize(images.to(_device(model)), normalization)
    y = labels.to(x.device)
    work = copy.deepcopy(model)
    try:
        from service.fl import simulate_client
        from service.specs import ClientTraining
    except ImportError:
        if kind != "gradient" or training.get("protocol", "fedsgd") != "fedsgd":
            raise ImportError(
                "a FedAvg delta or weights update is simulated by gradleak's FL client code: install the "
                "server package `gradleak`"
            ) from None
        return _plain_gradient(work, x, y, training.get("bn_mode") or "train")
    return dict(simulate_client(work, x, y, ClientTraining(**training), kind))


def _plain_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, bn_mode: str
) -> dict[str, torch.Tensor]:
    model.train()
    if bn_mode == "eval":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {
        n: (torch.zeros_like(p) if g is None else g).detach() for (n, p), g in zip(named, grads, strict=True)
    }


def _batch(images: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("images must be a tensor of shape (N, C, H, W) with values in [0, 1]")
    if bool(images.min() < 0) or bool(images.max() > 1):
        raise ValueError("images must lie in [0, 1] (the client's raw pixels; gradleak normalises them)")
    labels_t = torch.as_tensor(labels, dtype=torch.int64).cpu()
    if labels_t.shape != (images.shape[0],):
        raise ValueError(
            f"one label per image: {images.shape[0]} images, labels of shape {list(labels_t.shape)}"
        )
    return images.detach().float().cpu(), labels_t


def _eval_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
