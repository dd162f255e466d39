"""Peak host memory of one request at the largest allowed settings, on the tiny-random preset (CPU).

A public Space on a CPU must survive the worst request a visitor may send. This runs, in a fresh
subprocess per case, the service on the tiny pipeline with the stand-in face models, and reports
the process's peak resident memory above its baseline (after the models are loaded) for:

- ``largest``: 1536 x 1536, 50 steps, true CFG, T5 length 512, the ID photo and 4 extra photos at
  the 50-megapixel limit (the worst the limits allow);
- ``typical``: the default 896 x 1152, 28 steps, one 512 x 512 photo.

    python benchmarks/request_memory.py [--steps 50]

The rows are printed as JSON, then as a table; each case's log is kept in a temporary folder
(its path is printed).

Random tiny weights: the numbers are the app's own buffers (photos, latents, the decoder's
activations at full resolution), not the real models' weights.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.harness import Column, child_args, markdown_table, print_result, run_modes  # noqa: E402

CASES = ("typical", "largest")
COLUMNS = (
    Column("case", "case"),
    Column("photos", lambda r: r["settings"]["photos"]),
    Column("baseline RSS (MiB)", "baseline_rss_mib", "{:.0f}"),
    Column("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"),
    Column("peak above baseline (MiB)", "peak_above_baseline_mib", "{:.0f}"),
    Column("time (s)", "seconds", "{:.1f}"),
)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def child(case: str, steps: int) -> dict:
    import numpy as np
    from PIL import Image

    from pulid.images import ImageFile
    from pulid.limits import MAX_EXTRA_PHOTOS, MAX_IMAGE_PIXELS
    from pulid.request import GenerationRequest
    from pulid.serve.service import GenerationService
    from tiny_random.pipeline import tiny_pipeline_with_face_models

    folder = Path(tempfile.mkdtemp(prefix="request-memory-"))
    service = GenerationService(tiny_pipeline_with_face_models(folder / "tiny"), folder / "out")
    face = Image.open(REPO / "example_inputs" / "astronaut.png").convert("RGB")
    if case == "largest":
        side = int(MAX_IMAGE_PIXELS**0.5) // 16 * 16  # a square photo just under the pixel limit
        photo = face.resize((side, side), Image.NEAREST)
        extra = []
        for index in range(MAX_EXTRA_PHOTOS):
            path = folder / f"extra{index}.jpg"
            photo.save(path, quality=60)
            extra.append(str(path))
        settings = dict(width=1536, height=1536, num_steps=steps, true_cfg=2.0, max_sequence_length=512)
    else:
        photo, extra, settings = face, [], {}
    baseline = current_rss_mib()
    start = time.perf_counter()
    photos = [np.asarray(photo), *(ImageFile(path) for path in extra)]  # the extras read at the turn
    request = GenerationRequest.from_values(id_images=photos, prompt="a portrait", seed=1, **settings)
    result = service.run(request)
    return {
        "case": case,
        "settings": {**settings, "photos": 1 + len(extra), "photo_pixels": photo.width * photo.height},
        "baseline_rss_mib": round(baseline, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_above_baseline_mib": round(peak_rss_mib() - baseline, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "image": list(Image.open(result.path).size),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        print_result(child(args.child, args.steps))
        return
    logs = Path(tempfile.mkdtemp(prefix="request-memory-logs-"))
    rows = run_modes(__file__, CASES, child_args(args, "steps"), logs, cwd=REPO)
    print(json.dumps(rows, indent=2))
    print(markdown_table(rows, COLUMNS))
    print(f"logs: {logs}")
    if len(rows) < len(CASES):
        raise SystemExit("a case failed (above)")


if __name__ == "__main__":
    main()
