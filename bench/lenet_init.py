"""DLG's LeNet, batch 4, under its two initialisations (the `init` knob), attacked by Inverting
Gradients and by DLG.

LeNet's default (`init: uniform`) is the DLG code's: every weight and bias uniform in [-0.5, 0.5].
`init: pytorch` keeps PyTorch's default layer initialisation (bound 1/sqrt(fan_in), 0.04 to 0.12
here). Case: 32x32 photos (astronaut, coffee, chelsea, rocket; labels 1, 3, 5, 8), CIFAR-10
normalisation, model init seed 0, FedSGD, labels known; each attack at its default settings,
Inverting Gradients for 1000 iterations, DLG for 300 L-BFGS steps (the DLG paper's count),
seeds 0-2. Everything runs in this one process, single-threaded, one run after the other.

  python -m bench.lenet_init --seeds 0,1,2 --out bench/results/attacks-cpu-lenet-init.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.attacks import RESULTS, quality_fields, report_header, run_spec

IMAGES = ["astronaut", "coffee", "chelsea", "rocket"]
LABELS = [1, 3, 5, 8]
ATTACKS: dict[str, tuple[dict[str, Any], int]] = {
    "inverting_gradients": ({"name": "inverting_gradients"}, 1000),
    "dlg": ({"name": "dlg"}, 300),
}


def spec_for(init: str, attack: dict[str, Any], iterations: int, seed: int) -> Any:
    from service.specs import JobSpec

    return JobSpec.model_validate(
        {
            "model": {"arch": "lenet", "knobs": {"init": init}, "init_seed": 0},
            "update": {"simulate": {"images": IMAGES, "labels": LABELS}},
            "data": {"shape": [3, 32, 32], "num_classes": 10, "normalization": "cifar10", "labels": LABELS},
            "knowledge": 1,
            "attack": attack,
            "budget": {"iterations": iterations, "restarts": 1},
            "seed": seed,
        }
    )


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--inits", default="uniform,pytorch")
    ap.add_argument("--dlg-iterations", type=int, default=ATTACKS["dlg"][1], help="L-BFGS steps of DLG")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument(
        "--reuse", type=Path, action="append", default=[], help="logs of finished runs (JSON lines)"
    )
    ap.add_argument("--skip-missing", action="store_true", help="run nothing: only the --reuse runs count")
    ap.add_argument("--out", type=Path, default=RESULTS / "attacks-cpu-lenet-init.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ATTACKS["dlg"] = (ATTACKS["dlg"][0], a.dlg_iterations)
    load_before = os.getloadavg()
    reuse = [
        json.loads(line) for f in a.reuse for line in f.read_text().splitlines() if line.startswith('{"init"')
    ]
    inits, attacks = a.inits.split(","), a.attacks.split(",")
    rows = []
    for init in inits:
        for name in attacks:
            attack, iterations = ATTACKS[name]
            for seed in (int(s) for s in a.seeds.split(",")):
                done = [
                    r
                    for r in reuse
                    if (r["init"], r["attack"], r["seed"], r["iterations"]) == (init, name, seed, iterations)
                ]
                if done or a.skip_missing:
                    rows += done[:1]
                    continue
                manifest = run_spec(spec_for(init, attack, iterations, seed), f"lenet-{init}-{name}")
                r = {
                    "init": init,
                    "attack": name,
                    "seed": seed,
                    "iterations": manifest["attack"]["iterations"],
                    "attack_s": manifest["timings"]["attack_s"],
                    **quality_fields(manifest),
                    "psnr_per_image": manifest["metrics"]["per_image"]["psnr"],
                }
                print(json.dumps(r), file=sys.stderr, flush=True)
                rows.append(r)
    summary = []
    for init in inits:
        for name in attacks:
            runs = [r for r in rows if r["init"] == init and r["attack"] == name]
            if not runs:
                continue
            summary.append(
                {
                    "init": init,
                    "attack": name,
                    "seeds": len(runs),
                    "iterations": runs[0]["iterations"],
                    "psnr_mean_median_over_seeds": statistics.median(r["psnr_mean"] for r in runs),
                    "psnr_worst_case_median_over_seeds": statistics.median(
                        r["psnr_worst_case"] for r in runs
                    ),
                    "ssim_mean_median_over_seeds": statistics.median(r["ssim_mean"] for r in runs),
                }
            )
    report = {
        **report_header("bench.lenet_init", load_before),
        "case": {
            "arch": "lenet",
            "images": IMAGES,
            "labels": LABELS,
            "labels_known": True,
            "image_side": 32,
            "protocol": "fedsgd",
            "init_seed": 0,
        },
        "attacks": {k: {"attack": v[0], "iterations": v[1]} for k, v in ATTACKS.items()},
        "summary": summary,
        "runs": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
