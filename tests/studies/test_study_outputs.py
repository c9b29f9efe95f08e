"""A federation study's table row and plots, from stored federation manifests."""

from __future__ import annotations

import time

import pytest

from service.jobs.records import JobError, JobRecord, JobStatus
from service.studies.outputs import FEDERATION_COLUMNS, columns, plot_axes, rows_of
from service.studies.spec import PlannedPoint, StudyPlan, StudySpec


def federation_plan() -> StudyPlan:
    study = StudySpec.model_validate(
        {
            "federation": {"model": {"arch": "mlp"}, "rounds": 3, "num_clients": 2, "audit": {"rounds": [3]}},
            "axes": [
                {
                    "path": "defenses",
                    "name": "defense",
                    "values": [[], [{"name": "sign"}]],
                    "labels": ["none", "sign"],
                }
            ],
            "seeds": [0, 1],
        }
    )
    points = [
        PlannedPoint(index=i, id=f"fed_{i:032x}", values={"defense": d}, seed=s)
        for i, (d, s) in enumerate((d, s) for d in ("none", "sign") for s in (0, 1))
    ]
    return StudyPlan(study=study, points=points)


def record(
    point: PlannedPoint, psnr: float, accuracy: float, status: JobStatus = JobStatus.SUCCEEDED
) -> JobRecord:
    rounds = [
        {"round": 1, "test_accuracy": 0.3, "igsa": 0.5},
        {
            "round": 2,
            "test_accuracy": 0.4,
            "igsa": 0.55,
            "psnr_mean": psnr - 2,
            "psnr_worst": psnr,
            "ssim_mean": 0.4,
            "ssim_worst": 0.6,
            "label_accuracy": 0.5,
            "igsa_client": 0.7,
        },
        {
            "round": 3,
            "test_accuracy": accuracy,
            "igsa": 0.6,
            "psnr_mean": psnr,
            "psnr_worst": psnr + 3,
            "ssim_mean": 0.5,
            "ssim_worst": 0.7,
            "label_accuracy": 1.0,
            "igsa_client": 0.8,
        },
    ]
    manifest = {
        "initial": {"test_accuracy": 0.1},
        "final": {"round": 3, "test_accuracy": accuracy},
        "rounds": rounds,
        "timings": {"total_s": 12.0, "mean_round_s": 4.0},
    }
    now = time.time()
    return JobRecord(
        id=point.id,
        tenant="acme",
        status=status,
        spec_json="{}",
        created_at=now,
        updated_at=now,
        expires_at=now + 60,
        manifest=manifest,
    )


def test_a_federation_point_s_row_has_final_accuracy_and_the_audited_rounds_leakage() -> None:
    plan = federation_plan()
    records = [record(p, psnr=20.0 + p.index, accuracy=0.8 - 0.1 * p.index) for p in plan.points]
    rows = rows_of(plan, records)
    assert columns(plan)[:5] == ["point", "defense", "seed", "status", "id"]
    assert set(FEDERATION_COLUMNS) <= set(rows[0])
    first = rows[0]
    assert first["final_accuracy"] == pytest.approx(0.8) and first["initial_accuracy"] == 0.1
    assert first["audited_rounds"] == 2 and first["final_igsa"] == 0.6
    assert first["psnr_mean"] == pytest.approx((18.0 + 20.0) / 2) and first["psnr_worst"] == 23.0
    assert first["ssim_worst"] == 0.7 and first["label_accuracy"] == 0.75 and first["igsa_client"] == 0.75
    assert first["total_s"] == 12.0 and first["mean_round_s"] == 4.0

    plots = plot_axes(plan, rows)
    assert set(plots) == {f"plots/{n}.{e}" for n in ("defense", "privacy-utility") for e in ("png", "svg")}
    assert all(data for data in plots.values())


def test_a_failed_point_is_a_row_with_its_error_and_no_metrics() -> None:
    plan = federation_plan()
    records = [record(p, 20.0, 0.5) for p in plan.points]
    failed = records[1].model_copy(
        update={
            "status": JobStatus.FAILED,
            "manifest": None,
            "error": JobError(code="internal", message="boom"),
        }
    )
    rows = rows_of(plan, [records[0], failed, *records[2:]])
    assert rows[1]["status"] == "failed" and rows[1]["error"] == "boom" and rows[1]["psnr_mean"] is None
    assert plot_axes(plan, rows)  # plots skip what has no metric
