"""Load the full PuLID-FLUX pipeline from the official weight files, after checking everything first.

:func:`load_pipeline` checks, before anything large is read: that the device can do what the flags
ask (:mod:`flux.devices`), that a memory budget can be met (planned on the full-size models built
on the meta device), and where every weight file of :func:`pulid.catalogue.required_weights` is
(:func:`locate_weights`). Every missing file is reported in one error with its size, source and
destination and the command that downloads them all; offline is detected once, in seconds. Then
each file is loaded strictly; a mismatched one raises :class:`flux.checkpoint.CheckpointError`
naming the file and keys.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eva_clip.model import load_eva_clip
from flux.devices import HardwareError, describe, resolve_device
from flux.errors import UserError
from flux.hub import (
    WeightsNotFoundError,
    download,
    download_blocked,
    find_local,
    missing_report,
)
from flux.loading import load_autoencoder, load_flow_model, open_dit_file, single_file_format
from flux.offload import MemoryPlan, MemoryPolicy, PipelinePlacement, measure
from flux.offload.device_map import DeviceMap, check_device_map
from flux.registry import get_model_spec
from flux.text_encoders import (
    encoder_file_format,
    load_clip,
    load_clip_file,
    load_t5,
    load_t5_file,
    open_t5_file,
)
from pulid.assembly import PipelineModels, assemble_pipeline
from pulid.catalogue import (
    DEFAULT_MODEL,
    DEFAULT_VERSION,
    FACE_MODEL_ROLES,
    FP8_MODES,
    SINGLE_FILE_ROLES,
    CatalogueEntry,
    default_models_dir,
    is_path_choice,
    required_weights,
    single_file_conflicts,
)
from pulid.encoders import load_pulid_weights, num_pulid_ca
from pulid.pipeline import STAGES, PuLIDFluxPipeline
from pulid.request import GenerationRequest

logger = logging.getLogger(__name__)


def plan_counts(request: GenerationRequest | None = None) -> dict[str, int]:
    """How often each kind of use happens for one image of ``request`` (default: the default request)."""
    request = request or GenerationRequest(prompt="")
    cfg = 2 if request.uses_true_cfg else 1
    return {"image": 1, "prompt": cfg, "step": request.num_steps * cfg}


def download_command(
    model: str, version: str, fp8: str | None, models_dir: Path, files: Mapping[str, str | None] | None = None
) -> str:
    """The ``python -m pulid.serve.download`` line that fetches what these flags need (this Python, so
    the line runs as printed; files given as paths are passed on, and not fetched)."""
    python = os.path.relpath(sys.executable)
    python = python if not python.startswith("..") else sys.executable
    parts = [python, "-m", "pulid.serve.download", "--name", model, "--version", version]
    if fp8 is not None:
        parts += ["--fp8", "--fp8_mode", fp8]
    for kind, value in (files or {}).items():
        if value is not None:
            parts += [f"--{kind}", value]
    parts += ["--models_dir", str(models_dir)]
    return shlex.join(parts)


def locate_weights(
    entries: Mapping[str, CatalogueEntry],
    models_dir: Path,
    explicit: Mapping[str, str | os.PathLike | None] | None = None,
    *,
    allow_download: bool = True,
    command: str | None = None,
) -> dict[str, Path]:
    """Role -> local path of every entry: explicit path, ``models_dir``, the HF cache, or a download.

    Nothing large is read. When something is missing and cannot be downloaded (``HF_HUB_OFFLINE``,
    no network, downloads disabled, a gated repo without a token), one
    :class:`~flux.hub.WeightsNotFoundError` lists every missing file.
    """
    explicit = explicit or {}
    found: dict[str, Path] = {}
    missing: dict[str, CatalogueEntry] = {}
    problems: list[str] = []
    for role, entry in entries.items():
        try:
            path = find_local(entry.weights, models_dir, explicit.get(role))
        except WeightsNotFoundError as err:
            problems.append(str(err))
            continue
        if path is not None:
            found[role] = path
        elif not entry.weights.optional:
            missing[role] = entry
    if problems:
        raise WeightsNotFoundError("\n".join(problems))
    if not missing:
        return found
    reason = "downloads are disabled" if not allow_download else download_blocked()
    if reason is None:
        failures = []
        for role, entry in missing.items():
            try:
                found[role] = download(entry.weights)
            except WeightsNotFoundError as err:
                failures.append(str(err))
        if failures:
            raise WeightsNotFoundError("\n".join(failures))
        return found
    weights = [entry.weights for entry in missing.values()]
    raise WeightsNotFoundError(missing_report(weights, models_dir, f"{reason}.", command))


def resolve_fp8_mode(fp8: str | None, device: torch.device) -> str | None:
    """``auto`` becomes ``native`` on GPUs with fp8 matrix units (Ada, Hopper), else ``quanto``;
    ``native`` without those units is a :class:`~flux.devices.HardwareError`."""
    from flux.quant import fp8_matmul_supported

    if fp8 is None:
        return None
    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8 mode must be one of {', '.join(FP8_MODES)}, not {fp8!r}")
    supported = fp8_matmul_supported(device)
    if fp8 == "auto":
        if not supported:
            logger.warning(
                "--fp8 on %s (no fp8 matrix units): loads XLabs' fp8 checkpoint through optimum-quanto, "
                "which halves the DiT's memory but computes in bf16, no faster; --fp8_mode native "
                "needs an Ada, Hopper or Blackwell GPU",
                describe(device),
            )
        return "native" if supported else "quanto"
    if fp8 == "native" and not supported:
        raise HardwareError(
            f"--fp8_mode native computes with fp8 matrix units (NVIDIA compute capability 8.9 or newer: "
            f"Ada, Hopper, Blackwell), which {describe(device)} does not have: use --fp8_mode quanto "
            "(XLabs' fp8 file, which saves memory but not time) or run without --fp8."
        )
    return fp8


def face_provider(onnx_provider: str, id_device: torch.device) -> str:
    """``auto``: the face detector's onnxruntime on the GPU when the ID stage runs on CUDA, else
    on the CPU, where nobody asked for a GPU and a warning about its absence would mislead."""
    if onnx_provider == "auto":
        return "gpu" if id_device.type == "cuda" else "cpu"
    return onnx_provider


def meta_pipeline(
    model_name: str = DEFAULT_MODEL, fp8: str | None = None, files: Mapping[str, Path] | None = None
) -> PuLIDFluxPipeline:
    """The full-size pipeline on the meta device (no memory, no weights): for planning memory.

    Native fp8 swaps the DiT's block Linears as the loader does; the quanto layout is planned as
    native fp8 (the same fp8 bytes per weight, bf16 scales instead of float32 ones). Single files
    (``files``: role "dit"/"t5" -> local path) are prepared from their headers exactly as the
    loader will prepare them, so GGUF and fp8 layers are planned at their stored size.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from eva_clip.model import EvaVisionTower
    from flux.autoencoder import AutoEncoder
    from flux.loading import build_flow_model
    from flux.text_encoders import CLIP_L_TEXT_CONFIG, CLIP_MAX_LENGTH, T5_XXL_CONFIG, HFEmbedder
    from pulid.encoders import PuLIDWeights

    files = files or {}
    spec = get_model_spec(model_name)
    dit = build_flow_model(spec.params, "meta", torch.bfloat16)
    if fp8 is not None:
        from flux.quant import quantize_linears_to_fp8

        quantize_linears_to_fp8(dit)
    if "dit" in files:
        file = open_dit_file(files["dit"])
        single_file_format(file, "meta").prepare(dit, file.header)
        file.close()
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**T5_XXL_CONFIG)).to(torch.bfloat16)
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG)).to(torch.bfloat16)
        pulid = PuLIDWeights(num_pulid_ca(spec.params.depth, spec.params.depth_single_blocks))
        pulid = pulid.to(torch.bfloat16)
        ae = AutoEncoder(spec.ae_params)
    if "t5" in files:
        file = open_t5_file(files["t5"])
        encoder_file_format(file).prepare(t5, file.header)
        file.close()
    eva = EvaVisionTower(device="meta").to(torch.bfloat16)
    t5 = HFEmbedder(t5, None, 512, "last_hidden_state")
    clip = HFEmbedder(clip, None, CLIP_MAX_LENGTH, "pooler_output")
    return assemble_pipeline(PipelineModels(ae, dit, t5, clip, pulid, eva), "meta")


