"""`gradleak`: run an attack locally, and (with the service installed) serve, work and manage keys.

`gradleak attack` builds a JobSpec from a spec file or from flags and runs it through the same
runner the service uses. Bad flags and bad files end with one clear line and exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import TypeAdapter, ValidationError

from service import cli_federation, cli_generator, cli_service, cli_study
from service.errors import GradleakError
from service.specs import (
    ATTACK_PARAMS,
    MAX_BUDGET_ITERATIONS,
    Budget,
    ClientTraining,
    DataSpec,
    DefenseSpec,
    JobSpec,
    Knowledge,
    ModelSpec,
    SimulatedClient,
)

if TYPE_CHECKING:
    from service.jobs.types import JobContext
    from service.storage import LocalStore

app = typer.Typer(
    name="gradleak",
    help="Audit federated-learning client updates for training-data leakage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str) -> typer.Exit:
    typer.echo(f"gradleak: error: {message}", err=True)
    return typer.Exit(code=2)


def parse_value(text: str) -> Any:
    """`key=value` values: JSON when it parses (numbers, booleans, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        return text


def split_top_level(text: str) -> list[str]:
    """Split on commas outside JSON brackets and quotes: `a=[0,1],b={"x":1}` -> two parts."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote and text[i - 1] != "\\":
                quote = ""
        elif ch == '"':
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0 or quote:
        raise fail(f"unbalanced brackets or quotes in {text!r}")
    return [*parts, text[start:]]


def parse_pairs(items: list[str] | None, what: str) -> dict[str, Any]:
    """`key=value` pairs, comma-separated or repeated; values are JSON (lists, mappings, null)."""
    out: dict[str, Any] = {}
    for item in items or []:
        for part in split_top_level(item):
            if not part:
                continue
            key, sep, value = part.partition("=")
            if not sep or not key:
                raise fail(f"{what} {part!r}: expected key=value")
            out[key.strip()] = parse_value(value.strip())
    return out


def set_path(base: dict[str, Any], path: str, value: Any) -> None:
    """Set base["a"]["b"]["c"] for path "a.b.c", creating the mappings on the way; None sets nothing."""
    if value is None:
        return
    node = base
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


def parse_defense(text: str) -> Any:
    """`quantize:bits=4`, `topk:ratio=0.01`, `clip:max_norm=1`, `noise:scale=0.01`, `sign`."""
    name, _, rest = text.partition(":")
    fields = {"name": name.strip(), **parse_pairs([rest] if rest else [], "defense parameter")}
    return TypeAdapter(DefenseSpec).validate_python(fields)


def told_candidates(o: dict[str, Any]) -> dict[str, Any]:
    """The --told-* flags: candidates (or unknown) for facts the attacker knows only roughly."""
    out: dict[str, Any] = {}
    flags = (
        ("lr", "--told-lr", float),
        ("local_epochs", "--told-local-epochs", int),
        ("batch_size", "--told-batch-size", int),
        ("shuffle_seed", "--told-shuffle-seed", int),
    )
    for fact, flag, kind in flags:
        text = o.get(f"told_{fact}")
        if text is None:
            continue
        text = text.strip()
        if text.lower() == "unknown":
            out[fact] = None
            continue
        try:
            if fact == "lr" and ":" in text:
                parts = [p.strip() for p in text.split(":")]
                if len(parts) not in (2, 3):
                    raise ValueError
                rng: dict[str, Any] = {"min": float(parts[0]), "max": float(parts[1])}
                if len(parts) == 3:
                    rng["points"] = int(parts[2])
                out[fact] = rng
                continue
            values = [
                None if fact == "shuffle_seed" and v.lower() == "given" else kind(v)
                for v in csv_list(text) or []
            ]
        except ValueError:
            shape = "MIN:MAX[:POINTS] or a comma-separated list" if fact == "lr" else "a comma-separated list"
            raise fail(f"{flag} {text!r}: expected {shape}, or unknown") from None
        if not values:
            raise fail(f"{flag}: give at least one value, or unknown")
        out[fact] = values
    return out


def csv_list(text: str | None) -> list[str] | None:
    return None if text is None else [p.strip() for p in text.split(",") if p.strip()]


def own_model(text: str) -> dict[str, str]:
    """--model: an import path names a module (arch 'module'), anything else an ONNX file."""
    from service.models.local import is_import_path

    if is_import_path(text) and not Path(text).exists():
        return {"arch": "module", "source": text}
    return {"arch": "onnx", "source": str(Path(text).expanduser())}


def local_context(run_id: str, store: LocalStore, device: str | None, progress: Any) -> JobContext:
    """The JobContext of a run on this machine: artifacts in `store` under `run_id`, local files
    as references, the device given or the settings' default."""
    from service.jobs.types import JobContext
    from service.settings import get_settings

    settings = get_settings()
    return JobContext(
        job_id=run_id,
        store=store,
        prefix=run_id,
        resolve=local_resolve,
        progress=progress,
        device=device or settings.device,
        lpips_weights_dir=str(settings.lpips_weights_dir) if settings.lpips_weights_dir else None,
    )


def local_resolve(ref: str) -> bytes:
    path = Path(ref).expanduser()
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise GradleakError(f"file not found: {path}") from None
    except OSError as e:
        raise GradleakError(f"cannot read {path}: {e.strerror}") from None


@app.command()
def attack(
    spec_file: Annotated[
        Path | None, typer.Option("--spec", help="YAML or JSON job spec; flags below override it")
    ] = None,
    arch: Annotated[str | None, typer.Option(help="architecture name (see `gradleak catalog`)")] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="your own model instead of --arch: an ONNX file, or an import path "
            "package.module:factory (your code, imported and called here with no arguments)",
        ),
    ] = None,
    knob: Annotated[
        list[str] | None, typer.Option("--knob", help="architecture knob key=value (JSON: cut_skips=[0,1])")
    ] = None,
    weights: Annotated[Path | None, typer.Option(help="model weights (safetensors)")] = None,
    init_seed: Annotated[int, typer.Option(help="seed of the initialisation when no weights are given")] = 0,
    update: Annotated[Path | None, typer.Option(help="the client's update (safetensors)")] = None,
    update_kind: Annotated[str | None, typer.Option(help="gradient, delta or weights")] = None,
    ground_truth: Annotated[
        Path | None, typer.Option(help="safetensors with 'images' and 'labels', for scoring")
    ] = None,
    images: Annotated[
        str | None, typer.Option(help="simulate a client on these images, e.g. astronaut,coffee")
    ] = None,
    source: Annotated[str, typer.Option(help="photos, folder, cifar10 or cifar100")] = "photos",
    dataset_path: Annotated[
        str | None, typer.Option(help="dataset directory for folder/cifar sources")
    ] = None,
    labels: Annotated[str | None, typer.Option(help="the client's labels, e.g. 1,3,5,8")] = None,
    labels_known: Annotated[bool, typer.Option(help="the server knows the labels")] = False,
    size: Annotated[int | None, typer.Option(help="image side in pixels")] = None,
    channels: Annotated[int | None, typer.Option(help="1 or 3")] = None,
    num_classes: Annotated[int | None, typer.Option(help="number of classes")] = None,
    normalization: Annotated[str | None, typer.Option(help="cifar10, cifar100, imagenet or none")] = None,
    num_images: Annotated[int | None, typer.Option(help="how many images the update covers")] = None,
    protocol: Annotated[str | None, typer.Option(help="fedsgd or fedavg")] = None,
    local_epochs: Annotated[int | None, typer.Option(help="client's local epochs")] = None,
    batch_size: Annotated[int | None, typer.Option(help="client's batch size")] = None,
    lr: Annotated[float | None, typer.Option(help="client's learning rate")] = None,
    momentum: Annotated[float | None, typer.Option(help="client's SGD momentum")] = None,
    num_samples: Annotated[int | None, typer.Option(help="client's number of samples")] = None,
    bn_mode: Annotated[str | None, typer.Option(help="client's batch-norm mode: train or eval")] = None,
    shuffle_seed: Annotated[
        int | None, typer.Option(help="seed of the client's shuffling of its samples into batches")
    ] = None,
    told: Annotated[
        list[str] | None,
        typer.Option(
            "--told",
            help="what the attacker is told of the client's training, where it differs from what the "
            "client did: key=value, null for unknown (e.g. batch_size=null: FedAvg Case 2)",
        ),
    ] = None,
    told_lr: Annotated[
        str | None,
        typer.Option(
            "--told-lr",
            help="the attacker knows the client's lr only roughly: MIN:MAX (a range, searched at 4 "
            "log-spaced values; MIN:MAX:POINTS for another count), candidates 0.01,0.05, or unknown",
        ),
    ] = None,
    told_local_epochs: Annotated[
        str | None,
        typer.Option(
            "--told-local-epochs", help="candidates for the client's local epochs, e.g. 1,2,4, or unknown"
        ),
    ] = None,
    told_batch_size: Annotated[
        str | None,
        typer.Option(
            "--told-batch-size",
            help="candidates for the client's batch size, e.g. 1,2,4,8, or unknown (SoK Case 2: searched, "
            "or one step on the whole batch with --param unknown_facts=single_step)",
        ),
    ] = None,
    told_shuffle_seed: Annotated[
        str | None,
        typer.Option(
            "--told-shuffle-seed",
            help="candidates for the client's shuffling seed, e.g. 0,1,given (given: the samples' "
            "order), or unknown",
        ),
    ] = None,
    attack_name: Annotated[
        str | None, typer.Option("--attack", help="attack name (see `gradleak catalog`)")
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", help="attack parameter key=value (values in JSON)")
    ] = None,
    knowledge: Annotated[int | None, typer.Option(min=0, max=5, help="attacker knowledge level 0-5")] = None,
    defense: Annotated[
        list[str] | None, typer.Option("--defense", help="e.g. quantize:bits=4 (repeatable)")
    ] = None,
    iterations: Annotated[int | None, typer.Option(help="attack iterations")] = None,
    restarts: Annotated[int | None, typer.Option(help="random restarts")] = None,
    time_limit: Annotated[float | None, typer.Option(help="wall-clock limit in seconds")] = None,
    seed: Annotated[int | None, typer.Option(help="job seed")] = None,
    verdict: Annotated[
        str | None,
        typer.Option(help="leakage estimate without ground truth: auto (default: only then), always, never"),
    ] = None,
    shadows: Annotated[int | None, typer.Option(help="K, the estimate's shadow audits (default 5)")] = None,
    shadow_iterations: Annotated[int | None, typer.Option(help="each shadow attack's iterations")] = None,
    shadow_time_limit: Annotated[float | None, typer.Option(help="each shadow attack's seconds")] = None,
    proxy_data: Annotated[
        Path | None,
        typer.Option(help="proxy images for the estimate (safetensors 'images'); default: shipped photos"),
    ] = None,
    verdict_seed: Annotated[
        int | None, typer.Option(help="seed of the proxy draws and shadow attacks")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda; default: cuda when available")] = None,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("runs"),
    save_spec: Annotated[Path | None, typer.Option(help="also write the resolved spec as YAML")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the metrics JSON on stdout")] = False,
) -> None:
    """Run one gradient inversion attack locally and write its report."""
    try:
        spec = build_spec(
            **{k: v for k, v in locals().items() if k not in ("out", "save_spec", "as_json", "device")}
        )
        if save_spec is not None:
            save_spec.write_text(spec.to_yaml())
        spec.check_knowledge()
        run_local(spec, out, device, as_json)
    except ValidationError as e:
        raise fail(_validation_message(e)) from None
    except GradleakError as e:
        raise fail(str(e)) from None


def _validation_message(e: ValidationError) -> str:
    first = e.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"invalid spec: {loc}: {first['msg']}{more}" if loc else f"invalid spec: {first['msg']}{more}"


def build_spec(**o: Any) -> JobSpec:
    """A JobSpec from an optional spec file with flags layered on top."""
    base: dict[str, Any] = {}
    iterations_given = o["iterations"] is not None
    if o["spec_file"] is not None:
        from_file = JobSpec.from_file(o["spec_file"])
        iterations_given = iterations_given or "iterations" in from_file.budget.model_fields_set
        base = json.loads(from_file.to_json())
    elif o["arch"] is None and o["model"] is None:
        raise fail("give --spec FILE or at least --arch or --model")
    if o["arch"] is not None and o["model"] is not None:
        raise fail("give --arch (a registered architecture) or --model (your own), not both")

    def put(path: str, value: Any) -> None:
        if value is None:
            return
        node = base
        *parents, last = path.split(".")
        for p in parents:
            if node.get(p) is None:  # absent, or null in a spec file (verdict.budget)
                node[p] = {}
            node = node[p]
        node[last] = value

    base.setdefault("model", ModelSpec(arch=o["arch"] or "").model_dump())
    put("model.arch", o["arch"])
    if o["model"] is not None:
        base["model"] = {**base["model"], **own_model(o["model"]), "knobs": {}}
    if o["knob"]:
        base["model"]["knobs"] = {**base["model"].get("knobs", {}), **parse_pairs(o["knob"], "knob")}
    put("model.weights", str(o["weights"]) if o["weights"] else None)
    if o["init_seed"]:
        put("model.init_seed", o["init_seed"])

    facts = {
        "protocol": o["protocol"],
        "lr": o["lr"],
        "local_epochs": o["local_epochs"],
        "batch_size": o["batch_size"],
        "momentum": o["momentum"],
        "num_samples": o["num_samples"],
        "bn_mode": o["bn_mode"],
        "shuffle_seed": o["shuffle_seed"],
    }
    facts = {k: v for k, v in facts.items() if v is not None}
    upd = base.setdefault("update", {})
    if o["update"] is not None and o["images"] is not None:
        raise fail("give either --update (a real client's update) or --images (a simulated client), not both")
    if o["images"] is not None:
        names = csv_list(o["images"]) or []
        sim_labels = [int(v) for v in csv_list(o["labels"]) or []] or None
        if facts.get("protocol") == "fedavg":
            facts.setdefault("num_samples", len(names))
        training = ClientTraining(**{"protocol": "fedsgd", **facts})
        upd.pop("artifact", None)
        upd["simulate"] = SimulatedClient(
            source=o["source"], images=names, labels=sim_labels, path=o["dataset_path"], training=training
        ).model_dump()
        upd["client"] = training.model_dump()  # the server is told what the client did
        upd.setdefault("kind", "delta" if training.protocol == "fedavg" else "gradient")
        base.setdefault("data", {}).setdefault("num_images", len(names))
        if o["labels_known"]:
            if sim_labels is None:
                raise fail("--labels-known needs --labels")
            base["data"]["labels"] = sim_labels
    elif o["update"] is not None:
        upd.pop("simulate", None)
        upd["artifact"] = str(o["update"])
        upd["client"] = {**upd.get("client", {}), **facts}
        if o["labels"] is not None:
            base.setdefault("data", {})["labels"] = [int(v) for v in csv_list(o["labels"]) or []]
    elif "artifact" not in upd and "simulate" not in upd:
        raise fail("give --update FILE or --images NAMES (or a spec file with an update)")
    rough = told_candidates(o)
    if o["told"] or rough:
        # what the attacker is told replaces what it would otherwise be told (the client's facts)
        told = {**upd.get("client", {}), **parse_pairs(o["told"], "--told"), **rough}
        for fact in rough:  # candidates replace the exact value and any earlier candidates
            if isinstance(told.get("candidates"), dict):
                told["candidates"] = {**told["candidates"], fact: None}
        upd["client"] = ClientTraining(**told).model_dump()
    put("update.kind", o["update_kind"])
    put("ground_truth", str(o["ground_truth"]) if o["ground_truth"] else None)

    data = base.setdefault("data", {})
    if o["size"] is not None or o["channels"] is not None:
        c, h, _ = data.get("shape", DataSpec().shape)
        side = o["size"] or h
        data["shape"] = [o["channels"] or c, side, side]
    put("data.num_classes", o["num_classes"])
    put("data.normalization", o["normalization"])
    put("data.num_images", o["num_images"])

    if o["attack_name"] is not None or o["param"]:
        name = o["attack_name"] or base.get("attack", {}).get("name", "inverting_gradients")
        if name not in ATTACK_PARAMS:
            raise fail(f"unknown attack {name!r}; valid: {', '.join(sorted(ATTACK_PARAMS))}")
        previous = base.get("attack", {}) if base.get("attack", {}).get("name") == name else {}
        base["attack"] = {**previous, "name": name, **parse_pairs(o["param"], "attack parameter")}
    if o["knowledge"] is not None:
        base["knowledge"] = Knowledge(o["knowledge"])
    if o["defense"]:
        base["defenses"] = [parse_defense(d).model_dump() for d in o["defense"]]
    budget = base.setdefault("budget", Budget().model_dump())
    for key, value in (
        ("iterations", o["iterations"]),
        ("restarts", o["restarts"]),
        ("time_limit_s", o["time_limit"]),
    ):
        if value is not None:
            budget[key] = value
    put("seed", o["seed"])
    put("verdict.when", o["verdict"])
    put("verdict.shadows", o["shadows"])
    put("verdict.proxy_data", str(o["proxy_data"]) if o["proxy_data"] else None)
    put("verdict.seed", o["verdict_seed"])
    put("verdict.budget.iterations", o["shadow_iterations"])
    put("verdict.budget.time_limit_s", o["shadow_time_limit"])
    if o["shadow_time_limit"] is not None and o["shadow_iterations"] is None:
        put("verdict.budget.iterations", MAX_BUDGET_ITERATIONS)  # a time limit alone: run until it is up
    if not iterations_given and budget.get("time_limit_s") is not None:
        budget["iterations"] = MAX_BUDGET_ITERATIONS  # a time limit alone: run until it is up
    return JobSpec.model_validate(base)


@contextlib.contextmanager
def local_modules(spec: JobSpec) -> Iterator[None]:
    """A local run may name the user's own module by import path: import it here, for this run."""
    if spec.model.arch != "module" or spec.model.source is None:
        yield
        return
    from service.models.local import import_factory, register_module, unregister_module

    key = register_module(import_factory(spec.model.source), key=spec.model.source)
    try:
        yield
    finally:
        unregister_module(key)


def run_local(spec: JobSpec, out: Path, device: str | None, as_json: bool) -> None:
    from service.jobs.runner import run_job
    from service.jobs.types import Progress
    from service.storage import LocalStore

    job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{spec.attack.name}-{secrets.token_hex(3)}"
    store = LocalStore(out)
    show_bar = sys.stderr.isatty() and not as_json

    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bar

    bar = Bar(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} it  loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        disable=not show_bar,
        transient=False,
    )
    with bar:
        task = bar.add_task(spec.attack.name, total=spec.budget.iterations, loss="-")

        def on_progress(p: Progress) -> None:
            if p.stage == "attack":
                loss = "-" if p.loss is None else f"{p.loss:.4g}"
                bar.update(task, completed=p.iteration, total=p.total, loss=loss)
            elif not show_bar and not as_json:
                typer.echo(f"[{p.stage}] {p.message}".rstrip(), err=True)

        ctx = local_context(job_id, store, device, on_progress)
        with local_modules(spec):
            result = run_job(spec, ctx)
    if as_json:
        typer.echo(json.dumps(result.manifest, indent=2))
        return
    summarize(result.manifest, {name: store.path(key) for name, key in result.artifacts.items()})


