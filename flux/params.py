"""The hyper-parameters of FLUX's two networks, free of torch: the model registry, the flags and
``--help`` read them before any model is built."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FluxParams:
    """Hyper-parameters, with the official field names (a tiny test config is one line)."""

    in_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True


@dataclass
class AutoEncoderParams:
    resolution: int
    in_channels: int
    ch: int
    out_ch: int
    ch_mult: list[int]
    num_res_blocks: int
    z_channels: int
    scale_factor: float
    shift_factor: float
