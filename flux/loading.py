"""Load the DiT and the autoencoder from the official checkpoints, strictly and without copies.

The model is built on the meta device (no memory, no random init) and each tensor goes from the
safetensors file straight to the target device and dtype. Any key mismatch is an error naming the
keys, with a hint when the file is recognisably another model or layout.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from flux.autoencoder import AutoEncoder, AutoEncoderParams
from flux.checkpoint import load_safetensors_strict
from flux.hub import resolve_weight
from flux.model import Flux, FluxParams
from flux.registry import ModelSpec

logger = logging.getLogger(__name__)


def layout_hint(keys: set[str]) -> str:
    """Recognise common wrong files by their keys, to tell the user what they gave us."""
    if any(k.endswith("._data") or k.endswith("._scale") for k in keys):
        return "This looks like a quanto fp8 checkpoint: load it with --fp8."
    if any(k.startswith("transformer_blocks.") or k.startswith("single_transformer_blocks.") for k in keys):
        return (
            "This looks like a diffusers-format transformer: use the original single-file "
            "checkpoint (e.g. flux1-dev.safetensors) instead."
        )
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "This looks like a ComfyUI/SD-style checkpoint with a 'model.diffusion_model.' prefix."
    if any(k.startswith("encoder.") or k.startswith("decoder.") for k in keys) and not any(
        k.startswith("double_blocks.") for k in keys
    ):
        return "This looks like an autoencoder checkpoint (ae.safetensors), not the transformer."
    if any(k.startswith("double_blocks.") for k in keys) and not any(
        k.startswith("guidance_in.") for k in keys
    ):
        return "This transformer has no guidance embedding: it looks like FLUX.1-schnell (not supported)."
    if any(k.startswith("pulid_") for k in keys):
        return "This is a PuLID weight file, not a FLUX checkpoint."
    return ""


def build_flow_model(
    params: FluxParams, device: torch.device | str = "meta", dtype: torch.dtype = torch.bfloat16
) -> Flux:
    with torch.device(device):
        return Flux(params).to(dtype)


def load_flow_model_from_file(
    path: str | os.PathLike,
    params: FluxParams,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
) -> Flux:
    """Flux from a single-file checkpoint in the official (BFL) key layout."""
    path = Path(path)
    model = build_flow_model(params, "meta", dtype)
    logger.info("Loading the transformer from %s onto %s (%s)", path, device, dtype)
    load_safetensors_strict(model, path, device=device, dtype=dtype, hint=layout_hint)
    return model.eval().requires_grad_(False)


def load_autoencoder_from_file(
    path: str | os.PathLike,
    params: AutoEncoderParams,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> AutoEncoder:
    """AutoEncoder from ``ae.safetensors``; kept in float32 by default (decoding runs under autocast)."""
    path = Path(path)
    with torch.device("meta"):
        ae = AutoEncoder(params)
    logger.info("Loading the autoencoder from %s onto %s", path, device)
    load_safetensors_strict(ae, path, device=device, dtype=dtype, hint=layout_hint)
    return ae.eval().requires_grad_(False)


def load_flow_model(
    spec: ModelSpec,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    path: str | os.PathLike | None = None,
    models_dir: str | os.PathLike | None = None,
) -> Flux:
    """Resolve (explicit path, ``models/``, hub) and load the transformer of ``spec``."""
    return load_flow_model_from_file(resolve_weight(spec.flow, path, models_dir), spec.params, device, dtype)


def load_autoencoder(
    spec: ModelSpec,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    path: str | os.PathLike | None = None,
    models_dir: str | os.PathLike | None = None,
) -> AutoEncoder:
    return load_autoencoder_from_file(
        resolve_weight(spec.ae, path, models_dir), spec.ae_params, device, dtype
    )
