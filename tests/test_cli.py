"""`gradleak attack`: a simulated victim, uploaded-style files, and clear errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
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
    assert "warning: not converged: 3 iterations, fewer than the" in r.stdout  # lenet was measured
    grid = next(line for line in r.stdout.splitlines() if line.startswith("grid.png: "))
    assert Path(grid.removeprefix("grid.png: ")).is_file()
    report = next(line for line in r.stdout.splitlines() if line.startswith("report.html: "))
    html = Path(report.removeprefix("report.html: ")).read_text()
    assert "label accuracy, as a multiset" in html and "label accuracy, per image" in html
    assert '<meta http-equiv="Content-Security-Policy" content="default-src \'none\';' in html


# ---------------------------------------------------------------------------------------------
# flags that reach the whole spec
# ---------------------------------------------------------------------------------------------


def test_key_value_flags_take_json_lists_and_mappings():
    from service.cli import parse_pairs

    assert parse_pairs(["cut_skips=[0,1],stem=cifar", 'm={"a":[1,2],"b":"x,y"}', "n=null"], "knob") == {
        "cut_skips": [0, 1],
        "stem": "cifar",
        "m": {"a": [1, 2], "b": "x,y"},
        "n": None,
    }


def test_a_list_knob_reaches_the_model(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    r = invoke(
        "attack", "--arch", "resnet18", "--knob", "cut_skips=[0,1]", "--knob", "stem=cifar",
        "--images", "astronaut", "--size", "8", "--bn-mode", "eval", "--iterations", "1",
        "--save-spec", str(spec_path), "--out", str(tmp_path), "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["spec"]["model"]["knobs"] == {"cut_skips": [0, 1], "stem": "cifar"}
    assert "cut_skips:\n    - 0\n    - 1" in spec_path.read_text()


def test_unbalanced_json_in_a_flag_is_one_clear_line(tmp_path):
    r = invoke("attack", "--arch", "resnet18", "--knob", "cut_skips=[0,1", "--images", "astronaut")
    assert r.exit_code == 2
    assert r.stderr.strip().count("\n") == 0 and "unbalanced" in r.stderr


def test_what_the_attacker_is_told_differs_from_what_the_client_did(tmp_path):
    r = invoke(
        "attack", "--arch", "lenet", "--images", "astronaut,coffee", "--labels", "1,3", "--size", "16",
        "--protocol", "fedavg", "--lr", "0.01", "--local-epochs", "1", "--batch-size", "2",
        "--shuffle-seed", "9", "--told", "batch_size=null", "--knowledge", "3", "--attack", "fedavg_unroll",
        "--iterations", "2", "--out", str(tmp_path), "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    did, told = m["spec"]["update"]["simulate"]["training"], m["spec"]["update"]["client"]
    assert did["batch_size"] == 2 and did["shuffle_seed"] == 9
    assert told["batch_size"] is None and told["lr"] == 0.01 and told["shuffle_seed"] == 9
    # batch size unknown (Case 2): searched among 1 and 2 (the two images in one batch)
    details = m["attack"]["details"]
    assert details["fedavg_case"] == "case1_searched"
    assert [c["batch_size"] for c in details["search"]["candidates"]] == [1, 2]


def test_rough_facts_from_flags_are_searched_and_reported(tmp_path):
    r = invoke(
        "attack", "--arch", "lenet", "--images", "astronaut", "--labels", "1", "--size", "16",
        "--protocol", "fedavg", "--lr", "0.05", "--local-epochs", "2", "--batch-size", "1",
        "--told-lr", "0.01:0.1:3", "--told-local-epochs", "1,2", "--told-shuffle-seed", "0,given",
        "--knowledge", "3", "--attack", "fedavg_unroll", "--iterations", "8", "--out", str(tmp_path),
        "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    told = m["spec"]["update"]["client"]
    assert told["lr"] is None and told["local_epochs"] is None
    assert told["candidates"]["lr"] == {"min": 0.01, "max": 0.1, "points": 3}
    assert told["candidates"]["local_epochs"] == [1, 2] and told["candidates"]["shuffle_seed"] == [0, None]
    assert m["spec"]["update"]["simulate"]["training"]["lr"] == 0.05  # what the client really did
    search = m["attack"]["details"]["search"]
    assert len(search["candidates"]) == 6  # 3 lrs x 2 epochs; one image: the order cannot matter
    assert search["chosen"] in search["candidates"] and m["attack"]["iterations"] == 8
    assert m["attack"]["details"]["facts"] == search["chosen"]
    page = (tmp_path / m["job_id"] / "report.html").read_text()
    assert "candidates: 1, 2" in page and "hypothesis chosen" in page and "Case 1 with facts searched" in page


def test_batch_size_unknown_from_a_flag_with_the_single_step_fallback(tmp_path):
    r = invoke(
        "attack", "--arch", "lenet", "--images", "astronaut,coffee", "--labels", "1,3", "--size", "16",
        "--protocol", "fedavg", "--lr", "0.01", "--local-epochs", "1", "--batch-size", "2",
        "--told-batch-size", "unknown", "--param", "unknown_facts=single_step", "--knowledge", "3",
        "--attack", "fedavg_unroll", "--iterations", "2", "--out", str(tmp_path), "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["spec"]["update"]["client"]["batch_size"] is None
    assert m["attack"]["details"]["fedavg_case"] == "case2_single_step"


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--told-lr", "0.1:0.01", "min 0.1 is above max 0.01"),
        ("--told-lr", "a:b", "expected MIN:MAX"),
        ("--told-lr", "0.1:0.2:3:4", "expected MIN:MAX"),
        ("--told-local-epochs", "1,two", "comma-separated list"),
        ("--told-local-epochs", "1,1", "repeat a value"),
        ("--told-batch-size", ",", "at least one value"),
        ("--told-batch-size", "0,2", "greater than or equal to 1"),
        ("--told-shuffle-seed", "x", "comma-separated list"),
    ],
)
def test_bad_rough_fact_flags_are_one_clear_line(tmp_path, flag, value, message):
    r = invoke(
        "attack", "--arch", "lenet", "--images", "astronaut", "--protocol", "fedavg", "--lr", "0.1",
        "--local-epochs", "1", "--batch-size", "1", flag, value, "--out", str(tmp_path),
    )  # fmt: skip
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr


def test_told_refuses_an_unknown_fact(tmp_path):
    r = invoke("attack", "--arch", "lenet", "--images", "astronaut", "--told", "batchsize=2")
    assert r.exit_code == 2 and "gradleak: error:" in r.stderr and "batchsize" in r.stderr


# ---------------------------------------------------------------------------------------------
# the catalog
# ---------------------------------------------------------------------------------------------


def test_catalog_overview_shows_defaults_knobs_and_photos():
    from service.data.photos import CATEGORIES

    r = invoke("catalog")
    assert r.exit_code == 0, r.output
    assert "knobs: stem=cifar, cut_skips=[]" in r.stdout  # resnet18's knobs with their defaults
    assert "schedule=cosine" in r.stdout and "cost=auto" in r.stdout
    for category in CATEGORIES:
        assert f"  {category} " in r.stdout
    assert "astronaut" in r.stdout and "face00..face99" in r.stdout


def test_catalog_entries_are_generated_from_the_parameter_models():
    from service.specs import ATTACK_PARAMS, QuantizeDefense

    for name, params in ATTACK_PARAMS.items():
        r = invoke("catalog", name)
        assert r.exit_code == 0, r.output
        for field, info in params.model_fields.items():
            if field == "name":
                continue
            assert info.description, f"{name}.{field} has no description"
            if info.is_required():  # a latent-space attack's generator
                shown = "(required)"
            else:
                default = info.get_default(call_default_factory=True)
                shown = default if isinstance(default, str) else json.dumps(default)
            assert f"    {field} = {shown}  (" in r.stdout, (name, field)
            assert info.description in r.stdout
    entry = json.loads(invoke("catalog", "quantize", "--json").stdout)
    assert {f["name"]: f["default"] for f in entry["fields"]} == {"bits": 8, "stochastic": True}
    assert entry["fields"][0]["description"] == QuantizeDefense.model_fields["bits"].description


def test_catalog_does_not_describe_a_schedule_the_defaults_do_not_use():
    from service.specs import InvertingGradientsParams

    text = invoke("catalog", "inverting_gradients").stdout
    summary = text.splitlines()[0]
    default = InvertingGradientsParams().schedule
    assert not any(s in summary for s in ("step decay", "cosine") if default not in s)


def test_catalog_one_architecture_in_full_and_unknown_names():
    r = invoke("catalog", "resnet18")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("architecture resnet18:")
    assert "    cut_skips = []  (list[int])" in r.stdout and "one of cifar, imagenet" in r.stdout
    bad = invoke("catalog", "resnet19")
    assert bad.exit_code == 2 and bad.stderr.startswith("gradleak: error: unknown catalog entry 'resnet19'")
    assert "resnet18" in bad.stderr


def test_catalog_architecture_view_takes_more_sections():
    from service.catalog import ARCHITECTURE_SECTIONS

    def extra(m: dict) -> list[str]:
        return [f"  extra {m['name']}"]

    ARCHITECTURE_SECTIONS.append(extra)
    try:
        view = invoke("catalog", "lenet").stdout
        assert "  extra lenet\ntensors for 3x32x32 images" in view  # then the weight-naming contract
    finally:
        ARCHITECTURE_SECTIONS.remove(extra)


def test_a_time_limit_alone_is_not_cut_short_by_the_default_iteration_count(tmp_path):
    r = invoke(
        "attack", "--arch", "mlp", "--knob", "width=8", "--images", "astronaut", "--size", "8",
        "--time-limit", "6", "--out", str(tmp_path), "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["spec"]["budget"]["iterations"] == 1_000_000
    assert m["attack"]["stop_reason"] == "time_limit" and m["attack"]["iterations"] > 1000


def test_verdict_flags_set_the_estimate_and_layer_over_a_spec_file(tmp_path):
    proxy = tmp_path / "proxy.safetensors"
    images, _ = load_images("photos", ["astronaut", "rocket", "coffee"], size=8)
    save_safetensors_file({"images": images}, proxy)
    spec_path = tmp_path / "job.yaml"
    r = invoke(
        "attack", "--arch", "mlp", "--knob", "width=8", "--images", "astronaut", "--size", "8",
        "--iterations", "2", "--verdict", "always", "--shadows", "2", "--shadow-iterations", "2",
        "--proxy-data", str(proxy), "--verdict-seed", "3", "--save-spec", str(spec_path),
        "--out", str(tmp_path), "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    v = m["spec"]["verdict"]
    assert (v["when"], v["shadows"], v["seed"], v["budget"]["iterations"]) == ("always", 2, 3, 2)
    est = m["estimate"]
    assert est["shadows_run"] == 2 and est["proxy_data"] == "uploaded proxy data"
    assert est["budget"]["iterations"] == 2
    # a spec file whose verdict has no budget (null) takes the flags on top
    again = invoke(
        "attack", "--spec", str(spec_path), "--shadows", "3", "--shadow-time-limit", "30",
        "--verdict", "never", "--save-spec", str(tmp_path / "again.yaml"), "--out", str(tmp_path), "--json",
    )  # fmt: skip
    assert again.exit_code == 0, again.output
    m2 = json.loads(again.stdout)
    assert m2["estimate"] is None and m2["spec"]["verdict"]["shadows"] == 3
    assert m2["spec"]["verdict"]["budget"]["time_limit_s"] == 30
    assert (
        m2["spec"]["verdict"]["budget"]["iterations"] == 1_000_000
    )  # a time limit alone runs until it is up
    bad = invoke("attack", "--spec", str(spec_path), "--shadows", "1", "--out", str(tmp_path))
    assert bad.exit_code == 2 and "verdict.shadows" in bad.output


def test_the_summary_cautions_when_a_known_limit_of_the_attack_applies(tmp_path):
    """A simulated client trains with its batch norm in train mode by default: the attack's known
    limit there is said beside the scores, and not said for a model without batch norm."""
    args = ["--images", "astronaut,coffee", "--labels", "1,3", "--size", "8", "--iterations", "2"]
    r = invoke(
        "attack", "--arch", "convnet", "--knob", "batchnorm=true", "--knob", "depth=1", "--knob", "width=4",
        *args, "--out", str(tmp_path / "bn"),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "caution: the client normalises with its own batch statistics" in r.stdout
    assert "SSIM mean n/a" in r.stdout  # 8 pixels a side are too few for SSIM: said, not a crash
    r = invoke("attack", "--arch", "convnet", "--knob", "depth=1", *args, "--out", str(tmp_path / "plain"))
    assert r.exit_code == 0, r.output
    assert "caution:" not in r.stdout
