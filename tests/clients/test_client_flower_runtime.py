"""The Flower integration inside Flower's own runtime (flwr 1.42 from .flower-env, see flowerkit):
the example app (ServerApp with AuditedStrategy, ClientApp with gradleak_mod), two nodes, three
rounds, against `gradleak serve` on loopback; in the simulation engine and under a SuperLink with
two SuperNodes and `flwr run`. Every sampled audit must be recorded on both sides, including the
client side's, whose ClientApp processes exit long before their audits end."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from flowerkit import APP, flower_environ, free_port, gradleak_serve, processes, spawn, wait_for

from gradleak_client import Client
from gradleak_client.flower import AuditRecord, FlowerAuditor, read_records

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
SIZE = 16
# the app's dependencies are this environment's: no per-run installation (it needs the registry)
SUPERLINK = [
    "flower-superlink",
    "--insecure",
    "--disable-runtime-dependency-installation",
    "--host",
    "127.0.0.1",
]
SUPERNODE = ["flower-supernode", "--insecure", "--superlink"]


def collect(url: str, path: Path) -> list[AuditRecord]:
    """What a later process (here the test's) reads back from a record file: every audit, with
    its verdict once its job has ended."""
    with Client(base_url=url) as client:
        auditor = FlowerAuditor(client, arch="lenet", image_shape=(3, SIZE, SIZE), log_path=path)
        return auditor.collect(timeout=900)


def check_both_sides(url: str, records: Path, audited_round: int, min_seconds: float = 0.0) -> None:
    server, client = read_records(records / "server.jsonl"), read_records(records / "client.jsonl")
    # every update of the audited round, from both nodes, seen from both sides
    assert sorted(r.round for r in server) == [audited_round] * 2
    assert len({r.node_id for r in server}) == 2
    assert sorted(r.round for r in client) == [audited_round] * 2
    assert {r.node_id for r in client} == {r.node_id for r in server}
    facts = {"lr": 0.05, "local_epochs": 1, "batch_size": 4, "num_samples": 4, "protocol": "fedsgd"}
    assert all(r.training == facts and r.job_id for r in server + client)
    # the ServerApp waited for its audits; the server has no client data: a verdict on the estimate
    assert all(r.status == "succeeded" and r.verdict in ("pass", "fail") for r in server)
    assert all(any("estimated" in c["message"] for c in r.checks) for r in server)
    # the ClientApp processes submitted theirs and exited; the jobs went on in the service
    assert all(r.verdict == "pending" for r in client)
    collected = collect(url, records / "client.jsonl")
    assert len(collected) == 2
    for record in collected:
        assert record.status == "succeeded" and record.metrics is not None
        psnr = record.metrics["worst_case"]["psnr"]
        assert record.verdict == ("pass" if psnr <= 20.0 else "fail")
    assert {r.verdict for r in read_records(records / "client.jsonl")} <= {"pass", "fail"}
    with Client(base_url=url) as service:
        for record in server + collected:
            job = service.jobs.get(record.job_id or "")
            assert job.started_at is not None and job.finished_at is not None
            ran = job.finished_at - job.started_at
            assert ran >= timedelta(seconds=min_seconds), f"{record.side} audit {job.id} ran {ran}"


def test_the_simulation_engine_records_every_sampled_audit(tmp_path: Path) -> None:
    records = tmp_path / "records"
    with processes() as started:
        url = gradleak_serve(started, tmp_path)
        args = [sys.executable, str(APP / "flower_photo_patches.py"), "--url", url, "--audit-rounds", "2"]
        args += ["--iterations", "20", "--records", str(records)]
        run = subprocess.run(
            args, env=flower_environ(tmp_path / "flwr"), cwd=tmp_path, capture_output=True, timeout=900
        )
        assert run.returncode == 0, run.stdout.decode()[-3000:] + run.stderr.decode()[-3000:]
        check_both_sides(url, records, audited_round=2)


def test_a_superlink_with_two_supernodes_records_every_sampled_audit(tmp_path: Path) -> None:
    """flower-superlink + 2 flower-supernode + `flwr run` (insecure, loopback), 3 rounds; every
    update of round 2 audited for at least 30 s on each side."""
    records, home = tmp_path / "records", tmp_path / "flwr"
    home.mkdir()
    env = flower_environ(home)
    link = free_port()
    connection = f'address = "127.0.0.1:{link}"\ninsecure = true\n'
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n{connection}')
    with processes() as started:
        url = gradleak_serve(started, tmp_path)
        superlink = spawn(
            started,
            [*SUPERLINK, "--port", str(link), "--database", str(tmp_path / "superlink.db")],
            tmp_path / "superlink.log",
            env,
            tmp_path,
        )
        wait_for(f"http://127.0.0.1:{link}/", superlink, tmp_path / "superlink.log")
        for i in range(2):
            node_config = f"partition-id={i} num-partitions=2"
            spawn(
                started,
                [*SUPERNODE, f"127.0.0.1:{link}", "--port", str(free_port()), "--node-config", node_config],
                tmp_path / f"supernode{i}.log",
                env,
                tmp_path,
            )
        run_config = (
            f"audit-rounds='2' audit-iterations=20000 audit-time-limit-s=30.0 "
            f"audit-records='{records}' gradleak-url='{url}'"
        )
        run = subprocess.run(
            ["flwr", "run", str(APP), "local", "--stream", "--run-config", run_config],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            timeout=1200,
        )
        assert run.returncode == 0, run.stdout.decode()[-3000:] + run.stderr.decode()[-3000:]
        # the stream ends with the run; the ServerApp's last records may still be on their way
        deadline = time.monotonic() + 300
        server_log = records / "server.jsonl"
        while time.monotonic() < deadline:
            done = server_log.exists() and len(read_records(server_log)) == 2
            if done and all(r.verdict != "pending" for r in read_records(server_log)):
                break
            time.sleep(2)
        check_both_sides(url, records, audited_round=2, min_seconds=30.0)
