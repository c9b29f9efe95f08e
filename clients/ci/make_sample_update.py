"""Make the inputs of the CI privacy gate: the update a client of this model would share on a
sample batch, with the batch itself as ground truth.

    python make_sample_update.py --arch lenet --image-shape 3,32,32 --weights model.safetensors \\
        --photo-patches 4 --out gradleak-inputs

writes gradleak-inputs/{model,update,batch}.safetensors. The batch is either your own sample
(--images: safetensors with `images` N x C x H x W in [0, 1] and integer `labels`) or, with no
data at hand, N patches of the photos shipped with gradleak. The client normalises the batch as
--normalization says (the policy's `update.normalization`, cifar10 by default) and is simulated
by gradleak's own FL client code through `gradleak_client.prepare` (FedSGD gradient, or FedAvg
local training for a delta), so the update is what a real client of this checkpoint would send.
`--model package.module:factory` takes your own torch model instead of --arch and writes
model.onnx. Needs the server package `gradleak`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gradleak_client import prepare
from service.data.patches import photo_patches
from service.models import build_model
from service.models.local import import_factory
from service.specs import NORMALIZATIONS, DataSpec, ModelSpec
from service.tensorio import STATE_DTYPES, load_safetensors_file, match_state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--arch", help="registered architecture, e.g. lenet, resnet18")
    which.add_argument("--model", help="your own model: an import path package.module:factory")
    parser.add_argument("--image-shape", required=True, help="C,H,W, e.g. 3,32,32")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--weights", help="the checkpoint (safetensors); default: an untrained model")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--images", help="your sample batch (safetensors with images and labels)")
    data.add_argument("--photo-patches", type=int, metavar="N", help="N patches of the shipped photos")
    parser.add_argument("--kind", choices=["gradient", "delta"], default="gradient")
    parser.add_argument(
        "--normalization",
        choices=sorted(NORMALIZATIONS),
        default="cifar10",
        help="how the client normalises its images (the policy's update.normalization)",
    )
    parser.add_argument("--lr", type=float, default=0.01, help="delta: the client's learning rate")
    parser.add_argument("--local-epochs", type=int, default=1, help="delta: local epochs")
    parser.add_argument("--batch-size", type=int, help="delta: local batch size (default: the whole batch)")
    parser.add_argument("--out", default="gradleak-inputs", help="output directory")
    args = parser.parse_args(argv)

    c, h, w = (int(v) for v in args.image_shape.split(","))
    data_spec = DataSpec(shape=(c, h, w), num_classes=args.num_classes)
    weights = None if args.weights is None else Path(args.weights).read_bytes()
    if args.model is not None:
        model = import_factory(args.model)
        if weights is not None:
            checkpoint = load_safetensors_file(args.weights, allowed_dtypes=STATE_DTYPES)
            model.load_state_dict(match_state(model, checkpoint, what="weights"), strict=False)
    else:
        model = build_model(
            ModelSpec(arch=args.arch, weights=None if weights is None else "checkpoint"),
            data_spec,
            resolve=lambda _ref: weights or b"",
        )
    if args.images is not None:
        batch = load_safetensors_file(args.images, allowed_dtypes=("F16", "BF16", "F32", "F64", "I64", "I32"))
        images, labels = batch["images"].float(), batch["labels"].long()
    else:
        if h != w:
            parser.error("--photo-patches makes square images; give --images for other shapes")
        per_class = -(-args.photo_patches // 10)  # the shipped photos make ten classes
        images, labels = photo_patches(size=h, channels=c, per_class=per_class)
        images, labels = images[: args.photo_patches], labels[: args.photo_patches] % args.num_classes
    out = Path(args.out)
    training = (
        {}
        if args.kind == "gradient"
        else {
            "lr": args.lr,
            "local_epochs": args.local_epochs,
            "batch_size": args.batch_size or len(images),
        }
    )
    files = prepare.write_inputs(
        model,
        images,
        labels,
        out,
        format="onnx" if args.model is not None else "safetensors",
        arch=args.arch,
        kind=args.kind,
        normalization=args.normalization,
        **training,
    )
    files.ground_truth.replace(out / "batch.safetensors")  # the name the CI templates read
    print(
        f"wrote {out}: {files.model.name}, update ({args.kind}, client normalisation {args.normalization}) "
        f"and batch ({len(images)} images)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
