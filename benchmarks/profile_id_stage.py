"""Where the ID stage's time goes, per memory mode: the whole stage as ``generate`` times it, then
its parts one by one with the device synchronised between them, and a profiler table.

Builds the harness's full-size random stack (each mode in its own subprocess), makes a warm-up
image, then for three fresh photos (ID cache emptied) records the text and ID stages of a 2-step
generation; then, synchronised: the prompt encoding, the face analysis, entering the ID stage (the
placement's loads and prefetches), EVA and the IDFormer. Output: ``id_stage.json`` and
``id_stage.md`` (the table, also on stdout), one ``<mode>-profile.txt`` per mode (torch.profiler,
text and ID stages) and one ``<mode>.log``; with ``--face-variants``, ``face_variants.json`` and
``face_variants.md``.

    python benchmarks/profile_id_stage.py --modes fp8,fp8-budget12 --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (  # noqa: E402
    Column,
    apply_mode,
    astronaut,
    bench_request,
    build_stack,
    child_args,
    meta,
    print_result,
    run_modes,
    write_report,
)

DEFAULT_MODES = "fp8,fp8-budget12,fp8-budget12-eager,compiled-budget24"
COLUMNS = (
    Column("mode", "mode"),
    Column(
        "generate: text / ID (s)",
        lambda r: (r["generate_text_s"], r["generate_id_s"]),
        lambda v: f"{v[0]:.3f} / {v[1]:.3f}",
    ),
    Column("synced: text", "synced_text_s", "{:.3f}"),
    Column("face", "synced_face_s", "{:.3f}"),
    Column("enter ID", "synced_enter_id_s", "{:.3f}"),
    Column("EVA", "synced_eva_s", "{:.3f}"),
    Column("IDFormer", "synced_idformer_s", "{:.3f}"),
    Column("whole ID", "synced_whole_id_s", "{:.3f}"),
)
FACE_COLUMNS = (
    Column("onnxruntime idle threads", "onnx_threads"),
    Column("facexlib on", "facexlib_device"),
    Column(
        "ID stage median / max (s)",
        "id_stage_s",
        lambda ids: f"{statistics.median(ids):.3f} / {max(ids):.3f}",
    ),
    Column("CPU s per call", "process_cpu_per_call_s", lambda cpus: f"{statistics.median(cpus):.1f}"),
    Column("face analysis (s)", "face_analysis_synced_s", lambda faces: f"{statistics.median(faces):.3f}"),
)


def timed(torch, fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def warm_stack(mode: str):
    """The harness's full-size random stack in ``mode`` after a warm-up image; with the photo,
    the 2-step request the timings use, and the stack's folder."""
    import tempfile

    import torch

    folder = Path(tempfile.mkdtemp(prefix="idstage-"))
    pipeline = build_stack("cuda", torch.bfloat16, folder)
    apply_mode(pipeline, mode)
    photo = astronaut()
    request = bench_request(id_images=[photo], num_steps=2)
    pipeline.generate(dataclasses.replace(request, num_steps=3))  # warm-up
    return pipeline, photo, request, folder


