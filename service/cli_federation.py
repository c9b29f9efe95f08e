"""`gradleak federation run`: train a model over FL rounds locally and audit chosen rounds.

The spec comes from a YAML/JSON file, flags layered on top, and runs through the same runner as a
service federation. Outputs land in `OUT/<run id>/`: rounds.csv, rounds.json, rounds.png,
report.html, metrics.json, the checkpoints and each audited round's reconstruction.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from service.errors import GradleakError

federation_app = typer.Typer(
    help="Train a model over FL rounds (FedAvg), with accuracy and IGSA per round, and audit chosen rounds.",
    no_args_is_help=True,
)


@federation_app.command("run")
def run(
    spec_file: Annotated[
        Path | None, typer.Argument(help="YAML or JSON federation spec; flags below override it")
    ] = None,
    arch: Annotated[str | None, typer.Option(help="architecture name (see `gradleak catalog`)")] = None,
    knob: Annotated[list[str] | None, typer.Option("--knob", help="architecture knob key=value")] = None,
    weights: Annotated[Path | None, typer.Option(help="initial global weights (safetensors)")] = None,
    source: Annotated[str | None, typer.Option(help="patches, cifar10, cifar100 or folder")] = None,
    dataset_path: Annotated[str | None, typer.Option(help="dataset directory for cifar/folder")] = None,
    per_class: Annotated[int | None, typer.Option(help="patches per class (patch task)")] = None,
    max_samples: Annotated[
        int | None, typer.Option(help="use at most this many images (cifar/folder)")
    ] = None,
    size: Annotated[int | None, typer.Option(help="image side in pixels")] = None,
    clients: Annotated[int | None, typer.Option(help="number of clients")] = None,
    clients_per_round: Annotated[int | None, typer.Option(help="clients sampled each round")] = None,
    rounds: Annotated[int | None, typer.Option(help="number of rounds")] = None,
    partition: Annotated[str | None, typer.Option(help="iid or dirichlet")] = None,
    alpha: Annotated[float | None, typer.Option(help="Dirichlet concentration")] = None,
    protocol: Annotated[str | None, typer.Option(help="fedsgd or fedavg")] = None,
    lr: Annotated[float | None, typer.Option(help="clients' learning rate")] = None,
    local_epochs: Annotated[int | None, typer.Option(help="clients' local epochs")] = None,
    batch_size: Annotated[int | None, typer.Option(help="clients' mini-batch size")] = None,
    momentum: Annotated[float | None, typer.Option(help="clients' SGD momentum")] = None,
    bn_mode: Annotated[str | None, typer.Option(help="clients' batch-norm mode: train or eval")] = None,
    defense: Annotated[
        list[str] | None,
        typer.Option("--defense", help="what clients apply, e.g. quantize:bits=4 (repeatable)"),
    ] = None,
    server_lr: Annotated[float | None, typer.Option(help="the server's step along the mean update")] = None,
    audit_rounds: Annotated[str | None, typer.Option(help="rounds to attack, e.g. 1,2,5,10")] = None,
    audit_client: Annotated[
        int | None, typer.Option(help="the audited client (default: first sampled)")
    ] = None,
    attack_name: Annotated[str | None, typer.Option("--attack", help="attack of the audits")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help="attack parameter key=value")] = None,
    knowledge: Annotated[int | None, typer.Option(min=0, max=5, help="attacker knowledge level 0-5")] = None,
    iterations: Annotated[int | None, typer.Option(help="attack iterations per audit")] = None,
    restarts: Annotated[int | None, typer.Option(help="attack restarts per audit")] = None,
    time_limit: Annotated[float | None, typer.Option(help="wall-clock limit per audit, seconds")] = None,
    seed: Annotated[int | None, typer.Option(help="federation seed")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda; default: cuda when available")] = None,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("runs"),
    save_spec: Annotated[Path | None, typer.Option(help="also write the resolved spec as YAML")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the manifest JSON on stdout")] = False,
) -> None:
    """Train a federation and audit the chosen rounds; print the per-round table."""
    from service.cli import _validation_message, fail

    options = {k: v for k, v in locals().items() if k not in ("out", "save_spec", "as_json", "device")}
    try:
        spec = build_federation_spec(options)
        if save_spec is not None:
            save_spec.write_text(spec.to_yaml())
        spec.check_knowledge()
        run_local_federation(spec, out, device, as_json)
    except ValidationError as e:
        raise fail(_validation_message(e)) from None
    except GradleakError as e:
        raise fail(str(e)) from None


def build_federation_spec(o: dict[str, Any]) -> Any:
    """A FederationSpec from an optional spec file with flags layered on top."""
    from service.cli import csv_list, fail, parse_defense, parse_pairs, set_path
    from service.federations.spec import FederationSpec

    base: dict[str, Any] = {}
    if o["spec_file"] is not None:
        base = json.loads(FederationSpec.from_file(o["spec_file"]).to_json())
    elif o["arch"] is None:
        raise fail("give a spec file or at least --arch")

    def put(path: str, value: Any) -> None:
        set_path(base, path, value)

    put("model.arch", o["arch"])
    if o["knob"]:
        model = base.setdefault("model", {})
        model["knobs"] = {**model.get("knobs", {}), **parse_pairs(o["knob"], "knob")}
    put("model.weights", str(o["weights"]) if o["weights"] else None)
    for path, key in (
        ("data.source", "source"),
        ("data.path", "dataset_path"),
        ("data.per_class", "per_class"),
        ("data.max_samples", "max_samples"),
        ("data.size", "size"),
        ("num_clients", "clients"),
        ("clients_per_round", "clients_per_round"),
        ("rounds", "rounds"),
        ("partition.kind", "partition"),
        ("partition.alpha", "alpha"),
        ("client.protocol", "protocol"),
        ("client.lr", "lr"),
        ("client.local_epochs", "local_epochs"),
        ("client.batch_size", "batch_size"),
        ("client.momentum", "momentum"),
        ("client.bn_mode", "bn_mode"),
        ("server_lr", "server_lr"),
        ("audit.client", "audit_client"),
        ("audit.knowledge", "knowledge"),
        ("audit.budget.iterations", "iterations"),
        ("audit.budget.restarts", "restarts"),
        ("audit.budget.time_limit_s", "time_limit"),
        ("seed", "seed"),
    ):
        put(path, o[key])
    if o["audit_rounds"] is not None:
        try:
            put("audit.rounds", [int(r) for r in csv_list(o["audit_rounds"]) or []])
        except ValueError:
            raise fail(
                f"--audit-rounds takes round numbers such as 1,2,5,10; got {o['audit_rounds']!r}"
            ) from None
    if o["defense"]:
        base["defenses"] = [parse_defense(d).model_dump() for d in o["defense"]]
    if o["attack_name"] is not None or o["param"]:
        from service.specs import ATTACK_PARAMS

        audit = base.setdefault("audit", {})
        name = o["attack_name"] or audit.get("attack", {}).get("name", "inverting_gradients")
        if name not in ATTACK_PARAMS:
            raise fail(f"unknown attack {name!r}; valid: {', '.join(sorted(ATTACK_PARAMS))}")
        previous = audit.get("attack", {}) if audit.get("attack", {}).get("name") == name else {}
        audit["attack"] = {**previous, "name": name, **parse_pairs(o["param"], "attack parameter")}
    return FederationSpec.model_validate(base)


def run_local_federation(spec: Any, out: Path, device: str | None, as_json: bool) -> None:
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bar

    from service.cli import local_context
    from service.jobs.runner import run_job
    from service.jobs.types import Progress
    from service.storage import LocalStore

    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-federation-{secrets.token_hex(3)}"
    store = LocalStore(out)
    show_bar = sys.stderr.isatty() and not as_json
    bar = Bar(
        TextColumn("[bold]rounds"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}  {task.fields[status]}"),
        TimeElapsedColumn(),
        disable=not show_bar,
    )
    with bar:
        task = bar.add_task("federation", total=spec.rounds, status="")

        def on_progress(p: Progress) -> None:
            if p.stage == "training":
                bar.update(task, completed=p.iteration, status=p.message)
            elif p.stage == "attack":
                bar.update(task, status=f"{p.message} ({p.iteration}/{p.total} it)")
            if not show_bar and not as_json and p.stage in ("setup", "training"):
                typer.echo(f"[{p.stage}] {p.message}".rstrip(), err=True)

        ctx = local_context(run_id, store, device, on_progress)
        result = run_job(spec, ctx)
    if as_json:
        typer.echo(json.dumps(result.manifest, indent=2))
        return
    summarize_federation(result.manifest, store.path(run_id))


def summarize_federation(manifest: dict[str, Any], folder: Path) -> None:
    rows = manifest["rounds"]
    typer.echo(f"{'round':>5} {'accuracy':>8} {'IGSA':>6} {'client':>6} {'PSNR':>6} {'worst':>6} {'SSIM':>6}")

    def cell(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for r in rows:
        typer.echo(
            f"{r['round']:>5} {r['test_accuracy']:>8.3f} {r['igsa']:>6.3f} "
            f"{cell(r.get('audited_client'), 'd'):>6} {cell(r.get('psnr_mean'), '.2f'):>6} "
            f"{cell(r.get('psnr_worst'), '.2f'):>6} {cell(r.get('ssim_mean'), '.3f'):>6}"
        )
    initial, final = manifest["initial"], manifest["final"]
    if final is not None:
        typer.echo(
            f"test accuracy {initial['test_accuracy']:.3f} -> {final['test_accuracy']:.3f} "
            f"after {final['round']} rounds ({manifest['status']}, {manifest['timings']['total_s']:.0f} s)"
        )
    typer.echo(f"outputs: {folder}  (report.html, rounds.csv, rounds.png)")


def register(app: typer.Typer) -> None:
    app.add_typer(federation_app, name="federation")
