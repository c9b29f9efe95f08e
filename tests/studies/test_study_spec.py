"""The study spec: axis paths, grid and zip expansion, validation of every point, limits."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from studytools import tiny_study

from service.errors import SpecError
from service.settings import Settings
from service.studies.spec import StudySpec, expand
from service.studies.submit import check_study


def test_a_grid_runs_every_combination_once_per_seed() -> None:
    study = StudySpec.model_validate(tiny_study())
    points = expand(study)
    assert len(points) == study.count() == 2 * 2 * 2
    combos = {(p.values["budget.iterations"], p.values["defense"], p.seed) for p in points}
    assert combos == {(i, d, s) for i in (2, 4) for d in ("none", "quantize(bits=4)") for s in (0, 1)}
    quantized = next(p for p in points if p.values["defense"] != "none")
    assert quantized.spec.defenses[0].name == "quantize" and quantized.spec.defenses[0].bits == 4
    assert {p.spec.budget.iterations for p in points} == {2, 4}
    assert [p.index for p in points] == list(range(8))


def test_zipped_axes_take_their_values_together() -> None:
    study = StudySpec.model_validate(
        tiny_study(
            combine="zip",
            axes=[
                {"path": "data.shape", "name": "size", "values": [[3, 16, 16], [3, 24, 24]]},
                {"path": "budget.iterations", "values": [3, 5]},
            ],
            seeds=[7],
        )
    )
    points = expand(study)
    assert [(p.spec.data.shape, p.spec.budget.iterations, p.seed) for p in points] == [
        ((3, 16, 16), 3, 7),
        ((3, 24, 24), 5, 7),
    ]
    assert points[1].values["size"] == "3x24x24"


def test_zipped_axes_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValidationError, match="as many values"):
        StudySpec.model_validate(
            tiny_study(
                combine="zip",
                axes=[
                    {"path": "budget.restarts", "values": [1]},
                    {"path": "budget.iterations", "values": [1, 2]},
                ],
            )
        )


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("update.simulate.trainin.local_epochs", "update.simulate has no field 'trainin'"),
        ("budget.iterations.x", "is a value, not a group"),
        ("modell.arch", "the spec has no field 'modell'"),
        ("model.knobs.kernel_size.x", "model.knobs has no field 'kernel_size'"),
        ("update.artifact.x", "not set in the base spec"),
    ],
)
def test_an_invalid_axis_path_is_refused_naming_the_wrong_part(path: str, words: str) -> None:
    with pytest.raises(ValidationError) as e:
        StudySpec.model_validate(tiny_study(axes=[{"path": path, "values": [1]}]))
    assert words in str(e.value)


@pytest.mark.parametrize(
    "path",
    [
        "update.simulate.training.local_epochs",
        "model.knobs.kernel_size",
        "defenses",
        "data.shape",
        "update.simulate.images",
        "budget.iterations",
    ],
)
def test_valid_axis_paths_are_accepted(path: str) -> None:
    assert StudySpec.model_validate(tiny_study(axes=[{"path": path, "values": [None]}])).axes[0].path == path


def test_federation_axis_paths_walk_the_federation_spec() -> None:
    study = StudySpec.model_validate(
        {
            "federation": {"model": {"arch": "lenet"}, "rounds": 2, "num_clients": 2},
            "axes": [
                {"path": "audit.budget.iterations", "values": [3, 6]},
                {"path": "client.local_epochs", "values": [1, 2]},
            ],
        }
    )
    points = expand(study)
    assert [(p.spec.audit.budget.iterations, p.spec.client.local_epochs) for p in points] == [
        (3, 1),
        (3, 2),
        (6, 1),
        (6, 2),
    ]


def test_a_point_that_is_not_a_valid_spec_names_the_axis_value_and_the_field() -> None:
    study = StudySpec.model_validate(tiny_study(axes=[{"path": "budget.iterations", "values": [4, 0]}]))
    with pytest.raises(SpecError) as e:
        expand(study)
    assert "budget.iterations=0" in str(e.value) and "budget.iterations: Input should be greater" in str(
        e.value
    )


def test_exactly_one_base_and_no_seed_axis() -> None:
    with pytest.raises(ValidationError, match="exactly one base"):
        StudySpec.model_validate({"axes": []})
    with pytest.raises(ValidationError, match="seeds"):
        StudySpec.model_validate(tiny_study(axes=[{"path": "seed", "values": [1, 2]}]))


def test_a_study_over_the_limit_is_refused_with_its_count(settings: Settings) -> None:
    study = StudySpec.model_validate(tiny_study(seeds=list(range(10))))
    small = settings.model_copy(update={"max_study_points": 39})
    with pytest.raises(SpecError, match=r"40 points \(2 x 2 values x 10 seeds\).*limit is 39"):
        check_study(study, small)
    assert check_study(study, settings).time_limit_s == settings.default_study_time_limit_s
