"""Peak CPU RAM of loading a large synthetic DiT checkpoint, relative to the file size.

Writes a random bf16 checkpoint in the official key layout (a FLUX DiT with fewer, narrower blocks,
about 2.5 GB by default), then loads it in fresh subprocesses through the app's loader, and
reports the peak resident memory above the process's baseline, divided by the file size. The
official loader (``load_file`` then ``load_state_dict`` into an initialised model) is measured the
same way for comparison.

    python benchmarks/load_memory.py [--hidden 1536] [--depth 8] [--single 16] [--out results.json]

With ``--out``, the rows go to that JSON file, the table beside it (``results.md``) and each
loader's log too (``<loader>.log``).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (  # noqa: E402
    Column,
    child_args,
    markdown_table,
    meta,
    print_result,
    run_modes,
    write_report,
)

MODES = ("strict_meta_loader", "official_style")
COLUMNS = (
    Column("loader", "mode"),
    Column("file (MiB)", "file_mib", "{:.0f}"),
    Column("peak RSS above baseline (MiB)", lambda r: r["peak_mib"] - r["baseline_mib"], "{:.0f}"),
    Column("ratio to file", "peak_over_file", "{:.2f}"),
    Column("load time (s)", "seconds", "{:.2f}"),
)


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


def child(mode: str, path: str, args) -> dict:
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
    return {
        "mode": mode,
        "baseline_mib": base,
        "peak_mib": peak,
        "end_mib": rss_mib(),
        "seconds": seconds,
        "params": n,
    }


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
        print_result(child(args.child, args.path, args))
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
        passed_on = ["--path", str(path), *child_args(args, "hidden", "depth", "single")]
        logs = args.out.parent if args.out else Path(tmp)  # beside the results, or gone with the file
        rows = run_modes(__file__, MODES, passed_on, logs)
    for result in rows:
        result["file_mib"] = size_mib
        result["peak_over_file"] = (result["peak_mib"] - result["baseline_mib"]) / size_mib
    if args.out:  # results.json: the report's name is the file's stem
        settings = {"hidden": args.hidden, "depth": args.depth, "single": args.single}
        write_report(args.out.parent, args.out.stem, rows, meta("cpu", **settings), COLUMNS)
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
