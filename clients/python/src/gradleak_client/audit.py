"""The CI privacy gate: run a policy's attacks (under its what-if defenses) on an update through
any `Client` (remote, or the embedded service), check every result against the thresholds, and
write a JUnit XML and a Markdown summary for CI systems to show.

The verdict: `fail` when a gated result leaks beyond a threshold (exit code 1), else `error`
when a gated job or metric could not be checked (exit code 2), else `pass` (exit code 0). An
attack that had not converged within its budget is a warning (`warn`), or an error when the
policy's `convergence.on_unconverged` says so: its pass is weak evidence. Without the ground
truth the jobs make a leakage estimate and the thresholds apply to it.

    >>> from gradleak_client import Client
    >>> from gradleak_client.audit import AuditInputs, run_audit
    >>> from gradleak_client.policy import Policy
    >>> report = run_audit(Client(), Policy.load("policy.yaml"),
    ...                    AuditInputs(model="model.safetensors", update="update.safetensors",
    ...                                ground_truth="batch.safetensors"))
    >>> report.verdict, report.exit_code
    ('fail', 1)
"""

from __future__ import annotations

import base64
import os
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gradleak_client._client import Client
from gradleak_client._exceptions import GradleakError, WaitTimeoutError
from gradleak_client._resources import FileInput, Progress
from gradleak_client.policy import (
    ESTIMATED_METRICS,
    LABEL_METRICS,
    MORE_LEAK_WHEN_HIGHER,
    UNITS,
    AttackRun,
    Convergence,
    Policy,
    Scenario,
    Threshold,
)
from gradleak_client.types import Estimate, Job, Metrics

Outcome = Literal["pass", "fail", "error", "skipped", "warn"]
Verdict = Literal["pass", "fail", "error"]
EXIT_CODES: dict[Verdict, int] = {"pass": 0, "fail": 1, "error": 2}
GRID = "grid.png"


class AuditUsageError(GradleakError):
    """The audit cannot run as asked (missing inputs); nothing was submitted."""


@dataclass(frozen=True)
class AuditInputs:
    """What to audit: files to upload (paths, bytes or file objects), or ids of earlier uploads."""

    model: FileInput | None = None
    update: FileInput | None = None
    ground_truth: FileInput | None = None
    update_id: str | None = None
    ground_truth_id: str | None = None
    # proxy images for the leakage estimate (uploaded as a ground-truth set and named as the jobs'
    # verdict.proxy_data); default: the policy's verdict.proxy_data
    proxy_data: FileInput | None = None


@dataclass(frozen=True)
class Check:
    """One threshold checked on one job (and one image, for per-image thresholds)."""

    scenario: str
    attack: str
    rule: str
    outcome: Outcome
    message: str
    gated: bool
    job_id: str | None = None
    value: float | None = None
    image: int | None = None


@dataclass
class JobRun:
    scenario: Scenario
    attack_id: str
    attack: AttackRun
    job: Job | None = None
    error: str | None = None
    grid: Path | None = None

    @property
    def label(self) -> str:
        return f"{self.scenario.name} / {self.attack_id}"


@dataclass
class AuditReport:
    policy: Policy
    runs: list[JobRun]
    checks: list[Check] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def verdict(self) -> Verdict:
        gated = [c for c in self.checks if c.gated]
        if any(c.outcome == "fail" for c in gated):
            return "fail"
        if any(c.outcome == "error" for c in gated):
            return "error"
        return "pass"

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def checks_of(self, run: JobRun) -> list[Check]:
        return [c for c in self.checks if c.scenario == run.scenario.name and c.attack == run.attack_id]


# ---------------------------------------------------------------------------------------------
# checking results
# ---------------------------------------------------------------------------------------------


def _fmt(value: float, metric: str) -> str:
    return f"{value:.4g}{UNITS.get(metric, '')}"


def _values(scores: Metrics, rule: Threshold) -> tuple[list[tuple[int | None, float]] | None, str]:
    """The values a threshold applies to, with their ground-truth image index, or None and why."""
    metric = rule.metric
    if metric in LABEL_METRICS:
        if scores.label_accuracy is None:
            return None, "the ground truth has no labels, so label accuracy was not computed"
        la = scores.label_accuracy
        return [(None, la.multiset if metric == "label_accuracy" else la.positional)], ""
    reason = scores.unavailable.get(metric, f"the result has no {metric}")
    if rule.over == "per_image":
        values = scores.per_image.get(metric)
        return (None, reason) if values is None else (list(enumerate(values)), "")
    if rule.over == "mean":
        mean = scores.mean.get(metric)
        return (None, reason) if mean is None else ([(None, float(mean))], "")
    worst = scores.worst_case.get(metric)
    if worst is None:
        return None, reason
    image = (scores.worst_case.get("image_by_metric") or {}).get(metric)
    return [(image, float(worst))], ""


