"""fp8 for the DiT: XLabs' quanto checkpoint (compatibility) and a native fp8 fast path (Hopper/Ada).

optimum-quanto is imported only when the quanto checkpoint is loaded (``requirements-fp8.txt``).
"""

from flux.quant.fp8_linear import Fp8Linear, fp8_matmul_supported, quantize_rowwise
from flux.quant.fp8_model import (
    FP8_BLOCKS,
    FP8_MODULATION,
    fp8_linear_names,
    load_flow_model_fp8,
    quantize_linears_to_fp8,
)
from flux.quant.quanto_compat import (
    load_quanto_fp8_flow,
    load_quanto_fp8_flow_model,
    read_quantization_map,
    xlabs_quantization_map,
)

__all__ = [
    "FP8_BLOCKS",
    "FP8_MODULATION",
    "Fp8Linear",
    "fp8_linear_names",
    "fp8_matmul_supported",
    "load_flow_model_fp8",
    "load_quanto_fp8_flow",
    "load_quanto_fp8_flow_model",
    "quantize_linears_to_fp8",
    "quantize_rowwise",
    "read_quantization_map",
    "xlabs_quantization_map",
]
