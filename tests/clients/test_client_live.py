"""The SDK and the CLI against a live server: uvicorn on a free loopback port, stopped by the
fixture. Events stream as the job runs; every CLI command is exercised once."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from clientkit import DLG, MODEL_META, UPDATE_META, lenet_files, write_files, write_policy

import gradleak_client as gl
from gradleak_client.cli import main


def run_cli(capsys: Any, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out.strip(), captured.err


def test_events_stream_while_the_job_runs(live_url: str) -> None:
    files = lenet_files()
    with gl.Client(base_url=live_url) as client:
        model = client.models.upload(files["weights"], **MODEL_META)
        update = client.updates.upload(files["gradient"], model_id=model.id, **UPDATE_META)
        job = client.jobs.create(
            update_id=update.id, attack={"name": "inverting_gradients"}, budget={"iterations": 300}
        )
        arrivals: list[tuple[float, gl.JobEvent]] = []
        for event in client.jobs.events(job.id):
            arrivals.append((time.monotonic(), event))
        assert len(arrivals) >= 2
        first, last = arrivals[0][1], arrivals[-1][1]
        assert not first.job.done and last.job.status == "succeeded"
        assert arrivals[-1][0] - arrivals[0][0] > 0.2  # delivered as they happened, not all at the end
        assert any(e.event == "progress" and e.job.progress is not None for _, e in arrivals)
        assert client.artifacts.read(job.id, "grid.png").startswith(b"\x89PNG")


def test_every_cli_command(live_url: str, tmp_path: Path, capsys: Any) -> None:
    paths = write_files(tmp_path / "in")
    url = ("--url", live_url)
    code, model_id, _ = run_cli(
        capsys, "upload", "model", str(paths["weights"]), "--arch", "lenet", "--image-shape", "3,16,16", *url
    )
    assert code == 0 and model_id.startswith("mdl_")
    code, update_id, _ = run_cli(
        capsys,
        "upload",
        "update",
        str(paths["gradient"]),
        "--model-id",
        model_id,
        "--normalization",
        "none",
        "--num-images",
        "1",
        "--protocol",
        "fedsgd",
        *url,
    )
    assert code == 0 and update_id.startswith("upd_")
    code, truth_id, _ = run_cli(capsys, "upload", "ground-truth", str(paths["truth"]), *url)
    assert code == 0 and truth_id.startswith("gt_")
    code, job_id, _ = run_cli(
        capsys,
        "submit",
        "--update-id",
        update_id,
        "--ground-truth-id",
        truth_id,
        "--attack",
        "dlg",
        "--param",
        f"max_eval={DLG['max_eval']}",
        "--iterations",
        "40",
        "--defense",
        "clip:max_norm=1000",
        *url,
    )
    assert code == 0 and job_id.startswith("job_")
    code, waited, _ = run_cli(capsys, "wait", job_id, "--no-progress", *url)
    assert code == 0 and "succeeded" in waited and "psnr" in waited
    code, status, _ = run_cli(capsys, "status", job_id, "--json", *url)
    job = json.loads(status)
    assert code == 0 and job["status"] == "succeeded"
    assert job["spec"]["defenses"] == [{"name": "clip", "max_norm": 1000.0}]
    code, fetched, _ = run_cli(
        capsys, "fetch", job_id, "grid.png", "metrics.json", "-o", str(tmp_path / "out"), *url
    )
    assert code == 0 and sorted(Path(p).name for p in fetched.splitlines()) == ["grid.png", "metrics.json"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]["num_images"] == 1
    code, _, err = run_cli(capsys, "cancel", job_id, *url)
    assert code == 2 and "already succeeded" in err
    code, catalog, _ = run_cli(capsys, "catalog", *url)
    assert code == 0 and "inverting_gradients" in catalog and "knowledge levels:" in catalog


def test_the_gate_against_the_remote_service(live_url: str, tmp_path: Path, capsys: Any) -> None:
    paths = write_files(tmp_path / "in")
    argv = [
        "audit",
        "--policy",
        str(write_policy(tmp_path / "policy.json")),
        "--model",
        str(paths["weights"]),
        "--update",
        str(paths["noised"]),
        "--ground-truth",
        str(paths["truth"]),
        "--url",
        live_url,
        "--out",
        str(tmp_path / "out"),
        "--embed-images",
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "gradleak privacy gate: PASS" in capsys.readouterr().out
    assert "data:image/png;base64," in (tmp_path / "out" / "summary.md").read_text()


def test_a_cli_error_is_one_line(live_url: str, capsys: Any) -> None:
    code, _, err = run_cli(capsys, "status", "job_nope", "--url", live_url)
    assert code == 2 and err.startswith("gradleak-client: error: 404 no job") and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["status"], ["upload", "model", "x.safetensors"], ["nope"]])
def test_bad_command_lines_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
