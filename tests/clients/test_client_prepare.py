"""gradleak_client.prepare: the audit's inputs from a torch model and a batch, and the CI sample
that uses it (a client normalises its images as the policy declares)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from gradleak_client import prepare
from service.data import normalize
from service.fl import fedsgd_gradient
from service.models import build_model
from service.specs import NORMALIZATIONS, DataSpec, ModelSpec

CI_SAMPLE = Path(__file__).parents[2] / "clients" / "ci" / "make_sample_update.py"


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.Flatten(),
        nn.Linear(6 * 7 * 7, 10),
    )


def test_the_normalisations_are_the_servers() -> None:
    assert {k: (n.mean, n.std) for k, n in NORMALIZATIONS.items()} == prepare.NORMALIZATIONS


def test_write_inputs_makes_the_three_files_of_a_normalised_client(tmp_path: Path) -> None:
    model, images, labels = small_cnn(), torch.rand(2, 3, 16, 16), [1, 7]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    files = prepare.write_inputs(model, images, labels, tmp_path, normalization="cifar10")
    assert files.model.name == "model.onnx" and files.arch is None and files.num_classes == 10
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # left untouched
    update = load_file(files.update)
    x = normalize(images, DataSpec(normalization="cifar10").resolved_normalization())
    expected = fedsgd_gradient(model, x, torch.tensor(labels))
    assert update.keys() == expected.keys() == dict(model.named_parameters()).keys()
    for key in expected:
        torch.testing.assert_close(update[key], expected[key])
    truth = load_file(files.ground_truth)
    assert torch.equal(truth["images"], images) and truth["labels"].tolist() == labels
    assert files.audit_kwargs()["kind"] == "gradient" and "arch" not in files.audit_kwargs()


def test_without_the_server_package_a_gradient_is_computed_in_plain_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, images, labels = small_cnn(), torch.rand(2, 3, 16, 16), torch.tensor([1, 7])
    with_server = prepare.client_update(model, images, labels, normalization="imagenet")
    monkeypatch.setitem(sys.modules, "service.fl", None)  # an ImportError on import
    plain = prepare.client_update(model, images, labels, normalization="imagenet")
    for key in with_server:
        torch.testing.assert_close(plain[key], with_server[key])
    with pytest.raises(ImportError, match="server package"):
        prepare.client_update(model, images, labels, kind="delta", protocol="fedavg", lr=0.1)


def test_a_fedavg_delta_is_the_clients_local_training(tmp_path: Path) -> None:
    files = prepare.write_inputs(
        small_cnn(),
        torch.rand(4, 3, 16, 16),
        [0, 1, 2, 3],
        tmp_path,
        kind="delta",
        lr=0.1,
        local_epochs=2,
        batch_size=2,
    )
    assert files.client == {"protocol": "fedavg", "lr": 0.1, "local_epochs": 2, "batch_size": 2}
    delta = load_file(files.update)
    assert any(float(v.abs().max()) > 0 for v in delta.values())


def test_bad_batches_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        prepare.write_inputs(small_cnn(), torch.rand(1, 3, 16, 16) * 255, [0], tmp_path)
    with pytest.raises(ValueError, match="one label per image"):
        prepare.write_inputs(small_cnn(), torch.rand(2, 3, 16, 16), [0], tmp_path)
    with pytest.raises(ValueError, match="give arch"):
        prepare.write_inputs(small_cnn(), torch.rand(1, 3, 16, 16), [0], tmp_path, format="safetensors")


def test_the_ci_sample_normalises_its_client_as_the_policy_declares(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_sample_update", CI_SAMPLE)
    assert spec is not None and spec.loader is not None
    sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample)
    out = tmp_path / "inputs"
    argv = ["--arch", "lenet", "--image-shape", "3,16,16", "--photo-patches", "2", "--out", str(out)]
    assert sample.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "batch.safetensors",
        "model.safetensors",
        "update.safetensors",
    ]
    batch, update = load_file(out / "batch.safetensors"), load_file(out / "update.safetensors")
    model = build_model(ModelSpec(arch="lenet"), DataSpec(shape=(3, 16, 16)))
    model.load_state_dict(load_file(out / "model.safetensors"))
    norm = DataSpec(normalization="cifar10").resolved_normalization()
    normalised = fedsgd_gradient(model, normalize(batch["images"], norm), batch["labels"])
    raw = fedsgd_gradient(model, batch["images"], batch["labels"])
    for key in normalised:
        torch.testing.assert_close(update[key], normalised[key])
    assert not all(torch.allclose(update[k], raw[k]) for k in raw)