def convergence_check(job: Job, policy: Convergence, scenario: str, attack: str, gated: bool) -> Check | None:
    """Was the attack's budget enough? The iterations it ran against those it needs: the policy's
    `min_iterations`, else what the service measured the attack to need on the architecture
    (`attack.convergence`). None when the service did not report it."""
    conv = ((job.result or {}).get("attack") or {}).get("convergence")
    if not isinstance(conv, dict):
        return None
    iterations = conv.get("iterations")
    needed = policy.min_iterations or conv.get("needed_iterations")
    if needed is None or iterations is None:
        message = (
            f"budget not judged: {conv.get('basis', 'no measurement')}; "
            "set the policy's convergence.min_iterations to require one"
        )
        return Check(scenario, attack, "budget", "skipped", message, gated, job.id)
    basis = "the policy's convergence.min_iterations" if policy.min_iterations else conv.get("basis")
    if iterations >= needed:
        message = f"enough iterations: {iterations} >= {needed} ({basis})"
        return Check(scenario, attack, "budget", "pass", message, gated, job.id, float(iterations))
    weak: Outcome = "error" if policy.on_unconverged == "error" else "warn"
    message = (
        f"not converged: the attack ran {iterations} iterations, fewer than the {needed} it needs "
        f"({basis}); a pass says little: raise the attack's budget"
    )
    return Check(scenario, attack, "budget", weak, message, gated, job.id, float(iterations))


def limits_checks(job: Job, scenario: str, attack: str, gated: bool) -> list[Check]:
    """A warning for each known limit of the attack that the service found in this run
    (`attack.limits`, e.g. a client whose batch norm runs in train mode): a pass under one says
    little about the update's safety."""
    found = ((job.result or {}).get("attack") or {}).get("limits") or []
    return [
        Check(scenario, attack, "attack limit", "warn", str(limit.get("message", limit)), gated, job.id)
        for limit in found
        if isinstance(limit, dict)
    ]


def _estimated(estimate: Estimate, rule: Threshold) -> tuple[list[tuple[int | None, float]] | None, str]:
    """The estimate a threshold applies to when there is no ground truth, or None and why."""
    if rule.metric not in ESTIMATED_METRICS or rule.over == "per_image":
        return None, (
            f"no ground truth, and the leakage estimate has no {rule.subject()} "
            "(only mean and worst-case psnr, ssim, lpips)"
        )
    value = estimate.get(rule.metric, rule.over)
    if value is None:
        return None, estimate.unavailable.get(rule.metric, f"the estimate has no {rule.metric}")
    if rule.estimate == "value":
        return [(None, value.value)], ""
    lo, hi = value.interval
    return [(None, hi if MORE_LEAK_WHEN_HIGHER[rule.metric] else lo)], ""


def _exact(estimate: Estimate, rule: Threshold) -> bool:
    value = estimate.get(rule.metric, rule.over) if rule.metric == "psnr" else None
    return bool(value is not None and value.exact)


