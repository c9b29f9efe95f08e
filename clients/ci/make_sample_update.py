"""Make the inputs of the CI privacy gate: the update a client of this model would share on a
sample batch, with the batch itself as ground truth.

    python make_sample_update.py --arch lenet --image-shape 3,32,32 --weights model.safetensors \\
        --photo-patches 4 --out gradleak-inputs

writes gradleak-inputs/{model,update,batch}.safetensors. The batch is either your own sample
(--images: safetensors with `images` N x C x H x W in [0, 1] and integer `labels`) or, with no
data at hand, N patches of the photos shipped with gradleak. The client is simulated by
gradleak's own FL client code (FedSGD gradient, or FedAvg local training for a delta), so the
update is what a real client of this checkpoint would send. Needs the server package `gradleak`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from service.data.patches import photo_patches
from service.fl import simulate_client
from service.models import build_model
from service.specs import ClientTraining, DataSpec, ModelSpec
from service.tensorio import load_safetensors_file, save_safetensors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", required=True, help="registered architecture, e.g. lenet, resnet18")
    parser.add_argument("--image-shape", required=True, help="C,H,W, e.g. 3,32,32")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--weights", help="the checkpoint (safetensors); default: an untrained model")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--images", help="your sample batch (safetensors with images and labels)")
    data.add_argument("--photo-patches", type=int, metavar="N", help="N patches of the shipped photos")
    parser.add_argument("--kind", choices=["gradient", "delta"], default="gradient")
    parser.add_argument("--lr", type=float, default=0.01, help="delta: the client's learning rate")
    parser.add_argument("--local-epochs", type=int, default=1, help="delta: local epochs")
    parser.add_argument("--batch-size", type=int, help="delta: local batch size (default: the whole batch)")
    parser.add_argument("--out", default="gradleak-inputs", help="output directory")
    args = parser.parse_args(argv)

    c, h, w = (int(v) for v in args.image_shape.split(","))
    data_spec = DataSpec(shape=(c, h, w), num_classes=args.num_classes)
    weights = None if args.weights is None else Path(args.weights).read_bytes()
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
    if args.kind == "gradient":
        training = ClientTraining(protocol="fedsgd")
    else:
        training = ClientTraining(
            protocol="fedavg",
            lr=args.lr,
            local_epochs=args.local_epochs,
            batch_size=args.batch_size or len(images),
        )
    update = simulate_client(model, images, labels, training, args.kind)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.safetensors").write_bytes(save_safetensors(model.state_dict()))
    (out / "update.safetensors").write_bytes(save_safetensors(update))
    (out / "batch.safetensors").write_bytes(
        save_safetensors({"images": images, "labels": labels.to(torch.int64)})
    )
    print(f"wrote {out}: model, update ({args.kind}) and batch ({len(images)} images), as safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
