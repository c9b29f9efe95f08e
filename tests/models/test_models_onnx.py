"""The user's own model as ONNX: conversion, naming, the second-order gradient, refusals.

Every operator on the allowlist appears in one of the probe models below, exported by the SDK's
own exporter; each probe is checked against its torch original to the second order (the
gradient of the parameter gradients with respect to the images), which is what the attacks take.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import fx, nn

from gradleak_client.prepare import export_onnx
from service.errors import ArtifactError, SpecError, UnsupportedOpsError
from service.models import build_model
from service.models.onnx import SUPPORTED_OPS, check_second_order, onnx_module, parse_onnx
from service.specs import DataSpec, ModelSpec

SHAPE = (3, 8, 8)
DATA = DataSpec(shape=SHAPE, num_classes=5)


class ConvStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 10, 3)
        self.fc = nn.Linear(10 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.conv1(x))), 2)
        x = F.pad(x, (1, 1, 1, 1))
        x = F.avg_pool2d(F.leaky_relu(self.conv2(x), 0.1), 2)
        return self.fc(F.elu(x).flatten(1))


class Smooth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([F.softplus(torch.tanh(self.conv(x))), F.selu(torch.sigmoid(self.conv(x)))], 1)
        return self.head(self.norm(F.gelu(F.adaptive_avg_pool2d(y, 1).flatten(1))))


class Arith(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(48, 5) * 0.3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x[:, :, 2:6, 2:6].reshape(x.size(0), -1) @ self.w
        h = (h - h.mean(1, keepdim=True)) / torch.sqrt((h**2).mean(1, keepdim=True) + 1e-3)
        t = (-h * self.scale + torch.exp(-h.abs())).unsqueeze(2).transpose(1, 2).squeeze(1)
        return torch.log_softmax(t, 1) + torch.softmax(t, 1)


PROBES = {"conv_stack": ConvStack, "smooth": Smooth, "arith": Arith}


def exported(model: nn.Module, tmp_path: Path, name: str = "model") -> bytes:
    return export_onnx(model, tmp_path / f"{name}.onnx", SHAPE).read_bytes()


def second_order(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> tuple:
    """Logits, parameter gradients, and d/dx of <gradients, v> for a fixed random v."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(F.cross_entropy(out, y), list(model.parameters()), create_graph=True)
    gen = torch.Generator().manual_seed(seed)
    dot = sum((g * torch.randn(g.shape, generator=gen)).sum() for g in grads)
    (dx,) = torch.autograd.grad(dot, x)
    return out.detach(), dict(zip(names, [g.detach() for g in grads], strict=True)), dx


@pytest.mark.parametrize("name", sorted(PROBES))
def test_converted_probe_matches_torch_to_the_second_order(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = PROBES[name]()
    converted = onnx_module(exported(original, tmp_path), DATA)
    assert sorted(converted.state_dict()) == sorted(original.state_dict())
    x, y = torch.rand(3, *SHAPE), torch.tensor([0, 3, 4])
    out_t, grads_t, dx_t = second_order(original.train(), x, y)
    out_c, grads_c, dx_c = second_order(converted.train(), x, y)
    torch.testing.assert_close(out_c, out_t, rtol=1e-4, atol=1e-5)
    assert grads_c.keys() == grads_t.keys()
    for key in grads_t:
        torch.testing.assert_close(grads_c[key], grads_t[key], rtol=1e-4, atol=1e-5)
    assert dx_t.abs().sum() > 0
    torch.testing.assert_close(dx_c, dx_t, rtol=1e-3, atol=1e-5)
    check_second_order(converted, DATA)


def test_every_supported_operator_is_probed(tmp_path: Path) -> None:
    seen: set[str] = set()
    for name, cls in PROBES.items():
        torch.manual_seed(0)
        seen |= {n.op_type for n in onnx.load_model_from_string(exported(cls(), tmp_path, name)).graph.node}
    assert seen >= SUPPORTED_OPS, sorted(SUPPORTED_OPS - seen)


def test_two_convolutions_of_different_widths_keep_their_names(tmp_path: Path) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1),
        nn.Sigmoid(),
        nn.Conv2d(5, 11, 3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(11 * 4 * 4, 5),
    )
    converted = onnx_module(exported(model, tmp_path), DATA)
    assert [(n, tuple(p.shape)) for n, p in converted.named_parameters()] == [
        (n, tuple(p.shape)) for n, p in model.named_parameters()
    ]
    # the update names what build_model builds, for an ONNX model as for a registered one
    built = build_model(ModelSpec(arch="onnx", source="m"), DATA, resolve=lambda _: exported(model, tmp_path))
    assert list(built.state_dict()) == list(model.state_dict())