class ConflictingChoicesError(UserError, ValueError):
    """A :class:`PipelineConfig` whose choices cannot go together; the message says what to drop."""


@dataclass(frozen=True)
class PipelineConfig:
    """What the real pipeline is built from: the model and PuLID version, where it runs, its
    precision and memory policy, and its weight files (the official ones or single files). The
    command line's flags become one of these (:func:`pulid.serve.startup.pipeline_config`)."""

    model: str = DEFAULT_MODEL
    version: str = DEFAULT_VERSION
    device: torch.device | str | None = None
    dtype: torch.dtype = torch.bfloat16
    onnx_provider: str = "auto"
    pretrained_model: str | os.PathLike | None = None
    models_dir: str | os.PathLike | None = None
    fp8: str | None = None
    compiled: bool = False
    memory: MemoryPolicy = field(default_factory=MemoryPolicy)
    allow_download: bool = True
    dit: str | None = None
    t5: str | None = None
    clip: str | None = None
    devices: str | None = None
    sequence_parallel: bool = False

    def conflicts(self) -> list[str]:
        """The choices that cannot go together, each with what to drop."""
        found = single_file_conflicts(
            self.model, self.fp8, {"dit": self.dit, "t5": self.t5, "clip": self.clip}
        )
        if self.sequence_parallel and self.devices is not None:
            found.append(
                "--sequence_parallel and --devices both given: each rank holds the whole pipeline on "
                "its own GPU, drop --devices"
            )
        if self.devices is not None and self.device is not None:
            found.append("--device and --devices both given: --devices places every stage, drop --device")
        return found


