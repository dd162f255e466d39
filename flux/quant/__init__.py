"""fp8 for the DiT: a native fp8 fast path (Hopper/Ada) and XLabs' quanto checkpoint (compatibility).

Both are :class:`~flux.checkpoint.CheckpointFormat` s of the one DiT loader
(:func:`flux.loading.load_flow_model`). optimum-quanto is imported only when the quanto checkpoint
is loaded (``requirements-fp8.txt``).
"""

from flux.quant.fp8_linear import Fp8Linear, fp8_matmul_supported, quantize_rowwise
from flux.quant.fp8_model import (
    FP8_MODULATION,
    NativeFp8Format,
    fp8_linear_names,
    quantize_linears_to_fp8,
)
from flux.quant.quanto_compat import (
    QuantoFormat,
    quanto_format,
    read_quantization_map,
    xlabs_quantization_map,
)

__all__ = [
    "FP8_MODULATION",
    "Fp8Linear",
    "NativeFp8Format",
    "QuantoFormat",
    "fp8_linear_names",
    "fp8_matmul_supported",
    "quantize_linears_to_fp8",
    "quantize_rowwise",
    "quanto_format",
    "read_quantization_map",
    "xlabs_quantization_map",
]
