"""`gradleak study`: presets, a small study run end to end with the real runner, status, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from studytools import tiny_study
from typer.testing import CliRunner

from service.cli import app
from service.studies.presets import PRESETS, SCALES, preset
from service.studies.spec import expand

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_presets_list_every_preset_with_its_counts() -> None:
    r = invoke("study", "presets")
    assert r.exit_code == 0, r.output
    names = ("local-updates", "batch-knowledge", "content", "micro-designs", "rounds", "privacy-utility")
    for name in (*names, "dimensions", "skip-connections", "nin-blocks"):
        assert name in r.output


def test_nin_blocks_matches_one_block_of_each_network() -> None:
    import torch

    from service.attacks.base import select_parameters
    from service.models import build_model

    matched = {}
    for p in expand(preset("nin-blocks")):
        assert p.spec.attack.name == "inverting_gradients"
        with torch.device("meta"):  # names only: no weights drawn
            names = [n for n, _ in build_model(p.spec.model, p.spec.data).named_parameters()]
        layers = p.spec.attack.match_layers
        matched[(p.values["architecture"], p.values["matched"])] = (
            len(names) if layers is None else len(select_parameters(names, layers))
        )
    assert matched == {
        ("googlenet", "full gradient"): 173,
        ("googlenet", "inception3a only"): 18,
        ("inception_v3", "full gradient"): 284,
        ("inception_v3", "Mixed_5b only"): 21,
    }


def test_skip_connections_cuts_each_resnet18_block_and_thins_densenet() -> None:
    points = expand(preset("skip-connections"))
    resnet18 = [p.spec.model.knobs.get("cut_skips", []) for p in points if p.spec.model.arch == "resnet18"]
    assert resnet18 == [[], *([b] for b in range(8))]
    dense = [p.spec.model.knobs["connections"] for p in points if p.spec.model.arch == "densenet121"]
    assert dense == ["all", 4, 2, 1]


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("scale", SCALES)
def test_every_preset_expands_into_valid_points(name: str, scale: str) -> None:
    study = preset(name, scale)  # type: ignore[arg-type]
    points = expand(study)
    assert len(points) == study.count() >= 3
    for p in points:
        p.spec.check_knowledge()


def test_local_updates_tells_the_attacker_the_client_s_local_updates() -> None:
    points = expand(preset("local-updates"))
    told = [(p.spec.update.simulate.training.local_epochs, p.spec.update.client.local_epochs) for p in points]
    assert told == [(u, u) for u in (1, 2, 4, 6, 8)]


def test_a_study_runs_from_a_spec_file_and_writes_its_outputs(tmp_path: Path) -> None:
    spec = tmp_path / "study.yaml"
    study = tiny_study(axes=[{"path": "budget.iterations", "values": [2, 3]}], seeds=[0])
    spec.write_text(yaml.safe_dump(study))
    out = tmp_path / "runs"
    r = invoke("study", "run", str(spec), "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "succeeded; 2/2 points (2 succeeded)" in r.output
    study_id = r.output.split()[1]
    folder = out / "local" / "studies" / study_id
    rows = list(csv.DictReader((folder / "table.csv").open()))
    assert [row["budget.iterations"] for row in rows] == ["2", "3"] and all(row["psnr_mean"] for row in rows)
    assert (folder / "plots" / "budget.iterations.png").stat().st_size > 0
    report = (folder / "report.html").read_text()
    assert report.count("<tr>") == 3
    assert "Reconstructions" in report and report.count('alt="reconstruction"') == 2
    status = invoke("study", "status", study_id, "--out", str(out))
    assert status.exit_code == 0 and "2/2 points" in status.output
    again = invoke("study", "run", "--resume", study_id, "--out", str(out))
    assert again.exit_code == 2 and "already succeeded" in again.output


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["study", "run"], "give a study spec file or --preset"),
        (["study", "run", "--preset", "nope"], "unknown study preset 'nope'"),
        (["study", "run", "--preset", "content", "--scale", "huge"], "--scale is one of quick, paper"),
        (["study", "status", "std_" + "0" * 32], "no job"),
    ],
)
def test_bad_arguments_give_one_clear_line(args: list[str], words: str, tmp_path: Path) -> None:
    r = invoke(*args, *(["--out", str(tmp_path)] if args[1] in ("run", "status") else []))
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gradleak: error:") and words in lines[0], r.output


def test_a_bad_axis_in_a_spec_file_is_one_line(tmp_path: Path) -> None:
    spec = tmp_path / "study.json"
    spec.write_text(json.dumps(tiny_study(axes=[{"path": "budget.iterationz", "values": [1]}])))
    r = invoke("study", "run", str(spec), "--out", str(tmp_path))
    assert r.exit_code == 2 and "no field 'iterationz'" in r.output
