"""`gradleak study run|status|presets`: sweep a job or federation spec over axes and seeds locally.

A local study keeps its records in a SQLite store under `--out` and runs them with the same
`execute_job` as the service's workers, so a study stopped midway (Ctrl-C, a crash) resumes with
`--resume ID` without redoing finished points. Outputs land in `OUT/local/studies/<id>/`: table.csv,
table.json, plots/<axis>.png and .svg, report.html; each point's own outputs in `OUT/local/jobs/`.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from service.errors import GradleakError

study_app = typer.Typer(
    help="Sweep a job or federation spec over axes and seeds; tabulate, plot and report the results.",
    no_args_is_help=True,
)
TENANT = "local"
DB_NAME = "studies.db"


@study_app.command("presets")
def presets() -> None:
    """The built-in studies that reproduce the SoK's experiments, with their point counts."""
    from service.studies.presets import PRESETS

    typer.echo(f"{'preset':<16} {'SoK':<9} {'quick':>5} {'paper':>5}  what")
    for p in PRESETS.values():
        try:
            quick, paper = str(p.spec("quick").count()), str(p.spec("paper").count())
            what = p.description
        except GradleakError:  # ood without its generator: running it says how to make one
            quick, paper, what = "-", "-", f"{p.description} (needs a generator: run it for how)"
        typer.echo(f"{p.name:<16} {p.reproduces:<9} {quick:>5} {paper:>5}  {what}")


