"""The CI privacy gate: the policy format, checking results against thresholds, and
`gradleak-client audit` end to end on the embedded service, with its exit codes (0 pass, 1 leak,
2 usage or service error), JUnit XML and Markdown summary."""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from clientkit import LEAK_PSNR_DB, MAX_PSNR_DB, policy, write_files, write_policy

from gradleak_client.audit import AuditReport, JobRun, evaluate_job
from gradleak_client.cli import main
from gradleak_client.policy import Policy, PolicyError, Scenario, Threshold
from gradleak_client.types import Job

CI = Path(__file__).resolve().parents[2] / "clients" / "ci"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_files(tmp_path_factory.mktemp("inputs"))


def audit(files: dict[str, Path], out: Path, policy_path: Path, update: str = "gradient", *extra: str) -> int:
    argv = [
        "audit",
        "--policy",
        str(policy_path),
        "--model",
        str(files["weights"]),
        "--update",
        str(files[update]),
        "--ground-truth",
        str(files["truth"]),
        "--out",
        str(out),
        "--embedded",
        "--no-progress",
        *extra,
    ]
    return main(argv)


def junit(out: Path) -> ET.Element:
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    assert suite is not None
    return suite


def psnr_in(message: str) -> float:
    match = re.search(r"worst-case psnr ([0-9.]+) dB", message)
    assert match, message
    return float(match.group(1))


# ---------------------------------------------------------------------------------------------
# the gate end to end
# ---------------------------------------------------------------------------------------------


