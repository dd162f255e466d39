"""Peak CPU RAM of loading a large synthetic DiT checkpoint, relative to the file size.

Writes a random bf16 checkpoint in the official key layout (a FLUX DiT with fewer, narrower blocks,
about 2.5 GB by default), then loads it in fresh subprocesses through the app's loader, and
reports the peak resident memory above the process's baseline, divided by the file size. The
official loader (``load_file`` then ``load_state_dict`` into an initialised model) is measured the
same way for comparison.

    python benchmarks/load_memory.py [--hidden 1536] [--depth 8] [--single 16] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = ("strict_meta_loader", "official_style")


def params_for(args):
    from flux.model import FluxParams

    heads = args.hidden // 128
    return FluxParams(
        in_channels=64,
        vec_in_dim=768,
        context_in_dim=4096,
        hidden_size=args.hidden,
        mlp_ratio=4.0,
        num_heads=heads,
        depth=args.depth,
        depth_single_blocks=args.single,
        axes_dim=[16, 56, 56],
        theta=10_000,
        qkv_bias=True,
        guidance_embed=True,
    )


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, path: str, args) -> None:
    import torch

    from flux.loading import build_flow_model, load_flow_model

    params = params_for(args)
    base = rss_mib()
    start = time.perf_counter()
    if mode == "strict_meta_loader":
        model = load_flow_model(path, params, "cpu", torch.bfloat16)
    else:  # what the official load_flow_model does on CPU
        from safetensors.torch import load_file

        model = build_flow_model(params, "cpu", torch.bfloat16)
        model.load_state_dict(
            load_file(path, device="cpu"), strict=False
        )  # as the official loader does: its peak RAM is what this measures
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = sum(p.numel() for p in model.parameters())
    print(
        json.dumps(
            {
                "mode": mode,
                "baseline_mib": base,
                "peak_mib": peak,
                "end_mib": rss_mib(),
                "seconds": seconds,
                "params": n,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--single", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", choices=MODES)
    parser.add_argument("--path")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.path, args)
        return

    import torch
    from safetensors.torch import save_file

    from flux.model import Flux

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic-flux.safetensors"
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in Flux(params_for(args)).state_dict().items()}
        save_file({k: torch.randn(s, dtype=torch.bfloat16) for k, s in shapes.items()}, str(path))
        size_mib = os.path.getsize(path) / 2**20
        rows = []
        for mode in MODES:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--path",
                str(path),
                "--hidden",
                str(args.hidden),
                "--depth",
                str(args.depth),
                "--single",
                str(args.single),
            ]
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            result["file_mib"] = size_mib
            result["peak_over_file"] = (result["peak_mib"] - result["baseline_mib"]) / size_mib
            rows.append(result)
    print("| loader | file (MiB) | peak RSS above baseline (MiB) | ratio to file | load time (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['file_mib']:.0f} | {r['peak_mib'] - r['baseline_mib']:.0f} | "
            f"{r['peak_over_file']:.2f} | {r['seconds']:.2f} |"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
