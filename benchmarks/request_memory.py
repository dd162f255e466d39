"""Peak host memory of one request at the largest allowed settings, on the tiny-random preset (CPU).

A public Space on a CPU must survive the worst request a visitor may send. This runs, in a fresh
subprocess per case, the service on the tiny pipeline with the stand-in face models, and reports
the process's peak resident memory above its baseline (after the models are loaded) for:

- ``largest``: 1536 x 1536, 50 steps, true CFG, T5 length 512, the ID photo and 4 extra photos at
  the 50-megapixel limit (the worst the limits allow);
- ``typical``: the default 896 x 1152, 28 steps, one 512 x 512 photo.

    python benchmarks/request_memory.py [--steps 50]

Random tiny weights: the numbers are the app's own buffers (photos, latents, the decoder's
activations at full resolution), not the real models' weights.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def child(case: str, steps: int) -> dict:
    import numpy as np
    from PIL import Image

    from pulid.limits import MAX_EXTRA_PHOTOS, MAX_IMAGE_PIXELS
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
    request = service.build_request(np.asarray(photo), extra, prompt="a portrait", seed=1, **settings)
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
        print("RESULT " + json.dumps(child(args.child, args.steps)), flush=True)
        return
    rows = []
    for case in ("typical", "largest"):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", case, "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        lines = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"{case} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(lines[0]))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
