"""Training a generator offline: a GAN with a standard, stable recipe, on CPU or GPU.

The recipe: the DCGAN generator against a DCGAN discriminator with spectral norm (Miyato et
al.; a projection head when class-conditional), hinge loss (or the non-saturating BCE loss),
Adam with lr 2e-4 and betas (0.5, 0.999), one discriminator step per generator step,
differentiable augmentation (random translation and cutout, applied to real and generated
images alike, Zhao et al. 2020) so that a hundred faces are enough, and an exponential moving
average of the generator's weights, which is what is exported (after re-estimating its batch
norm statistics).

Everything a run needs to continue lives in OUT/checkpoint/ (tensors as safetensors, the rest
as JSON; no pickle), written every `checkpoint_every` steps and at the end; a resumed run
continues bit for bit where the checkpoint left off (same RNG streams). OUT/generator.safetensors
is the exported generator, OUT/samples.png its sample grid (and OUT/samples/ the grid of every
checkpoint, to see how training went).
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from service.errors import ArtifactError, SpecError
from service.generators.archs import DCGAN_SIDES, build_generator
from service.generators.io import save_generator
from service.generators.manifest import GeneratorManifest
from service.tensorio import load_safetensors_file, save_safetensors_file

DATA_SOURCES = ("faces", "patches", "folder", "cifar10", "cifar100")
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
TENSORS_FILE = "training.safetensors"
GENERATOR_FILE = "generator.safetensors"
SAMPLES_FILE = "samples.png"
SNAPSHOT_DIR = "samples"  # the grid of every checkpoint, step-NNNNNNN.png
SAMPLE_GRID = 8  # 8 x 8 samples
STANDING_STATS_BATCHES = 16


@dataclass(frozen=True)
class TrainConfig:
    """One training run. `steps` is the total number of generator steps."""

    data: str
    steps: int
    path: str | None = None
    batch_size: int = 64
    seed: int = 0
    image_size: int = 32
    channels: int = 3
    conditional: bool = False
    latent_dim: int = 100
    width: int = 32
    lr: float = 2e-4
    loss: Literal["hinge", "bce"] = "hinge"
    augment: bool = True
    ema: float = 0.999
    max_images: int = 10_000
    per_class: int = 500  # patches: crops per photo

    def check(self, given_data: bool = False) -> None:
        """Refuse a config no run can train; `given_data`: the images come with the call (the
        service's uploaded image sets, `data` "upload"), not from `data`/`path`."""
        if not given_data and self.data not in DATA_SOURCES:
            raise SpecError(f"unknown training data {self.data!r}; valid: {', '.join(DATA_SOURCES)}")
        if self.data in ("folder", "cifar10", "cifar100") and not self.path:
            raise SpecError(f"training data {self.data} needs a local path (--path)")
        if self.image_size not in DCGAN_SIDES:
            raise SpecError(f"image size is {' or '.join(map(str, DCGAN_SIDES))}, got {self.image_size}")
        if self.channels not in (1, 3):
            raise SpecError(f"images have 1 or 3 channels, got {self.channels}")
        for name, value, lo in (
            ("steps", self.steps, 1),
            ("batch size", self.batch_size, 2),
            ("width", self.width, 4),
        ):
            if value < lo:
                raise SpecError(f"{name} must be at least {lo}, got {value}")
        if self.loss not in ("hinge", "bce"):
            raise SpecError(f"loss is hinge or bce, got {self.loss!r}")
        if not 0 <= self.ema < 1:
            raise SpecError(f"ema must lie in [0, 1), got {self.ema}")


@dataclass
class TrainData:
    images: torch.Tensor  # (N, C, H, W) in [0, 1]
    labels: torch.Tensor | None  # (N,) int64
    num_classes: int | None
    trained_on: str


def training_data(config: TrainConfig) -> TrainData:
    """The images a run trains on, loaded from the shipped photos or a local path (never downloaded)."""
    size, channels = config.image_size, config.channels
    if config.data == "faces":
        from service.data.photos import NUM_FACES, load_photo

        images = torch.stack([load_photo(f"face{i:02d}", size, channels) for i in range(NUM_FACES)])
        return TrainData(images, None, None, "faces")
    if config.data == "patches":
        from service.data.patches import DEFAULT_PATCH_PHOTOS, photo_patches

        images, labels = photo_patches(size, per_class=config.per_class, seed=config.seed, channels=channels)
        return TrainData(images, labels, len(DEFAULT_PATCH_PHOTOS), "patches")
    assert config.path is not None  # check()
    if config.data == "folder":
        from service.data.folder import index_folder, load_folder

        index = index_folder(config.path)
        names = index.files[: config.max_images]
        images, folder_labels = load_folder(config.path, list(names), size, channels)
        folder_y = None if folder_labels is None else torch.tensor(folder_labels)
        classes = None if index.labels is None else max(index.labels) + 1
        return TrainData(images, folder_y, classes, f"folder:{Path(config.path).resolve().name}")
    from service.data.cifar import load_cifar

    which = 10 if config.data == "cifar10" else 100
    images, cifar_labels = load_cifar(
        config.path, which, list(range(config.max_images)), "train", size, channels
    )
    return TrainData(images, torch.tensor(cifar_labels), which, config.data)


# ---------------------------------------------------------------------------------------------
# the discriminator and the augmentation
# ---------------------------------------------------------------------------------------------


class Discriminator(nn.Module):
    """DCGAN's discriminator with spectral norm instead of batch norm; a projection head
    (Miyato and Koyama 2018) when class-conditional. Takes images in [-1, 1]; returns (N,) logits."""

    def __init__(self, channels: int, side: int, width: int, num_classes: int | None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, c = channels, width
        for _ in range({32: 3, 64: 4}[side]):
            layers += [spectral_norm(nn.Conv2d(c_in, c, 4, 2, 1)), nn.LeakyReLU(0.2, True)]
            c_in, c = c, c * 2
        self.features = nn.Sequential(*layers)
        self.head = spectral_norm(nn.Conv2d(c_in, 1, 4, 1, 0))
        self.embed = spectral_norm(nn.Embedding(num_classes, c_in)) if num_classes is not None else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(x)
        out: torch.Tensor = self.head(h).flatten()
        if self.embed is not None:
            assert labels is not None
            out = out + (self.embed(labels) * h.sum(dim=(2, 3))).sum(dim=1)
        return out


def diff_augment(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Random translation (up to 1/8 of the side, zero padding) and cutout (a square of half the
    side), per image; differentiable in x."""
    n, _, h, w = x.shape
    dev = x.device
    # translation
    sy, sx = h // 8, w // 8
    ty = torch.randint(-sy, sy + 1, (n, 1, 1), generator=rng).to(dev)
    tx = torch.randint(-sx, sx + 1, (n, 1, 1), generator=rng).to(dev)
    gy, gx = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
    yy = (gy[None] + ty).clamp(-1, h)
    xx = (gx[None] + tx).clamp(-1, w)
    padded = F.pad(x, (1, 1, 1, 1))
    idx = torch.arange(n, device=dev)[:, None, None]
    x = padded.permute(0, 2, 3, 1)[idx, yy + 1, xx + 1].permute(0, 3, 1, 2)
    # cutout
    ch, cw = h // 2, w // 2
    cy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), generator=rng).to(dev)
    cx = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), generator=rng).to(dev)
    keep = ((gy[None] - cy).abs() >= ch // 2) | ((gx[None] - cx).abs() >= cw // 2)
    return x * keep[:, None].to(x.dtype)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


@dataclass
class StepLog:
    step: int
    d_loss: float
    g_loss: float
    d_real: float
    d_fake: float
    elapsed_s: float


@dataclass
class TrainResult:
    out: Path
    manifest: GeneratorManifest
    steps: int
    elapsed_s: float  # this invocation's wall-clock
    total_elapsed_s: float  # over every invocation that made the checkpoint
    cpu_s: float  # this invocation's process CPU time (all threads)
    total_cpu_s: float
    history: list[dict[str, float]] = field(default_factory=list)
    stopped: bool = False  # should_stop answered True before `steps` were reached


class _Run:
    def __init__(self, config: TrainConfig, data: TrainData, device: torch.device) -> None:
        self.config, self.data, self.device = config, data, device
        self.manifest = GeneratorManifest(
            arch="dcgan_cond" if config.conditional else "dcgan",
            latent_dim=config.latent_dim,
            image_shape=(config.channels, config.image_size, config.image_size),
            num_classes=data.num_classes if config.conditional else None,
            width=config.width,
            trained_on=data.trained_on,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.g = build_generator(self.manifest).to(device)
            self.d = Discriminator(
                config.channels, config.image_size, config.width, self.manifest.num_classes
            )
            self.d.to(device)
        self.ema = copy.deepcopy(self.g).requires_grad_(False)
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=config.lr, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=config.lr, betas=(0.5, 0.999))
        self.rng = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.elapsed_before = 0.0
        self.cpu_before = 0.0
        self.history: list[dict[str, float]] = []
        self.real = data.images.to(device) * 2 - 1
        self.labels = None if data.labels is None else data.labels.to(device)

    # one step ---------------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float, float, float]:
        cfg, n = self.config, self.real.shape[0]
        idx = torch.randint(0, n, (cfg.batch_size,), generator=self.rng)
        real = self.real[idx.to(self.device)]
        flip = (torch.rand(cfg.batch_size, generator=self.rng) < 0.5).to(self.device)
        real = torch.where(flip[:, None, None, None], real.flip(-1), real)
        y_real = y_fake = None
        if self.manifest.num_classes is not None:
            assert self.labels is not None
            y_real = self.labels[idx.to(self.device)]
            y_fake = self.labels[torch.randint(0, n, (cfg.batch_size,), generator=self.rng).to(self.device)]
        z = torch.randn(cfg.batch_size, cfg.latent_dim, generator=self.rng).to(self.device)
        fake = self.g(z, y_fake) * 2 - 1

        def aug(x: torch.Tensor) -> torch.Tensor:
            return diff_augment(x, self.rng) if cfg.augment else x

        d_real = self.d(aug(real), y_real)
        d_fake = self.d(aug(fake.detach()), y_fake)
        if cfg.loss == "hinge":
            d_loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        else:
            d_loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()

        g_out = self.d(aug(fake), y_fake)
        g_loss = -g_out.mean() if cfg.loss == "hinge" else F.softplus(-g_out).mean()
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_g.step()
        self._update_ema()
        self.step += 1
        return d_loss.item(), g_loss.item(), d_real.mean().item(), d_fake.mean().item()

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.config.ema, (1 + self.step) / (10 + self.step))
        for p_ema, p in zip(self.ema.parameters(), self.g.parameters(), strict=True):
            p_ema.lerp_(p, 1 - decay)
        for b_ema, b in zip(self.ema.buffers(), self.g.buffers(), strict=True):
            b_ema.copy_(b)

    # export -----------------------------------------------------------------------------------
    @torch.no_grad()
    def exported(self) -> nn.Module:
        """The averaged generator, its batch norm statistics re-estimated on fresh latents, in eval mode."""
        g = copy.deepcopy(self.ema)
        norms = [m for m in g.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
        g.train()
        rng = torch.Generator().manual_seed(self.config.seed + 1)
        for _ in range(STANDING_STATS_BATCHES if norms else 0):
            z = torch.randn(self.config.batch_size, self.config.latent_dim, generator=rng).to(self.device)
            g(z, self._sample_labels(self.config.batch_size, rng))
        for m in norms:
            m.momentum = 0.1
        return g.eval().cpu()

    def _sample_labels(self, n: int, rng: torch.Generator) -> torch.Tensor | None:
        if self.manifest.num_classes is None:
            return None
        return (torch.arange(n) % self.manifest.num_classes).to(self.device)

    def manifest_now(self, elapsed: float) -> GeneratorManifest:
        cfg = self.config
        notes = (
            f"gradleak generator train: {cfg.loss} loss, batch {cfg.batch_size}, lr {cfg.lr:g}, "
            f"augment {cfg.augment}, EMA {cfg.ema:g}, seed {cfg.seed}, {len(self.real)} images, "
            f"{elapsed:.0f} s of training"
        )
        return self.manifest.model_copy(update={"steps": self.step, "notes": notes})

    # checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, out: Path, elapsed: float, cpu: float) -> None:
        folder = out / CHECKPOINT_DIR
        tensors: dict[str, torch.Tensor] = {}
        for prefix, module in (("g", self.g), ("d", self.d), ("ema", self.ema)):
            tensors.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
        groups: dict[str, Any] = {}
        for prefix, opt in (("opt_g", self.opt_g), ("opt_d", self.opt_d)):
            state = opt.state_dict()
            for index, entries in state["state"].items():
                for key, value in entries.items():
                    tensors[f"{prefix}.state.{index}.{key}"] = torch.as_tensor(value)
            groups[prefix] = state["param_groups"]
        tensors["rng"] = self.rng.get_state()
        state_json = {
            "format": 1,
            "step": self.step,
            "elapsed_s": elapsed,
            "cpu_s": cpu,
            "config": asdict(self.config),
            "manifest": self.manifest.model_dump(mode="json"),
            "param_groups": groups,
            "history": self.history,
        }
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (TENSORS_FILE + ".tmp")
        save_safetensors_file(tensors, tmp)
        os.replace(tmp, folder / TENSORS_FILE)
        tmp_json = folder / (STATE_FILE + ".tmp")
        tmp_json.write_text(json.dumps(state_json, indent=1))
        os.replace(tmp_json, folder / STATE_FILE)

    def load_checkpoint(self, folder: Path, state_json: dict[str, Any]) -> None:
        tensors = load_safetensors_file(
            folder / TENSORS_FILE,
            allowed_dtypes=("F16", "BF16", "F32", "F64", "I64", "U8"),
        )
        try:
            for prefix, module in (("g", self.g), ("d", self.d), ("ema", self.ema)):
                part = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
                module.load_state_dict(part)
            for prefix, opt in (("opt_g", self.opt_g), ("opt_d", self.opt_d)):
                entries: dict[int, dict[str, torch.Tensor]] = {}
                for k, v in tensors.items():
                    if k.startswith(prefix + ".state."):
                        index, key = k[len(prefix) + 7 :].split(".", 1)
                        entries.setdefault(int(index), {})[key] = v
                opt.load_state_dict({"state": entries, "param_groups": state_json["param_groups"][prefix]})
            self.rng.set_state(tensors["rng"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise ArtifactError(f"{folder}: the checkpoint does not fit this run: {e}") from None
        self.step = int(state_json["step"])
        self.elapsed_before = float(state_json.get("elapsed_s", 0.0))
        self.cpu_before = float(state_json.get("cpu_s", 0.0))
        self.history = list(state_json.get("history", []))


def read_checkpoint_state(resume: str | Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint folder of a run directory (or the folder itself) and its state JSON."""
    p = Path(resume)
    folder = p / CHECKPOINT_DIR if (p / CHECKPOINT_DIR / STATE_FILE).exists() else p
    state_path = folder / STATE_FILE
    if not state_path.exists():
        raise ArtifactError(f"no checkpoint at {p}: expected {p / CHECKPOINT_DIR / STATE_FILE}")
    try:
        state = json.loads(state_path.read_text())
        int(state["step"])
        TrainConfig(**state["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{state_path}: not a checkpoint of gradleak generator train ({e})") from None
    return folder, state


def train_generator(
    config: TrainConfig,
    out: str | Path,
    *,
    resume: str | Path | None = None,
    checkpoint_every: int = 500,
    log_every: int = 50,
    device: str | None = None,
    time_limit_s: float | None = None,
    log: Callable[[str], None] = print,
    data: TrainData | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train (or, with `resume`, continue training) until `config.steps` generator steps, or
    until this invocation has run `time_limit_s` seconds; checkpoint every `checkpoint_every`
    steps and at the end; export the generator and its sample grid at every checkpoint.

    For the service's training job: `data` replaces the images `config` names (an uploaded image
    set); `should_stop` is polled before every step and, when it answers True, the run
    checkpoints and returns with `stopped` set; `on_log` gets each history row (with the rate in
    steps/s and the ETA in seconds); `on_checkpoint(step)` is called after each checkpoint and
    export is on disk."""
    out = Path(out)
    state_json: dict[str, Any] | None = None
    folder: Path | None = None
    if resume is not None:
        folder, state_json = read_checkpoint_state(resume)
        saved = TrainConfig(**state_json["config"])
        config = TrainConfig(**{**asdict(saved), "steps": config.steps})
    config.check(given_data=data is not None)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = data if data is not None else training_data(config)
    if config.conditional and data.num_classes is None:
        raise SpecError(f"training data {config.data} has no labels: a conditional generator needs them")
    run = _Run(config, data, dev)
    if folder is not None and state_json is not None:
        run.load_checkpoint(folder, state_json)
        log(f"resumed from {folder} at step {run.step}")
    if run.step >= config.steps:
        log(f"the checkpoint is at step {run.step}, not below --steps {config.steps}: nothing to train")
    log(
        f"training a {run.manifest.arch} generator ({'x'.join(map(str, run.manifest.image_shape))}, "
        f"latent {config.latent_dim}, width {config.width}) on {data.trained_on}: {len(data.images)} images, "
        f"steps {run.step}..{config.steps}, batch {config.batch_size}, on {dev}"
    )
    start, cpu_start = time.monotonic(), time.process_time()
    first = run.step
    acc = np.zeros(4)
    count = 0

    def elapsed() -> float:
        return run.elapsed_before + time.monotonic() - start

    def cpu() -> float:
        return run.cpu_before + time.process_time() - cpu_start

    def checkpoint() -> None:
        run.save_checkpoint(out, elapsed(), cpu())
        export(run, out, elapsed())
        if on_checkpoint is not None:
            on_checkpoint(run.step)

    stopped = False
    while run.step < config.steps:
        if time_limit_s is not None and time.monotonic() - start >= time_limit_s:
            log(f"time limit of {time_limit_s:g} s reached at step {run.step}")
            break
        if should_stop is not None and should_stop():
            log(f"stopped at step {run.step}")
            stopped = True
            break
        acc += run.train_step()
        count += 1
        if run.step % log_every == 0 or run.step == config.steps:
            d_loss, g_loss, d_real, d_fake = acc / count
            rate = (run.step - first) / max(time.monotonic() - start, 1e-9)
            eta = (config.steps - run.step) / rate if rate > 0 else math.inf
            row = {
                "step": run.step,
                "d_loss": d_loss,
                "g_loss": g_loss,
                "d_real": d_real,
                "d_fake": d_fake,
                "elapsed_s": round(elapsed(), 2),
                "cpu_s": round(cpu(), 2),
            }
            run.history.append(row)
            if on_log is not None:
                on_log({**row, "steps_per_s": rate, "eta_s": eta})
            log(
                f"step {run.step}/{config.steps}  d_loss {d_loss:.3f}  g_loss {g_loss:.3f}  "
                f"D(real) {d_real:+.2f}  D(fake) {d_fake:+.2f}  {rate:.2f} steps/s  eta {_duration(eta)}"
            )
            acc[:] = 0
            count = 0
        if run.step % checkpoint_every == 0 and run.step < config.steps:
            checkpoint()
            log(f"checkpoint at step {run.step}: {out / CHECKPOINT_DIR}")
    checkpoint()
    log(f"generator: {out / GENERATOR_FILE}  samples: {out / SAMPLES_FILE}")
    return TrainResult(
        out,
        run.manifest_now(elapsed()),
        run.step,
        time.monotonic() - start,
        elapsed(),
        time.process_time() - cpu_start,
        cpu(),
        run.history,
        stopped,
    )


def export(run: _Run, out: Path, elapsed: float) -> None:
    g = run.exported()
    manifest = run.manifest_now(elapsed)
    save_generator(g, manifest, out / GENERATOR_FILE)
    png = sample_grid_png(g, manifest, run.data.images, seed=run.config.seed)
    (out / SAMPLES_FILE).write_bytes(png)
    (out / SNAPSHOT_DIR).mkdir(exist_ok=True)
    (out / SNAPSHOT_DIR / f"step-{run.step:07d}.png").write_bytes(png)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


@torch.no_grad()
def sample_grid_png(
    generator: nn.Module,
    manifest: GeneratorManifest,
    real: torch.Tensor | None = None,
    *,
    seed: int = 0,
    scale: int = 2,
) -> bytes:
    """An 8 x 8 grid of samples (fixed latents from `seed`; a conditional generator's labels
    cycle through its classes), with a row of training images under it when given."""
    n = SAMPLE_GRID * SAMPLE_GRID
    z = torch.randn(n, manifest.latent_dim, generator=torch.Generator().manual_seed(seed))
    labels = None if manifest.num_classes is None else torch.arange(n) % manifest.num_classes
    samples = generator.eval()(z, labels).cpu()
    rows = [samples[i * SAMPLE_GRID : (i + 1) * SAMPLE_GRID] for i in range(SAMPLE_GRID)]
    _, h, w = manifest.image_shape
    th, tw, pad, header = h * scale, w * scale, 2, 18
    width = SAMPLE_GRID * (tw + pad) + pad
    real_rows = 1 if real is not None else 0
    height = header + SAMPLE_GRID * (th + pad) + real_rows * (header + th + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font: Any
    try:
        font = ImageFont.load_default(size=11)
    except (ImportError, OSError):
        font = ImageFont.load_default()
    title = f"{manifest.arch} on {manifest.trained_on}, step {manifest.steps or 0}"
    draw.text((pad, 3), title, fill=(30, 30, 30), font=font)
    y = header
    for row in rows:
        for c, img in enumerate(row):
            canvas.paste(_tile(img, (tw, th)), (pad + c * (tw + pad), y))
        y += th + pad
    if real is not None:
        draw.text((pad, y + 3), "training images", fill=(110, 110, 110), font=font)
        y += header
        for c, img in enumerate(real[:SAMPLE_GRID]):
            canvas.paste(_tile(img, (tw, th)), (pad + c * (tw + pad), y))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _tile(img: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    pil = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).convert("RGB")
    return pil.resize(size, Image.Resampling.NEAREST)
