"""The `ood` study preset: a faces generator's GIAS against Inverting Gradients on faces the
generator never saw and on images of other sets; and its refusal without the generator."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.errors import SpecError
from service.studies import presets
from service.studies.presets import preset
from service.studies.spec import expand


@pytest.mark.parametrize("scale", ["quick", "paper"])
def test_ood_crosses_image_sets_with_gias_and_inverting_gradients(scale: str) -> None:
    study = preset("ood", scale)  # type: ignore[arg-type]
    points = expand(study)
    assert [a.column for a in study.axes] == ["images", "attack"]
    sets = {p.values["images"] for p in points}
    assert sets == {"faces (held out)", "textures", "text", "photos"}
    per_set = {
        s: {tuple(p.spec.update.simulate.images) for p in points if p.values["images"] == s} for s in sets
    }
    assert all(len(images) >= 2 for images in per_set.values())  # more than one image per set
    assert len(points) == 2 * sum(len(v) for v in per_set.values()) * len(study.seeds)
    for p in points:
        spec = p.spec
        assert spec.data.shape == (3, 32, 32) and spec.model.arch == "convnet"
        assert spec.knowledge >= 2
        assert len(spec.update.simulate.images) == 1 and len(spec.data.labels) == 1  # batch 1, labels known
        if p.values["attack"].startswith("gias"):
            assert spec.attack.name == "gias"
            assert Path(spec.attack.generator) == presets.FACES_GENERATOR
        else:
            assert spec.attack.name == "inverting_gradients"
    faces = {
        i for p in points if p.values["images"] == "faces (held out)" for i in p.spec.update.simulate.images
    }
    # the generator was trained on face00..face59: none of those is attacked
    assert faces and all(int(f.removeprefix("face")) >= 60 for f in faces)
    attacks = {(p.spec.update.simulate.images[0], p.spec.attack.name) for p in points}
    assert len(attacks) == len(points) // len(study.seeds)  # every image under both attacks


def test_the_committed_faces_generator_is_what_the_preset_names() -> None:
    from service.generators import load_generator

    loaded = load_generator(presets.FACES_GENERATOR.read_bytes())
    assert tuple(loaded.manifest.image_shape) == (3, 32, 32)


def test_ood_without_its_generator_says_how_to_make_one(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(presets, "FACES_GENERATOR", tmp_path / "missing.safetensors")
    with pytest.raises(SpecError, match="gradleak generator train") as e:
        preset("ood", "quick")
    assert "--generator" in str(e.value)
    r = CliRunner().invoke(app, ["study", "run", "--preset", "ood", "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "gradleak generator train" in r.output
    assert "Traceback" not in r.output
    listing = CliRunner().invoke(app, ["study", "presets"])
    assert listing.exit_code == 0 and "ood" in listing.output


def test_a_local_study_runs_gias_with_a_generator_given_as_a_path(tmp_path: Path) -> None:
    """The study CLI stores a local generator file as an upload of the local tenant, so that its
    points (which resolve upload ids, as the service's workers do) load it."""
    import json

    import yaml

    study = preset("ood", "quick").model_dump(mode="json", exclude_none=True)
    study["axes"][0] = {"path": "update.simulate.images", "name": "images", "values": [["face60"]]}
    study["axes"][1]["values"] = study["axes"][1]["values"][:1]
    study["axes"][1]["labels"] = study["axes"][1]["labels"][:1]
    study["job"]["budget"] = {"iterations": 3}
    study["job"]["verdict"] = {"when": "never"}
    spec = tmp_path / "ood.yaml"
    spec.write_text(yaml.safe_dump(study))
    out = tmp_path / "runs"
    r = CliRunner().invoke(app, ["study", "run", str(spec), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    manifest = json.loads(r.output)
    assert manifest["statuses"] == {"succeeded": 1}
    stored = list((out / "local" / "uploads").glob("gen_*/data.safetensors"))
    assert len(stored) == 1 and stored[0].read_bytes() == presets.FACES_GENERATOR.read_bytes()


def test_a_local_study_refuses_a_generator_path_that_is_missing(tmp_path: Path) -> None:
    import yaml

    study = preset("ood", "quick").model_dump(mode="json", exclude_none=True)
    study["axes"][1]["values"][0]["generator"] = str(tmp_path / "nowhere.safetensors")
    spec = tmp_path / "ood.yaml"
    spec.write_text(yaml.safe_dump(study))
    r = CliRunner().invoke(app, ["study", "run", str(spec), "--out", str(tmp_path / "runs")])
    assert r.exit_code != 0 and "file not found" in r.output and "nowhere.safetensors" in r.output


def test_ood_takes_another_generator_and_other_presets_refuse_one(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(presets, "FACES_GENERATOR", tmp_path / "missing.safetensors")
    mine = str(tmp_path / "mine.safetensors")
    points = expand(preset("ood", "quick", generator=mine))  # no default needed
    assert {p.spec.attack.generator for p in points if p.spec.attack.name == "gias"} == {mine}
    with pytest.raises(SpecError, match="takes no generator"):
        preset("content", "quick", generator=mine)
    r = CliRunner().invoke(
        app, ["study", "run", "--preset", "ood", "--generator", mine, "--out", str(tmp_path / "o")]
    )
    assert r.exit_code != 0 and "file not found" in r.output and "mine.safetensors" in r.output
