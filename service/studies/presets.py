"""Presets: studies that reproduce the SoK's experiments on data available offline.

Each preset builds a StudySpec at a scale: `quick` (reduced sizes: finishes in minutes on two CPU
cores) or `paper` (the SoK's sizes, for a GPU worker). Simulated clients use the shipped photos
(natural photos, faces, textures, text); federations train on the photo-patch task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from service.errors import SpecError, UnknownNameError
from service.studies.spec import StudySpec

Scale = Literal["quick", "paper"]
SCALES: tuple[Scale, ...] = ("quick", "paper")

# The DCGAN generator trained by `gradleak generator train` on faces face00..face59 (32x32), as
# the repository ships it; an installed wheel has no bench/ and so no generator.
FACES_GENERATOR = (
    Path(__file__).resolve().parents[2] / "bench" / "results" / "generative-gen-faces.safetensors"
)
FACES_GENERATOR_TRAIN = (
    "gradleak generator train --data folder --path FACES_00_59 --steps 2535 --batch-size 32 "
    "--width 16 --ema 0.99 --out DIR"
)

NATURAL = ["astronaut", "coffee", "chelsea", "camera", "clock", "coins", "rocket", "motorcycle_left"]


@dataclass(frozen=True)
class Preset:
    name: str
    reproduces: str
    description: str
    build: Callable[..., dict[str, Any]]
    takes_generator: bool = False  # its latent-space attacks' generator may be given (ood)

    def spec(self, scale: Scale, generator: str | None = None) -> StudySpec:
        if generator is None:
            return StudySpec.model_validate(self.build(scale))
        if not self.takes_generator:
            raise SpecError(f"the {self.name} preset runs no latent-space attack: it takes no generator")
        return StudySpec.model_validate(self.build(scale, generator=generator))


def _pick(scale: Scale, quick: Any, paper: Any) -> Any:
    return quick if scale == "quick" else paper


def _fedavg_job(
    scale: Scale, images: list[str], *, epochs: int = 1, batch: int | None = None
) -> dict[str, Any]:
    """A FedAvg client on `images` and the unrolling attack told its training (SoK Case 1)."""
    n = len(images)
    training = {"protocol": "fedavg", "lr": 0.01, "local_epochs": epochs, "batch_size": batch or n}
    side = _pick(scale, 16, 32)
    # unrolling multiplies an iteration's cost by the local steps: quick halves the width for it
    return {
        "model": {
            "arch": "convnet",
            "knobs": _pick(scale, {"width": 8, "depth": 2}, {"width": 64, "depth": 3}),
        },
        "data": {"shape": [3, side, side], "labels": list(range(n))},
        "update": {
            "kind": "delta",
            "simulate": {"images": images, "labels": list(range(n)), "training": training},
            "client": {**training, "num_samples": n},
        },
        "knowledge": 3,
        "attack": {"name": "fedavg_unroll"},
        "budget": {"iterations": _pick(scale, 100, 4000)},
    }


def _gradient_job(scale: Scale, images: list[str], model: dict[str, Any] | None = None) -> dict[str, Any]:
    """A FedSGD client on `images` attacked with Inverting Gradients (labels known)."""
    n = len(images)
    side = _pick(scale, 16, 32)
    return {
        "model": model
        or {"arch": "convnet", "knobs": _pick(scale, {"width": 16, "depth": 2}, {"width": 64, "depth": 3})},
        "data": {"shape": [3, side, side], "labels": list(range(n))},
        "update": {"simulate": {"images": images, "labels": list(range(n))}},
        "attack": {"name": "inverting_gradients"},
        "budget": {"iterations": _pick(scale, 150, 4000)},
    }


def local_updates(scale: Scale) -> dict[str, Any]:
    updates = [1, 2, 4, 6, 8]
    return {
        "title": "Local updates U (SoK Tab. I)",
        "job": _fedavg_job(scale, NATURAL[: _pick(scale, 2, 8)]),
        "axes": [
            {
                "path": "update.simulate.training.local_epochs",
                "name": "local_updates",
                "values": updates,
                "also": {"update.client.local_epochs": updates},
            }
        ],
        "seeds": _pick(scale, [0], [0, 1, 2]),
    }


def batch_knowledge(scale: Scale) -> dict[str, Any]:
    n = _pick(scale, 4, 10)
    batches = _pick(scale, [4, 2, 1], [10, 5, 4, 3, 2])  # 1, 2, 4 (quick) or 1..5 mini-batches
    return {
        "title": "Attacker knows the batch size or not (SoK Tab. II)",
        "job": _fedavg_job(scale, NATURAL[:n]),
        "axes": [
            {
                "path": "update.simulate.training.batch_size",
                "name": "mini_batches",
                "values": batches,
                "labels": [str(-(-n // b)) for b in batches],
                "also": {"update.client.batch_size": batches},
            },
            {
                "path": "attack",
                "name": "case",
                "values": [{"name": "fedavg_unroll"}, {"name": "inverting_gradients", "cost": "cosine"}],
                "labels": ["case 1: B known (unrolled)", "case 2: B unknown (single step)"],
            },
        ],
        "seeds": _pick(scale, [0], [0, 1, 2]),
    }


def content(scale: Scale) -> dict[str, Any]:
    k = _pick(scale, 1, 4)
    groups = {
        "photos": NATURAL[:k],
        "faces": [f"face{i:02d}" for i in range(k)],
        "textures": ["brick", "grass", "gravel", "brick"][:k],
        "text": ["text", "page", "text", "page"][:k],
    }
    return {
        "title": "Image content: photos, faces, textures, text (SoK Fig. 6-8)",
        "job": _gradient_job(scale, groups["photos"]),
        "axes": [
            {
                "path": "update.simulate.images",
                "name": "content",
                "values": list(groups.values()),
                "labels": list(groups),
            },
        ],
        "seeds": _pick(scale, [0, 1], [0, 1, 2]),
        "batch_points": 8,  # one model: the points' attacks run as one batched computation
    }


def micro_designs(scale: Scale) -> dict[str, Any]:
    base = _pick(scale, {"width": 16, "depth": 2}, {"width": 64, "depth": 3})
    designs: dict[str, dict[str, Any]] = {
        "baseline": {},
        "no bias": {"bias": False},
        "no ReLU": {"relu": False},
        "dropout 0.3": {"dropout": 0.3},
        "no max-pooling": {"maxpool": False},
        "kernel 5": {"kernel_size": 5},
        "kernel 1": {"kernel_size": 1},
        "padding 3": {"padding": 3},
    }
    return {
        "title": "ConvNet micro-designs (SoK Tab. IV)",
        "job": _gradient_job(scale, NATURAL[: _pick(scale, 1, 4)]),
        "axes": [
            {
                "path": "model.knobs",
                "name": "design",
                "values": [{**base, **d} for d in designs.values()],
                "labels": list(designs),
            },
        ],
        "seeds": _pick(scale, [0], [0, 1, 2]),
    }


def dimensions(scale: Scale) -> dict[str, Any]:
    sides = _pick(scale, [16, 32], [32, 64, 128, 256, 512])
    batches = _pick(scale, [1, 2, 4], [1, 4, 16, 64])
    pool = NATURAL + [f"face{i:02d}" for i in range(100)]
    labels = [[i % 10 for i in range(b)] for b in batches]
    return {
        "title": "Resolution and batch size (SoK Fig. 4)",
        "job": _gradient_job(scale, pool[:1]),
        "axes": [
            {
                "path": "data.shape",
                "name": "resolution",
                "values": [[3, s, s] for s in sides],
                "labels": [str(s) for s in sides],
            },
            {
                "path": "update.simulate.images",
                "name": "batch_size",
                "values": [pool[:b] for b in batches],
                "labels": [str(b) for b in batches],
                "also": {"update.simulate.labels": labels, "data.labels": labels},
            },
        ],
        "seeds": _pick(scale, [0], [0, 1, 2]),
    }


def _variants(scale: Scale, variants: list[tuple[str, str, dict[str, Any], int]]) -> list[dict[str, Any]]:
    """Zipped axes over architecture variants: (architecture, variant label, knobs, image side)."""
    return [
        {"path": "model.arch", "name": "architecture", "values": [v[0] for v in variants]},
        {
            "path": "model.knobs",
            "name": "variant",
            "values": [v[2] for v in variants],
            "labels": [v[1] for v in variants],
            "also": {"data.shape": [[3, v[3], v[3]] for v in variants]},
        },
    ]


def skip_connections(scale: Scale) -> dict[str, Any]:
    """ResNets with one skip connection cut at each position (Fig. 13) and DenseNets whose dense
    layers see fewer earlier feature maps (Fig. 14). `quick` cuts every block of ResNet-18 but only
    the first block of each stage of ResNet-34, at width 8 on 16x16 images (DenseNet: growth rate
    8 on 32x32, the smallest its ImageNet stem takes)."""
    width = _pick(scale, {"width": 8}, {})
    side = _pick(scale, 16, 32)
    variants: list[tuple[str, str, dict[str, Any], int]] = []
    for arch, blocks in (("resnet18", range(8)), ("resnet34", _pick(scale, [0, 3, 7, 13], range(16)))):
        variants.append((arch, "intact", width, side))
        variants += [(arch, f"block {b} cut", {**width, "cut_skips": [b]}, side) for b in blocks]
    growth = _pick(scale, {"growth_rate": 8}, {})
    for k in _pick(scale, ["all", 4, 2, 1], ["all", 8, 4, 2, 1]):
        label = "all connections" if k == "all" else f"last {k} map" + ("s" if k != 1 else "")
        variants.append(("densenet121", label, {**growth, "connections": k}, 64))
    job = _gradient_job(scale, NATURAL[:1], {"arch": "resnet18", "knobs": width})
    job["budget"] = {"iterations": _pick(scale, 50, 4000)}
    return {
        "title": "Skip connections cut (SoK Fig. 13) and DenseNet's connections thinned (Fig. 14)",
        "job": job,
        "axes": _variants(scale, variants),
        "combine": "zip",
        "seeds": _pick(scale, [0], [0, 1, 2]),
    }


def nin_blocks(scale: Scale) -> dict[str, Any]:
    """GoogLeNet and Inception v3 attacked with the whole gradient and with one inception block's
    (Tab. III): the first block of each, GoogLeNet's inception3a and Inception v3's Mixed_5b. A
    client holds two images: both networks reduce the smallest images they take to one value per
    channel, which batch norm in train mode cannot normalise for a single image."""
    side = _pick(scale, 32, 64)
    variants = [
        ("googlenet", "full gradient", None, side),
        ("googlenet", "inception3a only", ["inception3a"], side),
        ("inception_v3", "full gradient", None, 75),
        ("inception_v3", "Mixed_5b only", ["Mixed_5b"], 75),
    ]
    job = _gradient_job(scale, NATURAL[:2], {"arch": "googlenet"})
    job["budget"] = {"iterations": _pick(scale, 50, 4000)}
    return {
        "title": "Network-in-network blocks: the full gradient against one inception block's (SoK Tab. III)",
        "job": job,
        "axes": [
            {"path": "model.arch", "name": "architecture", "values": [v[0] for v in variants]},
            {
                "path": "attack",
                "name": "matched",
                "values": [{"name": "inverting_gradients", "match_layers": v[2]} for v in variants],
                "labels": [v[1] for v in variants],
                "also": {"data.shape": [[3, v[3], v[3]] for v in variants]},
            },
        ],
        "combine": "zip",
        "seeds": _pick(scale, [0], [0, 1, 2]),
    }


def _federation(scale: Scale, rounds: int) -> dict[str, Any]:
    return {
        "model": {"arch": "mlp", "knobs": _pick(scale, {"width": 32}, {"width": 256})},
        "data": _pick(
            scale,
            {"per_class": 8, "size": 16, "photos": ["astronaut", "coffee", "chelsea", "camera"]},
            {"per_class": 60, "size": 32},
        ),
        "num_clients": _pick(scale, 4, 10),
        "rounds": rounds,
        "client": {"protocol": "fedavg", "lr": 0.1, "batch_size": _pick(scale, 2, 8)},
        "audit": {"rounds": [rounds], "budget": {"iterations": _pick(scale, 100, 2000)}},
    }


def rounds(scale: Scale) -> dict[str, Any]:
    at = _pick(scale, [1, 3, 6], [1, 5, 10, 20, 50])
    return {
        "title": "Leakage and IGSA over training rounds (SoK Fig. 10)",
        "federation": _federation(scale, max(at)),
        "axes": [
            {"path": "rounds", "name": "round", "values": at, "also": {"audit.rounds": [[r] for r in at]}}
        ],
        "seeds": _pick(scale, [0], [0, 1, 2]),
    }


def privacy_utility(scale: Scale) -> dict[str, Any]:
    defenses = {
        "none": [],
        "quantize 4 bits": [{"name": "quantize", "bits": 4}],
        "top-k 10%": [{"name": "topk", "ratio": 0.1}],
        "noise 0.01": [{"name": "noise", "scale": 0.01}],
        "sign": [{"name": "sign"}],
    }
    return {
        "title": "Each defense's leakage against its accuracy (SoK Fig. 15)",
        "federation": _federation(scale, _pick(scale, 4, 20)),
        "axes": [
            {
                "path": "defenses",
                "name": "defense",
                "values": list(defenses.values()),
                "labels": list(defenses),
            }
        ],
        "seeds": _pick(scale, [0], [0, 1, 2]),
    }


def faces_generator() -> str:
    """The committed faces generator's path, or a SpecError that says how to make one."""
    if not FACES_GENERATOR.is_file():
        raise SpecError(
            f"the ood preset needs the faces generator {FACES_GENERATOR}, which ships with the "
            "repository's bench/results/ and not with an installed package. Train one on faces "
            "face00..face59 saved as 32x32 PNGs in a folder FACES_00_59 (see bench/generative.py): "
            f"`{FACES_GENERATOR_TRAIN}`, and give it with `gradleak study run --preset ood "
            "--generator DIR/generator.safetensors` (any 32x32 generator file: it sets attack.generator "
            "of the gias points)"
        )
    return str(FACES_GENERATOR)


