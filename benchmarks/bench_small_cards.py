"""The whole app on a small card, from single files on disk: peak GPU memory, host RAM and speed.

For each configuration (the DiT and T5 file formats and a ``--vram_budget``), in fresh processes:

1. ``--write``: full-size random files are written to ``--files`` the way the published ones are
   laid out: the DiT as Kijai's fp8 e4m3fn file or as a city96 GGUF (types as
   ``tiny_random.single_files.city96_types`` assigns them), T5-XXL as ComfyUI's fp8 file or as a
   city96 GGUF (llama.cpp names), CLIP-L in ComfyUI's layout.
2. ``--child``: the files load through the product's loaders (``flux.loading.open_dit_file``,
   ``load_flow_model`` with ``single_file_format``; ``flux.text_encoders.load_t5_file`` and
   ``load_clip_file``) onto the host, as ``pulid.loading.load_pipeline`` does under a budget. The
   autoencoder, PuLID and EVA-CLIP (2.3 GiB together; their official files are not single-file
   choices) get random weights of the official sizes and dtypes, built on the host first. The
   face models are the stand-ins of ``tiny_random`` (facexlib on the GPU, insightface on CPU
   onnxruntime). ``pulid.loading.place_pipeline`` then places it all under the budget, and one
   warm-up image and one timed image (896x1152, ID on; eager, or with ``--compile`` the blocks
   compiled as the app's ``--compile`` does) are made.

Recorded: the process's CUDA context, the allocator's peak reserved and allocated bytes (the whole
app on the card is context + reserved), the host's peak RSS while loading and afterwards, RSS by
kind after placement, the median DiT step and the image time. Random weights say nothing about
image quality.

    python benchmarks/bench_small_cards.py --configs fp8-12,Q8_0-8 --files /tmp/files --out $OUT

Output: ``small_cards.json`` and ``small_cards.md`` in ``--out`` (rewritten after each
configuration), and each step's log, ``<config>-write.log`` and ``<config>-child.log``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (  # noqa: E402
    Column,
    GiB,
    StepTimer,
    astronaut,
    bench_request,
    child_args,
    init_random_,
    markdown_table,
    meta,
    print_result,
    run_child,
    write_report,
)

# name -> (DiT format, T5 format, VRAM budget GiB)
CONFIGS = {
    "fp8-12": ("fp8", "fp8", 12.0),
    "Q8_0-8": ("Q8_0", "Q8_0", 8.0),
    "Q5_K-8": ("Q5_K", "Q5_K", 8.0),
    "Q4_K-6": ("Q4_K", "Q4_K", 6.0),
}


def dit_path(files: Path, fmt: str) -> Path:
    return files / (f"flux1-dev-{fmt}.gguf" if fmt != "fp8" else "flux1-dev-fp8-e4m3fn.safetensors")


def t5_path(files: Path, fmt: str) -> Path:
    return files / (f"t5-v1_1-xxl-encoder-{fmt}.gguf" if fmt != "fp8" else "t5xxl_fp8_e4m3fn.safetensors")


def write_files(config: str, files: Path) -> dict:
    """The configuration's DiT, T5 and CLIP files (random weights; the tokenizers are tiny ones)."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from flux.loading import build_flow_model
    from flux.quant import fp8_linear_names
    from flux.registry import flux_dev_params
    from flux.text_encoders import CLIP_L_TEXT_CONFIG, T5_XXL_CONFIG
    from tiny_random.models import tiny_clip_tokenizer, tiny_t5_tokenizer
    from tiny_random.single_files import city96_types, fp8_state, llama_cpp_t5_state, write_gguf

    dit_fmt, t5_fmt, _ = CONFIGS[config]
    files.mkdir(parents=True, exist_ok=True)
    seconds = {}
    start = time.perf_counter()
    dit = build_flow_model(flux_dev_params(), "meta", torch.bfloat16).to_empty(device="cuda")
    init_random_(dit, 0)
    state = dit.state_dict()
    if dit_fmt == "fp8":
        keys = {f"{name}.weight" for name in fp8_linear_names(dit)}
        save_file({k: v.cpu() for k, v in fp8_state(state, keys).items()}, dit_path(files, dit_fmt))
    else:
        write_gguf(dit_path(files, dit_fmt), state, city96_types(state, dit_fmt))
    del dit, state
    torch.cuda.empty_cache()
    seconds["dit"] = time.perf_counter() - start

    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):
        t5 = T5EncoderModel._from_config(T5Config(**T5_XXL_CONFIG), dtype=torch.bfloat16)
    state = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    if t5_fmt == "fp8":
        linears = {
            k
            for k, v in state.items()
            if v.dim() == 2 and "relative_attention_bias" not in k and k != "shared.weight"
        }
        save_file({k: v.cpu() for k, v in fp8_state(state, linears).items()}, t5_path(files, t5_fmt))
    else:
        named = llama_cpp_t5_state(state)
        types = {k: (t5_fmt if v.dim() == 2 and "attn_rel_b" not in k else "F32") for k, v in named.items()}
        write_gguf(t5_path(files, t5_fmt), named, types, architecture="t5encoder")
    del t5, state
    seconds["t5"] = time.perf_counter() - start

    clip_file = files / "clip_l.safetensors"
    if not clip_file.exists():
        clip = CLIPTextModel._from_config(CLIPTextConfig(**CLIP_L_TEXT_CONFIG), dtype=torch.float16)
        stored = {
            (k if k.startswith("text_model.") else f"text_model.{k}"): v.contiguous()
            for k, v in clip.state_dict().items()
        }
        save_file(stored, clip_file)
        tiny_t5_tokenizer().save_pretrained(files / "t5-tokenizer")
        tiny_clip_tokenizer().save_pretrained(files / "clip-tokenizer")
    sizes = {p.name: p.stat().st_size / GiB for p in (dit_path(files, dit_fmt), t5_path(files, t5_fmt))}
    return {"write_s": seconds, "file_gib": sizes}


