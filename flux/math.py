"""Rotary position embedding and attention, as FLUX computes them.

RoPE frequencies are computed in float64 and applied in float32, then cast back to the
activation dtype, which is what the official implementation does; keeping that order keeps
bf16 results bit-compatible with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices for positions ``pos`` (B, L): returns (B, L, dim/2, 2, 2) float32."""
    if dim % 2:
        raise ValueError(f"RoPE dimension must be even, got {dim}")
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    angles = pos.to(torch.float64)[..., None] * omega
    cos, sin = torch.cos(angles), torch.sin(angles)
    rot = torch.stack([cos, -sin, sin, cos], dim=-1)
    return rot.reshape(*rot.shape[:-1], 2, 2).float()


def apply_rope(xq: Tensor, xk: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate consecutive channel pairs of q and k (B, H, L, D) by ``freqs`` (B, 1, L, D/2, 2, 2)."""

    def rotate(x: Tensor) -> Tensor:
        pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
        out = freqs[..., 0] * pairs[..., 0] + freqs[..., 1] * pairs[..., 1]
        return out.reshape(*x.shape).type_as(x)

    return rotate(xq), rotate(xk)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor | None) -> Tensor:
    """RoPE then scaled dot-product attention; (B, H, L, D) in, (B, L, H*D) out."""
    if pe is not None:
        q, k = apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)
