"""Put :class:`Fp8Linear` into the DiT: in place, or while streaming the bf16 checkpoint.

Which layers: every ``nn.Linear`` inside the double and single blocks, the adaLN modulation
included. They hold 99.4% of the DiT's weights and do nearly all its multiply-adds; the embedders
and the final layer stay in their dtype. Measured on the tiny model (6 seeds, default init, float32,
one forward; the blocks account for about 10% of its output): all block Linears gave 0.61% mean
(0.70% max) relative error; keeping the modulation in high precision gave 0.52% (0.61%) but would
keep 3.2 G of the 11.9 G parameters (6.4 GB) in bf16 for no speed gain (the modulation runs on one
token per image), so it is quantised too; pass ``exclude=FP8_MODULATION`` to keep it. Quantising
the embedders and the final layer as well gave 5.1% (5.3%), as the final projection's 3.7% error
lands on the output directly, for 0.6% of the weights: they are left alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from fnmatch import fnmatch
from pathlib import Path

import torch
from torch import nn

from flux.checkpoint import CheckpointError, check_keys_and_shapes, expected_shapes, read_safetensors_header
from flux.model import Flux, FluxParams
from flux.quant.fp8_linear import Fp8Linear, quantize_rowwise

logger = logging.getLogger(__name__)

FP8_BLOCKS = ("double_blocks.*", "single_blocks.*")
FP8_MODULATION = ("*_mod.lin", "*.modulation.lin")


def _selected(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    return any(fnmatch(name, p) for p in include) and not any(fnmatch(name, p) for p in exclude)


def fp8_linear_names(
    model: nn.Module, include: Sequence[str] = FP8_BLOCKS, exclude: Sequence[str] = ()
) -> list[str]:
    """Names of the ``nn.Linear`` modules that :func:`quantize_linears_to_fp8` would replace."""
    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and _selected(name, include, exclude)
    ]


def quantize_linears_to_fp8(
    model: nn.Module, include: Sequence[str] = FP8_BLOCKS, exclude: Sequence[str] = ()
) -> list[str]:
    """Replace the selected ``nn.Linear`` layers (fnmatch patterns on module names) by :class:`Fp8Linear`.

    Works in place on a loaded model or on one built on the meta device. Returns the replaced names.
    """
    names = fp8_linear_names(model, include, exclude)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8Linear.from_linear(getattr(parent, child)))
    return names


def load_flow_model_fp8(
    path: str | os.PathLike,
    params: FluxParams,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    include: Sequence[str] = FP8_BLOCKS,
    exclude: Sequence[str] = (),
) -> Flux:
    """Load the official bf16 checkpoint, quantising the selected Linear weights as they are read.

    Strict like :func:`flux.loading.load_flow_model_from_file` (header checked first), and with no
    bf16 copy of the model: each block weight is read onto ``device``, quantised and dropped, so the
    peak is the fp8 model plus one bf16 tensor.
    """
    from safetensors import SafetensorError, safe_open

    from flux.loading import layout_hint

    path = Path(path)
    header = read_safetensors_header(path)
    with torch.device("meta"):
        model = Flux(params).to(dtype)
    check_keys_and_shapes(
        expected_shapes(model), {k: v[0] for k, v in header.items()}, str(path), layout_hint(set(header))
    )
    quantized = set(quantize_linears_to_fp8(model, include, exclude))
    logger.info("Loading %s onto %s with %d Linear layers in fp8", path, device, len(quantized))
    state = {}
    load_device = str(device) if torch.device(device).type in ("cpu", "cuda") else "cpu"
    try:
        with safe_open(str(path), framework="pt", device=load_device) as handle:
            for key in header:
                tensor = handle.get_tensor(key).to(device=device, dtype=dtype)
                module, _, leaf = key.rpartition(".")
                if leaf == "weight" and module in quantized:
                    state[key], state[f"{module}.weight_scale"] = quantize_rowwise(tensor)
                else:
                    state[key] = tensor
                del tensor
    except SafetensorError as err:
        raise CheckpointError(f"Checkpoint {path} could not be read ({err}): it may be truncated.") from err
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
