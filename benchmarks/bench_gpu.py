"""Time the whole PuLID-FLUX stack on a GPU, per stage and per memory mode, with random weights.

Builds full-size T5-XXL, CLIP-L, the FLUX.1-dev DiT with the 20 PuLID cross-attention blocks, the
AE, EVA02-CLIP-L and the IDFormer with random weights (no download), and the face models as the
stand-ins of ``tiny_random.face_models`` (the real facexlib code on the GPU, as the app places it,
and insightface on CPU onnxruntime; runs before 2026-11-30 had facexlib on the CPU too).
Each mode runs in its own subprocess so that its peak GPU and CPU memory are its own. Output:
``bench.json`` and ``bench.md`` in ``--out``, and the table on stdout.

    python benchmarks/bench_gpu.py --modes resident,compiled --out /tmp/bench

Per mode it records: text encoding, ID embedding, the median DiT step (ID on, distilled guidance),
decoding, the whole image (``--steps`` steps, 28 by default), peak GPU memory (allocated and
reserved) and peak CPU RSS. A one-step latent comparison against the resident bf16 mode gives each
mode's relative error.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GiB = 2**30
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
# memory-placement modes: (fp8, compile, vram budget GiB, offload, aggressive)
PLACED = {
    "offload": (False, False, None, True, False),
    "budget24": (False, False, 24.0, False, False),
    "budget16": (False, False, 16.0, False, False),
    "aggressive": (False, False, None, False, True),
    "fp8-budget12": (True, True, 12.0, False, False),
    "fp8-budget12-eager": (True, False, 12.0, False, False),
    "compiled-budget24": (False, True, 24.0, False, False),
}


def init_random_(module, seed: int) -> None:
    """Scaled random weights (std 1/sqrt(fan_in)), unit norms, zero biases: finite activations."""
    import torch

    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5 if p.ndim == 2 else 0.02, generator=gen)
            elif "norm" in name or name.endswith("scale") or name.endswith(".weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def build_stack(device: str, dtype, folder: Path):
    """The full-size pipeline with random weights, resident on ``device``."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from eva_clip.model import EvaVisionTower
    from flux.autoencoder import AutoEncoder
    from flux.loading import build_flow_model
    from flux.registry import MODELS
    from flux.text_encoders import CLIP_L_TEXT_CONFIG, CLIP_MAX_LENGTH, T5_XXL_CONFIG, HFEmbedder
    from pulid.assembly import PipelineModels, assemble_pipeline
    from pulid.encoders import PuLIDWeights
    from pulid.face_analysis import load_face_analyzer
    from tiny_random.models import tiny_clip_tokenizer, tiny_t5_tokenizer
    from tiny_random.pipeline import tiny_face_model_paths

    spec = MODELS["flux-dev"]
    torch.manual_seed(1234)  # every mode's subprocess builds the very same random models
    with torch.device(device):
        t5_model = T5EncoderModel._from_config(T5Config(**T5_XXL_CONFIG), dtype=dtype)
        clip_model = CLIPTextModel._from_config(CLIPTextConfig(**CLIP_L_TEXT_CONFIG), dtype=dtype)
        ae = AutoEncoder(spec.ae_params)
        pulid = PuLIDWeights().to(dtype)
        eva = EvaVisionTower(device=device).to(dtype)
    dit = build_flow_model(spec.params, "meta", dtype).to_empty(device=device)
    init_random_(dit, 0)
    init_random_(pulid, 1)
    t5 = HFEmbedder(t5_model, tiny_t5_tokenizer(), 512, "last_hidden_state")
    clip = HFEmbedder(clip_model, tiny_clip_tokenizer(), CLIP_MAX_LENGTH, "pooler_output")
    # facexlib on the GPU as the app puts it; insightface on CPU onnxruntime (no onnxruntime-gpu here)
    face = load_face_analyzer(tiny_face_model_paths(folder / "models"), "cpu", device)
    models = PipelineModels(ae.eval(), dit.eval(), t5, clip, pulid.eval(), eva.eval(), face)
    return assemble_pipeline(models, device, dtype, info={"model": "flux-dev (random weights)"})


