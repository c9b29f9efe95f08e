import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from service.errors import KnowledgeError, SpecError
from service.specs import (
    Budget,
    DataSpec,
    FedAvgParams,
    GradInversionParams,
    JobSpec,
    Knowledge,
    ModelSpec,
    SimulatedClient,
    UpdateSpec,
)


def spec(**kw) -> JobSpec:
    base = dict(
        model=ModelSpec(arch="lenet"), update=UpdateSpec(simulate=SimulatedClient(images=["astronaut"]))
    )
    return JobSpec(**{**base, **kw})


def test_yaml_and_json_round_trip():
    s = spec(
        attack={"name": "gradinversion", "bn_weight": 0.01},
        knowledge=5,
        defenses=[{"name": "quantize", "bits": 4}, {"name": "noise", "scale": 0.1}],
        budget={"iterations": 7, "restarts": 2, "time_limit_s": 3.5},
    )
    assert JobSpec.from_yaml(s.to_yaml()) == s
    assert JobSpec.model_validate_json(s.to_json()) == s
    assert isinstance(s.attack, GradInversionParams)
    assert s.knowledge is Knowledge.MALICIOUS_SERVER


def test_refuses_attack_needing_ungranted_knowledge_and_names_it():
    s = spec(attack=GradInversionParams(), knowledge=Knowledge.TRAINING_DETAILS)
    with pytest.raises(KnowledgeError) as e:
        s.check_knowledge()
    msg = str(e.value)
    assert "level 4" in msg and "batch-norm statistics" in msg and "grants level 3" in msg
    spec(attack=GradInversionParams(), knowledge=4).check_knowledge()


def test_fedavg_attack_needs_training_details():
    with pytest.raises(KnowledgeError, match="training details"):
        spec(attack=FedAvgParams(), knowledge=1).check_knowledge()


@pytest.mark.parametrize(
    "bad",
    [
        {"extra_field": 1},
        {"attack": {"name": "no_such_attack"}},
        {"defenses": [{"name": "quantize", "bits": 0}]},
        {"data": {"shape": [3, 1024, 1024]}},
        {"data": {"shape": [2, 32, 32]}},
        {"data": {"num_classes": 10, "labels": [3, 12]}},
        {"budget": {"iterations": 0}},
        {"knowledge": 6},
    ],
)
def test_invalid_specs_are_refused(bad):
    base = json.loads(spec().to_json())
    with pytest.raises(ValidationError):
        JobSpec.model_validate({**base, **bad})


def test_update_needs_exactly_one_source():
    with pytest.raises(ValidationError, match="exactly one"):
        UpdateSpec()
    with pytest.raises(ValidationError, match="exactly one"):
        UpdateSpec(artifact="u.safetensors", simulate=SimulatedClient())


def test_simulated_labels_must_fit_classes():
    with pytest.raises(ValidationError, match="outside"):
        spec(update=UpdateSpec(simulate=SimulatedClient(images=["astronaut"], labels=[12])))


def test_grayscale_normalisation_is_derived():
    n = DataSpec(shape=(1, 16, 16), normalization="cifar10").resolved_normalization()
    assert len(n.mean) == 1 and len(n.std) == 1


def test_unreadable_spec_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        JobSpec.from_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(SpecError, match="YAML"):
        JobSpec.from_file(bad)


def test_specs_do_not_import_torch():
    code = "import sys, service.specs; assert 'torch' not in sys.modules, 'specs imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_knowledge_level_5_is_refused_as_no_attack_uses_it():
    s = spec(attack=GradInversionParams(), knowledge=Knowledge.MALICIOUS_SERVER)
    with pytest.raises(KnowledgeError, match=r"level 5 .* no attack here uses it"):
        s.check_knowledge()
    spec(attack=GradInversionParams(), knowledge=Knowledge.BN_STATISTICS).check_knowledge()


def test_a_time_limit_alone_is_not_capped_by_the_default_iteration_count():
    assert Budget(time_limit_s=60).time_bound(20_000).iterations == 20_000
    assert Budget(time_limit_s=60).time_bound().iterations == 1_000_000
    assert Budget(iterations=50, time_limit_s=60).time_bound(20_000).iterations == 50  # said: kept
    assert Budget().time_bound(20_000).iterations == 1000  # no time limit: the default count
    parsed = JobSpec.from_yaml(spec(budget={"time_limit_s": 5}).to_yaml())
    assert parsed.budget.time_bound(99).iterations == 1000  # a dumped spec states its iterations


# ---------------------------------------------------------------------------------------------
# client facts known only roughly: candidates for the FedAvg-aware attack's search
# ---------------------------------------------------------------------------------------------


def test_told_facts_take_ranges_and_lists_that_land_under_candidates():
    told = {"protocol": "fedavg", "lr": {"min": 0.01, "max": 0.1}, "local_epochs": [1, 2, 4]}
    told |= {"batch_size": [1, 2, 4, 8], "shuffle_seed": [0, None]}
    s = spec(update={"simulate": {"images": ["astronaut"]}, "client": told})
    c = s.update.client
    assert c.lr is None and c.local_epochs is None and c.batch_size is None and c.shuffle_seed is None
    assert c.candidates is not None and c.candidates.local_epochs == [1, 2, 4]
    assert c.candidates.batch_size == [1, 2, 4, 8] and c.candidates.shuffle_seed == [0, None]
    assert c.candidates.lr_values() == pytest.approx([0.01, 0.01 * 10 ** (1 / 3), 0.01 * 10 ** (2 / 3), 0.1])
    assert JobSpec.from_yaml(s.to_yaml()) == s and JobSpec.model_validate_json(s.to_json()) == s
    listed = spec(update={"simulate": {"images": ["astronaut"]}, "client": {"lr": [0.05, 0.01]}})
    assert listed.update.client.candidates.lr_values() == [0.05, 0.01]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("client", "message"),
    [
        ({"lr": {"min": 0.1, "max": 0.01}}, "min 0.1 is above max 0.01"),
        ({"lr": {"min": 0, "max": 0.1}}, "greater than 0"),
        ({"lr": {"min": 0.01, "max": 0.1, "points": 1}}, "greater than or equal to 2"),
        ({"lr": []}, "at least 1 item"),
        ({"lr": [0.1, -1]}, "greater than 0"),
        ({"local_epochs": [1, 1]}, "repeat a value"),
        ({"local_epochs": [0, 2]}, "greater than or equal to 1"),
        ({"batch_size": list(range(1, 18))}, "at most 16 items"),
        ({"lr": 0.1, "candidates": {"lr": [0.1, 0.2]}}, "both exactly and as candidates"),
        ({"lr": [0.1], "candidates": {"lr": [0.2]}}, "both as candidates and under candidates"),
    ],
)
def test_bad_candidates_are_refused_with_a_clear_message(client, message):
    with pytest.raises(ValidationError, match=message):
        spec(update={"simulate": {"images": ["astronaut"]}, "client": client})


def test_a_simulated_client_trains_with_one_value_of_each_fact():
    training = {"protocol": "fedavg", "lr": [0.01, 0.1], "local_epochs": 1, "batch_size": 1}
    with pytest.raises(ValidationError, match="one value of each fact"):
        spec(update={"simulate": {"images": ["astronaut"], "training": training}})


def test_fedavg_params_defaults_and_search_settings():
    p = FedAvgParams()
    assert p.cost == "auto" and p.unknown_facts == "search" and 0 < p.search_fraction < 1
    for bad in ({"search_fraction": 1.0}, {"search_finalists": 0}, {"unknown_facts": "guess"}):
        with pytest.raises(ValidationError):
            FedAvgParams(**bad)
