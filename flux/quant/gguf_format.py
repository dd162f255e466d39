"""The GGUF checkpoint format of the one loader: block-quantised Linear weights stay quantised.

For every ``nn.Linear`` whose weight the file holds in a GGML block format, the (meta-device)
module gets a :class:`~flux.quant.ggml.GGMLLinear` of that format, filled with the file's bytes.
Other tensors stored in a block format (an embedding table, as in llama.cpp's T5 files) are
dequantised once, at load, to the model's dtype; F32/F16/BF16 tensors are cast as usual. Which
layers are quantised therefore follows the file: city96's FLUX files keep the embedders, the final
layer and the 1-D norms and biases in F16/F32 and quantise the rest.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flux.checkpoint import FLOAT_CODES, CheckpointFormat, Header, TensorSpec, cast
from flux.quant.ggml import FORMATS, GGMLLinear, dequantize
from flux.quant.swap import swap_module

STORED_CODES = FLOAT_CODES | frozenset(FORMATS)


class GGUFFormat(CheckpointFormat):
    """Read a GGUF file (see :mod:`flux.gguf_file`) into a module, keeping quantised Linears quantised."""

    def __init__(self) -> None:
        self.quantized: dict[str, str] = {}  # Linear name -> its GGML type
        self.types: dict[str, str] = {}  # file key -> type name
        self.shapes: dict[str, tuple[int, ...]] = {}

    def prepare(self, module: nn.Module, header: Header) -> None:
        self.types = {key: code for key, (_, code) in header.items()}
        self.shapes = {key: tuple(shape) for key, (shape, _) in header.items()}
        self.quantized = {}
        for name, layer in list(module.named_modules()):
            qtype = self.types.get(f"{name}.weight")
            if type(layer) is nn.Linear and qtype in FORMATS:
                if layer.in_features % FORMATS[qtype].block_size:
                    continue  # the header check reports the shape
                swap_module(module, name, GGMLLinear.like(layer, qtype))
                self.quantized[name] = qtype

    def file_layout(self, module: nn.Module) -> dict[str, TensorSpec]:
        layout = {}
        for key, tensor in module.state_dict().items():
            owner, _, leaf = key.rpartition(".")
            if owner in self.quantized and leaf == "weight":
                layer = module.get_submodule(owner)
                layout[key] = TensorSpec(
                    (layer.out_features, layer.in_features), frozenset({self.quantized[owner]})
                )
            elif tensor.is_floating_point():
                layout[key] = TensorSpec(tuple(tensor.shape), STORED_CODES)
            else:
                layout[key] = TensorSpec.of(tensor)
        return layout

    def convert(
        self, key: str, tensor: Tensor, device: torch.device | str, dtype: torch.dtype | None
    ) -> dict[str, Tensor]:
        owner, _, leaf = key.rpartition(".")
        if leaf == "weight" and owner in self.quantized:
            return {key: tensor.to(device).view(torch.int8)}
        qtype = self.types.get(key)
        if qtype in FORMATS:
            return {key: dequantize(tensor.to(device), qtype, self.shapes[key], dtype or torch.float32)}
        return {key: cast(tensor, device, dtype)}