@study_app.command("run")
def run(
    spec_file: Annotated[Path | None, typer.Argument(help="YAML or JSON study spec")] = None,
    preset: Annotated[
        str | None, typer.Option(help="a built-in study (see `gradleak study presets`)")
    ] = None,
    scale: Annotated[str, typer.Option(help="quick (minutes on a CPU) or paper (the SoK's sizes)")] = "quick",
    resume: Annotated[
        str | None, typer.Option(help="the id of a stopped study under --out to finish")
    ] = None,
    out: Annotated[Path, typer.Option(help="output directory (also holds the study records)")] = Path("runs"),
    device: Annotated[str | None, typer.Option(help="cpu or cuda; default: cuda when available")] = None,
    save_spec: Annotated[Path | None, typer.Option(help="also write the study spec as YAML")] = None,
    generator: Annotated[
        str | None,
        typer.Option(
            help="a preset's generator file for its latent-space attacks "
            "(ood: default the repository's faces generator)"
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the study's manifest JSON on stdout")
    ] = False,
) -> None:
    """Run a study (a spec file, or a preset) to the end, with a progress bar over its points."""
    from service.cli import _validation_message, fail

    try:
        state = _open(out)
        if resume is not None:
            if spec_file is not None or preset is not None:
                raise fail("--resume takes no spec file or preset: the study has its spec")
            study_id = _reclaim(state, resume)
        else:
            spec = _load(spec_file, preset, scale, generator)
            if save_spec is not None:
                save_spec.write_text(spec.to_yaml())
            study_id = _create(state, out, spec)
        record = _run(state, out, study_id, device, show_bar=sys.stderr.isatty() and not as_json)
    except ValidationError as e:
        raise fail(_validation_message(e)) from None
    except GradleakError as e:
        raise fail(str(e)) from None
    if as_json:
        typer.echo(json.dumps(record.manifest, indent=2))
        return
    _summarize(state, out, record)


@study_app.command("status")
def status(
    study_id: Annotated[str, typer.Argument(help="the study's id (std_...)")],
    out: Annotated[Path, typer.Option(help="the output directory the study ran in")] = Path("runs"),
) -> None:
    """A local study's state: points done of total, by status."""
    from service.cli import fail

    try:
        state = _open(out)
        record = state.get_job(TENANT, study_id)
    except GradleakError as e:
        raise fail(str(e)) from None
    _summarize(state, out, record)


def _open(out: Path) -> Any:
    from service.jobs.state_sqlite import SQLiteStateStore

    out.mkdir(parents=True, exist_ok=True)
    return SQLiteStateStore(out / DB_NAME)


def _load(spec_file: Path | None, preset: str | None, scale: str, generator: str | None = None) -> Any:
    from service.cli import fail
    from service.studies.presets import SCALES
    from service.studies.presets import preset as build_preset
    from service.studies.spec import StudySpec

    if (spec_file is None) == (preset is None):
        raise fail("give a study spec file or --preset NAME (see `gradleak study presets`)")
    if scale not in SCALES:
        raise fail(f"--scale is one of {', '.join(SCALES)}; got {scale!r}")
    if preset is not None:
        return build_preset(preset, scale, generator)  # type: ignore[arg-type]
    if generator is not None:
        raise fail("--generator is for a preset; a spec file names its generator in attack.generator")
    assert spec_file is not None
    return StudySpec.from_file(spec_file)


def _create(state: Any, out: Path, spec: Any) -> str:
    from service.settings import get_settings
    from service.studies.submit import create_study

    generators: dict[str, str] = {}  # local path -> the upload id its points use

    def check(point: Any) -> Any:
        point.check_knowledge()
        ref = getattr(point.attack, "generator", None)
        if ref is None:
            return point
        if ref not in generators:
            generators[ref] = _local_generator(state, out, ref)
        attack = point.attack.model_copy(update={"generator": generators[ref]})
        return point.model_copy(update={"attack": attack})

    record, _, _ = create_study(spec, TENANT, get_settings(), state, check=check)
    return record.id


def _local_generator(state: Any, out: Path, ref: str) -> str:
    """A latent-space attack's generator given as a local path, checked as the service checks an
    upload and stored as one of the local tenant's, so that the study's points (which resolve
    upload ids, as the service's workers do) find it; its id."""
    from service.generators.job import store_generator
    from service.jobs.records import UPLOAD_PREFIXES, new_id
    from service.settings import get_settings
    from service.storage import LocalStore

    path = Path(ref).expanduser()
    if not path.is_file():
        raise GradleakError(f"attack.generator: file not found: {path}")
    upload_id = new_id(UPLOAD_PREFIXES["generator"])
    retention_s = get_settings().retention_hours * 3600.0
    store_generator(state, LocalStore(out), TENANT, upload_id, path.read_bytes(), retention_s)
    return upload_id


def _reclaim(state: Any, study_id: str) -> str:
    """Give back what a stopped run of this study left running (its process is gone)."""
    from service.jobs.records import JobError, JobStatus
    from service.studies.submit import plan_of

    record = state.get_job(TENANT, study_id)
    if record.status.terminal:
        raise GradleakError(f"study {study_id} has already {record.status.value}")
    reason = JobError(code="interrupted", message="the study's process stopped during the run")
    for job_id in (study_id, *(p.id for p in plan_of(record).points)):
        job = state.get_job(TENANT, job_id)
        if job.status == JobStatus.RUNNING:
            state.release(job_id, job.worker_id, reason)
    return study_id


def _run(state: Any, out: Path, study_id: str, device: str | None, *, show_bar: bool) -> Any:
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bar

    from service.jobs.execute import Stopper, StopReason, execute_job
    from service.settings import get_settings
    from service.storage import LocalStore

    settings = get_settings()
    stopper = Stopper()
    outcome: list[Any] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            outcome.append(
                execute_job(
                    study_id,
                    state=state,
                    store=LocalStore(out),
                    worker_id="cli",
                    stopper=stopper,
                    device=device or settings.device,
                    lpips_weights_dir=str(settings.lpips_weights_dir) if settings.lpips_weights_dir else None,
                )
            )
        except BaseException as e:  # shown by the main thread
            errors.append(e)

    thread = threading.Thread(target=work, name="gradleak-study", daemon=True)
    bar = Bar(
        TextColumn("[bold]points"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}  {task.fields[status]}"),
        TimeElapsedColumn(),
        disable=not show_bar,
    )
    with bar:
        task = bar.add_task("study", total=None, status="")
        thread.start()
        try:
            while thread.is_alive():
                thread.join(0.5)
                progress = state.get_job(TENANT, study_id).progress
                if progress is not None:
                    bar.update(
                        task, completed=progress.iteration, total=progress.total, status=progress.message
                    )
        except KeyboardInterrupt:
            stopper.stop(StopReason.SHUTDOWN)
            thread.join()
            raise GradleakError(
                f"stopped; finish it with: gradleak study run --resume {study_id} --out {out}"
            ) from None
    if errors:
        raise errors[0]
    return state.get_job(TENANT, study_id)


def _summarize(state: Any, out: Path, record: Any) -> None:
    from service.jobs.execute import job_prefix
    from service.studies.submit import plan_of

    plan = plan_of(record)
    counts: dict[str, int] = {}
    for p in plan.points:
        s = state.get_job(TENANT, p.id).status.value
        counts[s] = counts.get(s, 0) + 1
    done = sum(n for s, n in counts.items() if s in ("succeeded", "failed", "cancelled"))
    by_status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    total = len(plan.points)
    typer.echo(
        f"study {record.id} ({plan.study.title}): {record.status.value}; {done}/{total} points ({by_status})"
    )
    if record.progress is not None and record.progress.message:
        typer.echo(f"progress: {record.progress.message}")
    table = (record.manifest or {}).get("artifacts", {})
    if table:
        folder = out / job_prefix(record)
        rows = json.loads((folder / "table.json").read_text())["rows"]
        axes = [a.column for a in plan.study.axes]
        metric = f"{plan.study.metric}_mean"
        typer.echo("  ".join([*axes, "seed", metric, "status"]))
        for r in rows:
            value = "-" if r.get(metric) is None else f"{r[metric]:.2f}"
            typer.echo("  ".join([*(str(r[a]) for a in axes), str(r["seed"]), value, r["status"]]))
        typer.echo(f"outputs: {folder}  (report.html, table.csv, table.json, plots/)")
    elif not record.status.terminal:
        typer.echo(f"resume with: gradleak study run --resume {record.id} --out {out}")


def register(app: typer.Typer) -> None:
    app.add_typer(study_app, name="study")
