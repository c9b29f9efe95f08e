"""The SDK's federations, sync and async, against the real app and runner in this process: create,
wait, rounds, artifacts, a checkpoint turned into a model for an attack job, cancel."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from gradleak_client import Client, Federation, JobFailedError
from gradleak_client.embedded import EmbeddedService

SPEC: dict[str, Any] = {
    "model": {"arch": "mlp", "knobs": {"width": 32}},
    "data": {"per_class": 6, "size": 16, "photos": ["astronaut", "coffee", "chelsea"]},
    "num_clients": 3,
    "rounds": 2,
    "client": {"protocol": "fedavg", "lr": 0.1, "batch_size": 2},
    "audit": {"rounds": [2], "budget": {"iterations": 3}},
}


def test_a_federation_through_the_sdk_and_its_checkpoint_in_an_attack_job(
    client: Client, tmp_path: Path
) -> None:
    seen: list[Federation] = []
    fed = client.federations.create(SPEC)
    assert fed.status == "queued" and fed.id.startswith("fed_")
    done = client.federations.wait(fed.id, timeout=120, progress=seen.append).raise_for_status()
    assert isinstance(done, Federation) and done.rounds is not None
    assert [r["round"] for r in done.rounds] == [1, 2] and done.rounds[1]["psnr_mean"] > 0
    assert seen[-1].progress is not None and seen[-1].progress.stage == "done"
    assert seen[-1].progress.iteration == seen[-1].progress.total == 2

    names = [a.name for a in client.federations.artifacts.list(fed.id)]
    assert "rounds.csv" in names and "rounds/round-002/grid.png" in names
    path = client.federations.artifacts.download(fed.id, "rounds.png", tmp_path)
    assert path == tmp_path / "rounds.png" and path.read_bytes()[:4] == b"\x89PNG"
    assert client.federations.list().items[0].id == fed.id

    model = client.federations.checkpoint_as_model(fed.id, 1)
    assert model.metadata.arch == "mlp" and model.metadata.num_classes == 3
    job = client.jobs.create(
        spec={
            "model": {"arch": "mlp", "knobs": {"width": 32}, "weights": model.id},
            "data": {"shape": [3, 16, 16], "num_classes": 3},
            "update": {"kind": "gradient", "simulate": {"images": ["astronaut"]}},
            "budget": {"iterations": 3},
        }
    )
    assert client.jobs.wait(job.id, timeout=120).raise_for_status().status == "succeeded"


def test_the_async_sdk_cancels_a_running_federation(service: EmbeddedService) -> None:
    async def scenario() -> Federation:
        async with service.async_client() as client:
            fed = await client.federations.create({**SPEC, "rounds": 400, "audit": {"rounds": []}})
            while (await client.federations.get(fed.id)).status != "running":
                await asyncio.sleep(0.02)
            await client.federations.cancel(fed.id)
            return await client.federations.wait(fed.id, timeout=60)

    done = asyncio.run(scenario())
    assert done.status == "cancelled"
    with pytest.raises(JobFailedError):
        done.raise_for_status()
