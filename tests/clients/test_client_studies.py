"""The SDK's studies, sync and async, against the real app and runner in this process: create,
wait with progress over points, the table as an artifact, list, cancel, and a 422 for a bad axis."""

from __future__ import annotations

import asyncio
import csv
import io
from typing import Any

import pytest

from gradleak_client import Client, Study, UnprocessableEntityError
from gradleak_client.embedded import EmbeddedService

JOB: dict[str, Any] = {
    "model": {"arch": "lenet"},
    "update": {"simulate": {"images": ["astronaut"], "labels": [1]}},
    "data": {"shape": [3, 16, 16], "labels": [1]},
    "attack": {"name": "dlg"},
    "budget": {"iterations": 3},
}
SPEC: dict[str, Any] = {"title": "sdk", "job": JOB, "axes": [{"path": "budget.iterations", "values": [2, 3]}]}


def test_a_study_through_the_sdk(client: Client) -> None:
    seen: list[Study] = []
    study = client.studies.create(SPEC)
    assert study.status == "queued" and study.id.startswith("std_") and study.points.total == 2
    done = client.studies.wait(study.id, timeout=120, progress=seen.append).raise_for_status()
    assert isinstance(done, Study) and done.points.succeeded == 2 and done.points.done == 2
    assert [p.values["budget.iterations"] for p in done.items] == [2, 3]
    assert seen[-1].progress is not None and seen[-1].progress.iteration == seen[-1].progress.total == 2
    rows = list(csv.DictReader(io.StringIO(client.studies.artifacts.read(study.id, "table.csv").decode())))
    assert [r["budget.iterations"] for r in rows] == ["2", "3"] and all(
        float(r["psnr_mean"]) > 0 for r in rows
    )
    names = {a.name for a in client.studies.artifacts.list(study.id)}
    assert {"report.html", "plots/budget.iterations.png", "plots/budget.iterations.svg"} <= names
    assert client.studies.list().items[0].id == study.id
    with pytest.raises(UnprocessableEntityError, match="no field 'iterationz'"):
        client.studies.create({**SPEC, "axes": [{"path": "budget.iterationz", "values": [1]}]})


def test_the_async_sdk_cancels_a_study(service: EmbeddedService) -> None:
    async def scenario() -> Study:
        async with service.async_client() as client:
            spec = {**SPEC, "job": {**JOB, "budget": {"iterations": 100000}}, "seeds": [0, 1, 2]}
            study = await client.studies.create(spec)
            while (await client.studies.get(study.id)).points.running == 0:
                await asyncio.sleep(0.05)
            await client.studies.cancel(study.id)
            return await client.studies.wait(study.id, timeout=120)

    done = asyncio.run(scenario())
    assert done.status == "cancelled"