def summarize(manifest: dict[str, Any], paths: dict[str, Path]) -> None:
    a = manifest["attack"]
    typer.echo(
        f"{a['name']}: {a['iterations']} iterations in {manifest['timings']['attack_s']:.1f} s "
        f"({a['stop_reason']}), labels {a['labels']} ({a['label_source']})"
    )
    m = manifest.get("metrics")
    if m:
        from service.jobs.report import fmt_num

        mean, worst = m["mean"], m["worst_case"]
        typer.echo(
            f"PSNR mean {fmt_num(mean['psnr'], 2)} dB, worst case {fmt_num(worst['psnr'], 2)} dB; "
            f"SSIM mean {fmt_num(mean['ssim'], 3)}, worst case {fmt_num(worst['ssim'], 3)}; "
            f"LPIPS mean {fmt_num(mean.get('lpips'), 3)}"
        )
        if m.get("label_accuracy") is not None:
            acc = m["label_accuracy"]
            typer.echo(
                f"label accuracy {acc['multiset']:.2f} (as a multiset), {acc['positional']:.2f} (per image)"
            )
        if m.get("lpips_unavailable"):
            typer.echo(f"LPIPS unavailable: {m['lpips_unavailable']}")
    else:
        typer.echo(f"no metrics: {manifest.get('metrics_unavailable')}")
    conv = a.get("convergence") or {}
    if conv.get("converged") is False:
        typer.echo(
            f"warning: not converged: {conv['iterations']} iterations, fewer than the "
            f"{conv['needed_iterations']} the attack needs ({conv['basis']}); a larger budget may leak more"
        )
    for limit in a.get("limits") or []:
        typer.echo(f"caution: {limit['message']}")
    estimate = manifest.get("estimate")
    if estimate:
        labels = estimate["labels"]
        typer.echo(f"{estimate['summary']} ({estimate['shadows_run']} shadow audits)")
        typer.echo(f"labels revealed ({labels['certainty']}): {labels['counts']}")
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


