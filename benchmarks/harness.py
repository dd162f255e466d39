"""What the benchmarks share, so that each script keeps only what it measures.

- the full-size stack with random weights (:func:`build_stack`, :func:`apply_mode` for the memory
  and compilation modes, :func:`one_forward` for the modes' errors);
- the benchmark request (:func:`bench_request`) and every report's metadata (:func:`meta`);
- per-step timing (:class:`StepTimer`, CUDA events on a GPU, the wall clock elsewhere);
- one subprocess per mode (:func:`run_modes`, :func:`run_child`; a child ends with
  :func:`print_result`), so that each mode's peak memory and compiled state are its own;
- the reports (:class:`Column`, :func:`markdown_table`, :func:`write_report`): ``<name>.json``
  holds ``{"meta": ..., "rows": [...]}`` and ``<name>.md`` the table.

Only the standard library is imported at the top: ``--help`` stays quick, and a child that measures
its own memory starts from the same baseline as before.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

GiB = 2**30
RESULT = "RESULT "  # the prefix of a child's one result line on stdout
ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"
# As the app runs: expandable segments keep the allocator's reserve close to what is allocated.
DEFAULT_ALLOC_CONF = "expandable_segments:True"
LOG_CHARS = 20_000  # of each of a child's stdout and stderr, kept in its log
TAIL_CHARS = 3_000  # of a failed child's stderr, printed

# ---------------------------------------------------------------------------------------------
# The full-size stack with random weights
# ---------------------------------------------------------------------------------------------

# Memory-placement modes: (fp8, compile, VRAM budget GiB, offload, aggressive).
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
    """The full-size pipeline with random weights, resident on ``device`` (no download): T5-XXL,
    CLIP-L, the FLUX.1-dev DiT with the PuLID cross-attentions, the AE, EVA02-CLIP-L and the
    IDFormer; the face models are ``tiny_random``'s stand-ins (facexlib on ``device`` as the app
    places it, insightface on CPU onnxruntime)."""
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
        _place(pipeline, *PLACED[mode])
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


def _place(pipeline, fp8: bool, compiled: bool, budget, offload: bool, aggressive: bool) -> None:
    """A memory-placement mode: every model back on the host, then placed by the memory policy."""
    import torch

    from flux.compile import compile_blocks, compile_repeated_blocks
    from flux.offload import MemoryPolicy
    from pulid.loading import place_pipeline

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
    torch.cuda.empty_cache()
    policy = MemoryPolicy(vram_budget_gb=budget, offload=offload or aggressive, aggressive=aggressive)
    place_pipeline(pipeline, policy)
    print(str(pipeline.placement.plan), flush=True)
    if compiled:
        compile_repeated_blocks(pipeline.dit)
        compile_blocks(pipeline.pulid_ca)


def one_forward(pipeline, request):
    """One DiT prediction with the ID on, from fixed inputs: what the modes' errors are measured on."""
    import torch

    from flux.sampling import get_noise, image_ids, pack
    from pulid.injection import Identity

    device = pipeline.device
    with torch.inference_mode():
        noise = get_noise(1, request.height, request.width, device, torch.bfloat16, seed=7)
        cond = pipeline.encode_prompt(request.prompt, 128)
        tokens = pipeline.id_encoder(request.id_images).tokens
        pred = pipeline.dit(
            img=pack(noise),
            img_ids=image_ids(1, noise.shape[-2], noise.shape[-1], device),
            txt=cond.txt,
            txt_ids=cond.txt_ids,
            y=cond.vec,
            timesteps=torch.full((1,), 0.7, device=device, dtype=torch.bfloat16),
            guidance=torch.full((1,), 4.0, device=device, dtype=torch.bfloat16),
            id_injection=pipeline.injection([Identity(tokens, 1.0)]),
        )
    return pred.float().cpu()


# ---------------------------------------------------------------------------------------------
# The benchmark request and every report's metadata
# ---------------------------------------------------------------------------------------------

PROMPT = "portrait, color, cinematic"


def astronaut():
    """The ID photo of every benchmark: scikit-image's astronaut (RGB uint8, 512 x 512)."""
    from skimage import data as skimage_data

    return skimage_data.astronaut()


def bench_request(**overrides):
    """The benchmarks' request: the astronaut's face, 896 x 1152, 28 steps, seed 42, T5 length 128;
    ``overrides`` replace any of these or set other fields of :class:`pulid.request.GenerationRequest`."""
    from pulid.request import GenerationRequest

    settings: dict[str, Any] = {
        "prompt": PROMPT,
        "width": 896,
        "height": 1152,
        "num_steps": 28,
        "seed": 42,
        "max_sequence_length": 128,
        **overrides,
    }
    if "id_images" not in settings:  # read only when the photo is used
        settings["id_images"] = [astronaut()]
    return GenerationRequest(**settings)


