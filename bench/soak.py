"""Soak: two tenants on a real `gradleak serve` with Redis (arq) and one `gradleak worker`, one of
them hostile. Loopback only; bounded in time.

  python -m bench.soak [--duration 120] [--restart-redis]

The harness starts its own redis-server (append-only file, so a restart keeps the data) on a
free port, the API with API keys required and a worker, and creates a key per tenant.

  idle   the normal tenant runs one small job, then reads its status at a fixed rate with
         nothing else going on: the idle latency figures.
  load   for --duration seconds, two flooder processes of the hostile tenant send, at --flood-rate
         requests per second (50 times its write rate; 0: as fast as the server answers),
         oversize specs (ResNet-152 at 512x512: over the memory budget) and small valid jobs
         (accepted up to its rate and quota of waiting jobs, then 429); the
         normal tenant submits a small job every SUBMIT_EVERY_S (honouring Retry-After) and
         reads its jobs' status at the same fixed rate as in `idle`. With --restart-redis,
         Redis is restarted twice during the phase (needs workers that reconnect).
  drain  the flood stops; the normal tenant's jobs are waited for.

Checks: every job of the normal tenant succeeded; its p99 status latency under load is within
2x of the idle figure (measured by the client from each request's scheduled time; the API's own
time per request, from its access log, is reported beside it as `server_side`); no process
(API, worker and its children) exceeded the worker memory setting (peak RSS from VmHWM).
Writes bench/results/soak.json with the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench.attacks import RESULTS, ROOT, machine

BIN = Path(sys.executable).parent
READ_RATE = 20.0  # status requests per second of the normal tenant, in both phases
IDLE_S = 20.0
SUBMIT_EVERY_S = 8.0
DRAIN_S = 240.0
WORKER_MEMORY_BYTES = 4 * 2**30
FLOODERS = 2

SMALL_JOB = {
    "spec": {
        "model": {"arch": "lenet"},
        "update": {"kind": "gradient", "simulate": {"images": ["astronaut"], "labels": [1]}},
        "data": {"shape": [3, 16, 16], "labels": [1]},
        "budget": {"iterations": 10, "time_limit_s": 60},
    }
}
OVERSIZE_JOB = {
    "spec": {
        "model": {"arch": "resnet152"},
        "update": {"kind": "gradient", "simulate": {"source": "photos"}},
        "data": {"shape": [3, 512, 512]},
    }
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


ACCESS_LINE = re.compile(r"^(\S+ \S+) INFO gradleak\.access \[\S+\] GET /v1/jobs/job_\S+ 200 ([\d.]+)ms$")


def server_side(log: Path, start: float, end: float) -> list[float]:
    """The time the API spent on the normal tenant's status reads between two wall-clock times,
    from its access log: the server's share of the latency, without the client's scheduling."""
    out = []
    for line in log.read_text().splitlines():
        m = ACCESS_LINE.match(line)
        if m:
            at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if start <= at <= end:
                out.append(float(m.group(2)) / 1000)
    return out


def summary_ms(latencies: list[float]) -> dict[str, float]:
    return {
        "requests": len(latencies),
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2),
    }


# --------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------


class Redis:
    def __init__(self, workdir: Path) -> None:
        self.port, self.dir = free_port(), workdir / "redis"
        self.dir.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir)]
        args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
        log = (self.dir / "redis.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=log)
        wait_until(lambda: self.ping(), 20, "redis-server")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def tree(pid: int) -> list[int]:
    """The process and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def status_field(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemoryWatch(threading.Thread):
    """The peak RSS of each watched process and its descendants (VmHWM, and VmRSS sampled so that a
    child that exits is still counted)."""

    def __init__(self, roots: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.roots, self.peaks = roots, {name: 0 for name in roots}
        self.done = threading.Event()

    def sample(self) -> None:
        for name, root in self.roots.items():
            for pid in tree(root):
                self.peaks[name] = max(
                    self.peaks[name], status_field(pid, "VmHWM"), status_field(pid, "VmRSS")
                )

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.sample()


# --------------------------------------------------------------------------------------------
# the tenants
# --------------------------------------------------------------------------------------------


def flood(url: str, key: str, until: float, rate: float, results: Any) -> None:
    """The hostile tenant: oversize specs and small jobs, alternately, at `rate` requests per second
    (0: as fast as answered)."""
    counts: dict[str, int] = {}
    start = time.monotonic()
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        i = 0
        while time.monotonic() < until:
            if rate > 0 and (wait := start + i / rate - time.monotonic()) > 0:
                time.sleep(wait)
            body = OVERSIZE_JOB if i % 2 == 0 else SMALL_JOB
            kind = "oversize" if i % 2 == 0 else "small"
            try:
                status = str(c.post("/v1/jobs", json=body).status_code)
            except httpx.HTTPError as e:
                status = type(e).__name__
            counts[f"{kind} {status}"] = counts.get(f"{kind} {status}", 0) + 1
            i += 1
    results.put(counts)


class Normal:
    """The normal tenant: small jobs at a steady pace, and status reads at a fixed rate."""

    def __init__(self, url: str, key: str) -> None:
        self.client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        self.jobs: list[str] = []
        self.submit_retries = 0

    def submit(self) -> None:
        while True:
            r = self.client.post("/v1/jobs", json=SMALL_JOB)
            if r.status_code == 202:
                self.jobs.append(r.json()["id"])
                return
            if r.status_code != 429:
                raise RuntimeError(f"the normal tenant's job was refused: {r.status_code} {r.text}")
            self.submit_retries += 1
            time.sleep(float(r.headers.get("retry-after", "1")))

    def read_at_rate(self, seconds: float, during: Any = None) -> list[float]:
        """GET each job's status in turn at READ_RATE for `seconds`; latencies measured from each
        request's scheduled time (no coordinated omission). `during(elapsed)` runs between reads."""
        latencies: list[float] = []
        start = time.monotonic()
        n = 0
        while (elapsed := time.monotonic() - start) < seconds:
            scheduled = start + n / READ_RATE
            if scheduled > time.monotonic():
                time.sleep(scheduled - time.monotonic())
            r = self.client.get(f"/v1/jobs/{self.jobs[n % len(self.jobs)]}")
            latencies.append(time.monotonic() - scheduled)
            if r.status_code != 200:
                raise RuntimeError(f"status read failed: {r.status_code} {r.text}")
            n += 1
            if during is not None:
                during(elapsed)
        return latencies

    def statuses(self) -> dict[str, str]:
        return {j: self.client.get(f"/v1/jobs/{j}").json()["status"] for j in self.jobs}


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def run(duration: float, restart_redis: bool, flood_rate: float) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="gradleak-soak-"))
    redis = Redis(workdir)
    redis.start()
    env = {
        **os.environ,
        "GRADLEAK_DATA_DIR": str(workdir / "data"),
        "GRADLEAK_REDIS_URL": redis.url,
        "GRADLEAK_AUTH_REQUIRED": "true",
        "GRADLEAK_WORKER_MEMORY_BYTES": str(WORKER_MEMORY_BYTES),
        "GRADLEAK_LOG_LEVEL": "INFO",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("GRADLEAK_S3_ENDPOINT", None)
    keys = {}
    for tenant in ("normal", "flood"):
        made = subprocess.run(
            [str(BIN / "gradleak"), "keys", "create", "--tenant", tenant],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        keys[tenant] = made.stdout.strip()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (workdir / "service.log").open("wb")
    api = subprocess.Popen(
        [str(BIN / "gradleak"), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=log,
    )
    # The worker runs at a lower priority: on a shared machine, attacks yield to API requests.
    worker = subprocess.Popen(
        [str(BIN / "gradleak"), "worker"], env=env, stdout=log, stderr=log, preexec_fn=lambda: os.nice(10)
    )
    watch = MemoryWatch({"api": api.pid, "worker": worker.pid})
    restarts: list[float] = []
    try:
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 120, "the API")
        watch.start()
        normal = Normal(url, keys["normal"])
        normal.submit()
        wait_until(lambda: normal.statuses()[normal.jobs[0]] == "succeeded", 120, "the first job")
        load_average = {"before_idle": os.getloadavg()[0]}
        phases = {"idle": [time.time()]}
        idle = normal.read_at_rate(IDLE_S)
        phases["idle"].append(time.time())

        until = time.monotonic() + duration
        results: Any = multiprocessing.get_context("spawn").Queue()
        flooders = [
            multiprocessing.get_context("spawn").Process(
                target=flood, args=(url, keys["flood"], until, flood_rate / FLOODERS, results)
            )
            for _ in range(FLOODERS)
        ]
        for p in flooders:
            p.start()
        next_submit = [0.0]

        def during(elapsed: float) -> None:
            if elapsed >= next_submit[0]:
                normal.submit()
                next_submit[0] += SUBMIT_EVERY_S
            due = [duration / 3, 2 * duration / 3] if restart_redis else []
            if len(restarts) < len(due) and elapsed >= due[len(restarts)]:
                redis.stop()
                redis.start()
                restarts.append(round(elapsed, 1))

        phases["load"] = [time.time()]
        loaded = normal.read_at_rate(duration, during)
        phases["load"].append(time.time())
        load_average["after_load"] = os.getloadavg()[0]
        flood_counts: dict[str, int] = {}
        for p in flooders:
            for k, v in results.get(timeout=60).items():
                flood_counts[k] = flood_counts.get(k, 0) + v
            p.join(30)

        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline:
            final = normal.statuses()
            if all(s in ("succeeded", "failed", "cancelled") for s in final.values()):
                break
            time.sleep(1.0)
        final = normal.statuses()
        watch.sample()
        worker_alive = worker.poll() is None
    finally:
        watch.done.set()
        for proc in (worker, api):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        redis.stop()

    idle_p99, load_p99 = percentile(idle, 99), percentile(loaded, 99)
    server = {name: server_side(workdir / "service.log", *span) for name, span in phases.items()}
    succeeded = sum(s == "succeeded" for s in final.values())
    checks = {
        "normal_jobs_all_succeeded": succeeded == len(final),
        "p99_within_2x_of_idle": load_p99 <= 2 * idle_p99,
        "memory_within_setting": all(v <= WORKER_MEMORY_BYTES for v in watch.peaks.values()),
        "worker_alive": worker_alive,
    }
    return {
        "benchmark": "soak",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {**machine(), "load_average_1min": load_average},
        "settings": {
            "duration_s": duration,
            "idle_s": IDLE_S,
            "read_rate_per_s": READ_RATE,
            "submit_every_s": SUBMIT_EVERY_S,
            "flooders": FLOODERS,
            "flood_rate_per_s": flood_rate or "as fast as answered",
            "worker_memory_bytes": WORKER_MEMORY_BYTES,
            "redis_restarts": restart_redis,
            "quotas": "server defaults (README)",
        },
        "idle": summary_ms(idle),
        "load": summary_ms(loaded),
        "p99_load_over_idle": round(load_p99 / idle_p99, 2),
        # the API's own time per status read (access log), without the client's scheduling delays
        "server_side": {
            "idle": summary_ms(server["idle"]),
            "load": summary_ms(server["load"]),
            "p99_load_over_idle": round(percentile(server["load"], 99) / percentile(server["idle"], 99), 2),
        },
        "normal_tenant": {
            "jobs": len(final),
            "succeeded": succeeded,
            "statuses": sorted(set(final.values())),
            "submissions_retried_after_429": normal.submit_retries,
        },
        "flood_tenant": dict(sorted(flood_counts.items())),
        "peak_rss_bytes": watch.peaks,
        "redis_restarted_at_s": restarts,
        "checks": checks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument(
        "--restart-redis",
        action="store_true",
        help="restart Redis twice during the load (needs reconnecting workers)",
    )
    parser.add_argument(
        "--flood-rate",
        type=float,
        default=100.0,
        help="the hostile tenant's requests per second, all flooders together (0: as fast as answered)",
    )
    parser.add_argument("--out", default=str(RESULTS / "soak.json"))
    args = parser.parse_args()
    result = run(args.duration, args.restart_redis, args.flood_rate)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    shown = ("idle", "load", "p99_load_over_idle", "server_side", "checks")
    print(json.dumps({k: result[k] for k in shown}, indent=2))


if __name__ == "__main__":
    main()
