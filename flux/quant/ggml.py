"""GGML block quantisation (the tensors of GGUF files) in torch: dequantisation and a Linear layer.

City96's FLUX.1-dev GGUF files (and llama.cpp's T5 ones) hold most weights in GGML's block formats:
a row is cut into blocks of 32 (Q8_0, Q5_x, Q4_x) or 256 (the K formats) values, each block
storing small integers plus one or two float16 scales. :class:`GGMLLinear` keeps those bytes as
they are in memory (so a Q4_K DiT costs 6.8 GB of RAM, VRAM or streaming bandwidth, not 23.8 GB)
and dequantises its weight on the device, in float32, each time it runs; under ``torch.compile``
the dequantisation fuses into one kernel per layer.

The formats follow ggml's ``ggml-quants.c`` block structs; every function here is checked against
the ``gguf`` package's own numpy dequantisation on random bytes of every type (tests/test_gguf.py).
Integers times float16 scales are exact in float32, so the weight is rounded only once, to the
compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

QK_K = 256  # values per super-block of the K formats


@dataclass(frozen=True)
class BlockFormat:
    """One GGML block type: values per block, bytes per block, and how to dequantise blocks."""

    name: str
    block_size: int
    type_size: int
    dequantize_blocks: Callable[[Tensor], Tensor]  # (n, type_size) uint8 -> (n, block_size) float32


def _f16(blocks: Tensor, start: int) -> Tensor:
    """The float16 at byte ``start`` of every block, as float32 of shape (n, 1)."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    """(n, k) bytes -> (n, 2k) values: the low nibbles of all bytes, then their high nibbles."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _high_bits(qh: Tensor, count: int) -> Tensor:
    """Bit i of a little-endian bit field ``qh`` (n, count // 8 bytes) for i < count, as (n, count)."""
    shifts = torch.arange(8, device=qh.device, dtype=torch.uint8)
    bits = (qh.unsqueeze(-1) >> shifts) & 1  # (n, bytes, 8): byte b, bit j is value 8b + j
    return bits.reshape(qh.shape[0], count)


def _q8_0(blocks: Tensor) -> Tensor:
    d = _f16(blocks, 0)
    return blocks[:, 2:].contiguous().view(torch.int8).float() * d


def _q4_0(blocks: Tensor) -> Tensor:
    d = _f16(blocks, 0)
    return (_nibbles(blocks[:, 2:]).float() - 8.0) * d


def _q4_1(blocks: Tensor) -> Tensor:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    return d * _nibbles(blocks[:, 4:]).float() + m


def _q5_0(blocks: Tensor) -> Tensor:
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 6:]) | (_high_bits(blocks[:, 2:6], 32) << 4)
    return (q.float() - 16.0) * d


def _q5_1(blocks: Tensor) -> Tensor:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 8:]) | (_high_bits(blocks[:, 4:8], 32) << 4)
    return d * q.float() + m


def _k_scales(scales: Tensor) -> tuple[Tensor, Tensor]:
    """The 8 six-bit scales and 8 six-bit mins packed in the 12 bytes of a Q4_K/Q5_K super-block.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same
    for the mins; bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high nibble).
    """
    low_sc, low_m, rest = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat((low_sc & 0x3F, (rest & 0x0F) | ((low_sc >> 6) << 4)), dim=-1)
    mn = torch.cat((low_m & 0x3F, (rest >> 4) | ((low_m >> 6) << 4)), dim=-1)
    return sc.float(), mn.float()


def _k_nibbles(qs: Tensor) -> Tensor:
    """Q4_K/Q5_K low bits: each 32-byte chunk gives 32 low-nibble values then 32 high-nibble ones."""
    chunks = qs.reshape(qs.shape[0], -1, 1, 32)
    return torch.cat((chunks & 0x0F, chunks >> 4), dim=2).reshape(qs.shape[0], -1)


