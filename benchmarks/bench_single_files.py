"""Single-file DiT formats on the GPU: step time, memory and error of fp8 files and GGUF Q8_0/Q5_K/Q4_K.

The full-size FLUX.1-dev DiT gets random weights (``benchmarks.harness.init_random_``) in bf16. Each format
is made from those weights as the published files are (fp8: a direct e4m3fn cast of every block
Linear, as Kijai's file; GGUF: city96's type assignment, quantised by ``tiny_random.ggml_quant``'s
plain rule, a little worse than llama.cpp's) and loaded through the product's one loading loop
(:func:`flux.checkpoint.load_checkpoint_strict` with the format :func:`flux.loading.single_file_format`
picks), from memory instead of a file. Per format:

- the DiT's weight bytes and the step's activation peak (the bf16 reference stays on the GPU for
  the errors, so whole-process peaks would not be the format's);
- the median DiT step, eager (``--group eager``) or with the repeated blocks compiled (``compiled``);
- the relative error of one forward against the bf16 forward on the same inputs;
- with the blocks streamed through a budget (``budget``: 4 GiB of resident blocks), the step time.

``--group t5`` measures the T5-XXL prompt-embedding error of the fp8 and GGUF text encoders against
bf16 (random weights, two 512-token prompts). Random weights say nothing about image quality.

    python benchmarks/bench_single_files.py --group eager --out $OUT

Output: ``single-files-<group>.json`` and ``single-files-<group>.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import Column, GiB, init_random_, meta, write_report  # noqa: E402

FORMATS = ("bf16", "fp8-file", "Q8_0", "Q5_K", "Q4_K")
COLUMNS = (
    Column("format", "format"),
    Column("weights (GiB)", "weights_gib", "{:.2f}"),
    Column("rel. error vs bf16", "rel_err_vs_bf16", "{:.2e}"),
    Column("DiT step (ms)", "step_ms", "{:.1f}"),
    Column("activation peak (GiB)", "activation_peak_gib", "{:.2f}"),
    Column("peak above resident (GiB)", "peak_above_resident_gib", "{:.2f}"),
    Column(
        "resident / streamed blocks",
        lambda r: (r["resident_blocks"], r["streamed_blocks"]),
        "{0[0]} / {0[1]}",
    ),
    Column("compile (s)", "compile_s", "{:.1f}"),
    Column("load (s)", "build_s", "{:.1f}"),
)


class MemoryFile:
    """A checkpoint held in memory, shaped like the loader's files (header, tensor, close)."""

    def __init__(self, kind: str, header: dict, tensors: dict):
        self.kind, self.header, self.tensors, self.path = kind, header, tensors, Path(f"<memory {kind}>")

    def tensor(self, key, device="cpu"):
        return self.tensors[key]

    def close(self):
        pass


def make_file(state: dict, fmt: str) -> MemoryFile:
    import torch

    from flux.loading import build_flow_model
    from flux.quant import fp8_linear_names
    from flux.registry import flux_dev_params
    from tiny_random.ggml_quant import quantize
    from tiny_random.single_files import city96_types

    if fmt == "fp8-file":
        kept = {f"{n}.weight" for n in fp8_linear_names(build_flow_model(flux_dev_params(), "meta"))}
        tensors = {k: (v.to(torch.float8_e4m3fn) if k in kept else v) for k, v in state.items()}
        header = {k: (tuple(v.shape), "F8_E4M3" if k in kept else "BF16") for k, v in tensors.items()}
        return MemoryFile("safetensors", header, tensors)
    types = city96_types(state, fmt)
    tensors, header = {}, {}
    for key, value in state.items():
        kind = types[key]
        if kind in ("F16", "F32"):
            tensors[key] = value.to(torch.float16 if kind == "F16" else torch.float32)
        else:
            tensors[key] = quantize(value, kind)
        header[key] = (tuple(value.shape), kind)
    return MemoryFile("gguf", header, tensors)


def load_format(state: dict, fmt: str, device: str):
    import torch

    from flux.loading import build_flow_model, single_file_format
    from flux.registry import flux_dev_params
    from flux.strict_load import load_checkpoint_strict

    model = build_flow_model(flux_dev_params(), "meta", torch.bfloat16)
    if fmt == "bf16":
        model.load_state_dict(state, assign=True)
        return model.eval().requires_grad_(False)
    file = make_file(state, fmt)
    load_checkpoint_strict(
        model, file, device=device, dtype=torch.bfloat16, fmt=single_file_format(file, device)
    )
    return model.eval().requires_grad_(False)


def inputs_for(device: str, seed: int = 0):
    import torch

    from flux.registry import flux_dev_params
    from flux.sampling import image_ids, pack, text_ids

    params = flux_dev_params()
    g = torch.Generator(device=device).manual_seed(seed)
    h, w = 1152 // 8, 896 // 8
    latents = torch.randn(1, 16, h, w, generator=g, device=device, dtype=torch.bfloat16)
    return dict(
        img=pack(latents),
        img_ids=image_ids(1, h, w).to(device),
        txt=torch.randn(1, 128, params.context_in_dim, generator=g, device=device, dtype=torch.bfloat16),
        txt_ids=text_ids(1, 128).to(device),
        timesteps=torch.full((1,), 0.7, device=device, dtype=torch.bfloat16),
        y=torch.randn(1, params.vec_in_dim, generator=g, device=device, dtype=torch.bfloat16),
        guidance=torch.full((1,), 4.0, device=device, dtype=torch.bfloat16),
    )