def apply_mode(pipeline, mode: str) -> None:
    """Turn the resident bf16 stack into ``mode`` (the way pulid.loading does for real weights)."""
    from flux.compile import compile_blocks, compile_repeated_blocks

    if mode in PLACED:
        from flux.offload import MemoryPolicy
        from pulid.loading import place_pipeline

        fp8, compiled, budget, offload, aggressive = PLACED[mode]
        if fp8:
            from flux.quant import quantize_linears_to_fp8

            quantize_linears_to_fp8(pipeline.dit)
        for module in (
            pipeline.dit,
            pipeline.t5,
            pipeline.clip,
            pipeline.ae,
            pipeline.pulid_ca,
            pipeline.id_encoder.eva,
            pipeline.id_encoder.id_former,
        ):
            module.to("cpu")
        import torch

        torch.cuda.empty_cache()
        policy = MemoryPolicy(vram_budget_gb=budget, offload=offload or aggressive, aggressive=aggressive)
        place_pipeline(pipeline, policy)
        print(str(pipeline.placement.plan), flush=True)
        if compiled:
            compile_repeated_blocks(pipeline.dit)
            compile_blocks(pipeline.pulid_ca)
        return
    if mode == "quanto":  # the XLabs checkpoint's layout: every Linear qfloat8 through optimum-quanto
        from flux.quant import xlabs_quantization_map
        from flux.quant.quanto_compat import quantize_as_mapped

        quantize_as_mapped(pipeline.dit, xlabs_quantization_map(pipeline.dit), "benchmark")
        return
    if mode.startswith("fp8"):
        from flux.quant import quantize_linears_to_fp8

        quantize_linears_to_fp8(pipeline.dit)
    if mode == "fp8-whole":  # one graph for the whole DiT forward, ID injection included
        pipeline.dit.compile(dynamic=False)
    if mode in ("compiled", "fp8"):
        compile_repeated_blocks(pipeline.dit)
        compile_blocks(pipeline.pulid_ca)


def one_forward(pipeline, request):
    """One DiT prediction with the ID on, from fixed inputs: what the modes' errors are measured on."""
    import torch

    from flux.sampling import get_noise, image_ids, pack
    from pulid.injection import Identity

    with torch.inference_mode():
        noise = get_noise(1, request.height, request.width, "cuda", torch.bfloat16, seed=7)
        cond = pipeline.encode_prompt(request.prompt, 128)
        tokens = pipeline.id_encoder(request.id_images).tokens
        pred = pipeline.dit(
            img=pack(noise),
            img_ids=image_ids(1, noise.shape[-2], noise.shape[-1], "cuda"),
            txt=cond.txt,
            txt_ids=cond.txt_ids,
            y=cond.vec,
            timesteps=torch.full((1,), 0.7, device="cuda", dtype=torch.bfloat16),
            guidance=torch.full((1,), 4.0, device="cuda", dtype=torch.bfloat16),
            id_injection=pipeline.injection([Identity(tokens, 1.0)]),
        )
    return pred.float().cpu()


