"""What a file stores decides how it loads: GGUF blocks, fp8 codes, or plain float weights.

One rule for every single file (the DiT's, T5's, CLIP's): a GGUF keeps its block-quantised Linears
quantised (:class:`~flux.quant.gguf_format.GGUFFormat`); a safetensors file with fp8 tensors keeps
the chosen Linears in fp8 (:class:`~flux.quant.fp8_file.Fp8FileFormat`); anything else is read as
plain weights. The caller says which Linears an fp8 file keeps and how they compute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from flux.checkpoint import PLAIN, CheckpointFormat, Header
from flux.quant.fp8_file import Fp8FileFormat
from flux.quant.fp8_linear import Backend
from flux.quant.gguf_format import GGUFFormat


def format_for_file(
    file, fp8_linears: Callable[[nn.Module, Header], Iterable[str]], fp8_backend: Backend
) -> CheckpointFormat:
    """The format of an opened checkpoint (:func:`flux.checkpoint.open_checkpoint`), from its header."""
    if file.kind == "gguf":
        return GGUFFormat()
    if any(code.startswith("F8_") for _, code in file.header.values()):
        return Fp8FileFormat(fp8_linears, fp8_backend)
    return PLAIN
