"""Ahead-of-time compiled blocks (``flux.aot``): built once, loaded in a fresh process, against
eager and ``torch.compile`` in that process.

Two subprocesses, as a ZeroGPU Space has them: ``build`` (start-up) compiles the DiT's and the ID
cross-attentions' blocks into AOTInductor packages while generating one image; ``load`` (a fresh
worker) builds the same random stack, times eager steps, then loads the packages (Dynamo traces,
nothing is compiled) and times the first generation and the steps, then ``torch.compile``'s own
blocks for comparison. Full-size stack of ``bench_gpu``, random weights, bf16, resident.

    python benchmarks/bench_aot.py --steps 10 --out $OUT

Output: ``aot.json`` and ``aot.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_gpu import build_stack  # noqa: E402


def request(args, steps: int):
    from skimage import data as skimage_data

    from pulid.request import GenerationRequest

    return GenerationRequest(
        prompt="a portrait, cinematic",
        id_images=[skimage_data.astronaut()],
        width=args.width,
        height=args.height,
        num_steps=steps,
        seed=42,
    )


def steps_of(pipeline, generation) -> tuple[list[float], object]:
    import torch

    events = []

    def on_step(info) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        events.append(event)

    result = pipeline.generate(generation, callback=on_step)
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in zip(events[:-1], events[1:], strict=False)], result


def phase(args) -> dict:
    import torch

    from flux.aot import AheadOfTime, compile_ahead

    torch.backends.cuda.matmul.allow_tf32 = True
    pipeline = build_stack("cuda", torch.bfloat16, Path(tempfile.mkdtemp(prefix="bench-aot-")))
    out: dict = {}
    if args.phase == "build":
        backend = AheadOfTime(args.packages, "build")
        compile_ahead(pipeline.compiled_blocks(), backend)
        t0 = time.perf_counter()
        pipeline.generate(request(args, 2))
        torch.cuda.synchronize()
        out.update(build_s=time.perf_counter() - t0, built=backend.built)
        return out
    # load: a fresh process
    pipeline.generate(request(args, 2))  # warm-up
    eager, reference = steps_of(pipeline, request(args, args.steps))
    backend = AheadOfTime(args.packages, "load")
    prepare_s = backend.prepare()  # the app process's part (ZeroGPU's workers inherit it)
    compile_ahead(pipeline.compiled_blocks(), backend)
    t0 = time.perf_counter()
    pipeline.generate(request(args, 2))
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    aot, loaded = steps_of(pipeline, request(args, args.steps))
    torch._dynamo.reset()
    from flux.compile import compile_blocks

    compile_blocks(pipeline.compiled_blocks())
    t0 = time.perf_counter()
    pipeline.generate(request(args, 2))
    torch.cuda.synchronize()
    inductor_first_s = time.perf_counter() - t0
    inductor, compiled = steps_of(pipeline, request(args, args.steps))

    def error(result) -> float:
        a, b = result.latents.double(), reference.latents.double()
        return float((a - b).abs().max() / b.abs().max())

    out.update(
        eager_step_ms=statistics.median(eager),
        aot_step_ms=statistics.median(aot),
        inductor_step_ms=statistics.median(inductor),
        aot_first_generation_s=first_s,
        inductor_first_generation_s=inductor_first_s,
        aot_loaded=sorted(set(backend.loaded)),
        aot_missing=backend.missing,
        aot_once_s=backend.seconds,
        aot_prepare_s=prepare_s,
        aot_vs_eager_error=error(loaded),
        inductor_vs_eager_error=error(compiled),
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--phase", choices=["build", "load"], default=None, help="(internal) one phase")
    parser.add_argument("--packages", type=Path, default=None, help="(internal) the packages' folder")
    parser.add_argument("--result", type=Path, default=None, help="(internal) where a phase writes")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "aot-out")))
    args = parser.parse_args()
    if args.phase is not None:
        args.result.write_text(json.dumps(phase(args)))
        return
    packages = Path(tempfile.mkdtemp(prefix="aot-packages-"))
    results = {}
    for name in ("build", "load"):
        target = Path(tempfile.mkdtemp()) / f"{name}.json"
        command = [sys.executable, __file__, "--phase", name, "--packages", str(packages)]
        command += ["--result", str(target), "--width", str(args.width), "--height", str(args.height)]
        command += ["--steps", str(args.steps)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout[-4000:], done.stderr[-8000:], flush=True)
            raise SystemExit(f"the {name} phase failed")
        results[name] = json.loads(target.read_text())
        print(name, json.dumps(results[name]), flush=True)
    load = results["load"]
    eager = load["eager_step_ms"]
    table = [
        "| blocks | DiT step (ms) | vs eager | first generation in a fresh process (s) | latents vs eager |",
        "|---|---|---|---|---|",
        f"| eager | {eager:.1f} | 1 | - | 0 |",
    ]
    for label, key in (("ahead of time (loaded)", "aot"), ("torch.compile", "inductor")):
        step, first, error = (
            load[f"{key}_step_ms"],
            load[f"{key}_first_generation_s"],
            load[f"{key}_vs_eager_error"],
        )
        table.append(f"| {label} | {step:.1f} | {step / eager:.3f}x | {first:.1f} | {error:.1e} |")
    meta = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "size": f"{args.width}x{args.height}",
        "steps": args.steps,
        "build_s": results["build"]["build_s"],
        "packages": len(results["build"]["built"]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "aot.json").write_text(json.dumps({"meta": meta, **results}, indent=1))
    (args.out / "aot.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
