"""Points of a study that share one model, run as one batched computation.

Each point still runs as its own job through `execute_job` (its claim, lease, setup, scoring,
record and artifacts), in a thread of its own; only the attack is shared. Every point's runner
hands its attack problem to a `PointBatch`, which waits until every point of the batch has either
handed in its problem or ended without one (not claimed, failed in its setup), then runs all the
problems it got as one vectorised optimisation (`optimise_points`: the points' restarts stacked
like restarts, each matched against its own target, each starting where it would alone) and gives
each point its own result. Problems that cannot share a computation after all (the labels had to
be inferred, different weights) run one after another instead.

Batched, a point's result is the one it gets alone up to float rounding (tested), and a point's
attack time is the batch's. The batch stops when every point asks it to (the study's cancel or
shutdown); a point cancelled alone runs on with the others and is then recorded as cancelled.

On a CPU a batch of 4 ConvNet points (width 16, 16x16 images) ran in 0.66x and a batch of 8 in
0.41x the time of running them one by one (width 64, 32x32: 0.70x and 0.57x); a single point is
faster alone (bench/results/studies-cpu.json, `batched_points`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from service.attacks.points import BATCHED_ATTACKS
from service.jobs.budget import batch_within_memory
from service.jobs.execute import Runner, execute_job, record_spec
from service.jobs.records import JobRecord
from service.jobs.state import StateStore
from service.jobs.types import JobContext, JobResult
from service.specs import JobSpec
from service.storage import ArtifactStore

log = logging.getLogger("gradleak.studies")


def batch_key(spec: Any) -> str | None:
    """Points with equal keys can share one computation; None: this point cannot be batched."""
    if not isinstance(spec, JobSpec) or spec.attack.name not in BATCHED_ATTACKS or spec.data.labels is None:
        return None
    if spec.attack.label_strategy not in ("auto", "known"):
        return None
    fields = {
        "model": spec.model.model_dump(mode="json"),
        "shape": list(spec.data.shape),
        "classes": spec.data.num_classes,
        "normalization": spec.data.model_dump(mode="json").get("normalization"),
        "images": len(spec.data.labels),
        "attack": spec.attack.model_dump(mode="json"),
        "budget": spec.budget.model_dump(mode="json"),
        "knowledge": int(spec.knowledge),
        "kind": spec.update.kind,
        "client": spec.update.client.model_dump(mode="json"),
    }
    return json.dumps(fields, sort_keys=True)


def batchable(waiting: list[JobRecord], limit: int, memory_bytes: int | None = None) -> list[JobRecord]:
    """The first waiting point and up to `limit` - 1 more that can share its computation, no more
    than the worker's memory estimate allows for one batch (service.jobs.budget)."""
    if limit < 2 or not waiting:
        return waiting[:1]
    spec = record_spec(waiting[0])
    key = batch_key(spec)
    if key is None or not isinstance(spec, JobSpec):
        return waiting[:1]
    limit = batch_within_memory(spec, limit, memory_bytes)
    group = [waiting[0]]
    for record in waiting[1:]:
        if len(group) >= limit:
            break
        if batch_key(record_spec(record)) == key:
            group.append(record)
    return group


class PointBatch:
    """The rendezvous of a batch's points: the last to arrive (or the last to wake once every
    point has arrived or left) runs every problem handed in and hands out the results."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.cond = threading.Condition()
        self.entries: dict[int, tuple[Any, Any, Any, Any]] = {}
        self.left: set[int] = set()
        self.results: dict[int, Any] = {}
        self.errors: dict[int, BaseException] = {}
        self.started = False

    def attack(self, slot: int) -> Callable[..., Any]:
        def run(problem: Any, params: Any, control: Any, generator: Any) -> Any:
            with self.cond:
                self.entries[slot] = (problem, params, control, generator)
                self.cond.notify_all()
                while True:
                    if slot in self.results:
                        return self.results[slot]
                    if slot in self.errors:
                        raise self.errors[slot]
                    if not self.started and len(self.entries) + len(self.left) >= self.size:
                        self.started = True
                        break
                    self.cond.wait(0.5)
            results, errors = _run_all(dict(self.entries))
            with self.cond:
                self.results.update(results)
                self.errors.update(errors)
                self.cond.notify_all()
            if slot in errors:
                raise errors[slot]
            return results[slot]

        return run

    def leave(self, slot: int) -> None:
        """A point is done (or never got to its attack): the others no longer wait for it."""
        with self.cond:
            if slot not in self.entries:
                self.left.add(slot)
            self.cond.notify_all()


def _run_all(
    entries: dict[int, tuple[Any, Any, Any, Any]],
) -> tuple[dict[int, Any], dict[int, BaseException]]:
    from service.attacks.points import run_points

    slots = sorted(entries)
    out, failed, _ = run_points([entries[s] for s in slots])
    results = {s: r for s, r in zip(slots, out, strict=True) if r is not None}
    errors = {s: e for s, e in zip(slots, failed, strict=True) if e is not None}
    return results, errors


def run_batch(
    group: list[JobRecord],
    *,
    state: StateStore,
    store: ArtifactStore,
    worker_ids: list[str],
    point_runner: Runner,
    stopper: Callable[[], Any],
    device: str | None,
    lpips_weights_dir: str | None,
) -> None:
    """Run `group`'s points, each through `execute_job` in a thread, their attacks batched."""
    batch = PointBatch(len(group))

    def runner_for(slot: int) -> Runner:
        def run(spec: Any, ctx: JobContext) -> JobResult:
            return point_runner(spec, dataclasses.replace(ctx, attack=batch.attack(slot)))

        return run

    def work(slot: int, record: JobRecord) -> None:
        try:
            execute_job(
                record.id,
                state=state,
                store=store,
                worker_id=worker_ids[slot],
                runner=runner_for(slot),
                stopper=stopper(),
                device=device,
                lpips_weights_dir=lpips_weights_dir,
            )
        except Exception:
            log.exception("point %s: could not be run in its batch", record.id)
        finally:
            batch.leave(slot)

    threads = [
        threading.Thread(target=work, args=(slot, record), name=f"gradleak-point-{slot}", daemon=True)
        for slot, record in enumerate(group)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.info("ran %d points as one batch", len(group))
