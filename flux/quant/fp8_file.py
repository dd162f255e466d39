"""fp8 single files (Kijai's ``flux1-dev-fp8-e4m3fn``, ComfyUI's T5 fp8 files) loaded as they are.

These files store weights as float8_e4m3fn codes, either plainly (a direct cast) or "scaled": then
each Linear has a float32 ``<layer>.scale_weight`` scalar (the weight is codes x scale), an optional
``<layer>.scale_input`` (used only by ComfyUI's own fp8 matmul; ignored here, as the layers quantise
their activations per token) and the file carries a ``scaled_fp8`` marker tensor.

The selected Linears (``linears``: for the DiT, its block Linears, as with ``--fp8``) become
:class:`~flux.quant.fp8_linear.Fp8Linear` s whose codes are the file's codes and whose row scales
are the file's scale (1 when unscaled): no bf16 copy of the model ever exists. A selected layer that
the file holds in bf16/fp16/fp32 is quantised row-wise as it is read. Any other tensor the file
stores in fp8 (an embedder, a norm) is upcast once, times its scale, to the model's dtype. e5m2
files are refused (their three mantissa-less bits lose too much; use the e4m3fn file).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from flux.checkpoint import FLOAT_CODES, CheckpointFormat, Header, TensorSpec, cast
from flux.quant.fp8_linear import FP8_DTYPE, Backend, Fp8Linear, quantize_rowwise
from flux.quant.swap import swap_module

FP8_CODE = "F8_E4M3"
SCALE_SUFFIXES = (".scale_weight", ".scale_input")
MARKER = "scaled_fp8"


def fp8_weight_names(module: nn.Module, header: Header) -> list[str]:
    """Every ``nn.Linear`` whose weight the file stores in fp8 (the text encoders' selection)."""
    return [
        name
        for name, layer in module.named_modules()
        if type(layer) is nn.Linear and header.get(f"{name}.weight", ((), ""))[1] == FP8_CODE
    ]


class Fp8FileFormat(CheckpointFormat):
    """Load an e4m3fn file, plain or scaled, keeping the ``linears`` layers in fp8 (see the module doc)."""

    def __init__(self, linears: Callable[[nn.Module, Header], Iterable[str]], backend: Backend = "auto"):
        self.linears = linears
        self.backend: Backend = backend
        self.kept: set[str] = set()
        self.header: Header = {}
        self.scales: dict[str, float] = {}

    def prepare(self, module: nn.Module, header: Header) -> None:
        self.header = dict(header)
        self.scales = {}
        self.kept = set()
        for name in self.linears(module, header):
            layer = Fp8Linear.from_linear(module.get_submodule(name))
            layer.backend = self.backend
            swap_module(module, name, layer)
            self.kept.add(name)

    def file_layout(self, module: nn.Module) -> dict[str, TensorSpec]:
        layout = {}
        for key, tensor in module.state_dict().items():
            owner, _, leaf = key.rpartition(".")
            if owner in self.kept and leaf == "weight_scale":
                continue  # from the file's scale, not a tensor of its own
            if owner in self.kept and leaf == "weight" or tensor.is_floating_point():
                layout[key] = TensorSpec(tuple(tensor.shape), FLOAT_CODES | {FP8_CODE})
            else:
                layout[key] = TensorSpec.of(tensor)
        owners = {key.rpartition(".")[0] for key in layout if key.endswith(".weight")}
        for key, (shape, _) in self.header.items():  # the scaled format's extra tensors, where present
            owner = next((key[: -len(s)] for s in SCALE_SUFFIXES if key.endswith(s)), None)
            if owner in owners and math.prod(shape) == 1:
                layout[key] = TensorSpec(tuple(shape), FLOAT_CODES)
            elif key == MARKER:
                layout[key] = TensorSpec(tuple(shape), FLOAT_CODES | {FP8_CODE, "F8_E5M2"})
        return layout

    def read_order(self, header: Header) -> list[str]:
        """Scales first, so each weight can be finished when it is read."""
        scales = [k for k in header if k.endswith(SCALE_SUFFIXES)]
        return scales + [k for k in header if not k.endswith(SCALE_SUFFIXES)]

    def convert(
        self, key: str, tensor: Tensor, device: torch.device | str, dtype: torch.dtype | None
    ) -> dict[str, Tensor]:
        if key == MARKER or key.endswith(".scale_input"):
            return {}
        owner, _, leaf = key.rpartition(".")
        if key.endswith(".scale_weight"):
            self.scales[owner] = float(tensor.float().reshape(()))
            return {}
        scale = self.scales.get(owner, 1.0)
        if owner in self.kept and leaf == "weight":
            if tensor.dtype == FP8_DTYPE:
                rows = tensor.shape[0]
                scales = torch.full((rows, 1), scale, dtype=torch.float32, device=device)
                return {key: tensor.to(device), f"{owner}.weight_scale": scales}
            codes, scales = quantize_rowwise(cast(tensor, device, torch.float32) * scale)
            return {key: codes, f"{owner}.weight_scale": scales}
        if tensor.dtype == FP8_DTYPE:
            return {key: (tensor.to(device).float() * scale).to(dtype or torch.float32)}
        return {key: cast(tensor, device, dtype)}

    def hint(self, keys: set[str]) -> str:
        codes = {code for _, code in self.header.values()}
        if "F8_E5M2" in codes:
            return "This file is fp8 e5m2: use the e4m3fn file (e.g. flux1-dev-fp8-e4m3fn.safetensors)."
        return ""
