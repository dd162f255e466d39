"""LoRA on the GPU: step-time overhead of the side path, switching, fp8 error, and a speed-LoRA image.

Builds the full-size stack with random weights (``bench_gpu.build_stack``), wraps the DiT in
LoRA slots as the loader does (before any compilation), writes synthetic full-size LoRA files
(every Linear of the DiT, rank 16 and 64, kohya layout; rank 64 in diffusers' split layout as
FLUX.1-Turbo-Alpha ships) and measures, per group (each in its own process):

- ``eager``: the DiT step (median over the steps of one 896x1152 image) with no slots, empty
  slots, 1 and 3 LoRAs of rank 16 and 64 and the diffusers-layout rank 64, each merged into the
  weights and on the side path; reading a LoRA file; switching the side path's slots to a new set
  or to new strengths; the merge and restore of one request; a whole 8-step request with and
  without a LoRA each way; a whole 8-step image with the rank-64 LoRA against the 28-step image.
- ``compiled``: the same with the repeated blocks compiled, both mechanisms, whether a change of
  strength recompiles (dynamo's graph count before and after) and whether anything breaks a graph.
- ``fp8``: native fp8 (compiled), LoRAs merged (fp8 layers requantised) and on the side path:
  step times, and the error of one DiT forward with a LoRA against the bf16 forward with the same
  LoRA, each way, next to fp8's own error without LoRA.
- ``budget16``: a 16 GiB budget (blocks streamed, side path): step times and peak memory, and
  which LoRA sets are refused for not fitting beside the plan.

Random weights say nothing about image quality or how a speed LoRA keeps the identity; they
give the costs. Writes ``lora-<group>.json`` and ``lora-<group>.md`` (the step times) to ``--out``,
and each group's log, ``<group>.log``.

    python benchmarks/bench_lora.py --groups eager,budget16 --out $OUT
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (  # noqa: E402
    Column,
    GiB,
    StepTimer,
    apply_mode,
    astronaut,
    bench_request,
    build_stack,
    child_args,
    markdown_table,
    meta,
    one_forward,
    print_result,
    run_modes,
    write_json,
)

GROUPS = ("eager", "compiled", "fp8", "budget16")
COLUMNS = (
    Column("LoRAs", "loras"),
    Column("DiT step (ms, median)", "median_ms", "{:.1f}"),
    Column("vs none", "vs_none", "{:.3f}x"),
    Column("peak GPU allocated (GiB)", "peak_gib", "{:.1f}"),
)


def summarise(rows: dict) -> dict:
    return {
        name: {"median_ms": statistics.median(v[0] for v in values), "peak_gib": max(v[1] for v in values)}
        for name, values in rows.items()
    }


def write_loras(flow, folder: Path) -> dict[str, Path]:
    """Full-size synthetic LoRAs for every Linear of the DiT, stored in bf16 as real files are."""
    import torch

    from tiny_random.loras import random_factors, write_diffusers, write_kohya

    files = {}
    for rank in (16, 64):
        for index in range(3):
            factors = random_factors(flow, rank=rank, seed=100 * rank + index, magnitude=0.05)
            for f in factors.values():
                f.down, f.up = f.down.to(torch.bfloat16), f.up.to(torch.bfloat16)
            files[f"r{rank}-{index}"] = write_kohya(folder / f"r{rank}-{index}.safetensors", factors)
    factors = random_factors(flow, rank=64, seed=7, magnitude=0.05)
    for f in factors.values():
        f.down, f.up = f.down.to(torch.bfloat16), f.up.to(torch.bfloat16)
    files["r64-diffusers"] = write_diffusers(folder / "r64-diffusers.safetensors", factors)
    return files


SETS = {  # name -> LoRA file keys
    "none": [],
    "1 x r16": ["r16-0"],
    "1 x r64": ["r64-0"],
    "3 x r16": ["r16-0", "r16-1", "r16-2"],
    "3 x r64": ["r64-0", "r64-1", "r64-2"],
    "1 x r64 diffusers": ["r64-diffusers"],
}


def step_rows(step_ms: dict) -> list[dict]:
    """The table's rows: one per LoRA set."""
    return [{"loras": name, **values} for name, values in step_ms.items()]


