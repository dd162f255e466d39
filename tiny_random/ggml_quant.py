"""Plain GGML quantisers in torch, to make GGUF test files and benchmark weights of every type.

The ``gguf`` package quantises only the 32-value formats (Q8_0, Q4_x, Q5_x); these functions cover
the K formats too. They use the simple rule (each sub-block's min/max or absmax, scales rounded to
their 6- or 8-bit codes), not llama.cpp's search for the best scales, so their error is a little
above that of the published files: an upper estimate. They run on the GPU for the full-size DiT.
The bytes they write are read back by the ``gguf`` package's dequantiser in the tests, which
checks their layout independently of :mod:`flux.quant.ggml`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flux.quant.ggml import FORMATS


def _f16_bytes(x: Tensor) -> Tensor:
    """(n, 1) float -> (n, 2) uint8: the float16 bytes."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(x.shape[0], 2)


def _pack_nibbles(lo: Tensor, hi: Tensor) -> Tensor:
    return (lo & 0x0F) | ((hi & 0x0F) << 4)


def _bits_to_bytes(bits: Tensor) -> Tensor:
    """(n, 8k) values of 0/1 -> (n, k) bytes, value 8b + j at bit j of byte b."""
    n = bits.shape[0]
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return (bits.reshape(n, -1, 8).to(torch.uint8) << shifts).sum(-1).to(torch.uint8)


def _signed_max(x: Tensor) -> Tensor:
    """Per row, the value of largest magnitude with its sign (GGML's Q4_0/Q5_0 reference scale)."""
    index = x.abs().argmax(dim=-1, keepdim=True)
    return x.gather(-1, index)


def _safe_inverse(d: Tensor) -> Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _q8_0(x: Tensor) -> Tensor:
    d = x.abs().amax(-1, keepdim=True) / 127
    d16 = d.to(torch.float16).float()
    q = torch.round(x * _safe_inverse(d16)).clamp(-127, 127).to(torch.int8).view(torch.uint8)
    return torch.cat((_f16_bytes(d), q), dim=-1)


def _q4_0(x: Tensor) -> Tensor:
    d = _signed_max(x) / -8
    q = torch.floor(x * _safe_inverse(d.to(torch.float16).float()) + 8.5).clamp(0, 15).to(torch.uint8)
    return torch.cat((_f16_bytes(d), _pack_nibbles(q[:, :16], q[:, 16:])), dim=-1)


def _q4_1(x: Tensor) -> Tensor:
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    d16, m16 = d.to(torch.float16).float(), lo.to(torch.float16).float()
    q = torch.floor((x - m16) * _safe_inverse(d16) + 0.5).clamp(0, 15).to(torch.uint8)
    return torch.cat((_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q[:, :16], q[:, 16:])), dim=-1)


def _q5_0(x: Tensor) -> Tensor:
    d = _signed_max(x) / -16
    q = torch.floor(x * _safe_inverse(d.to(torch.float16).float()) + 16.5).clamp(0, 31).to(torch.uint8)
    return torch.cat((_f16_bytes(d), _bits_to_bytes(q >> 4), _pack_nibbles(q[:, :16], q[:, 16:])), dim=-1)


def _q5_1(x: Tensor) -> Tensor:
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    d = (hi - lo) / 31
    d16, m16 = d.to(torch.float16).float(), lo.to(torch.float16).float()
    q = torch.floor((x - m16) * _safe_inverse(d16) + 0.5).clamp(0, 31).to(torch.uint8)
    return torch.cat(
        (_f16_bytes(d), _f16_bytes(lo), _bits_to_bytes(q >> 4), _pack_nibbles(q[:, :16], q[:, 16:])), dim=-1
    )


