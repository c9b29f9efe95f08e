"""The user's own model as ONNX: a protobuf graph, converted to a differentiable torch module.

An ONNX file is data, not code: it is parsed as a protobuf (never unpickled), checked, and
converted by onnx2torch into a torch.fx module of ordinary torch operations. Nothing but the
graph runs: external data files, model-local functions, custom operator domains and subgraphs
(If, Loop, Scan) are refused, and every operator must be on `SUPPORTED_OPS`, the operators whose
converted form carries the second-order gradient gradient matching needs (an attack
differentiates the parameter gradients with respect to the images; tests check each one
against the torch original).

Weight naming: the converted module's parameters and buffers carry the graph's initializer
names, so the update's tensors are named like the ONNX initializers. `torch.onnx.export` names
the initializers after the model's `state_dict`, so a client's gradients keyed by its own
`named_parameters()` match as they are. A layer that onnx2torch turns into a torch module (Conv,
Gemm, BatchNormalization, LayerNormalization) keeps its tensors under that module's attribute
names, so its initializers must be named `<layer>.<attribute>` (`conv1.weight`, `conv1.bias`,
`bn.running_mean`), as torch's exporter writes them; other initializers may have any name.
Every floating-point initializer is a parameter (batch-norm running statistics are buffers);
integer initializers (shapes) are constants of the graph.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from service.errors import ArtifactError, UnsupportedOpsError
from service.models.base import check_model_output
from service.specs import DataSpec

# Operators of the default domain whose onnx2torch conversion keeps a second-order gradient
# (tests/models/test_models_onnx.py checks every one against the torch original).
SUPPORTED_OPS = frozenset(
    {
        # layers with weights
        "Conv",
        "Gemm",
        "MatMul",
        "BatchNormalization",
        "LayerNormalization",
        # activations
        "Relu",
        "LeakyRelu",
        "Sigmoid",
        "Tanh",
        "Elu",
        "Selu",
        "Softplus",
        "Erf",
        "Softmax",
        "LogSoftmax",
        # arithmetic
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Neg",
        "Pow",
        "Sqrt",
        "Exp",
        "Abs",
        "ReduceMean",
        # pooling
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        # shapes and plumbing
        "Flatten",
        "Reshape",
        "Transpose",
        "Concat",
        "Shape",
        "Gather",
        "Unsqueeze",
        "Squeeze",
        "Slice",
        "Pad",
        "Constant",
        "ConstantOfShape",
        "Cast",
        "Identity",
    }
)
_DEFAULT_DOMAINS = ("", "ai.onnx")
# onnx.AttributeProto types that carry subgraphs: GRAPH, GRAPHS, TYPE_PROTO(S) are never needed
_SUBGRAPH_ATTRIBUTES = frozenset({5, 10})
# An initializer stored outside the file (TensorProto.EXTERNAL): reading it would open a path
_EXTERNAL = 1
# torch module attributes that onnx2torch fills from a node's initializer inputs, in input order
_ABSORBED = ("weight", "bias", "running_mean", "running_var")


def parse_onnx(data: bytes, *, max_nodes: int) -> Any:
    """Parse and check untrusted ONNX bytes; return the ModelProto.

    Raises ArtifactError for a file that is not a usable ONNX model and UnsupportedOpsError
    (listing them) for operators outside SUPPORTED_OPS.
    """
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load_model_from_string(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ArtifactError(f"not an ONNX model: the protobuf does not parse ({type(e).__name__})") from None
    graph = proto.graph
    if not graph.node:
        raise ArtifactError("not an ONNX model: the graph has no nodes")
    if len(graph.node) > max_nodes:
        raise ArtifactError(f"the ONNX graph has {len(graph.node)} nodes; this server's limit is {max_nodes}")
    if proto.functions:
        raise ArtifactError("ONNX model-local functions are not supported; export without custom functions")
    domains = sorted({o.domain for o in proto.opset_import} - set(_DEFAULT_DOMAINS))
    if domains:
        raise ArtifactError(
            f"ONNX operator domains other than the default are not supported: {', '.join(domains)}"
        )
    external = [t.name for t in graph.initializer if t.data_location == _EXTERNAL]
    if external:
        raise ArtifactError(
            f"initializers stored in external files are not supported ({', '.join(external[:5])}): "
            "export the weights inside the .onnx file"
        )
    if graph.sparse_initializer:
        raise ArtifactError("sparse initializers are not supported")

    from onnx2torch.node_converters import get_converter

    opset = max((o.version for o in proto.opset_import if o.domain in _DEFAULT_DOMAINS), default=0)
    unsupported: Counter[str] = Counter()
    for node in graph.node:
        name = node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"
        if name not in SUPPORTED_OPS or any(a.type in _SUBGRAPH_ATTRIBUTES for a in node.attribute):
            unsupported[name] += 1
            continue
        try:
            get_converter(operation_type=node.op_type, version=opset)
        except NotImplementedError:
            unsupported[f"{name} (opset {opset}; export with opset_version=17)"] += 1
    if unsupported:
        listed = sorted(unsupported)
        raise UnsupportedOpsError(
            "the ONNX graph uses operators gradleak cannot attack through (no conversion with a "
            f"second-order gradient): {', '.join(f'{op} (x{unsupported[op]})' for op in listed)}; "
            f"supported: {', '.join(sorted(SUPPORTED_OPS))}",
            listed,
        )
    inputs = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ArtifactError(
            f"the ONNX graph must take one input (the images) and give one output (the logits); "
            f"it has {len(inputs)} inputs and {len(graph.output)} outputs"
        )
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise ArtifactError(
            f"the ONNX model does not pass onnx's checker: {str(e).splitlines()[0]}"
        ) from None
    return proto


def onnx_module(data: bytes, spec_data: DataSpec, *, max_nodes: int = 10_000) -> nn.Module:
    """The torch module of an ONNX model, its tensors named like the graph's initializers, in
    training mode and float32, checked to map images of `spec_data.shape` to its class count."""
    import onnx2torch
    from onnx import numpy_helper

    proto = _unalias(parse_onnx(data, max_nodes=max_nodes))
    initializers = {
        t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in proto.graph.initializer
    }
    try:
        module = onnx2torch.convert(proto, attach_onnx_mapping=True)
    except (NotImplementedError, KeyError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"the ONNX model cannot be converted: {e}") from None
    model = _rename(module, proto, initializers).float()
    check_model_output(
        model,
        spec_data,
        "the ONNX model",
        "export it with a dynamic batch axis (dynamic_axes={'images': {0: 'batch'}, 'logits': {0: 'batch'}})",
    )
    return model.train()


# ---------------------------------------------------------------------------------------------
# naming: the converted tensors move to paths named after their initializers
# ---------------------------------------------------------------------------------------------


def _rename(gm: fx.GraphModule, proto: Any, initializers: dict[str, torch.Tensor]) -> fx.GraphModule:
    """Rebuild `gm` so that every tensor from a floating-point initializer sits at the path of
    that initializer's name: the absorbing layers move to `<layer>` (their tensors then read
    `<layer>.weight`, ...), and tensors the graph reads directly become parameters at their name."""
    floats = {n for n, t in initializers.items() if t.is_floating_point()}
    statistics = {n.input[i] for n in proto.graph.node if n.op_type == "BatchNormalization" for i in (3, 4)}
    readers = _initializer_names(gm)
    layers = {n: gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    container = getattr(gm, "initializers", nn.Module())  # absent when no initializer is read directly
    root = nn.Module()
    placed: dict[str, str] = {}  # initializer name -> where it ended up
    problems: list[str] = []

    # Layers that absorbed initializers (Conv, Linear, BatchNorm, LayerNorm).
    onnx_nodes = _onnx_nodes_by_module(proto)
    for node, layer in layers.items():
        mapped_inputs = set(_mapping(layer))
        absorbed = [i for i in onnx_nodes[node.target].input if i and i not in mapped_inputs and i in floats]
        if not absorbed:
            continue
        attrs = [a for a in _ABSORBED if isinstance(getattr(layer, a, None), torch.Tensor)]
        prefix = _common_prefix(absorbed, attrs)
        if prefix is None:
            problems.append(
                f"{onnx_nodes[node.target].op_type} node {node.target!r} takes initializers "
                f"{', '.join(absorbed)}: a converted layer's initializers must be named "
                f"<layer>.{{{','.join(attrs)}}} as torch.onnx.export names them"
            )
            continue
        for name, attr in zip(absorbed, attrs, strict=True):
            if not torch.equal(
                getattr(layer, attr).detach().to(initializers[name].dtype), initializers[name]
            ):
                problems.append(
                    f"{onnx_nodes[node.target].op_type} node {node.target!r} transforms initializer "
                    f"{name!r} on conversion (e.g. Gemm with transB=0 or alpha != 1); export linear "
                    "layers as torch's nn.Linear does"
                )
        if prefix in placed.values() or _taken(root, prefix):
            problems.append(f"two layers claim the name {prefix!r}")
            continue
        _put_module(root, prefix, layer)
        node.target = prefix
        placed.update({name: f"{prefix}.{attr}" for name, attr in zip(absorbed, attrs, strict=True)})

    # Tensors the graph reads directly (get_attr of onnx2torch's initializer container).
    for node in [n for n in gm.graph.nodes if n.op == "get_attr"]:
        name = readers.get(node.name)
        if name is None:
            continue
        tensor = container.get_buffer(node.target.rsplit(".", 1)[1])
        if name not in floats:
            # a constant of the graph (a shape): not state, kept out of the state dict
            holder = _holder(root, f"_constants.{node.name}")
            holder.register_buffer("value", tensor, persistent=False)
            node.target = f"_constants.{node.name}.value"
            continue
        if name not in placed:
            if _taken(root, name):
                problems.append(f"initializer {name!r} collides with a layer of the same name")
                continue
            parent, _, attr = name.rpartition(".")
            if name in statistics:
                _holder(root, parent).register_buffer(attr, tensor.clone().float())
            else:
                _holder(root, parent).register_parameter(attr, nn.Parameter(tensor.clone().float()))
            placed[name] = name
        elif placed[name] != name:
            problems.append(f"initializer {name!r} is both a layer's {placed[name]} and read directly")
            continue
        node.target = name

    # Modules without absorbed tensors (activations, reshapes) keep onnx2torch's names.
    moved = {p.rsplit(".", 1)[0] for p in placed.values()}
    for node, layer in layers.items():
        if node.target in moved:
            continue
        target = f"_ops.{node.target.replace('.', '_')}"
        _put_module(root, target, layer)
        node.target = target

    unused = sorted(floats - set(placed))
    if unused:
        problems.append(f"initializers no layer uses: {', '.join(unused[:10])}")
    if problems:
        raise ArtifactError(
            "the ONNX model's weights cannot be named for updates: " + "; ".join(problems[:10])
        )
    # Constants of the graph (Constant nodes, shapes) are not state: only initializers are, and the
    # layers' own buffers (a batch norm's num_batches_tracked, as in the torch original).
    for group in ("_ops", "_constants"):
        if group in root._modules:
            for module in root.get_submodule(group).modules():
                module._non_persistent_buffers_set.update(module._buffers)
    renamed = fx.GraphModule(root, gm.graph, class_name="OnnxModel")
    renamed.graph.lint()
    for parameter in renamed.parameters():
        parameter.requires_grad_(True)
    return renamed


def _unalias(proto: Any) -> Any:
    """torch's exporter stores equal initializers once and names the others with Identity nodes
    (a fresh batch norm's running mean is its bias, zeros): give each alias its own initializer,
    so that every tensor of the torch model is an initializer under its own name."""
    from onnx import numpy_helper

    graph = proto.graph
    tensors = {t.name: t for t in graph.initializer}
    aliases = [n for n in graph.node if n.op_type == "Identity" and n.input and n.input[0] in tensors]
    for node in aliases:
        copy = numpy_helper.from_array(numpy_helper.to_array(tensors[node.input[0]]), node.output[0])
        graph.initializer.append(copy)
        graph.node.remove(node)
    return proto


def _onnx_nodes_by_module(proto: Any) -> dict[str, Any]:
    """onnx2torch names a module after its node (`name`, `name_1` for repeats, the op type when
    unnamed); map the converted modules back to the ONNX nodes they came from."""
    from onnx2torch.onnx_graph import OnnxGraph

    graph = OnnxGraph(proto.graph)
    return {name: node._proto for name, node in graph.nodes.items()}


def _initializer_names(gm: fx.GraphModule) -> dict[str, str]:
    """get_attr node name -> the initializer it reads, from the ONNX inputs of its readers."""
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        inputs = _mapping(gm.get_submodule(node.target))
        given = [i for i in inputs if i]
        values = [*node.args, *node.kwargs.values()]
        for arg, name in zip(values, given, strict=False):
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                out[arg.name] = name
    return out


def _mapping(layer: Any) -> list[str]:
    """The ONNX values a converted module takes as inputs (onnx2torch's attached mapping)."""
    return list(layer.onnx_mapping.inputs)


def _common_prefix(names: list[str], attrs: list[str]) -> str | None:
    if len(names) != len(attrs):
        return None
    prefixes = set()
    for name, attr in zip(names, attrs, strict=True):
        prefix, dot, last = name.rpartition(".")
        if not dot or last != attr:
            return None
        prefixes.add(prefix)
    return prefixes.pop() if len(prefixes) == 1 else None


def _holder(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in [p for p in path.split(".") if p]:
        if part not in module._modules:
            if hasattr(module, part):
                raise ArtifactError(f"the ONNX model's tensor names collide at {path!r}")
            module.add_module(part, nn.Module())
        module = module._modules[part]  # type: ignore[assignment]
    return module


def _taken(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        parent, _, attr = path.rpartition(".")
        try:
            return hasattr(root.get_submodule(parent), attr)
        except AttributeError:
            return False


def _put_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    if not name:
        raise ArtifactError(f"the ONNX model has a layer with an empty name ({path!r})")
    _holder(root, parent).add_module(name, module)


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------


def check_second_order(model: nn.Module, data: DataSpec) -> None:
    """Gradient matching differentiates the parameter gradients with respect to the images: check
    that every parameter gets a gradient and that the gradient of the gradients reaches the input.
    On failure, name the first operator where the graph loses its gradient."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ArtifactError("the ONNX model has no floating-point weights to take gradients of")
    x = torch.rand(2, *data.shape, requires_grad=True)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1 % data.num_classes]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    unused = [n for n, g in zip(names, grads, strict=True) if g is None]
    if unused:
        raise ArtifactError(f"the ONNX model's output does not depend on: {', '.join(unused[:10])}")
    second = torch.stack([(g * torch.randn_like(g)).sum() for g in grads if g is not None]).sum()
    reaches = second.requires_grad
    if reaches:
        (dx,) = torch.autograd.grad(second, x, allow_unused=True)
        reaches = dx is not None and bool(torch.isfinite(dx).all()) and bool(dx.abs().sum() > 0)
    if not reaches:
        culprit = _first_gradient_break(model, x)
        raise UnsupportedOpsError(
            "the second-order gradient the attacks need does not reach the images through the "
            f"converted model{f'; it stops at {culprit}' if culprit else ''}",
            [culprit.split(" ", 1)[0]] if culprit else [],
        )


def _first_gradient_break(model: nn.Module, x: torch.Tensor) -> str | None:
    """The first module of the graph whose output loses the dependence on the input."""
    if not isinstance(model, fx.GraphModule):
        return None
    found: list[str] = []

    class Probe(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if found or n.op not in ("call_module", "call_function", "call_method"):
                return out
            args = [self.env[a] for a in n.all_input_nodes if a in self.env]
            inputs_grad = any(isinstance(t, torch.Tensor) and t.requires_grad for t in _flat(args))
            lost = isinstance(out, torch.Tensor) and out.is_floating_point() and not out.requires_grad
            if inputs_grad and lost:
                target = n.target if isinstance(n.target, str) else n.target.__name__
                what = type(model.get_submodule(target)).__name__ if n.op == "call_module" else n.op
                found.append(f"{what} ({target})")
            return out

    Probe(model).run(x)
    return found[0] if found else None


def _flat(values: Iterable[Any]) -> Iterable[Any]:
    for v in values:
        if isinstance(v, list | tuple):
            yield from _flat(v)
        else:
            yield v