def _q4_k(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _k_scales(blocks[:, 4:16])
    q = _k_nibbles(blocks[:, 16:]).float().reshape(n, 8, 32)
    return ((d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)).reshape(n, QK_K)


def _q5_k(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _k_scales(blocks[:, 4:16])
    qh = blocks[:, 16:48]  # bit j of byte l is the fifth bit of value 32 j + l
    shifts = torch.arange(8, device=blocks.device, dtype=torch.uint8).view(1, 8, 1)
    high = (qh.unsqueeze(1) >> shifts) & 1  # (n, 8, 32)
    q = (_k_nibbles(blocks[:, 48:]).reshape(n, 8, 32) | (high << 4)).float()
    return ((d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)).reshape(n, QK_K)


def _q6_k(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    ql, qh = blocks[:, 0:128], blocks[:, 128:192]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(blocks, 208)
    # Two halves of 128 values; in each, 64 bytes of low nibbles (values 0-63 low, 64-127 high)
    # and 32 bytes of 2-bit pairs (bits 2k..2k+1 of byte l belong to value 32 k + l).
    low = ql.reshape(n, 2, 1, 64)
    low = torch.cat((low & 0x0F, low >> 4), dim=2).reshape(n, 2, 4, 32)
    shifts = torch.arange(0, 8, 2, device=blocks.device, dtype=torch.uint8).view(1, 1, 4, 1)
    high = (qh.reshape(n, 2, 1, 32) >> shifts) & 0x03
    q = ((low | (high << 4)).to(torch.int8) - 32).float().reshape(n, 16, 16)
    return ((d * scales).unsqueeze(-1) * q).reshape(n, QK_K)


FORMATS: dict[str, BlockFormat] = {
    fmt.name: fmt
    for fmt in (
        BlockFormat("Q8_0", 32, 34, _q8_0),
        BlockFormat("Q4_0", 32, 18, _q4_0),
        BlockFormat("Q4_1", 32, 20, _q4_1),
        BlockFormat("Q5_0", 32, 22, _q5_0),
        BlockFormat("Q5_1", 32, 24, _q5_1),
        BlockFormat("Q4_K", QK_K, 144, _q4_k),
        BlockFormat("Q5_K", QK_K, 176, _q5_k),
        BlockFormat("Q6_K", QK_K, 210, _q6_k),
    )
}


def row_bytes(qtype: str, row_length: int) -> int:
    """Bytes that ``row_length`` values take in ``qtype`` (which must divide into whole blocks)."""
    fmt = FORMATS[qtype]
    if row_length % fmt.block_size:
        raise ValueError(
            f"{qtype} needs rows that are multiples of {fmt.block_size} values, not {row_length}"
        )
    return row_length // fmt.block_size * fmt.type_size


def dequantize(
    data: Tensor, qtype: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> Tensor:
    """The ``shape`` tensor stored in ``data`` (bytes as uint8 or int8, any shape with the right
    count) as ``dtype``.

    Computed in float32 (exact for these formats), then rounded once to ``dtype``.
    """
    fmt = FORMATS[qtype]
    blocks = data.view(torch.uint8).reshape(-1, fmt.type_size)
    return fmt.dequantize_blocks(blocks).reshape(shape).to(dtype)


class GGMLLinear(nn.Module):
    """``nn.Linear`` whose weight stays GGML-quantised in memory and is dequantised as it runs.

    State: ``weight`` (the file's blocks, row by row: (out_features, bytes per row), held as int8 so
    that transformers' T5, which casts activations to its output layer's weight dtype unless that is
    int8, leaves them alone) and ``bias`` in the model's dtype. ``qtype`` is one of :data:`FORMATS`.
    Being plain bytes, the weight moves with ``.to(device)``, streams with the memory placement as
    its quantised size and is left alone by ``.to(dtype)``. The output has the input's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        qtype: str,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        if qtype not in FORMATS:
            raise ValueError(f"unsupported GGML type {qtype!r}; supported: {', '.join(FORMATS)}")
        self.in_features = in_features
        self.out_features = out_features
        self.qtype = qtype
        nbytes = row_bytes(qtype, in_features)
        self.register_buffer("weight", torch.zeros(out_features, nbytes, dtype=torch.int8, device=device))
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    @classmethod
    def like(cls, linear: nn.Linear, qtype: str) -> GGMLLinear:
        """An empty layer of ``linear``'s size and device (meta included) for weights in ``qtype``."""
        return cls(
            linear.in_features,
            linear.out_features,
            qtype,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.weight, self.qtype, (self.out_features, self.in_features), dtype)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"qtype={self.qtype}, bias={self.bias is not None}"
        )
