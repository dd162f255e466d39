"""Ahead-of-time compiled blocks (``flux.aot``): built once, loaded in a fresh process, against
eager and ``torch.compile`` in that process.

Two subprocesses, as a ZeroGPU Space has them: ``build`` (start-up) compiles the DiT's and the ID
cross-attentions' blocks into AOTInductor packages while generating one image; ``load`` (a fresh
worker) builds the same random stack, times eager steps, then loads the packages (Dynamo traces,
nothing is compiled) and times the first generation and the steps, then ``torch.compile``'s own
blocks for comparison. Full-size random stack of the harness, bf16, resident.

    python benchmarks/bench_aot.py --steps 10 --out $OUT

Output: ``aot.json`` and ``aot.md`` in ``--out`` (and each phase's log, ``build.log`` and ``load.log``).
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

from benchmarks.harness import (  # noqa: E402
    Column,
    StepTimer,
    bench_request,
    build_stack,
    child_args,
    meta,
    print_result,
    run_child,
    write_report,
)

COLUMNS = (
    Column("blocks", "blocks"),
    Column("DiT step (ms)", "step_ms", "{:.1f}"),
    Column("vs eager", "vs_eager", "{:.3f}x"),
    Column("first generation in a fresh process (s)", "first_generation_s", "{:.1f}"),
    Column("latents vs eager", "error_vs_eager", "{:.1e}"),
)


def request(args, steps: int):
    return bench_request(
        prompt="a portrait, cinematic", width=args.width, height=args.height, num_steps=steps
    )


def steps_of(pipeline, generation) -> tuple[list[float], object]:
    """The DiT steps of one generation (ms), and its result."""
    import torch

    timer = StepTimer("cuda")
    result = pipeline.generate(generation, callback=timer)
    torch.cuda.synchronize()
    return timer.intervals_ms(), result


def first_generation_s(pipeline, args) -> float:
    """A 2-step image, synchronised: the first one compiles, traces or loads."""
    import torch

    t0 = time.perf_counter()
    pipeline.generate(request(args, 2))
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def phase(args) -> dict:
    import statistics

    import torch

    from flux.aot import AheadOfTime, compile_ahead

    torch.backends.cuda.matmul.allow_tf32 = True
    pipeline = build_stack("cuda", torch.bfloat16, Path(tempfile.mkdtemp(prefix="bench-aot-")))
    if args.phase == "build":
        backend = AheadOfTime(args.packages, "build")
        compile_ahead(pipeline.compiled_blocks(), backend)
        return {"build_s": first_generation_s(pipeline, args), "built": backend.built}
    # load: a fresh process
    pipeline.generate(request(args, 2))  # warm-up
    eager, reference = steps_of(pipeline, request(args, args.steps))
    backend = AheadOfTime(args.packages, "load")
    prepare_s = backend.prepare()  # the app process's part (ZeroGPU's workers inherit it)
    compile_ahead(pipeline.compiled_blocks(), backend)
    first_s = first_generation_s(pipeline, args)
    aot, loaded = steps_of(pipeline, request(args, args.steps))
    torch._dynamo.reset()
    from flux.compile import compile_blocks

    compile_blocks(pipeline.compiled_blocks())
    inductor_first_s = first_generation_s(pipeline, args)
    inductor, compiled = steps_of(pipeline, request(args, args.steps))

    def error(result) -> float:
        a, b = result.latents.double(), reference.latents.double()
        return float((a - b).abs().max() / b.abs().max())

    return {
        "eager_step_ms": statistics.median(eager),
        "aot_step_ms": statistics.median(aot),
        "inductor_step_ms": statistics.median(inductor),
        "aot_first_generation_s": first_s,
        "inductor_first_generation_s": inductor_first_s,
        "aot_loaded": sorted(set(backend.loaded)),
        "aot_missing": backend.missing,
        "aot_once_s": backend.seconds,
        "aot_prepare_s": prepare_s,
        "aot_vs_eager_error": error(loaded),
        "inductor_vs_eager_error": error(compiled),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }


def table_rows(load: dict) -> list[dict]:
    """The table's rows from the load phase: eager, the loaded packages, ``torch.compile``."""
    eager = load["eager_step_ms"]
    rows = [{"blocks": "eager", "step_ms": eager, "vs_eager": 1.0, "error_vs_eager": 0.0}]
    for label, key in (("ahead of time (loaded)", "aot"), ("torch.compile", "inductor")):
        step = load[f"{key}_step_ms"]
        rows.append(
            {
                "blocks": label,
                "step_ms": step,
                "vs_eager": step / eager,
                "first_generation_s": load[f"{key}_first_generation_s"],
                "error_vs_eager": load[f"{key}_vs_eager_error"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--phase", choices=["build", "load"], default=None, help="(internal) one phase")
    parser.add_argument("--packages", type=Path, default=None, help="(internal) the packages' folder")
    parser.add_argument("--result", type=Path, default=None, help="(internal) also write a phase's result")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "aot-out")))
    args = parser.parse_args()
    if args.phase is not None:
        result = phase(args)
        if args.result is not None:
            args.result.write_text(json.dumps(result))
        print_result(result)
        return
    args.packages = Path(tempfile.mkdtemp(prefix="aot-packages-"))
    results = {}
    for name in ("build", "load"):  # the load phase needs the build's packages: no going on
        run = run_child(
            __file__,
            name,
            child_args(args, "packages", "width", "height", "steps"),
            args.out / f"{name}.log",
            flag="--phase",
        )
        if run.failed:
            raise SystemExit(f"the {name} phase failed (rc {run.returncode}):\n{run.stderr_tail}")
        results[name] = run.row
        print(name, json.dumps(results[name]), flush=True)
    settings = {
        "size": f"{args.width}x{args.height}",
        "steps": args.steps,
        "build_s": results["build"]["build_s"],
        "packages": len(results["build"]["built"]),
    }
    report = meta(results["load"]["device"], **settings)
    print(write_report(args.out, "aot", table_rows(results["load"]), report, COLUMNS, **results))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