def _k_scale_codes(x: Tensor, levels: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Super-block scales of Q4_K/Q5_K: (d, dmin, 6-bit scale codes, 6-bit min codes, value codes)."""
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    lo = sub.amin(-1).clamp(max=0)  # mins are stored as non-negative offsets below zero
    hi = sub.amax(-1)
    scale = (hi - lo) / levels
    d = scale.amax(-1, keepdim=True) / 63
    dmin = (-lo).amax(-1, keepdim=True) / 63
    d16, dmin16 = d.to(torch.float16).float(), dmin.to(torch.float16).float()
    sc = torch.round(scale * _safe_inverse(d16)).clamp(0, 63)
    mn = torch.round(-lo * _safe_inverse(dmin16)).clamp(0, 63)
    step = (d16 * sc).unsqueeze(-1)
    offset = (dmin16 * mn).unsqueeze(-1)
    q = torch.round((sub + offset) * _safe_inverse(step)).clamp(0, levels).to(torch.uint8)
    return d, dmin, sc.to(torch.uint8), mn.to(torch.uint8), q


def _pack_k_scales(sc: Tensor, mn: Tensor) -> Tensor:
    """Inverse of :func:`flux.quant.ggml._k_scales`: 8 scale and 8 min codes -> 12 bytes."""
    first = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    second = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    third = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return torch.cat((first, second, third), dim=-1)


def _k_low_nibbles(q: Tensor) -> Tensor:
    """(n, 8, 32) values -> (n, 128) bytes: sub-blocks 2c and 2c+1 share the bytes of chunk c."""
    n = q.shape[0]
    return _pack_nibbles(q[:, 0::2], q[:, 1::2]).reshape(n, 128)


def _q4_k(x: Tensor) -> Tensor:
    d, dmin, sc, mn, q = _k_scale_codes(x, 15)
    return torch.cat((_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, mn), _k_low_nibbles(q)), dim=-1)


def _q5_k(x: Tensor) -> Tensor:
    d, dmin, sc, mn, q = _k_scale_codes(x, 31)
    shifts = torch.arange(8, device=x.device, dtype=torch.uint8).view(1, 8, 1)
    qh = (((q >> 4) & 1) << shifts).sum(1).to(torch.uint8)  # bit j of byte l: sub-block j, value l
    return torch.cat(
        (_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, mn), qh, _k_low_nibbles(q & 0x0F)), dim=-1
    )


def _q6_k(x: Tensor) -> Tensor:
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    scale = _signed_max(sub) / -32  # (n, 16, 1)
    d = scale.abs().amax(1) / 127  # (n, 1)
    d16 = d.to(torch.float16).float()
    sc = torch.round(scale.squeeze(-1) * _safe_inverse(d16)).clamp(-127, 127)
    step = (d16 * sc).unsqueeze(-1)
    q = (torch.round(sub * _safe_inverse(step)) + 32).clamp(0, 63).to(torch.uint8).reshape(n, 2, 4, 32)
    low = q & 0x0F
    ql = torch.cat((_pack_nibbles(low[:, :, 0], low[:, :, 2]), _pack_nibbles(low[:, :, 1], low[:, :, 3])), -1)
    shifts = torch.arange(0, 8, 2, device=x.device, dtype=torch.uint8).view(1, 1, 4, 1)
    qh = ((q >> 4) << shifts).sum(2).to(torch.uint8)  # (n, 2, 32)
    scales = sc.to(torch.int8).view(torch.uint8)
    return torch.cat((ql.reshape(n, 128), qh.reshape(n, 64), scales, _f16_bytes(d)), dim=-1)


_QUANTIZERS = {
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


def quantize(weight: Tensor, qtype: str) -> Tensor:
    """(rows, cols) float -> (rows, bytes per row) uint8 in ``qtype`` (cols a multiple of its block)."""
    fmt = FORMATS[qtype]
    rows, cols = weight.shape
    if cols % fmt.block_size:
        raise ValueError(f"{qtype} needs rows that are multiples of {fmt.block_size}, not {cols}")
    blocks = weight.detach().float().reshape(-1, fmt.block_size)
    out = _QUANTIZERS[qtype](blocks)
    assert out.shape[1] == fmt.type_size, (qtype, out.shape)
    return out.reshape(rows, cols // fmt.block_size * fmt.type_size)