def evaluate_job(
    job: Job,
    thresholds: list[Threshold],
    scenario: str,
    attack: str,
    gated: bool,
    convergence: Convergence | None = None,
) -> list[Check]:
    """Check a finished job's metrics against every threshold, and whether its attack converged."""
    if job.status != "succeeded":
        why = f": {job.error.code}: {job.error.message}" if job.error is not None else ""
        return [Check(scenario, attack, "job", "error", f"job {job.id} {job.status}{why}", gated, job.id)]
    scores, estimate = job.scores, job.verdict
    if scores is None and estimate is None:
        message = f"job {job.id} has neither metrics (no ground truth) nor a leakage estimate"
        return [Check(scenario, attack, "job", "error", message, gated, job.id)]
    checks = []
    for rule in thresholds:
        if scores is not None:
            values, reason = _values(scores, rule)
        else:
            assert estimate is not None
            values, reason = _estimated(estimate, rule)
        if values is None:
            outcome: Outcome = "error" if rule.required else "skipped"
            message = f"{rule.metric} unavailable: {reason}"
            checks.append(Check(scenario, attack, rule.describe(), outcome, message, gated, job.id))
            continue
        for image, value in values:
            passed = rule.passes(value)
            op = ("<=" if passed else ">") if rule.max is not None else (">=" if passed else "<")
            where = "" if image is None else f" (image {image})"
            bound = _fmt(rule.bound, rule.metric)
            subject = (
                rule.subject() if scores is not None else f"estimated {rule.subject()} ({rule.estimate})"
            )
            message = f"{subject} {_fmt(value, rule.metric)} {op} {bound}{where}"
            if estimate is not None and scores is None and _exact(estimate, rule):
                message += " (at least 40 dB: an exact reconstruction)"
            name = rule.describe() if rule.over != "per_image" else f"{rule.describe()} [image {image}]"
            outcome = "pass" if passed else "fail"
            checks.append(Check(scenario, attack, name, outcome, message, gated, job.id, value, image))
    budget = convergence_check(job, convergence or Convergence(), scenario, attack, gated)
    return [*checks, *([] if budget is None else [budget]), *limits_checks(job, scenario, attack, gated)]


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "job"


def check_inputs(policy: Policy, inputs: AuditInputs) -> None:
    """Refuse, before anything is uploaded, inputs the audit cannot run on."""
    if inputs.update_id is not None:
        return
    if inputs.update is None:
        raise AuditUsageError("give the update to audit (a safetensors file) or the id of an uploaded one")
    if inputs.model is None or policy.model is None:
        raise AuditUsageError(
            "uploading an update needs its model: give the model checkpoint (safetensors) and the "
            "policy's `model` section (arch, image_shape, num_classes)"
        )


def _proxy_data_id(client: Client, policy: Policy, inputs: AuditInputs) -> str | None:
    """The upload id of the proxy images the jobs' leakage estimates use, uploading a file once."""
    if inputs.proxy_data is not None:
        return client.ground_truth.upload(inputs.proxy_data).id
    named = policy.verdict.proxy_data
    if named is None:
        return None
    if not named.startswith("gt_"):
        raise AuditUsageError(
            f"verdict.proxy_data {named!r} is a file: give it to the audit (AuditInputs.proxy_data, or "
            "the CLI reads it relative to the policy's folder), or give an uploaded set's id (gt_...)"
        )
    return named


def _upload(client: Client, policy: Policy, inputs: AuditInputs) -> tuple[str, str | None]:
    check_inputs(policy, inputs)
    if inputs.update_id is not None:
        update_id = inputs.update_id
    else:
        assert inputs.model is not None and inputs.update is not None and policy.model is not None
        m = policy.model
        model = client.models.upload(
            inputs.model, arch=m.arch, image_shape=m.image_shape, num_classes=m.num_classes, knobs=m.knobs
        )
        u = policy.update
        update_id = client.updates.upload(
            inputs.update,
            model_id=model.id,
            kind=u.kind,
            client=u.client,
            normalization=u.normalization,  # type: ignore[arg-type]
            num_images=u.num_images,
            labels=u.labels,
        ).id
    if inputs.ground_truth_id is not None or inputs.ground_truth is None:
        return update_id, inputs.ground_truth_id  # none: each job makes a leakage estimate
    return update_id, client.ground_truth.upload(inputs.ground_truth).id


