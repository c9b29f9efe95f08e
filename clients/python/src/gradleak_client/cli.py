"""`gradleak-client`: the gradleak API from a shell, and the CI privacy gate.

    gradleak-client upload model lenet.safetensors --arch lenet --image-shape 3,32,32
    gradleak-client upload update grad.safetensors --model-id mdl_... --kind gradient
    gradleak-client upload ground-truth batch.safetensors
    gradleak-client submit --update-id upd_... --ground-truth-id gt_... --attack dlg --iterations 300
    gradleak-client status job_...          gradleak-client wait job_...
    gradleak-client fetch job_... -o out/   gradleak-client cancel job_...    gradleak-client catalog
    gradleak-client audit --policy policy.yaml --model m.safetensors --update u.safetensors \\
        --ground-truth batch.safetensors [--embedded]
    gradleak-client collect gradleak-audits/client.jsonl --max psnr=20   # a Flower run's audits

The service is $GRADLEAK_URL (or --url) with the key $GRADLEAK_API_KEY (or --api-key).
Exit codes: 0 success (audit, collect: pass); 1 audit, collect: leakage above a threshold, wait:
the job failed or was cancelled; 2 usage or service error (collect: an audit could not run).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradleak_client._base import DEFAULT_MAX_RETRIES, ENV_API_KEY, ENV_URL
from gradleak_client._client import Client
from gradleak_client._exceptions import GradleakError, WaitTimeoutError
from gradleak_client._progress import describe
from gradleak_client._version import __version__
from gradleak_client.types import Job

PROG = "gradleak-client"
EXIT_OK, EXIT_LEAK, EXIT_ERROR = 0, 1, 2
DEFAULT_OUT = "gradleak-audit"


class UsageError(GradleakError):
    """A command line that cannot be carried out as given."""


def _echo(text: str) -> None:
    print(text, flush=True)


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, booleans, lists), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _pairs(items: Sequence[str] | None, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} must look like KEY=VALUE, got {item!r}")
        out[key] = _value(value)
    return out


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None


def _defense(text: str) -> dict[str, Any]:
    """quantize:bits=4,stochastic=false -> {"name": "quantize", "bits": 4, "stochastic": False}."""
    name, _, params = text.partition(":")
    return {"name": name, **_pairs([p for p in params.split(",") if p], f"defense {name!r} parameters")}


def _existing(path: str | Path | None, what: str) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} {p} does not exist or is not a file")
    return p


def _print_model(obj: Any, as_json: bool) -> None:
    _echo(obj.model_dump_json(indent=2) if as_json else obj.id)


def _client(args: argparse.Namespace) -> Client:
    return Client(base_url=args.url, api_key=args.api_key, timeout=args.timeout, max_retries=args.max_retries)


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------


def cmd_upload(args: argparse.Namespace) -> int:
    path = _existing(args.file, "the file")
    assert path is not None
    with _client(args) as client:
        if args.what == "model":
            result: Any = client.models.upload(
                path,
                arch=args.arch,
                image_shape=_ints(args.image_shape, "--image-shape"),
                num_classes=args.num_classes,
                knobs=_pairs(args.knob, "--knob"),
            )
        elif args.what == "update":
            training = {
                "protocol": args.protocol,
                "lr": args.lr,
                "local_epochs": args.local_epochs,
                "batch_size": args.batch_size,
                "num_samples": args.num_samples,
                "bn_mode": args.bn_mode,
            }
            result = client.updates.upload(
                path,
                model_id=args.model_id,
                kind=args.kind,
                client={k: v for k, v in training.items() if v is not None},
                normalization=args.normalization,
                num_images=args.num_images,
                labels=None if args.labels is None else _ints(args.labels, "--labels"),
            )
        else:
            result = client.ground_truth.upload(path, image_set=args.image_set)
    _print_model(result, args.json)
    return EXIT_OK


def _spec_from_file(path: str) -> dict[str, Any]:
    from gradleak_client.policy import parse_yaml_or_json

    p = _existing(path, "the spec")
    assert p is not None
    data = parse_yaml_or_json(p.read_text(encoding="utf-8"), str(p))
    if not isinstance(data, dict):
        raise UsageError(f"{p}: a job spec is a mapping")
    return data


def cmd_submit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.spec is not None:
            job = client.jobs.create(spec=_spec_from_file(args.spec))
        else:
            if args.update_id is None:
                raise UsageError("give --update-id (and optionally --ground-truth-id), or --spec")
            attack = None if args.attack is None else {"name": args.attack, **_pairs(args.param, "--param")}
            if attack is None and args.param:
                raise UsageError("--param needs --attack")
            budget = {
                "iterations": args.iterations,
                "restarts": args.restarts,
                "time_limit_s": args.time_limit,
            }
            budget = {k: v for k, v in budget.items() if v is not None}
            job = client.jobs.create(
                update_id=args.update_id,
                model_id=args.model_id,
                ground_truth_id=args.ground_truth_id,
                attack=attack,
                knowledge=args.knowledge,
                defenses=[_defense(d) for d in args.defense] if args.defense else None,
                budget=budget or None,
                seed=args.seed,
                verdict=_verdict(args),
            )
        if args.wait:
            job = client.jobs.wait(job.id, progress=True)
    _print_model(job, args.json)
    return EXIT_OK if not args.wait or job.status == "succeeded" else EXIT_LEAK


def _verdict(args: argparse.Namespace) -> dict[str, Any] | None:
    """The job's `verdict` (the leakage estimate without ground truth) from the submit flags."""
    budget = {"iterations": args.shadow_iterations, "time_limit_s": args.shadow_time_limit}
    budget = {k: v for k, v in budget.items() if v is not None}
    out = {
        "when": args.verdict,
        "shadows": args.shadows,
        "budget": budget or None,
        "proxy_data": args.proxy_data_id,
        "seed": args.verdict_seed,
    }
    out = {k: v for k, v in out.items() if v is not None}
    return out or None


