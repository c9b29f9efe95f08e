"""The architecture registry: every model builds, runs and trains; knobs are checked; init is seeded."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from service.errors import SpecError, UnknownNameError
from service.models import MODELS, build_model, catalog
from service.specs import DataSpec, ModelSpec

ARCHS = [
    "convnet",
    "densenet121",
    "googlenet",
    "igconvnet",
    "inception_v3",
    "lenet",
    "mlp",
    "resnet152",
    "resnet18",
    "resnet34",
    "resnet50",
    "vgg11",
    "vgg16",
    "vgg19",
]


def side(arch: str) -> int:
    return max(32, MODELS.get(arch).min_size)


def build(arch: str, channels: int = 3, num_classes: int = 10, seed: int = 0, **knobs: object) -> nn.Module:
    s = side(arch)
    spec = ModelSpec(arch=arch, knobs=knobs, init_seed=seed)  # type: ignore[arg-type]
    return build_model(spec, DataSpec(shape=(channels, s, s), num_classes=num_classes))


def count(model: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_registry_holds_the_documented_architectures() -> None:
    assert MODELS.names() == ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_and_backward_in_train_mode(arch: str) -> None:
    model = build(arch, num_classes=7)
    s = side(arch)
    x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(1))
    out = model(x)
    assert out.shape == (2, 7)
    nn.functional.cross_entropy(out, torch.tensor([0, 6])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{arch}: no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"{arch}: non-finite gradient for {name}"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters() if p.grad is not None)


# One per builder code path: resnet34/50/152 and vgg16/19 adapt their stem like resnet18 and vgg11.
ONE_PER_BUILDER = [
    "convnet", "densenet121", "googlenet", "igconvnet", "inception_v3", "lenet", "mlp", "resnet18", "vgg11"
]  # fmt: skip


@pytest.mark.parametrize("arch", ONE_PER_BUILDER)
def test_one_channel_eval_mode(arch: str) -> None:
    model = build(arch, channels=1, num_classes=3).eval()
    s = side(arch)
    with torch.no_grad():
        out = model(torch.randn(1, 1, s, s))
    assert out.shape == (1, 3)
    assert torch.isfinite(out).all()


# Seeding wraps every builder the same way; these cover each initialisation scheme (inception_v3
# initialises like googlenet, with a different std).
@pytest.mark.parametrize(
    "arch", ["convnet", "densenet121", "googlenet", "lenet", "mlp", "resnet18", "resnet50", "vgg11"]
)
def test_initialisation_depends_on_the_seed_alone(arch: str) -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build(arch, seed=7).state_dict()
    assert torch.equal(torch.get_rng_state(), before), "building must not consume the global RNG"
    torch.manual_seed(456)
    b = build(arch, seed=7).state_dict()
    c = build(arch, seed=8).state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_rectangular_images_and_min_size() -> None:
    model = build_model(ModelSpec(arch="lenet"), DataSpec(shape=(3, 16, 40)))
    assert model(torch.randn(2, 3, 16, 40)).shape == (2, 10)
    with pytest.raises(
        SpecError, match=r"inception_v3 needs images of at least 75x75; data.shape is 3x32x32"
    ):
        build_model(ModelSpec(arch="inception_v3"), DataSpec(shape=(3, 32, 32)))
    with pytest.raises(SpecError, match="vgg11 needs images of at least 32x32"):
        build_model(ModelSpec(arch="vgg11"), DataSpec(shape=(3, 32, 16)))


@pytest.mark.parametrize(
    ("arch", "size"),
    [("googlenet", 15), ("densenet121", 29), ("vgg11", 32), ("resnet18", 8)],
)
def test_min_size_is_the_smallest_that_runs(arch: str, size: int) -> None:
    assert MODELS.get(arch).min_size == size
    entry = MODELS.get(arch)
    knobs = entry.resolve_knobs(arch, {})
    model = entry.builder(2, (3, size, size), **knobs).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 2)
    if size > 8:
        smaller = entry.builder(2, (3, size - 1, size - 1), **knobs).eval()
        with pytest.raises(RuntimeError), torch.no_grad():
            smaller(torch.randn(1, 3, size - 1, size - 1))


def test_lenet_is_dlgs() -> None:
    model = build("lenet")
    assert [m.in_features for m in linears(model)] == [768]  # 12 channels x 8 x 8, as in the DLG code
    assert sum(isinstance(m, nn.Sigmoid) for m in model.modules()) == 3
    assert all(p.abs().max() <= 0.5 for p in model.parameters())
    relu = build("lenet", activation="relu")
    assert sum(isinstance(m, nn.ReLU) for m in relu.modules()) == 3


def test_mlp_knobs() -> None:
    model = build("mlp", width=32, depth=3, activation="tanh")
    assert [(m.in_features, m.out_features) for m in linears(model)] == [
        (3072, 32),
        (32, 32),
        (32, 32),
        (32, 10),
    ]
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 3
    assert len(linears(build("mlp", depth=0))) == 1


def test_convnet_knobs_shape_the_network() -> None:
    default = build("convnet")
    assert (
        count(default, nn.Conv2d) == 3 and count(default, nn.ReLU) == 3 and count(default, nn.MaxPool2d) == 3
    )
    assert count(default, nn.BatchNorm2d) == 0 and count(default, nn.Dropout) == 0
    assert [m.in_features for m in linears(default)] == [64 * 4 * 4]

    varied = build(
        "convnet",
        width=8,
        depth=2,
        bias=False,
        relu=False,
        dropout=0.25,
        maxpool=False,
        kernel_size=5,
        padding=0,
        batchnorm=True,
    )
    convs = [m for m in varied.modules() if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(5, 5), (5, 5)] and all(c.bias is None for c in convs)
    assert count(varied, nn.ReLU) == 0 and count(varied, nn.MaxPool2d) == 0
    assert count(varied, nn.BatchNorm2d) == 2 and count(varied, nn.Dropout) == 2
    assert [(m.in_features, m.bias) for m in linears(varied)] == [(8 * 24 * 24, None)]
    varied.train()
    out = varied(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_vgg_knobs() -> None:
    small = build("vgg11", batchnorm=True)
    assert count(small, nn.BatchNorm2d) == 8
    assert [m.in_features for m in linears(small)] == [512]
    imagenet = build("vgg11", head="imagenet")
    assert [m.in_features for m in linears(imagenet)] == [25088, 4096, 4096]


# ---------------------------------------------------------------------------------------------
# knob validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "knobs", "message"),
    [
        (
            "convnet",
            {"widht": 3},
            r"unknown knob 'widht' for convnet; valid knobs: width \(int\), depth \(int\)",
        ),
        ("mlp", {"a": 1, "b": 2}, r"unknown knobs 'a', 'b' for mlp; valid knobs: width \(int\)"),
        ("googlenet", {"stem": "cifar"}, "valid knobs: none"),
        (
            "convnet",
            {"width": "64"},
            r"knob 'width' of convnet must be an integer, got '64'; valid knobs: width",
        ),
        ("convnet", {"width": 64.0}, "knob 'width' of convnet must be an integer"),
        ("convnet", {"depth": True}, "knob 'depth' of convnet must be an integer"),
        ("convnet", {"relu": 1}, "knob 'relu' of convnet must be true or false, got 1"),
        ("convnet", {"dropout": "0.5"}, "knob 'dropout' of convnet must be a number"),
        ("convnet", {"dropout": 1.5}, "knob 'dropout' of convnet must be <= 0.99"),
        ("convnet", {"width": 0}, "knob 'width' of convnet must be >= 1, got 0"),
        ("convnet", {"padding": "valid"}, "knob 'padding' of convnet must be one of 'same', got 'valid'"),
        ("convnet", {"padding": -1}, "knob 'padding' of convnet must be >= 0"),
        ("convnet", {"padding": 1.0}, "knob 'padding' of convnet must be an integer or a string"),
        ("convnet", {"kernel_size": 4}, "knob 'kernel_size' of convnet must be odd"),
        ("convnet", {"depth": 6}, "shrinks a 32x32 image to nothing in block 5"),
        ("mlp", {"activation": "swish"}, "must be one of 'relu', 'sigmoid', 'tanh', 'leaky_relu', 'gelu'"),
        ("resnet18", {"stem": "tiny"}, "must be one of 'cifar', 'imagenet'"),
        ("resnet18", {"cut_skips": 3}, "knob 'cut_skips' of resnet18 must be a list of integers"),
        (
            "resnet18",
            {"cut_skips": [0, 8]},
            r"indices \[8\] out of range; resnet18 has 8 residual blocks \(0..7\)",
        ),
        ("resnet152", {"cut_skips": [-1]}, r"resnet152 has 50 residual blocks \(0..49\)"),
        ("resnet50", {"cut_skips": [2, 2]}, "repeated block indices"),
        ("vgg16", {"head": None}, "knob 'head' of vgg16 must be a string, got None"),
    ],
)
def test_bad_knobs_are_refused(arch: str, knobs: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        build(arch, **knobs)


def test_knob_types_are_checked_beyond_the_spec_schema() -> None:
    # ModelSpec admits any JSON scalar or int list; the entry checks the knob's own type.
    with pytest.raises(SpecError, match=r"knob 'stem' of resnet18 must be a string, got \[1\]"):
        MODELS.get("resnet18").resolve_knobs("resnet18", {"stem": [1]})
    with pytest.raises(
        SpecError, match=r"knob 'cut_skips' of resnet18 must be a list of integers, got \[0\.5\]"
    ):
        MODELS.get("resnet18").resolve_knobs("resnet18", {"cut_skips": [0.5]})


def test_numbers_are_accepted_where_floats_are_expected() -> None:
    model = build("convnet", dropout=0)
    assert count(model, nn.Dropout) == 0


def test_unknown_architecture_lists_the_valid_ones() -> None:
    with pytest.raises(
        UnknownNameError, match="unknown architecture 'resnet19'; valid: convnet, densenet121"
    ):
        build_model(ModelSpec(arch="resnet19"), DataSpec())


def test_init_seed_out_of_range() -> None:
    with pytest.raises(SpecError, match="init_seed"):
        build_model(ModelSpec(arch="mlp", init_seed=2**64), DataSpec())


# ---------------------------------------------------------------------------------------------
# catalog
# ---------------------------------------------------------------------------------------------


def test_catalog_describes_every_architecture() -> None:
    entries = json.loads(json.dumps(catalog()))
    assert [e["name"] for e in entries] == ARCHS
    by_name = {e["name"]: e for e in entries}
    assert by_name["inception_v3"]["min_size"] == 75
    assert by_name["googlenet"]["knobs"] == []
    assert [k["name"] for k in by_name["densenet121"]["knobs"]] == ["connections", "growth_rate"]
    convnet = {k["name"]: k for k in by_name["convnet"]["knobs"]}
    assert convnet["width"] == {
        "name": "width",
        "type": "int",
        "default": 64,
        "description": "channels of every convolution",
        "minimum": 1,
        "maximum": 4096,
    }
    assert convnet["padding"]["choices"] == ["same"]
    resnet = {k["name"]: k for k in by_name["resnet18"]["knobs"]}
    assert resnet["cut_skips"]["default"] == [] and resnet["stem"]["choices"] == ["cifar", "imagenet"]
    for entry in entries:
        assert entry["description"]
        arch = entry["name"]
        defaults = {k["name"]: k["default"] for k in entry["knobs"]}
        assert MODELS.get(arch).resolve_knobs(arch, defaults) == defaults


def test_igconvnet_is_the_inverting_gradients_convnet() -> None:
    """Inverting Gradients' ConvNet at width 64: 8 conv/BN/ReLU blocks, widths 64-128-128-256x5,
    3x3 max pools after the 6th and 8th blocks, a 2304 -> 10 head (2.9M parameters at 32x32)."""
    model = build("igconvnet")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [64, 128, 128, 256, 256, 256, 256, 256]
    assert all(m.kernel_size == (3, 3) and m.padding == (1, 1) for m in convs)
    assert count(model, nn.BatchNorm2d) == 8 and count(model, nn.MaxPool2d) == 2
    assert linears(model)[0].in_features == 256 * 3 * 3
    assert sum(p.numel() for p in model.parameters()) == 2_904_970
    with pytest.raises(SpecError, match="at least 9x9"):
        build_model(ModelSpec(arch="igconvnet"), DataSpec(shape=(3, 8, 8)))