@app.command()
def catalog(
    name: Annotated[
        str | None, typer.Argument(help="an attack, architecture, defense, metric or photo category")
    ] = None,
    knob: Annotated[
        list[str] | None, typer.Option("--knob", help="an architecture's knob key=value, for its tensors")
    ] = None,
    size: Annotated[int, typer.Option(help="image side in pixels, for an architecture's tensors")] = 32,
    channels: Annotated[int, typer.Option(help="1 or 3")] = 3,
    num_classes: Annotated[int, typer.Option(help="number of classes")] = 10,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List attacks (knowledge, parameter defaults), architectures (knobs), defenses, metrics and
    photos; with NAME, that entry in full (an architecture's with its weight-naming contract)."""
    from service.catalog import describe, full_catalog, overview

    cat = full_catalog()
    try:
        if name is not None and any(m["name"] == name for m in cat["architectures"]):
            from service.models import WEIGHT_CONTRACT

            rows = weight_contract(name, parse_pairs(knob, "knob"), (channels, size, size), num_classes)
            if as_json:
                entry = {**_catalog_entry(cat, name), "contract": WEIGHT_CONTRACT, "tensors": rows}
                typer.echo(json.dumps(entry, indent=2))
                return
            typer.echo(describe(name, cat))
            print_weight_contract(rows, (channels, size, size), num_classes)
            return
        if as_json:
            entry = cat if name is None else _catalog_entry(cat, name)
            typer.echo(json.dumps(entry, indent=2))
            return
        typer.echo(overview(cat) if name is None else describe(name, cat))
    except ValidationError as e:
        raise fail(_validation_message(e)) from None
    except GradleakError as e:
        raise fail(str(e)) from None


def _catalog_entry(cat: dict[str, Any], name: str) -> Any:
    from service.catalog import VIEWS, describe

    for kind in VIEWS:
        for entry in cat[kind]:
            if entry["name"] == name:
                return entry
    if name in cat["photos"]:
        return {"category": name, "photos": cat["photos"][name]}
    return describe(name, cat)  # raises the unknown-name error with the valid names


def weight_contract(
    arch: str, knobs: dict[str, Any], shape: tuple[int, int, int], num_classes: int
) -> list[dict[str, Any]]:
    """What an upload for `arch` holds: every tensor's name, shape and role per update kind."""
    from service.models import weight_names

    return weight_names(ModelSpec(arch=arch, knobs=knobs), DataSpec(shape=shape, num_classes=num_classes))


def print_weight_contract(rows: list[dict[str, Any]], shape: tuple[int, int, int], num_classes: int) -> None:
    """The single-architecture view's weight-naming part, as a table."""
    from service.models import WEIGHT_CONTRACT

    typer.echo(f"tensors for {'x'.join(map(str, shape))} images and {num_classes} classes:")
    width = max(len(r["name"]) for r in rows)
    typer.echo(f"  {'name':<{width}}  {'shape':<18} weights   gradient  delta")
    for r in rows:
        shape_text = "x".join(map(str, r["shape"])) or "scalar"
        typer.echo(
            f"  {r['name']:<{width}}  {shape_text:<18} {r['weights']:<9} {r['gradient']:<9} {r['delta']}"
        )
    typer.echo(WEIGHT_CONTRACT)


cli_service.register(app)
cli_federation.register(app)
cli_study.register(app)
cli_generator.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