def _runs(client: Client, run_id: str) -> Any:
    """The resource a run's id belongs to, told by its prefix: federations (fed_), studies (std_),
    generator training runs (gtr_), else jobs."""
    by_prefix = {"fed": client.federations, "std": client.studies, "gtr": client.generator_trainings}
    return by_prefix.get(run_id.split("_", 1)[0], client.jobs)


def _artifacts(client: Client, run_id: str) -> Any:
    runs = _runs(client, run_id)
    return client.artifacts if runs is client.jobs else runs.artifacts


def _summary(job: Any) -> str:
    if not isinstance(job, Job):
        return describe(job)
    lines = [describe(job)]
    scores = job.scores
    if scores is not None:
        worst, mean = scores.worst_case, scores.mean
        for metric in ("psnr", "ssim", "lpips", "mse"):
            if worst.get(metric) is not None:
                lines.append(
                    f"  {metric:6s} worst {worst[metric]:.4g}  mean {mean.get(metric, float('nan')):.4g}"
                )
            elif metric in scores.unavailable:
                lines.append(f"  {metric:6s} unavailable: {scores.unavailable[metric]}")
        if scores.label_accuracy is not None:
            lines.append(f"  labels recovered {scores.label_accuracy.multiset:.0%}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = _runs(client, args.job_id).get(args.job_id)
    _echo(job.model_dump_json(indent=2) if args.json else _summary(job))
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            job = _runs(client, args.job_id).wait(
                args.job_id, timeout=args.wait_timeout, progress=not args.no_progress
            )
        except WaitTimeoutError as e:
            raise UsageError(str(e)) from None
    _echo(job.model_dump_json(indent=2) if args.json else _summary(job))
    return EXIT_OK if job.status == "succeeded" else EXIT_LEAK


def cmd_fetch(args: argparse.Namespace) -> int:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    with _client(args) as client:
        artifacts = _artifacts(client, args.job_id)
        names = args.names or [a.name for a in artifacts.list(args.job_id)]
        if not names:
            raise UsageError(f"{args.job_id} has no artifacts (yet)")
        for name in names:
            _echo(str(artifacts.download(args.job_id, name, out)))
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = _runs(client, args.job_id).cancel(args.job_id)
    _echo(job.model_dump_json(indent=2) if args.json else describe(job))
    return EXIT_OK


def cmd_train_generator(args: argparse.Namespace) -> int:
    if args.spec is not None:
        spec = _spec_from_file(args.spec)
    else:
        data: dict[str, Any] = {"source": args.data}
        if args.images_id is not None:
            data = {"source": "images", "images": args.images_id}
        options = {
            "image_size": args.image_size,
            "channels": args.channels,
            "conditional": args.conditional or None,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "width": args.width,
            "seed": args.seed,
            "time_limit_s": args.time_limit,
        }
        spec = {"data": data, **{k: v for k, v in options.items() if v is not None}}
    with _client(args) as client:
        run = client.generator_trainings.create(spec)
        if not (args.wait or args.output):
            _echo(run.model_dump_json(indent=2) if args.json else run.id)
            return EXIT_OK
        _note(f"training run {run.id} queued")
        try:
            run = client.generator_trainings.wait(
                run.id, timeout=args.wait_timeout, progress=not args.no_progress
            )
        except WaitTimeoutError as e:
            raise UsageError(str(e)) from None
        if args.output and run.status != "queued":
            out = Path(args.output)
            out.mkdir(parents=True, exist_ok=True)
            for name in ("generator.safetensors", "samples.png", "history.json"):
                if name in {a.name for a in client.generator_trainings.artifacts.list(run.id)}:
                    _note(str(client.generator_trainings.artifacts.download(run.id, name, out)))
    if args.json:
        _echo(run.model_dump_json(indent=2))
    elif run.status == "succeeded":
        _echo(run.generator_id or run.id)
    else:
        _note(describe(run))
    return EXIT_OK if run.status == "succeeded" else EXIT_LEAK


def cmd_catalog(args: argparse.Namespace) -> int:
    with _client(args) as client:
        catalog = client.catalog.get()
    if args.json:
        _echo(catalog.model_dump_json(indent=2))
        return EXIT_OK
    for title, entries in (
        ("attacks", catalog.attacks),
        ("architectures", catalog.architectures),
        ("defenses", catalog.defenses),
        ("metrics", catalog.metrics),
    ):
        _echo(f"{title}:")
        for entry in entries:
            _echo(f"  {entry.get('name', '?'):22s} {entry.get('description', '')}")
    _echo("knowledge levels:")
    for level in catalog.knowledge_levels:
        _echo(f"  {level.level} {level.name:20s} {level.description}")
    return EXIT_OK


def cmd_collect(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from gradleak_client.flower import AuditLog
    from gradleak_client.policy import Threshold

    path = _existing(args.records, "audit record file")
    limits = _pairs(args.max, "--max") or {"psnr": 20.0}
    thresholds = []
    for metric, value in limits.items():
        try:
            thresholds.append(Threshold.model_validate({"metric": metric, "max": value}))
        except ValidationError as e:
            problem = e.errors()[0]
            raise UsageError(f"--max {metric}={value}: {problem['msg']}") from None
    with _client(args) as client:
        audits = AuditLog(client, thresholds=thresholds, path=path)
        records = audits.collect(timeout=args.wait_timeout, recheck=True)
    if not records:
        raise UsageError(f"{path} records no audit")
    for r in records:
        if args.json:
            _echo(r.to_json())
            continue
        node = "" if r.node_id is None else f" node {r.node_id}"
        reason = f"  ({r.error})" if r.error else ""
        _echo(f"{r.side} round {r.round}{node}: {r.verdict}  {r.job_id or '-'}{reason}")
    verdicts = {r.verdict for r in records}
    return EXIT_LEAK if "fail" in verdicts else EXIT_ERROR if "error" in verdicts else EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    from gradleak_client.audit import (
        AuditInputs,
        check_inputs,
        failed_report,
        grouped,
        run_audit,
        write_junit,
        write_markdown,
    )
    from gradleak_client.policy import Policy

    policy = Policy.load(args.policy)
    inputs = AuditInputs(
        model=_existing(args.model, "the model checkpoint"),
        update=_existing(args.update, "the update"),
        ground_truth=_existing(args.ground_truth, "the ground truth"),
        update_id=args.update_id,
        ground_truth_id=args.ground_truth_id,
        proxy_data=_existing(args.proxy_data, "the proxy data")
        or _existing(
            policy.verdict.proxy_file(Path(args.policy).resolve().parent), "the policy's verdict.proxy_data"
        ),
    )
    if args.embedded and (args.update_id or args.ground_truth_id):
        raise UsageError("--embedded starts an empty service: give files, not upload ids")
    check_inputs(policy, inputs)
    out = Path(args.out)
    junit = Path(args.junit) if args.junit else out / "junit.xml"
    summary = Path(args.summary) if args.summary else out / "summary.md"
    options: dict[str, Any] = {
        "timeout": args.timeout_total,
        "progress": not args.no_progress,
        "artifacts_dir": out / "grids",
        "log": _note,
    }
    try:
        if args.embedded:
            from gradleak_client.embedded import EmbeddedService

            _note("starting the embedded gradleak service ...")
            with (
                EmbeddedService(
                    args.data_dir, isolation=args.isolation, torch_threads=args.threads
                ) as service,
                service.client(timeout=args.timeout, max_retries=args.max_retries) as client,
            ):
                report = run_audit(client, policy, inputs, **options)
        else:
            with _client(args) as client:
                report = run_audit(client, policy, inputs, **options)
    except GradleakError as e:
        # The CI system still gets a report to show, with the reason the gate could not run.
        report = failed_report(policy, str(e))
        write_junit(report, junit)
        write_markdown(report, summary, policy_name=Path(args.policy).name)
        raise
    write_junit(report, junit)
    write_markdown(report, summary, policy_name=Path(args.policy).name, embed_images=args.embed_images)
    for check, same in grouped([c for c in report.checks if c.outcome != "pass"]):
        gate = "" if check.gated else " (not gated)"
        where = ", ".join(dict.fromkeys(f"{c.scenario} / {c.attack}" for c in same))
        _note(f"{check.outcome}{gate}: {where}: {check.message}")
    _note(f"JUnit XML: {junit}; summary: {summary}")
    _echo(f"gradleak privacy gate: {report.verdict.upper()}")
    return report.exit_code


# ---------------------------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------------------------


def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("service")
    group.add_argument("--url", help=f"the gradleak API (default ${ENV_URL}, else http://127.0.0.1:8731)")
    group.add_argument("--api-key", help=f"API key (default ${ENV_API_KEY})")
    group.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    group.add_argument(
        "--max-retries", type=int, default=DEFAULT_MAX_RETRIES, help="retries of a failed request"
    )
    return common


def _json_option() -> argparse.ArgumentParser:
    option = argparse.ArgumentParser(add_help=False)
    option.add_argument("--json", action="store_true", help="print the API's answer as JSON")
    return option


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="gradleak from the command line: upload, submit, follow, fetch, and the CI privacy gate.",
        epilog="exit codes: 0 success/pass, 1 leak above a threshold (audit) or job failed (wait), 2 error",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _connection_options()
    printed = [common, _json_option()]

    upload = sub.add_parser("upload", help="upload a model, an update or ground truth (prints its id)")
    kinds = upload.add_subparsers(dest="what", required=True, metavar="WHAT")
    model = kinds.add_parser("model", parents=printed, help="a model checkpoint (safetensors)")
    model.add_argument("file")
    model.add_argument("--arch", required=True, help="registered architecture (see `catalog`)")
    model.add_argument("--image-shape", required=True, help="C,H,W of one input image, e.g. 3,32,32")
    model.add_argument("--num-classes", type=int, default=10)
    model.add_argument("--knob", action="append", metavar="KEY=VALUE", help="an architecture knob")
    update = kinds.add_parser("update", parents=printed, help="a client's update (safetensors)")
    update.add_argument("file")
    update.add_argument("--model-id", required=True, help="the uploaded model (mdl_...)")
    update.add_argument("--kind", choices=["gradient", "delta", "weights"], default="gradient")
    update.add_argument("--normalization", default="cifar10", help="cifar10, cifar100, imagenet or none")
    update.add_argument("--num-images", type=int, help="how many images the update covers, if known")
    update.add_argument("--labels", help="the client's labels, if known, e.g. 3,1,4")
    update.add_argument("--protocol", choices=["fedsgd", "fedavg"])
    update.add_argument("--lr", type=float)
    update.add_argument("--local-epochs", type=int)
    update.add_argument("--batch-size", type=int)
    update.add_argument("--num-samples", type=int)
    update.add_argument("--bn-mode", choices=["train", "eval"])
    truth = kinds.add_parser("ground-truth", parents=printed, help="the client's images, for scoring")
    truth.add_argument("file")
    truth.add_argument(
        "--image-set",
        action="store_true",
        help="many images of your own domain (proxy data, generator training), past a job's batch limit",
    )
    upload.set_defaults(func=cmd_upload)

    submit = sub.add_parser("submit", parents=printed, help="submit an attack job (prints its id)")
    submit.add_argument("--update-id")
    submit.add_argument("--model-id")
    submit.add_argument("--ground-truth-id")
    submit.add_argument("--attack", help="dlg, inverting_gradients, gradinversion, fedavg_unroll")
    submit.add_argument("--param", action="append", metavar="KEY=VALUE", help="an attack parameter")
    submit.add_argument("--iterations", type=int)
    submit.add_argument("--restarts", type=int)
    submit.add_argument("--time-limit", type=float, help="seconds")
    submit.add_argument("--knowledge", type=int, choices=range(6), help="knowledge level granted (0-5)")
    submit.add_argument(
        "--defense", action="append", metavar="NAME[:K=V,...]", help="what-if defense, e.g. quantize:bits=4"
    )
    submit.add_argument("--seed", type=int)
    estimate = submit.add_argument_group("leakage estimate (jobs without ground truth)")
    estimate.add_argument(
        "--verdict",
        choices=["auto", "always", "never"],
        help="when to estimate (default auto: without ground truth)",
    )
    estimate.add_argument("--shadows", type=int, help="K, the shadow audits (default 5)")
    estimate.add_argument("--shadow-iterations", type=int, help="each shadow attack's iterations")
    estimate.add_argument("--shadow-time-limit", type=float, help="each shadow attack's seconds")
    estimate.add_argument(
        "--proxy-data-id", help="an uploaded image set (gt_...) of your own domain as proxy data"
    )
    estimate.add_argument("--verdict-seed", type=int, help="seed of the proxy draws and shadow attacks")
    submit.add_argument("--spec", help="a full JobSpec (YAML or JSON) naming upload ids instead")
    submit.add_argument("--wait", action="store_true", help="wait for the job, with a progress bar")
    submit.set_defaults(func=cmd_submit)

    train = sub.add_parser(
        "train-generator",
        parents=printed,
        help="train a generator for gias/ggl on the service's workers (prints the run's id, "
        "or with --wait the generator's)",
    )
    train.add_argument(
        "--data", choices=["faces", "patches"], default="faces", help="shipped training images"
    )
    train.add_argument("--images-id", help="train on an uploaded image set instead (gt_..., see --image-set)")
    train.add_argument("--image-size", type=int, choices=[32, 64])
    train.add_argument("--channels", type=int, choices=[1, 3])
    train.add_argument("--conditional", action="store_true", help="class-conditional (needs labels)")
    train.add_argument("--steps", type=int, help="generator steps (default 3000)")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--width", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--time-limit", type=float, help="seconds; the run ends with what it has")
    train.add_argument("--spec", help="a full training spec (YAML or JSON) instead of the flags")
    train.add_argument("--wait", action="store_true", help="wait for the run, with a progress bar")
    train.add_argument(
        "--output", "-o", help="with --wait: download the generator, its samples and history here"
    )
    train.add_argument("--wait-timeout", type=float, help="give up waiting after this many seconds (exit 2)")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=cmd_train_generator)

    status = sub.add_parser("status", parents=printed, help="a job's status, progress and metrics")
    status.add_argument("job_id")
    status.set_defaults(func=cmd_status)

    wait = sub.add_parser("wait", parents=printed, help="wait for a job, with a progress bar")
    wait.add_argument("job_id")
    wait.add_argument("--wait-timeout", type=float, help="give up after this many seconds (exit 2)")
    wait.add_argument("--no-progress", action="store_true")
    wait.set_defaults(func=cmd_wait)

    fetch = sub.add_parser("fetch", parents=[common], help="download a job's artifacts")
    fetch.add_argument("job_id")
    fetch.add_argument("names", nargs="*", help="artifact names (default: all)")
    fetch.add_argument("-o", "--output", default=".", help="directory (default: the current one)")
    fetch.set_defaults(func=cmd_fetch)

    cancel = sub.add_parser("cancel", parents=printed, help="cancel a job")
    cancel.add_argument("job_id")
    cancel.set_defaults(func=cmd_cancel)

    catalog = sub.add_parser("catalog", parents=printed, help="attacks, architectures, defenses, metrics")
    catalog.set_defaults(func=cmd_catalog)

    audit = sub.add_parser(
        "audit",
        parents=[common],
        help="the CI privacy gate: run a policy's attacks on an update and check its thresholds",
        description="Exit code 0: pass; 1: leakage above a threshold; 2: usage or service error.",
    )
    audit.add_argument("--policy", required=True, help="the policy (YAML or JSON)")
    audit.add_argument("--model", help="the model checkpoint the update was computed on (safetensors)")
    audit.add_argument("--update", help="the update to audit (safetensors)")
    audit.add_argument("--ground-truth", help="the client's images and labels (safetensors), for scoring")
    audit.add_argument("--update-id", help="an uploaded update instead of --model/--update")
    audit.add_argument("--ground-truth-id", help="uploaded ground truth instead of --ground-truth")
    audit.add_argument(
        "--proxy-data",
        help="proxy images (safetensors `images`) for the leakage estimate of jobs without ground truth; "
        "overrides the policy's verdict.proxy_data",
    )
    audit.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    audit.add_argument("--junit", help="JUnit XML path (default OUT/junit.xml)")
    audit.add_argument("--summary", help="Markdown summary path (default OUT/summary.md)")
    audit.add_argument("--embed-images", action="store_true", help="embed the grids in the summary")
    audit.add_argument("--timeout-total", type=float, help="seconds for all jobs together")
    audit.add_argument("--no-progress", action="store_true")
    embedded = audit.add_argument_group("embedded (no remote service; needs the `gradleak` package)")
    embedded.add_argument("--embedded", action="store_true", help="run the jobs in this process")
    embedded.add_argument("--data-dir", help="keep the embedded service's data here (default: temporary)")
    embedded.add_argument("--isolation", choices=["thread", "process"], default="thread")
    embedded.add_argument("--threads", type=int, help="torch CPU threads for the embedded jobs")
    audit.set_defaults(func=cmd_audit)

    collect = sub.add_parser(
        "collect",
        parents=printed,
        help="wait for the audits a Flower run recorded (gradleak_client.flower) and give their verdicts",
    )
    collect.add_argument("records", help="the JSON-lines file of a FlowerAuditor (log_path)")
    collect.add_argument(
        "--max", action="append", metavar="METRIC=VALUE", help="a worst-case threshold (default psnr=20)"
    )
    collect.add_argument("--wait-timeout", type=float, help="seconds to wait for each job")
    collect.set_defaults(func=cmd_collect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except GradleakError as e:
        _note(f"{PROG}: error: {e}")
        return EXIT_ERROR
    except OSError as e:
        _note(f"{PROG}: error: {e.filename or ''}: {e.strerror or e}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _note(f"{PROG}: interrupted")
        return EXIT_ERROR
    return code


if __name__ == "__main__":
    sys.exit(main())
