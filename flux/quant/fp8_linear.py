"""A Linear layer that computes in float8 (e4m3) with row-wise scales, for Hopper/Ada GPUs.

Weights are quantised once, per output row; activations are quantised on the fly, per token (row),
so one outlier token or channel cannot flatten the resolution of all the others. The product is
``torch._scaled_mm`` with scale_a (M, 1) and scale_b (1, N) in float32, accumulating in float32.

Where that kernel is missing (CPU, GPUs before compute capability 8.9) the layer runs an emulation
of exactly the same arithmetic: the same fp8 codes and scales, the products of the codes summed in
float32 and scaled afterwards. CPU tests therefore check the numbers the GPU path computes.

:func:`quantize_rowwise` is a separate function on purpose: under ``torch.compile`` it fuses with
whatever produced the activation (a LayerNorm and modulation, a GELU), which is what makes fp8 pay
off; done eagerly it costs more than the faster matmul saves (measured for the fp8 work). Measured on
an H100 (torch 2.11, 4160 tokens, LayerNorm + modulation prologue, the DiT's layer shapes): compiled
fp8 layers took 0.28-0.58 ms against 0.34-0.84 ms for compiled bf16 (1.2-1.6x); eager fp8 was slower
than bf16. Eager CUDA and CPU give bit-identical codes and scales; under inductor about 3 codes in
10 million differ by one e4m3 step (its float32 division is not the IEEE one).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# The scale is amax * float32(1/448): one correctly rounded float32 product, so CPU and CUDA give the
# same bits (CUDA turns ``tensor / python_scalar`` into a multiplication by the reciprocal anyway).
FP8_MAX_RECIPROCAL = float(torch.tensor(1.0 / FP8_MAX, dtype=torch.float32))
# Rows of zeros get this scale instead of 0: their codes are then 0 and no division by 0 happens.
MIN_AMAX = 1e-12

Backend = Literal["auto", "scaled_mm", "emulate", "dequantize"]

_FP8_MM_SUPPORT: dict[str, bool] = {}


def quantize_rowwise(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row (last dim) absmax e4m3 quantisation: ``x ~= codes.float() * scale``.

    ``scale = amax * float32(1/448)`` (amax/448 to 1 ulp) in float32 with shape (..., 1); the codes are
    the float32 quotient ``x / scale`` rounded to the nearest e4m3 value (ties to even). Branch-free,
    so torch.compile can fuse it into the producer.
    """
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_AMAX)
    scale = amax * FP8_MAX_RECIPROCAL
    codes = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scale


def fp8_matmul_supported(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` has a row-wise fp8 kernel on ``device`` (CUDA, capability >= 8.9)."""
    if device.type != "cuda":
        return False
    key = str(device)
    if key not in _FP8_MM_SUPPORT:
        _FP8_MM_SUPPORT[key] = torch.cuda.get_device_capability(device) >= (8, 9)
    return _FP8_MM_SUPPORT[key]


def scaled_mm_rowwise(
    x_codes: Tensor, x_scale: Tensor, w_codes: Tensor, w_scale: Tensor, bias: Tensor | None
) -> Tensor:
    """(M, K) x (N, K)^T with ``torch._scaled_mm``; bf16 out (the only row-wise output on CUDA)."""
    return torch._scaled_mm(
        x_codes,
        w_codes.t(),  # (K, N) column-major, as the kernel requires
        scale_a=x_scale,
        scale_b=w_scale.view(1, -1),
        bias=None if bias is None else bias.to(torch.bfloat16),
        out_dtype=torch.bfloat16,
    )


def emulated_mm_rowwise(
    x_codes: Tensor, x_scale: Tensor, w_codes: Tensor, w_scale: Tensor, bias: Tensor | None
) -> Tensor:
    """The arithmetic of :func:`scaled_mm_rowwise` in float32: products of codes are exact there."""
    out = (x_codes.float() @ w_codes.float().t()) * x_scale * w_scale.view(1, -1)
    return out if bias is None else out + bias.float()


class Fp8Linear(nn.Module):
    """``nn.Linear`` with a float8_e4m3fn weight, per-row float32 weight scales and fp8 compute.

    State: ``weight`` (float8_e4m3fn, (out, in)), ``weight_scale`` (float32, (out, 1)) and ``bias``
    in the dtype of the layer it replaces (bf16 for the real model). The output has the input's
    dtype. ``backend``: "auto" uses ``torch._scaled_mm`` where the device supports it and the
    emulation elsewhere; "scaled_mm" and "emulate" force one (for tests and benchmarks);
    "dequantize" is weight-only: the weight is upcast to the input's dtype as the layer runs and
    the activations stay as they are (fp8 files on GPUs without fp8 units, and text encoders,
    whose activations have outliers that per-token fp8 would flatten).

    ``weight`` and ``weight_scale`` keep their dtypes through ``module.to(dtype)``: casting fp8 codes
    or scales to bf16 would silently change the layer; only their device follows ``.to()``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.backend: Backend = "auto"
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        """Quantise ``linear`` (any float dtype, any device including meta) into a new layer."""
        weight = linear.weight.detach()
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=weight.device,
            bias_dtype=weight.dtype,
        )
        layer.set_weight(weight)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    @torch.no_grad()
    def set_weight(self, weight: Tensor) -> None:
        """Quantise a high-precision (out, in) weight into this layer's codes and scales."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight shape {tuple(weight.shape)} != ({self.out_features}, {self.in_features})"
            )
        self.weight, self.weight_scale = quantize_rowwise(weight)

    @torch.no_grad()
    def add_to_weight(self, delta: Tensor) -> None:
        """Requantise ``dequantized_weight() + delta`` into this layer's codes and scales in place:
        the tensors keep their identity, so compiled graphs that read them stay valid (LoRA merging
        uses this; it keeps a copy of the codes and scales to put back)."""
        codes, scale = quantize_rowwise(self.dequantized_weight() + delta.float())
        self.weight.copy_(codes)
        self.weight_scale.copy_(scale)

    def dequantized_weight(self) -> Tensor:
        """The float32 weight this layer effectively multiplies by (for checks and debugging)."""
        return self.weight.float() * self.weight_scale

    def _use_scaled_mm(self, device: torch.device) -> bool:
        if self.backend == "auto":
            return fp8_matmul_supported(device)
        return self.backend == "scaled_mm"

    def forward(self, x: Tensor) -> Tensor:
        if self.backend == "dequantize":
            weight = self.dequantized_weight().to(x.dtype)
            return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))
        lead = x.shape[:-1]
        codes, scale = quantize_rowwise(x.reshape(-1, self.in_features))
        matmul = scaled_mm_rowwise if self._use_scaled_mm(x.device) else emulated_mm_rowwise
        out = matmul(codes, scale, self.weight, self.weight_scale, self.bias)
        return out.to(x.dtype).reshape(*lead, self.out_features)

    def _apply(self, fn, recurse=True):
        # Let ``fn`` move/cast everything else, then move the codes and scales to the device ``fn``
        # chose for a probe tensor, keeping their dtypes.
        kept = {name: self._buffers[name] for name in ("weight", "weight_scale")}
        for name in kept:
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for name, tensor in kept.items():
                device = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device)).device
                if device == tensor.device:
                    self._buffers[name] = tensor
                elif tensor.is_meta:  # to_empty() from the meta device
                    self._buffers[name] = torch.empty_like(tensor, device=device)
                else:
                    self._buffers[name] = tensor.to(device)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, backend={self.backend}"
        )
