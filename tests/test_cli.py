"""`gradleak attack`: a simulated victim, uploaded-style files, and clear errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from typer.testing import CliRunner

from service.cli import app
from service.data import load_images, normalize
from service.fl import fedsgd_gradient
from service.models import build_model
from service.specs import DataSpec, ModelSpec
from service.tensorio import save_safetensors_file

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_simulated_victim_json_output(tmp_path):
    r = invoke(
        "attack", "--arch", "lenet", "--images", "astronaut,coffee", "--labels", "1,3", "--size", "16",
        "--attack", "inverting_gradients", "--iterations", "5", "--restarts", "2", "--seed", "3",
        "--out", str(tmp_path), "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    manifest = json.loads(r.stdout)
    assert manifest["attack"]["iterations"] == 5
    assert manifest["spec"]["update"]["simulate"]["images"] == ["astronaut", "coffee"]
    assert manifest["spec"]["seed"] == 3
    assert sorted(manifest["attack"]["labels"]) == [1, 3]  # inferred from the gradient, not given
    assert manifest["attack"]["label_source"].startswith("inferred")
    assert (tmp_path / manifest["job_id"] / "grid.png").is_file()


def test_fedavg_victim_and_knowledge_refusal(tmp_path):
    common = [
        "attack", "--arch", "lenet", "--images", "astronaut,coffee", "--labels", "1,3", "--labels-known",
        "--size", "16", "--protocol", "fedavg", "--local-epochs", "2", "--batch-size", "1", "--lr", "0.01",
        "--attack", "fedavg_unroll", "--iterations", "2", "--out", str(tmp_path),
    ]  # fmt: skip
    refused = runner.invoke(app, [*common, "--knowledge", "2"])
    assert refused.exit_code == 2
    assert "needs knowledge level 3" in refused.output and "Traceback" not in refused.output
    ok = invoke(*common, "--knowledge", "3", "--json")
    assert ok.exit_code == 0, ok.output
    details = json.loads(ok.stdout)["attack"]["details"]
    assert details["fedavg_case"] == "case1_unrolled"


def test_uploaded_style_files_with_ground_truth_and_defense(tmp_path):
    spec, data = ModelSpec(arch="lenet"), DataSpec(shape=(3, 16, 16))
    model = build_model(spec, data)
    images, _ = load_images("photos", ["chelsea"], size=16, channels=3)
    labels = torch.tensor([4])
    grad = fedsgd_gradient(model, normalize(images, data.resolved_normalization()), labels)
    save_safetensors_file(model.state_dict(), tmp_path / "w.safetensors")
    save_safetensors_file(grad, tmp_path / "g.safetensors")
    save_safetensors_file({"images": images, "labels": labels}, tmp_path / "gt.safetensors")
    r = invoke(
        "attack", "--arch", "lenet", "--weights", str(tmp_path / "w.safetensors"),
        "--update", str(tmp_path / "g.safetensors"), "--ground-truth", str(tmp_path / "gt.safetensors"),
        "--size", "16", "--num-images", "1", "--attack", "dlg", "--iterations", "3",
        "--defense", "quantize:bits=4", "--out", str(tmp_path / "out"), "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["attack"]["labels"] == [4] and m["attack"]["label_source"] == "inferred (iDLG)"
    assert m["attack"]["defenses"] == [{"name": "quantize", "bits": 4, "stochastic": True}]
    assert m["metrics"]["label_accuracy"] is not None
    assert m["metrics"]["mean"]["psnr"] > 0


def test_pickled_update_is_refused_with_one_line(tmp_path):
    bad = tmp_path / "update.pt"
    bad.write_bytes(pickle.dumps({"conv.weight": [1.0]}))
    r = runner.invoke(
        app, ["attack", "--arch", "lenet", "--update", str(bad), "--num-images", "1", "--out", str(tmp_path)]
    )
    assert r.exit_code == 2
    errors = [line for line in r.output.splitlines() if line.startswith("gradleak: error:")]
    assert len(errors) == 1 and "pickle" in errors[0] and "safetensors" in errors[0]
    assert "Traceback" not in r.output


def test_bad_flags_give_one_clear_line(tmp_path):
    cases = [
        (["attack", "--arch", "no_such_net", "--images", "astronaut"], "unknown architecture"),
        (["attack", "--arch", "lenet", "--images", "no_such_photo"], "no_such_photo"),
        (["attack", "--arch", "lenet", "--images", "astronaut", "--attack", "nope"], "unknown attack"),
        (["attack", "--arch", "lenet", "--images", "astronaut", "--defense", "blur"], "invalid spec"),
        (["attack", "--arch", "lenet", "--update", str(tmp_path / "missing.safetensors")], "not found"),
        (["attack", "--images", "astronaut"], "--arch"),
        (["attack", "--arch", "lenet", "--images", "astronaut", "--size", "4096"], "512"),
    ]
    for args, expected in cases:
        r = runner.invoke(app, [*args, "--out", str(tmp_path)])
        assert r.exit_code == 2, (args, r.output)
        assert expected in r.output, (args, r.output)
        assert "Traceback" not in r.output


def test_spec_file_round_trip(tmp_path):
    spec_path = tmp_path / "job.yaml"
    r = invoke(
        "attack", "--arch", "lenet", "--images", "rocket", "--size", "16", "--iterations", "2",
        "--save-spec", str(spec_path), "--out", str(tmp_path), "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    again = invoke("attack", "--spec", str(spec_path), "--iterations", "1", "--out", str(tmp_path), "--json")
    assert again.exit_code == 0, again.output
    m = json.loads(again.stdout)
    assert m["attack"]["iterations"] == 1 and m["spec"]["update"]["simulate"]["images"] == ["rocket"]


def test_catalog_lists_attacks_with_knowledge():
    r = invoke("catalog", "--json")
    assert r.exit_code == 0, r.output
    cat = json.loads(r.stdout)
    levels = {a["name"]: a["required_knowledge"] for a in cat["attacks"]}
    assert levels["gradinversion"] == 4 and levels["dlg"] == 0
    assert "resnet18" in {m["name"] for m in cat["architectures"]}
    assert {"quantize", "topk", "clip", "noise", "sign"} <= {d["name"] for d in cat["defenses"]}


def test_human_summary_names_metrics_and_artifacts(tmp_path):
    r = invoke(
        "attack", "--arch", "lenet", "--images", "astronaut", "--labels", "2", "--size", "16",
        "--iterations", "3", "--out", str(tmp_path),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "PSNR mean" in r.stdout and "label accuracy 1.00 (as a multiset)" in r.stdout
    grid = next(line for line in r.stdout.splitlines() if line.startswith("grid.png: "))
    assert Path(grid.removeprefix("grid.png: ")).is_file()
    report = next(line for line in r.stdout.splitlines() if line.startswith("report.html: "))
    html = Path(report.removeprefix("report.html: ")).read_text()
    assert "label accuracy" in html and "(multiset)" in html
    assert '<meta http-equiv="Content-Security-Policy" content="default-src \'none\';' in html
