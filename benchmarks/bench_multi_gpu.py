"""Two GPUs of one host: one GPU, one image split over two (sequence parallel), and the stage split.

Run under torchrun with one process per GPU; both build the harness's full-size stack with
the same random weights (bf16, resident, one person's ID), then:

1. one GPU: rank 0 alone generates the request (the other waits);
2. sequence parallel: both ranks generate it together, the DiT's tokens split (``flux.parallel``);
3. communication alone: the all-to-alls of one DiT pass at the request's shapes, timed by themselves;

each eager, then with the blocks compiled (``--compile``); timings are medians over ``--rounds``
images after a warm-up. Step times come from CUDA events at each step's end, whole-image times
from the pipeline's own ``total_s`` (text, ID, denoise, decode, likeness). Then, on rank 0 only,
4. the stage split (``--devices cuda:0,cuda:1``): the text encoders, the ID path and the
   autoencoder moved to the second GPU, the DiT on the first; its latents must equal one GPU's.

Numerics: the split runs' final latents against one GPU's (relative error, max and mean).

    torchrun --nproc-per-node 2 benchmarks/bench_multi_gpu.py --compile --out $OUT

Output: ``multi_gpu.json`` and ``multi_gpu.md`` in ``--out`` (rank 0). Random weights show time
and numerics, not image quality.
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
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import Column, StepTimer, bench_request, build_stack, meta, write_report  # noqa: E402

COLUMNS = (
    Column("mode", "mode"),
    Column("variant", "variant"),
    Column("DiT step (ms)", "step_ms", "{:.1f}"),
    Column("vs one GPU", "step_ratio", "{:.3f}x"),
    Column("whole image (s)", "whole_s", "{:.2f}"),
    Column("vs one GPU", "whole_ratio", "{:.3f}x"),
    Column(
        "latents vs one GPU (max / mean rel.)", "error_vs_one", lambda e: f"{e['max']:.2e} / {e['mean']:.2e}"
    ),
)


def timed(pipeline, request, watch: bool) -> dict:
    """One generation: its DiT step times (ms, CUDA events; ``watch`` on rank 0), total and latents."""
    import torch

    timer = StepTimer("cuda")
    result = pipeline.generate(request, callback=timer if watch else None)
    torch.cuda.synchronize()
    steps = timer.intervals_ms()
    return {"steps": steps, "total_s": result.timings["total_s"], "latents": result.latents.float().cpu()}


def repeated(pipeline, request, rounds: int, watch: bool) -> dict:
    import torch

    pipeline.generate(dataclasses.replace(request, num_steps=2))  # warm-up: compiles, autotunes
    torch.cuda.reset_peak_memory_stats()
    runs = [timed(pipeline, request, watch) for _ in range(rounds)]
    steps = [ms for run in runs for ms in run["steps"]]
    return {
        "step_ms": statistics.median(steps) if steps else None,
        "whole_s": statistics.median(run["total_s"] for run in runs),
        "whole_s_all": [run["total_s"] for run in runs],
        "latents": runs[-1]["latents"],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,  # this process, its current GPU
    }


def comm_ms(parallel, request, repeats: int = 5) -> float:
    """The all-to-alls of one DiT pass at the request's shapes, alone (ms, median of ``repeats``)."""
    import torch
    import torch.distributed._functional_collectives as funcol

    params = parallel.params
    world = parallel.shards.world
    local = (request.max_sequence_length + request.image_tokens) // world
    head_dim = params.hidden_size // params.num_heads
    blocks = params.depth + params.depth_single_blocks
    send = torch.randn(
        world, 3 * params.num_heads // world * local * head_dim, device="cuda", dtype=torch.bfloat16
    )
    back = torch.randn(
        world, params.num_heads // world * local * head_dim, device="cuda", dtype=torch.bfloat16
    )
    times = []
    for _ in range(repeats + 1):
        torch.distributed.barrier()
        timer = StepTimer("cuda")
        timer.mark()
        for _ in range(blocks):
            funcol.wait_tensor(funcol.all_to_all_single(send, None, None, parallel.group))
            funcol.wait_tensor(funcol.all_to_all_single(back, None, None, parallel.group))
        timer.mark()
        torch.cuda.synchronize()
        times += timer.intervals_ms()
    return statistics.median(times[1:])


def relative(a, b) -> dict:
    diff = (a.double() - b.double()).abs()
    return {
        "max": float(diff.max() / b.double().abs().max()),
        "mean": float(diff.mean() / b.double().abs().mean()),
    }


