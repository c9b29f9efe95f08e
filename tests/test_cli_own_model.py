"""`gradleak attack --model`: the user's own model as an ONNX file or an import path, and
`gradleak catalog ARCH`: the weight-naming contract of a registered architecture."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gradleak_client import prepare
from service.cli import app

runner = CliRunner()
CNN = """
from torch import nn


def make():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Sigmoid(), nn.Conv2d(4, 7, 3, stride=2, padding=1), nn.Sigmoid(),
        nn.Flatten(), nn.Linear(7 * 8 * 8, 10),
    )


NOT_A_MODEL = 3
"""


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / "mycnn_for_cli.py").write_text(textwrap.dedent(CNN))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mycnn_for_cli:make"
    sys.modules.pop("mycnn_for_cli", None)


@pytest.fixture
def inputs(tmp_path: Path, user_package: str) -> prepare.Inputs:
    from service.models.local import import_factory

    torch.manual_seed(0)
    model = import_factory(user_package)
    prepare.save_weights(model, tmp_path / "in" / "weights.safetensors")
    return prepare.write_inputs(model, torch.rand(1, 3, 16, 16), [4], tmp_path / "in")


def attack(model: str, inputs: prepare.Inputs, out: Path, *extra: str) -> dict:
    r = runner.invoke(
        app,
        ["attack", "--model", model, *extra, "--update", str(inputs.update),
         "--ground-truth", str(inputs.ground_truth), "--size", "16", "--iterations", "20", "--out", str(out),
         "--json"],
        catch_exceptions=False,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_an_onnx_file_and_an_import_path_give_the_same_attack(
    tmp_path: Path, inputs: prepare.Inputs, user_package: str
) -> None:
    from_onnx = attack(str(inputs.model), inputs, tmp_path / "a")
    # the factory makes a fresh module: the weights the server sent come as usual
    weights = str(inputs.model.parent / "weights.safetensors")
    from_module = attack(user_package, inputs, tmp_path / "b", "--weights", weights)
    assert from_onnx["spec"]["model"]["arch"] == "onnx" and from_module["spec"]["model"]["arch"] == "module"
    assert from_module["spec"]["model"]["source"] == user_package
    assert from_onnx["metrics"]["mean"]["psnr"] == pytest.approx(
        from_module["metrics"]["mean"]["psnr"], abs=1e-3
    )


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("mycnn_for_cli:NOT_A_MODEL", "is not callable"),
        ("mycnn_for_cli:missing", "has no 'missing'"),
        ("no_such_package_xyz:make", "cannot import"),
        ("missing.onnx", "file not found"),
    ],
)
def test_a_bad_model_is_one_line(tmp_path: Path, inputs: prepare.Inputs, model: str, message: str) -> None:
    r = runner.invoke(
        app,
        ["attack", "--model", model, "--update", str(inputs.update), "--size", "16", "--out", str(tmp_path)],
    )
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert r.output.count("gradleak: error:") == 1


def test_arch_and_model_together_are_refused(inputs: prepare.Inputs) -> None:
    r = runner.invoke(app, ["attack", "--arch", "lenet", "--model", str(inputs.model), "--update", "u"])
    assert r.exit_code == 2 and "not both" in r.output


def test_catalog_arch_prints_the_weight_naming_contract() -> None:
    r = runner.invoke(app, ["catalog", "convnet", "--knob", "batchnorm=true", "--size", "16"])
    assert r.exit_code == 0, r.output
    assert "running_mean" in r.output and "num_batches_tracked" in r.output and "state_dict names" in r.output
    r = runner.invoke(app, ["catalog", "lenet", "--json"])
    rows = json.loads(r.stdout)["tensors"]
    assert rows[0] == {
        "name": "body.0.weight",
        "shape": [12, 3, 5, 5],
        "dtype": "float",
        "role": "parameter",
        "weights": "required",
        "gradient": "required",
        "delta": "required",
    }
    r = runner.invoke(app, ["catalog", "nope"])
    assert r.exit_code == 2 and "unknown catalog entry 'nope'" in r.output


class WithBatchNorm(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.c2 = torch.nn.Conv2d(4, 6, 3, padding=1, stride=2)
        self.fc = torch.nn.Linear(6 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.sigmoid(self.c2(torch.sigmoid(self.bn(self.c1(x)))))
        return self.fc(x.view(x.size(0), -1))


@pytest.mark.parametrize(
    "flags",
    [
        ["--restarts", "2"],  # batched restarts: torch.func over the converted graph
        ["--attack", "dlg"],
        ["--attack", "gradinversion", "--knowledge", "4"],
        ["--defense", "quantize:bits=4", "--defense", "topk:ratio=0.5"],
        ["--update-kind", "delta", "--lr", "0.05", "--local-epochs", "2", "--batch-size", "1", "--num-images",
         "2", "--attack", "fedavg_unroll", "--knowledge", "3"],
    ],
)  # fmt: skip
def test_every_attack_and_defense_runs_on_an_onnx_model(tmp_path: Path, flags: list[str]) -> None:
    torch.manual_seed(0)
    delta = "delta" in flags
    training = {"kind": "delta", "lr": 0.05, "local_epochs": 2, "batch_size": 1} if delta else {}
    files = prepare.write_inputs(
        WithBatchNorm(), torch.rand(2, 3, 16, 16), [1, 2], tmp_path, bn_mode="eval", **training
    )
    r = runner.invoke(
        app,
        ["attack", "--model", str(files.model), "--update", str(files.update), "--ground-truth",
         str(files.ground_truth), "--size", "16", "--bn-mode", "eval", "--iterations", "3", "--out",
         str(tmp_path / "runs"), "--json", *flags],
        catch_exceptions=False,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    manifest = json.loads(r.stdout)
    assert manifest["status"] == "succeeded" and manifest["metrics"]["mean"]["psnr"] > 0
