"""Time decoding (latents -> PIL image) against the official app's arithmetic, and check they agree.

Builds the full-size FLUX autoencoder with random float32 weights on the GPU and decodes the same
random latents three ways, each from packed latents to a PIL image (the host copy included):

- ``ours``: :meth:`pulid.pipeline.PuLIDFluxPipeline.decode` (bf16 autocast, contiguous q/k/v in
  the attention, uint8 conversion on the device in the decoder's dtype);
- ``official``: the official app's arithmetic (``tests/test_official_parity.py``: einops rearranges,
  ``.contiguous()`` q/k/v, clamp and ``127.5 * (x + 1)`` in bf16, ``.cpu().byte()``);
- ``previous``: this project before the parity fix (strided q/k/v, conversion in float32).

    python benchmarks/bench_decode.py --out $OUT        # 896x1152, 20 timed decodes each

Reports the median wall time of each (after warm-up, synchronised), the ratio to the official
one, and whether each image equals the official image bit for bit, in ``decode.json`` and
``decode.md`` in ``--out``. Random weights cannot show image quality; they do exercise the same
kernels at the same sizes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.harness import Column, meta, write_report  # noqa: E402

COLUMNS = (
    Column("variant", "variant"),
    Column("median (ms)", "median_ms", "{:.1f}"),
    Column("min (ms)", "min_ms", "{:.1f}"),
    Column("vs official", "vs_official", "{:.2f}"),
    Column("values differing from official", "fraction_of_values_differing_from_official", "{:.2%}"),
)


class StridedAttnBlock(nn.Module):
    """The attention of the release before the parity fix: strided q/k/v into SDPA."""

    def __init__(self, ours):
        super().__init__()
        self.norm, self.q, self.k, self.v, self.proj_out = ours.norm, ours.q, ours.k, ours.v, ours.proj_out

    def forward(self, x):
        h = self.norm(x)
        b, c, height, width = h.shape

        def tokens(t):
            return t.reshape(b, 1, c, height * width).transpose(-1, -2)

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, height, width))


def previous_decode(previous, latents, height: int, width: int, device_type: str):
    """The decode of the release before the parity fix: strided attention, float32 conversion."""
    import torch
    from PIL import Image

    from flux.sampling import unpack

    with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
        decoded = previous.decode(unpack(latents.float(), height, width))
    x = decoded.float().clamp(-1, 1)[0].permute(1, 2, 0)
    return Image.fromarray((127.5 * (x + 1.0)).cpu().byte().numpy())


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=896)
    parser.add_argument("--height", type=int, default=1152)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cpu only to check the script (bf16 is slow there)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    args = parser.parse_args()

    import numpy as np
    import torch

    from flux.autoencoder import AutoEncoder
    from flux.registry import flux_ae_params
    from flux.sampling import pack
    from pulid.assembly import PipelineModels, assemble_pipeline
    from tests.official_reference import official_autoencoder, official_decode, with_attention

    torch.manual_seed(0)
    device = torch.device(args.device)
    with device:
        ae = AutoEncoder(flux_ae_params()).eval().requires_grad_(False)
    generator = torch.Generator(device=device).manual_seed(1)
    latents = pack(
        torch.randn(1, 16, args.height // 8, args.width // 8, device=device, generator=generator)
    ).to(torch.bfloat16)
    pipeline = assemble_pipeline(PipelineModels(ae), device, torch.bfloat16)
    reference, previous = official_autoencoder(ae), with_attention(ae, StridedAttnBlock)
    variants = {
        "ours": lambda: pipeline.decode(latents, args.height, args.width),
        "official": lambda: official_decode(reference, latents, args.height, args.width, autocast=True),
        "previous": lambda: previous_decode(previous, latents, args.height, args.width, device.type),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    images = {}
    with torch.inference_mode():
        for _ in range(args.warmup):  # cuDNN plans, allocator
            for fn in variants.values():
                fn()
        for _ in range(args.repeat):  # interleaved, so drift hits every variant alike
            for name, fn in variants.items():
                sync(device)
                start = time.perf_counter()
                images[name] = np.asarray(fn())
                times[name].append(time.perf_counter() - start)
    official_ms = statistics.median(times["official"]) * 1000
    rows = []
    for name in variants:
        median_ms = statistics.median(times[name]) * 1000
        differ = float((images[name] != images["official"]).mean())
        rows.append(
            {
                "variant": name,
                "median_ms": round(median_ms, 2),
                "min_ms": round(min(times[name]) * 1000, 2),
                "vs_official": round(median_ms / official_ms, 3),
                "fraction_of_values_differing_from_official": differ,
            }
        )
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = meta(device_name, size=[args.width, args.height], repeat=args.repeat, warmup=args.warmup)
    print(write_report(args.out, "decode", rows, report, COLUMNS))


if __name__ == "__main__":
    main()