def stage_split(pipeline, request, folder: Path, rounds: int, one: dict) -> dict:
    """Rank 0: the same stack with text, ID and decode on cuda:1 (``--devices cuda:0,cuda:1``)."""
    import torch

    from flux.offload.device_map import DeviceMap
    from pulid.face_analysis import load_face_analyzer
    from pulid.id_encoder import IDEncoder
    from pulid.pipeline import STAGES
    from tiny_random.pipeline import tiny_face_model_paths

    other = torch.device("cuda", 1)
    encoder = pipeline.id_encoder
    face = load_face_analyzer(tiny_face_model_paths(folder / "models"), "cpu", other)
    split = pipeline.with_options(
        ae=pipeline.ae.to(other),
        t5=pipeline.t5.to(other),
        clip=pipeline.clip.to(other),
        id_encoder=IDEncoder(face, encoder.eva.to(other), encoder.id_former.to(other), other, pipeline.dtype),
        device_map=DeviceMap.parse("cuda:0,cuda:1", STAGES),
    )
    torch.cuda.reset_peak_memory_stats(1)
    result = repeated(split, request, rounds, watch=True)
    result["peak_gib_cuda0"] = torch.cuda.max_memory_allocated(0) / 2**30
    result["peak_gib_cuda1"] = torch.cuda.max_memory_allocated(1) / 2**30
    result["latents_equal_one_gpu"] = bool(torch.equal(result["latents"], one["latents"]))
    result["vs_one_gpu"] = relative(result["latents"], one["latents"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time with the blocks compiled")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "multi-gpu-out")))
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    from flux.compile import compile_blocks, compile_repeated_blocks
    from flux.parallel import SequenceParallelFlux
    from pulid.serve.ranks import join_torchrun

    rank = join_torchrun(minimum=1)  # one process: the parallel path's own cost, no split
    lead = rank.leads
    torch.backends.cuda.matmul.allow_tf32 = True
    folder = Path(tempfile.mkdtemp(prefix=f"bench-multi-{rank.rank}-"))
    t0 = time.perf_counter()
    pipeline = build_stack(str(rank.device), torch.bfloat16, folder)
    build_s = time.perf_counter() - t0
    split = pipeline.with_options(parallel=SequenceParallelFlux(pipeline.dit))
    request = bench_request(
        prompt="a portrait, cinematic", width=args.width, height=args.height, num_steps=args.steps
    )
    rows, errors, comm, one_by_mode = [], [], {}, {}
    for mode in ["eager", "compiled"] if args.compile else ["eager"]:
        if mode == "compiled":
            compile_repeated_blocks(pipeline.dit)
            compile_blocks(pipeline.pulid_ca)
        one = None
        if lead:
            one = repeated(pipeline, request, args.rounds, watch=True)
            one_by_mode[mode] = one
            rows.append({"mode": mode, "variant": "one GPU", **one, "step_ratio": 1.0, "whole_ratio": 1.0})
            print(f"[{mode}] one GPU: {one['step_ms']:.1f} ms/step, {one['whole_s']:.2f} s", flush=True)
        dist.barrier()
        try:
            two = repeated(split, request, args.rounds, watch=lead)
            comm[mode] = comm_ms(split.parallel, request)
            if lead:
                rows.append(
                    {
                        "mode": mode,
                        "variant": f"{rank.world} GPU(s), sequence parallel",
                        **two,
                        "step_ratio": two["step_ms"] / one["step_ms"],
                        "whole_ratio": two["whole_s"] / one["whole_s"],
                        "error_vs_one": relative(two["latents"], one["latents"]),
                        "comm_ms_per_pass": comm[mode],
                    }
                )
                print(
                    f"[{mode}] two GPUs: {two['step_ms']:.1f} ms/step, {two['whole_s']:.2f} s; "
                    f"all-to-alls alone {comm[mode]:.1f} ms/pass",
                    flush=True,
                )
        except Exception:  # noqa: BLE001 - recorded in the results, the other phases still run
            errors.append(f"{mode} sequence parallel: {traceback.format_exc()}")
            print(errors[-1], flush=True)
        dist.barrier()
    if lead:
        last = "compiled" if args.compile else "eager"
        try:
            if torch.cuda.device_count() < 2:
                raise RuntimeError("the stage split needs a second GPU")
            staged = stage_split(pipeline, request, folder, args.rounds, one_by_mode[last])
            one = one_by_mode[last]
            rows.append(
                {
                    "mode": last,
                    "variant": "stage split (--devices cuda:0,cuda:1)",
                    **staged,
                    "step_ratio": staged["step_ms"] / one["step_ms"],
                    "whole_ratio": staged["whole_s"] / one["whole_s"],
                    "error_vs_one": staged["vs_one_gpu"],
                }
            )
        except Exception:  # noqa: BLE001
            errors.append(f"stage split: {traceback.format_exc()}")
            print(errors[-1], flush=True)
        for row in rows:
            row.pop("latents", None)
        report = meta(
            [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            size=f"{args.width}x{args.height}",
            steps=args.steps,
            rounds=args.rounds,
            build_s=build_s,
            errors=errors,
        )
        print(write_report(args.out, "multi_gpu", rows, report, COLUMNS))
        print(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