def ood(scale: Scale, generator: str | None = None) -> dict[str, Any]:
    """A faces generator's attack (GIAS, knowledge level 2) on faces it never saw against images
    of other sets, with Inverting Gradients (GIA-O) on the same images as the baseline (SoK
    Fig. 8): a ConvNet on 32x32 images, batch 1, labels known, both attacks given as many
    iterations. The generator was trained on face00..face59; the faces here are face60 onwards.
    Each image is its own client (one point per image), its set the point's label. `generator`:
    another generator file instead (the CLI's --generator)."""
    k = _pick(scale, 2, 4)
    sets = {
        "faces (held out)": [f"face{60 + i:02d}" for i in range(k)],
        "textures": ["brick", "grass", "gravel", "brick"][:k],
        "text": ["text", "page", "text", "page"][:k],
        "photos": NATURAL[:k],
    }
    images = [(name, image) for name, group in sets.items() for image in dict.fromkeys(group)]
    attacks = {
        "gias (GIA-L)": {"name": "gias", "generator": generator or faces_generator()},
        "inverting_gradients (GIA-O)": {"name": "inverting_gradients"},
    }
    job = _gradient_job(scale, [images[0][1]])
    job["data"] = {"shape": [3, 32, 32], "num_classes": 10, "labels": [0]}
    job["knowledge"] = 2  # the client's data distribution: the generator
    job["budget"] = {"iterations": _pick(scale, 300, 4000)}
    return {
        "title": "Out of the generator's distribution: a faces generator on faces, textures, text, "
        "photos (SoK Fig. 8)",
        "job": job,
        "axes": [
            {
                "path": "update.simulate.images",
                "name": "images",
                "values": [[image] for _, image in images],
                "labels": [name for name, _ in images],
            },
            {"path": "attack", "name": "attack", "values": list(attacks.values()), "labels": list(attacks)},
        ],
        "seeds": _pick(scale, [0], [0, 1, 2]),
    }


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("local-updates", "Tab. I", "FedAvg with U = 1, 2, 4, 6, 8 local updates", local_updates),
        Preset(
            "batch-knowledge",
            "Tab. II",
            "the attacker knows the batch size (Case 1) or not (Case 2)",
            batch_knowledge,
        ),
        Preset("content", "Fig. 6-8", "natural photos against faces, textures and text", content),
        Preset(
            "micro-designs",
            "Tab. IV",
            "ConvNet without bias, ReLU, max-pooling; dropout; kernels; padding",
            micro_designs,
        ),
        Preset("dimensions", "Fig. 4", "image resolution against batch size", dimensions),
        Preset(
            "skip-connections",
            "Fig. 13-14",
            "ResNet-18/34 with a skip connection cut at each position; DenseNet with fewer connections",
            skip_connections,
        ),
        Preset(
            "nin-blocks",
            "Tab. III",
            "GoogLeNet and Inception v3: the full gradient against one inception block's",
            nin_blocks,
        ),
        Preset(
            "ood",
            "Fig. 8",
            "a faces generator's GIAS on held-out faces, textures, text, photos; Inverting Gradients too",
            ood,
            takes_generator=True,
        ),
        Preset("rounds", "Fig. 10", "a federation's leakage and IGSA at later rounds", rounds),
        Preset(
            "privacy-utility", "Fig. 15", "each defense's audit PSNR against its accuracy", privacy_utility
        ),
    )
}


def preset(name: str, scale: Scale = "quick", generator: str | None = None) -> StudySpec:
    if name not in PRESETS:
        raise UnknownNameError("study preset", name, list(PRESETS))
    return PRESETS[name].spec(scale, generator)