def run_audit(
    client: Client,
    policy: Policy,
    inputs: AuditInputs,
    *,
    timeout: float | None = None,
    progress: Progress = False,
    artifacts_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> AuditReport:
    """Upload the inputs, submit one job per attack and scenario, wait for all of them (within
    `timeout` seconds in total; jobs still running then are cancelled), download their grids to
    `artifacts_dir` and check the thresholds. API errors while uploading or submitting
    propagate (GradleakError); a job that fails is reported as an error of the gate."""
    say = log or (lambda _m: None)
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    update_id, truth_id = _upload(client, policy, inputs)
    verdict = policy.verdict.request(_proxy_data_id(client, policy, inputs)) or None
    runs = [
        JobRun(scenario, attack_id, attack)
        for scenario in policy.scenarios
        for attack_id, attack in zip(policy.attack_ids(), policy.attacks, strict=True)
    ]
    for run in runs:
        run.job = client.jobs.create(
            update_id=update_id,
            ground_truth_id=truth_id,
            attack=run.attack.attack,
            knowledge=run.attack.knowledge if run.attack.knowledge is not None else policy.knowledge,
            defenses=run.scenario.defenses,
            budget=run.attack.budget,
            seed=policy.seed,
            verdict=verdict,
        )
        say(f"submitted {run.label}: {run.job.id}")
    grids = None if artifacts_dir is None else Path(artifacts_dir)
    if grids is not None:
        grids.mkdir(parents=True, exist_ok=True)
    for i, run in enumerate(runs):
        assert run.job is not None
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            run.job = client.jobs.wait(run.job.id, timeout=remaining, progress=progress)
        except WaitTimeoutError as e:
            assert timeout is not None and isinstance(e.job, Job)
            run.job, run.error = e.job, f"not finished within the audit's timeout of {timeout:g}s"
            for pending in runs[i:]:
                _cancel(client, pending)
            break
        if grids is not None and run.job.status == "succeeded":
            target = grids / f"{_slug(run.scenario.name)}--{_slug(run.attack_id)}.png"
            try:
                run.grid = client.artifacts.download(run.job.id, GRID, target)
            except GradleakError as e:
                say(f"{run.label}: could not download the reconstruction grid: {e}")
    report = AuditReport(policy, runs, elapsed_s=time.monotonic() - started)
    for run in runs:
        gated = run.scenario.gate
        if run.error is not None or run.job is None:
            job_id = None if run.job is None else run.job.id
            error = run.error or "not run"
            report.checks.append(
                Check(run.scenario.name, run.attack_id, "job", "error", error, gated, job_id)
            )
            continue
        report.checks += evaluate_job(
            run.job, policy.thresholds, run.scenario.name, run.attack_id, gated, policy.convergence
        )
    return report


def failed_report(policy: Policy, reason: str) -> AuditReport:
    """The report of an audit that could not run (an upload refused, the service unreachable)."""
    return AuditReport(policy, [], [Check("audit", "setup", "audit", "error", reason, gated=True)])


def _cancel(client: Client, run: JobRun) -> None:
    if run.job is None or run.job.done:
        return
    try:
        run.job = client.jobs.cancel(run.job.id)
    except GradleakError:
        return  # finished meanwhile, or unreachable: the report says it did not finish in time
    if run.error is None:
        run.error = "cancelled: the audit's timeout ran out before this job finished"


# ---------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------


def write_junit(report: AuditReport, path: str | os.PathLike[str]) -> Path:
    """A JUnit XML file: one test case per check. A gated leak is a failure, a gated check that
    could not be made an error; results of what-if scenarios that are not gated are skipped
    test cases (with what they would have done in the message)."""
    suite = ET.Element("testsuite", name="gradleak privacy gate")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for c in report.checks:
        case = ET.SubElement(
            suite, "testcase", classname=f"gradleak.{_slug(c.scenario)}.{_slug(c.attack)}", name=c.rule
        )
        counts["tests"] += 1
        text = c.message + (f" [job {c.job_id}]" if c.job_id else "")
        if not c.gated and c.outcome in ("fail", "error"):
            ET.SubElement(case, "skipped", message=f"not gated (what-if): {text}")
            counts["skipped"] += 1
        elif c.outcome == "fail":
            ET.SubElement(case, "failure", message=text, type="leak").text = text
            counts["failures"] += 1
        elif c.outcome == "error":
            ET.SubElement(case, "error", message=text, type="error").text = text
            counts["errors"] += 1
        elif c.outcome == "skipped":
            ET.SubElement(case, "skipped", message=text)
            counts["skipped"] += 1
        elif c.outcome == "warn":
            ET.SubElement(case, "system-err").text = f"warning: {text}"
        else:
            ET.SubElement(case, "system-out").text = text
    for key, value in counts.items():
        suite.set(key, str(value))
    suite.set("time", f"{report.elapsed_s:.3f}")
    root = ET.Element("testsuites", name="gradleak")
    root.append(suite)
    ET.indent(root)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(target, encoding="utf-8", xml_declaration=True)
    return target


_VERDICT_TEXT: dict[Verdict, str] = {
    "pass": "PASS: no gated result leaks beyond the thresholds",
    "fail": "FAIL: leakage above a threshold",
    "error": "ERROR: the gate could not check every result",
}


def grouped(checks: list[Check]) -> list[tuple[Check, list[Check]]]:
    """Checks that say the same thing (outcome, gating and message) once, with every job they
    concern: a metric unavailable for the same reason in six jobs is one line, not six."""
    groups: dict[tuple[str, bool, str], list[Check]] = {}
    for c in checks:
        groups.setdefault((c.outcome, c.gated, c.message), []).append(c)
    return [(same[0], same) for same in groups.values()]


def _where(same: list[Check]) -> str:
    return ", ".join(dict.fromkeys(f"{c.scenario} / {c.attack}" for c in same))


def _converged(report: AuditReport, run: JobRun) -> str:
    budget = [c for c in report.checks_of(run) if c.rule == "budget"]
    if not budget:
        return "n/a"
    return {"pass": "yes", "skipped": "unknown"}.get(budget[0].outcome, "**no**")


def _run_result(report: AuditReport, run: JobRun) -> str:
    checks = report.checks_of(run)
    if any(c.outcome == "fail" for c in checks):
        return "**FAIL**" if run.scenario.gate else "would fail (not gated)"
    if any(c.outcome == "error" for c in checks):
        return "**ERROR**" if run.scenario.gate else "error (not gated)"
    return "pass"


def _cell(value: object, metric: str = "") -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _fmt(float(value), metric)
    return "n/a"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_markdown(
    report: AuditReport,
    path: str | os.PathLike[str],
    *,
    policy_name: str = "policy",
    embed_images: bool = False,
) -> Path:
    """A Markdown summary: verdict, one row per job (worst case and mean), the checks that did
    not pass, and each job's reconstruction grid (linked relative to the file, or embedded)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    p = report.policy
    rules = "; ".join(t.describe() + ("" if t.required else " (if available)") for t in p.thresholds)
    lines = [
        f"## gradleak privacy gate: {_VERDICT_TEXT[report.verdict]}",
        "",
        f"Policy `{_md(policy_name)}`: {len(p.attacks)} attack(s) x {len(p.scenarios)} scenario(s), "
        f"seed {p.seed}; thresholds: {_md(rules)}. Took {report.elapsed_s:.1f}s.",
        "",
        "| scenario | attack | job | status | PSNR worst | PSNR mean | SSIM worst | LPIPS worst | labels "
        "| converged | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report.runs:
        job = run.job
        scores = None if job is None or job.status != "succeeded" else job.scores
        worst = scores.worst_case if scores is not None else {}
        mean = scores.mean if scores is not None else {}
        labels = scores.label_accuracy.multiset if scores is not None and scores.label_accuracy else None
        scenario = run.scenario.name + ("" if run.scenario.gate else " (what-if, not gated)")
        lines.append(
            f"| {_md(scenario)} | {_md(run.attack_id)} | `{job.id if job else '-'}` | "
            f"{job.status if job else 'not run'} | {_cell(worst.get('psnr'), 'psnr')} | "
            f"{_cell(mean.get('psnr'), 'psnr')} | {_cell(worst.get('ssim'))} | {_cell(worst.get('lpips'))} | "
            f"{'n/a' if labels is None else f'{labels:.0%}'} | {_converged(report, run)} | "
            f"{_run_result(report, run)} |"
        )
    bad = [c for c in report.checks if c.outcome != "pass"]
    if bad:
        lines += ["", "### Checks that did not pass", ""]
        for c, same in grouped(bad):
            kind = {"fail": "leak", "error": "error", "skipped": "skipped", "warn": "warning"}[c.outcome]
            gate = "" if c.gated else " (not gated)"
            lines.append(f"- {kind}{gate}: {_md(_where(same))}: {_md(c.message)}")
    grids = [r for r in report.runs if r.grid is not None]
    if grids:
        lines += [
            "",
            "### Reconstructions",
            "",
            "Top row: the client's images; below: what the attack recovered, with each image's PSNR and "
            "SSIM; the most leaked image is framed in red.",
            "",
        ]
        for run in grids:
            assert run.grid is not None and run.job is not None
            if embed_images:
                src = "data:image/png;base64," + base64.b64encode(run.grid.read_bytes()).decode()
            else:
                src = Path(os.path.relpath(run.grid, target.parent)).as_posix()
            lines += [f"**{_md(run.label)}** (`{run.job.id}`)", "", f"![{_md(run.label)}]({src})", ""]
    target.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return target