def test_a_leaking_update_fails_the_gate(files: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "out"
    code = audit(files, out, write_policy(tmp_path / "policy.json"))
    assert code == 1
    assert "gradleak privacy gate: FAIL" in capsys.readouterr().out
    suite = junit(out)
    assert int(suite.get("failures", 0)) >= 1 and suite.get("errors") == "0"
    failures = [f.get("message", "") for f in suite.iter("failure")]
    psnr = [psnr_in(m) for m in failures if "psnr" in m]
    assert psnr and psnr[0] > LEAK_PSNR_DB  # it really leaks: well above the 20 dB threshold
    assert any("ssim" in m and "(image 0)" in m for m in failures)
    skipped = [s.get("message", "") for s in suite.iter("skipped")]
    assert any("lpips unavailable" in m for m in skipped)  # not required, and the reason is given
    summary = (out / "summary.md").read_text()
    assert "FAIL" in summary and "**FAIL**" in summary
    grid = re.search(r"!\[[^\]]*\]\(([^)]+\.png)\)", summary)
    assert grid and (out / grid.group(1)).read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("defended", ["noised", "quantised"])
def test_a_defended_update_passes(files: dict[str, Path], tmp_path: Path, defended: str, capsys: Any) -> None:
    out = tmp_path / "out"
    assert audit(files, out, write_policy(tmp_path / "policy.json"), defended) == 0
    assert "gradleak privacy gate: PASS" in capsys.readouterr().out
    suite = junit(out)
    assert suite.get("failures") == "0" and suite.get("errors") == "0"
    passed = [c.findtext("system-out") or "" for c in suite.iter("testcase")]
    assert psnr_in(next(m for m in passed if "worst-case psnr" in m)) < MAX_PSNR_DB


def test_a_gated_what_if_defense_passes_while_the_shared_update_is_only_reported(
    files: dict[str, Path], tmp_path: Path
) -> None:
    scenarios = [
        {"name": "as-shared", "gate": False},
        {"name": "two-bit quantisation", "defenses": [{"name": "quantize", "bits": 2}]},
    ]
    out = tmp_path / "out"
    assert audit(files, out, write_policy(tmp_path / "policy.json", scenarios=scenarios)) == 0
    suite = junit(out)
    assert suite.get("failures") == "0"
    not_gated = [s.get("message", "") for s in suite.iter("skipped") if "not gated" in s.get("message", "")]
    assert any(psnr_in(m) > LEAK_PSNR_DB for m in not_gated if "psnr" in m)
    summary = (out / "summary.md").read_text()
    assert "would fail (not gated)" in summary and "two-bit quantisation" in summary


def test_usage_errors_exit_2(files: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    good = write_policy(tmp_path / "policy.json")
    no_model = ["audit", "--policy", str(good), "--update", str(files["gradient"]), "--embedded"]
    assert main(no_model) == 2
    assert "needs its model" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(policy(thresholds={"min_psnr": 20})))
    assert audit(files, tmp_path / "out", bad) == 2
    err = capsys.readouterr().err
    assert "higher psnr means more leakage" in err and err.count("\n") == 1  # one line, no traceback
    missing = ["audit", "--policy", str(good), "--update", str(tmp_path / "nope.safetensors")]
    assert main(missing) == 2
    assert "does not exist" in capsys.readouterr().err


def test_without_the_server_package_embedded_says_so(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setitem(sys.modules, "api.app", None)  # as if `gradleak` were not installed
    out = tmp_path / "out"
    assert audit(files, out, write_policy(tmp_path / "policy.json")) == 2
    assert "pip install 'gradleak @ git+" in capsys.readouterr().err
    assert junit(out).get("errors") == "1"  # the CI system still gets a report with the reason


def test_an_unreachable_service_exits_2(files: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    argv = [
        "audit",
        "--policy",
        str(write_policy(tmp_path / "policy.json")),
        "--model",
        str(files["weights"]),
        "--update",
        str(files["gradient"]),
        "--ground-truth",
        str(files["truth"]),
        "--url",
        "http://127.0.0.1:9",
        "--max-retries",
        "0",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 2
    assert "cannot reach the gradleak API" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the policy
# ---------------------------------------------------------------------------------------------


def test_policy_shorthands_and_defaults() -> None:
    p = Policy.from_data(
        {
            "attacks": [
                "dlg",
                {"name": "dlg", "max_eval": 5, "budget": {"iterations": 9}},
                {"attack": {"name": "x"}},
            ],
            "thresholds": {"max_psnr": 18, "min_lpips": 0.25, "max_label_accuracy": 0.5},
        }
    )
    assert p.attack_ids() == ["dlg-1", "dlg-2", "x"]
    assert p.attacks[1].attack == {"name": "dlg", "max_eval": 5} and p.attacks[1].budget == {"iterations": 9}
    assert [(t.metric, t.max, t.min, t.over) for t in p.thresholds] == [
        ("psnr", 18, None, "worst_case"),
        ("lpips", None, 0.25, "worst_case"),
        ("label_accuracy", 0.5, None, "worst_case"),
    ]
    assert p.scenarios == [Scenario(name="as-shared")] and p.scenarios[0].gate


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"thresholds": [{"metric": "psnr", "min": 20}]}, "higher psnr means more leakage"),
        ({"thresholds": [{"metric": "lpips", "max": 0.2}]}, "lower lpips means more leakage"),
        ({"thresholds": [{"metric": "psnr", "max": 20, "min": 1}]}, "exactly one of max and min"),
        ({"thresholds": [{"metric": "label_accuracy", "max": 1, "over": "per_image"}]}, "one value per job"),
        ({"thresholds": {"psnr": 20}}, "unknown threshold 'psnr'"),
        ({"attacks": []}, "attacks"),
        ({"attacks": [{"attack": {"max_eval": 3}}]}, "needs a name"),
        ({"scenarios": [{"name": "a"}, {"name": "a"}]}, "scenario names repeat: a"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_policy_refusals(change: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=re.escape(message)) as info:
        Policy.from_data(policy(**change), "policy.yaml")
    assert str(info.value).startswith("policy.yaml: ") and "\n" not in str(info.value)


def test_yaml_and_json_policies_read_the_same(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(policy()))
    assert Policy.load(tmp_path / "p.yaml") == Policy.load(write_policy(tmp_path / "p.json"))
    with pytest.raises(PolicyError, match="cannot read the policy"):
        Policy.load(tmp_path / "missing.yaml")


def test_the_shipped_ci_files() -> None:
    shipped = Policy.load(CI / "gradleak-policy.yaml")
    assert shipped.model is not None and {s.gate for s in shipped.scenarios} == {True, False}
    github = yaml.safe_load((CI / "github-actions.yml").read_text())
    gitlab = yaml.safe_load((CI / "gitlab-ci.yml").read_text())
    steps = " ".join(str(s.get("run", "")) for s in github["jobs"]["gradleak"]["steps"])
    job = gitlab["gradleak-privacy-gate"]
    for commands in (steps, " ".join(job["script"])):
        assert "gradleak-client audit" in commands and "make_sample_update.py" in commands
    assert job["artifacts"]["reports"]["junit"] == "gradleak-audit/junit.xml"
    # gradleak is not on PyPI: both install from the repository, the client from its subdirectory
    for commands, env in (
        (steps, github["jobs"]["gradleak"]["env"]),
        (" ".join(job["before_script"]), job["variables"]),
    ):
        assert env["GRADLEAK_GIT"].startswith("https://")
        assert '"gradleak @ git+$GRADLEAK_GIT"' in commands
        assert '"gradleak-client[cli] @ git+$GRADLEAK_GIT#subdirectory=clients/python"' in commands


# ---------------------------------------------------------------------------------------------
# checking a result
# ---------------------------------------------------------------------------------------------

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def job_with(metrics: dict[str, Any] | None, status: str = "succeeded", error: Any = None) -> Job:
    return Job.model_validate(
        {
            "id": "job_x",
            "status": status,
            "created_at": NOW,
            "updated_at": NOW,
            "expires_at": NOW,
            "attempts": 1,
            "max_attempts": 3,
            "spec": {},
            "links": {"self": "s", "events": "e", "artifacts": "a"},
            "metrics": metrics,
            "error": error,
        }
    )


METRICS = {
    "num_images": 2,
    "per_image": {"psnr": [12.0, 31.0], "ssim": [0.1, 0.9], "lpips": None},
    "mean": {"psnr": 21.5, "ssim": 0.5, "lpips": None},
    "worst_case": {
        "image": 1,
        "psnr": 31.0,
        "ssim": 0.9,
        "lpips": None,
        "image_by_metric": {"psnr": 1, "ssim": 1},
    },
    "label_accuracy": {"multiset": 1.0, "positional": 0.5},
    "lpips_unavailable": "LPIPS needs 31 pixels a side",
}


def outcomes(
    rules: list[dict[str, Any]], gated: bool = True, job: Job | None = None
) -> list[tuple[str, str]]:
    checks = evaluate_job(job or job_with(METRICS), [Threshold(**r) for r in rules], "s", "a", gated)
    return [(c.outcome, c.message) for c in checks]


def test_thresholds_over_worst_case_mean_and_each_image() -> None:
    assert outcomes([{"metric": "psnr", "max": 20}]) == [("fail", "worst-case psnr 31 dB > 20 dB (image 1)")]
    assert outcomes([{"metric": "psnr", "max": 22, "over": "mean"}]) == [
        ("pass", "mean psnr 21.5 dB <= 22 dB")
    ]
    assert outcomes([{"metric": "ssim", "max": 0.5, "over": "per_image"}]) == [
        ("pass", "per-image ssim 0.1 <= 0.5 (image 0)"),
        ("fail", "per-image ssim 0.9 > 0.5 (image 1)"),
    ]
    assert outcomes(
        [{"metric": "label_accuracy", "max": 0.5}, {"metric": "label_accuracy_positional", "max": 0.5}]
    ) == [
        ("fail", "label_accuracy 1 > 0.5"),
        ("pass", "label_accuracy_positional 0.5 <= 0.5"),
    ]


def test_an_unavailable_metric_is_an_error_unless_not_required() -> None:
    assert outcomes([{"metric": "lpips", "min": 0.3}]) == [
        ("error", "lpips unavailable: LPIPS needs 31 pixels a side")
    ]
    assert outcomes([{"metric": "lpips", "min": 0.3, "required": False}])[0][0] == "skipped"
    no_labels = job_with({**METRICS, "label_accuracy": None})
    assert outcomes([{"metric": "label_accuracy", "max": 1}], job=no_labels)[0][0] == "error"


def test_failed_or_unscored_jobs_are_errors() -> None:
    failed = job_with(None, "failed", {"code": "time_limit", "message": "ran out of time"})
    assert outcomes([{"metric": "psnr", "max": 20}], job=failed) == [
        ("error", "job job_x failed: time_limit: ran out of time")
    ]
    assert "nor a leakage estimate" in outcomes([{"metric": "psnr", "max": 20}], job=job_with(None))[0][1]


def estimate(value: float, lo: float, hi: float) -> dict[str, Any]:
    one = {"value": value, "interval": [lo, hi], "gain_over_floor": value - 12.0, "shadows": [value]}
    return {
        "summary": "s",
        "shadows_run": 3,
        "proxy_data": "the shipped photos",
        "psnr": {"mean": one, "worst_case": one},
        "labels": {"counts": {"3": 1}, "num_images": 1, "certainty": "exact", "why": "one image"},
        "floor": {},
        "unavailable": {"lpips": "LPIPS needs 31 pixels a side"},
    }


def test_without_ground_truth_the_gate_checks_the_estimate() -> None:
    job = job_with(None)
    job = job.model_copy(update={"estimate": estimate(18.0, 15.5, 20.5)})
    # the leaky end of the interval by default, the point estimate on request
    assert outcomes([{"metric": "psnr", "max": 20}], job=job) == [
        ("fail", "estimated worst-case psnr (leaky_end) 20.5 dB > 20 dB")
    ]
    assert outcomes([{"metric": "psnr", "max": 20, "estimate": "value"}], job=job) == [
        ("pass", "estimated worst-case psnr (value) 18 dB <= 20 dB")
    ]
    assert outcomes([{"metric": "psnr", "max": 21, "over": "mean"}], job=job)[0][0] == "pass"
    assert outcomes([{"metric": "lpips", "min": 0.3}], job=job) == [
        ("error", "lpips unavailable: LPIPS needs 31 pixels a side")
    ]
    per_image = outcomes([{"metric": "psnr", "max": 20, "over": "per_image"}], job=job)
    assert per_image[0][0] == "error" and "no ground truth" in per_image[0][1]
    assert outcomes([{"metric": "label_accuracy", "max": 1}], job=job)[0][0] == "error"


def test_the_verdict_a_leak_outranks_an_error_and_what_ifs_do_not_count() -> None:
    p = Policy.from_data(policy())
    leak = evaluate_job(job_with(METRICS), [Threshold(metric="psnr", max=20)], "s", "a", True)
    error = evaluate_job(job_with(METRICS), [Threshold(metric="lpips", min=0.3)], "s", "a", True)
    what_if = evaluate_job(job_with(METRICS), [Threshold(metric="psnr", max=20)], "w", "a", False)
    runs: list[JobRun] = []
    assert AuditReport(p, runs, leak + error).exit_code == 1
    assert AuditReport(p, runs, error + what_if).exit_code == 2
    assert AuditReport(p, runs, what_if).exit_code == 0


# ---------------------------------------------------------------------------------------------
# weak answers: an attack that had not converged, and reasons said once
# ---------------------------------------------------------------------------------------------


def job_converging(iterations: int, needed: int | None = 200) -> Job:
    conv = {
        "iterations": iterations,
        "needed_iterations": needed,
        "converged": None if needed is None else iterations >= needed,
        "basis": "measured" if needed else "no measurement of the iterations dlg needs on lenet",
    }
    return job_with(METRICS).model_copy(update={"result": {"attack": {"convergence": conv}}})


def budget_checks(job: Job, **convergence: Any) -> list[tuple[str, str]]:
    p = Policy.from_data(policy(convergence=convergence))
    checks = evaluate_job(job, [Threshold(metric="psnr", max=40)], "s", "a", True, p.convergence)
    return [(c.outcome, c.message) for c in checks if c.rule == "budget"]


def test_a_tiny_budget_is_a_warning_and_a_policy_may_make_it_fail_the_gate() -> None:
    [(outcome, message)] = budget_checks(job_converging(20))
    assert outcome == "warn" and "not converged" in message and "20 iterations, fewer than the 200" in message
    [(outcome, _)] = budget_checks(job_converging(20), on_unconverged="error")
    assert outcome == "error"
    assert budget_checks(job_converging(200))[0][0] == "pass"
    # unmeasured: said once as skipped, unless the policy names its own minimum
    [(outcome, message)] = budget_checks(job_converging(20, needed=None))
    assert outcome == "skipped" and "no measurement" in message and "min_iterations" in message
    assert budget_checks(job_converging(20, needed=None), min_iterations=50)[0][0] == "warn"
    assert budget_checks(job_converging(300), min_iterations=500)[0][0] == "warn"
    # a warning leaves the verdict as it was; an error makes the gate not pass
    p = Policy.from_data(policy())
    warned = evaluate_job(job_converging(20), [Threshold(metric="psnr", max=40)], "s", "a", True)
    assert AuditReport(p, [], warned).verdict == "pass"
    strict = Policy.from_data(policy(convergence={"on_unconverged": "error"}))
    failed = evaluate_job(
        job_converging(20), [Threshold(metric="psnr", max=40)], "s", "a", True, strict.convergence
    )
    assert AuditReport(strict, [], failed).exit_code == 2


def test_a_job_without_a_convergence_measurement_gets_no_budget_check() -> None:
    assert budget_checks(job_with(METRICS)) == []


def test_the_same_skip_reason_is_said_once(tmp_path: Path) -> None:
    from gradleak_client.audit import write_markdown

    p = Policy.from_data(policy())
    lpips = Threshold(metric="lpips", min=0.3, required=False)
    checks = []
    for scenario in ("a", "b", "c"):
        for attack in ("dlg", "ig"):
            checks += evaluate_job(job_with(METRICS), [lpips], scenario, attack, True)
    assert len(checks) == 6
    summary = write_markdown(AuditReport(p, [], checks), tmp_path / "summary.md").read_text()
    assert summary.count("LPIPS needs 31 pixels a side") == 1
    assert "a / dlg, a / ig, b / dlg, b / ig, c / dlg, c / ig" in summary


def test_a_real_tiny_run_warns_in_the_gate(tmp_path: Path) -> None:
    """The service measures convergence from the run's loss history; the gate reads it."""
    from service.jobs.runner import run_job
    from service.jobs.types import JobContext
    from service.specs import JobSpec
    from service.storage import LocalStore

    spec = JobSpec.model_validate(
        {
            "model": {"arch": "lenet"},
            "update": {"simulate": {"images": ["astronaut"], "labels": [1]}},
            "data": {"shape": [3, 16, 16], "labels": [1]},
            "budget": {"iterations": 20},
        }
    )
    ctx = JobContext(job_id="j", store=LocalStore(tmp_path), prefix="j", resolve=bytes)
    manifest = run_job(spec, ctx).manifest
    job = job_with(manifest["metrics"]).model_copy(
        update={"result": {k: v for k, v in manifest.items() if k != "spec"}}
    )
    [(outcome, message)] = budget_checks(job)
    assert outcome == "warn" and "not converged" in message


def test_a_known_limit_of_the_attack_is_a_warning_that_leaves_the_verdict() -> None:
    """The service lists the attack's known limits that apply (`attack.limits`, e.g. a client
    whose batch norm runs in train mode); the gate says each once per job, as a warning."""
    limit = {"kind": "train_mode_batch_norm", "message": "a low score here is the attack's limit"}
    job = job_with(METRICS).model_copy(update={"result": {"attack": {"limits": [limit]}}})
    checks = evaluate_job(job, [Threshold(metric="psnr", max=40)], "s", "a", True)
    [warned] = [c for c in checks if c.rule == "attack limit"]
    assert warned.outcome == "warn" and warned.message == limit["message"] and warned.job_id == job.id
    assert AuditReport(Policy.from_data(policy()), [], checks).verdict == "pass"
    assert not [c for c in evaluate_job(job_with(METRICS), [], "s", "a", True) if c.rule == "attack limit"]


def test_the_typed_verdict_says_where_each_estimate_came_from() -> None:
    data = estimate(18.0, 15.5, 20.5)
    direct = {**data["psnr"]["worst_case"], "value": 52.0, "source": "direct", "shadow_value": 41.0}
    data["psnr"] = {"mean": data["psnr"]["mean"], "worst_case": direct}
    data["direct"] = {"real": {"applicable": True, "valid": True, "why": "the linear model holds"}}
    verdict = job_with(None).model_copy(update={"estimate": data}).verdict
    assert verdict is not None and verdict.direct is not None and verdict.direct["real"]["valid"]
    worst, mean = verdict.get("psnr"), verdict.get("psnr", "mean")
    assert worst is not None and worst.source == "direct" and worst.shadow_value == 41.0
    assert mean is not None and mean.source == "shadows" and mean.shadow_value is None
