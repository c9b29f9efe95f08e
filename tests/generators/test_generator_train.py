"""`gradleak generator train`: a few steps on tiny data write a loadable generator, its sample
grid and a checkpoint; a resumed run continues from the checkpoint's step, exactly as an
uninterrupted run would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from service.cli import app
from service.generators import load_generator_file
from service.generators.train import TrainConfig, diff_augment, train_generator
from service.tensorio import load_safetensors_file

runner = CliRunner()
TINY = ["--batch-size", "4", "--latent-dim", "8", "--width", "4", "--seed", "3", "--log-every", "1"]


def invoke(*args: str) -> object:
    return runner.invoke(app, ["generator", *args], catch_exceptions=False)


def _state(out: Path) -> dict:
    return json.loads((out / "checkpoint" / "state.json").read_text())


def test_train_writes_a_generator_a_grid_and_a_checkpoint_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = invoke(
        "train", "--data", "faces", "--out", str(out), "--steps", "2", "--checkpoint-every", "1", *TINY
    )
    assert r.exit_code == 0, r.output
    assert "step 2/2" in r.output and "d_loss" in r.output
    assert _state(out)["step"] == 2
    loaded = load_generator_file(out / "generator.safetensors")
    assert loaded.manifest.arch == "dcgan" and loaded.manifest.trained_on == "faces"
    assert loaded.manifest.steps == 2 and loaded.manifest.image_shape == (3, 32, 32)
    with Image.open(out / "samples.png") as grid:
        assert grid.format == "PNG" and grid.width >= 8 * 64
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000001.png", "step-0000002.png"]

    r = invoke("train", "--resume", str(out), "--steps", "3", "--json")
    assert r.exit_code == 0, r.output
    assert "resumed from" in r.stderr and "at step 2" in r.stderr and "step 3/3" in r.stderr
    result = json.loads(r.stdout)
    assert result["steps"] == 3 and result["manifest"]["steps"] == 3
    assert _state(out)["step"] == 3 and len(_state(out)["history"]) == 3

    # the same three steps without the interruption: identical weights and optimizer state
    straight = tmp_path / "straight"
    r = invoke("train", "--data", "faces", "--out", str(straight), "--steps", "3", *TINY)
    assert r.exit_code == 0, r.output
    resumed = load_safetensors_file(
        out / "checkpoint" / "training.safetensors", allowed_dtypes=("F32", "I64", "U8")
    )
    direct = load_safetensors_file(
        straight / "checkpoint" / "training.safetensors", allowed_dtypes=("F32", "I64", "U8")
    )
    assert resumed.keys() == direct.keys() and any(k.startswith("opt_d.state.") for k in resumed)
    assert all(torch.equal(resumed[k], direct[k]) for k in resumed)


def test_a_conditional_generator_trains_on_a_labelled_folder(tmp_path: Path) -> None:
    folder = tmp_path / "shapes"
    for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (folder / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (12, 12), colour).save(folder / label / f"{i}.png")
    out = tmp_path / "cond"
    r = invoke(
        "train", "--data", "folder", "--path", str(folder), "--conditional", "--out", str(out),
        "--steps", "1", "--image-size", "64", "--channels", "1", *TINY,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    loaded = load_generator_file(out / "generator.safetensors")
    assert loaded.manifest.arch == "dcgan_cond" and loaded.manifest.num_classes == 2
    assert loaded.manifest.trained_on == "folder:shapes" and loaded.manifest.image_shape == (1, 64, 64)
    r = invoke("show", str(out / "generator.safetensors"))
    assert r.exit_code == 0 and '"dcgan_cond"' in r.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "faces", "--conditional"], "faces has no labels"),
        (["--data", "mnist"], "unknown training data 'mnist'"),
        (["--data", "folder"], "needs a local path"),
        (["--data", "faces", "--image-size", "48"], "image size is 32 or 64"),
        (["--resume", "nowhere"], "no checkpoint at nowhere"),
    ],
)
def test_bad_options_end_with_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    r = invoke("train", "--out", str(tmp_path / "x"), "--steps", "1", *TINY, *args)
    assert r.exit_code == 2 and message in r.output


def test_a_pickle_is_refused_by_show(tmp_path: Path) -> None:
    path = tmp_path / "g.pt"
    torch.save({"w": torch.zeros(1)}, path)
    r = invoke("show", str(path))
    assert r.exit_code == 2 and "torch.save" in r.output and "safetensors" in r.output


def test_augmentation_keeps_shapes_and_gradients() -> None:
    x = torch.rand(3, 3, 16, 16, requires_grad=True)
    y = diff_augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_time_limit_stops_with_a_checkpoint(tmp_path: Path) -> None:
    config = TrainConfig(data="faces", steps=1000, batch_size=4, latent_dim=8, width=4)
    result = train_generator(config, tmp_path, time_limit_s=0.0, log=lambda _: None)
    assert result.steps == 0 and _state(tmp_path)["step"] == 0
    assert (tmp_path / "generator.safetensors").is_file()
