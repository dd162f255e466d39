"""Requests per minute with 1 and 2 replicas (``--replicas``), under a burst of requests.

Builds the harness's full-size stack (random weights, bf16, resident) on each GPU, then for
each replica count sends ``--burst`` requests at once through the app's service (each its own
visitor, as a burst of users would) and times from the first submission to the last saved image.
One warm-up request per replica first. ``--preset tiny`` runs the same on the CPU with the tiny
pipeline, to check the script itself.

    python benchmarks/bench_replicas.py --replicas 1,2 --burst 8 --out $OUT

Output: ``replicas.json`` and ``replicas.md`` in ``--out``.
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

from benchmarks.harness import Column, astronaut, bench_request, build_stack, meta, write_report  # noqa: E402

COLUMNS = (
    Column("replicas", "replicas"),
    Column("burst", "burst"),
    Column("wall (s)", "wall_s", "{:.1f}"),
    Column("requests per minute", "requests_per_minute", "{:.1f}"),
    Column("vs 1 replica", "vs_first", "{:.2f}x"),
)


def burst(service, requests: list) -> dict:
    """Submit every request at once; wall time until all are saved, and each one's latency."""
    start = time.perf_counter()
    jobs = [
        service.start(request, session=f"visitor-{i}", client=f"visitor-{i}")
        for i, request in enumerate(requests)
    ]
    latencies = []
    for job in jobs:
        job.wait()
        job.result()
        latencies.append(time.perf_counter() - start)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "requests_per_minute": 60 * len(requests) / wall, "latency_s": latencies}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", default="1,2", help="replica counts to time, comma-separated")
    parser.add_argument("--burst", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--preset", choices=["tiny"], default=None, help="the tiny pipeline on the CPU")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "replicas-out")))
    args = parser.parse_args()

    import torch

    from pulid.serve.service import GenerationService, ReplicaRunner

    counts = [int(n) for n in args.replicas.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    if args.preset == "tiny":
        from tests.stubs import StubFaceAnalyzer
        from tiny_random.pipeline import tiny_pipeline

        pipelines = [tiny_pipeline(folder, StubFaceAnalyzer()) for _ in range(max(counts))]
        device = "cpu (tiny pipeline)"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        pipelines = [build_stack(f"cuda:{i}", torch.bfloat16, folder) for i in range(max(counts))]
        device = ", ".join(torch.cuda.get_device_name(i) for i in range(max(counts)))
    photo = astronaut()
    requests = [
        bench_request(
            prompt="a portrait, cinematic",
            id_images=[photo],
            width=args.width,
            height=args.height,
            num_steps=args.steps,
            seed=100 + i,
        )
        for i in range(args.burst)
    ]
    rows = []
    for count in counts:
        runner = ReplicaRunner(pipelines[:count])
        service = GenerationService(pipelines[0], folder / f"out-{count}", runner=runner)
        burst(service, requests[:count])  # warm-up: one request on each replica
        result = burst(service, requests)
        rows.append({"replicas": count, "burst": args.burst, **result})
        rate, wall = result["requests_per_minute"], result["wall_s"]
        print(f"{count} replica(s): {rate:.1f} requests/min ({wall:.1f} s)", flush=True)
    base = rows[0]["requests_per_minute"]
    for row in rows:
        row["vs_first"] = row["requests_per_minute"] / base
    settings = {"size": f"{args.width}x{args.height}", "steps": args.steps}
    report = meta(device, **settings)
    print(write_report(args.out, "replicas", rows, report, COLUMNS))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
