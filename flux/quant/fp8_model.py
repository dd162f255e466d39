"""Put :class:`Fp8Linear` into the DiT: in place, or while the one DiT loader reads the bf16 checkpoint.

Which layers: every ``nn.Linear`` inside the model's declared repeated blocks (for FLUX the double
and single blocks, see :mod:`flux.repeated`), the adaLN modulation
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

from collections.abc import Sequence
from fnmatch import fnmatch

import torch
from torch import Tensor, nn

from flux.checkpoint import CheckpointFormat, Header, TensorSpec, cast
from flux.quant.fp8_linear import Fp8Linear, quantize_rowwise
from flux.quant.swap import swap_module
from flux.repeated import repeated_blocks

# Patterns (fnmatch, on the name inside a block) of layers to keep in high precision when asked.
FP8_MODULATION = ("*_mod.lin", "modulation.lin")


def fp8_linear_names(model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
    """Names of the ``nn.Linear`` layers inside ``model``'s repeated blocks, minus ``exclude`` patterns.

    ``exclude`` patterns match the name inside a block (``img_mod.lin``, ``linear1``...).
    """
    names = []
    for prefix, block in repeated_blocks(model):
        for name, module in block.named_modules():
            if type(module) is nn.Linear and not any(fnmatch(name, p) for p in exclude):
                names.append(f"{prefix}.{name}")
    return names


def quantize_linears_to_fp8(model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
    """Replace the block Linears (see :func:`fp8_linear_names`) by :class:`Fp8Linear`, in place.

    Works on a loaded model or on one built on the meta device. Returns the replaced names.
    """
    names = fp8_linear_names(model, exclude)
    for name in names:
        swap_module(model, name, Fp8Linear.from_linear(model.get_submodule(name)))
    return names


class NativeFp8Format(CheckpointFormat):
    """The official bf16 checkpoint, with the block Linears quantised to fp8 as they are read.

    No bf16 copy of the model exists: each block weight is read onto the device, quantised and
    dropped, so the peak is the fp8 model plus one bf16 tensor.
    """

    def __init__(self, exclude: Sequence[str] = ()):
        self.exclude = tuple(exclude)
        self.quantized: set[str] = set()

    def prepare(self, module: nn.Module, header: Header) -> None:
        self.quantized = set(quantize_linears_to_fp8(module, self.exclude))

    def file_layout(self, module: nn.Module) -> dict[str, TensorSpec]:
        layout = {}
        for key, tensor in module.state_dict().items():
            owner, _, leaf = key.rpartition(".")
            if owner in self.quantized and leaf == "weight_scale":
                continue  # made here, not read
            if owner in self.quantized and leaf == "weight":
                layout[key] = TensorSpec(tuple(tensor.shape))  # a float weight in the file
            else:
                layout[key] = TensorSpec.of(tensor)
        return layout

    def convert(
        self, key: str, tensor: Tensor, device: torch.device | str, dtype: torch.dtype | None
    ) -> dict[str, Tensor]:
        owner, _, leaf = key.rpartition(".")
        if leaf == "weight" and owner in self.quantized:
            codes, scale = quantize_rowwise(cast(tensor, device, dtype))
            return {key: codes, f"{owner}.weight_scale": scale}
        return {key: cast(tensor, device, dtype)}