def run_mode(mode: str, out: Path) -> dict:
    import numpy as np
    import torch

    pipeline, photo, request, folder = warm_stack(mode)
    pauses = []  # garbage collections: (stage, generation, seconds)
    current = {"stage": "", "gc": 0.0}

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            current["gc"] = time.perf_counter()
        else:
            pauses.append((current["stage"], info["generation"], time.perf_counter() - current["gc"]))

    def on_stage(name: str) -> None:
        current["stage"] = name

    import gc

    gc.callbacks.append(on_gc)
    stages = []
    for n in range(3):  # a fresh photo each time: the same pixels, shifted, so the cache misses
        pipeline.id_encoder.forget()
        shifted = np.roll(photo, n + 1, axis=1)
        cpu0 = time.process_time()
        result = pipeline.generate(dataclasses.replace(request, id_images=[shifted]), on_stage=on_stage)
        stages.append(
            {
                **{k: result.timings[k] for k in ("text_encoding_s", "id_embedding_s", "total_s")},
                "process_cpu_s": time.process_time() - cpu0,
                "gc_pauses": [p for p in pauses if p[2] > 0.01],
            }
        )
        pauses.clear()
    gc.callbacks.remove(on_gc)

    encoder = pipeline.id_encoder
    encoder.forget()
    _, text_s = timed(torch, lambda: pipeline.encode_prompt(request.prompt, 128))
    face, face_s = timed(torch, lambda: encoder.face_analyzer.analyze(photo))
    enter_s = 0.0
    if pipeline.placement is not None:
        _, enter_s = timed(torch, lambda: pipeline.placement.enter("id"))
    with torch.inference_mode():
        (pooled, hidden), eva_s = timed(
            torch, lambda: encoder.eva(face.clip_input.to("cuda", torch.bfloat16))
        )
        cond = torch.cat([torch.zeros(1, 512, device="cuda", dtype=torch.bfloat16), pooled], dim=-1)
        _, former_s = timed(torch, lambda: encoder.id_former(cond, hidden))
    encoder.forget()
    _, whole_synced_s = timed(torch, lambda: encoder([np.roll(photo, 7, axis=0)]))

    # The profiler over a text stage then an ID stage, as generate runs them.
    encoder.forget()
    pipeline.generate(dataclasses.replace(request, num_steps=1, id_images=[]))
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        pipeline.encode_prompt(request.prompt, 128)
        encoder([np.roll(photo, 11, axis=0)])
        torch.cuda.synchronize()
    averages = prof.key_averages(group_by_stack_n=8)
    report = [
        averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60),
        averages.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60),
    ]
    (out / f"{mode}-profile.txt").write_text("\n\n".join(report))
    return {
        "mode": mode,
        "generate_text_s": statistics.median(s["text_encoding_s"] for s in stages),
        "generate_id_s": statistics.median(s["id_embedding_s"] for s in stages),
        "generate_calls": stages,
        "synced_text_s": text_s,
        "synced_face_s": face_s,
        "synced_enter_id_s": enter_s,
        "synced_eva_s": eva_s,
        "synced_idformer_s": former_s,
        "synced_whole_id_s": whole_synced_s,
        "plan": str(pipeline.placement.plan) if pipeline.placement is not None else "resident",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }


FACE_VARIANTS = (  # (onnxruntime threads spin when idle, torch device of facexlib's models)
    ("spin", "cpu"),
    ("sleep", "cpu"),
    ("spin", "cuda"),
    ("sleep", "cuda"),
    ("spin", "cpu"),
)


def run_face_variants(mode: str) -> dict:
    """The ID stage of fresh photos with the face analysis built each way of ``FACE_VARIANTS``."""
    import numpy as np
    import torch

    from pulid.face_analysis import load_face_analyzer
    from pulid.face_detection import onnx_session_options
    from pulid.id_encoder import IDEncoder
    from tiny_random.pipeline import tiny_face_model_paths

    pipeline, photo, request, folder = warm_stack(mode)
    paths = tiny_face_model_paths(folder / "models")
    rows, shift = [], 0
    for spin, device in FACE_VARIANTS:
        old = pipeline.id_encoder
        analyzer = load_face_analyzer(
            paths, "cpu", device, session_options=onnx_session_options(spinning=spin == "spin")
        )
        pipeline.id_encoder = IDEncoder(analyzer, old.eva, old.id_former, "cuda", torch.bfloat16)
        pipeline.generate(dataclasses.replace(request, num_steps=1))  # first use
        ids, cpus, faces = [], [], []
        for _ in range(6):
            shift += 1
            cpu0 = time.process_time()
            result = pipeline.generate(
                dataclasses.replace(request, id_images=[np.roll(photo, shift, axis=1)])
            )
            cpus.append(time.process_time() - cpu0)
            ids.append(result.timings["id_embedding_s"])
        for _ in range(5):
            _, seconds = timed(torch, lambda a=analyzer: a.analyze(photo))
            faces.append(seconds)
        rows.append(
            {
                "onnx_threads": spin,
                "facexlib_device": device,
                "id_stage_s": ids,
                "process_cpu_per_call_s": cpus,
                "face_analysis_synced_s": faces,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return {"mode": mode, "variants": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=DEFAULT_MODES)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "id-stage-out")))
    parser.add_argument("--child", default=None)
    parser.add_argument(
        "--face-variants", default=None, metavar="MODE", help="compare FACE_VARIANTS in MODE instead"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.face_variants:
        result = run_face_variants(args.face_variants)
        report = meta(mode=result["mode"])
        print(write_report(args.out, "face_variants", result["variants"], report, FACE_COLUMNS))
        return
    if args.child:
        print_result(run_mode(args.child, args.out))
        return
    rows = run_modes(
        __file__,
        args.modes.split(","),
        child_args(args, "out"),
        args.out,
        env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},  # the app's, whatever the shell has
        on_row=lambda row: print(json.dumps({k: v for k, v in row.items() if k != "plan"}), flush=True),
    )
    device = rows[0]["device"] if rows else "-"  # CUDA stays unused in this process
    print(write_report(args.out, "id_stage", rows, meta(device, modes=args.modes), COLUMNS))


if __name__ == "__main__":
    main()