def load_pipeline(config: PipelineConfig) -> PuLIDFluxPipeline:
    """The whole stack on ``config.device`` (default: the first CUDA GPU, else the CPU), or its stages
    spread over several devices by ``config.devices`` (``--devices``, :class:`~flux.offload.DeviceMap`).

    ``config.dit``, ``.t5``, ``.clip``: single files instead of the official ones, as a catalogue name
    (:data:`pulid.catalogue.DIT_FILES`, ``T5_FILES``, ``CLIP_FILES``) or a path: GGUF files keep
    their quantised layers quantised, fp8 e4m3fn files load into the fp8 layers, bf16/fp16 files
    load as usual (see :mod:`flux.loading` and :mod:`flux.text_encoders`).

    ``config.fp8``: None (bf16), ``"native"`` (the bf16 checkpoint quantised to fp8 as it is read, computed
    with the GPU's fp8 matrix units; needs Ada/Hopper), ``"quanto"`` (XLabs' fp8 checkpoint through
    optimum-quanto) or ``"auto"`` (native where supported, else quanto). ``compiled``
    compiles the repeated DiT and PuLID blocks with torch.compile.

    Memory: with a placed ``memory`` policy (a VRAM budget, offload, aggressive offload) the weights
    load into host memory and a :class:`~flux.offload.PipelinePlacement` moves them (or streams
    the DiT's and T5's blocks) to ``device`` stage by stage, within the plan the policy makes from
    the pipeline's declared components; the plan is logged as a table. With ``devices``, each
    device has its own plan (a budget is per GPU), and a map this machine cannot honour (a missing
    device, a GPU with less free memory than its plan's peak) is refused before anything loads.

    ``config.sequence_parallel``: this process is one rank of a ``torchrun`` group (already joined, see
    :func:`pulid.serve.ranks.join_torchrun`) that denoises each image together, the DiT's tokens split
    over the ranks (:mod:`flux.parallel`); every rank must then run the same requests.
    """
    if conflicts := config.conflicts():
        raise ConflictingChoicesError("; ".join(conflicts))
    model_name, version, device, dtype = config.model, config.version, config.device, config.dtype
    fp8, memory, devices = config.fp8, config.memory, config.devices
    dit, t5, clip = config.dit, config.t5, config.clip
    spec = get_model_spec(model_name)
    models_dir = Path(config.models_dir) if config.models_dir is not None else default_models_dir()
    files = {"dit": dit, "t5": t5, "clip": clip}
    single = dit is not None or t5 is not None
    device_map = None
    if devices is not None:
        device_map = DeviceMap.parse(devices, STAGES)
        if not single:
            plans = device_plans(device_map, memory, meta_pipeline(model_name, fp8))
            logger.info("Stages by device:\n%s", check_device_map(device_map, plans))
        device = device_map.device_of("denoise")
    device = resolve_device(device)
    fp8 = resolve_fp8_mode(fp8, device)
    memory.check_device(device)
    entries = required_weights(model_name, version, fp8, files)
    if memory.placed and not single and device_map is None:  # fails now, not after loading 36 GB
        memory.plan(measure(meta_pipeline(model_name, fp8).components()), STAGES, plan_counts())
    explicit = {
        SINGLE_FILE_ROLES[kind]: value for kind, value in files.items() if is_path_choice(kind, value)
    }
    paths = locate_weights(
        entries,
        models_dir,
        {"pulid": config.pretrained_model, **explicit},
        allow_download=config.allow_download,
        command=download_command(model_name, version, fp8, models_dir, files),
    )
    if memory.placed and single:  # planned from the files' headers, before reading their tensors
        planned = {
            SINGLE_FILE_ROLES[k]: paths[SINGLE_FILE_ROLES[k]] for k in ("dit", "t5") if files[k] is not None
        }
        planned_pipeline = meta_pipeline(model_name, fp8, planned)
        if device_map is not None:
            plans = device_plans(device_map, memory, planned_pipeline)
            logger.info("Stages by device:\n%s", check_device_map(device_map, plans))
        else:
            memory.plan(measure(planned_pipeline.components()), STAGES, plan_counts())

    from pulid.face_analysis import load_face_analyzer

    device_map = device_map or DeviceMap.single(device, STAGES)

    def weights_on(stage: str) -> torch.device:
        """Where a stage's weights load: the host under a memory placement, else its device."""
        return torch.device("cpu") if memory.placed else device_map.device_of(stage)

    logger.info("Loading PuLID-FLUX (%s, PuLID %s) for %s", model_name, version, describe(device))
    id_device = device_map.device_of("id")
    face_analyzer = load_face_analyzer(
        {role: paths[role] for role in FACE_MODEL_ROLES},
        onnx_provider=face_provider(config.onnx_provider, id_device),
        device=id_device,
    )
    text_weights = weights_on("text")
    if t5 is not None:
        t5_encoder = load_t5_file(paths["t5"], paths["t5_tokenizer"], text_weights, dtype, max_length=512)
    else:
        t5_encoder = load_t5(paths["t5"], text_weights, dtype, max_length=512)
    if clip is not None:
        clip_encoder = load_clip_file(paths["clip"], paths["clip_tokenizer"], text_weights, dtype)
    else:
        clip_encoder = load_clip(paths["clip"], text_weights, dtype)
    if dit is not None:
        dit_file = open_dit_file(paths["dit"])
        fmt = single_file_format(dit_file, device)
        dit = load_flow_model(dit_file, spec.params, weights_on("denoise"), dtype, fmt=fmt)
    else:
        dit = load_flow_model(
            paths["dit"], spec.params, weights_on("denoise"), dtype, fmt=_dit_format(fp8, paths)
        )
    ae = load_autoencoder(paths["ae"], spec.ae_params, weights_on("decode"))
    pulid = load_pulid_weights(
        paths["pulid"],
        device=weights_on("denoise"),
        dtype=dtype,
        num_ca=num_pulid_ca(spec.params.depth, spec.params.depth_single_blocks),
    )
    pulid.pulid_encoder.to(weights_on("id"))  # the IDFormer runs in the ID stage, the CAs while denoising
    eva = load_eva_clip(paths["eva"], weights_on("id"), dtype)
    parallel = None
    if config.sequence_parallel:
        from flux.parallel import SequenceParallelFlux, ShardingError

        try:
            parallel = SequenceParallelFlux(dit)
        except ShardingError as err:
            raise HardwareError(str(err)) from None
    pipeline = assemble_pipeline(
        PipelineModels(ae, dit, t5_encoder, clip_encoder, pulid, eva, face_analyzer),
        device,
        dtype,
        info={
            "model": model_name,
            "pulid_version": version,
            "fp8": fp8 or "off",
            **{
                kind: paths[SINGLE_FILE_ROLES[kind]].name
                for kind, value in files.items()
                if value is not None
            },
        },
        lora_folder=models_dir / "loras",
        models_dir=models_dir,
        allow_download=config.allow_download,
        device_map=device_map,
        parallel=parallel,
    )
    if config.compiled:  # after the LoRA slots: torch.compile ignores hooks added after it has traced a block
        from flux.compile import compile_blocks

        compile_blocks(pipeline.compiled_blocks())
    if memory.placed:
        place_pipeline(pipeline, memory)
    return pipeline