def test_an_unsupported_operator_is_named(tmp_path: Path) -> None:
    class Rounding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3 * 8 * 8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.floor(x * 4).flatten(1))

    with pytest.raises(UnsupportedOpsError) as e:
        onnx_module(exported(Rounding(), tmp_path), DATA)
    assert e.value.ops == ["Floor"] and "Floor (x1)" in str(e.value)


def graph_model(nodes: list, initializers: list, *, domain: str = "", opset: int = 17) -> bytes:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])],
        initializers,
    )
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def flatten_gemm(trans_b: int) -> list:
    return [
        helper.make_node("Flatten", ["images"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=trans_b),
    ]


def weights(shape: tuple[int, ...], name: str) -> TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT, shape, torch.rand(shape).flatten().tolist())


def test_a_hand_built_graph_converts_and_a_transposed_gemm_is_refused() -> None:
    ok = graph_model(flatten_gemm(1), [weights((5, 192), "fc.weight"), weights((5,), "fc.bias")])
    model = onnx_module(ok, DATA)
    assert [n for n, _ in model.named_parameters()] == ["fc.weight", "fc.bias"]
    transposed = graph_model(flatten_gemm(0), [weights((192, 5), "fc.weight"), weights((5,), "fc.bias")])
    with pytest.raises(ArtifactError, match=r"transforms initializer 'fc\.weight'"):
        onnx_module(transposed, DATA)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x80\x04\x95 not onnx, a pickle", "not an ONNX model"),
        (b"", "not an ONNX model"),
    ],
)
def test_what_is_not_onnx_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(ArtifactError, match=message):
        parse_onnx(data, max_nodes=100)


def test_custom_domains_external_data_and_size_limits_are_refused() -> None:
    custom = graph_model(
        [helper.make_node("Evil", ["images"], ["logits"], domain="com.example")], [], domain="com.example"
    )
    with pytest.raises(ArtifactError, match="domains other than the default"):
        parse_onnx(custom, max_nodes=100)
    external = weights((5, 192), "fc.weight")
    external.data_location = TensorProto.EXTERNAL
    external.ClearField("float_data")
    external.external_data.add(key="location", value="/etc/passwd")
    with pytest.raises(ArtifactError, match="external files"):
        parse_onnx(graph_model(flatten_gemm(1), [external, weights((5,), "fc.bias")]), max_nodes=100)
    ok = graph_model(flatten_gemm(1), [weights((5, 192), "fc.weight"), weights((5,), "fc.bias")])
    with pytest.raises(ArtifactError, match="limit is 1"):
        parse_onnx(ok, max_nodes=1)


def test_a_graph_for_a_fixed_batch_of_one_is_refused(tmp_path: Path) -> None:
    class FixedBatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(192, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.reshape(1, 192))

    path = tmp_path / "fixed.onnx"
    torch.onnx.export(FixedBatch(), (torch.rand(1, *SHAPE),), path, dynamo=False, opset_version=17)
    with pytest.raises(SpecError, match="batch of 2 images"):
        onnx_module(path.read_bytes(), DATA)


def test_the_second_order_check_names_where_the_gradient_stops() -> None:
    class Stop(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.detach()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stop = Stop()
            self.fc = nn.Linear(192, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.stop(x).flatten(1))

    with pytest.raises(UnsupportedOpsError, match=r"stops at call_method \(detach\)"):
        check_second_order(fx.symbolic_trace(Net()), DATA)