def time_steps(model, inputs, torch, n: int = 6) -> tuple[float, float]:
    """Median step (ms) and the step's peak above the memory already allocated (activations), GiB."""
    times = []
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for _ in range(n + 2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(**inputs)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1000, (torch.cuda.max_memory_allocated() - before) / GiB


def weight_bytes(model) -> int:
    from flux.offload.layout import tensor_bytes

    return tensor_bytes([model])


def run_dit(group: str) -> list[dict]:
    import torch

    from flux.loading import build_flow_model
    from flux.registry import flux_dev_params
    from flux.repeated import block_modules

    device = "cuda"
    reference = build_flow_model(flux_dev_params(), device, torch.bfloat16)
    init_random_(reference, 0)
    reference.eval().requires_grad_(False)
    inputs = inputs_for(device)
    with torch.no_grad():
        expected = reference(**inputs).float()
    state = {k: v for k, v in reference.state_dict().items()}
    rows = []
    for fmt in FORMATS:
        start = time.perf_counter()
        model = load_format(state, fmt, device)
        build_s = time.perf_counter() - start
        row = {"format": fmt, "weights_gib": weight_bytes(model) / GiB, "build_s": build_s}
        with torch.no_grad():
            out = model(**inputs).float()
        row["rel_err_vs_bf16"] = ((out - expected).norm() / expected.norm()).item()
        if group == "compiled":
            from flux.compile import compile_repeated_blocks

            torch._dynamo.reset()
            compile_repeated_blocks(model)
            start = time.perf_counter()
            with torch.no_grad():
                model(**inputs)
            torch.cuda.synchronize()
            row["compile_s"] = time.perf_counter() - start
        if group in ("eager", "compiled"):
            row["step_ms"], row["activation_peak_gib"] = time_steps(model, inputs, torch)
        if group == "budget":
            from flux.offload import StreamedBlocks

            blocks = block_modules(model)
            for block in blocks:
                block.to("cpu")
            torch.cuda.empty_cache()
            streamer = StreamedBlocks(blocks, device, 4 * GiB)
            with streamer:
                row["step_ms"], row["peak_above_resident_gib"] = time_steps(model, inputs, torch, n=3)
                row["resident_blocks"] = len(streamer.resident)
                row["streamed_blocks"] = len(streamer.streamed)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if fmt != "bf16":
            del model
        torch.cuda.empty_cache()
    return rows


def run_t5() -> list[dict]:
    import torch
    from transformers import T5Config, T5EncoderModel

    from flux.strict_load import load_checkpoint_strict
    from flux.text_encoders import T5_TIED, T5_XXL_CONFIG, encoder_file_format
    from tiny_random.ggml_quant import quantize

    device = "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        reference = T5EncoderModel(T5Config(**T5_XXL_CONFIG)).to(torch.bfloat16).eval()
    ids = torch.randint(0, 32128, (2, 512), device=device)
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state.float()
    state = {k: v for k, v in reference.state_dict().items() if k != "encoder.embed_tokens.weight"}
    rows = []
    for fmt in ("fp8-file", "Q8_0", "Q5_K", "Q4_K"):
        with torch.device("meta"):
            model = T5EncoderModel(T5Config(**T5_XXL_CONFIG)).to(torch.bfloat16)
        if fmt == "fp8-file":
            header = {
                k: (tuple(v.shape), "F8_E4M3" if v.dim() == 2 and "relative" not in k else "BF16")
                for k, v in state.items()
            }
            tensors = {
                k: (v.to(torch.float8_e4m3fn) if header[k][1] == "F8_E4M3" else v) for k, v in state.items()
            }
            file = MemoryFile("safetensors", header, tensors)
        else:
            header, tensors = {}, {}
            for k, v in state.items():
                quantised = v.dim() == 2 and "relative" not in k
                header[k] = (tuple(v.shape), fmt if quantised else "F32")
                tensors[k] = quantize(v, fmt) if quantised else v.float()
            file = MemoryFile("gguf", header, tensors)
        load_checkpoint_strict(
            model, file, device=device, dtype=torch.bfloat16, fmt=encoder_file_format(file), tied=T5_TIED
        )
        model.encoder.embed_tokens.weight = model.shared.weight
        model.eval()  # built on the meta device in training mode: dropout would be on
        with torch.no_grad():
            out = model(input_ids=ids).last_hidden_state.float()
        weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        rows.append(
            {
                "format": fmt,
                "rel_err_vs_bf16": ((out - expected).norm() / expected.norm()).item(),
                "weights_gib": weights / GiB,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del model
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", choices=("eager", "compiled", "budget", "t5"), default="eager")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    rows = run_t5() if args.group == "t5" else run_dit(args.group)
    print(write_report(args.out, f"single-files-{args.group}", rows, meta(group=args.group), COLUMNS))


if __name__ == "__main__":
    main()