def _dit_format(fp8: str | None, paths: Mapping[str, Path]):
    if fp8 == "quanto":
        from flux.quant import quanto_format

        return quanto_format(paths.get("fp8_map"))
    if fp8 == "native":
        from flux.quant import NativeFp8Format

        return NativeFp8Format()
    from flux.checkpoint import PLAIN

    return PLAIN


def device_plans(
    device_map: DeviceMap,
    memory: MemoryPolicy,
    pipeline: PuLIDFluxPipeline,
    request: GenerationRequest | None = None,
) -> dict[torch.device, MemoryPlan]:
    """Each device's memory plan over its own stages and components (``pipeline`` may be the meta
    one: only sizes are read)."""
    parts = device_map.split(measure(pipeline.components()), pipeline.stages)
    return {
        device: memory.plan(sizes, stages, plan_counts(request)) for device, (sizes, stages) in parts.items()
    }


def place_pipeline(
    pipeline: PuLIDFluxPipeline, memory: MemoryPolicy, request: GenerationRequest | None = None
) -> PipelinePlacement:
    """Wrap the pipeline's host-resident models in the placement the policy plans for them: one
    placement per GPU of its device map. Returns the denoising device's placement."""
    device_map = pipeline.device_map
    components = pipeline.components()
    parts = device_map.split(measure(components), pipeline.stages)
    for where, (sizes, stages) in parts.items():
        if where.type != "cuda":  # host memory is not planned: those stages stay where they loaded
            continue
        names = {size.name for size in sizes}
        plan = memory.plan(sizes, stages, plan_counts(request))
        logger.info("Memory plan for %s (%s):\n%s", where, memory.describe(), plan)
        mine = [component for component in components if component.name in names]
        placement = PipelinePlacement(mine, stages, plan, where).attach()
        pipeline.placements.append(placement)
        if where == pipeline.device:
            pipeline.placement = placement
    return pipeline.placement