def device_name() -> str:
    """The GPU's name, or ``cpu``. It starts CUDA in this process: a parent that runs children
    measuring GPU memory asks them instead (their rows' ``device``)."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def meta(device: str | list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """What every report records beside its rows: the command, the date, the device, torch's
    version, and ``extra`` (the run's settings)."""
    import torch

    return {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "device": device_name() if device is None else device,
        "torch": torch.__version__,
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


class StepTimer:
    """The end of each denoising step, marked: pass the timer as ``generate``'s ``callback=``.

    On CUDA each mark is an event recorded on the current stream (the GPU's own clock, nothing
    synchronised in between); elsewhere it is ``time.perf_counter``. N marks give N - 1 step
    durations: the first step's start is not marked (it holds the text and ID stages' tail).
    """

    def __init__(self, device) -> None:
        self.cuda = str(device).startswith("cuda")
        self.marks: list = []

    def __call__(self, info: object = None) -> None:
        self.mark()

    def mark(self) -> None:
        """One point in time (also for timing something other than a step: mark, run, mark)."""
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def reset(self) -> None:
        self.marks.clear()

    def intervals_ms(self) -> list[float]:
        """The durations between consecutive marks, in ms (waits for the last event on CUDA)."""
        if len(self.marks) < 2:
            return []
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]
        return [(b - a) * 1000 for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]

    @property
    def median_ms(self) -> float:
        """The median step (ms); NaN before two marks."""
        steps = self.intervals_ms()
        return statistics.median(steps) if steps else float("nan")

    @property
    def min_ms(self) -> float:
        """The fastest step (ms); NaN before two marks."""
        steps = self.intervals_ms()
        return min(steps) if steps else float("nan")


# ---------------------------------------------------------------------------------------------
# One subprocess per mode
# ---------------------------------------------------------------------------------------------


def child_env(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child, with the app's allocator setting unless one is set
    already, then ``overrides``."""
    env = dict(os.environ)
    env.setdefault(ALLOC_CONF, DEFAULT_ALLOC_CONF)
    env.update(overrides or {})
    return env


def child_args(args: argparse.Namespace, *names: str) -> list[str]:
    """The options ``names`` of a parsed command line, spelled for a child's command line
    (``--name value``; a true flag alone; unset ones left out)."""
    spelled: list[str] = []
    for name in names:
        value = getattr(args, name)
        if value is True:
            spelled.append(f"--{name}")
        elif value is not None and value is not False:
            spelled += [f"--{name}", str(value)]
    return spelled


def print_result(row: Mapping[str, Any]) -> None:
    """A child's answer: one ``RESULT {json}`` line on stdout, which :func:`run_child` reads."""
    print(RESULT + json.dumps(row, default=str), flush=True)


@dataclasses.dataclass
class ChildRun:
    """One child's end: its exit status, its result (None when it gave none) and its stderr's tail."""

    mode: str
    returncode: int
    row: dict | None
    stderr_tail: str

    @property
    def failed(self) -> bool:
        return self.returncode != 0 or self.row is None


def run_child(
    script: str | Path,
    mode: str,
    args: Sequence[str],
    log: Path,
    *,
    flag: str = "--child",
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ChildRun:
    """Run ``script flag mode *args`` in a fresh Python, keep its output in ``log``, read its
    ``RESULT`` line (the first one)."""
    command = [sys.executable, str(script), flag, mode, *args]
    proc = subprocess.run(command, capture_output=True, text=True, env=child_env(env), cwd=cwd)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout[-LOG_CHARS:] + "\n" + proc.stderr[-LOG_CHARS:])
    found = [line[len(RESULT) :] for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    row = json.loads(found[0]) if found else None
    return ChildRun(mode, proc.returncode, row, proc.stderr[-TAIL_CHARS:])


def run_modes(
    script: str | Path,
    modes: Iterable[str],
    args: Sequence[str],
    logs: Path,
    *,
    flag: str = "--child",
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Each mode in its own subprocess, one after another (log: ``<logs>/<mode>.log``): the rows of
    those that gave a result. A failed mode is reported (exit status, stderr's tail) and the others
    still run. ``on_row`` sees each row as it comes (a progress line)."""
    rows = []
    for mode in modes:
        run = run_child(script, mode, args, logs / f"{mode}.log", flag=flag, env=env, cwd=cwd)
        if run.failed:
            print(f"mode {mode} failed (rc {run.returncode}):\n{run.stderr_tail}", flush=True)
            continue
        rows.append(run.row)
        if on_row is not None:
            on_row(run.row)
    return rows


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of a table: its header, where a row keeps its value (a key, or a function of the
    row), and how the value is written (a format string, or a function of the value)."""

    header: str
    key: str | Callable[[Mapping[str, Any]], Any]
    fmt: str | Callable[[Any], str] = "{}"

    def cell(self, row: Mapping[str, Any]) -> str:
        """The value written, or ``-`` when the row has none."""
        try:
            value = self.key(row) if callable(self.key) else row.get(self.key)
        except KeyError:
            value = None
        if value is None:
            return "-"
        return self.fmt(value) if callable(self.fmt) else self.fmt.format(value)


def markdown_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A Markdown table: the headers, the separator, one line per row."""
    lines = [
        "| " + " | ".join(column.header for column in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(column.cell(row) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON (what JSON cannot hold, such as a path, as its text)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def write_report(
    out: Path,
    name: str,
    rows: list[dict],
    meta: Mapping[str, Any],
    columns: Sequence[Column],
    **sections: Any,
) -> str:
    """``<out>/<name>.json`` (``{"meta": meta, "rows": rows, **sections}``) and ``<out>/<name>.md``
    (the rows' table); returns the table."""
    write_json(out / f"{name}.json", {"meta": dict(meta), "rows": rows, **sections})
    table = markdown_table(rows, columns)
    (out / f"{name}.md").write_text(table + "\n")
    return table
