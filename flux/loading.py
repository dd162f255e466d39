"""Load the DiT and the autoencoder from checkpoint files, strictly and without copies.

:func:`load_flow_model` is the one DiT loader: it builds the model on the meta device (no memory,
no random initialisation) and fills it from the file through :func:`flux.checkpoint.load_checkpoint_strict`.
Whether the file holds plain weights, weights to quantise to fp8 as they are read
(:class:`flux.quant.NativeFp8Format`) or XLabs' quanto checkpoint (:class:`flux.quant.QuantoFormat`)
is the ``fmt`` argument: a per-tensor transform of that one path. Single files that people already
have (city96's GGUF files, Kijai's fp8 file) are read by the same path: :func:`open_dit_file` opens
them and :func:`single_file_format` picks their format from their contents. Any key mismatch is an error
naming the keys, with a hint when the file is recognisably another model or layout.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from flux.autoencoder import AutoEncoder, AutoEncoderParams
from flux.checkpoint import PLAIN, CheckpointFormat, RenamedFile
from flux.headers import layout_hint
from flux.model import Flux, FluxParams
from flux.strict_load import load_checkpoint_strict, open_checkpoint

logger = logging.getLogger(__name__)


# Prefixes that ComfyUI-style files put before the official names; stripped when every key has one.
DIT_PREFIXES = ("model.diffusion_model.",)
FLUX_GGUF_ARCHITECTURES = ("flux",)


def dit_hint(keys: set[str]) -> str:
    """:func:`layout_hint` for a file given as the transformer (silent when it looks like one)."""
    hint = layout_hint(keys)
    return "" if hint.startswith("This looks like a FLUX transformer") else hint


def ae_hint(keys: set[str]) -> str:
    """:func:`layout_hint` for a file given as the autoencoder (silent when it looks like one)."""
    hint = layout_hint(keys)
    return "" if hint.startswith("This looks like an autoencoder") else hint


def open_dit_file(path: str | os.PathLike):
    """A DiT checkpoint (safetensors or GGUF) opened under the official key names.

    A GGUF labelled as another architecture is refused here; a ``model.diffusion_model.`` prefix on
    every key is stripped. Only the header is read.
    """
    file = open_checkpoint(path)
    if file.kind == "gguf":
        file.expect_architecture(FLUX_GGUF_ARCHITECTURES, "the FLUX.1 transformer")
    for prefix in DIT_PREFIXES:
        if file.header and all(key.startswith(prefix) for key in file.header):
            return RenamedFile(file, lambda key, prefix=prefix: key[len(prefix) :])
    return file


def single_file_format(file, compute_device: torch.device | str) -> CheckpointFormat:
    """The format of a DiT file as its contents say: GGUF, an fp8 e4m3fn file, or plain weights.

    fp8 files keep the block Linears in fp8; on devices without fp8 matrix units their weights
    are upcast per layer as they run ("dequantize") instead of using fp8 products.
    """
    from flux.quant import fp8_linear_names, fp8_matmul_supported
    from flux.quant.stored import format_for_file

    backend = "auto" if fp8_matmul_supported(torch.device(compute_device)) else "dequantize"
    return format_for_file(file, lambda module, header: fp8_linear_names(module), backend)


def build_flow_model(
    params: FluxParams, device: torch.device | str = "meta", dtype: torch.dtype = torch.bfloat16
) -> Flux:
    """The DiT of ``params`` in ``dtype``, built on ``device`` (default ``meta``: no memory, for loading
    into)."""
    with torch.device(device):
        return Flux(params).to(dtype)


def load_flow_model(
    path,
    params: FluxParams,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    fmt: CheckpointFormat = PLAIN,
) -> Flux:
    """The FLUX DiT from a single-file checkpoint in the official (BFL) key layout.

    ``path`` is a file or one opened by :func:`open_dit_file`. ``fmt`` turns the file's tensors
    into the model's (see :mod:`flux.checkpoint`; :func:`single_file_format` picks it from the
    file); the default casts plain weights to ``dtype``. The peak memory is the model plus one
    tensor of the file.
    """
    source = path if hasattr(path, "header") else Path(path)
    model = build_flow_model(params, "meta", dtype)
    where = getattr(source, "path", source)
    logger.info("Loading the transformer from %s onto %s (%s, %s)", where, device, dtype, type(fmt).__name__)
    load_checkpoint_strict(model, source, device=device, dtype=dtype, fmt=fmt, hint=dit_hint)
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
    load_checkpoint_strict(ae, path, device=device, dtype=dtype, hint=ae_hint)
    return ae.eval().requires_grad_(False)
