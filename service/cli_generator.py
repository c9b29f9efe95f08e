"""`gradleak generator train|show`: train a generator offline (a GAN on local data) and inspect
generator files.

A generator is what an attacker at knowledge level 2 holds: a model of data like the client's.
`train` writes OUT/generator.safetensors (weights plus the manifest in the safetensors
metadata), OUT/samples.png and OUT/checkpoint/ (no pickle), which `--resume OUT` continues from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from service.errors import GradleakError

generator_app = typer.Typer(
    help="Train generators (GANs) on local data for the generative attacks, and inspect generator files.",
    no_args_is_help=True,
)


@generator_app.command("train")
def train(
    data: Annotated[
        str,
        typer.Option(help="faces (shipped LFW crops), patches (photo-patch task), folder, cifar10, cifar100"),
    ] = "faces",
    path: Annotated[str | None, typer.Option(help="dataset directory for folder and cifar")] = None,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("runs/generator"),
    steps: Annotated[
        int, typer.Option(help="total generator steps (a resumed run continues up to it)")
    ] = 2000,
    batch_size: Annotated[int, typer.Option(help="images per step")] = 64,
    seed: Annotated[int, typer.Option(help="seed of the initialisation, the data order and the samples")] = 0,
    image_size: Annotated[int, typer.Option(help="32 or 64")] = 32,
    channels: Annotated[int, typer.Option(help="1 or 3 (grayscale data is replicated)")] = 3,
    conditional: Annotated[
        bool,
        typer.Option(help="class-conditional (dcgan_cond); needs labelled data (patches, cifar, folder)"),
    ] = False,
    latent_dim: Annotated[int, typer.Option(help="latent size")] = 100,
    width: Annotated[int, typer.Option(help="channel width of G and D (DCGAN's ngf and ndf)")] = 32,
    lr: Annotated[float, typer.Option(help="Adam learning rate (betas 0.5, 0.999)")] = 2e-4,
    loss: Annotated[str, typer.Option(help="hinge or bce")] = "hinge",
    augment: Annotated[
        bool, typer.Option(help="differentiable translation and cutout (small data sets)")
    ] = True,
    ema: Annotated[float, typer.Option(help="decay of the exported generator's weight average")] = 0.999,
    max_images: Annotated[int, typer.Option(help="at most this many images (folder, cifar)")] = 10_000,
    per_class: Annotated[int, typer.Option(help="patches: crops per photo")] = 500,
    checkpoint_every: Annotated[int, typer.Option(help="steps between checkpoints and sample grids")] = 250,
    log_every: Annotated[int, typer.Option(help="steps between progress lines")] = 25,
    time_limit: Annotated[
        float | None, typer.Option(help="stop (with a checkpoint) after this many seconds")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="continue a run from its OUT directory; every setting but --steps comes from it"),
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda; default: cuda when available")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON on stdout")] = False,
) -> None:
    """Train a DCGAN generator (spectral-norm discriminator, hinge loss, Adam 2e-4, EMA)."""
    from service.cli import fail
    from service.generators.train import TrainConfig, train_generator

    if loss not in ("hinge", "bce"):
        raise fail(f"--loss is hinge or bce, got {loss!r}")
    config = TrainConfig(
        data=data,
        steps=steps,
        path=path,
        batch_size=batch_size,
        seed=seed,
        image_size=image_size,
        channels=channels,
        conditional=conditional,
        latent_dim=latent_dim,
        width=width,
        lr=lr,
        loss=loss,  # type: ignore[arg-type]
        augment=augment,
        ema=ema,
        max_images=max_images,
        per_class=per_class,
    )
    if checkpoint_every < 1 or log_every < 1:
        raise fail("--checkpoint-every and --log-every must be positive")
    log = (lambda m: typer.echo(m, err=True)) if as_json else typer.echo
    try:
        result = train_generator(
            config,
            resume if resume is not None and out == Path("runs/generator") else out,
            resume=resume,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
            device=device,
            time_limit_s=time_limit,
            log=log,
        )
    except GradleakError as e:
        raise fail(str(e)) from None
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "out": str(result.out),
                    "steps": result.steps,
                    "elapsed_s": round(result.elapsed_s, 2),
                    "total_elapsed_s": round(result.total_elapsed_s, 2),
                    "cpu_s": round(result.cpu_s, 2),
                    "total_cpu_s": round(result.total_cpu_s, 2),
                    "manifest": result.manifest.model_dump(mode="json", exclude_none=True),
                },
                indent=1,
            )
        )


@generator_app.command("show")
def show(
    file: Annotated[Path, typer.Argument(help="a generator file (safetensors with a manifest)")],
    samples: Annotated[Path | None, typer.Option(help="also write an 8x8 sample grid PNG here")] = None,
) -> None:
    """Check a generator file as a job would load it and print its manifest."""
    from service.cli import fail
    from service.generators import load_generator_file
    from service.generators.train import sample_grid_png

    try:
        loaded = load_generator_file(file)
    except GradleakError as e:
        raise fail(str(e)) from None
    params = sum(p.numel() for p in loaded.module.parameters())
    typer.echo(json.dumps(loaded.manifest.model_dump(mode="json", exclude_none=True), indent=1))
    typer.echo(f"{params} parameters; loads as {type(loaded.module).__name__}")
    if samples is not None:
        samples.parent.mkdir(parents=True, exist_ok=True)
        samples.write_bytes(sample_grid_png(loaded.module, loaded.manifest))
        typer.echo(f"samples: {samples}")


def register(app: typer.Typer) -> None:
    app.add_typer(generator_app, name="generator")
