"""A whole PuLID-FLUX pipeline with tiny random weights: no download, seconds on a CPU.

Every component is the real class at a tiny size, loaded or called through the same code as the
full models. The images it makes are noise; it exists so that tests (and anyone checking the UI)
can run the complete path without the 35 GB of real weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from eva_clip.model import EvaVisionTower
from flux.autoencoder import AutoEncoder
from flux.model import Flux
from pulid.assembly import PipelineModels, assemble_pipeline
from pulid.encoders import PuLIDWeights, num_pulid_ca
from pulid.id_encoder import FaceAnalyzing
from pulid.pipeline import PuLIDFluxPipeline
from tiny_random.models import tiny_ae_params, tiny_flux_params, tiny_text_encoders

TINY_EVA = dict(img_size=336, patch_size=28, embed_dim=32, depth=6, num_heads=4, num_classes=24)
TINY_IDFORMER = dict(
    dim=32,
    depth=5,
    dim_head=8,
    heads=4,
    num_id_token=2,
    num_queries=8,
    output_dim=48,
    id_dim=512 + TINY_EVA["num_classes"],
    vit_dim=TINY_EVA["embed_dim"],
    mapping_dim=32,
)
TINY_CA = dict(dim=64, dim_head=16, heads=4, kv_dim=48)


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights with non-trivial norms, so every layer changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1 and ("norm" in name or name.endswith("scale")):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(noise / max(param.shape[-1], 1) ** 0.5)
    return module


def tiny_pipeline(
    folder: Path,
    face_analyzer: FaceAnalyzing,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> PuLIDFluxPipeline:
    """Build the tiny pipeline; text-encoder files are written under ``folder`` once. Its LoRA
    folder is ``folder/loras`` (nothing is ever downloaded for it)."""
    params = tiny_flux_params()
    t5, clip = tiny_text_encoders(folder, device, dtype)
    dit = _randomise(Flux(params), seed).to(device, dtype).eval()
    ae = _randomise(AutoEncoder(tiny_ae_params()), seed + 1).to(device).eval()
    weights = PuLIDWeights(
        num_pulid_ca(params.depth, params.depth_single_blocks),
        encoder_kwargs=TINY_IDFORMER,
        ca_kwargs=TINY_CA,
    )
    weights = _randomise(weights, seed + 2).to(device, dtype).eval()
    eva = _randomise(EvaVisionTower(**TINY_EVA), seed + 3).to(device, dtype).eval()
    return assemble_pipeline(
        PipelineModels(ae, dit, t5, clip, weights, eva, face_analyzer),
        device,
        dtype,
        info={"model": "tiny-random", "pulid_version": "tiny-random"},
        lora_folder=Path(folder) / "loras",
    )


def build_tiny_face_models(models_dir: Path) -> Path:
    """Write the stand-in antelopev2 and facexlib files into ``models_dir`` (skipped if present)."""
    from tiny_random.face_models import build_antelopev2, build_facexlib_models
    from tiny_random.models import written_once

    models_dir = Path(models_dir)
    written_once(models_dir / "antelopev2", build_antelopev2)
    written_once(models_dir / "facexlib", build_facexlib_models)
    return models_dir


def tiny_face_model_paths(models_dir: Path) -> dict[str, Path]:
    """The stand-in face models (built once) by catalogue role, at their catalogue places."""
    from pulid.catalogue import FACE_MODEL_ROLES, ID_MODELS

    build_tiny_face_models(models_dir)
    places = {entry.role: entry.weights.local_path(models_dir) for entry in ID_MODELS}
    return {role: places[role] for role in FACE_MODEL_ROLES}


def tiny_face_analyzer(models_dir: Path):
    """The real :class:`pulid.face_analysis.FaceAnalyzer` over the stand-in face models, on CPU."""
    from pulid.face_analysis import load_face_analyzer

    return load_face_analyzer(tiny_face_model_paths(Path(models_dir)), onnx_provider="cpu", device="cpu")


def tiny_pipeline_with_face_models(folder: Path, seed: int = 0) -> PuLIDFluxPipeline:
    """The ``tiny-random`` preset: tiny random DiT, AE, encoders and the real face-analysis code."""
    folder = Path(folder)
    pipeline = tiny_pipeline(folder, tiny_face_analyzer(folder / "models"), "cpu", torch.float32, seed)
    from tiny_random.loras import write_example_loras

    write_example_loras(pipeline.lora_library.folder, pipeline.dit)
    return pipeline