def run_mode(mode: str, args) -> dict:
    import numpy as np
    import torch
    from skimage import data as skimage_data

    from pulid.request import GenerationRequest

    torch.backends.cuda.matmul.allow_tf32 = True
    if mode == "fp8-cdt":  # inductor's coordinate-descent tuning of the generated kernels
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    if mode.endswith("-cudnn"):  # attention through cuDNN's fused kernel instead of flash/efficient
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(True)
        mode_base = mode.removesuffix("-cudnn")
    else:
        mode_base = {"fp8-cdt": "fp8"}.get(mode, mode)
    device, dtype = "cuda", torch.bfloat16
    folder = Path(tempfile.mkdtemp(prefix="bench-"))
    t0 = time.perf_counter()
    pipeline = build_stack(device, dtype, folder)
    build_s = time.perf_counter() - t0
    apply_mode(pipeline, mode_base)
    photo = skimage_data.astronaut()
    request = GenerationRequest(
        prompt="portrait, color, cinematic",
        id_images=[photo],
        width=args.width,
        height=args.height,
        num_steps=args.steps,
        seed=42,
        max_sequence_length=128,
    )

    events: list = []

    def on_step(info) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        events.append(event)

    # Warm-up: compiles, autotunes, fills the ID cache; then time a fresh image (ID cache cleared).
    warm = GenerationRequest(**{**request.__dict__, "num_steps": 3})
    pipeline.generate(warm)
    pipeline.id_encoder._cache.clear()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    events.clear()
    start = torch.cuda.Event(enable_timing=True)
    start.record()
    wall0 = time.perf_counter()
    result = pipeline.generate(request, callback=on_step)
    torch.cuda.synchronize()
    whole_s = time.perf_counter() - wall0
    steps_ms = [a.elapsed_time(b) for a, b in zip(events[:-1], events[1:], strict=False)]

    # One DiT forward from fixed inputs, for the error against resident bf16.
    latents_path = folder / "one_step.pt"
    torch.save(one_forward(pipeline, request), latents_path)
    return {
        "mode": mode,
        "build_s": build_s,
        "text_encoding_s": result.timings["text_encoding_s"],
        "id_embedding_s": result.timings["id_embedding_s"],
        "dit_step_ms_median": statistics.median(steps_ms),
        "dit_step_ms_min": min(steps_ms),
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


def table(rows: list[dict]) -> str:
    lines = [
        "| mode | DiT step (ms, median) | whole image (s) | text (s) | ID (s) | decode (s) "
        "| peak GPU alloc / reserved (GiB) | peak CPU RSS (GiB) | one-forward rel. err. vs resident bf16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = r.get("rel_err_vs_resident")
        lines.append(
            f"| {r['mode']} | {r['dit_step_ms_median']:.1f} | {r['whole_image_s']:.2f} | "
            f"{r['text_encoding_s']:.3f} | {r['id_embedding_s']:.3f} | {r['decode_s']:.3f} | "
            f"{r['peak_gpu_allocated_gib']:.1f} / "
            f"{r['peak_gpu_reserved_gib']:.1f} | {r['peak_cpu_rss_gib']:.1f} | "
            f"{'-' if err is None else f'{err:.4f}'} |"
        )
    return "\n".join(lines)


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
        print("RESULT " + json.dumps(run_mode(args.child, args)), flush=True)
        return
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in args.modes.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--width",
            str(args.width),
            "--height",
            str(args.height),
            "--steps",
            str(args.steps),
            "--out",
            str(args.out),
        ]
        # As the app does: expandable segments keep the allocator's reserve close to what is allocated.
        env = {
            **os.environ,
            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
        }
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        (args.out / f"{mode}.log").write_text(proc.stdout[-20000:] + "\n" + proc.stderr[-20000:])
        results = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not results:
            print(f"mode {mode} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
            continue
        rows.append(json.loads(results[0]))
        print(f"{mode}: {rows[-1]['dit_step_ms_median']:.1f} ms/step", flush=True)
    reference = next((r for r in rows if r["mode"] == "resident"), None)
    if reference is not None:
        ref = torch.load(reference["one_step_latents"], weights_only=True)
        for r in rows:
            lat = torch.load(r["one_step_latents"], weights_only=True)
            r["rel_err_vs_resident"] = ((lat - ref).norm() / ref.norm()).item()
    (args.out / "bench.json").write_text(json.dumps(rows, indent=2))
    md = table(rows)
    (args.out / "bench.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
