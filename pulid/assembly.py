"""One place where a pipeline is put together from its models, however they were made.

The official files (:func:`pulid.loading.load_pipeline`), the meta device for memory planning
(:func:`pulid.loading.meta_pipeline`), tiny random weights (the ``tiny-random`` preset and the
tests) and full-size random weights (the benchmarks) all give a :class:`PipelineModels`;
:func:`assemble_pipeline` wires the ID encoder, the LoRA slots and folder and the placement
options the same way for each.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flux.autoencoder import AutoEncoder
from flux.lora import LoRAAdapters
from flux.model import Flux
from flux.offload.device_map import DeviceMap
from flux.parallel import SequenceParallelFlux
from pulid.encoders import PuLIDWeights
from pulid.id_encoder import FaceAnalyzing, IDEncoder
from pulid.loras import LoRALibrary
from pulid.pipeline import PuLIDFluxPipeline


@dataclass
class PipelineModels:
    """The models of a pipeline. A pipeline that only decodes (the parity tests, the decoding
    benchmark) has the autoencoder alone: the others are None."""

    ae: AutoEncoder
    dit: Flux | None = None
    t5: nn.Module | None = None
    clip: nn.Module | None = None
    pulid: PuLIDWeights | None = None
    eva: nn.Module | None = None
    face_analyzer: FaceAnalyzing | None = None


def assemble_pipeline(
    models: PipelineModels,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    *,
    info: dict | None = None,
    lora_folder: str | os.PathLike | None = None,
    models_dir: str | os.PathLike | None = None,
    allow_download: bool = False,
    lora_slots: bool = False,
    device_map: DeviceMap | None = None,
    parallel: SequenceParallelFlux | None = None,
) -> PuLIDFluxPipeline:
    """The pipeline of ``models``, denoising on ``device``; the ID stage runs where ``device_map``
    puts it. ``lora_folder``: LoRA slots in the DiT and the folder LoRAs are listed from (hub
    references fetched into ``models_dir`` when ``allow_download``); ``lora_slots`` alone gives
    the slots without a folder (a benchmark applies LoRA files by path)."""
    id_encoder = None
    if models.pulid is not None:
        id_device = device_map.device_of("id") if device_map is not None else device
        id_encoder = IDEncoder(models.face_analyzer, models.eva, models.pulid.pulid_encoder, id_device, dtype)
    adapters = library = None
    if lora_folder is not None or lora_slots:
        adapters = LoRAAdapters(models.dit, device, dtype)
    if lora_folder is not None:
        library = LoRALibrary(
            Path(lora_folder), adapters.targets, models_dir=models_dir, allow_download=allow_download
        )
    return PuLIDFluxPipeline(
        dit=models.dit,
        ae=models.ae,
        t5=models.t5,
        clip=models.clip,
        pulid_ca=None if models.pulid is None else models.pulid.pulid_ca,
        id_encoder=id_encoder,
        device=device,
        dtype=dtype,
        info=info,
        lora_adapters=adapters,
        lora_library=library,
        device_map=device_map,
        parallel=parallel,
    )
