"""The First-Block step cache on the GPU: whole-image time and full steps at a few thresholds.

Builds the full-size stack with random weights (``benchmarks.harness.build_stack``), then for each
threshold generates one 896x1152 image at 28 steps with the ID on, resident bf16, and again under
a 16 GiB VRAM budget (blocks streamed: a skipped step streams none of the skipped blocks). Records
the whole-image time, the DiT time, how many steps ran in full, and the latents' distance from the
uncached image. Random weights do not behave like trained ones (how fast the first block's residual
settles differs), so the counts here say what the mechanism costs and saves, not what a threshold
does to real images. Writes ``cache.json`` and ``cache.md`` to ``--out``.

    python benchmarks/bench_cache.py --thresholds 0,0.08,0.12,0.2 --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (  # noqa: E402
    Column,
    GiB,
    apply_mode,
    bench_request,
    build_stack,
    meta,
    write_report,
)

COLUMNS = (
    Column("mode", "mode"),
    Column("threshold", "threshold", "{:g}"),
    Column("whole image (s)", "whole_image_s", "{:.2f}"),
    Column("DiT (s)", "denoise_s", "{:.2f}"),
    Column("full steps", "full_steps"),
    Column("latents vs uncached (rel.)", "latents_rel_diff_vs_uncached", "{:.2e}"),
    Column("peak GPU allocated (GiB)", "peak_gpu_allocated_gib", "{:.1f}"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--thresholds", default="0,0.08,0.12,0.2")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--modes", default="resident,budget16")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    pipeline = build_stack("cuda", torch.bfloat16, Path(tempfile.mkdtemp(prefix="bench-cache-")))
    base = bench_request(num_steps=args.steps)
    thresholds = [float(v) for v in args.thresholds.split(",")]
    rows = []
    for mode in args.modes.split(","):
        if mode != "resident":
            apply_mode(pipeline, mode)
        pipeline.generate(dataclasses.replace(base, num_steps=3))  # warm-up
        reference = None
        for threshold in thresholds:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            result = pipeline.generate(dataclasses.replace(base, cache_threshold=threshold))
            torch.cuda.synchronize()
            whole = time.perf_counter() - t0
            latents = result.latents.float()
            if reference is None:
                reference = latents
            rows.append(
                {
                    "mode": mode,
                    "threshold": threshold,
                    "whole_image_s": whole,
                    "denoise_s": result.timings["denoise_s"],
                    "full_steps": result.metadata.get("cache_full_steps", f"{args.steps} of {args.steps}"),
                    "latents_rel_diff_vs_uncached": ((latents - reference).norm() / reference.norm()).item(),
                    "peak_gpu_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    settings = {"thresholds": thresholds, "steps": args.steps, "modes": args.modes}
    print(write_report(args.out, "cache", rows, meta(**settings), COLUMNS))


if __name__ == "__main__":
    main()
