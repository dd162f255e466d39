"""Load the DiT and the autoencoder from checkpoint files, strictly and without copies.

:func:`load_flow_model` is the one DiT loader: it builds the model on the meta device (no memory,
no random initialisation) and fills it from the file through :func:`flux.checkpoint.load_safetensors_strict`.
Whether the file holds plain weights, weights to quantise to fp8 as they are read
(:class:`flux.quant.NativeFp8Format`) or XLabs' quanto checkpoint (:class:`flux.quant.QuantoFormat`)
is the ``fmt`` argument: a per-tensor transform of that one path. Any key mismatch is an error
naming the keys, with a hint when the file is recognisably another model or layout.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from flux.autoencoder import AutoEncoder, AutoEncoderParams
from flux.checkpoint import PLAIN, CheckpointFormat, load_safetensors_strict
from flux.model import Flux, FluxParams

logger = logging.getLogger(__name__)


def layout_hint(keys: set[str]) -> str:
    """Recognise common wrong files by their keys, to tell the user what they gave us."""
    if any(k.endswith("._data") or k.endswith("._scale") for k in keys):
        return "This looks like a quanto fp8 checkpoint: load it with --fp8 --fp8_mode quanto."
    if any(k.startswith("transformer_blocks.") or k.startswith("single_transformer_blocks.") for k in keys):
        return (
            "This looks like a diffusers-format transformer: use the original single-file "
            "checkpoint (e.g. flux1-dev.safetensors) instead."
        )
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "This looks like a ComfyUI/SD-style checkpoint with a 'model.diffusion_model.' prefix."
    if any(k.startswith("pulid_") for k in keys):
        return "This is a PuLID weight file, not a FLUX checkpoint."
    has_dit = any(k.startswith("double_blocks.") for k in keys)
    if any(k.startswith(("encoder.", "decoder.")) for k in keys) and not has_dit:
        return "This looks like an autoencoder checkpoint (ae.safetensors)."
    if has_dit and not any(k.startswith("guidance_in.") for k in keys):
        return "This transformer has no guidance embedding: it looks like FLUX.1-schnell (not supported)."
    if has_dit:
        return "This looks like a FLUX transformer (flux1-dev.safetensors)."
    return ""


def dit_hint(keys: set[str]) -> str:
    """:func:`layout_hint` for a file given as the transformer (silent when it looks like one)."""
    hint = layout_hint(keys)
    return "" if hint.startswith("This looks like a FLUX transformer") else hint


def ae_hint(keys: set[str]) -> str:
    """:func:`layout_hint` for a file given as the autoencoder (silent when it looks like one)."""
    hint = layout_hint(keys)
    return "" if hint.startswith("This looks like an autoencoder") else hint


def build_flow_model(
    params: FluxParams, device: torch.device | str = "meta", dtype: torch.dtype = torch.bfloat16
) -> Flux:
    with torch.device(device):
        return Flux(params).to(dtype)


def load_flow_model(
    path: str | os.PathLike,
    params: FluxParams,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    fmt: CheckpointFormat = PLAIN,
) -> Flux:
    """The FLUX DiT from a single-file checkpoint in the official (BFL) key layout.

    ``fmt`` turns the file's tensors into the model's (see :mod:`flux.checkpoint`); the default
    casts plain weights to ``dtype``. The peak memory is the model plus one tensor of the file.
    """
    path = Path(path)
    model = build_flow_model(params, "meta", dtype)
    logger.info("Loading the transformer from %s onto %s (%s, %s)", path, device, dtype, type(fmt).__name__)
    load_safetensors_strict(model, path, device=device, dtype=dtype, fmt=fmt, hint=dit_hint)
    return model.eval().requires_grad_(False)


def load_autoencoder(
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
    load_safetensors_strict(ae, path, device=device, dtype=dtype, hint=ae_hint)
    return ae.eval().requires_grad_(False)
