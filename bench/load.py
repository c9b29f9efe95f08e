"""API load benchmark: the embedded default (`gradleak serve`, nothing configured) on this machine.

Phases, each bounded in time and count:
  idle       GET /v1/jobs/{id} of a finished job, nothing running: saturation (closed loop,
             CONNECTIONS connections) and latency at a fixed offered rate (open loop, RATE req/s)
  submit     POST /v1/jobs of SUBMISSIONS small jobs one after another, then DELETE (cancel) each
  attack     the same GET measurements while a real attack runs in the worker process

Targets: >= 500 status requests/s with p99 < 100 ms on 2 cores, and no request slowed by the
running attack (compare `attack` with `idle`). The load generator is a small HTTP/1.1 keep-alive
client on raw sockets, so that the client's own overhead stays low beside the server on 2 cores.
Open-loop latencies are measured from each request's scheduled time (no coordinated omission).

  python bench/load.py            # writes bench/results/load.json
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "load.json"

CONNECTIONS = 8
RATE = 500.0  # offered requests/s in the open-loop runs
PHASE_S = 8.0
MAX_REQUESTS = 20_000  # per measurement, whatever the duration
SUBMISSIONS = 40

TINY_JOB = {
    "spec": {
        "model": {"arch": "lenet"},
        "update": {"simulate": {"images": ["astronaut"], "labels": [1]}},
        "data": {"shape": [3, 16, 16], "labels": [1]},
        "attack": {"name": "dlg"},
        "budget": {"iterations": 5, "time_limit_s": 60},
    }
}
# A real attack that keeps the worker busy for the whole attack phase (it is cancelled after).
LONG_JOB = {
    "spec": {
        "model": {"arch": "convnet", "knobs": {"width": 32}},
        "update": {"simulate": {"images": ["astronaut"], "labels": [1]}},
        "data": {"shape": [3, 32, 32], "labels": [1]},
        "attack": {"name": "inverting_gradients"},
        "budget": {"iterations": 20_000, "time_limit_s": 600},
    }
}


class Connection:
    """One keep-alive HTTP/1.1 connection; just enough protocol for JSON requests and replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer, host)

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
        payload = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(payload)}\r\n"
        if body is not None:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + payload)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        data = await self.reader.readexactly(length) if length else b""
        return int(status_line.split()[1]), data

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def summary(latencies: list[float], elapsed: float, errors: int) -> dict[str, Any]:
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return (
            round(1000 * ordered[min(len(ordered) - 1, int(p * len(ordered)))], 2)
            if ordered
            else float("nan")
        )

    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 2),
        "requests_per_s": round(len(latencies) / elapsed, 1) if elapsed else 0.0,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(1000 * ordered[-1], 2) if ordered else float("nan"),
        "mean_ms": round(1000 * statistics.fmean(ordered), 2) if ordered else float("nan"),
    }


async def closed_loop(host: str, port: int, path: str, duration: float) -> dict[str, Any]:
    """CONNECTIONS clients, each sending its next request when the last is answered: throughput."""
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    stop_at = start + duration

    async def client() -> None:
        nonlocal errors
        conn = await Connection.open(host, port)
        while time.perf_counter() < stop_at and len(latencies) < MAX_REQUESTS:
            t = time.perf_counter()
            status, _ = await conn.request("GET", path)
            latencies.append(time.perf_counter() - t)
            errors += status != 200
        await conn.close()

    await asyncio.gather(*(client() for _ in range(CONNECTIONS)))
    return summary(latencies, time.perf_counter() - start, errors)


async def open_loop(host: str, port: int, path: str, duration: float, rate: float) -> dict[str, Any]:
    """Requests at a fixed rate, spread over CONNECTIONS connections; latency from schedule."""
    latencies: list[float] = []
    errors = 0
    interval = CONNECTIONS / rate
    count = min(int(duration * rate), MAX_REQUESTS) // CONNECTIONS
    start = time.perf_counter() + 0.05

    async def client(offset: int) -> None:
        nonlocal errors
        conn = await Connection.open(host, port)
        for i in range(count):
            scheduled = start + (i + offset / CONNECTIONS) * interval
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            status, _ = await conn.request("GET", path)
            latencies.append(time.perf_counter() - scheduled)
            errors += status != 200
        await conn.close()

    await asyncio.gather(*(client(k) for k in range(CONNECTIONS)))
    summary_ = summary(latencies, time.perf_counter() - start, errors)
    summary_["offered_per_s"] = rate
    return summary_


async def submissions(host: str, port: int) -> dict[str, Any]:
    conn = await Connection.open(host, port)
    posts: list[float] = []
    deletes: list[float] = []
    ids = []
    errors = 0
    start = time.perf_counter()
    for _ in range(SUBMISSIONS):
        t = time.perf_counter()
        status, body = await conn.request("POST", "/v1/jobs", TINY_JOB)
        posts.append(time.perf_counter() - t)
        errors += status != 202
        ids.append(json.loads(body)["id"])
    post_elapsed = time.perf_counter() - start
    start = time.perf_counter()
    for job_id in ids:
        t = time.perf_counter()
        status, _ = await conn.request("DELETE", f"/v1/jobs/{job_id}")
        deletes.append(time.perf_counter() - t)
        errors += status not in (200, 202, 409)
    delete_elapsed = time.perf_counter() - start
    await conn.close()
    return {"post": summary(posts, post_elapsed, errors), "delete": summary(deletes, delete_elapsed, 0)}


