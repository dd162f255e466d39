"""The DiT step's cost of several people and of inpainting, against one person, with random weights.

Builds the harness's full-size stack once (bf16, resident), then times the median DiT step
of the same request in several variants, interleaved over ``--rounds`` rounds so that drift hits
them all alike: no ID, one person, two and four people (the columns layout), two people with
drawn regions (the masks layout), and one person repainting half of a photo (inpainting). Eager
first, then with the DiT's blocks and the ID cross-attentions compiled (``--compile``). Output:
``people.json`` and ``people.md`` in ``--out``, and the table on stdout.

    python benchmarks/bench_people.py --steps 10 --rounds 3 --compile --out /tmp/people

Random weights show the cost, not whether each face lands in its region (image quality).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (  # noqa: E402
    Column,
    StepTimer,
    astronaut,
    bench_request,
    build_stack,
    markdown_table,
    meta,
    write_report,
)

VARIANTS = ("no ID", "one person", "two people", "four people", "two people, masks", "one person, inpainting")
COLUMNS = (
    Column("mode", "mode"),
    Column("variant", "variant"),
    Column("DiT step (ms, median)", "step_ms_median", "{:.1f}"),
    Column("vs one person", "vs_one_person", "{:.3f}x"),
)


def requests(photo, width: int, height: int, steps: int) -> dict:
    """The request of each variant: the same prompt, size, steps and seed."""
    import numpy as np

    from pulid.request import Person

    base = {"prompt": "friends on a beach", "width": width, "height": height, "num_steps": steps}
    one = {**base, "id_images": [photo]}
    flipped = np.ascontiguousarray(photo[:, ::-1])
    left = np.zeros((height, width), np.uint8)
    left[:, : width // 2] = 255
    start = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return {
        "no ID": bench_request(**base, id_images=[]),
        "one person": bench_request(**one),
        "two people": bench_request(**one, more_people=(Person((flipped,)),)),
        "four people": bench_request(
            **one, more_people=tuple(Person((p,)) for p in (flipped, photo, flipped))
        ),
        "two people, masks": bench_request(
            **one, layout="masks", id_region=left, more_people=(Person((flipped,), 1.0, 255 - left),)
        ),
        "one person, inpainting": bench_request(**one, init_image=start, mask=left, strength=1.0),
    }


def step_times(pipeline, request) -> list[float]:
    """The DiT steps of one generation, in ms (CUDA events at each step's end)."""
    import torch

    timer = StepTimer("cuda")
    pipeline.generate(request, callback=timer)
    torch.cuda.synchronize()
    return timer.intervals_ms()


def measure(pipeline, variants: dict, rounds: int) -> dict[str, list[float]]:
    import torch

    for request in variants.values():  # warm-up: compiles, autotunes, fills the ID cache
        pipeline.generate(dataclasses.replace(request, num_steps=2))
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, request in variants.items():
            times[name] += step_times(pipeline, request)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=896)
    parser.add_argument("--height", type=int, default=1152)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time with the blocks compiled")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "people-out")))
    args = parser.parse_args()

    import torch

    from flux.compile import compile_blocks, compile_repeated_blocks

    torch.backends.cuda.matmul.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pipeline = build_stack("cuda", torch.bfloat16, Path(tempfile.mkdtemp(prefix="bench-people-")))
    build_s = time.perf_counter() - t0
    variants = requests(astronaut(), args.width, args.height, args.steps)
    rows = []
    modes = ["eager", "compiled"] if args.compile else ["eager"]
    for mode in modes:
        if mode == "compiled":
            compile_repeated_blocks(pipeline.dit)
            compile_blocks(pipeline.pulid_ca)
        times = measure(pipeline, variants, args.rounds)
        one = statistics.median(times["one person"])
        for name in VARIANTS:
            median = statistics.median(times[name])
            rows.append(
                {
                    "mode": mode,
                    "variant": name,
                    "step_ms_median": median,
                    "step_ms_min": min(times[name]),
                    "steps_timed": len(times[name]),
                    "vs_one_person": median / one,
                }
            )
        print(markdown_table([r for r in rows if r["mode"] == mode], COLUMNS), flush=True)
    settings = {"size": f"{args.width}x{args.height}", "steps": args.steps, "rounds": args.rounds}
    report = meta(**settings, build_s=build_s)
    write_report(args.out, "people", rows, report, COLUMNS)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