def run_group(group: str, args) -> dict:
    import torch

    from flux.lora import LoRAAdapters
    from pulid.loras import LoRAChoice, LoRALibrary

    torch.backends.cuda.matmul.allow_tf32 = True
    folder = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    pipeline = build_stack("cuda", torch.bfloat16, folder)
    files = write_loras(pipeline.dit, folder / "loras")
    out: dict = {"group": group}
    base = {"id_images": [astronaut()], "width": args.width, "height": args.height}

    def request(names, steps=args.steps, strength=1.0):
        loras = tuple(LoRAChoice(str(files[n]), strength) for n in names)
        return bench_request(**base, num_steps=steps, loras=loras)

    def step_times(req) -> tuple[float, float]:
        timer = StepTimer("cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        pipeline.generate(req, callback=timer)
        torch.cuda.synchronize()
        return timer.median_ms, torch.cuda.max_memory_allocated() / GiB

    def attach():
        pipeline.lora_adapters = LoRAAdapters(pipeline.dit, "cuda", torch.bfloat16)
        pipeline.lora_library = LoRALibrary(folder / "loras", pipeline.lora_adapters.targets)

    if group == "eager":
        step_times(request([], steps=3))  # warm-up
        rows = {"no slots": [step_times(request([]))]}
        attach()
        step_times(request(["r16-0"], steps=2))
        for mechanism, merge in (("merged", True), ("side path", False)):
            pipeline.lora_merge = merge
            for name, keys in SETS.items():
                label = name if not keys else f"{name}, {mechanism}"
                for _ in range(args.repeats):
                    rows.setdefault(label, []).append(step_times(request(keys)))
        pipeline.lora_merge = True
        out["step_ms"] = summarise(rows)
        out.update(switching(pipeline, files, torch))
        out.update(request_cost(pipeline, request, torch))
        out.update(speed_image(pipeline, request, torch))
    elif group == "compiled":
        from torch._dynamo.utils import counters

        from flux.compile import compile_blocks, compile_repeated_blocks

        attach()
        compile_repeated_blocks(pipeline.dit)
        compile_blocks(pipeline.pulid_ca)
        rows = {}
        for mechanism, merge in (("merged", True), ("side path", False)):
            pipeline.lora_merge = merge
            for name in ("none", "1 x r16", "3 x r64"):
                label = name if name == "none" else f"{name}, {mechanism}"
                step_times(request(SETS[name], steps=3))  # compiles this set's graphs
                rows.setdefault(label, []).extend(
                    step_times(request(SETS[name])) for _ in range(args.repeats)
                )
            graphs = counters["stats"]["unique_graphs"]
            rows[f"3 x r64, {mechanism}, strength 0.5"] = [step_times(request(SETS["3 x r64"], strength=0.5))]
            out[f"graphs_before_strength_change_{mechanism}"] = graphs
            out[f"graphs_after_strength_change_{mechanism}"] = counters["stats"]["unique_graphs"]
        out["graph_breaks"] = sum(counters["graph_break"].values())
        out["step_ms"] = summarise(rows)
    elif group == "fp8":
        attach()
        lora = [LoRAChoice(str(files["r16-0"]), 1.0)]
        reference = request([], steps=1)

        def forward(with_lora: bool, merge: bool = True):
            files_ = pipeline.load_loras(bench_request(**base, loras=tuple(lora))) if with_lora else []
            from flux.lora import ActiveLoRA

            active = [ActiveLoRA(f.name, f.layers, 1.0) for f in files_]
            with pipeline.lora_adapters.applied(active, merge=merge):
                return one_forward(pipeline, reference)

        bf16_plain, bf16_lora = forward(False), forward(True)
        pipeline.lora_adapters.close()
        from flux.compile import compile_blocks, compile_repeated_blocks
        from flux.quant import quantize_linears_to_fp8

        quantize_linears_to_fp8(pipeline.dit)
        attach()  # the slots before compiling, as the loader does
        compile_repeated_blocks(pipeline.dit)
        compile_blocks(pipeline.pulid_ca)
        fp8_plain = forward(False)
        fp8_merged, fp8_side = forward(True, merge=True), forward(True, merge=False)

        def rel(a, b):
            return ((a - b).norm() / b.norm()).item()

        out["fp8_error_without_lora"] = rel(fp8_plain, bf16_plain)
        out["fp8_error_with_lora_merged"] = rel(fp8_merged, bf16_lora)
        out["fp8_error_with_lora_side_path"] = rel(fp8_side, bf16_lora)
        out["lora_effect_bf16"] = rel(bf16_lora, bf16_plain)
        rows = {}
        for mechanism, merge in (("merged", True), ("side path", False)):
            pipeline.lora_merge = merge
            for name in ("none", "1 x r16", "3 x r64"):
                label = name if name == "none" else f"{name}, {mechanism}"
                step_times(request(SETS[name], steps=3))
                rows.setdefault(label, []).extend(
                    step_times(request(SETS[name])) for _ in range(args.repeats)
                )
            out[f"lora_mode_{mechanism}"] = pipeline.lora_adapters.last_mode
        out["step_ms"] = summarise(rows)
    elif group == "budget16":
        attach()
        apply_mode(pipeline, "budget16")
        from pulid.request import InvalidRequestError

        rows = {}
        step_times(request([], steps=2))
        for name in ("none", "1 x r16", "3 x r64"):
            try:
                rows[name] = [step_times(request(SETS[name])) for _ in range(args.repeats)]
            except InvalidRequestError as err:  # factors that do not fit beside the plan
                out.setdefault("refused", {})[name] = str(err)
        out["step_ms"] = summarise(rows)
    base_ms = out["step_ms"].get("none", {}).get("median_ms")
    if base_ms:
        for row in out["step_ms"].values():
            row["vs_none"] = row["median_ms"] / base_ms
    return out


def switching(pipeline, files, torch) -> dict:
    """Reading a LoRA file, and moving the side path's slots to a new set or to new strengths."""
    from flux.lora import ActiveLoRA, read_lora

    targets = pipeline.lora_adapters.targets
    t0 = time.perf_counter()
    lora = read_lora(files["r64-1"], targets)
    read_s = time.perf_counter() - t0
    other = read_lora(files["r64-2"], targets)
    adapters = pipeline.lora_adapters
    timings = {}
    for label, active in (
        ("new_set_s", [ActiveLoRA("a", lora.layers, 1.0)]),
        ("same_set_new_strength_s", [ActiveLoRA("a", lora.layers, 0.5)]),
        ("another_set_s", [ActiveLoRA("b", other.layers, 1.0)]),
    ):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with adapters.applied(active, merge=False):
            torch.cuda.synchronize()
            timings[label] = time.perf_counter() - t0
    return {"read_r64_file_s": read_s, "factor_mib_r64": adapters.factor_bytes() / 2**20, **timings}


def request_cost(pipeline, request, torch) -> dict:
    """What LoRAs add to a whole request (8 steps): merging and restoring, or the side path's steps."""
    out = {}
    for mechanism, merge in (("merged", True), ("side path", False)):
        pipeline.lora_merge = merge
        for label, keys in (("none", []), ("1 x r64", ["r64-0"])):
            times = []
            for _ in range(2):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                pipeline.generate(request(keys))
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            out[f"request_{label}_{mechanism}_s"] = min(times)
    pipeline.lora_merge = True
    adapters = pipeline.lora_adapters
    lora = pipeline.load_loras(request(["r64-0"]))[0]
    from flux.lora import ActiveLoRA

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with adapters.applied([ActiveLoRA("r64", lora.layers, 1.0)]):
        torch.cuda.synchronize()
        out["merge_r64_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
    torch.cuda.synchronize()
    out["restore_r64_s"] = time.perf_counter() - t1
    return out


def speed_image(pipeline, request, torch) -> dict:
    """A whole 8-step image with a rank-64 LoRA (diffusers layout) against the 28-step image."""
    out = {}
    for label, req in (
        ("image_28_steps_s", request([], steps=28)),
        ("image_8_steps_r64_lora_s", request(["r64-diffusers"], steps=8)),
    ):
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            pipeline.generate(req)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[label] = min(times)
    out["speedup_8_vs_28"] = out["image_28_steps_s"] / out["image_8_steps_r64_lora_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", default="eager,budget16")
    parser.add_argument("--group", default=None, help=argparse.SUPPRESS)  # one group, in this process
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--width", type=int, default=896)
    parser.add_argument("--height", type=int, default=1152)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.group:
        result = run_group(args.group, args)
        settings = {"steps": args.steps, "repeats": args.repeats, "size": f"{args.width}x{args.height}"}
        write_json(args.out / f"lora-{args.group}.json", {"meta": meta(**settings), **result})
        table = markdown_table(step_rows(result["step_ms"]), COLUMNS)
        (args.out / f"lora-{args.group}.md").write_text(table + "\n")
        print_result(result)
        return
    groups = args.groups.split(",")
    for group in groups:
        if group not in GROUPS:
            raise SystemExit(f"unknown group {group!r}; choose from {', '.join(GROUPS)}")
    passed_on = child_args(args, "steps", "repeats", "width", "height", "out")
    for result in run_modes(__file__, groups, passed_on, args.out, flag="--group"):
        print(f"== {result['group']}\n" + markdown_table(step_rows(result["step_ms"]), COLUMNS), flush=True)


if __name__ == "__main__":
    main()
