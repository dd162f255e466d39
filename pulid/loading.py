"""Load the full PuLID-FLUX pipeline from the official weight files.

Each file is resolved (explicit path, ``models/``, then the Hugging Face cache) and loaded
strictly; a missing file raises :class:`flux.hub.WeightsNotFoundError` that says where to get it,
and a mismatched one :class:`flux.checkpoint.CheckpointError` that names the keys. The files are
all checked for presence before any large one is loaded, so the user learns everything that is
missing at once instead of after minutes of loading.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from eva_clip.model import EVA_CLIP_WEIGHTS, load_eva_clip
from flux.hub import WeightFile, WeightsNotFoundError, default_models_dir, resolve_weight
from flux.loading import load_autoencoder_from_file, load_flow_model_from_file
from flux.registry import get_model_spec
from flux.text_encoders import load_clip, load_t5
from pulid.encoders import load_pulid_weights, num_pulid_ca
from pulid.id_encoder import IDEncoder
from pulid.pipeline import PuLIDFluxPipeline
from pulid.weights import DEFAULT_VERSION, pulid_weight_file

logger = logging.getLogger(__name__)


def resolve_all(
    specs: dict[str, tuple[WeightFile, str | os.PathLike | None]], models_dir: Path
) -> dict[str, Path]:
    """Resolve every file first; report all that are missing in one error."""
    paths, problems = {}, []
    for key, (spec, explicit) in specs.items():
        try:
            paths[key] = resolve_weight(spec, explicit, models_dir)
        except WeightsNotFoundError as err:
            problems.append(str(err))
    if problems:
        raise WeightsNotFoundError("\n\n".join(problems))
    return paths


def load_pipeline(
    model_name: str = "flux-dev",
    version: str = DEFAULT_VERSION,
    device: torch.device | str = "cuda",
    *,
    dtype: torch.dtype = torch.bfloat16,
    onnx_provider: str = "gpu",
    pretrained_model: str | os.PathLike | None = None,
    models_dir: str | os.PathLike | None = None,
    fp8: str | None = None,
    compile_blocks: bool = False,
    vram_budget_gb: float | None = None,
    offload: bool = False,
    aggressive_offload: bool = False,
) -> PuLIDFluxPipeline:
    """The whole stack on ``device``, resident (memory modes wrap it; see the performance issue).

    ``fp8``: None (bf16), ``"native"`` (the bf16 checkpoint quantised to fp8 at load, computed with
    the GPU's fp8 matrix units; needs Ada/Hopper), ``"quanto"`` (XLabs' fp8 checkpoint through
    optimum-quanto) or ``"auto"`` (native where supported, else quanto). ``compile_blocks``
    compiles the repeated DiT and PuLID blocks with torch.compile.

    Memory: with ``vram_budget_gb``, ``offload`` or ``aggressive_offload`` the weights load into
    host memory and a :class:`~flux.offload.placement.PipelinePlacement` wraps the models, moving
    them (or streaming the DiT's and T5's blocks) to ``device`` stage by stage, within the plan
    that :func:`~flux.offload.plan.plan_from_flags` makes; the plan is logged as a table.
    """
    from pulid.face_analysis import FaceAnalyzer

    spec = get_model_spec(model_name)
    models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
    fp8 = resolve_fp8_mode(fp8, device)
    flow_file = spec.fp8_flow if fp8 == "quanto" else spec.flow
    if flow_file is None:
        raise ValueError(f"There is no fp8 checkpoint for {model_name}: use --fp8 native or bf16.")
    paths = resolve_all(
        {
            "flow": (flow_file, None),
            "ae": (spec.ae, None),
            "pulid": (pulid_weight_file(version), pretrained_model),
            "eva": (EVA_CLIP_WEIGHTS, None),
        },
        models_dir,
    )
    placed = vram_budget_gb is not None or offload or aggressive_offload
    weights_device = "cpu" if placed else device
    face_analysis = FaceAnalyzer(models_dir=models_dir, onnx_provider=onnx_provider, device=device)
    t5 = load_t5(weights_device, dtype, max_length=512, models_dir=models_dir)
    clip = load_clip(weights_device, dtype, models_dir=models_dir)
    if fp8 == "quanto":
        from flux.quant import load_quanto_fp8_flow

        flow = load_quanto_fp8_flow(spec, weights_device, path=paths["flow"], models_dir=models_dir)
    elif fp8 == "native":
        from flux.quant import load_flow_model_fp8

        flow = load_flow_model_fp8(paths["flow"], spec.params, weights_device, dtype)
    else:
        flow = load_flow_model_from_file(paths["flow"], spec.params, weights_device, dtype)
    ae = load_autoencoder_from_file(paths["ae"], spec.ae_params, weights_device)
    pulid = load_pulid_weights(
        paths["pulid"],
        device=weights_device,
        dtype=dtype,
        num_ca=num_pulid_ca(spec.params.depth, spec.params.depth_single_blocks),
    )
    eva = load_eva_clip(paths["eva"], weights_device, dtype, models_dir=models_dir)
    id_encoder = IDEncoder(face_analysis, eva, pulid.pulid_encoder, device, dtype)
    if compile_blocks:
        from flux.compile import compile_blocks as compile_repeated_blocks

        compile_repeated_blocks(flow)
        compile_repeated_blocks(pulid.pulid_ca)
    pipeline = PuLIDFluxPipeline(
        flow=flow,
        ae=ae,
        t5=t5,
        clip=clip,
        pulid_ca=pulid.pulid_ca,
        id_encoder=id_encoder,
        device=device,
        dtype=dtype,
        info={"model": model_name, "pulid_version": version, "fp8": fp8 or "off"},
    )
    if placed:
        place_pipeline(pipeline, device, vram_budget_gb, offload, aggressive_offload)
    return pipeline


def place_pipeline(
    pipeline: PuLIDFluxPipeline,
    device: torch.device | str,
    vram_budget_gb: float | None,
    offload: bool,
    aggressive_offload: bool,
) -> None:
    """Wrap the pipeline's host-resident models in the memory placement the flags ask for."""
    from flux.offload import PipelinePlacement, plan_from_flags
    from flux.offload.placement import component_sizes

    plan = plan_from_flags(
        component_sizes(pipeline),
        vram_budget_gb=vram_budget_gb,
        offload=offload,
        aggressive_offload=aggressive_offload,
    )
    logger.info("Memory plan:\n%s", plan)
    pipeline.placement = PipelinePlacement(pipeline, plan, device).attach()


FP8_MODES = ("auto", "native", "quanto")


def resolve_fp8_mode(fp8: str | None, device: torch.device | str) -> str | None:
    """``auto`` becomes ``native`` on GPUs with fp8 matrix units (Ada, Hopper), else ``quanto``."""
    if fp8 is None:
        return None
    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8 mode must be one of {', '.join(FP8_MODES)}, not {fp8!r}")
    if fp8 == "auto":
        from flux.quant import fp8_matmul_supported

        return "native" if fp8_matmul_supported(torch.device(device)) else "quanto"
    return fp8
