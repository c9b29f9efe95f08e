"""What a person reads of a job: the labelled grid, the complete HTML report, and the convergence
measurement the gate warns with."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.jobs.convergence import NEEDED_ITERATIONS, RESULTS_FILE, convergence
from service.jobs.report import MIN_TILE, estimate_section, grid_layout, render_grid_png, render_loss_png
from service.jobs.runner import run_job
from service.jobs.types import JobContext
from service.specs import JobSpec
from service.storage import LocalStore

METRICS = {
    "num_images": 3,
    "permutation": [2, 0, 1],
    "per_image": {
        "psnr": [14.25, 31.5, 9.0],
        "ssim": [0.31, 0.92, 0.05],
        "lpips": None,
        "mse": [0.1, 0.01, 0.2],
    },
    "mean": {"psnr": 18.25, "ssim": 0.43, "lpips": None, "mse": 0.1},
    "worst_case": {"image": 1, "psnr": 31.5, "ssim": 0.92, "reconstruction": 0},
    "label_accuracy": {"multiset": 1.0, "positional": 0.5},
}


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_the_grid_names_its_rows_scores_each_tile_and_marks_the_most_leaked() -> None:
    layout = grid_layout(
        3, (16, 16), has_truth=True, metrics=METRICS, recon_labels=[4, 5, 6], true_labels=[5, 6, 4]
    )
    texts = [t[2] for t in layout.texts]
    assert "client's images" in texts and "reconstructed" in texts
    assert [t for t in texts if t.startswith("PSNR")] == ["PSNR 14.2 dB", "PSNR 31.5 dB", "PSNR 9.0 dB"]
    assert [t for t in texts if t.startswith("SSIM")] == ["SSIM 0.310", "SSIM 0.920", "SSIM 0.050"]
    assert "image 1 - most leaked" in texts and len(layout.frames) == 1
    # each column pairs truth i with the reconstruction the scoring matched to it
    recon_tiles = [j for _, _, row, j in layout.tiles if row == "recon"]
    assert recon_tiles == METRICS["permutation"]
    assert layout.tile[0] >= MIN_TILE  # 16-pixel images are upscaled to be judged


def test_the_rendered_grid_is_larger_than_its_tiles_and_has_text() -> None:
    g = torch.Generator().manual_seed(0)
    recon, truth = torch.rand(3, 3, 16, 16, generator=g), torch.rand(3, 3, 16, 16, generator=g)
    arr = _png(render_grid_png(recon, truth, METRICS, recon_labels=[1, 2, 3], true_labels=[2, 3, 1]))
    layout = grid_layout(
        3, (16, 16), has_truth=True, metrics=METRICS, recon_labels=[1, 2, 3], true_labels=[2, 3, 1]
    )
    assert arr.shape[:2] == (layout.height, layout.width)
    tw, th = layout.tile
    assert arr.shape[1] > 3 * tw and arr.shape[0] > 2 * th + 40  # room for names and scores
    # the row names are drawn: dark pixels in the label column
    label_col = arr[:, : layout.tiles[0][0] - 2]
    assert (label_col.sum(axis=2) < 200).sum() > 50
    # the frame of the most leaked column is red
    x0, y0, _, _ = layout.frames[0]
    assert tuple(arr[y0 + 20, x0 + 1]) == (200, 30, 30)
    # a tile is the nearest-neighbour upscale of its image
    x, y, _, i = layout.tiles[0]
    expected = (truth[i, :, 0, 0] * 255 + 0.5).to(torch.uint8).tolist()
    assert arr[y + 1, x + 1].tolist() == expected


def test_the_grid_without_ground_truth_shows_the_reconstructions() -> None:
    arr = _png(render_grid_png(torch.rand(2, 1, 8, 8)))
    layout = grid_layout(2, (8, 8), has_truth=False)
    assert arr.shape[:2] == (layout.height, layout.width)
    assert {row for _, _, row, _ in layout.tiles} == {"recon"}
    assert "client's images" not in [t[2] for t in layout.texts]


def test_many_images_wrap_into_blocks() -> None:
    layout = grid_layout(20, (8, 8), has_truth=False)
    assert len(layout.tiles) == 20
    assert layout.width < 9 * (layout.tile[0] + 6) + 200


def test_the_loss_curve_is_a_small_png() -> None:
    png = render_loss_png([10.0 / (i + 1) for i in range(200)])
    assert png is not None and png.startswith(b"\x89PNG") and len(png) < 30_000
    assert render_loss_png([1.0]) is None


def test_the_estimate_section_appears_only_when_given() -> None:
    # a real estimate's section is checked in tests/verdict (made by a run, shown in report.html)
    assert estimate_section(None) == "" and estimate_section({}) == ""


def test_convergence_compares_the_iterations_run_with_those_measured_to_be_needed() -> None:
    needed = NEEDED_ITERATIONS["lenet"]
    short = convergence("inverting_gradients", "lenet", needed // 10)
    assert short["converged"] is False and short["needed_iterations"] == needed
    assert RESULTS_FILE in short["basis"]
    assert convergence("inverting_gradients", "lenet", needed)["converged"] is True
    assert convergence("dlg", "lenet", 10)["converged"] is None  # not measured: said, not guessed
    assert "no measurement" in convergence("inverting_gradients", "vgg11", 10)["basis"]


def test_the_needed_iterations_are_those_the_benchmark_measured() -> None:
    measured = json.loads((Path(__file__).parents[2] / RESULTS_FILE).read_text())
    assert measured["needed_by_architecture"] == NEEDED_ITERATIONS


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, bytes]:
    """A real (tiny) run with defenses, a simulated FedAvg client and a hidden batch size."""
    spec = JobSpec.model_validate(
        {
            "model": {"arch": "lenet"},
            "update": {
                "kind": "delta",
                "simulate": {
                    "images": ["astronaut", "coffee"],
                    "labels": [1, 3],
                    "training": {
                        "protocol": "fedavg",
                        "lr": 0.01,
                        "local_epochs": 1,
                        "batch_size": 2,
                        "num_samples": 2,
                        "shuffle_seed": 5,
                    },
                },
                "client": {"protocol": "fedavg", "lr": 0.01, "local_epochs": 1, "num_samples": 2},
            },
            "data": {"shape": [3, 16, 16], "labels": [1, 3]},
            "knowledge": 3,
            "attack": {"name": "fedavg_unroll"},
            "defenses": [{"name": "quantize", "bits": 6}],
            "budget": {"iterations": 12},
            "seed": 4,
        }
    )
    store = LocalStore(tmp_path_factory.mktemp("store"))
    ctx = JobContext(job_id="job_r", store=store, prefix="job_r", resolve=bytes)
    result = run_job(spec, ctx)
    html = Path(store.path(result.artifacts["report.html"])).read_text()
    grid = Path(store.path(result.artifacts["grid.png"])).read_bytes()
    return result.manifest, html, grid


def test_the_report_says_what_ran_on_what_and_where(job: tuple[dict, str, bytes]) -> None:
    manifest, html, _ = job
    for text in (
        "fedavg_unroll",  # the attack
        "3: the client&#x27;s training details",  # its knowledge level
        "tv_weight",  # its parameters
        "what the client did (simulated)",  # the client facts, beside what the attacker was told
        "what the attacker was told",
        "FedAvg case",
        "Case 1 with facts searched",  # the batch size was not told: searched
        "hypothesis chosen",
        "batch size",
        "shuffle seed",
        "<b>quantize</b> bits=6",  # the defenses
        manifest["versions"]["gradleak"],
        manifest["date"],
        "Per image",
        "label accuracy, as a multiset",
        "label accuracy, per image",
    ):
        assert text in html, text
    assert re.search(r"<th>seed</th><td>4</td>", html)
    assert re.search(r"<th>batch size</th><td>2</td><td>unknown</td>", html)
    # images only as data: URIs (the service's CSP), the grid and the loss curve
    sources = re.findall(r'src="([^"]+)"', html)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    # the label-accuracy values no longer sit under the mean / worst-case columns
    assert "(multiset)</td>" not in html and "(per image)</td>" not in html


def test_the_manifest_records_convergence_and_the_grid_is_labelled(job: tuple[dict, str, bytes]) -> None:
    manifest, html, grid = job
    conv = manifest["attack"]["convergence"]
    assert conv["iterations"] == 12 and conv["converged"] is None  # fedavg_unroll is not measured
    assert manifest["attack"]["limits"] == []  # no batch norm: no known limit applies
    assert "Caution" not in html
    assert "Convergence not judged: no measurement of the iterations fedavg_unroll needs" in html
    arr = _png(grid)
    assert arr.shape[0] > 2 * MIN_TILE and arr.shape[1] > 2 * MIN_TILE


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_a_train_mode_batch_norm_client_is_flagged_as_beyond_the_attack(tmp_path: Path, bn_mode: str) -> None:
    """Gradient matching rebuilds nothing of clients whose BN runs in train mode (bench/ATTACKS.md):
    the manifest and the report say so, so that a low score is not read as safety."""
    spec = JobSpec.model_validate(
        {
            "model": {"arch": "convnet", "knobs": {"batchnorm": True, "depth": 1, "width": 4}},
            "update": {
                "simulate": {
                    "images": ["astronaut", "coffee"],
                    "labels": [1, 3],
                    "training": {"bn_mode": bn_mode},
                },
                "client": {"bn_mode": bn_mode},
            },
            "data": {"shape": [3, 8, 8], "labels": [1, 3]},
            "budget": {"iterations": 2},
        }
    )
    store = LocalStore(tmp_path)
    result = run_job(spec, JobContext(job_id="j", store=store, prefix="j", resolve=bytes))
    html = Path(store.path(result.artifacts["report.html"])).read_text()
    found = result.manifest["attack"]["limits"]
    if bn_mode == "eval":
        assert found == [] and "Caution" not in html
        return
    [limit] = found
    assert (
        limit["kind"] == "train_mode_batch_norm"
        and "not evidence that the update is safe" in limit["message"]
    )
    assert "<p class=warn>Caution: the client normalises with its own batch statistics" in html
