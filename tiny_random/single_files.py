"""Write the single files people use on small cards, from any model: GGUF (through the ``gguf``
package's writer) and fp8 e4m3fn safetensors (plain or ComfyUI's scaled layout).

Tests write tiny models this way and load them back through the product's loaders; the GPU
benchmark writes the full-size random DiT in each format. :func:`city96_types` chooses types the
way city96's FLUX files do: 2-D weights of the repeated blocks in the chosen type (F16 where a row
does not divide into its blocks), the embedders and the final layer in F16, 1-D tensors in F32.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flux.quant.ggml import FORMATS
from tiny_random.ggml_quant import quantize

FLUX_HIGH_PRECISION = ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")


def city96_types(state: Mapping[str, Tensor], qtype: str) -> dict[str, str]:
    """Key -> GGUF type, as city96's converter assigns them for ``qtype`` (see the module doc)."""
    types = {}
    for key, tensor in state.items():
        if tensor.dim() < 2:
            types[key] = "F32"
        elif key.startswith(FLUX_HIGH_PRECISION) or tensor.shape[-1] % FORMATS[qtype].block_size:
            types[key] = "F16"
        else:
            types[key] = qtype
    return types


def write_gguf(
    path: str | os.PathLike,
    state: Mapping[str, Tensor],
    types: Mapping[str, str],
    architecture: str = "flux",
    metadata: Mapping[str, str | int] | None = None,
) -> Path:
    """``state`` (name -> float tensor) as a GGUF file, each tensor in ``types[name]``."""
    import gguf

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), architecture)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    for name, tensor in state.items():  # quantised where the tensor is (a GPU is much faster)
        kind = types[name]
        tensor = tensor.detach()
        if kind == "F32":
            writer.add_tensor(name, tensor.float().cpu().numpy())
        elif kind == "F16":
            writer.add_tensor(name, tensor.half().cpu().numpy())
        elif kind == "BF16":
            raw = tensor.bfloat16().view(torch.int16).cpu().numpy().view(np.uint8)
            writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            rows = tensor.reshape(-1, tensor.shape[-1])
            raw = quantize(rows, kind).reshape(*tensor.shape[:-1], -1).cpu().numpy()
            writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_t5_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A transformers T5 encoder state under llama.cpp's GGUF names (city96's T5 files), with the
    one embedding table those files keep."""
    from flux.text_encoders import T5_GGUF_NAMES

    out = {}
    for key, value in state.items():
        if key == "encoder.embed_tokens.weight":
            continue
        for gguf_name, hf_name in reversed(T5_GGUF_NAMES):
            key = key.replace(hf_name, gguf_name)
        out[key] = value
    return out


def fp8_state(
    state: Mapping[str, Tensor], fp8_keys: set[str] | None = None, scaled: bool = False
) -> dict[str, Tensor]:
    """``state`` with the ``fp8_keys`` weights (default: every 2-D weight) in float8_e4m3fn.

    Plain: a direct cast, as Kijai's files are. Scaled (ComfyUI's layout): each weight divided by
    a per-tensor scale (its absmax / 448) before the cast, with ``<layer>.scale_weight`` beside it
    and a ``scaled_fp8`` marker.
    """
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        chosen = key in fp8_keys if fp8_keys is not None else tensor.dim() == 2 and key.endswith(".weight")
        if not chosen:
            out[key] = tensor
            continue
        if scaled:
            scale = (tensor.float().abs().amax() / 448).clamp(min=1e-12)
            out[key] = (tensor.float() / scale).to(torch.float8_e4m3fn)
            out[key[: -len(".weight")] + ".scale_weight"] = scale.reshape(())
        else:
            out[key] = tensor.float().to(torch.float8_e4m3fn)
    if scaled:
        out["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    return out


def fp8_reference(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The float64 weights an fp8 file of :func:`fp8_state` stands for (codes times scale)."""
    out = {}
    for key, tensor in state.items():
        if key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input")):
            continue
        value = tensor.double()
        scale_key = key[: -len(".weight")] + ".scale_weight"
        if tensor.dtype == torch.float8_e4m3fn and scale_key in state:
            value = value * state[scale_key].double()
        out[key] = value
    return out


def gguf_reference(path: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of a GGUF as float64, dequantised by the ``gguf`` package's numpy code (the
    independent reference for :mod:`flux.quant.ggml`)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for info in reader.tensors:
        shape = tuple(int(d) for d in reversed(info.shape.tolist()))
        values = gguf.quants.dequantize(np.asarray(info.data), info.tensor_type)
        out[info.name] = torch.from_numpy(np.asarray(values, dtype=np.float64).reshape(shape))
    return out
