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
) -> PuLIDFluxPipeline:
    """The whole stack on ``device``, resident (memory modes wrap it; see the performance issue)."""
    from pulid.face_analysis import FaceAnalyzer

    spec = get_model_spec(model_name)
    models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
    paths = resolve_all(
        {
            "flow": (spec.flow, None),
            "ae": (spec.ae, None),
            "pulid": (pulid_weight_file(version), pretrained_model),
            "eva": (EVA_CLIP_WEIGHTS, None),
        },
        models_dir,
    )
    face_analysis = FaceAnalyzer(models_dir=models_dir, onnx_provider=onnx_provider, device=device)
    t5 = load_t5(device, dtype, max_length=512, models_dir=models_dir)
    clip = load_clip(device, dtype, models_dir=models_dir)
    flow = load_flow_model_from_file(paths["flow"], spec.params, device, dtype)
    ae = load_autoencoder_from_file(paths["ae"], spec.ae_params, device)
    pulid = load_pulid_weights(
        paths["pulid"],
        device=device,
        dtype=dtype,
        num_ca=num_pulid_ca(spec.params.depth, spec.params.depth_single_blocks),
    )
    eva = load_eva_clip(paths["eva"], device, dtype, models_dir=models_dir)
    id_encoder = IDEncoder(face_analysis, eva, pulid.pulid_encoder, device, dtype)
    return PuLIDFluxPipeline(
        flow=flow,
        ae=ae,
        t5=t5,
        clip=clip,
        pulid_ca=pulid.pulid_ca,
        id_encoder=id_encoder,
        device=device,
        dtype=dtype,
        info={"model": model_name, "pulid_version": version},
    )
