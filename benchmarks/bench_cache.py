"""The First-Block step cache on the GPU: whole-image time and full steps at a few thresholds.

Builds the full-size stack with random weights (``bench_gpu.build_stack``), then for each
threshold generates one 896x1152 image at 28 steps with the ID on, resident bf16, and again under
a 16 GiB VRAM budget (blocks streamed: a skipped step streams none of the skipped blocks). Records
the whole-image time, the DiT time, how many steps ran in full, and the latents' distance from the
uncached image. Random weights do not behave like trained ones (how fast the first block's residual
settles differs), so the counts here say what the mechanism costs and saves, not what a threshold
does to real images. Writes ``cache.json`` to ``--out``.

    python benchmarks/bench_cache.py --thresholds 0,0.08,0.12,0.2 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GiB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--thresholds", default="0,0.08,0.12,0.2")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--modes", default="resident,budget16")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch
    from skimage import data as skimage_data

    from benchmarks.bench_gpu import apply_mode, build_stack
    from pulid.request import GenerationRequest

    torch.backends.cuda.matmul.allow_tf32 = True
    pipeline = build_stack("cuda", torch.bfloat16, Path(tempfile.mkdtemp(prefix="bench-cache-")))
    base = dict(
        prompt="portrait, color, cinematic",
        id_images=[skimage_data.astronaut()],
        width=896,
        height=1152,
        num_steps=args.steps,
        seed=42,
        max_sequence_length=128,
    )
    thresholds = [float(v) for v in args.thresholds.split(",")]
    rows = []
    for mode in args.modes.split(","):
        if mode != "resident":
            apply_mode(pipeline, mode)
        pipeline.generate(GenerationRequest(**{**base, "num_steps": 3}))  # warm-up
        reference = None
        for threshold in thresholds:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            result = pipeline.generate(GenerationRequest(**base, cache_threshold=threshold))
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
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    (args.out / "cache.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
