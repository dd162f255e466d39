"""Measure offloading on a CUDA GPU: copy bandwidth, streaming overlap, activation peaks.

``python benchmarks/bench_offload.py`` builds a shortened full-width FLUX DiT with random bf16 weights
(no download) and prints one JSON line per measurement. It is how the defaults of
stage reserves of :data:`pulid.pipeline.STAGES` and the claims in the package docstrings were checked.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import GiB
from flux.autoencoder import AutoEncoder
from flux.model import Flux
from flux.offload.blocks import StreamedBlocks, choose_resident
from flux.offload.layout import FlatLayout
from flux.offload.transfer import CudaTransfer
from flux.registry import MODELS
from flux.repeated import block_modules
from flux.sampling import image_ids, text_ids


def report(**values) -> None:
    print(json.dumps(values), flush=True)


def timed(fn, repeat: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def copy_bandwidth(nbytes: int) -> None:
    """Host-to-device GiB/s from pageable, allocator-pinned and registered memory."""
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    transfer = CudaTransfer("cuda")
    sources = {
        "pageable": torch.ones(nbytes, dtype=torch.uint8),
        "pin_memory": torch.ones(nbytes, dtype=torch.uint8, pin_memory=True),
        "registered": transfer.host_buffer(nbytes),
    }
    for name, host in sources.items():
        seconds = timed(lambda host=host: device.copy_(host, non_blocking=True))
        report(measure="h2d_bandwidth", source=name, gib_per_s=round(nbytes / seconds / GiB, 1))
    transfer.free_host_buffer(sources["registered"])


def dit_inputs(width: int, height: int, txt_len: int = 512) -> dict:
    params = MODELS["flux-dev"].params
    h, w = height // 16, width // 16
    dtype = torch.bfloat16
    return dict(
        img=torch.randn(1, h * w, params.in_channels, device="cuda", dtype=dtype),
        img_ids=image_ids(1, h * 2, w * 2, "cuda").to(dtype),
        txt=torch.randn(1, txt_len, params.context_in_dim, device="cuda", dtype=dtype),
        txt_ids=text_ids(1, txt_len, "cuda").to(dtype),
        timesteps=torch.full((1,), 0.5, device="cuda", dtype=dtype),
        y=torch.randn(1, params.vec_in_dim, device="cuda", dtype=dtype),
        guidance=torch.full((1,), 3.5, device="cuda", dtype=dtype),
    )


def streaming(depth: int, single: int, sizes: tuple[int, int]) -> None:
    """Pass time resident vs streamed under several budgets, and the exactness of the output."""
    params = MODELS["flux-dev"].params
    params = type(params)(**{**vars(params), "depth": depth, "depth_single_blocks": single})
    with torch.device("cuda"):
        flow = Flux(params).to(torch.bfloat16).eval().requires_grad_(False)
    inputs = dit_inputs(*sizes)
    blocks = block_modules(flow)
    block_bytes = [FlatLayout(b).nbytes for b in blocks]
    with torch.inference_mode():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        expected = flow(**inputs)
        resident_s = timed(lambda: flow(**inputs))
        activation = torch.cuda.max_memory_allocated() - base
        report(measure="dit_activation_peak", size=sizes, gib=round(activation / GiB, 2))
        report(measure="pass_time", mode="resident", blocks=len(blocks), s=round(resident_s, 4))
        for module in blocks:
            module.cpu()
        torch.cuda.synchronize()
        for share in (0.0, 0.5, 0.8):
            capacity = int(share * sum(block_bytes)) + 2 * max(block_bytes)
            resident = choose_resident(block_bytes, capacity)
            base = torch.cuda.memory_allocated()
            with StreamedBlocks(blocks, "cuda", capacity) as streamer:
                setup = torch.cuda.memory_allocated() - base
                torch.cuda.reset_peak_memory_stats()
                same = all(torch.equal(flow(**inputs), expected) for _ in range(4))
                seconds = timed(lambda: flow(**inputs))
                streamed_bytes = sum(block_bytes[i] for i in streamer.streamed)
                report(
                    measure="pass_time",
                    mode="streamed",
                    resident_blocks=len(resident),
                    streamed_gib=round(streamed_bytes / GiB, 2),
                    s=round(seconds, 4),
                    copy_only_s=round(streamed_bytes / (47 * GiB), 4),
                    resident_s=round(resident_s, 4),
                    exact=same,
                    device_bytes_counted=streamer.device_bytes,
                    device_bytes_allocated=setup,
                    peak_over_counted_gib=round(
                        (torch.cuda.max_memory_allocated() - base - streamer.device_bytes) / GiB, 2
                    ),
                )
            torch.cuda.synchronize()


def decode_peak(sizes: tuple[int, int]) -> None:
    """Activation peak of the autoencoder decode (float32 weights, bf16 autocast, as the pipeline)."""
    with torch.device("cuda"):
        ae = AutoEncoder(MODELS["flux-dev"].ae_params).eval().requires_grad_(False)
    z = torch.randn(1, 16, sizes[1] // 8, sizes[0] // 8, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ae.decode(z)
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    report(measure="decode_activation_peak", size=sizes, gib=round(peak / GiB, 2))
    del ae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--depth", type=int, default=4, help="double blocks of the shortened DiT")
    parser.add_argument("--single", type=int, default=8, help="single blocks of the shortened DiT")
    parser.add_argument("--parts", default="bandwidth,decode,streaming", help="comma-separated")
    parser.add_argument("--sides", default="1024,1536", help="square image sizes, comma-separated")
    args = parser.parse_args()
    parts = args.parts.split(",")
    sides = [int(side) for side in args.sides.split(",")]
    if "bandwidth" in parts:
        copy_bandwidth(FlatLayout(block_modules(_meta_flux())[0]).nbytes)
    for side in sides:
        if "decode" in parts:
            decode_peak((side, side))
        if "streaming" in parts:
            streaming(args.depth, args.single, (side, side))
    free, total = torch.cuda.mem_get_info()
    report(measure="context_overhead", gib=round((total - free - torch.cuda.memory_reserved()) / GiB, 2))


def _meta_flux() -> Flux:
    with torch.device("meta"):
        return Flux(MODELS["flux-dev"].params)


if __name__ == "__main__":
    main()