async def job(host: str, port: int, job_id: str) -> dict[str, Any]:
    conn = await Connection.open(host, port)
    try:
        _, body = await conn.request("GET", f"/v1/jobs/{job_id}")
    finally:
        await conn.close()
    return json.loads(body)


async def wait_job(host: str, port: int, job_id: str, done: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = await job(host, port, job_id)
        if done(current):
            return current
        await asyncio.sleep(0.2)
    raise RuntimeError(f"job {job_id} did not reach the expected state in {timeout}s")


async def submit(host: str, port: int, body: dict[str, Any]) -> str:
    conn = await Connection.open(host, port)
    try:
        status, reply = await conn.request("POST", "/v1/jobs", body)
    finally:
        await conn.close()
    if status != 202:
        raise RuntimeError(f"job submission failed: {status} {reply[:500]!r}")
    return json.loads(reply)["id"]


async def cancel(host: str, port: int, job_id: str) -> None:
    conn = await Connection.open(host, port)
    try:
        await conn.request("DELETE", f"/v1/jobs/{job_id}")
    finally:
        await conn.close()


async def run(host: str, port: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    warm = await submit(host, port, TINY_JOB)
    finished = await wait_job(host, port, warm, lambda j: j["status"] in ("succeeded", "failed"), 300)
    if finished["status"] != "succeeded":
        raise RuntimeError(f"the warm-up job failed: {finished['error']}")
    path = f"/v1/jobs/{warm}"
    results["idle"] = {
        "closed_loop": await closed_loop(host, port, path, PHASE_S),
        "open_loop": await open_loop(host, port, path, PHASE_S, RATE),
    }
    results["submit"] = await submissions(host, port)

    long_id = await submit(host, port, LONG_JOB)

    def attacking(j: dict[str, Any]) -> bool:
        return j["status"] == "running" and (j["progress"] or {}).get("stage") == "attack"

    before = await wait_job(host, port, long_id, attacking, 300)
    path = f"/v1/jobs/{long_id}"
    during = {
        "closed_loop": await closed_loop(host, port, path, PHASE_S),
        "open_loop": await open_loop(host, port, path, PHASE_S, RATE),
    }
    after = await job(host, port, long_id)
    during["job_running_throughout"] = after["status"] == "running"
    during["attack_iterations_during_phase"] = (
        after["progress"]["iteration"] - before["progress"]["iteration"]
    )
    results["attack"] = during
    await cancel(host, port, long_id)
    await wait_job(host, port, long_id, lambda j: j["status"] == "cancelled", 60)
    return results


def machine() -> dict[str, Any]:
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        model = next(
            (ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if "model name" in ln), ""
        )
    mem = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        mem = meminfo.read_text().splitlines()[0].split(":", 1)[1].strip()
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory": mem,
        "load_average_at_start": os.getloadavg(),
        "git_commit": commit,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    info = machine()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="gradleak-load-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRADLEAK_")}
        env["GRADLEAK_DATA_DIR"] = tmp
        env["GRADLEAK_LOG_LEVEL"] = "WARNING"
        log = Path(tmp) / "server.log"
        gradleak = Path(sys.executable).parent / "gradleak"
        with log.open("wb") as out:
            server = subprocess.Popen(
                [str(gradleak), "serve", "--host", "127.0.0.1", "--port", str(port)],
                env=env,
                stdout=out,
                stderr=out,
            )
            try:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
                        break
                    except OSError:
                        if time.monotonic() > deadline or server.poll() is not None:
                            raise RuntimeError("the server did not start:\n" + log.read_text()) from None
                        time.sleep(0.2)
                results = asyncio.run(run("127.0.0.1", port))
            finally:
                server.terminate()
                server.wait(60)
    idle, attack = results["idle"]["open_loop"], results["attack"]["open_loop"]
    report = {
        "benchmark": "API load, embedded default (gradleak serve, SQLite, local artifacts, worker process)",
        "machine": info,
        "settings": {"connections": CONNECTIONS, "open_loop_rate_per_s": RATE, "phase_s": PHASE_S},
        "results": results,
        "targets": {
            "status_requests_per_s_at_least": 500,
            "status_p99_ms_below": 100,
            "met_while_attacking": (
                results["attack"]["closed_loop"]["requests_per_s"] >= 500 and attack["p99_ms"] < 100
            ),
            "p99_ms_idle_vs_attack": [idle["p99_ms"], attack["p99_ms"]],
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["results"], indent=2))
    print(json.dumps(report["targets"], indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
