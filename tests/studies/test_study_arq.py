"""A study on arq workers on a real Redis: two workers share its points, each point runs once."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

import pytest
from jobtools import REDIS_URL
from studytools import PointRunner, tiny_study

from service.jobs import worker
from service.jobs.queue import ArqQueue
from service.jobs.records import JobStatus
from service.jobs.state_redis import RedisStateStore
from service.settings import Settings
from service.studies.spec import StudySpec
from service.studies.submit import create_study, enqueue_study

pytestmark = pytest.mark.integration


class SlowPointRunner(PointRunner):
    def __call__(self, spec, ctx):  # type: ignore[no-untyped-def]
        import time

        time.sleep(0.3)  # long enough that the other worker takes points meanwhile
        return super().__call__(spec, ctx)


def test_two_arq_workers_share_a_study_and_run_each_point_once(arq_settings: Settings) -> None:
    state = RedisStateStore.from_url(REDIS_URL, prefix=arq_settings.redis_prefix)
    study, points, _ = create_study(StudySpec.model_validate(tiny_study()), "acme", arq_settings, state)
    runners = [SlowPointRunner(), SlowPointRunner()]

    async def scenario() -> None:
        queue = ArqQueue(arq_settings, state)
        await queue.start()
        await enqueue_study(queue, study, points)
        await queue.close()
        workers = [
            worker.build_worker(arq_settings, runner=r, handle_signals=False, poll_delay=0.05)
            for r in runners
        ]
        tasks = [asyncio.create_task(w.async_run()) for w in workers]
        try:
            for _ in range(1200):
                if state.get_job(None, study.id).status.terminal:
                    break
                await asyncio.sleep(0.05)
        finally:
            for w in workers:
                await w.close()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    asyncio.run(scenario())
    done = state.get_job(None, study.id)
    state.close()
    assert done.status == JobStatus.SUCCEEDED, done.error
    assert all(r.finished for r in runners), [dict(r.finished) for r in runners]
    assert runners[0].finished + runners[1].finished == Counter({p.id: 1 for p in points})
    assert done.manifest is not None and done.manifest["statuses"] == {"succeeded": 8}