def rss(field: str = "VmRSS") -> float:
    """A line of /proc/self/status in GiB (VmRSS, VmHWM, RssAnon, RssFile, RssShmem)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


class AnonPeak:
    """The peak of the process's anonymous RSS (what the page cache cannot take back), sampled."""

    def __init__(self, every_s: float = 0.05):
        import threading

        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.peak = max(self.peak, rss("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss("RssAnon"))
        return self.peak


def run_config(config: str, files: Path, steps: int, compiled: bool = False) -> dict:
    import numpy as np
    import torch

    from eva_clip.model import EvaVisionTower
    from flux.autoencoder import AutoEncoder
    from flux.loading import load_flow_model, open_dit_file, single_file_format
    from flux.offload import MemoryPolicy
    from flux.registry import MODELS
    from flux.text_encoders import load_clip_file, load_t5_file
    from pulid.assembly import PipelineModels, assemble_pipeline
    from pulid.encoders import PuLIDWeights
    from pulid.face_analysis import load_face_analyzer
    from pulid.loading import place_pipeline
    from tiny_random.pipeline import tiny_face_model_paths

    dit_fmt, t5_fmt, budget = CONFIGS[config]
    spec, dtype = MODELS["flux-dev"], torch.bfloat16
    torch.zeros(1, device="cuda")
    free, total = torch.cuda.mem_get_info()
    context = total - free - torch.cuda.memory_reserved()
    start_rss = rss()
    anon = AnonPeak()
    t0 = time.perf_counter()
    # The random parts first, so that their float32 construction is gone before the files load.
    eva, pulid, ae = (
        EvaVisionTower(device="cpu").to(dtype),
        PuLIDWeights().to(dtype),
        AutoEncoder(spec.ae_params),
    )
    for seed, module in enumerate((pulid, eva, ae), start=1):
        init_random_(module, seed)
        module.eval().requires_grad_(False)
    face = load_face_analyzer(tiny_face_model_paths(files / "face-models"), "cpu", "cuda")
    t1 = time.perf_counter()
    t5 = load_t5_file(t5_path(files, t5_fmt), files / "t5-tokenizer", "cpu", dtype, max_length=512)
    clip = load_clip_file(files / "clip_l.safetensors", files / "clip-tokenizer", "cpu", dtype)
    dit_file = open_dit_file(dit_path(files, dit_fmt))
    dit = load_flow_model(dit_file, spec.params, "cpu", dtype, fmt=single_file_format(dit_file, "cuda"))
    load_s = time.perf_counter() - t1
    loaded_rss = rss()
    models = PipelineModels(ae, dit, t5, clip, pulid, eva, face)
    pipeline = assemble_pipeline(models, "cuda", dtype, lora_slots=True)
    if compiled:  # as pulid.loading does: before the placement, after the LoRA slots
        from flux.compile import compile_blocks, compile_repeated_blocks

        compile_repeated_blocks(dit)
        compile_blocks(pulid.pulid_ca)
    place_pipeline(pipeline, MemoryPolicy(vram_budget_gb=budget))
    ready_s = time.perf_counter() - t0
    anon_peak_loading = anon.stop()
    anon = AnonPeak()
    placed = {k: rss(k) for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem")}
    photo = astronaut()
    request = bench_request(id_images=[photo], num_steps=steps)
    pipeline.generate(dataclasses.replace(request, num_steps=1))
    pipeline.id_encoder.forget()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    timer = StepTimer("cuda")
    wall = time.perf_counter()
    result = pipeline.generate(
        dataclasses.replace(request, id_images=[np.roll(photo, 5, axis=1)]), callback=timer
    )
    torch.cuda.synchronize()
    image_s = time.perf_counter() - wall
    reserved = torch.cuda.max_memory_reserved()
    return {
        "config": config,
        "dit": dit_fmt,
        "t5": t5_fmt,
        "budget_gib": budget,
        "plan": str(pipeline.placement.plan),
        "cuda_context_gib": context / GiB,
        "peak_reserved_gib": reserved / GiB,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
        "whole_app_gpu_gib": (context + reserved) / GiB,
        "rss_at_start_gib": start_rss,
        "rss_after_loading_gib": loaded_rss,
        "rss_after_placing": placed,
        "rss_after_image_gib": rss(),
        "peak_rss_gib": rss("VmHWM"),
        "peak_anon_loading_gib": anon_peak_loading,
        "peak_anon_running_gib": anon.stop(),
        "load_files_s": load_s,
        "ready_s": ready_s,
        "steps": steps,
        "compiled": compiled,
        "dit_step_ms_median": timer.median_ms,
        "image_s": image_s,
        "id_stage_s": result.timings["id_embedding_s"],
        "text_stage_s": result.timings["text_encoding_s"],
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }


COLUMNS = (
    Column("DiT / T5 files", lambda r: f"{r['dit']} / {r['t5']}"),
    Column("budget", "budget_gib", "{:g} GiB"),
    Column(
        "whole app on the GPU (context + reserved)",
        lambda r: (r["whole_app_gpu_gib"], r["cuda_context_gib"], r["peak_reserved_gib"]),
        lambda v: f"{v[0]:.2f} GiB ({v[1]:.2f} + {v[2]:.2f})",
    ),
    Column("peak allocated", "peak_allocated_gib", "{:.2f} GiB"),
    Column(
        "host RSS peak / after placing",
        lambda r: (r["peak_rss_gib"], r["rss_after_placing"]["VmRSS"]),
        lambda v: f"{v[0]:.1f} / {v[1]:.1f} GiB",
    ),
    Column(
        "anon RSS peak: loading / running",
        lambda r: (r["peak_anon_loading_gib"], r["peak_anon_running_gib"]),
        lambda v: f"{v[0]:.1f} / {v[1]:.1f} GiB",
    ),
    Column(
        "DiT step",
        lambda r: (r["dit_step_ms_median"], r.get("compiled")),
        lambda v: f"{v[0]:.0f} ms{' compiled' if v[1] else ''}",
    ),
    Column("image", lambda r: (r["image_s"], r["steps"]), lambda v: f"{v[0]:.1f} s ({v[1]} steps)"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--files", type=Path, default=Path("/tmp/small-card-files"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="compile the repeated blocks, as --compile")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "small-cards-out")))
    parser.add_argument("--child", default=None)
    parser.add_argument("--write", default=None)
    args = parser.parse_args()
    if args.write:
        print_result(write_files(args.write, args.files))
        return
    if args.child:
        print_result(run_config(args.child, args.files, args.steps, args.compile))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    from tiny_random.pipeline import tiny_face_model_paths

    tiny_face_model_paths(args.files / "face-models")
    # The app's allocator setting, whatever this shell has: the GPU figures are the app's.
    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    passed_on = child_args(args, "files", "steps", "compile")
    rows = []
    for config in args.configs.split(","):
        found = {}
        for step in ("--write", "--child"):
            log = args.out / f"{config}{step.replace('--', '-')}.log"
            run = run_child(__file__, config, passed_on, log, flag=step, env=env)
            if run.failed:
                print(f"{config} {step} failed (rc {run.returncode}):\n{run.stderr_tail}", flush=True)
                break
            found.update(run.row)
        dit_fmt, t5_fmt, _ = CONFIGS[config]
        for path in (dit_path(args.files, dit_fmt), t5_path(args.files, t5_fmt)):
            path.unlink(missing_ok=True)
        if "config" in found:
            rows.append(found)
            print(json.dumps({k: v for k, v in found.items() if k != "plan"}), flush=True)
            # The children's device: CUDA stays unused here, out of the next child's figures.
            report = meta(rows[0]["device"], steps=args.steps, compiled=args.compile, configs=args.configs)
            write_report(args.out, "small_cards", rows, report, COLUMNS)
    shutil.rmtree(args.files, ignore_errors=True)
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
