"""The peer baseline: breaching's own attack code on gradleak's benchmark cases, on this machine.

The foundation issue quotes breaching's seconds per iteration from another machine. Timings move
between machines (and between days on a shared one), so `bench.attacks speed` also runs
breaching itself here, in a subprocess, on exactly the same problem: gradleak builds the model,
the images and the client's gradient, and breaching's `OptimizationBasedAttacker` (or its joint
label attacker for DLG) reconstructs from them with its own configuration files and loop.

breaching pins an old hydra-core whose parser conflicts with gradleak's constraints, so it lives
in its own directory, outside the virtual environment:

  make bench-peer        # pip install --target .bench-peer breaching==0.1.2 and its config stack

`python -m bench.peer CASE CONFIG ITERATIONS` prints one JSON line (run with PYTHONPATH=.bench-peer).
"""

from __future__ import annotations

import itertools
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PEER_DIR = ROOT / ".bench-peer"
PEER_VERSION = "breaching 0.1.2 (PyPI)"

# gradleak benchmark config -> (breaching attack config, overrides)
PEER_CONFIGS: dict[str, tuple[str, list[str]]] = {
    "ig_tv5e-4": ("invertinggradients", ["regularization.total_variation.scale=5e-4"]),
    "ig_tv0.2": ("invertinggradients", ["regularization.total_variation.scale=0.2"]),
    "dlg": ("deepleakage", ["attack_type=optimization"]),  # labels known
    "dlg_joint": ("deepleakage", []),  # joint label optimisation, DLG's original
}


def available() -> bool:
    return (PEER_DIR / "breaching" / "__init__.py").exists()


def run(case: str, config: str, iterations: int) -> dict[str, Any]:
    import contextlib
    import io

    import torch
    import torch.nn.functional as F

    from bench.attacks import CONFIGS, spec_for
    from service.data import load_images, normalize
    from service.fl.client import training_mode
    from service.models import build_model

    with contextlib.redirect_stdout(io.StringIO()):  # breaching prints its banners
        import breaching

    spec = spec_for(case, CONFIGS[config], iterations, None)
    sim = spec.update.simulate
    bn_mode = sim.training.bn_mode or "train"
    model = build_model(spec.model, spec.data)
    norm = spec.data.resolved_normalization()
    images, _ = load_images("photos", sim.images, size=spec.data.shape[1], channels=3, path=None)
    x = normalize(images, norm)
    labels = torch.tensor(sim.labels)
    with training_mode(model, bn_mode):
        grads = torch.autograd.grad(F.cross_entropy(model(x), labels), list(model.parameters()))

    name, overrides = PEER_CONFIGS[config]
    with contextlib.redirect_stdout(io.StringIO()):
        cfg = breaching.get_attack_config(name, overrides=[*overrides, f"optim.max_iterations={iterations}"])
    cfg.optim.callback = 10**9
    setup = {"device": torch.device("cpu"), "dtype": torch.float32}
    loss_fn = torch.jit.script(torch.nn.CrossEntropyLoss())
    attacker = breaching.attacks.prepare_attack(model, loss_fn, cfg, setup)

    class Metadata(dict):  # breaching reads server metadata by attribute
        __getattr__ = dict.__getitem__

    metadata = Metadata(
        shape=tuple(spec.data.shape), mean=norm.mean, std=norm.std, modality="vision",
        task="classification", classes=spec.data.num_classes,
    )  # fmt: skip
    buffers = [b.detach().clone() for b in model.buffers()] if bn_mode == "eval" else None
    parameters = [p.detach() for p in model.parameters()]
    payload = [{"parameters": parameters, "buffers": buffers, "metadata": metadata}]
    shared = [
        {
            "gradients": [g.detach() for g in grads],
            "buffers": None,
            "metadata": {
                "num_data_points": len(labels),
                "labels": labels if config != "dlg_joint" else None,
                "local_hyperparams": None,
            },
        }
    ]
    stamps: list[float] = []
    evaluations = 0
    compute = attacker._compute_objective

    def stamped(*args: Any, **kwargs: Any) -> Any:  # called once per optimiser step
        stamps.append(time.perf_counter())
        closure = compute(*args, **kwargs)

        def counted() -> Any:  # the optimiser calls it once per objective evaluation
            nonlocal evaluations
            evaluations += 1
            return closure()

        return counted

    attacker._compute_objective = stamped
    t0 = time.perf_counter()
    attacker.reconstruct(payload, shared, server_secrets={}, dryrun=False)
    total = time.perf_counter() - t0
    steps = [b - a for a, b in itertools.pairwise(stamps)][2:]
    return {
        "peer": PEER_VERSION,
        "case": case,
        "config": config,
        "breaching_config": [name, *overrides],
        "iterations": len(stamps),
        "attack_s": total,
        "s_per_iteration_median": statistics.median(steps) if steps else None,
        "evaluations": evaluations,
        "s_per_evaluation": total / evaluations if evaluations else None,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "torch_threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    case, config, its = sys.argv[1:4]
    print(json.dumps(run(case, config, int(its))))
