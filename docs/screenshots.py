"""The README's pictures of a real run: its labelled grid and its report as a browser shows it.

    make screenshots     # or: python docs/screenshots.py [--iterations N]

Runs one attack through the job runner (an MLP, four shipped photos, labels known), copies its
grid to docs/grid.png and renders report.html with headless Chromium to docs/report.png. Both
are stored as palette PNGs to stay small.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

DOCS = Path(__file__).resolve().parent
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
SPEC = {
    "model": {"arch": "mlp"},
    "update": {"simulate": {"images": ["astronaut", "coffee", "chelsea", "rocket"], "labels": [1, 3, 5, 8]}},
    "data": {"shape": [3, 32, 32], "labels": [1, 3, 5, 8]},
    "attack": {"name": "inverting_gradients"},
    "seed": 0,
}


def run(iterations: int, out: Path) -> Path:
    from service.jobs.runner import run_job
    from service.jobs.types import JobContext
    from service.specs import JobSpec
    from service.storage import LocalStore

    spec = JobSpec.model_validate({**SPEC, "budget": {"iterations": iterations}})
    store = LocalStore(out)
    result = run_job(spec, JobContext(job_id="readme-example", store=store, prefix="run", resolve=bytes))
    return Path(store.path(result.artifacts["grid.png"])).parent


def small_png(src: Path, dst: Path, crop_height: int | None = None) -> None:
    img = Image.open(src).convert("RGB")
    if crop_height is not None:
        img = img.crop((0, 0, img.width, min(crop_height, img.height)))
    img.quantize(colors=256, dither=Image.Dither.NONE).save(dst, optimize=True)


def screenshot(html: Path, dst: Path, width: int, height: int) -> None:
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        sys.exit("screenshots: no headless Chromium found (apt-get install chromium)")
    raw = dst.with_suffix(".raw.png")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    subprocess.run(
        [browser, *flags, f"--window-size={width},{height}", f"--screenshot={raw}", html.as_uri()],
        check=True,
        capture_output=True,
    )
    small_png(raw, dst)
    raw.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--out", type=Path, default=DOCS)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        job = run(args.iterations, Path(tmp))
        small_png(job / "grid.png", args.out / "grid.png")
        screenshot(job / "report.html", args.out / "report.png", 1000, 1500)
    for name in ("grid.png", "report.png"):
        print(f"{args.out / name}: {(args.out / name).stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
