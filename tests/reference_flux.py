"""An independent float64 implementation of the FLUX DiT and AE decoder, for numeric tests.

Written from the published math with plain tensor ops on a state dict (no module of ``flux`` is
used): RoPE as complex rotations, attention as an explicit softmax, LayerNorm and GroupNorm from
their definitions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

F64 = torch.float64


def linear(sd: dict[str, Tensor], prefix: str, x: Tensor) -> Tensor:
    out = x @ sd[f"{prefix}.weight"].to(F64).T
    bias = sd.get(f"{prefix}.bias")
    return out if bias is None else out + bias.to(F64)


def silu(x: Tensor) -> Tensor:
    return x / (1 + torch.exp(-x))


def gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def layer_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def rms_norm(x: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * scale.to(F64)


def sinusoidal(t: Tensor, dim: int = 256, max_period: float = 10_000.0) -> Tensor:
    half = dim // 2
    k = torch.arange(half, dtype=F64)
    args = (1000.0 * t.to(F64))[:, None] * torch.exp(-math.log(max_period) * k / half)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


def rope_rotate(x: Tensor, ids: Tensor, axes_dim: list[int], theta: float) -> Tensor:
    """Rotate channel pairs (2j, 2j+1) of x (B, H, L, D) by angle pos_axis * theta^(-2j'/d_axis)."""
    angles = []
    for axis, d in enumerate(axes_dim):
        freqs = theta ** (-torch.arange(0, d, 2, dtype=F64) / d)
        angles.append(ids[..., axis].to(F64)[..., None] * freqs)
    angle = torch.cat(angles, -1)[:, None]  # (B, 1, L, D/2)
    pairs = torch.complex(x[..., 0::2], x[..., 1::2]) * torch.polar(torch.ones_like(angle), angle)
    return torch.stack([pairs.real, pairs.imag], -1).reshape(x.shape)


def softmax_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    return (weights / weights.sum(-1, keepdim=True)) @ v


def heads(x: Tensor, num_heads: int) -> Tensor:
    b, length, d = x.shape
    return x.reshape(b, length, num_heads, d // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)


def modulation(sd, prefix, vec, n):
    out = linear(sd, prefix, silu(vec))[:, None]
    return out.chunk(n, -1)


def flux_forward(sd, cfg, img, img_ids, txt, txt_ids, timesteps, y, guidance, residual_fn=None):
    """The DiT forward. ``residual_fn(kind, index, img_tokens)`` optionally adds identity residuals."""
    sd = {k: v.to(F64) for k, v in sd.items()}
    nh, hidden = cfg.num_heads, cfg.hidden_size
    ids = torch.cat([txt_ids, img_ids], 1)

    def mlp_embed(prefix, x):
        return linear(sd, f"{prefix}.out_layer", silu(linear(sd, f"{prefix}.in_layer", x)))

    x_img = linear(sd, "img_in", img.to(F64))
    vec = mlp_embed("time_in", sinusoidal(timesteps))
    if cfg.guidance_embed:
        vec = vec + mlp_embed("guidance_in", sinusoidal(guidance))
    vec = vec + mlp_embed("vector_in", y.to(F64))
    x_txt = linear(sd, "txt_in", txt.to(F64))
    n_txt = x_txt.shape[1]

    def qkv_heads(prefix, x):
        q, k, v = linear(sd, f"{prefix}.qkv", x).chunk(3, -1)
        q, k, v = heads(q, nh), heads(k, nh), heads(v, nh)
        return (
            rms_norm(q, sd[f"{prefix}.norm.query_norm.scale"]),
            rms_norm(k, sd[f"{prefix}.norm.key_norm.scale"]),
            v,
        )

    for i in range(cfg.depth):
        p = f"double_blocks.{i}"
        i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2 = modulation(sd, f"{p}.img_mod.lin", vec, 6)
        t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = modulation(sd, f"{p}.txt_mod.lin", vec, 6)
        iq, ik, iv = qkv_heads(f"{p}.img_attn", (1 + i_sc1) * layer_norm(x_img) + i_sh1)
        tq, tk, tv = qkv_heads(f"{p}.txt_attn", (1 + t_sc1) * layer_norm(x_txt) + t_sh1)
        q = rope_rotate(torch.cat([tq, iq], 2), ids, cfg.axes_dim, cfg.theta)
        k = rope_rotate(torch.cat([tk, ik], 2), ids, cfg.axes_dim, cfg.theta)
        attn = merge_heads(softmax_attention(q, k, torch.cat([tv, iv], 2)))
        t_attn, i_attn = attn[:, :n_txt], attn[:, n_txt:]

        def mlp(prefix, h):
            return linear(sd, f"{prefix}.2", gelu_tanh(linear(sd, f"{prefix}.0", h)))

        x_img = x_img + i_g1 * linear(sd, f"{p}.img_attn.proj", i_attn)
        x_img = x_img + i_g2 * mlp(f"{p}.img_mlp", (1 + i_sc2) * layer_norm(x_img) + i_sh2)
        x_txt = x_txt + t_g1 * linear(sd, f"{p}.txt_attn.proj", t_attn)
        x_txt = x_txt + t_g2 * mlp(f"{p}.txt_mlp", (1 + t_sc2) * layer_norm(x_txt) + t_sh2)
        if residual_fn is not None:
            r = residual_fn("double", i, x_img)
            if r is not None:
                x_img = x_img + r

    x = torch.cat([x_txt, x_img], 1)
    mlp_hidden = int(hidden * cfg.mlp_ratio)
    for i in range(cfg.depth_single_blocks):
        p = f"single_blocks.{i}"
        sh, sc, g = modulation(sd, f"{p}.modulation.lin", vec, 3)
        h = linear(sd, f"{p}.linear1", (1 + sc) * layer_norm(x) + sh)
        qkv, mlp_in = h[..., : 3 * hidden], h[..., 3 * hidden :]
        assert mlp_in.shape[-1] == mlp_hidden
        q, k, v = (heads(t, nh) for t in qkv.chunk(3, -1))
        q = rope_rotate(rms_norm(q, sd[f"{p}.norm.query_norm.scale"]), ids, cfg.axes_dim, cfg.theta)
        k = rope_rotate(rms_norm(k, sd[f"{p}.norm.key_norm.scale"]), ids, cfg.axes_dim, cfg.theta)
        attn = merge_heads(softmax_attention(q, k, v))
        x = x + g * linear(sd, f"{p}.linear2", torch.cat([attn, gelu_tanh(mlp_in)], -1))
        if residual_fn is not None:
            r = residual_fn("single", i, x[:, n_txt:])
            if r is not None:
                x = torch.cat([x[:, :n_txt], x[:, n_txt:] + r], 1)

    x = x[:, n_txt:]
    shift, scale = linear(sd, "final_layer.adaLN_modulation.1", silu(vec)).chunk(2, -1)
    x = (1 + scale[:, None]) * layer_norm(x) + shift[:, None]
    return linear(sd, "final_layer.linear", x)


# ---------------------------------------------------------------- autoencoder decoder


def conv2d(sd, prefix, x, stride=1, padding=0):
    return torch.nn.functional.conv2d(
        x, sd[f"{prefix}.weight"].to(F64), sd[f"{prefix}.bias"].to(F64), stride=stride, padding=padding
    )


def group_norm(sd, prefix, x, groups=32, eps=1e-6):
    b, c, h, w = x.shape
    g = x.reshape(b, groups, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + eps)
    x = g.reshape(b, c, h, w)
    return (
        x * sd[f"{prefix}.weight"].to(F64)[None, :, None, None]
        + sd[f"{prefix}.bias"].to(F64)[None, :, None, None]
    )


def resnet(sd, prefix, x):
    h = conv2d(sd, f"{prefix}.conv1", silu(group_norm(sd, f"{prefix}.norm1", x)), padding=1)
    h = conv2d(sd, f"{prefix}.conv2", silu(group_norm(sd, f"{prefix}.norm2", h)), padding=1)
    if f"{prefix}.nin_shortcut.weight" in sd:
        x = conv2d(sd, f"{prefix}.nin_shortcut", x)
    return x + h


def pixel_attention(sd, prefix, x):
    b, c, h, w = x.shape
    n = group_norm(sd, f"{prefix}.norm", x)
    q, k, v = (conv2d(sd, f"{prefix}.{name}", n).reshape(b, c, h * w).transpose(1, 2) for name in "qkv")
    out = softmax_attention(q, k, v).transpose(1, 2).reshape(b, c, h, w)
    return x + conv2d(sd, f"{prefix}.proj_out", out)


def ae_decode(sd, params, z):
    """Decoder of the FLUX autoencoder: un-scale the latent, then conv_in, mid, up stages, out."""
    sd = {k: v.to(F64) for k, v in sd.items()}
    h = z.to(F64) / params.scale_factor + params.shift_factor
    h = conv2d(sd, "decoder.conv_in", h, padding=1)
    h = resnet(sd, "decoder.mid.block_1", h)
    h = pixel_attention(sd, "decoder.mid.attn_1", h)
    h = resnet(sd, "decoder.mid.block_2", h)
    for level in reversed(range(len(params.ch_mult))):
        for j in range(params.num_res_blocks + 1):
            h = resnet(sd, f"decoder.up.{level}.block.{j}", h)
        if level != 0:
            h = h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
            h = conv2d(sd, f"decoder.up.{level}.upsample.conv", h, padding=1)
    h = silu(group_norm(sd, "decoder.norm_out", h))
    return conv2d(sd, "decoder.conv_out", h, padding=1)


def ae_encode_mean(sd, params, x):
    """Encoder of the FLUX autoencoder, returning the scaled posterior mean."""
    sd = {k: v.to(F64) for k, v in sd.items()}
    h = conv2d(sd, "encoder.conv_in", x.to(F64), padding=1)
    for level in range(len(params.ch_mult)):
        for j in range(params.num_res_blocks):
            h = resnet(sd, f"encoder.down.{level}.block.{j}", h)
        if level != len(params.ch_mult) - 1:
            h = conv2d(
                sd,
                f"encoder.down.{level}.downsample.conv",
                torch.nn.functional.pad(h, (0, 1, 0, 1)),
                stride=2,
            )
    h = resnet(sd, "encoder.mid.block_1", h)
    h = pixel_attention(sd, "encoder.mid.attn_1", h)
    h = resnet(sd, "encoder.mid.block_2", h)
    h = conv2d(sd, "encoder.conv_out", silu(group_norm(sd, "encoder.norm_out", h)), padding=1)
    mean = h[:, : params.z_channels]
    return params.scale_factor * (mean - params.shift_factor)
