"""Time the whole PuLID-FLUX stack on a GPU, per stage and per memory mode, with random weights.

Builds full-size T5-XXL, CLIP-L, the FLUX.1-dev DiT with the 20 PuLID cross-attention blocks, the
AE, EVA02-CLIP-L and the IDFormer with random weights (no download), and the face models as the
stand-ins of ``tiny_random.face_models`` (the real facexlib code on the GPU, as the app places it,
and insightface on CPU onnxruntime; runs before 2026-11-30 had facexlib on the CPU too): the
harness's :func:`benchmarks.harness.build_stack`. Each mode runs in its own subprocess so that its
peak GPU and CPU memory are its own. Output: ``bench.json`` and ``bench.md`` in ``--out``, and the
table on stdout.

    python benchmarks/bench_gpu.py --modes resident,compiled --out /tmp/bench

Per mode it records: text encoding, ID embedding, the median DiT step (ID on, distilled guidance),
decoding, the whole image (``--steps`` steps, 28 by default), peak GPU memory (allocated and
reserved) and peak CPU RSS. A one-step latent comparison against the resident bf16 mode gives each
mode's relative error.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
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
    bench_request,
    build_stack,
    child_args,
    meta,
    one_forward,
    print_result,
    run_modes,
    write_report,
)

ALL_MODES = (
    "resident",
    "compiled",
    "fp8-eager",
    "fp8",
    "compiled-cudnn",
    "fp8-cudnn",
    "offload",
    "budget24",
    "budget16",
    "aggressive",
    "fp8-budget12",
)
COLUMNS = (
    Column("mode", "mode"),
    Column("DiT step (ms, median)", "dit_step_ms_median", "{:.1f}"),
    Column("whole image (s)", "whole_image_s", "{:.2f}"),
    Column("text (s)", "text_encoding_s", "{:.3f}"),
    Column("ID (s)", "id_embedding_s", "{:.3f}"),
    Column("decode (s)", "decode_s", "{:.3f}"),
    Column(
        "peak GPU alloc / reserved (GiB)",
        lambda r: (r["peak_gpu_allocated_gib"], r["peak_gpu_reserved_gib"]),
        lambda v: f"{v[0]:.1f} / {v[1]:.1f}",
    ),
    Column("peak CPU RSS (GiB)", "peak_cpu_rss_gib", "{:.1f}"),
    Column("one-forward rel. err. vs resident bf16", "rel_err_vs_resident", "{:.4f}"),
)


def set_backends(mode: str) -> str:
    """The torch settings ``mode`` asks for; returns the mode the stack is built in."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    if mode == "fp8-cdt":  # inductor's coordinate-descent tuning of the generated kernels
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    if mode.endswith("-cudnn"):  # attention through cuDNN's fused kernel instead of flash/efficient
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(True)
        return mode.removesuffix("-cudnn")
    return {"fp8-cdt": "fp8"}.get(mode, mode)


def run_mode(mode: str, args) -> dict:
    """One mode, in this process: a warm-up image, then a fresh image (ID cache emptied) timed."""
    import numpy as np
    import torch

    mode_base = set_backends(mode)
    folder = Path(tempfile.mkdtemp(prefix="bench-"))
    t0 = time.perf_counter()
    pipeline = build_stack("cuda", torch.bfloat16, folder)
    build_s = time.perf_counter() - t0
    apply_mode(pipeline, mode_base)
    request = bench_request(width=args.width, height=args.height, num_steps=args.steps)

    # Warm-up: compiles, autotunes, fills the ID cache; then time a fresh image (ID cache emptied).
    pipeline.generate(dataclasses.replace(request, num_steps=3))
    pipeline.id_encoder.forget()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    timer = StepTimer("cuda")
    wall0 = time.perf_counter()
    result = pipeline.generate(request, callback=timer)
    torch.cuda.synchronize()
    whole_s = time.perf_counter() - wall0

    # One DiT forward from fixed inputs, for the error against resident bf16.
    latents_path = folder / "one_step.pt"
    torch.save(one_forward(pipeline, request), latents_path)
    return {
        "mode": mode,
        "build_s": build_s,
        "text_encoding_s": result.timings["text_encoding_s"],
        "id_embedding_s": result.timings["id_embedding_s"],
        "dit_step_ms_median": timer.median_ms,
        "dit_step_ms_min": timer.min_ms,
        "decode_s": result.timings["decode_s"],
        "whole_image_s": whole_s,
        "steps": args.steps,
        "peak_gpu_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
        "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / GiB,
        "peak_cpu_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "image_mean": float(np.asarray(result.image).mean()),
        "one_step_latents": str(latents_path),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }


def add_errors(rows: list[dict]) -> None:
    """Each mode's one-forward relative error against the resident bf16 mode (when it ran)."""
    import torch

    reference = next((r for r in rows if r["mode"] == "resident"), None)
    if reference is None:
        return
    ref = torch.load(reference["one_step_latents"], weights_only=True)
    for r in rows:
        lat = torch.load(r["one_step_latents"], weights_only=True)
        r["rel_err_vs_resident"] = ((lat - ref).norm() / ref.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(ALL_MODES))
    parser.add_argument("--width", type=int, default=896)
    parser.add_argument("--height", type=int, default=1152)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        print_result(run_mode(args.child, args))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run_modes(
        __file__,
        args.modes.split(","),
        child_args(args, "width", "height", "steps", "out"),
        args.out,
        on_row=lambda row: print(f"{row['mode']}: {row['dit_step_ms_median']:.1f} ms/step", flush=True),
    )
    add_errors(rows)
    device = rows[0]["device"] if rows else "-"  # CUDA stays unused in this process
    settings = {"modes": args.modes, "width": args.width, "height": args.height, "steps": args.steps}
    print(write_report(args.out, "bench", rows, meta(device, **settings), COLUMNS))


if __name__ == "__main__":
    main()
