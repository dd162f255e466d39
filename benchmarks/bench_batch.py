"""Several images per request: one denoising batch against the same images one after another.

Builds the full-size stack with random weights (``benchmarks.harness.build_stack``, resident bf16)
once, then for each batch size n: a request with ``num_images=n`` (one batch) and n requests of one
image with seeds seed, seed+1, ... (what the batch promises to equal), interleaved and repeated.
It records the DiT time per image both ways, their ratio, the whole request, peak GPU memory, and
how far each batched image's latents and pixels are from the same seed alone (bf16 batched
matmuls may round differently, so the difference is measured, not assumed zero). Writes
``batch.json`` and ``batch.md`` to ``--out`` and prints the table.

    python benchmarks/bench_batch.py --sizes 1,2,4 --steps 10 --out $OUT
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (  # noqa: E402
    Column,
    GiB,
    astronaut,
    bench_request,
    build_stack,
    meta,
    write_report,
)

COLUMNS = tuple(
    Column(key, key, fmt)
    for key, fmt in (
        ("images", "{}"),
        ("dit_s_per_image_batched", "{:.3f}"),
        ("dit_s_per_image_alone", "{:.3f}"),
        ("batched_over_alone", "{:.3f}"),
        ("request_s_batched", "{:.2f}"),
        ("request_s_one_by_one", "{:.2f}"),
        ("peak_gpu_allocated_gib_batched", "{:.1f}"),
        ("max_latent_rel_diff", "{:.2e}"),
        ("max_pixel_diff", "{}"),
    )
)


def differences(batch, alone: list) -> tuple[float, int]:
    """How far the batch's images are from the same seeds alone: latents (relative), pixels."""
    import numpy as np

    pairs = list(zip(batch.images, [r.images[0] for r in alone], strict=True))
    latent_err = max(((b.latents - a.latents).abs().max() / a.latents.abs().max()).item() for b, a in pairs)
    pixel_err = max(
        int(np.abs(np.asarray(b.image, np.int16) - np.asarray(a.image, np.int16)).max()) for b, a in pairs
    )
    return latent_err, pixel_err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,2,4")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--width", type=int, default=896)
    parser.add_argument("--height", type=int, default=1152)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    args = parser.parse_args()

    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    pipeline = build_stack("cuda", torch.bfloat16, Path(tempfile.mkdtemp(prefix="bench-batch-")))
    base = {"id_images": [astronaut()], "width": args.width, "height": args.height, "num_steps": args.steps}
    pipeline.generate(bench_request(**{**base, "num_steps": 2, "seed": 1}))  # warm-up

    def timed(request):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result = pipeline.generate(request)
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() / GiB

    rows = []
    for n in (int(v) for v in args.sizes.split(",")):
        batched_s, single_s, whole_batch_s, whole_single_s, peaks = [], [], [], [], []
        for repeat in range(args.repeats):
            seed = 100 + 10 * repeat
            batch, peak = timed(bench_request(**base, seed=seed, num_images=n))
            alone = [timed(bench_request(**base, seed=seed + i))[0] for i in range(n)]
            batched_s.append(batch.timings["denoise_s"] / n)
            single_s.append(statistics.mean(r.timings["denoise_s"] for r in alone))
            whole_batch_s.append(batch.timings["total_s"])
            whole_single_s.append(sum(r.timings["total_s"] for r in alone))
            peaks.append(peak)
        latent_err, pixel_err = differences(batch, alone)
        rows.append(
            {
                "images": n,
                "dit_s_per_image_batched": statistics.median(batched_s),
                "dit_s_per_image_alone": statistics.median(single_s),
                "batched_over_alone": statistics.median(batched_s) / statistics.median(single_s),
                "request_s_batched": statistics.median(whole_batch_s),
                "request_s_one_by_one": statistics.median(whole_single_s),
                "peak_gpu_allocated_gib_batched": max(peaks),
                "max_latent_rel_diff": latent_err,
                "max_pixel_diff": pixel_err,
            }
        )
    settings = {"width": args.width, "height": args.height, "steps": args.steps, "repeats": args.repeats}
    print(write_report(args.out, "batch", rows, meta(**settings), COLUMNS))


if __name__ == "__main__":
    main()
